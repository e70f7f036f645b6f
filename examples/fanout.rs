//! The load client of `bench/fanout.sh`: opens N subscribers to one of
//! prism's real-time surfaces, measures the server's resident memory per
//! idle connection, makes one write that every subscriber is sent, and
//! reports how long every subscriber took to receive it.
//!
//! - `sse`: `GET /stream` on raw TCP (so the client itself stays small); the
//!   write is a `POST /broadcast`.
//! - `graphql`: a GraphQL subscription `messageAdded` over
//!   `graphql-transport-ws` on `/graphql`, one WebSocket each; the write is
//!   a `POST /messages`.
//! - `grpc`: `prism.v1.Events/Subscribe` to `broadcast` events, one HTTP/2
//!   connection each, on the gRPC address (ADDR's port + 51: 18000 → 18051);
//!   the write is a `POST /broadcast`.
//!
//! Before the measured write, a first one goes to every subscriber and is
//! waited for: neither a GraphQL subscription nor a gRPC stream is
//! acknowledged, so only an event received shows that it is live, and the measured write then finds every
//! surface warm alike.
//!
//! Subscribers stay connected until every one has the write: clients
//! hanging up mid-measurement would bill their teardown to the fan-out.
//! `FANOUT_PAUSE_MS=ms` pauses before and after the measured write (and
//! prints its CLOCK_MONOTONIC time) so a profiler can attach to just that.
//!
//! `fanout SURFACE ADDR N SERVER_PID TOKEN` → one JSON line:
//! `{"surface", "clients", "rss_before_kib" (after the first 10%), "rss_after_kib", "kib_per_connection", "p50_ms", "p99_ms", "max_ms", "received", "server_cpu_us_per_subscriber"}`
//! (the server's CPU time from the measured write until every subscriber had
//! it, per subscriber; Linux counts it in 10 ms ticks).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{SinkExt, StreamExt};
use prism::grpc::pb::prism::{DomainEvent, SubscribeRequest, events_client::EventsClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Barrier, Semaphore},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest},
};

#[derive(Clone, Copy, PartialEq)]
enum Surface {
    Sse,
    Graphql,
    Grpc,
}

impl Surface {
    fn parse(s: &str) -> Surface {
        match s {
            "sse" => Surface::Sse,
            "graphql" => Surface::Graphql,
            "grpc" => Surface::Grpc,
            other => panic!("unknown surface {other:?}: sse, graphql or grpc"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Surface::Sse => "sse",
            Surface::Graphql => "graphql",
            Surface::Grpc => "grpc",
        }
    }

    /// The write every subscriber of this surface is sent: path and body.
    fn write(self, marker: &str) -> (&'static str, String) {
        match self {
            Surface::Sse | Surface::Grpc => {
                ("/broadcast", format!("{{\"message\": \"{marker}\"}}"))
            }
            Surface::Graphql => ("/messages", format!("{{\"content\": \"{marker}\"}}")),
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The server's user + system CPU time so far, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // Linux reports these in clock ticks, 100 a second.
    ticks * 10.0
}

enum Subscriber {
    Sse(TcpStream),
    Graphql(Box<WebSocketStream<TcpStream>>),
    Grpc(tonic::Streaming<DomainEvent>),
}

/// The gRPC port that goes with an HTTP address (`bench/fanout.sh` serves
/// HTTP on 18000 and gRPC on 18051).
fn grpc_addr(addr: &str) -> String {
    let (host, port) = addr.rsplit_once(':').expect("ADDR is host:port");
    format!("http://{host}:{}", port.parse::<u16>().expect("port") + 51)
}

const SUBSCRIPTION: &str = r#"{"id":"1","type":"subscribe","payload":{"query":"subscription { messageAdded { id content userId timestamp } }"}}"#;

impl Subscriber {
    /// Opens one subscriber; returns it once the server has answered.
    async fn open(
        surface: Surface,
        addr: &str,
    ) -> Result<Subscriber, Box<dyn std::error::Error + Send + Sync>> {
        if surface == Surface::Grpc {
            let channel = tonic::transport::Endpoint::from_shared(grpc_addr(addr))?
                .connect()
                .await?;
            let stream = EventsClient::new(channel)
                .subscribe(SubscribeRequest {
                    after_id: None,
                    types: vec!["broadcast".into()],
                })
                .await?
                .into_inner();
            return Ok(Subscriber::Grpc(stream));
        }
        let mut s = TcpStream::connect(addr).await?;
        match surface {
            Surface::Sse => {
                s.write_all(
                    format!(
                        "GET /stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Err("the server closed the stream".into());
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                Ok(Subscriber::Sse(s))
            }
            Surface::Graphql => {
                let mut request = format!("ws://{addr}/graphql").into_client_request()?;
                request
                    .headers_mut()
                    .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
                let (mut ws, _) = tokio_tungstenite::client_async(request, s).await?;
                ws.send(Message::text(r#"{"type":"connection_init"}"#))
                    .await?;
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("connection_ack") => {}
                    other => return Err(format!("no connection_ack: {other:?}").into()),
                }
                ws.send(Message::text(SUBSCRIPTION)).await?;
                Ok(Subscriber::Graphql(Box::new(ws)))
            }
            Surface::Grpc => unreachable!("opened above"),
        }
    }

    /// Reads until `marker` arrives; false if the stream ended or `deadline`
    /// passed first.
    async fn wait_for(&mut self, marker: &str, deadline: tokio::time::Instant) -> bool {
        match self {
            Subscriber::Sse(s) => {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return false,
                    };
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                        return true;
                    }
                }
            }
            Subscriber::Graphql(ws) => loop {
                match tokio::time::timeout_at(deadline, ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.contains(marker) => return true,
                    Ok(Some(Ok(_))) => {}
                    _ => return false,
                }
            },
            Subscriber::Grpc(stream) => loop {
                match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(Ok(Some(e))) if e.payload_json.contains(marker) => return true,
                    Ok(Ok(Some(_))) => {}
                    _ => return false,
                }
            },
        }
    }
}

/// Opens `n` subscribers, in bounded parallel so the listen backlog is not overrun.
async fn open(surface: Surface, addr: &str, n: usize) -> Vec<Subscriber> {
    let gate = Arc::new(Semaphore::new(200));
    let mut opening = Vec::with_capacity(n);
    for _ in 0..n {
        let addr = addr.to_owned();
        let gate = gate.clone();
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            Subscriber::open(surface, &addr).await
        }));
    }
    let mut subscribers = Vec::with_capacity(n);
    for o in opening {
        subscribers.push(o.await.unwrap().expect("subscriber failed to connect"));
    }
    subscribers
}

/// Makes the surface's write, as the demo user whose token is given.
async fn write(surface: Surface, addr: &str, token: &str, marker: &str) {
    let (path, body) = surface.write(marker);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 20"),
        "{path} failed: {}",
        String::from_utf8_lossy(&answer)
    );
}

/// Every subscriber waits for `marker`, each in a task of its own; the
/// tasks hand the subscribers back with how long after `start` they got it.
fn wait_all(
    subscribers: Vec<Subscriber>,
    marker: &str,
    ready: &Arc<Barrier>,
    start: &Arc<std::sync::OnceLock<Instant>>,
) -> Vec<tokio::task::JoinHandle<(Option<Duration>, Subscriber)>> {
    subscribers
        .into_iter()
        .map(|mut s| {
            let (marker, ready, start) = (marker.to_owned(), ready.clone(), start.clone());
            tokio::spawn(async move {
                ready.wait().await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                // Handed back, not dropped: a close costs the server as much
                // as a write, and would land inside the measured window.
                let got = s.wait_for(&marker, deadline).await;
                (got.then(|| start.get().map(|t| t.elapsed())).flatten(), s)
            })
        })
        .collect()
}

/// The server's RSS once the last connections' allocations are done.
async fn settled_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    rss_kib(pid)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, surface, addr, n, pid, token] = &args[..] else {
        eprintln!("usage: fanout sse|graphql|grpc ADDR N SERVER_PID TOKEN");
        std::process::exit(2);
    };
    let surface = Surface::parse(surface);
    let n: usize = n.parse().expect("N");
    let pid: u32 = pid.parse().expect("SERVER_PID");

    // Memory per connection is measured over the last 90% of them: by then
    // the server's start-up allocations and the allocator's own reserves are
    // settled, and what grows is what connections cost.
    let first = n / 10;
    let mut subscribers = open(surface, addr, first).await;
    let rss_before = settled_rss(pid).await;
    subscribers.extend(open(surface, addr, n - first).await);
    let rss_after = settled_rss(pid).await;
    let measured = n - first;

    // The warm-up write: every subscriber live before anything is timed.
    let warm = format!("warm-{}", std::process::id());
    let ready = Arc::new(Barrier::new(n + 1));
    let start = Arc::new(std::sync::OnceLock::new());
    let waiting = wait_all(subscribers, &warm, &ready, &start);
    ready.wait().await;
    let _ = start.set(Instant::now());
    write(surface, addr, token, &warm).await;
    let mut subscribers = Vec::with_capacity(n);
    for w in waiting {
        let (t, s) = w.await.unwrap();
        assert!(t.is_some(), "a subscriber never got the warm-up write");
        subscribers.push(s);
    }
    if let Ok(s) = std::env::var("FANOUT_PAUSE_MS") {
        eprintln!("ready");
        tokio::time::sleep(Duration::from_millis(s.parse().unwrap())).await;
    }

    let marker = format!("fanout-{}", std::process::id());
    let ready = Arc::new(Barrier::new(n + 1));
    let start = Arc::new(std::sync::OnceLock::new());
    let waiting = wait_all(subscribers, &marker, &ready, &start);
    ready.wait().await;
    let cpu_before = cpu_ms(pid);
    let _ = start.set(Instant::now());
    if std::env::var("FANOUT_PAUSE_MS").is_ok() {
        eprintln!("write at {:?}", Instant::now());
    }
    write(surface, addr, token, &marker).await;

    let mut times: Vec<Duration> = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for w in waiting {
        let (t, s) = w.await.unwrap();
        times.extend(t);
        held.push(s);
    }
    let server_cpu_ms = cpu_ms(pid) - cpu_before;
    if let Ok(s) = std::env::var("FANOUT_PAUSE_MS") {
        tokio::time::sleep(Duration::from_millis(s.parse().unwrap())).await;
    }
    drop(held);
    times.sort();
    let pct = |p: f64| -> f64 {
        if times.is_empty() {
            return f64::NAN;
        }
        let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
        times[i].as_secs_f64() * 1000.0
    };
    // No growth means the connections fit in memory the allocator already
    // held: reported as null rather than as a misleading zero.
    let per_conn = (rss_after > rss_before)
        .then(|| ((rss_after - rss_before) as f64 / measured as f64 * 10.0).round() / 10.0);
    println!(
        "{}",
        serde_json::json!({
            "surface": surface.name(),
            "clients": n,
            "received": times.len(),
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "kib_per_connection": per_conn,
            "p50_ms": (pct(0.50) * 10.0).round() / 10.0,
            "p99_ms": (pct(0.99) * 10.0).round() / 10.0,
            "max_ms": (pct(1.0) * 10.0).round() / 10.0,
            "server_cpu_us_per_subscriber": (server_cpu_ms * 1000.0 / n as f64 * 10.0).round() / 10.0,
        })
    );
}
