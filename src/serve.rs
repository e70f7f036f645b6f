//! The HTTP accept loop that `prism serve`, the services and the gateway
//! share, on their HTTP and gRPC ports: HTTP/1.1 and h2c on one port, each
//! client connection watched for idleness, and a drain on shutdown.
//!
//! A connection is closed once no request has started on it for the idle
//! timeout (`client_idle_timeout_ms`). That covers an idle keep-alive
//! connection and one whose request head never completes (a slow-headers
//! attack), and leaves alone a connection whose request is still being
//! served, however long: a request counts as in flight until its answer's
//! body has ended, so a Server-Sent Events stream is never idle. Closing is
//! graceful first: an idle HTTP/1 connection closes at once, an HTTP/2 one
//! is sent GOAWAY. A connection still open half a timeout later with nothing
//! in flight (a head that never completed) is dropped.
//!
//! hyper can time out request heads itself, but it arms and disarms a timer
//! for every request on every connection; that cost 2–3% of the gateway's
//! CPU per proxied request. Here a request costs two counter updates, and
//! one task looks at every connection twice per timeout.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::{HttpServerConnExec, UpgradeableConnection},
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How many connections the kernel may hold for a listener before it accepts
/// them; Linux caps it at `net.core.somaxconn` (4096 by default). tokio's
/// `TcpListener::bind` asks for 1024: 3,000 clients connecting at once to a
/// users service overran that (thousands of `ListenOverflows` in 8 s), and
/// each dropped handshake costs its client a second before its SYN is sent
/// again.
const BACKLOG: u32 = 4096;

/// The largest HTTP/1 request head (request line and headers) a client may
/// send; a larger one is answered 431 and the connection closed. hyper's
/// default lets every connection buffer about 400 KB of head, which a few
/// thousand clients sending slow, endless headers turn into gigabytes.
/// Browsers' and API clients' heads are a few KiB (Node.js refuses over 16
/// KiB); this leaves room for large cookies and tokens. Bodies are read in
/// pieces of at most this size and are limited by `max_upload_size`.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// A listener on `addr` (`host:port`, the first of its addresses that can be
/// bound), as `TcpListener::bind` makes one but with [`BACKLOG`].
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    bind_with(addr, false).await
}

/// A listener on `addr` as [`bind`] makes one, and `more` others on the
/// address it got (its port, when `addr` asked for any): each thread of a
/// server whose threads run alone accepts on its own, and the kernel spreads
/// new connections over them (`SO_REUSEPORT`). The others are made here, not
/// on their threads, so that all are listening before any is served.
pub async fn bind_shared(
    addr: &str,
    more: usize,
) -> std::io::Result<(tokio::net::TcpListener, Vec<std::net::TcpListener>)> {
    let first = bind_with(addr, more > 0).await?;
    let at = first.local_addr()?.to_string();
    let mut others = Vec::with_capacity(more);
    for _ in 0..more {
        // Made on this runtime and handed over unregistered: each worker
        // registers its own with its runtime.
        others.push(bind_with(&at, true).await?.into_std()?);
    }
    Ok((first, others))
}

async fn bind_with(addr: &str, reuse_port: bool) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = match a {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As tokio's own bind does, so a restart can reuse a port whose old
        // connections are still in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        if reuse_port {
            socket.set_reuseport(true)?;
        }
        match socket.bind(a).and_then(|()| socket.listen(BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Serves `listener` until `stop`: each accepted connection gets the service
/// `make` builds from its peer address and its watch. Then no new connection
/// is accepted, open ones finish what they are serving and close, and after
/// `drain` those still open are dropped. Dropping the future drops them too.
pub async fn serve<M, S, B>(
    listener: tokio::net::TcpListener,
    idle_timeout: Duration,
    drain: Duration,
    stop: CancellationToken,
    mut make: M,
) where
    M: FnMut(SocketAddr, &Arc<Conn>) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let clients = Clients::new(idle_timeout);
    let _kill_on_drop = KillOnDrop(clients.clone());
    let stop_reaping = CancellationToken::new();
    let _stop_reaping_on_drop = stop_reaping.clone().drop_guard();
    tokio::spawn(clients.clone().reap(stop_reaping));
    let connections = tokio_util::task::TaskTracker::new();
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // One buffer and a plain write, not a vectored write of head and body:
    // answers are mostly small, and copying them costs less than the
    // kernel's handling of a vector (measured on the gateway: 4% less CPU
    // per proxied request, 2% more throughput).
    http.http1().writev(false).max_buf_size(MAX_REQUEST_HEAD);
    // WebSockets over HTTP/2 (RFC 8441) open with an extended CONNECT.
    http.http2().enable_connect_protocol();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait for some to close
                    // rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // No Nagle delay: answers are written whole.
        let _ = tcp.set_nodelay(true);
        if let Err(e) = watch_for_dead_peer(&tcp) {
            tracing::debug!(error = %e, "could not set TCP keep-alive");
        }
        let registered = clients.register();
        let service = make(peer, &registered.conn);
        let serve = http
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        connections.spawn(Watched {
            serve,
            registered,
            watched: None,
            closing: false,
        });
    }
    drop(listener);
    clients.close_all();
    connections.close();
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing the remaining connections");
        clients.kill_all();
        connections.wait().await;
    }
}

pin_project_lite::pin_project! {
    /// One client connection being served, watching its [`Conn`]'s signal.
    /// A named future rather than an async block: the block kept the
    /// connection twice, as its captured value and as the pinned local it
    /// was moved into (3.2 KiB of task per connection instead of 1.6).
    struct Watched<F> {
        #[pin]
        serve: F,
        registered: Registered,
        // The waker last handed to the connection's signal.
        watched: Option<Waker>,
        closing: bool,
    }
}

/// What [`Watched`] needs of hyper-util's connection besides polling it.
trait Connection: Future<Output = Result<(), BoxError>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<S, B> Connection for UpgradeableConnection<'static, TokioIo<TcpStream>, S, TokioExecutor>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: 'static,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: HttpServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        UpgradeableConnection::graceful_shutdown(self)
    }
}

impl<F: Connection> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let conn = &this.registered.conn;
        // The connection's signal is read on every poll rather than awaited
        // beside it: an atomic load, where a cancellation future in a
        // `select!` registered with its `Notify` on every poll (about 300
        // instructions per request on the gateway's hot path).
        if !this
            .watched
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            *conn.waker.lock() = Some(waker.clone());
            *this.watched = Some(waker);
        }
        // Read after the waker is in place: a signal raised since is either
        // seen here or wakes the task (see `Conn::raise`).
        match conn.signal.load(Ordering::SeqCst) {
            KILL => return Poll::Ready(()),
            CLOSE if !*this.closing => {
                *this.closing = true;
                this.serve.as_mut().graceful_shutdown();
            }
            _ => {}
        }
        this.serve.poll(cx).map(|ended| {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "client connection ended");
            }
        })
    }
}

/// How long a connection may be silent before the kernel starts probing
/// whether its client is still there, how far apart the probes are, and how
/// many go unanswered before the connection is dropped.
const DEAD_PEER_PROBES: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(15))
    .with_retries(4);
/// How long written data may go unacknowledged before the connection is
/// dropped: the probes' whole span. Linux has the option; elsewhere the
/// kernel's own retransmission limit applies.
#[cfg(target_os = "linux")]
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// A client that vanishes without closing (a network gone, a laptop shut)
/// is found within two minutes rather than never. The idle timeout covers a
/// connection between requests, but a quiet stream (SSE between events, a
/// WebSocket, a gRPC stream) is a request in flight, never idle, and with
/// nothing written to it nothing fails; with something written, the kernel
/// retries for about a quarter of an hour first.
fn watch_for_dead_peer(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(tcp);
    socket.set_tcp_keepalive(&DEAD_PEER_PROBES)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(DEAD_PEER_TIMEOUT))?;
    Ok(())
}

/// Drops every connection still open when [`serve`] ends or is dropped.
struct KillOnDrop(Arc<Clients>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.close_all();
        self.0.kill_all();
    }
}

/// What the reaper knows of one connection, and how it tells it to close.
#[derive(Debug)]
pub struct Conn {
    started: AtomicU64,
    in_flight: AtomicU32,
    /// `OPEN`, then `CLOSE`, then `KILL`; it only rises.
    signal: AtomicU8,
    /// The connection task's, woken when the signal rises.
    waker: parking_lot::Mutex<Option<Waker>>,
}

const OPEN: u8 = 0;
/// Graceful: finish what is in flight, then close.
const CLOSE: u8 = 1;
/// Drop the connection now.
const KILL: u8 = 2;

impl Conn {
    fn new(signal: u8) -> Arc<Conn> {
        Arc::new(Conn {
            started: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            signal: AtomicU8::new(signal),
            waker: parking_lot::Mutex::new(None),
        })
    }

    #[cfg(test)]
    fn signal(&self) -> u8 {
        self.signal.load(Ordering::SeqCst)
    }

    fn raise(&self, signal: u8) {
        if self.signal.fetch_max(signal, Ordering::SeqCst) < signal
            && let Some(w) = &*self.waker.lock()
        {
            w.wake_by_ref();
        }
    }

    /// Marks a request started on this connection; it counts as in flight
    /// until the guard is dropped (answered, or abandoned by the client).
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request in flight on its connection, until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Conn>);

/// An answer's body that keeps its request in flight until the body has
/// ended (hyper drops it then) or the client went away: a stream that goes
/// on after its handler returned is not an idle connection.
#[derive(Debug)]
pub struct Guarded<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Guarded<B> {
    pub fn new(body: B, in_flight: InFlight) -> Self {
        Guarded {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Entry {
    conn: Arc<Conn>,
    /// `started` at the last look, and how many looks in a row found it
    /// unchanged with nothing in flight.
    last_started: u64,
    idle_looks: u32,
}

/// Every open client connection.
#[derive(Debug)]
struct Clients {
    idle_timeout: Duration,
    /// Set at shutdown: a connection registered after it starts closing.
    closing: AtomicBool,
    open: parking_lot::Mutex<(u64, HashMap<u64, Entry>)>,
}

/// Keeps a connection in the register while its task runs.
#[derive(Debug)]
struct Registered {
    clients: Arc<Clients>,
    id: u64,
    conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.clients.open.lock().1.remove(&self.id);
    }
}

impl Clients {
    fn new(idle_timeout: Duration) -> Arc<Clients> {
        Arc::new(Clients {
            idle_timeout,
            closing: AtomicBool::new(false),
            open: parking_lot::Mutex::new((0, HashMap::new())),
        })
    }

    fn register(self: &Arc<Self>) -> Registered {
        let mut open = self.open.lock();
        // Read under the lock `close_all` takes after setting it: a
        // connection it does not see starts out closing.
        let conn = Conn::new(if self.closing.load(Ordering::SeqCst) {
            CLOSE
        } else {
            OPEN
        });
        open.0 += 1;
        let id = open.0;
        open.1.insert(
            id,
            Entry {
                conn: conn.clone(),
                // Never a count: the first look only takes the mark, as
                // after a request, so a new connection gets a whole timeout.
                last_started: u64::MAX,
                idle_looks: 0,
            },
        );
        Registered {
            clients: self.clone(),
            id,
            conn,
        }
    }

    /// Asks every connection to finish what it is serving and close.
    fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for e in self.open.lock().1.values() {
            e.conn.raise(CLOSE);
        }
    }

    /// Drops every connection now.
    fn kill_all(&self) {
        for e in self.open.lock().1.values() {
            e.conn.raise(KILL);
        }
    }

    /// Closes idle connections until `stop`. Looks twice per timeout, so a
    /// connection is closed after between one and one and a half timeouts
    /// without a new request, and dropped half a timeout later if it has
    /// not closed by then with nothing in flight.
    async fn reap(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.idle_timeout.max(Duration::from_millis(20)) / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.look();
        }
    }

    fn look(&self) {
        let mut open = self.open.lock();
        for e in open.1.values_mut() {
            let started = e.conn.started.load(Ordering::Relaxed);
            if started != e.last_started || e.conn.in_flight.load(Ordering::Relaxed) > 0 {
                e.last_started = started;
                e.idle_looks = 0;
                continue;
            }
            // Looks are half a timeout apart and the last request may have
            // ended just before the first of them: two idle looks make at
            // least a whole timeout.
            e.idle_looks += 1;
            if e.idle_looks == 2 {
                e.conn.raise(CLOSE);
            } else if e.idle_looks > 2 {
                e.conn.raise(KILL);
            }
        }
    }

    /// Connections now open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock().1.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More clients than tokio's default backlog (1024) connect at once to a
    /// listener that accepts none of them: with [`BACKLOG`] the kernel holds
    /// every one. With 1024 it would drop the SYNs of the rest, whose
    /// connects would then hang in retransmission.
    #[tokio::test]
    async fn a_burst_of_connections_beyond_tokios_backlog_is_queued() {
        const CLIENTS: usize = 1100;
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        if somaxconn.is_none_or(|n| n <= CLIENTS) {
            eprintln!("skipped: net.core.somaxconn {somaxconn:?} caps the backlog below {CLIENTS}");
            return;
        }
        rlimit::increase_nofile_limit(u64::MAX).unwrap();
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..CLIENTS).map(|_| {
            tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(addr),
            )
        });
        let clients = futures::future::join_all(connects).await;
        let queued = clients.iter().filter(|c| matches!(c, Ok(Ok(_)))).count();
        assert_eq!(queued, CLIENTS);
        drop(listener);
    }

    #[tokio::test]
    async fn bind_takes_names_and_reports_a_taken_port() {
        let first = bind("localhost:0").await.unwrap();
        assert!(first.local_addr().unwrap().ip().is_loopback());
        let taken = first.local_addr().unwrap().to_string();
        assert_eq!(
            bind(&taken).await.unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        // Refused before any lookup: it has no port.
        assert!(bind("localhost").await.is_err());
    }

    #[tokio::test]
    async fn accepted_connections_probe_for_a_vanished_client() {
        let wait = Duration::from_secs(10);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let _client = tokio::time::timeout(wait, connect).await.unwrap().unwrap();
        let (tcp, _) = tokio::time::timeout(wait, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let socket = socket2::SockRef::from(&tcp);
        assert!(!socket.keepalive().unwrap());
        watch_for_dead_peer(&tcp).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(15)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(DEAD_PEER_TIMEOUT));
    }

    #[test]
    fn only_a_connection_without_requests_for_two_looks_is_closed_then_killed() {
        let clients = Clients::new(Duration::from_secs(60));
        let idle = clients.register();
        let busy = clients.register();
        let chatty = clients.register();
        let _in_flight = busy.conn.request();
        for look in 1..=5 {
            drop(chatty.conn.request());
            clients.look();
            let expected = match look {
                ..3 => OPEN,
                3 => CLOSE,
                _ => KILL,
            };
            assert_eq!(idle.conn.signal(), expected, "look {look}");
            for c in [&busy, &chatty] {
                assert_eq!(c.conn.signal(), OPEN);
            }
        }
        assert_eq!(clients.len(), 3);
        drop(idle);
        assert_eq!(clients.len(), 2);
        clients.close_all();
        assert_eq!(
            (busy.conn.signal(), chatty.conn.signal()),
            (CLOSE, CLOSE),
            "shutdown lets requests finish"
        );
        assert_eq!(clients.register().conn.signal(), CLOSE, "registered after");
    }
}
