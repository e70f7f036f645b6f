//! The proxy's connections to one upstream instance: HTTP/1.1 keep-alive
//! connections (hyper's client connection), reused most recently idle first
//! and closed once idle for the service's `idle_timeout_ms`.
//!
//! hyper-util's pooled `Client` does the same job, but for every HTTP/1
//! request it hashes a pool key, rewrites the URI to origin form, and spawns a
//! task whose only work is to put the connection back; on the gateway's hot
//! path that was a tenth of its user-space time. Here the request's own task
//! puts the connection back once it has read the body, which is almost always
//! the moment the connection is ready for the next request.

use std::{
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response,
    client::conn::http1::{self, SendRequest},
    header::HeaderValue,
};
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

/// More idle connections than this to one instance are closed rather than
/// kept; a burst's extra connections are not worth holding.
const MAX_IDLE: usize = 256;

#[derive(Debug)]
pub struct ConnPool {
    /// `host:port` to connect to.
    authority: String,
    /// The `Host` header every request carries (HTTP/1.1 requires it).
    host: Option<HeaderValue>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// A stack: the most recently used connection is taken first, so
    /// connections a burst opened are the ones left to time out.
    idle: parking_lot::Mutex<Vec<Idle>>,
    reaper: std::sync::Once,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// The largest answer read from an upstream. prism's own answers are far
/// smaller (a page holds at most 1,000 items); a larger one is an upstream
/// misbehaving, and is not held in memory.
pub const MAX_ANSWER: usize = 16 << 20;

/// Why an exchange failed.
#[derive(Debug)]
pub struct ExchangeError {
    pub message: String,
    pub trouble: Trouble,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// Connecting failed or the connection broke.
    Connection,
    /// The gateway itself was out of file descriptors: says nothing about
    /// the instance.
    OutOfFiles,
    /// The answer was over [`MAX_ANSWER`].
    TooLarge,
}

impl ExchangeError {
    fn new(message: impl Into<String>) -> ExchangeError {
        ExchangeError {
            message: message.into(),
            trouble: Trouble::Connection,
        }
    }
}

/// Whether an error is this process (or the system) running out of file
/// descriptors.
fn out_of_files(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl ConnPool {
    /// `url` is an instance's base URL, `http://host:port`.
    pub fn new(url: &str, connect_timeout: Duration, idle_timeout: Duration) -> ConnPool {
        let uri = url.parse::<hyper::Uri>().ok();
        let authority = uri.as_ref().and_then(|u| u.authority());
        let host = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        let authority = match authority {
            Some(a) if a.port().is_some() => a.as_str().to_owned(),
            Some(a) => format!("{}:80", a.host()),
            // The registry refuses such URLs; connecting reports it.
            None => url.to_owned(),
        };
        ConnPool {
            authority,
            host,
            connect_timeout,
            idle_timeout,
            idle: parking_lot::Mutex::new(Vec::new()),
            reaper: std::sync::Once::new(),
        }
    }

    /// The `Host` header for requests to this instance; `None` when its URL
    /// has no authority (the registry refuses such URLs).
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// Sends `req` (its URI in origin form: path and query, its `Host` header
    /// set by the caller, see [`ConnPool::host`]) and reads the whole answer.
    /// A pooled connection the upstream closed while it was idle is replaced
    /// by a new one without the request having been sent.
    pub async fn exchange(
        self: &Arc<Self>,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>, ExchangeError> {
        loop {
            let (mut sender, pooled) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            let resp = match sender.try_send_request(req).await {
                Ok(r) => r,
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => {
                        req = unsent;
                        continue;
                    }
                    _ => return Err(ExchangeError::new(e.into_error().to_string())),
                },
            };
            let (parts, body) = resp.into_parts();
            // On an error the connection is dropped with the sender: what is
            // left of the answer is not read.
            let body = whole(body, MAX_ANSWER).await?;
            self.checkin(sender);
            return Ok(Response::from_parts(parts, body));
        }
    }

    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock();
        while let Some(i) = idle.pop() {
            if i.sender.is_ready() {
                return Some(i.sender);
            }
        }
        None
    }

    fn checkin(self: &Arc<Self>, mut sender: Sender) {
        if sender.is_ready() {
            self.put(sender);
        } else if !sender.is_closed() {
            // The connection has not yet noticed the answer is complete.
            let pool = self.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(sender);
                }
            });
        }
    }

    fn put(&self, sender: Sender) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<Sender, ExchangeError> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| ExchangeError::new(format!("connecting to {} timed out", self.authority)))?
        .map_err(|e| ExchangeError {
            message: format!("cannot connect to {}: {e}", self.authority),
            trouble: if out_of_files(&e) {
                Trouble::OutOfFiles
            } else {
                Trouble::Connection
            },
        })?;
        let _ = tcp.set_nodelay(true);
        // Plain writes, as the gateway's server side does (see there).
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ExchangeError::new(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        self.reaper.call_once(|| {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        });
        Ok(sender)
    }

    /// Idle connections now in the pool.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}

/// A body read whole, up to `limit` bytes. Most answers arrive as one chunk
/// with a declared length: that chunk is the body, taken as soon as the
/// length is reached. `collect` would poll once more for the end, and gather
/// the chunks in a queue of its own first (about 500 instructions per
/// proxied request).
async fn whole(mut body: hyper::body::Incoming, limit: usize) -> Result<Bytes, ExchangeError> {
    use hyper::body::Body;
    let too_large = || ExchangeError {
        message: format!("the upstream's answer is over {limit} bytes"),
        trouble: Trouble::TooLarge,
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let mut first = Bytes::new();
    let mut more: Option<bytes::BytesMut> = None;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        // Trailers end the body; an upstream's trailers are not passed on.
        let Ok(data) = frame
            .map_err(|e| ExchangeError::new(e.to_string()))?
            .into_data()
        else {
            continue;
        };
        match &mut more {
            Some(buf) if buf.len() + data.len() > limit => return Err(too_large()),
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None if first.len() + data.len() > limit => return Err(too_large()),
            None => {
                let mut buf = bytes::BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                more = Some(buf);
            }
        }
    }
    Ok(more.map_or(first, bytes::BytesMut::freeze))
}

/// Closes connections idle for longer than `timeout`, until the pool is gone.
async fn reap(pool: Weak<ConnPool>, timeout: Duration) {
    let mut tick = tokio::time::interval(timeout.max(Duration::from_millis(10)) / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        // Dropped after the lock is released: closing is a syscall.
        let expired: Vec<Idle> = {
            let mut idle = pool.idle.lock();
            let (keep, expired) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|i| now.duration_since(i.since) < timeout && !i.sender.is_closed());
            *idle = keep;
            expired
        };
        drop(expired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn running_out_of_descriptors_is_the_gateways_own_trouble() {
        use std::io::Error;
        for errno in [libc::EMFILE, libc::ENFILE] {
            assert!(out_of_files(&Error::from_raw_os_error(errno)));
        }
        assert!(!out_of_files(&Error::from_raw_os_error(libc::ECONNREFUSED)));
        assert!(!out_of_files(&Error::other("no errno")));
    }

    /// A bare HTTP/1.1 server answering every request with `body`. It reports
    /// each accepted connection, and each connection that ended (closed by
    /// the client, or by the server). With `hang_up` it closes each
    /// connection after one answer once `hang_up` is notified, without saying
    /// so in a header, as an upstream whose keep-alive timeout ran out does.
    async fn server(
        body: &'static str,
        hang_up: Option<Arc<tokio::sync::Notify>>,
    ) -> (
        String,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = tx.send(());
                let closed_tx = closed_tx.clone();
                let hang_up = hang_up.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                let _ = closed_tx.send(());
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(head.as_bytes()).await.is_err() {
                                return;
                            }
                            if let Some(hang_up) = &hang_up {
                                hang_up.notified().await;
                                drop(s);
                                let _ = closed_tx.send(());
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, rx, closed_rx)
    }

    fn pool(url: &str, idle_timeout: Duration) -> Arc<ConnPool> {
        Arc::new(ConnPool::new(url, Duration::from_secs(1), idle_timeout))
    }

    /// The next event on a test server's channel.
    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>, what: &str) {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} never happened"))
            .unwrap();
    }

    /// A listener on a free port, and its URL.
    async fn listen() -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        (listener, url)
    }

    /// Reads from `s` into `buf` until it holds a whole request head, and
    /// returns the head's length.
    async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> usize {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return end + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the request never came");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::get(path).body(Full::new(Bytes::new())).unwrap()
    }

    /// The answer to a GET of `path`, which must come within five seconds.
    async fn answered(pool: &Arc<ConnPool>, path: &str) -> Response<Bytes> {
        tokio::time::timeout(Duration::from_secs(5), pool.exchange(get(path)))
            .await
            .expect("the exchange hung")
            .unwrap()
    }

    #[tokio::test]
    async fn one_connection_serves_requests_in_turn_and_is_reaped_when_idle() {
        let (url, mut accepted, mut closed) = server("hello", None).await;
        let pool = pool(&url, Duration::from_millis(100));
        for _ in 0..3 {
            let r = pool.exchange(get("/x")).await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.body().as_ref(), b"hello");
        }
        next(&mut accepted, "a connection").await;
        assert!(accepted.try_recv().is_err(), "one connection for all three");
        assert_eq!(pool.idle_count(), 1);
        // The server sees the connection closed once the reaper drops it.
        next(&mut closed, "closing the idle connection").await;
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_without_failing_the_request() {
        let hang_up = Arc::new(tokio::sync::Notify::new());
        let (url, mut accepted, mut closed) = server("again", Some(hang_up.clone())).await;
        let pool = pool(&url, Duration::from_secs(60));
        for _ in 0..3 {
            let r = pool.exchange(get("/y")).await.unwrap();
            assert_eq!(r.body().as_ref(), b"again");
            // The connection is back in the pool; now the upstream closes it.
            assert_eq!(pool.idle_count(), 1);
            hang_up.notify_one();
            next(&mut closed, "the server hanging up").await;
            // Lets the runtime take in the hang-up (it polls its I/O driver
            // before resuming a yielded task).
            tokio::task::yield_now().await;
        }
        for _ in 0..3 {
            accepted.try_recv().expect("a new connection per request");
        }
    }

    /// A connection that ends while its answer is awaited ends the exchange,
    /// with an error.
    #[tokio::test]
    async fn an_upstream_that_hangs_up_instead_of_answering_fails_the_exchange() {
        let (listener, url) = listen().await;
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_head(&mut s, &mut Vec::new()).await;
        });
        let e = tokio::time::timeout(
            Duration::from_secs(5),
            pool(&url, Duration::from_secs(60)).exchange(get("/z")),
        )
        .await
        .expect("the exchange hung")
        .unwrap_err();
        assert!(!e.message.is_empty());
    }

    /// An answer in several chunks is read whole, and the connection is
    /// used again.
    #[tokio::test]
    async fn a_chunked_answer_is_read_whole() {
        let (listener, url) = listen().await;
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            for _ in 0..2 {
                let head = read_head(&mut s, &mut buf).await;
                buf.drain(..head);
                for part in [
                    &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                    b"5\r\nhello\r\n",
                    b"1\r\n,\r\n6\r\n world\r\n",
                    b"0\r\n\r\n",
                ] {
                    s.write_all(part).await.unwrap();
                    s.flush().await.unwrap();
                }
            }
        });
        let pool = pool(&url, Duration::from_secs(60));
        for _ in 0..2 {
            let r = answered(&pool, "/c").await;
            assert_eq!(r.body().as_ref(), b"hello, world");
        }
    }

    /// An answer over the limit is refused, whether its length is declared
    /// or it keeps coming in chunks, and its connection is not used again.
    #[tokio::test]
    async fn answers_over_the_limit_are_refused() {
        let (listener, url) = listen().await;
        tokio::spawn(async move {
            let declared = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                MAX_ANSWER + 1
            );
            let chunk = format!("100000\r\n{}\r\n", "x".repeat(0x10_0000));
            for answer in [declared, String::new()] {
                let (mut s, _) = listener.accept().await.unwrap();
                read_head(&mut s, &mut Vec::new()).await;
                // Writes fail once the gateway hangs up; that is the point.
                if answer.is_empty() {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                        .await;
                    for _ in 0..=MAX_ANSWER / 0x10_0000 {
                        if s.write_all(chunk.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                } else {
                    let _ = s.write_all(answer.as_bytes()).await;
                }
                let _ = s.flush().await;
                // Held open until the gateway closes it.
                let _ = s.read(&mut [0u8; 1]).await;
            }
        });
        let pool = pool(&url, Duration::from_secs(60));
        for _ in 0..2 {
            let e = tokio::time::timeout(Duration::from_secs(10), pool.exchange(get("/big")))
                .await
                .expect("the exchange hung")
                .unwrap_err();
            assert_eq!(e.trouble, Trouble::TooLarge, "{e:?}");
            assert_eq!(pool.idle_count(), 0);
        }
    }

    #[tokio::test]
    async fn an_unreachable_instance_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let e = pool(&url, Duration::from_secs(1))
            .exchange(get("/x"))
            .await
            .unwrap_err();
        assert!(e.message.contains("cannot connect"), "{e:?}");
        assert_eq!(
            e.trouble,
            Trouble::Connection,
            "refused is the instance's doing"
        );
    }

    /// An upstream that ends its answer with `connection: close` gets a new
    /// connection for the next request; the closed one is not pooled.
    #[tokio::test]
    async fn a_connection_the_upstream_closes_after_answering_is_not_reused() {
        let (listener, url) = listen().await;
        tokio::spawn(async move {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                read_head(&mut s, &mut Vec::new()).await;
                s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
        });
        let pool = pool(&url, Duration::from_secs(60));
        for _ in 0..2 {
            let r = answered(&pool, "/c").await;
            assert_eq!(r.body().as_ref(), b"ok");
            assert_eq!(pool.idle_count(), 0);
        }
    }

    /// A try abandoned before its answer came (its time ran out) closes its
    /// connection: a late answer must not be read as the next request's.
    #[tokio::test]
    async fn an_abandoned_exchange_closes_its_connection() {
        let (listener, url) = listen().await;
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            // The first connection never answers; the second does.
            let (mut silent, _) = listener.accept().await.unwrap();
            read_head(&mut silent, &mut Vec::new()).await;
            tokio::spawn(async move {
                let mut rest = [0u8; 64];
                while !matches!(silent.read(&mut rest).await, Ok(0) | Err(_)) {}
                let _ = closed_tx.send(());
            });
            let (mut s, _) = listener.accept().await.unwrap();
            read_head(&mut s, &mut Vec::new()).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nlater")
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let pool = pool(&url, Duration::from_secs(60));
        let abandoned =
            tokio::time::timeout(Duration::from_millis(100), pool.exchange(get("/slow"))).await;
        assert!(abandoned.is_err(), "the silent upstream answered");
        next(&mut closed, "closing the abandoned connection").await;
        let r = answered(&pool, "/next").await;
        assert_eq!(r.body().as_ref(), b"later");
    }
}
