//! The floor for `bench/gateway.sh`: the least a reverse proxy built from the
//! gateway's own parts can do per request. The parts: tokio's
//! single-threaded runtime, hyper's HTTP/1 server and client connections
//! (plain writes, no `writev`, as the gateway's), and a stack of idle
//! keep-alive connections. It maps `GET /api/users/{id}` to `/users/{id}` on one
//! upstream and nothing else: no routing table, ids, trace context, timeouts,
//! retries, circuit breaker or metrics. What the gateway spends beyond it is
//! prism's; what it spends beyond nginx is the stack's.
//!
//! `bare_proxy LISTEN_PORT UPSTREAM_HOST:PORT`

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    client::conn::http1::{self as client, SendRequest},
    header::{HOST, HeaderValue},
    server::conn::http1 as server,
    service::service_fn,
};
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

struct Upstream {
    authority: String,
    host: HeaderValue,
    idle: parking_lot::Mutex<Vec<Sender>>,
}

impl Upstream {
    async fn sender(&self) -> Result<Sender, String> {
        while let Some(s) = self.idle.lock().pop() {
            if s.is_ready() {
                return Ok(s);
            }
        }
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = client::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn forward(&self, path: &str) -> Result<Response<Full<Bytes>>, String> {
        let mut sender = self.sender().await?;
        let req = Request::get(path)
            .header(HOST, self.host.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let (parts, body) = sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?
            .into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        if sender.is_ready() {
            self.idle.lock().push(sender);
        }
        Ok(Response::from_parts(parts, Full::new(body)))
    }
}

async fn handle(
    up: Arc<Upstream>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = match req.uri().path().strip_prefix("/api/users/") {
        Some(id) => match up.forward(&format!("/users/{id}")).await {
            Ok(r) => return Ok(r),
            Err(_) => StatusCode::BAD_GATEWAY,
        },
        None => StatusCode::NOT_FOUND,
    };
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = answer;
    Ok(r)
}

// The same allocator as prism, so the comparison measures the code.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port = args.next().unwrap_or_else(|| "18090".into());
    let authority = args.next().unwrap_or_else(|| "127.0.0.1:18001".into());
    let up = Arc::new(Upstream {
        host: HeaderValue::from_str(&authority).map_err(std::io::Error::other)?,
        authority,
        idle: parking_lot::Mutex::new(Vec::new()),
    });
    // One thread, as the gateway and nginx run in the benchmark.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
            loop {
                let (tcp, _) = listener.accept().await?;
                let _ = tcp.set_nodelay(true);
                let up = up.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(up.clone(), req));
                    let _ = server::Builder::new()
                        .writev(false)
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        })
}
