//! The load client of `bench/sse.sh`: opens N `/stream` subscribers on raw
//! TCP (so the client itself stays small), measures the server's resident
//! memory per idle connection, sends one `POST /broadcast`, and reports how
//! long every subscriber took to receive it.
//!
//! Subscribers stay connected until every one has the broadcast: clients
//! hanging up mid-measurement would bill their teardown to the fan-out.
//! `FANOUT_PAUSE_MS=ms` pauses before and after the broadcast (and prints the
//! broadcast's CLOCK_MONOTONIC time) so a profiler can attach to just that.
//!
//! `sse_fanout ADDR N SERVER_PID TOKEN` → one JSON line:
//! `{"clients", "rss_before_kib" (after the first 10%), "rss_after_kib", "kib_per_connection", "p50_ms", "p99_ms", "max_ms", "received"}`

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Barrier, Semaphore},
};

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

/// Opens one subscriber and returns it once the response headers arrived.
async fn subscribe(addr: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET /stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(s)
}

/// Opens `n` subscribers, in bounded parallel so the listen backlog is not overrun.
async fn open(addr: &str, n: usize) -> Vec<TcpStream> {
    let gate = Arc::new(Semaphore::new(200));
    let mut opening = Vec::with_capacity(n);
    for _ in 0..n {
        let addr = addr.to_owned();
        let gate = gate.clone();
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            subscribe(&addr).await
        }));
    }
    let mut streams = Vec::with_capacity(n);
    for o in opening {
        streams.push(o.await.unwrap().expect("subscriber failed to connect"));
    }
    streams
}

/// The server's RSS once the last connections' allocations are done.
async fn settled_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    rss_kib(pid)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, n, pid, token] = &args[..] else {
        eprintln!("usage: sse_fanout ADDR N SERVER_PID TOKEN");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N");
    let pid: u32 = pid.parse().expect("SERVER_PID");

    // Memory per connection is measured over the last 90% of them: by then
    // the server's start-up allocations and the allocator's own reserves are
    // settled, and what grows is what connections cost.
    let first = n / 10;
    let mut streams = open(addr, first).await;
    let rss_before = settled_rss(pid).await;
    streams.extend(open(addr, n - first).await);
    let rss_after = settled_rss(pid).await;
    let measured = n - first;
    if let Ok(s) = std::env::var("FANOUT_PAUSE_MS") {
        eprintln!("ready");
        tokio::time::sleep(Duration::from_millis(s.parse().unwrap())).await;
    }

    let marker = format!("fanout-{}", std::process::id());
    let ready = Arc::new(Barrier::new(n + 1));
    let start = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut waiting = Vec::with_capacity(n);
    for mut s in streams {
        let marker = marker.clone();
        let ready = ready.clone();
        let start = start.clone();
        waiting.push(tokio::spawn(async move {
            ready.wait().await;
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            // Handed back, not dropped: a close costs the server as much as
            // a write, and would land inside the measured window.
            loop {
                let n = match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => return (None, s),
                };
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                    return (start.get().map(|t| t.elapsed()), s);
                }
            }
        }));
    }
    ready.wait().await;

    let body = format!("{{\"message\": \"{marker}\"}}");
    let mut s = TcpStream::connect(addr.as_str()).await.unwrap();
    let request = format!(
        "POST /broadcast HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = start.set(Instant::now());
    if std::env::var("FANOUT_PAUSE_MS").is_ok() {
        eprintln!("broadcast at {:?}", Instant::now());
    }
    s.write_all(request.as_bytes()).await.unwrap();

    let mut times: Vec<Duration> = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for w in waiting {
        let (t, s) = w.await.unwrap();
        times.extend(t);
        held.push(s);
    }
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
            "clients": n,
            "received": times.len(),
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "kib_per_connection": per_conn,
            "p50_ms": (pct(0.50) * 10.0).round() / 10.0,
            "p99_ms": (pct(0.99) * 10.0).round() / 10.0,
            "max_ms": (pct(1.0) * 10.0).round() / 10.0,
        })
    );
}
