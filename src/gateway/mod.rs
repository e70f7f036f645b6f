//! `prism gateway`: the seed's API gateway made resilient (SPEC §8).
//!
//! Upstreams come from a registry ([`registry`]); each has health-checked,
//! load-balanced instances with circuit breakers ([`breaker`]) and a call loop
//! with timeouts, a deadline, and budgeted retries for idempotent requests
//! only ([`upstream`], [`retry`]). Products are reached over gRPC and their
//! statuses mapped to HTTP. `x-request-id` and W3C `traceparent` are passed to
//! every upstream.

pub mod breaker;
mod pool;
pub mod registry;
pub mod retry;
pub mod upstream;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::TokenKeys,
    grpc::pb::product::{
        GetProductRequest, ListProductsRequest, product_service_client::ProductServiceClient,
    },
    http::{error::detail, extract::bearer_token},
};
use registry::Registry;
use upstream::{CallCtx, Failure, HttpAnswer, Upstream};

/// Shared by every request (one reference count to clone per request).
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

pub struct Inner {
    pub users: Arc<Upstream>,
    pub orders: Arc<Upstream>,
    pub products: Arc<Upstream>,
    deadline: Duration,
    keys: TokenKeys,
    requests: Arc<
        prometheus_client::metrics::family::Family<
            GatewayLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    >,
    registry: Arc<parking_lot::Mutex<prometheus_client::registry::Registry>>,
    /// Each route's count of 200 answers, looked up once: the labelled
    /// family hashes its labels on every lookup.
    ok: Vec<prometheus_client::metrics::counter::Counter>,
}

/// The gateway's routes, as its metrics label them.
#[derive(Debug, Clone, Copy)]
enum Route {
    User,
    Order,
    UserOrders,
    Profile,
    Orders,
    Register,
    Login,
    Product,
    Products,
}

impl Route {
    const ALL: [Route; 9] = [
        Route::User,
        Route::Order,
        Route::UserOrders,
        Route::Profile,
        Route::Orders,
        Route::Register,
        Route::Login,
        Route::Product,
        Route::Products,
    ];

    fn path(self) -> &'static str {
        match self {
            Route::User => "/api/users/{id}",
            Route::Order => "/api/orders/{id}",
            Route::UserOrders => "/api/user-orders/{user_id}",
            Route::Profile => "/user-profile/{user_id}",
            Route::Orders => "/orders",
            Route::Register => "/auth/register",
            Route::Login => "/auth/login",
            Route::Product => "/api/products/{id}",
            Route::Products => "/api/products",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct GatewayLabels {
    route: &'static str,
    status: u16,
}

impl std::ops::Deref for Gateway {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Gateway {
    pub fn new(registry: &Registry, keys: TokenKeys) -> anyhow::Result<Gateway> {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let upstream = |name: &str, grpc: bool| {
            let spec = registry.services[name].clone();
            Arc::new(Upstream::new(name, spec, grpc, http.clone()))
        };
        let requests = Arc::new(prometheus_client::metrics::family::Family::<
            GatewayLabels,
            prometheus_client::metrics::counter::Counter,
        >::default());
        let mut metrics = prometheus_client::registry::Registry::with_prefix("prism_gateway");
        metrics.register(
            "requests",
            "Gateway requests by route and status",
            (*requests).clone(),
        );
        let ok = Route::ALL
            .iter()
            .map(|r| {
                requests
                    .get_or_create(&GatewayLabels {
                        route: r.path(),
                        status: 200,
                    })
                    .clone()
            })
            .collect();
        Ok(Gateway(Arc::new(Inner {
            users: upstream("users", false),
            orders: upstream("orders", false),
            products: upstream("products", true),
            deadline: Duration::from_millis(registry.deadline_ms),
            keys,
            requests,
            registry: Arc::new(parking_lot::Mutex::new(metrics)),
            ok,
        })))
    }

    /// Starts the health checkers; they stop with `stop`.
    pub fn spawn_health_checks(
        &self,
        every: Duration,
        stop: &CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) {
        for u in [&self.users, &self.orders, &self.products] {
            tracker.spawn(u.clone().run_health_checks(every, stop.clone()));
        }
    }

    fn ctx(&self, headers: &HeaderMap) -> CallCtx {
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .map(str::to_owned)
            .unwrap_or_else(|| upstream::next_id(32));
        // traceparent: 00-<32 hex trace id>-<16 hex parent>-<2 hex flags>
        let incoming = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|tp| {
                let parts: Vec<&str> = tp.split('-').collect();
                (parts.len() == 4
                    && parts[1].len() == 32
                    && parts[1].chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| (parts[1].to_owned(), parts[3] == "01"))
            });
        let (trace_id, sampled) = incoming.unwrap_or_else(|| (upstream::next_id(32), true));
        CallCtx {
            deadline: std::time::Instant::now() + self.deadline,
            request_id,
            trace_id,
            sampled,
        }
    }

    fn count(&self, route: Route, r: &Response) {
        let status = r.status().as_u16();
        if status == 200 {
            self.ok[route as usize].inc();
        } else {
            self.requests
                .get_or_create(&GatewayLabels {
                    route: route.path(),
                    status,
                })
                .inc();
        }
    }
}

/// Every proxied request's context, read from its headers without copying
/// them.
impl axum::extract::FromRequestParts<Gateway> for CallCtx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        g: &Gateway,
    ) -> Result<CallCtx, Self::Rejection> {
        Ok(g.ctx(&parts.headers))
    }
}

/// The upstream's answer, passed through with its status and body.
fn pass(answer: HttpAnswer, request_id: &str) -> Response {
    let mut r = (
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY),
        answer.body,
    )
        .into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, answer.content_type);
    with_request_id(r, request_id)
}

fn with_request_id(mut r: Response, request_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

fn failed(service: &str, f: &Failure) -> Response {
    let status = StatusCode::from_u16(f.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let text = match f {
        Failure::CircuitOpen => format!("{service} service unavailable (circuit open)"),
        Failure::Timeout | Failure::DeadlineExceeded => format!("{service} service timed out"),
        _ => format!("{service} service unavailable"),
    };
    detail(status, text)
}

/// A GET passed through to one upstream, its answer returned as it came.
async fn pass_get(
    g: &Gateway,
    upstream: &Upstream,
    service: &str,
    route: Route,
    path: &str,
    ctx: CallCtx,
) -> Response {
    let r = match upstream
        .http(&ctx, reqwest::Method::GET, path, &[], None)
        .await
    {
        Ok(a) => pass(a, &ctx.request_id),
        Err(f) => with_request_id(failed(service, &f), &ctx.request_id),
    };
    g.count(route, &r);
    r
}

async fn get_user(State(g): State<Gateway>, ctx: CallCtx, Path(id): Path<i64>) -> Response {
    pass_get(
        &g,
        &g.users,
        "User",
        Route::User,
        &format!("/users/{id}"),
        ctx,
    )
    .await
}

async fn get_order(State(g): State<Gateway>, ctx: CallCtx, Path(id): Path<i64>) -> Response {
    pass_get(
        &g,
        &g.orders,
        "Order",
        Route::Order,
        &format!("/orders/{id}"),
        ctx,
    )
    .await
}

type Fetched = Result<HttpAnswer, Failure>;

/// A user and their orders, fetched from the two services in parallel.
async fn user_and_orders(g: &Gateway, ctx: &CallCtx, id: i64) -> (Fetched, Fetched) {
    let (user_path, orders_path) = (
        format!("/users/{id}"),
        format!("/orders?user_id={id}&limit=1000"),
    );
    tokio::join!(
        g.users
            .http(ctx, reqwest::Method::GET, &user_path, &[], None),
        g.orders
            .http(ctx, reqwest::Method::GET, &orders_path, &[], None),
    )
}

/// The user and their orders, fetched in parallel.
async fn user_orders(State(g): State<Gateway>, ctx: CallCtx, Path(id): Path<i64>) -> Response {
    let (user, orders) = user_and_orders(&g, &ctx, id).await;
    let r = match (user, orders) {
        (Ok(u), _) if u.status != 200 => pass(u, &ctx.request_id),
        (_, Ok(o)) if o.status != 200 => pass(o, &ctx.request_id),
        (Ok(u), Ok(o)) => with_request_id(
            axum::Json(json!({"user": u.json(), "orders": o.json()})).into_response(),
            &ctx.request_id,
        ),
        (Err(f), _) => with_request_id(failed("User", &f), &ctx.request_id),
        (_, Err(f)) => with_request_id(failed("Order", &f), &ctx.request_id),
    };
    g.count(Route::UserOrders, &r);
    r
}

/// The seed's profile, degrading gracefully: without the users service there
/// is no profile (503); without the orders service the profile says so.
async fn user_profile(State(g): State<Gateway>, ctx: CallCtx, Path(id): Path<i64>) -> Response {
    let (user, orders) = user_and_orders(&g, &ctx, id).await;
    let r = match user {
        Err(_) => detail(StatusCode::SERVICE_UNAVAILABLE, "User service unavailable"),
        Ok(u) if u.status != 200 => pass(u, &ctx.request_id),
        Ok(u) => match orders {
            Ok(o) if o.status == 200 => {
                axum::Json(json!({"user": u.json(), "orders": o.json()})).into_response()
            }
            _ => axum::Json(json!({"user": u.json(), "orders": [], "degraded": ["orders"]}))
                .into_response(),
        },
    };
    let r = with_request_id(r, &ctx.request_id);
    g.count(Route::Profile, &r);
    r
}

/// Forwards a write to `upstream` once: a POST is never retried (it may have
/// been applied).
async fn forward_post(
    g: &Gateway,
    upstream: &Upstream,
    service: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let ctx = g.ctx(headers);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let mut extra = Vec::new();
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        extra.push(("authorization", auth.to_owned()));
    }
    match upstream
        .http(
            &ctx,
            reqwest::Method::POST,
            path,
            &extra,
            Some((body, content_type)),
        )
        .await
    {
        Ok(a) => pass(a, &ctx.request_id),
        Err(f) => with_request_id(failed(service, &f), &ctx.request_id),
    }
}

async fn create_order(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    // Refuse a bad token here, without troubling the orders service.
    let r = match bearer_token(&headers).map(|t| g.keys.verify(t)) {
        None | Some(Err(_)) => {
            let mut r = detail(StatusCode::UNAUTHORIZED, "Not authenticated");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        Some(Ok(_)) => forward_post(&g, &g.orders, "Order", "/orders", &headers, body).await,
    };
    g.count(Route::Orders, &r);
    r
}

async fn register(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let r = forward_post(&g, &g.users, "User", "/auth/register", &headers, body).await;
    g.count(Route::Register, &r);
    r
}

async fn login(
    State(g): State<Gateway>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Bytes,
) -> Response {
    let path = match uri.query() {
        Some(q) => format!("/auth/login?{q}"),
        None => "/auth/login".to_owned(),
    };
    let r = forward_post(&g, &g.users, "User", &path, &headers, body).await;
    g.count(Route::Login, &r);
    r
}

/// gRPC status → HTTP status, as SPEC §8 lists.
pub fn grpc_to_http(code: tonic::Code) -> StatusCode {
    match code {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::AlreadyExists => StatusCode::CONFLICT,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// One gRPC call through the products upstream; UNAVAILABLE and
/// DEADLINE_EXCEEDED are the upstream failing (retried, counted by the
/// breaker), other statuses are its answer.
async fn products_call<T, F, Fut>(
    g: &Gateway,
    ctx: &CallCtx,
    call: F,
) -> Result<Result<T, tonic::Status>, Failure>
where
    F: Fn(ProductServiceClient<tonic::transport::Channel>, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    g.products
        .call(ctx, true, |instance, timeout| {
            let channel = instance.channel();
            let call = &call;
            async move {
                let client = ProductServiceClient::new(channel?);
                match call(client, timeout).await {
                    Ok(v) => Ok(Ok(v)),
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        Err(Failure::Unavailable(s.message().to_owned()))
                    }
                    // The server enforces the grpc-timeout the gateway sent and
                    // answers CANCELLED ("Timeout expired"): a timeout either way.
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                        ) =>
                    {
                        Err(Failure::Timeout)
                    }
                    Err(s) => Ok(Err(s)),
                }
            }
        })
        .await
}

fn grpc_request<T>(ctx: &CallCtx, msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    // grpc-timeout: the upstream learns how long it has.
    r.set_timeout(timeout.min(ctx.remaining()));
    if let Ok(v) = ctx.request_id.parse() {
        r.metadata_mut().insert("x-request-id", v);
    }
    if let Ok(v) = ctx.traceparent().parse() {
        r.metadata_mut().insert("traceparent", v);
    }
    r
}

fn product_json(p: &crate::grpc::pb::product::Product) -> Value {
    let category = crate::grpc::pb::product::Category::try_from(p.category)
        .map(|c| c.as_str_name())
        .unwrap_or("UNKNOWN");
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "price": p.price.as_ref().map(|pr| json!({"amount": pr.amount, "currency": pr.currency})),
        "category": category,
        "tags": p.tags,
        "metadata": p.metadata,
    })
}

fn grpc_failed(s: &tonic::Status) -> Response {
    detail(grpc_to_http(s.code()), s.message())
}

async fn get_product(State(g): State<Gateway>, ctx: CallCtx, Path(id): Path<i32>) -> Response {
    let r = match products_call(&g, &ctx, |mut c, t| {
        let req = grpc_request(&ctx, GetProductRequest { id }, t);
        async move { c.get_product(req).await.map(|r| r.into_inner()) }
    })
    .await
    {
        Ok(Ok(p)) => axum::Json(product_json(&p)).into_response(),
        Ok(Err(s)) => grpc_failed(&s),
        Err(f) => failed("Product", &f),
    };
    let r = with_request_id(r, &ctx.request_id);
    g.count(Route::Product, &r);
    r
}

#[derive(Debug, Deserialize)]
struct ProductsQuery {
    page: Option<i32>,
    page_size: Option<i32>,
    category: Option<String>,
}

async fn list_products(
    State(g): State<Gateway>,
    ctx: CallCtx,
    Query(q): Query<ProductsQuery>,
) -> Response {
    let category = match q.category.as_deref() {
        None => None,
        Some(c) => match crate::grpc::pb::product::Category::from_str_name(&c.to_uppercase()) {
            Some(c) => Some(c as i32),
            None => {
                let r = detail(StatusCode::BAD_REQUEST, format!("Unknown category {c:?}"));
                g.count(Route::Products, &r);
                return r;
            }
        },
    };
    let request = ListProductsRequest {
        page: q.page.unwrap_or(1),
        page_size: q.page_size.unwrap_or(0),
        category,
    };
    let r = match products_call(&g, &ctx, |mut c, t| {
        let req = grpc_request(&ctx, request, t);
        async move { c.list_products(req).await.map(|r| r.into_inner()) }
    })
    .await
    {
        Ok(Ok(list)) => {
            let items: Vec<Value> = list.products.iter().map(product_json).collect();
            let mut r = axum::Json(items).into_response();
            r.headers_mut()
                .insert("x-total-count", HeaderValue::from(list.total_count));
            r
        }
        Ok(Err(s)) => grpc_failed(&s),
        Err(f) => failed("Product", &f),
    };
    let r = with_request_id(r, &ctx.request_id);
    g.count(Route::Products, &r);
    r
}

/// Each upstream instance's health and circuit state.
async fn healthz(State(g): State<Gateway>) -> Response {
    let upstreams = json!({
        "users": g.users.status(),
        "orders": g.orders.status(),
        "products": g.products.status(),
    });
    let all = [&g.users, &g.orders, &g.products];
    let status = if !all.iter().all(|u| u.checked()) {
        "starting"
    } else if all
        .iter()
        .all(|u| u.instances().iter().any(|i| i.healthy()))
    {
        "ok"
    } else {
        "degraded"
    };
    axum::Json(json!({
        "status": status,
        "upstreams": upstreams,
    }))
    .into_response()
}

async fn metrics(State(g): State<Gateway>) -> Response {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &g.registry.lock());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

pub fn router(g: Gateway) -> Router {
    Router::new()
        .route("/api/users/{id}", get(get_user))
        .route("/api/orders/{id}", get(get_order))
        .route("/api/user-orders/{user_id}", get(user_orders))
        .route("/user-profile/{user_id}", get(user_profile))
        .route("/orders", post(create_order))
        .route("/auth/register", post(register))
        .route("/auth/login", post(login))
        .route("/api/products/{id}", get(get_product))
        .route("/api/products", get(list_products))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
        .with_state(g)
}

/// The running gateway: bound listener, upstreams, health checkers.
pub struct GatewayApp {
    listener: tokio::net::TcpListener,
    addr: std::net::SocketAddr,
    gateway: Gateway,
    health_every: Duration,
    shutdown_timeout: Duration,
}

impl GatewayApp {
    pub async fn build(config: &crate::Config, registry: &Registry) -> anyhow::Result<GatewayApp> {
        let keys = TokenKeys::load(
            config.jwt_secret.as_deref(),
            &config.data_dir,
            config.token_ttl,
        )?;
        let gateway = Gateway::new(registry, keys)?;
        let addr = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr()?;
        Ok(GatewayApp {
            listener,
            addr,
            gateway,
            health_every: Duration::from_millis(registry.health_interval_ms.max(50)),
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let workers = tokio_util::task::TaskTracker::new();
        self.gateway
            .spawn_health_checks(self.health_every, &stop, &workers);
        tracing::info!(addr = %self.addr, "gateway listening on http://{}", self.addr);
        let app = router(self.gateway.clone());
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, app).with_graceful_shutdown({
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.cancel();
            }
        });
        let mut server = tokio::spawn(async move { server.await });
        tokio::select! {
            res = &mut server => { res??; }
            _ = stop.cancelled() => {
                if tokio::time::timeout(self.shutdown_timeout, &mut server).await.is_err() {
                    tracing::warn!("drain timed out");
                    server.abort();
                }
            }
        }
        stop.cancel();
        workers.close();
        workers.wait().await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    /// `Inner::ok` is indexed by a route's discriminant and built from `ALL`.
    #[test]
    fn all_routes_are_listed_in_declaration_order() {
        for (i, r) in Route::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let paths: std::collections::HashSet<_> = Route::ALL.iter().map(|r| r.path()).collect();
        assert_eq!(paths.len(), Route::ALL.len(), "one label per route");
    }
}
