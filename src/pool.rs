//! Connections to one upstream instance, for the gateway's proxied requests
//! and the orders service's calls to the users service: HTTP/1.1 keep-alive
//! connections (hyper's client connection), reused most recently idle first
//! and closed once idle for a set time (the service's `idle_timeout_ms`).
//!
//! hyper-util's pooled `Client` does the same job, but for every HTTP/1
//! request it hashes a pool key, rewrites the URI to origin form, and spawns a
//! task whose only work is to put the connection back; on the gateway's hot
//! path that was a tenth of its user-space time. Here the request's own task
//! puts the connection back once it has read the body, which is almost always
//! the moment the connection is ready for the next request.
//!
//! The connections to one instance are capped, as Envoy's `max_connections`
//! caps them: a burst of clients must not become as many connections to a
//! service, which has descriptors and memory of its own to run out of. A
//! request that finds every connection busy waits in line for the first one
//! free, or for room to open one, for at most its try's time. The line may
//! be limited too (Envoy's `max_pending_requests`); a request finding it full
//! is refused at once.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
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
use tokio::sync::oneshot;

type Sender = SendRequest<Full<Bytes>>;

/// How many connections to one instance may be open, and how many requests
/// may wait for one when all are busy.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub waiting: usize,
}

#[derive(Debug)]
pub struct ConnPool {
    /// `host:port` to connect to.
    authority: String,
    /// The `Host` header every request carries (HTTP/1.1 requires it).
    host: Option<HeaderValue>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    limits: Limits,
    slots: parking_lot::Mutex<Slots>,
    /// Requests refused because every connection was busy and the line full.
    overflowed: AtomicU64,
    /// Requests whose time to wait ran out in the line.
    waited_out: AtomicU64,
    reaper: std::sync::Once,
}

#[derive(Debug, Default)]
struct Slots {
    /// A stack: the most recently used connection is taken first, so
    /// connections a burst opened are the ones left to time out.
    idle: Vec<Idle>,
    /// Connections open or being opened, idle ones included: each holds a
    /// [`Room`] until it has closed.
    open: usize,
    /// Requests waiting for a connection, first come first served.
    waiting: VecDeque<oneshot::Sender<Handoff>>,
    /// The line's length at which the places of requests that gave up are
    /// next cleared out: twice what was left the last time, so each push
    /// costs O(1) however long the line.
    prune_at: usize,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// What a waiting request is given.
#[derive(Debug)]
enum Handoff {
    /// A connection a finished request put back.
    Conn(Sender),
    /// Room to open a connection, left by one that closed.
    Room(Room),
}

/// Room for one open connection under [`Limits::connections`]. Its
/// connection's task holds it until the connection has closed; dropped, it
/// goes to the first waiting request, or frees the place. A waiter that gave
/// up after being handed it drops it too, so no room is ever lost.
#[derive(Debug)]
struct Room(Option<Weak<ConnPool>>);

impl Drop for Room {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take().and_then(|p| p.upgrade()) {
            pool.release();
        }
    }
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
    /// This process was out of file descriptors: says nothing about
    /// the instance.
    OutOfFiles,
    /// Every connection to the instance was busy and the line of requests
    /// waiting for one was full.
    Overloaded,
    /// Every connection to the instance stayed busy until the request's time
    /// to wait ran out.
    WaitedOut,
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

/// What a request gets from the pool.
enum Checkout {
    Pooled(Sender),
    /// Room to open a new connection.
    Open(Room),
    Wait(oneshot::Receiver<Handoff>),
}

impl ConnPool {
    /// `url` is an instance's base URL, `http://host:port`.
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        idle_timeout: Duration,
        limits: Limits,
    ) -> ConnPool {
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
            limits: Limits {
                connections: limits.connections.max(1),
                waiting: limits.waiting,
            },
            slots: parking_lot::Mutex::new(Slots::default()),
            overflowed: AtomicU64::new(0),
            waited_out: AtomicU64::new(0),
            reaper: std::sync::Once::new(),
        }
    }

    /// The `Host` header for requests to this instance; `None` when its URL
    /// has no authority (the registry refuses such URLs).
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// Connections to the instance now open or being opened.
    pub fn open(&self) -> usize {
        self.slots.lock().open
    }

    /// Requests now waiting for a connection.
    pub fn pending(&self) -> usize {
        let slots = self.slots.lock();
        slots.waiting.iter().filter(|w| !w.is_closed()).count()
    }

    /// Requests refused so far because the connections and the line were full.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Requests so far whose time to wait for a connection ran out.
    pub fn waited_out(&self) -> u64 {
        self.waited_out.load(Ordering::Relaxed)
    }

    /// Sends `req` (its URI in origin form: path and query, its `Host` header
    /// set by the caller, see [`ConnPool::host`]) and reads the whole answer.
    /// A pooled connection the upstream closed while it was idle is replaced
    /// by a new one without the request having been sent.
    ///
    /// When every connection is busy the request waits in line, until
    /// `wait_until` if given: then it fails with [`Trouble::WaitedOut`],
    /// unsent. A caller whose own timer ends at the same instant sees this
    /// error rather than its timer's (a timeout polls its future first), and
    /// so can tell a request the instance never saw from one it was slow to
    /// answer.
    pub async fn exchange(
        self: &Arc<Self>,
        mut req: Request<Full<Bytes>>,
        wait_until: Option<tokio::time::Instant>,
    ) -> Result<Response<Bytes>, ExchangeError> {
        loop {
            let (mut sender, pooled) = match self.checkout()? {
                Checkout::Pooled(s) => (s, true),
                Checkout::Open(room) => (self.connect(room).await?, false),
                Checkout::Wait(handoff) => match self.wait(handoff, wait_until).await? {
                    Handoff::Conn(s) => (s, true),
                    Handoff::Room(room) => (self.connect(room).await?, false),
                },
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

    async fn wait(
        &self,
        handoff: oneshot::Receiver<Handoff>,
        until: Option<tokio::time::Instant>,
    ) -> Result<Handoff, ExchangeError> {
        let handed = match until {
            None => handoff.await,
            Some(until) => tokio::time::timeout_at(until, handoff).await.map_err(|_| {
                self.waited_out.fetch_add(1, Ordering::Relaxed);
                ExchangeError {
                    message: format!(
                        "every connection to {} stayed busy while the request waited",
                        self.authority
                    ),
                    trouble: Trouble::WaitedOut,
                }
            })?,
        };
        // The pool drops waiters only with itself.
        handed.map_err(|_| ExchangeError::new("the connection pool closed"))
    }

    fn checkout(self: &Arc<Self>) -> Result<Checkout, ExchangeError> {
        let mut slots = self.slots.lock();
        while let Some(i) = slots.idle.pop() {
            if i.sender.is_ready() {
                return Ok(Checkout::Pooled(i.sender));
            }
        }
        if slots.open < self.limits.connections {
            slots.open += 1;
            return Ok(Checkout::Open(Room(Some(Arc::downgrade(self)))));
        }
        // Requests that gave up waiting (their try's time ran out) leave
        // their place behind; they do not count against the line. Handing
        // connections out skips them too.
        if slots.waiting.len() >= slots.prune_at.min(self.limits.waiting) {
            slots.waiting.retain(|w| !w.is_closed());
            slots.prune_at = (slots.waiting.len() * 2).max(64);
        }
        if slots.waiting.len() >= self.limits.waiting {
            drop(slots);
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            return Err(ExchangeError {
                message: format!(
                    "all {} connections to {} are busy and {} requests are waiting for one",
                    self.limits.connections, self.authority, self.limits.waiting
                ),
                trouble: Trouble::Overloaded,
            });
        }
        let (tx, rx) = oneshot::channel();
        slots.waiting.push_back(tx);
        Ok(Checkout::Wait(rx))
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

    /// A ready connection goes to the first waiting request, or is kept idle.
    fn put(&self, mut sender: Sender) {
        let mut slots = self.slots.lock();
        while let Some(waiter) = slots.waiting.pop_front() {
            match waiter.send(Handoff::Conn(sender)) {
                Ok(()) => return,
                Err(Handoff::Conn(back)) => sender = back,
                Err(Handoff::Room(_)) => unreachable!("a send gives back what it was given"),
            }
        }
        // Never more than `Limits::connections`: idle ones are open ones.
        slots.idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// A connection has closed (or was never opened): its room goes to the
    /// first waiting request, which opens one of its own.
    fn release(self: &Arc<Self>) {
        let mut room = Room(Some(Arc::downgrade(self)));
        loop {
            let waiter = {
                let mut slots = self.slots.lock();
                match slots.waiting.pop_front() {
                    Some(w) => w,
                    None => {
                        slots.open -= 1;
                        break;
                    }
                }
            };
            // Sent outside the lock: a waiter that gives up at this moment
            // drops the room in this call, which releases it again.
            match waiter.send(Handoff::Room(room)) {
                Ok(()) => return,
                Err(Handoff::Room(back)) => room = back,
                Err(Handoff::Conn(_)) => unreachable!("a send gives back what it was given"),
            }
        }
        // The place is free; the room must not free it a second time.
        room.0 = None;
    }

    async fn connect(self: &Arc<Self>, room: Room) -> Result<Sender, ExchangeError> {
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
            drop(room);
        });
        self.reaper.call_once(|| {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        });
        Ok(sender)
    }

    /// Idle connections now in the pool.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.slots.lock().idle.len()
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
            let mut slots = pool.slots.lock();
            let (keep, expired) = std::mem::take(&mut slots.idle)
                .into_iter()
                .partition(|i| now.duration_since(i.since) < timeout && !i.sender.is_closed());
            slots.idle = keep;
            expired
        };
        drop(expired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
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
        let limits = Limits {
            connections: 1024,
            waiting: 1024,
        };
        Arc::new(ConnPool::new(
            url,
            Duration::from_secs(1),
            idle_timeout,
            limits,
        ))
    }

    fn limited(url: &str, connections: usize, waiting: usize) -> Arc<ConnPool> {
        let limits = Limits {
            connections,
            waiting,
        };
        Arc::new(ConnPool::new(
            url,
            Duration::from_secs(1),
            Duration::from_secs(60),
            limits,
        ))
    }

    /// A bare HTTP/1.1 server that answers each request only once `go` gives
    /// it a permit, reporting each request as it arrives. It counts the
    /// connections it accepted. With `close`, each answer says
    /// `connection: close` and the server closes the connection after it.
    struct Held {
        url: String,
        go: Arc<tokio::sync::Semaphore>,
        arrived: tokio::sync::mpsc::UnboundedReceiver<()>,
        accepted: Arc<std::sync::atomic::AtomicUsize>,
    }

    async fn held(close: bool) -> Held {
        let (listener, url) = listen().await;
        let go = Arc::new(tokio::sync::Semaphore::new(0));
        let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (server_go, server_accepted) = (go.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                server_accepted.fetch_add(1, Ordering::SeqCst);
                let (go, arrived_tx) = (server_go.clone(), arrived_tx.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    // Until the pool closes the connection.
                    while let Some(head) = next_head(&mut s, &mut buf).await {
                        buf.drain(..head);
                        let _ = arrived_tx.send(());
                        go.acquire().await.unwrap().forget();
                        let connection = if close { "close" } else { "keep-alive" };
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nconnection: {connection}\r\ncontent-length: 2\r\n\r\nok"
                        );
                        if s.write_all(answer.as_bytes()).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        Held {
            url,
            go,
            arrived,
            accepted,
        }
    }

    impl Held {
        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    /// Exchanges of `GET /q` started at once, each in its own task.
    fn started(pool: &Arc<ConnPool>, n: usize) -> Vec<tokio::task::JoinHandle<Response<Bytes>>> {
        (0..n)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { answered(&pool, "/q").await })
            })
            .collect()
    }

    async fn all_answered(exchanges: Vec<tokio::task::JoinHandle<Response<Bytes>>>) {
        for e in exchanges {
            assert_eq!(e.await.unwrap().body().as_ref(), b"ok");
        }
    }

    /// Waiting requests, those that gave up included.
    fn waiting(pool: &ConnPool) -> usize {
        pool.slots.lock().waiting.len()
    }

    // On the test's one-thread runtime every started exchange has made its
    // first move (taken a connection, room to open one, or its place in
    // line) before the server reads its first request.
    #[tokio::test]
    async fn connections_are_capped_and_busy_requests_wait_their_turn() {
        let mut server = held(false).await;
        let pool = limited(&server.url, 2, 10);
        let exchanges = started(&pool, 6);
        for _ in 0..2 {
            next(&mut server.arrived, "a request").await;
        }
        assert_eq!(server.accepted(), 2);
        assert_eq!(pool.open(), 2);
        assert_eq!(waiting(&pool), 4);
        server.go.add_permits(6);
        all_answered(exchanges).await;
        assert_eq!(server.accepted(), 2, "the waiting requests took turns");
        assert_eq!((pool.open(), pool.idle_count(), waiting(&pool)), (2, 2, 0));
        assert_eq!(pool.overflowed(), 0);
    }

    #[tokio::test]
    async fn a_request_finding_the_line_full_is_refused_at_once() {
        let mut server = held(false).await;
        let pool = limited(&server.url, 1, 1);
        let exchanges = started(&pool, 2);
        next(&mut server.arrived, "a request").await;
        let e = tokio::time::timeout(Duration::from_secs(5), pool.exchange(get("/over"), None))
            .await
            .expect("the request waited")
            .unwrap_err();
        assert_eq!(e.trouble, Trouble::Overloaded, "{e:?}");
        assert!(e.message.contains("busy"), "{e:?}");
        assert_eq!(pool.overflowed(), 1);
        server.go.add_permits(2);
        all_answered(exchanges).await;
        assert_eq!(server.accepted(), 1);
    }

    /// A pool of one connection to a held server, and the exchange that
    /// keeps that connection busy, already at the server.
    async fn one_connection_busy() -> (
        Held,
        Arc<ConnPool>,
        Vec<tokio::task::JoinHandle<Response<Bytes>>>,
    ) {
        let mut server = held(false).await;
        let pool = limited(&server.url, 1, 1);
        let first = started(&pool, 1);
        next(&mut server.arrived, "a request").await;
        (server, pool, first)
    }

    /// A request that gave up waiting (its try's time ran out) keeps no
    /// place in line, and the connection it waited for serves the next one.
    #[tokio::test]
    async fn a_request_that_stops_waiting_leaves_the_line() {
        let (server, pool, first) = one_connection_busy().await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), pool.exchange(get("/late"), None))
                .await;
        assert!(
            gave_up.is_err(),
            "it was answered while the only connection was busy"
        );
        let next_in_line = started(&pool, 1);
        tokio::task::yield_now().await;
        assert_eq!(pool.overflowed(), 0, "the place given up was taken");
        server.go.add_permits(2);
        all_answered(first).await;
        all_answered(next_in_line).await;
        assert_eq!(server.accepted(), 1);
    }

    /// A request given a time to wait says so when it runs out, unsent, even
    /// to a caller whose own timer ends at the same instant: the gateway's
    /// try does, and must not blame the instance for it.
    #[tokio::test]
    async fn a_request_out_of_time_to_wait_says_it_was_never_sent() {
        let (mut server, pool, first) = one_connection_busy().await;
        let until = tokio::time::Instant::now() + Duration::from_millis(50);
        let waited = tokio::time::timeout_at(until, pool.exchange(get("/late"), Some(until)))
            .await
            .expect("the caller's timer ended the exchange before the pool did")
            .unwrap_err();
        assert_eq!(waited.trouble, Trouble::WaitedOut, "{waited:?}");
        assert!(waited.message.contains("stayed busy"), "{waited:?}");
        assert_eq!((pool.waited_out(), pool.overflowed()), (1, 0));
        server.go.add_permits(1);
        all_answered(first).await;
        assert!(
            server.arrived.try_recv().is_err(),
            "the request that waited out its time reached the server"
        );
        assert_eq!(pool.pending(), 0);
    }

    /// When a connection closes, the first waiting request opens one in its
    /// place.
    #[tokio::test]
    async fn a_closed_connection_makes_room_for_a_waiting_request() {
        let mut server = held(true).await;
        let pool = limited(&server.url, 1, 5);
        let exchanges = started(&pool, 3);
        next(&mut server.arrived, "a request").await;
        assert_eq!((server.accepted(), waiting(&pool)), (1, 2));
        server.go.add_permits(3);
        all_answered(exchanges).await;
        assert_eq!(server.accepted(), 3, "one connection after another");
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
        next_head(s, buf).await.expect("the request never came")
    }

    /// [`read_head`], or `None` once the client has closed the connection.
    async fn next_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end + 4);
            }
            let mut chunk = [0u8; 1024];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::get(path).body(Full::new(Bytes::new())).unwrap()
    }

    /// The answer to a GET of `path`, which must come within five seconds.
    async fn answered(pool: &Arc<ConnPool>, path: &str) -> Response<Bytes> {
        tokio::time::timeout(Duration::from_secs(5), pool.exchange(get(path), None))
            .await
            .expect("the exchange hung")
            .unwrap()
    }

    #[tokio::test]
    async fn one_connection_serves_requests_in_turn_and_is_reaped_when_idle() {
        let (url, mut accepted, mut closed) = server("hello", None).await;
        let pool = pool(&url, Duration::from_millis(100));
        for _ in 0..3 {
            let r = pool.exchange(get("/x"), None).await.unwrap();
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
            let r = pool.exchange(get("/y"), None).await.unwrap();
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
            pool(&url, Duration::from_secs(60)).exchange(get("/z"), None),
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
            let e = tokio::time::timeout(Duration::from_secs(10), pool.exchange(get("/big"), None))
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
        // With room for one connection: a failed attempt must give it back.
        let pool = limited(&url, 1, 0);
        for _ in 0..2 {
            let e = pool.exchange(get("/x"), None).await.unwrap_err();
            assert!(e.message.contains("cannot connect"), "{e:?}");
            assert_eq!(
                e.trouble,
                Trouble::Connection,
                "refused is the instance's doing"
            );
            assert_eq!(pool.open(), 0);
        }
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
        let abandoned = tokio::time::timeout(
            Duration::from_millis(100),
            pool.exchange(get("/slow"), None),
        )
        .await;
        assert!(abandoned.is_err(), "the silent upstream answered");
        next(&mut closed, "closing the abandoned connection").await;
        let r = answered(&pool, "/next").await;
        assert_eq!(r.body().as_ref(), b"later");
    }
}
