//! `spawn_app()` and friends: each test gets its own data directory (or its
//! own PostgreSQL database) and its own port.

use std::{net::SocketAddr, time::Duration};

use prism::{App, Config, state::AppState};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};

pub const ADMIN_PASSWORD: &str = "admin-test-password";
/// Upper bound for any single network wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

pub struct TestApp {
    pub addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub state: AppState,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// Keeps the temporary data directory alive as long as the app.
    pub dir: Option<tempfile::TempDir>,
}

/// A test configuration: free port, demo data, a known admin password.
pub fn test_config(dir: &std::path::Path) -> Config {
    Config {
        demo: true,
        admin_password: Some(ADMIN_PASSWORD.into()),
        // Fast clocks, so tests of timed streams wait milliseconds.
        counter_interval: Duration::from_millis(50),
        ticker_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        ..Config::for_tests(dir)
    }
}

/// A test configuration on SQLite and, when the PostgreSQL tests run, one on
/// a PostgreSQL database of its own, each with a directory under `dir`: for
/// a test of what holds on either.
pub async fn sqlite_and_postgres(dir: &std::path::Path) -> Vec<Config> {
    let mut configs = vec![test_config(&dir.join("sqlite"))];
    if let Some(url) = postgres_url().await {
        configs.push(shared_postgres_config(dir, "postgres", &url));
    }
    configs
}

/// The configuration of one of several instances sharing the PostgreSQL
/// database `url` and a token secret, with a directory `dir/sub` of its own.
pub fn shared_postgres_config(dir: &std::path::Path, sub: &str, url: &str) -> Config {
    let mut c = test_config(&dir.join(sub));
    c.database_url = Some(url.to_owned());
    c.jwt_secret = Some("a shared secret of at least thirty-two bytes".into());
    c
}

/// prism on SQLite in a fresh directory, with the demo data.
pub async fn spawn_app() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut app = spawn_with(test_config(dir.path())).await;
    app.dir = Some(dir);
    app
}

/// prism (as [`spawn_app`]) closing client connections, and cutting off
/// request bodies, after `idle` of silence.
pub async fn spawn_with_idle_timeout(idle: Duration) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.client_idle_timeout = idle;
    let mut app = spawn_with(config).await;
    app.dir = Some(dir);
    app
}

/// prism with a given configuration.
pub async fn spawn_with(config: Config) -> TestApp {
    prism::telemetry::init_tap_only("warn,prism=info");
    let app = App::build(config).await.expect("prism failed to start");
    let addr = app.http_addr();
    let grpc_addr = app.grpc_addr();
    let state = app.state().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        grpc_addr,
        state,
        client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        stop: Some(stop),
        handle: Some(handle),
        dir: None,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let r = self.get(path).await;
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Sends `body` as JSON with an optional bearer token.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    pub async fn send_json(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let r = self.send(method, path, token, body).await;
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs `body` to `path`, fails the test unless the answer is
    /// 201 Created, and gives the created resource.
    pub async fn create(&self, path: &str, token: Option<&str>, body: Value) -> Value {
        let (status, created) = self.send_json(Method::POST, path, token, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "POST {path}: {created}");
        created
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let (status, body) = self
            .send_json(
                Method::POST,
                "/auth/login",
                None,
                Some(serde_json::json!({"username": username, "password": password})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "login failed: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Runs a GraphQL operation over HTTP POST; returns the whole response body.
    pub async fn graphql(&self, query: &str, variables: Value, token: Option<&str>) -> Value {
        let (status, body) = self
            .send_json(
                Method::POST,
                "/graphql",
                token,
                Some(serde_json::json!({"query": query, "variables": variables})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// A gRPC channel to this server.
    pub async fn grpc(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .timeout(WAIT)
            .connect()
            .await
            .expect("gRPC connect failed")
    }

    /// A WebSocket to `path` offering `protocol`.
    pub async fn websocket(&self, path: &str, protocol: Option<&str>) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}{}", self.addr, path)
            .into_client_request()
            .unwrap();
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("WebSocket connect timed out")
            .expect("WebSocket connect failed");
        Ws(ws)
    }

    pub async fn admin_token(&self) -> String {
        self.login("admin", ADMIN_PASSWORD).await
    }

    pub async fn alice_token(&self) -> String {
        self.login("alice", prism::demo::ALICE_PASSWORD).await
    }

    pub async fn bob_token(&self) -> String {
        self.login("bob", prism::demo::BOB_PASSWORD).await
    }

    /// Graceful shutdown; fails the test if it errors or hangs.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("shutdown hung")
            .unwrap()
            .unwrap();
    }
}

/// A fresh PostgreSQL database for one test, or `None` (with a notice) when
/// `PRISM_TEST_DATABASE_URL` is unset. Under `CI=true` a missing URL fails the
/// test instead, so CI can never skip the PostgreSQL half silently.
pub async fn postgres_url() -> Option<String> {
    let Ok(admin_url) = std::env::var("PRISM_TEST_DATABASE_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("PRISM_TEST_DATABASE_URL must be set under CI=true");
        }
        eprintln!("SKIPPED: PostgreSQL test (set PRISM_TEST_DATABASE_URL to run it)");
        return None;
    };
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("cannot connect to PRISM_TEST_DATABASE_URL");
    let name = format!("prism_test_{}", prism::auth::random_token(8));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').unwrap().0;
    Some(format!("{base}/{name}"))
}

/// Waits until `f` returns `Some`, polling; fails after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A test WebSocket client: every receive has a timeout.
pub struct Ws(
    pub tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
);

pub use tokio_tungstenite::tungstenite::Message as WsMessage;

impl Ws {
    pub async fn send_json(&mut self, v: Value) {
        use futures::SinkExt;
        self.0
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// The next message of any kind (pings are skipped), within [`WAIT`].
    pub async fn next(&mut self) -> Option<WsMessage> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.0.next())
                .await
                .expect("timed out waiting for a WebSocket message");
            match msg {
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next text message, parsed as JSON.
    pub async fn next_json(&mut self) -> Value {
        match self.next().await {
            Some(WsMessage::Text(t)) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The close code the server ends the connection with, within [`WAIT`].
    pub async fn close_code(&mut self) -> Option<u16> {
        let closed = async {
            loop {
                match self.next().await {
                    Some(WsMessage::Close(frame)) => return frame.map(|f| f.code.into()),
                    Some(_) => continue,
                    None => return None,
                }
            }
        };
        tokio::time::timeout(WAIT, closed)
            .await
            .expect("timed out waiting for the WebSocket to close")
    }
}

/// One Server-Sent Event as a client sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.data))
    }
}

/// Opens three connections to `addr`: a silent one, one that sends `head`
/// (a request head without its blank line) and stops, and one that is
/// served a `GET /healthz` and kept alive. Returns once the server has
/// closed all three, each after sending nothing but the served answer.
pub async fn idle_connections_are_closed(addr: SocketAddr, head: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = || async {
        tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
            .await
            .expect("connect hung")
            .unwrap()
    };
    let silent = connect().await;
    let mut stalled = connect().await;
    let mut served = connect().await;
    for (s, bytes) in [
        (&mut stalled, head),
        (
            &mut served,
            &b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        ),
    ] {
        tokio::time::timeout(WAIT, s.write_all(bytes))
            .await
            .expect("write hung")
            .unwrap();
    }
    for (what, mut s) in [("silent", silent), ("stalled", stalled), ("served", served)] {
        // Everything the server sends until it closes; a reset counts as closed.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("the {what} connection was never closed"));
        let got = String::from_utf8_lossy(&got);
        if what == "served" {
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        } else {
            assert_eq!(got, "", "{what}");
        }
    }
}

/// Sends `request`, a request head with part of its body, and no more; returns
/// everything the server sends until it closes the connection.
pub async fn stalled_body_answer(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect hung")
        .unwrap();
    tokio::time::timeout(WAIT, s.write_all(request))
        .await
        .expect("write hung")
        .unwrap();
    let mut got = Vec::new();
    // A reset after the answer counts as closed.
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("the stalled request was never answered or closed");
    String::from_utf8_lossy(&got).into_owned()
}

/// A login whose body declares 100 bytes and stops after 11.
pub const STALLED_LOGIN: &[u8] = b"POST /auth/login HTTP/1.1\r\nhost: x\r\n\
content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"username\"";

/// A minimal, strict SSE client over a streaming reqwest response.
pub struct Sse {
    pub response_headers: reqwest::header::HeaderMap,
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl Sse {
    pub async fn connect(app: &TestApp, path: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = app
            .client
            .get(app.url(path))
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        Sse::from_response(r)
    }

    pub fn from_response(r: reqwest::Response) -> Sse {
        Sse {
            response_headers: r.headers().clone(),
            body: Box::pin(r.bytes_stream()),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` when the stream ends.
    /// Fails after [`WAIT`] without one, keep-alive comments or not.
    pub async fn next(&mut self) -> Option<SseEvent> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if line.starts_with(':') || line.is_empty() {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => ev.id = Some(value.to_owned()),
                        "event" => ev.event = Some(value.to_owned()),
                        "data" => data.push(value.to_owned()),
                        _ => {}
                    }
                }
                if data.is_empty() && ev.event.is_none() {
                    continue; // a comment-only block (keep-alive)
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .expect("timed out waiting for an SSE event");
            match chunk {
                Some(Ok(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event named `name` (others skipped), within [`WAIT`].
    pub async fn next_named(&mut self, name: &str) -> SseEvent {
        let named = async {
            loop {
                let ev = self.next().await.expect("stream ended");
                if ev.event.as_deref() == Some(name) {
                    return ev;
                }
            }
        };
        tokio::time::timeout(WAIT, named)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for an SSE `{name}` event"))
    }
}

/// The directory of the Node.js clients, or `None` (with a notice) when their
/// packages are not installed; under `CI=true` that is a failure instead.
pub fn node_clients() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if dir.join("node_modules/graphql-http").exists()
        && dir.join("node_modules/graphql-ws").exists()
    {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("tests/js/node_modules is missing: run `npm ci` in tests/js");
    }
    eprintln!("SKIPPED: third-party GraphQL clients (run `npm ci` in tests/js)");
    None
}

pub async fn node(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .args(args)
            .current_dir(dir)
            .output(),
    )
    .await
    .expect("node timed out")
    .expect("cannot run node");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A `prism` child process and the HTTP address it reported.
pub struct Process {
    pub child: tokio::process::Child,
    pub addr: String,
}

impl Process {
    /// Runs `prism ARGS --data-dir DIR --log-format json` and waits for its
    /// "listening on http://…" line.
    pub async fn start(args: &[&str], data_dir: &std::path::Path, env: &[(&str, &str)]) -> Process {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism"));
        cmd.args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--log-format", "json"])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(i) = line.find("http://") {
                    return line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect::<String>();
                }
            }
            panic!("prism exited before listening");
        })
        .await
        .expect("prism did not report its address");
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Process { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    pub async fn wait_exit(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("prism did not exit")
            .unwrap()
    }
}

/// Free ports for a process that must be told its port (or for an address
/// where nothing listens), below the kernel's ephemeral range: a port found
/// with `bind(0)` and released could be handed to another test's listener or
/// outgoing connection before the process binds it; ports outside that range
/// are only ever taken by asking for them.
pub fn ports_outside_the_ephemeral_range(n: usize) -> Vec<u16> {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let mut seed = [0u8; 2];
    getrandom::fill(&mut seed).unwrap();
    let span = low.saturating_sub(10_000).max(1);
    let mut candidate = 10_000 + u16::from_le_bytes(seed) % span;
    let mut ports = Vec::new();
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        if std::net::TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            ports.push(candidate);
        }
        candidate = 10_000 + (candidate - 10_000 + 1) % span;
    }
    assert_eq!(ports.len(), n, "no free ports below {low}");
    ports
}

/// Logs the demo user alice in at a server running as its own process
/// (`base` is its `http://host:port`) and returns her access token.
pub async fn alice_token_at(client: &reqwest::Client, base: &str) -> String {
    let r = client
        .post(format!("{base}/auth/login"))
        .json(&serde_json::json!({"username": "alice", "password": prism::demo::ALICE_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "login failed");
    let body: Value = r.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// Checks the OpenAPI documents at `specs` (paths under `base`, a server's
/// URL) against the server, since a generated client relies on them: each
/// operation is served at the path it is listed under, answers 401 without a
/// token exactly when it lists a security requirement (and lists that 401),
/// and lists the 422 of any input it reads. Returns how many operations
/// were checked.
pub async fn documents_hold(client: &reqwest::Client, base: &str, specs: &[&str]) -> usize {
    let mut checked = 0;
    for spec in specs {
        let (doc, prefix) = document(client, base, spec).await;
        for (path, item) in doc["paths"].as_object().unwrap() {
            assert!(
                path.starts_with('/') && !path.starts_with("//"),
                "{spec}: {path}"
            );
            for (method, op) in item.as_object().unwrap() {
                let what = format!("{spec}: {method} {path}");
                let answers = op["responses"].as_object().unwrap();
                let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
                let reads_input = op["requestBody"].is_object()
                    || op["parameters"].as_array().is_some_and(|p| !p.is_empty());
                assert!(answers.contains_key("401") || !secured, "{what}");
                for (code, answer) in answers {
                    // Required by OpenAPI 3.1; generators refuse documents without it.
                    let described = answer["description"]
                        .as_str()
                        .is_some_and(|d| !d.is_empty());
                    assert!(described, "{what}: {code} has no description");
                }
                assert_eq!(answers.contains_key("422"), reads_input, "{what}");
                if method != "get" && !path.starts_with("/auth/") {
                    assert!(secured, "{what}: a write without a token requirement");
                }
                let url = format!("{base}{prefix}{}", with_ids(path));
                let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let r = client.request(method, url).send().await.unwrap();
                let status = r.status();
                // A stream stays open: its head is the answer.
                let streams = r
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
                let body: Value = if streams {
                    Value::Null
                } else {
                    r.json().await.unwrap_or_default()
                };
                assert!(
                    !(status == StatusCode::NOT_FOUND && body["detail"] == "Not Found"),
                    "{what} is not routed"
                );
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{what}");
                assert_eq!(
                    status == StatusCode::UNAUTHORIZED,
                    secured,
                    "{what}: {status}"
                );
                checked += 1;
            }
        }
    }
    checked
}

/// The JSON body of a GET of `url`, whatever its status.
pub async fn json_at(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// The OpenAPI document at `spec` under `base`, and the prefix its paths
/// take there (its first server's URL, which a mounted sub-app declares).
async fn document(client: &reqwest::Client, base: &str, spec: &str) -> (Value, String) {
    let doc = json_at(client, format!("{base}{spec}")).await;
    let prefix = doc["servers"][0]["url"].as_str().unwrap_or("").to_owned();
    (doc, prefix)
}

/// A documented path with each of its parameters (`{user_id}`) set to 1.
fn with_ids(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "1" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// A second opinion on the documents at `specs` (paths under `base`): each
/// must pass openapi-spec-validator, and schemathesis generates requests from each one (valid and invalid, and
/// chains of them) and checks every answer against it: no 5xx, only
/// documented statuses, bodies of the documented shape, and invalid input
/// refused. It does not ask that every schema-valid request succeed, since no
/// document can say which ids exist. Skips without schemathesis, except
/// under CI.
pub async fn schemathesis(base: &str, specs: &[&str], token: &str) {
    let have_it = std::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_it {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("schemathesis is missing: pip install -r tests/python/requirements.txt");
        }
        eprintln!("SKIPPED: OpenAPI conformance (pip install -r tests/python/requirements.txt)");
        return;
    }
    // Its cache of earlier failures stays out of the repository and out of
    // the next run.
    let workdir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    for spec in specs {
        let (doc, prefix) = document(&client, base, spec).await;
        let file = workdir.path().join("openapi.json");
        std::fs::write(&file, doc.to_string()).unwrap();
        let mut validate = tokio::process::Command::new("python3");
        validate.args(["-m", "openapi_spec_validator"]).arg(&file);
        succeeds(validate, WAIT, &format!("{base}{spec} as OpenAPI")).await;
        let mut run = tokio::process::Command::new("python3");
        run.args(["-m", "schemathesis.cli", "run", "--no-color"])
            .arg(format!("{base}{spec}"))
            .args(["--url", &format!("{base}{prefix}")])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            // The same cases on every run, so a failure is reproducible.
            .args(["--max-examples", "50", "--generation-deterministic"])
            // Server-Sent Events never end, so no answer could be checked;
            // documents_hold checks that they are routed as documented.
            .args(["--exclude-tag", "streams"])
            .args(["--request-timeout", "10"])
            .current_dir(workdir.path());
        let what = format!("schemathesis on {base}{spec}");
        succeeds(run, Duration::from_secs(300), &what).await;
    }
}

/// Runs `cmd` to its end within `limit` and asserts that it succeeded,
/// showing its output if it did not.
pub async fn succeeds(mut cmd: tokio::process::Command, limit: Duration, what: &str) {
    let out = tokio::time::timeout(limit, cmd.kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
        .unwrap();
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A service running in the background until stopped.
pub struct Running {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
}

pub fn run(app: App) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    Running { stop, handle }
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("service shutdown hung")
            .unwrap()
            .unwrap();
    }
}
