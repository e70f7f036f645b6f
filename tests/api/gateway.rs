//! The API gateway (SPEC §8): routes over the real services, and resilience
//! proven against fake upstreams whose behaviour each test controls.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::get,
};
use parking_lot::Mutex;
use prism::{
    App, Config,
    app::Role,
    domain::OrderStatus,
    gateway::{
        GatewayApp,
        registry::{Registry, ServiceSpec},
    },
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    task::JoinHandle,
};

use crate::helpers::{
    ADMIN_PASSWORD, Running, STALLED_LOGIN, WAIT, alice_token_at, documents_hold, eventually,
    idle_connections_are_closed, json_at, ports_outside_the_ephemeral_range, run, schemathesis,
    stalled_body_answer,
};

const SECRET: &str = "a test secret shared by the whole topology";

/// How a fake upstream answers its data routes (`/healthz` always answers 200).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    /// 503 to everything but `/healthz`.
    Failing,
    /// 503 for the next N requests, then OK.
    FailFirst(u64),
    /// Never answers.
    Hang,
    /// 504 at once, as a prism service answers when the time it was given
    /// (`x-request-timeout-ms`) has run out.
    OutOfTime,
    /// Starts an answer and breaks the connection.
    Break,
}

#[derive(Clone)]
struct FakeState {
    name: &'static str,
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    /// When set, every data request waits here: both fakes of a test share it,
    /// so requests only complete if they are in flight at the same time.
    barrier: Option<Arc<tokio::sync::Barrier>>,
    /// Told when a hanging request's handler is dropped: its client went away.
    abandoned: Arc<tokio::sync::Notify>,
}

/// Tells `abandoned` when the hanging handler holding it is dropped.
struct DropSignal(Arc<tokio::sync::Notify>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

struct Fake {
    addr: SocketAddr,
    state: FakeState,
    _server: JoinHandle<()>,
}

impl Fake {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }
    /// The headers of the last request the fake served.
    fn last_seen(&self) -> HeaderMap {
        self.state.seen.lock().last().cloned().unwrap()
    }
    fn set(&self, mode: Mode) {
        *self.state.mode.lock() = mode;
    }
}

async fn fake_answer(s: &FakeState, headers: HeaderMap, body: Value) -> axum::response::Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    s.seen.lock().push(headers);
    if let Some(b) = &s.barrier
        && tokio::time::timeout(Duration::from_secs(5), b.wait())
            .await
            .is_err()
    {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the other call never came",
        )
            .into_response();
    }
    let fail = {
        let mut mode = s.mode.lock();
        match *mode {
            Mode::Hang => None,
            Mode::OutOfTime => {
                return (
                    StatusCode::GATEWAY_TIMEOUT,
                    axum::Json(json!({"detail": "Deadline exceeded"})),
                )
                    .into_response();
            }
            Mode::Break => {
                let broken = futures::stream::once(async {
                    Err::<bytes::Bytes, _>(std::io::Error::other("gone"))
                });
                return axum::body::Body::from_stream(broken).into_response();
            }
            Mode::Ok => Some(false),
            Mode::Failing => Some(true),
            Mode::FailFirst(0) => {
                *mode = Mode::Ok;
                Some(false)
            }
            Mode::FailFirst(n) => {
                *mode = Mode::FailFirst(n - 1);
                Some(true)
            }
        }
    };
    let Some(fail) = fail else {
        let _signal = DropSignal(s.abandoned.clone());
        return std::future::pending().await;
    };
    if fail {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"detail": "down"})),
        )
            .into_response();
    }
    // An id of its own, a hop-by-hop header and an end-to-end one: the
    // gateway answers with the request's id, drops the second and keeps the
    // third.
    (
        [
            ("x-request-id", "the upstream's own id".to_owned()),
            ("keep-alive", "timeout=5".to_owned()),
            ("x-served-by", s.name.to_owned()),
        ],
        axum::Json(body),
    )
        .into_response()
}

async fn fake(name: &'static str, barrier: Option<Arc<tokio::sync::Barrier>>) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    fake_on(listener, name, barrier)
}

/// A fake upstream serving on `listener`.
fn fake_on(
    listener: tokio::net::TcpListener,
    name: &'static str,
    barrier: Option<Arc<tokio::sync::Barrier>>,
) -> Fake {
    let state = FakeState {
        name,
        mode: Arc::new(Mutex::new(Mode::Ok)),
        hits: Arc::default(),
        seen: Arc::default(),
        barrier,
        abandoned: Arc::default(),
    };
    let app = Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/users/{id}",
            get(
                |State(s): State<FakeState>, h: HeaderMap, Path(id): Path<i64>| async move {
                    fake_answer(&s, h, json!({"id": id, "name": format!("{} user", s.name)})).await
                },
            ),
        )
        .route(
            "/orders",
            get(|State(s): State<FakeState>, h: HeaderMap| async move {
                fake_answer(&s, h, json!([{"id": 1, "user_id": 1, "total": 5.0}])).await
            })
            .post(|State(s): State<FakeState>, h: HeaderMap| async move {
                fake_answer(&s, h, json!({"id": 9})).await
            }),
        )
        .with_state(state.clone());
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Fake {
        addr,
        state,
        _server: server,
    }
}

/// A port with nothing listening.
async fn dead_url() -> String {
    format!(
        "http://127.0.0.1:{}",
        ports_outside_the_ephemeral_range(1)[0]
    )
}

struct TestGateway {
    addr: SocketAddr,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    /// A gateway with its default workers, one per core.
    async fn start(registry: Registry) -> TestGateway {
        TestGateway::start_with(registry, None).await
    }

    async fn start_with(registry: Registry, workers: Option<usize>) -> TestGateway {
        prism::telemetry::init_tap_only("warn");
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            jwt_secret: Some(SECRET.into()),
            worker_threads: workers,
            ..Config::for_tests(dir.path())
        };
        let app = GatewayApp::build(&config, &registry).await.unwrap();
        let addr = app.addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        TestGateway {
            addr,
            client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
            stop: Some(stop),
            handle: Some(handle),
            _dir: dir,
        }
    }

    async fn send(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.send(path).await;
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Asserts that `path` is refused at once: its upstream's circuit is open.
    async fn assert_circuit_open(&self, path: &str) {
        let (s, body) = self.get(path).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains("circuit open"),
            "{body}"
        );
    }

    /// Asserts that `/metrics` has each of `lines`.
    async fn assert_metrics(&self, lines: &[String]) {
        let text = self.send("/metrics").await.text().await.unwrap();
        for line in lines {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.handle.take().unwrap())
            .await
            .expect("gateway shutdown hung")
            .unwrap()
            .unwrap();
    }
}

fn registry(
    users: Vec<String>,
    orders: Vec<String>,
    products: Vec<String>,
    tune: impl Fn(&mut ServiceSpec),
) -> Registry {
    let mut r = Registry::local_default();
    for (name, instances) in [("users", users), ("orders", orders), ("products", products)] {
        let mut spec = ServiceSpec::new(instances);
        spec.backoff_ms = 5;
        tune(&mut spec);
        r.services.insert(name.into(), spec);
    }
    r.health_interval_ms = 50;
    r
}

/// A registry of one users instance; the orders and products services are
/// down.
async fn users_only_registry(users: &Fake, tune: impl Fn(&mut ServiceSpec)) -> Registry {
    registry(
        vec![users.url()],
        vec![dead_url().await],
        vec![dead_url().await],
        tune,
    )
}

/// A gateway in front of one users instance (see `users_only_registry`).
async fn users_only(users: &Fake, tune: impl Fn(&mut ServiceSpec)) -> TestGateway {
    TestGateway::start(users_only_registry(users, tune).await).await
}

fn token() -> String {
    prism::auth::TokenKeys::new(SECRET.as_bytes(), Duration::from_secs(60))
        .unwrap()
        .issue(1, prism::auth::Role::User)
        .unwrap()
}

// ---- against the real services --------------------------------------------

struct Topology {
    users: App,
    orders: App,
    products: App,
}

async fn service(role: Role, dir: &std::path::Path, users_url: Option<String>) -> App {
    service_with(role, dir, |config| {
        if let Some(u) = users_url {
            config.users_url = u;
        }
    })
    .await
}

/// A service with demo data and the topology's secret, configured by `tune`.
async fn service_with(role: Role, dir: &std::path::Path, tune: impl FnOnce(&mut Config)) -> App {
    let mut config = Config {
        demo: true,
        admin_password: Some(ADMIN_PASSWORD.into()),
        jwt_secret: Some(SECRET.into()),
        ..Config::for_tests(dir)
    };
    tune(&mut config);
    App::build_as(role, config).await.unwrap()
}

async fn topology(dir: &std::path::Path) -> Topology {
    let users = service(Role::Users, &dir.join("users"), None).await;
    let users_url = format!("http://{}", users.http_addr());
    let orders = service(Role::Orders, &dir.join("orders"), Some(users_url)).await;
    let products = service(Role::Products, &dir.join("products"), None).await;
    Topology {
        users,
        orders,
        products,
    }
}

/// Each service serves its own OpenAPI document and Swagger UI, as each of
/// the seed's FastAPI services does, and the documents hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_documents_its_routes() {
    let dir = tempfile::tempdir().unwrap();
    let users = service(Role::Users, &dir.path().join("users"), None).await;
    let users_url = format!("http://{}", users.http_addr());
    let orders = service(
        Role::Orders,
        &dir.path().join("orders"),
        Some(users_url.clone()),
    )
    .await;
    let orders_url = format!("http://{}", orders.http_addr());
    let (users, orders) = (run(users), run(orders));
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    for (base, operations) in [(&users_url, 10), (&orders_url, 3)] {
        let r = client.get(format!("{base}/docs/")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{base}");
        let checked = documents_hold(&client, base, &["/openapi.json"]).await;
        assert!(checked >= operations, "{base}: {checked} operations");
    }
    let alice = alice_token_at(&client, &users_url).await;
    for base in [&users_url, &orders_url] {
        schemathesis(base, &["/openapi.json"], &alice).await;
    }
    users.stop().await;
    orders.stop().await;
}

/// Login failures through the gateway count against the client that made
/// them, not against the gateway: a client that locks itself out of an
/// account does not lock everyone out of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_limits_count_the_client_behind_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let users = service(Role::Users, &dir.path().join("users"), None).await;
    let users_url = format!("http://{}", users.http_addr());
    let users = run(users);
    let gw = TestGateway::start(registry(
        vec![users_url],
        vec![dead_url().await],
        vec![dead_url().await],
        |_| {},
    ))
    .await;
    // Two clients on two loopback addresses.
    let client = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .timeout(WAIT)
            .build()
            .unwrap()
    };
    let (attacker, alice) = (client("127.0.0.2"), client("127.0.0.3"));
    let login = |c: &reqwest::Client, password: &str| {
        c.post(format!("http://{}/auth/login", gw.addr))
            .form(&[("username", "alice"), ("password", password)])
            .send()
    };
    let mut statuses = Vec::new();
    for _ in 0..11 {
        statuses.push(login(&attacker, "wrong").await.unwrap().status());
    }
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    assert_eq!(statuses[10], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    let r = login(&alice, prism::demo::ALICE_PASSWORD).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "another client still logs in");
    gw.stop().await;
    users.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_over_the_real_services() {
    let dir = tempfile::tempdir().unwrap();
    let t = topology(dir.path()).await;
    let reg = registry(
        vec![format!("http://{}", t.users.http_addr())],
        vec![format!("http://{}", t.orders.http_addr())],
        vec![format!("http://{}", t.products.grpc_addr())],
        |_| {},
    );
    let running: Vec<Running> = [t.users, t.orders, t.products]
        .into_iter()
        .map(run)
        .collect();
    let gw = TestGateway::start(reg).await;

    let (s, user) = gw.get("/api/users/1").await;
    assert_eq!((s, user["name"].clone()), (StatusCode::OK, json!("Alice")));
    let (s, body) = gw.get("/api/users/999").await;
    assert_eq!(
        (s, body),
        (StatusCode::NOT_FOUND, json!({"detail": "User not found"}))
    );
    let (s, order) = gw.get("/api/orders/1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(order["total"], 99.99);
    assert_eq!(
        order["user"]["name"], "Alice",
        "the orders service embeds the user"
    );
    // Fields come in the order the seed's models declare them, as FastAPI
    // writes them, however many services a body passed through.
    assert_eq!(
        keys(&order),
        ["id", "user_id", "total", "status", "created_at", "user"]
    );
    let (_, both) = gw.get("/api/user-orders/2").await;
    assert_eq!(both["user"]["name"], "Bob");
    assert_eq!(both["orders"][0]["total"], 149.99);
    let (_, profile) = gw.get("/user-profile/1").await;
    assert_eq!(profile["user"]["email"], "alice@example.com");
    assert!(profile.get("degraded").is_none());

    // Accounts and writes go through to the users and orders services.
    let r = gw
        .client
        .post(format!("http://{}/auth/login", gw.addr))
        .form(&[
            ("username", "alice"),
            ("password", prism::demo::ALICE_PASSWORD),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let login: Value = r.json().await.unwrap();
    let alice = login["access_token"].as_str().unwrap();
    // The upstream's own headers come through, as from a reverse proxy: a
    // failed login's challenge.
    let r = gw
        .client
        .post(format!("http://{}/auth/login", gw.addr))
        .form(&[("username", "alice"), ("password", "not her password")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = gw
        .client
        .post(format!("http://{}/orders", gw.addr))
        .json(&json!({"total": 3.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = gw
        .client
        .post(format!("http://{}/orders", gw.addr))
        .bearer_auth(alice)
        .json(&json!({"total": 3.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let placed: Value = r.json().await.unwrap();
    assert_eq!(placed["user_id"], 1);
    let r = gw
        .client
        .post(format!("http://{}/orders", gw.addr))
        .bearer_auth(alice)
        .json(&json!({"total": 3.5, "user_id": 999}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // The orders service applies the domain's rules: a customer's order starts pending.
    let r = gw
        .client
        .post(format!("http://{}/orders", gw.addr))
        .bearer_auth(alice)
        .json(&json!({"total": 3.5, "status": "cancelled"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Products over gRPC, statuses mapped to HTTP.
    let (s, p) = gw.get("/api/products/1").await;
    assert_eq!(
        (s, p["name"].clone(), p["category"].clone()),
        (StatusCode::OK, json!("Widget"), json!("ELECTRONICS"))
    );
    assert_eq!(
        keys(&p),
        [
            "id",
            "name",
            "description",
            "price",
            "category",
            "tags",
            "metadata"
        ]
    );
    let (s, body) = gw.get("/api/products/99").await;
    assert_eq!(
        (s, body),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Product 99 not found"})
        )
    );
    let r = gw
        .client
        .get(format!("http://{}/api/products?category=books", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-total-count"], "1");
    let list: Value = r.json().await.unwrap();
    assert_eq!(list[0]["name"], "Gadget");
    let (s, body) = gw.get("/api/products?category=TOYS").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["query", "category"]));

    let (_, health) = gw.get("/healthz").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["upstreams"]["users"][0]["circuit"], "closed");
    assert_eq!(health["upstreams"]["products"][0]["healthy"], true);

    // Its own document and Swagger UI, as the seed's FastAPI gateway has.
    let base = format!("http://{}", gw.addr);
    let r = gw.client.get(format!("{base}/docs/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("swagger-ui"));
    let checked = documents_hold(&gw.client, &base, &["/openapi.json"]).await;
    assert_eq!(checked, 11, "every route, /healthz and /metrics");
    schemathesis(&base, &["/openapi.json"], alice).await;

    gw.stop().await;
    for service in running {
        service.stop().await;
    }
}

// ---- resilience, against fakes ----------------------------------------------

#[tokio::test]
async fn fan_out_is_parallel() {
    // Each fake answers only once both calls are in flight: a gateway that
    // called one after the other would never get its first answer.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let users = fake("users", Some(barrier.clone())).await;
    let orders = fake("orders", Some(barrier)).await;
    let gw = TestGateway::start(registry(
        vec![users.url()],
        vec![orders.url()],
        vec![dead_url().await],
        |s| s.retries = 0,
    ))
    .await;
    let (s, body) = gw.get("/api/user-orders/1").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["name"], "users user");
    assert_eq!(body["orders"][0]["total"], 5.0);
    gw.stop().await;
}

/// GET `url`, telling the server it may take `ms` milliseconds, if given.
async fn get_within(client: &reqwest::Client, url: String, ms: Option<u64>) -> reqwest::Response {
    let mut req = client.get(url);
    if let Some(ms) = ms {
        req = req.header("x-request-timeout-ms", ms.to_string());
    }
    req.send().await.unwrap()
}

/// The milliseconds a request told its upstream it may take.
fn time_limit(seen: &HeaderMap) -> u64 {
    seen["x-request-timeout-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The trace a test client's request belongs to, and the client's span.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// GET `path` through the gateway with the request id `id`, as a sampled
/// span of [`TRACE`].
async fn traced_get(gw: &TestGateway, path: &str, id: &str) -> reqwest::Response {
    gw.client
        .get(format!("http://{}{path}", gw.addr))
        .header("x-request-id", id)
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn request_id_and_traceparent_reach_the_upstream() {
    let users = fake("users", None).await;
    let gw = users_only(&users, |s| s.timeout_ms = 1500).await;
    let trace = TRACE;
    let r = traced_get(&gw, "/api/users/1", "req-123").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-request-id"], "req-123");
    assert_eq!(r.headers()["x-served-by"], "users");
    assert!(r.headers().get("keep-alive").is_none(), "{:?}", r.headers());
    let seen = users.state.seen.lock().last().cloned().unwrap();
    assert_eq!(seen["x-request-id"], "req-123");
    let tp = seen["traceparent"].to_str().unwrap();
    assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
    assert!(
        !tp.contains(CLIENT_SPAN),
        "a new span id for the upstream call"
    );
    let limit = time_limit(&seen);
    // The try's 1.5 s timeout, not the 5 s overall deadline, bounds the upstream.
    assert!((1000..=1500).contains(&limit), "{limit}");
    assert_eq!(seen["host"], users.url().trim_start_matches("http://"));
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "the client's address");
    for name in [
        "host",
        "x-request-id",
        "traceparent",
        "x-request-timeout-ms",
        "x-forwarded-for",
    ] {
        assert_eq!(seen.get_all(name).iter().count(), 1, "one {name}: {seen:?}");
    }
    // Behind another proxy: the client's address goes after the ones given.
    let r = gw
        .client
        .get(format!("http://{}/api/users/1", gw.addr))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-for", "198.51.100.2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        users.last_seen()["x-forwarded-for"],
        "203.0.113.7, 198.51.100.2, 127.0.0.1"
    );

    // Without either header the gateway makes both up.
    let r = gw.send("/api/users/1").await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    };
    assert!(lower_hex(&id, 32), "{id}");
    let seen = users.state.seen.lock().last().cloned().unwrap();
    assert_eq!(seen["x-request-id"], id.as_str());
    let tp: Vec<String> = seen["traceparent"]
        .to_str()
        .unwrap()
        .split('-')
        .map(str::to_owned)
        .collect();
    assert_eq!(tp.len(), 4, "{tp:?}");
    assert_eq!((tp[0].as_str(), tp[3].as_str()), ("00", "01"), "sampled");
    assert!(lower_hex(&tp[1], 32) && lower_hex(&tp[2], 16), "{tp:?}");
    assert_ne!(tp[1], trace, "a new trace");
    assert_eq!(tp[1], id, "a made-up request id is the trace id");

    // With a trace but no request id, the trace id names the request.
    let r = gw
        .client
        .get(format!("http://{}/api/users/1", gw.addr))
        .header("traceparent", format!("00-{trace}-{CLIENT_SPAN}-00"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], trace);
    let seen = users.state.seen.lock().last().cloned().unwrap();
    assert_eq!(seen["x-request-id"], trace);
    let tp = seen["traceparent"].to_str().unwrap();
    assert!(
        tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-00"),
        "{tp}"
    );

    // A client that gives less time than the deadline bounds the upstream.
    let r = get_within(
        &gw.client,
        format!("http://{}/api/users/1", gw.addr),
        Some(300),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let limit = time_limit(&users.last_seen());
    assert!((1..=300).contains(&limit), "{limit}");
    gw.stop().await;

    // An overall deadline shorter than the try's timeout bounds the upstream instead.
    let mut r = users_only_registry(&users, |s| s.timeout_ms = 1500).await;
    r.deadline_ms = 700;
    let gw = TestGateway::start(r).await;
    assert_eq!(gw.send("/api/users/1").await.status(), StatusCode::OK);
    let seen = users.state.seen.lock().last().cloned().unwrap();
    let limit = time_limit(&seen);
    assert!((1..=700).contains(&limit), "{limit}");
    gw.stop().await;
}

/// The orders service passes on what the gateway sent it when it asks the
/// users service for an order's user: the request id, the trace (with a
/// span of its own) and the time left, never more than it was given.
#[tokio::test]
async fn the_orders_service_passes_the_deadline_and_trace_on() {
    let users = fake("users", None).await;
    let dir = tempfile::tempdir().unwrap();
    let orders = service(Role::Orders, dir.path(), Some(users.url())).await;
    let orders_url = format!("http://{}", orders.http_addr());
    let orders = run(orders);
    let mut reg = registry(vec![users.url()], vec![orders_url.clone()], vec![], |_| {});
    reg.deadline_ms = 700;
    let gw = TestGateway::start(reg).await;
    let r = traced_get(&gw, "/api/orders/1", "req-456").await;
    assert_eq!(r.status(), StatusCode::OK);
    let order: Value = r.json().await.unwrap();
    assert_eq!(order["user"]["name"], "users user", "{order}");
    let seen = users.state.seen.lock().last().cloned().unwrap();
    assert_eq!(seen["x-request-id"], "req-456");
    let tp: Vec<&str> = seen["traceparent"].to_str().unwrap().split('-').collect();
    assert_eq!((tp[0], tp[1], tp[3]), ("00", TRACE, "01"), "{tp:?}");
    assert_ne!(tp[2], CLIENT_SPAN, "a span of the orders service's own");
    let limit = time_limit(&seen);
    assert!((1..=700).contains(&limit), "{limit}");

    // Asked directly, without a time limit: its own two seconds at most.
    let r = get_within(&gw.client, format!("{orders_url}/orders/1"), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let seen = users.last_seen();
    let limit = time_limit(&seen);
    assert!((1..=2000).contains(&limit), "{limit}");
    assert!(seen.get("traceparent").is_none(), "no trace to pass on");
    // No time left: 504 at once, and the users service is not asked.
    let asked = users.hits();
    let r = get_within(&gw.client, format!("{orders_url}/orders/1"), Some(0)).await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(users.hits(), asked);
    // A wrong method gets the usual JSON 405 on the service's own routes too.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        gw.client.delete(format!("{orders_url}/orders/1")).send(),
    )
    .await
    .expect("the orders service answers")
    .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, json!({"detail": "Method Not Allowed"}));

    gw.stop().await;
    orders.stop().await;
}

/// A burst of orders does not become a burst of connections to the users
/// service: past `users_max_connections`, a request waits for a connection
/// to come free, and is then served on it.
#[tokio::test]
async fn the_orders_service_caps_its_connections_to_the_users_service() {
    let release = Arc::new(tokio::sync::Barrier::new(2));
    let users = fake("users", Some(release.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let orders = service_with(Role::Orders, dir.path(), |c| {
        c.users_url = users.url();
        c.users_max_connections = 1;
    })
    .await;
    let orders_url = format!("http://{}", orders.http_addr());
    let orders = run(orders);
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let get_order = || tokio::spawn(client.get(format!("{orders_url}/orders/1")).send());
    let gauges = |connections: u64, pending: u64| {
        [
            format!("prism_users_service_connections {connections}"),
            format!("prism_users_service_pending_requests {pending}"),
        ]
    };
    let metrics = || async {
        let r = client.get(format!("{orders_url}/metrics")).send().await;
        r.unwrap().text().await.unwrap()
    };

    let first = get_order();
    eventually("the first order's user to be asked for", || async {
        (users.hits() == 1).then_some(())
    })
    .await;
    let second = get_order();
    let [open, waiting] = gauges(1, 1);
    eventually("the second order to wait for the connection", || async {
        let text = metrics().await;
        text.lines().any(|l| l == waiting).then_some(text)
    })
    .await;
    assert!(metrics().await.lines().any(|l| l == open));
    assert_eq!(
        users.hits(),
        1,
        "the second waits, without a connection of its own"
    );

    for held in [first, second] {
        let r = answer(held, &release).await;
        assert_eq!(r.status(), StatusCode::OK);
        let order: Value = r.json().await.unwrap();
        assert_eq!(order["user"]["name"], "users user", "{order}");
    }
    let text = metrics().await;
    for line in gauges(1, 0) {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    orders.stop().await;
}

/// Requests the gateway cannot route or read get an error in the usual JSON
/// form and never reach an upstream.
#[tokio::test]
async fn bad_requests_get_json_errors_and_reach_no_upstream() {
    let users = fake("users", None).await;
    let gw = users_only(&users, |_| {}).await;
    let url = |path: &str| format!("http://{}{path}", gw.addr);

    let (status, body) = gw.get("/api/users/abc").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["path", "user_id"]));
    assert_eq!(body["detail"][0]["type"], "int_parsing");
    let (status, body) = gw.get("/user-profile/1.5").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["path", "user_id"]));

    for path in ["/api/users/", "/api/users/1/orders", "/nowhere"] {
        assert_eq!(
            gw.get(path).await,
            (StatusCode::NOT_FOUND, json!({"detail": "Not Found"})),
            "{path}"
        );
    }

    let r = gw.client.delete(url("/api/users/1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET,HEAD");
    let r = gw.client.get(url("/auth/register")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(
        r.json::<Value>().await.unwrap()["detail"],
        "Method Not Allowed"
    );

    // A declared body over the limit is refused before it is sent.
    let mut tcp = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(gw.addr))
        .await
        .expect("connecting to the gateway hung")
        .unwrap();
    let head = format!(
        "POST /auth/register HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        gw.addr,
        3 * 1024 * 1024
    );
    tokio::time::timeout(WAIT, tcp.write_all(head.as_bytes()))
        .await
        .expect("sending the request head hung")
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("no answer to an oversized body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains(r#"{"detail":"#), "{answer}");

    let (status, body) = gw.get("/api/products?page=first").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["query", "page"]));

    assert_eq!(users.hits(), 0, "nothing reached the users service");
    gw.stop().await;
}

/// `GET /api/users/1` sent through the gateway, once the users service
/// (a fake with a barrier) holds it.
async fn held_request(
    gw: &TestGateway,
    users: &Fake,
) -> JoinHandle<reqwest::Result<reqwest::Response>> {
    let url = format!("http://{}/api/users/1", gw.addr);
    let in_flight = tokio::spawn(gw.client.get(url).send());
    eventually("the request to reach the users service", || async {
        (users.hits() == 1).then_some(())
    })
    .await;
    in_flight
}

/// The answer to a held request, once it is let go.
async fn answer(
    in_flight: JoinHandle<reqwest::Result<reqwest::Response>>,
    release: &tokio::sync::Barrier,
) -> reqwest::Response {
    tokio::time::timeout(WAIT, release.wait())
        .await
        .expect("the held request never reached the upstream's barrier");
    tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("the held request never finished")
        .unwrap()
        .unwrap()
}

/// A request body that stops arriving is cut off at the request's deadline
/// (408), and nothing reaches the upstream.
#[tokio::test]
async fn a_request_body_that_stops_arriving_gets_408() {
    let users = fake("users", None).await;
    let mut reg = users_only_registry(&users, |_| {}).await;
    reg.deadline_ms = 200;
    let gw = TestGateway::start(reg).await;
    let got = stalled_body_answer(gw.addr, STALLED_LOGIN).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("did not arrive in time"), "{got}");
    assert_eq!(users.hits(), 0);
    gw.stop().await;
}

/// Once told to stop, the gateway takes no new connections but finishes the
/// requests it is proxying.
#[tokio::test]
async fn stopping_lets_a_proxied_request_finish() {
    let release = Arc::new(tokio::sync::Barrier::new(2));
    let users = fake("users", Some(release.clone())).await;
    let mut gw = users_only(&users, |s| s.timeout_ms = 10_000).await;
    let in_flight = held_request(&gw, &users).await;

    let _ = gw.stop.take().unwrap().send(());
    let addr = gw.addr;
    eventually("the gateway to stop accepting", || async move {
        // Refused, not merely slow: a connect that hangs counts as not yet.
        matches!(
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                .await,
            Ok(Err(_))
        )
        .then_some(())
    })
    .await;
    assert!(!in_flight.is_finished());

    let r = answer(in_flight, &release).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "users user");
    tokio::time::timeout(WAIT, gw.handle.take().unwrap())
        .await
        .expect("gateway shutdown hung")
        .unwrap()
        .unwrap();
}

/// Client connections on which no request starts are closed: one that
/// never sends anything, one whose request head never completes, and a
/// keep-alive connection after its request; one whose request is still
/// being served is not.
#[tokio::test]
async fn idle_and_stalled_client_connections_are_closed() {
    let release = Arc::new(tokio::sync::Barrier::new(2));
    let users = fake("users", Some(release.clone())).await;
    let mut reg = users_only_registry(&users, |s| s.timeout_ms = 10_000).await;
    reg.client_idle_timeout_ms = 100;
    let gw = TestGateway::start(reg).await;
    let slow = held_request(&gw, &users).await;

    idle_connections_are_closed(gw.addr, b"GET /api/users/1 HTTP/1.1\r\nhost: x\r\n").await;

    // The held request's connection outlived all of that: it was busy.
    assert!(!slow.is_finished());
    assert_eq!(answer(slow, &release).await.status(), StatusCode::OK);
    gw.stop().await;
}

/// `/metrics` counts requests by route and answer; every route's 200 series
/// exists from the start.
#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let users = fake("users", None).await;
    let gw = users_only(&users, |s| s.retries = 0).await;
    for _ in 0..2 {
        assert_eq!(gw.get("/api/users/1").await.0, StatusCode::OK);
    }
    assert_eq!(
        gw.get("/api/orders/1").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    gw.assert_metrics(&[
        r#"prism_gateway_requests_total{route="/api/users/{user_id}",status="200"} 2"#.into(),
        r#"prism_gateway_requests_total{route="/api/orders/{order_id}",status="503"} 1"#.into(),
        r#"prism_gateway_requests_total{route="/api/products",status="200"} 0"#.into(),
        format!(
            r#"prism_gateway_upstream_tries_total{{upstream="users",instance="{}"}} 2"#,
            users.url()
        ),
        format!(
            r#"prism_gateway_upstream_healthy{{upstream="users",instance="{}"}} 1"#,
            users.url()
        ),
    ])
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_dead_instance_is_skipped() {
    let users = fake("users", None).await;
    let dead = dead_url().await;
    let gw = TestGateway::start(registry(
        vec![dead.clone(), users.url()],
        vec![dead_url().await],
        vec![dead_url().await],
        |_| {},
    ))
    .await;
    for _ in 0..10 {
        let (s, _) = gw.get("/api/users/1").await;
        assert_eq!(s, StatusCode::OK);
    }
    let health = eventually("the dead instance to be marked unhealthy", || async {
        let (_, h) = gw.get("/healthz").await;
        (h["upstreams"]["users"][0]["healthy"] == false).then_some(h)
    })
    .await;
    assert_eq!(health["upstreams"]["users"][1]["healthy"], true);
    assert_eq!(
        health["status"], "degraded",
        "orders and products have no live instance"
    );
    let before = users.hits();
    for _ in 0..5 {
        assert_eq!(gw.get("/api/users/1").await.0, StatusCode::OK);
    }
    assert_eq!(
        users.hits() - before,
        5,
        "every request went to the live instance, once"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_post_is_never_retried() {
    let orders = fake("orders", None).await;
    orders.set(Mode::Failing);
    let gw = TestGateway::start(registry(
        vec![dead_url().await],
        vec![orders.url()],
        vec![dead_url().await],
        |s| s.retries = 3,
    ))
    .await;
    let r = gw
        .client
        .post(format!("http://{}/orders", gw.addr))
        .bearer_auth(token())
        .json(&json!({"total": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        orders.hits(),
        1,
        "the POST may have been applied: it is sent once"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_flaky_upstream_is_retried_and_succeeds() {
    let users = fake("users", None).await;
    users.set(Mode::FailFirst(2));
    let gw = users_only(&users, |s| s.retries = 3).await;
    let (s, body) = gw.get("/api/users/7").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["id"], 7);
    assert_eq!(users.hits(), 3, "two failures, then the success");
    let instance = users.url();
    gw.assert_metrics(&[
        format!(r#"prism_gateway_upstream_tries_total{{upstream="users",instance="{instance}"}} 3"#),
        format!(
            r#"prism_gateway_upstream_failures_total{{upstream="users",instance="{instance}",kind="unavailable"}} 2"#
        ),
        format!(
            r#"prism_gateway_upstream_failures_total{{upstream="users",instance="{instance}",kind="timeout"}} 0"#
        ),
        r#"prism_gateway_upstream_retries_total{upstream="users"} 2"#.into(),
        r#"prism_gateway_retry_budget_exhausted_total{upstream="users"} 0"#.into(),
    ])
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_dead_upstream_opens_its_circuit_and_probes_close_it() {
    let users = fake("users", None).await;
    users.set(Mode::Failing);
    let gw = users_only(&users, |s| {
        s.retries = 0;
        s.failures_to_open = 3;
        s.open_ms = 300;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            gw.get("/api/users/1").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(users.hits(), 3);
    // Open: fail fast, and the upstream sees nothing.
    for _ in 0..5 {
        gw.assert_circuit_open("/api/users/1").await;
    }
    assert_eq!(
        users.hits(),
        3,
        "no upstream calls while the circuit is open"
    );
    let (_, h) = gw.get("/healthz").await;
    assert_eq!(h["upstreams"]["users"][0]["circuit"], "open");
    let instance = users.url();
    gw.assert_metrics(&[
        format!(
            r#"prism_gateway_circuit_state{{upstream="users",instance="{instance}",state="open"}} 1"#
        ),
        format!(
            r#"prism_gateway_circuit_state{{upstream="users",instance="{instance}",state="closed"}} 0"#
        ),
        format!(r#"prism_gateway_circuit_opened_total{{upstream="users",instance="{instance}"}} 1"#),
    ])
    .await;
    // The upstream comes back; after the open period a probe closes the circuit.
    users.set(Mode::Ok);
    eventually("a half-open probe to close the circuit", || async {
        (gw.get("/api/users/1").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    let (_, h) = gw.get("/healthz").await;
    assert_eq!(h["upstreams"]["users"][0]["circuit"], "closed");
    assert_eq!(gw.get("/api/users/2").await.0, StatusCode::OK);
    gw.stop().await;
}

/// A client's `x-request-timeout-ms` cuts its own requests short, but the
/// instance is not blamed for them: only the upstream's configured timeout
/// counts toward opening its circuit. That holds whether the gateway's clock
/// ends the try or the upstream's does (prism's services answer 504 when the
/// time they were given runs out, often just before the gateway notices).
#[tokio::test]
async fn a_clients_short_deadline_opens_no_circuit() {
    let users = fake("users", None).await;
    let gw = users_only(&users, |s| {
        s.retries = 1;
        s.timeout_ms = 200;
        s.failures_to_open = 2;
        s.open_ms = 600_000;
    })
    .await;
    let url = format!("http://{}/api/users/1", gw.addr);
    for mode in [Mode::Hang, Mode::OutOfTime] {
        users.set(mode);
        for _ in 0..3 {
            let r = get_within(&gw.client, url.clone(), Some(20)).await;
            assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT, "{mode:?}");
        }
    }
    assert_eq!(users.hits(), 6, "no time left to retry any of them");
    users.set(Mode::Ok);
    let (s, body) = gw.get("/api/users/1").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // With the upstream's whole time, running out of it is the upstream's
    // fault: the try is retried, and the two failures open the circuit.
    users.set(Mode::OutOfTime);
    assert_eq!(gw.get("/api/users/1").await.0, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(users.hits(), 9);
    gw.assert_circuit_open("/api/users/1").await;
    gw.stop().await;
}

/// A try the gateway gives up on is given up upstream too: the gateway
/// closes that connection, so the upstream drops the request's work (its
/// handler, and with it any query it was waiting on) rather than finishing an
/// answer nobody will read. prism's services run on the same hyper server as
/// this fake.
#[tokio::test]
async fn an_abandoned_try_is_dropped_upstream() {
    let users = fake("users", None).await;
    users.set(Mode::Hang);
    let gw = users_only(&users, |s| {
        s.retries = 0;
        s.timeout_ms = 200;
    })
    .await;
    assert_eq!(gw.get("/api/users/1").await.0, StatusCode::GATEWAY_TIMEOUT);
    tokio::time::timeout(WAIT, users.state.abandoned.notified())
        .await
        .expect("the upstream kept working on a request the gateway abandoned");
    // A client's own deadline ends its tries the same way.
    let url = format!("http://{}/api/users/1", gw.addr);
    let r = get_within(&gw.client, url, Some(50)).await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    tokio::time::timeout(WAIT, users.state.abandoned.notified())
        .await
        .expect("the upstream kept working past the client's deadline");
    gw.stop().await;
}

/// The connections to an instance are capped: a request finding the only
/// one busy waits for it rather than opening another, and one finding the
/// line full too is refused at once with 503, never reaching the instance.
#[tokio::test]
async fn a_busy_instance_gets_no_more_connections_than_allowed() {
    let release = Arc::new(tokio::sync::Barrier::new(2));
    let users = fake("users", Some(release.clone())).await;
    // One worker: the limits are shared out among the workers, and with one
    // the single connection and place in line are all there is.
    let registry = users_only_registry(&users, |s| {
        s.retries = 0;
        s.max_connections = 1;
        s.max_pending_requests = Some(1);
    })
    .await;
    let gw = TestGateway::start_with(registry, Some(1)).await;
    let series = |name: &str, value: u64| {
        format!(
            r#"prism_gateway_{name}{{upstream="users",instance="{}"}} {value}"#,
            users.url()
        )
    };
    let first = held_request(&gw, &users).await;
    let url = format!("http://{}/api/users/2", gw.addr);
    let second = tokio::spawn(gw.client.get(url).send());
    eventually("the second request to wait in line", || async {
        let text = gw.send("/metrics").await.text().await.unwrap();
        text.contains(&series("upstream_pending_requests", 1))
            .then_some(())
    })
    .await;
    let (status, body) = gw.get("/api/users/3").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        body["detail"],
        "User service busy: too many requests waiting, try again"
    );
    assert_eq!(
        users.hits(),
        1,
        "only the first request reached the instance"
    );
    gw.assert_metrics(&[
        series("upstream_connections", 1),
        series("upstream_overflow_total", 1),
        series("upstream_waited_out_total", 0),
    ])
    .await;
    // The first answer frees the connection for the second request, which
    // the instance then holds at the barrier in turn.
    assert_eq!(answer(first, &release).await.status(), StatusCode::OK);
    let second = answer(second, &release).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.json::<Value>().await.unwrap()["id"], 2);
    gw.assert_metrics(&[
        series("upstream_connections", 1),
        series("upstream_pending_requests", 0),
        series("upstream_tries_total", 2),
    ])
    .await;
    gw.stop().await;
}

/// An instance whose connections break (it went away mid-answer) opens its
/// circuit; once a health check reaches it, it is let back in at once, not
/// after the open period (ten minutes here).
#[tokio::test]
async fn an_unreachable_instance_is_back_once_a_health_check_reaches_it() {
    let users = fake("users", None).await;
    users.set(Mode::Break);
    let gw = users_only(&users, |s| {
        s.retries = 0;
        s.failures_to_open = 2;
        s.open_ms = 600_000;
    })
    .await;
    for _ in 0..2 {
        let (s, body) = gw.get("/api/users/1").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    let (_, h) = gw.get("/healthz").await;
    assert_ne!(h["upstreams"]["users"][0]["circuit"], "closed", "{h}");
    users.set(Mode::Ok);
    eventually("the instance to be let back in", || async {
        (gw.get("/api/users/1").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    let (_, h) = gw.get("/healthz").await;
    assert_eq!(h["upstreams"]["users"][0]["circuit"], "closed");
    gw.stop().await;
}

/// With two workers, connections are spread over both, each sends its
/// requests out on connections of its own, and both stop with the gateway.
#[tokio::test]
async fn every_worker_serves_and_all_stop_with_the_gateway() {
    let users = fake("users", None).await;
    let gw = TestGateway::start_with(users_only_registry(&users, |_| {}).await, Some(2)).await;
    // Each request on a connection of its own: the kernel spreads new
    // connections over the workers' listeners by their addresses, so 32 of
    // them reach both workers (all on one: one chance in 2^31).
    for _ in 0..32 {
        let client = reqwest::Client::builder()
            .timeout(WAIT)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let r = client
            .get(format!("http://{}/api/users/1", gw.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // One request at a time: each worker opened one connection to the
    // users service and kept it for its next request.
    gw.assert_metrics(&[format!(
        r#"prism_gateway_upstream_connections{{upstream="users",instance="{}"}} 2"#,
        users.url()
    )])
    .await;
    let addr = gw.addr;
    gw.stop().await;
    let after = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await;
    assert!(
        matches!(after, Ok(Err(_))),
        "a worker still accepts connections"
    );
}

/// Pooled upstream connections are closed once idle for `idle_timeout_ms`
/// (hyper's pool ignores the timeout unless it is given a timer).
#[tokio::test]
async fn idle_upstream_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A bare HTTP/1.1 upstream that reports when the connection that served
    // `/users/…` is closed by the gateway.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut served_user = false;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        served_user |= buf.starts_with(b"GET /users/");
                        buf.drain(..end + 4);
                        let body = br#"{"id":1,"name":"Alice"}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(body).await;
                    }
                }
                if served_user {
                    let _ = closed_tx.send(());
                }
            });
        }
    });
    let gw = TestGateway::start(registry(
        vec![url],
        vec![dead_url().await],
        vec![dead_url().await],
        |s| s.idle_timeout_ms = 100,
    ))
    .await;
    let (status, user) = gw.get("/api/users/1").await;
    assert_eq!((status, &user["name"]), (StatusCode::OK, &json!("Alice")));
    tokio::time::timeout(WAIT, closed_rx.recv())
        .await
        .expect("the idle upstream connection was never closed")
        .unwrap();
    gw.stop().await;
    server.abort();
}

/// The products service closes the gateway's gRPC connection once it is idle
/// (its `client_idle_timeout_ms`, with health checks too far apart to keep
/// it busy): the next product request goes out on a new connection and is
/// answered.
#[tokio::test]
async fn a_products_connection_closed_as_idle_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        demo: true,
        client_idle_timeout: Duration::from_millis(100),
        ..Config::for_tests(dir.path())
    };
    let products = App::build_as(Role::Products, config).await.unwrap();
    let products_addr = products.grpc_addr();
    let products = run(products);
    // Between the gateway and the service: counts the connections open.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}", relay.local_addr().unwrap());
    let (open_tx, mut open) = tokio::sync::watch::channel((0usize, 0usize));
    let relaying = tokio::spawn(async move {
        while let Ok((mut client, _)) = relay.accept().await {
            let mut upstream =
                tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(products_addr))
                    .await
                    .expect("connecting to the products service hung")
                    .unwrap();
            open_tx.send_modify(|(accepted, open)| (*accepted, *open) = (*accepted + 1, *open + 1));
            let open_tx = open_tx.clone();
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                open_tx.send_modify(|(_, open)| *open -= 1);
            });
        }
    });
    let mut reg = registry(
        vec![dead_url().await],
        vec![dead_url().await],
        vec![relay_url],
        |_| {},
    );
    // One round of checks, at the start: none keeps the connection busy.
    reg.health_interval_ms = 3_600_000;
    let gw = TestGateway::start(reg).await;
    let all_closed = async |open: &mut tokio::sync::watch::Receiver<(usize, usize)>| {
        tokio::time::timeout(WAIT, open.wait_for(|(_, open)| *open == 0))
            .await
            .expect("the idle gRPC connection was never closed")
            .map(|seen| seen.0)
            .unwrap()
    };
    for round in 1..=2 {
        let (status, product) = gw.get("/api/products/1").await;
        assert_eq!(
            (status, &product["name"]),
            (StatusCode::OK, &json!("Widget")),
            "request {round}"
        );
        let accepted = all_closed(&mut open).await;
        assert!(
            accepted >= round,
            "{accepted} connections for {round} requests"
        );
    }
    let (_, health) = gw.get("/healthz").await;
    assert_eq!(health["upstreams"]["products"][0]["circuit"], "closed");
    gw.stop().await;
    relaying.abort();
    products.stop().await;
}

/// Instances count as healthy until checked (a fresh gateway serves at once),
/// so `/healthz` must not claim "ok" on that assumption.
#[tokio::test]
async fn healthz_says_starting_until_every_instance_was_checked() {
    // Accepts connections and never answers: the first check of this
    // instance lasts until its timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let users = fake("users", None).await;
    let gw = TestGateway::start(registry(
        vec![users.url()],
        vec![silent_url],
        vec![dead_url().await],
        |_| {},
    ))
    .await;
    let (_, h) = gw.get("/healthz").await;
    assert_eq!(h["status"], "starting", "{h}");
    eventually("the first round of checks to finish", || async {
        let (_, h) = gw.get("/healthz").await;
        (h["status"] == "degraded").then_some(())
    })
    .await;
    gw.stop().await;
    hold.abort();
}

#[tokio::test]
async fn the_user_profile_degrades_as_specified() {
    let users = fake("users", None).await;
    let gw = users_only(&users, |s| s.retries = 0).await;
    let (s, body) = gw.get("/user-profile/1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["user"]["id"], 1);
    assert_eq!(body["orders"], json!([]));
    assert_eq!(body["degraded"], json!(["orders"]));
    gw.stop().await;

    let orders = fake("orders", None).await;
    let gw = TestGateway::start(registry(
        vec![dead_url().await],
        vec![orders.url()],
        vec![dead_url().await],
        |s| s.retries = 0,
    ))
    .await;
    let (s, body) = gw.get("/user-profile/1").await;
    assert_eq!(
        (s, body),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"detail": "User service unavailable"})
        )
    );
    gw.stop().await;
}

// ---- gRPC status mapping, against a fake products service -------------------

mod fake_products {
    use prism::grpc::pb::product::{
        GetProductRequest, ListProductsRequest, Product, ProductList,
        product_service_server::ProductService,
    };
    use tonic::{Request, Response, Status};

    /// Answers GetProduct(id) with a status chosen by the id.
    pub struct Fake;

    #[tonic::async_trait]
    impl ProductService for Fake {
        async fn get_product(
            &self,
            req: Request<GetProductRequest>,
        ) -> Result<Response<Product>, Status> {
            match req.get_ref().id {
                400 => Err(Status::invalid_argument("bad id")),
                404 => Err(Status::not_found("Product 404 not found")),
                503 => Err(Status::unavailable("overloaded")),
                504 => {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    Err(Status::internal("too late"))
                }
                id => Ok(Response::new(Product {
                    id,
                    name: "Fake".into(),
                    ..Default::default()
                })),
            }
        }
        async fn list_products(
            &self,
            _: Request<ListProductsRequest>,
        ) -> Result<Response<ProductList>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn create_product(&self, _: Request<Product>) -> Result<Response<Product>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn update_product(&self, _: Request<Product>) -> Result<Response<Product>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn delete_product(
            &self,
            _: Request<GetProductRequest>,
        ) -> Result<Response<()>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }
}

/// The fake `ProductService`, reporting itself serving over
/// grpc.health.v1, on `listener`.
async fn fake_products_on(listener: tokio::net::TcpListener) {
    use prism::grpc::pb::product::product_service_server::ProductServiceServer;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ProductServiceServer<fake_products::Fake>>()
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ProductServiceServer::new(fake_products::Fake))
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
}

#[tokio::test]
async fn grpc_statuses_map_to_http_codes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    fake_products_on(listener).await;
    let gw = TestGateway::start(registry(
        vec![dead_url().await],
        vec![dead_url().await],
        vec![format!("http://{addr}")],
        |s| {
            s.retries = 1;
            s.timeout_ms = 300;
            s.failures_to_open = 100;
        },
    ))
    .await;
    assert_eq!(gw.get("/api/products/1").await.0, StatusCode::OK);
    assert_eq!(gw.get("/api/products/404").await.0, StatusCode::NOT_FOUND);
    assert_eq!(gw.get("/api/products/400").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        gw.get("/api/products/503").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        gw.get("/api/products/504").await.0,
        StatusCode::GATEWAY_TIMEOUT
    );
    gw.stop().await;
}

/// `prism up`: the whole topology from one command, reachable through the
/// gateway, events flowing between services, and a clean stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prism_up_runs_the_whole_topology() {
    let dir = tempfile::tempdir().unwrap();
    let ports = ports_outside_the_ephemeral_range(4);
    let (gateway, users, orders, products) = (ports[0], ports[1], ports[2], ports[3]);
    let mut up = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism"))
        .args([
            "up",
            "--demo",
            "--port",
            &gateway.to_string(),
            "--grpc-port",
            &products.to_string(),
        ])
        .args(["--users-url", &format!("http://127.0.0.1:{users}")])
        .args(["--orders-url", &format!("http://127.0.0.1:{orders}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env("PRISM_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env_remove("PRISM_JWT_SECRET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let base = format!("http://127.0.0.1:{gateway}");
    // The gateway starts once the services listen: its very first answer is
    // the user, not a 503 for a service still starting.
    let first = eventually("the gateway of `prism up` to answer", || async {
        client.get(format!("{base}/api/users/1")).send().await.ok()
    })
    .await;
    assert_eq!(first.status(), StatusCode::OK);
    let user: Value = first.json().await.unwrap();
    assert_eq!(user["name"], "Alice", "{user}");
    let health = json_at(&client, format!("{base}/healthz")).await;
    for service in ["users", "orders", "products"] {
        assert_eq!(health["upstreams"][service][0]["healthy"], true, "{health}");
    }
    let product: Value = client
        .get(format!("{base}/api/products/2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(product["name"], "Gadget");
    let login: Value = client
        .post(format!("{base}/auth/login"))
        .form(&[
            ("username", "alice"),
            ("password", prism::demo::ALICE_PASSWORD),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap();
    let r = client
        .post(format!("{base}/orders"))
        .bearer_auth(token)
        .json(&json!({"total": 12.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Without NATS the users service follows the orders service's feed.
    eventually("order.created to reach the users service", || async {
        let s: Value = client
            .get(format!("http://127.0.0.1:{users}/users/1/order-stats"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (s["orders"] == 2).then_some(())
    })
    .await;
    let pid = up.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), up.wait())
        .await
        .expect("prism up did not stop")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Every service stopped with it.
    assert!(
        client
            .get(format!("http://127.0.0.1:{users}/healthz"))
            .send()
            .await
            .is_err()
    );
}

/// A users service away for longer than the orders service keeps its events
/// gets a `reset` from the feed: it takes its order statistics over from the
/// orders service's totals, then follows the feed again from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_service_away_past_retention_restores_its_order_stats() {
    let dir = tempfile::tempdir().unwrap();
    let unused_users = dead_url().await;
    let orders = service_with(Role::Orders, &dir.path().join("orders"), |c| {
        c.users_url = unused_users;
        c.event_retention = Duration::ZERO;
    })
    .await;
    let orders_url = format!("http://{}", orders.http_addr());
    let orders_state = orders.state().clone();
    let domain = &orders_state.domain;
    let orders = run(orders);
    let users_dir = dir.path().join("users");
    let users_at = |orders_url: String| {
        service_with(Role::Users, &users_dir, move |c| {
            c.orders_url = orders_url;
        })
    };
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    // What the orders service holds for `user`: its own list, not the totals.
    let held = |user: i64| {
        let (client, orders_url) = (client.clone(), orders_url.clone());
        async move {
            let list = json_at(&client, format!("{orders_url}/orders?user_id={user}")).await;
            let list = list.as_array().unwrap();
            let total: f64 = list.iter().map(|o| o["total"].as_f64().unwrap()).sum();
            (list.len() as i64, (total * 100.0).round() / 100.0)
        }
    };
    let stats_reach = |users: &App, user: i64, expected: (i64, f64)| {
        let domain = users.state().domain.clone();
        async move {
            eventually(
                "the users service's statistics to match the orders",
                || async {
                    let s = domain.order_stats(user).await.ok()?;
                    ((s.orders, s.total) == expected).then_some(())
                },
            )
            .await
        }
    };

    // The totals hold up writes while they are summed: not for anyone to ask.
    let anonymous = client
        .get(format!("{orders_url}/order-stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let as_user = client
        .get(format!("{orders_url}/order-stats"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap();
    assert_eq!(as_user.status(), StatusCode::FORBIDDEN);

    let first = users_at(orders_url.clone()).await;
    domain
        .insert_order(1, 10.25, OrderStatus::Pending)
        .await
        .unwrap();
    stats_reach(&first, 1, held(1).await).await;
    run(first).stop().await;

    // Away: orders for two users, then retention takes every event.
    for (user, total) in [(1, 2.5), (2, 7.0), (2, 1.75)] {
        domain
            .insert_order(user, total, OrderStatus::Pending)
            .await
            .unwrap();
    }
    assert!(domain.events().enforce_retention().await.unwrap() > 0);
    let missed = domain.events().read_stored(0, 100).await.unwrap();
    assert!(missed.is_empty(), "{missed:?}");

    let back = users_at(orders_url.clone()).await;
    for user in [1, 2] {
        stats_reach(&back, user, held(user).await).await;
    }
    // And the feed goes on after the totals.
    domain
        .insert_order(2, 4.0, OrderStatus::Completed)
        .await
        .unwrap();
    stats_reach(&back, 2, held(2).await).await;
    run(back).stop().await;
    orders.stop().await;
}

/// An object's field names, in the order the body wrote them.
fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}
