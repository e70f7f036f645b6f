//! `prism gateway`: the seed's API gateway made resilient (SPEC §8).
//!
//! Upstreams come from a registry ([`registry`]); each has health-checked,
//! load-balanced instances with circuit breakers ([`breaker`]) and a call loop
//! with timeouts, a deadline, and budgeted retries for idempotent requests
//! only ([`upstream`], [`retry`]). Products are reached over gRPC and their
//! statuses mapped to HTTP. `x-request-id` and W3C `traceparent` are passed to
//! every upstream.

pub mod breaker;
mod docs;
pub mod registry;
pub mod retry;
pub mod upstream;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    http::{
        HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header, request::Parts,
    },
    response::{IntoResponse, Response},
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::TokenKeys,
    forwarded::X_FORWARDED_FOR,
    grpc::pb::product::{
        GetProductRequest, ListProductsRequest, product_service_client::ProductServiceClient,
    },
    http::{
        error::{ApiError, detail, not_an_integer_path_param, unprocessable},
        extract::{bearer_token, parse_urlencoded},
    },
    trace::{self, TRACEPARENT, X_REQUEST_ID, X_REQUEST_TIMEOUT_MS},
};
use registry::Registry;
use upstream::{CallCtx, Failure, HttpAnswer, Upstream, UpstreamMetrics};

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
    docs: docs::Docs,
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

    /// The route whose pattern `path` matches, and the value of its one
    /// parameter (empty for a route without one). A parameter is one
    /// non-empty path segment.
    fn find(path: &str) -> Option<(Route, &str)> {
        // Where each pattern's parameter starts, found at compile time
        // rather than searched for on every request.
        const LITERAL: [usize; Route::ALL.len()] = {
            let mut out = [0; Route::ALL.len()];
            let mut i = 0;
            while i < out.len() {
                let p = Route::ALL[i].path().as_bytes();
                while out[i] < p.len() && p[out[i]] != b'{' {
                    out[i] += 1;
                }
                i += 1;
            }
            out
        };
        Route::ALL.into_iter().zip(LITERAL).find_map(|(r, n)| {
            let pattern = r.path();
            if n == pattern.len() {
                return (path == pattern).then_some((r, ""));
            }
            path.strip_prefix(&pattern[..n])
                .filter(|param| !param.is_empty() && !param.contains('/'))
                .map(|param| (r, param))
        })
    }

    /// The name of the route's parameter, for errors that point at it.
    fn param_name(self) -> &'static str {
        let pattern = self.path();
        pattern
            .find('{')
            .map_or("", |i| pattern[i + 1..].trim_end_matches('}'))
    }

    fn is_write(self) -> bool {
        matches!(self, Route::Orders | Route::Register | Route::Login)
    }

    fn allows(self, method: &Method) -> bool {
        match self.is_write() {
            true => method == Method::POST,
            false => method == Method::GET || method == Method::HEAD,
        }
    }

    /// The `allow` header of a 405 for this route.
    fn allow(self) -> &'static str {
        if self.is_write() { "POST" } else { "GET,HEAD" }
    }

    const fn path(self) -> &'static str {
        match self {
            Route::User => "/api/users/{user_id}",
            Route::Order => "/api/orders/{order_id}",
            Route::UserOrders => "/api/user-orders/{user_id}",
            Route::Profile => "/user-profile/{user_id}",
            Route::Orders => "/orders",
            Route::Register => "/auth/register",
            Route::Login => "/auth/login",
            Route::Product => "/api/products/{product_id}",
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
    /// `workers`: how many threads serve the gateway, each with its own
    /// connections to the upstreams.
    pub fn new(registry: &Registry, keys: TokenKeys, workers: usize) -> anyhow::Result<Gateway> {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let upstream = |name: &str, grpc: bool| {
            let spec = registry.services[name].clone();
            Arc::new(Upstream::new(name, spec, grpc, http.clone(), workers))
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
        let (users, orders, products) = (
            upstream("users", false),
            upstream("orders", false),
            upstream("products", true),
        );
        metrics.register_collector(Box::new(UpstreamMetrics(vec![
            users.clone(),
            orders.clone(),
            products.clone(),
        ])));
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
            users,
            orders,
            products,
            deadline: Duration::from_millis(registry.deadline_ms),
            keys,
            requests,
            registry: Arc::new(parking_lot::Mutex::new(metrics)),
            ok,
            docs: docs::Docs::new(),
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

    fn ctx(&self, headers: &HeaderMap, client: &HeaderValue) -> CallCtx {
        // One pass over the client's few headers costs less than two
        // lookups, each hashing its name.
        let (mut request_id, mut traceparent, mut time_given) = (None, None, None);
        let mut forwarded = false;
        for (name, value) in headers {
            if *name == X_REQUEST_ID {
                request_id.get_or_insert(value);
            } else if *name == TRACEPARENT {
                traceparent.get_or_insert(value);
            } else if *name == X_REQUEST_TIMEOUT_MS {
                time_given.get_or_insert(value);
            } else if *name == X_FORWARDED_FOR {
                forwarded = true;
            }
        }
        // The client's address goes after any a proxy in front of the
        // gateway wrote; the services decide which of them to believe.
        let forwarded_for = if forwarded {
            forwarded_for(headers, client)
        } else {
            client.clone()
        };
        // A client that says how long it will wait (another gateway, say)
        // shortens the deadline; it cannot lengthen it.
        let time = time_given
            .and_then(trace::time_given)
            .map_or(self.deadline, |t| self.deadline.min(t));
        let (trace_id, sampled) = traceparent
            .and_then(|v| trace::parse_traceparent(v.as_bytes()))
            .unwrap_or_else(|| (trace::new_id32(), true));
        // A request without an id is known by its trace id, as a tracing
        // backend shows it: one id to search the logs of every service for.
        let request_id = request_id
            .filter(|v| !v.is_empty() && v.len() <= 200 && v.to_str().is_ok())
            .cloned()
            .unwrap_or_else(|| {
                // Owned by a shared buffer: cloned for the upstream and the
                // answer, a count to bump rather than a copy to make.
                HeaderValue::from_maybe_shared(Bytes::from_owner(trace_id))
                    .expect("hex is a valid header value")
            });
        CallCtx {
            deadline: std::time::Instant::now() + time,
            forwarded_for,
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

/// The `x-forwarded-for` a request arrived with, with `client` appended.
fn forwarded_for(headers: &HeaderMap, client: &HeaderValue) -> HeaderValue {
    let mut v = Vec::new();
    for line in headers.get_all(X_FORWARDED_FOR) {
        v.extend_from_slice(line.as_bytes());
        v.extend_from_slice(b", ");
    }
    v.extend_from_slice(client.as_bytes());
    HeaderValue::from_bytes(&v).unwrap_or_else(|_| client.clone())
}

/// The upstream's answer, passed through as a reverse proxy passes it: its
/// status, its end-to-end headers (`location`, `www-authenticate`, `etag`,
/// `retry-after`, ...) and its body, with the request's `x-request-id`.
fn pass(answer: HttpAnswer, request_id: &HeaderValue) -> Response {
    let mut r = Response::new(axum::body::Body::from(answer.body));
    *r.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = r.headers_mut();
    *h = answer.headers;
    // One pass over the names decides both what to strip and whether the
    // upstream echoed the request's id, as prism's services do; most
    // answers then need no change at all.
    let (mut hop_by_hop, mut ids, mut echoed) = (false, 0, false);
    for (name, value) in h.iter() {
        if *name == X_REQUEST_ID {
            ids += 1;
            echoed = value == request_id;
        } else if HOP_BY_HOP.contains(name) {
            hop_by_hop = true;
        }
    }
    if hop_by_hop {
        strip_hop_by_hop(h);
    }
    if ids != 1 || !echoed {
        h.insert(X_REQUEST_ID, request_id.clone());
    }
    r
}

/// Headers that describe one connection (RFC 9110 §7.6.1), besides those
/// a `connection` header names.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes the hop-by-hop headers: the upstream's connection is not the
/// client's. The body was read whole, so its `transfer-encoding` no longer
/// applies either; the client's answer is framed afresh.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

fn with_request_id(mut r: Response, request_id: &HeaderValue) -> Response {
    r.headers_mut().insert(X_REQUEST_ID, request_id.clone());
    r
}

fn failed(service: &str, f: &Failure) -> Response {
    let status = StatusCode::from_u16(f.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let text = match f {
        Failure::CircuitOpen => format!("{service} service unavailable (circuit open)"),
        Failure::Timeout | Failure::DeadlineExceeded => format!("{service} service timed out"),
        Failure::WaitedOut(_) => {
            format!("{service} service busy: no connection free in time, try again")
        }
        Failure::Local(_) => "gateway overloaded: out of connections, try again".to_owned(),
        Failure::Busy(_) => format!("{service} service busy: too many requests waiting, try again"),
        Failure::BadAnswer(_) => format!("{service} service answer too large"),
        _ => format!("{service} service unavailable"),
    };
    detail(status, text)
}

/// `prefix` and `id`, the path of one item (without `format!`'s machinery:
/// it is on every proxied read).
fn id_path(prefix: &str, id: i64) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(id);
    let mut path = String::with_capacity(prefix.len() + digits.len());
    path.push_str(prefix);
    path.push_str(digits);
    path
}

/// A GET passed through to one upstream, its answer returned as it came.
async fn pass_get(upstream: &Upstream, service: &str, path: String, ctx: &CallCtx) -> Response {
    match upstream.http(ctx, Method::GET, path, &[], None).await {
        Ok(a) => pass(a, &ctx.request_id),
        Err(f) => with_request_id(failed(service, &f), &ctx.request_id),
    }
}

type Fetched = Result<HttpAnswer, Failure>;

/// A user and their orders, fetched from the two services in parallel.
async fn user_and_orders(g: &Gateway, ctx: &CallCtx, id: i64) -> (Fetched, Fetched) {
    tokio::join!(
        g.users
            .http(ctx, Method::GET, id_path("/users/", id), &[], None),
        g.orders.http(
            ctx,
            Method::GET,
            format!("/orders?user_id={id}&limit=1000"),
            &[],
            None
        ),
    )
}

/// The user and their orders, fetched in parallel.
async fn user_orders(g: &Gateway, ctx: &CallCtx, id: i64) -> Response {
    let (user, orders) = user_and_orders(g, ctx, id).await;
    match (user, orders) {
        (Ok(u), _) if u.status != 200 => pass(u, &ctx.request_id),
        (_, Ok(o)) if o.status != 200 => pass(o, &ctx.request_id),
        (Ok(u), Ok(o)) => with_request_id(
            axum::Json(json!({"user": u.json(), "orders": o.json()})).into_response(),
            &ctx.request_id,
        ),
        (Err(f), _) => with_request_id(failed("User", &f), &ctx.request_id),
        (_, Err(f)) => with_request_id(failed("Order", &f), &ctx.request_id),
    }
}

/// The seed's profile, degrading gracefully: without the users service there
/// is no profile (503); without the orders service the profile says so.
async fn user_profile(g: &Gateway, ctx: &CallCtx, id: i64) -> Response {
    let (user, orders) = user_and_orders(g, ctx, id).await;
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
    with_request_id(r, &ctx.request_id)
}

/// Forwards a write to `upstream` once: a POST is never retried (it may have
/// been applied). Passes on the body's type and the caller's token.
async fn forward_post(
    upstream: &Upstream,
    service: &str,
    path: String,
    ctx: &CallCtx,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let extra: Vec<_> = headers
        .get(header::AUTHORIZATION)
        .map(|auth| (header::AUTHORIZATION, auth.clone()))
        .into_iter()
        .collect();
    match upstream
        .http(ctx, Method::POST, path, &extra, Some((body, content_type)))
        .await
    {
        Ok(a) => pass(a, &ctx.request_id),
        Err(f) => with_request_id(failed(service, &f), &ctx.request_id),
    }
}

/// `POST /orders`: a bad token is refused here, without troubling the orders
/// service.
async fn create_order(g: &Gateway, ctx: &CallCtx, headers: &HeaderMap, body: Bytes) -> Response {
    match bearer_token(headers).map(|t| g.keys.verify(t)) {
        None | Some(Err(_)) => {
            let mut r = detail(StatusCode::UNAUTHORIZED, "Not authenticated");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        Some(Ok(_)) => forward_post(&g.orders, "Order", "/orders".into(), ctx, headers, body).await,
    }
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

/// One gRPC call through the products upstream; see [`grpc_failure`] for
/// which statuses are the upstream failing rather than answering.
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
        .call(ctx, true, |instance, timeout, _| {
            let channel = instance.channel();
            let call = &call;
            async move {
                let client = ProductServiceClient::new(channel?);
                match call(client, timeout).await {
                    Ok(v) => Ok(Ok(v)),
                    Err(s) => grpc_failure(&s).map_or(Ok(Err(s)), Err),
                }
            }
        })
        .await
}

/// Whether a status from a products call is the upstream failing (retried,
/// counted by its breaker) rather than its answer.
fn grpc_failure(s: &tonic::Status) -> Option<Failure> {
    match s.code() {
        // The server enforces the grpc-timeout the gateway sent: prism
        // answers DEADLINE_EXCEEDED, a server on tonic's own CANCELLED
        // ("Timeout expired"). A timeout either way.
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Some(Failure::Timeout),
        // A status with a source was made here, from a transport error: no
        // connection, or it broke (UNKNOWN when tonic has no better code).
        // One without came from the service.
        tonic::Code::Unavailable | tonic::Code::Unknown
            if std::error::Error::source(s).is_some() =>
        {
            Some(Failure::Connect(s.message().to_owned()))
        }
        tonic::Code::Unavailable => Some(Failure::Unavailable(s.message().to_owned())),
        _ => None,
    }
}

fn grpc_request<T>(ctx: &CallCtx, msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    // grpc-timeout: the upstream learns how long it has.
    r.set_timeout(timeout.min(ctx.remaining()));
    if let Some(v) = ctx.request_id.to_str().ok().and_then(|v| v.parse().ok()) {
        r.metadata_mut().insert("x-request-id", v);
    }
    if let Some(v) = ctx.traceparent().to_str().ok().and_then(|v| v.parse().ok()) {
        r.metadata_mut().insert("traceparent", v);
    }
    if let Some(v) = ctx.forwarded_for.to_str().ok().and_then(|v| v.parse().ok()) {
        r.metadata_mut().insert("x-forwarded-for", v);
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

async fn get_product(g: &Gateway, ctx: &CallCtx, id: i32) -> Response {
    let r = match products_call(g, ctx, |mut c, t| {
        let req = grpc_request(ctx, GetProductRequest { id }, t);
        async move { c.get_product(req).await.map(|r| r.into_inner()) }
    })
    .await
    {
        Ok(Ok(p)) => axum::Json(product_json(&p)).into_response(),
        Ok(Err(s)) => grpc_failed(&s),
        Err(f) => failed("Product", &f),
    };
    with_request_id(r, &ctx.request_id)
}

#[derive(Debug, Deserialize)]
struct ProductsQuery {
    page: Option<i32>,
    page_size: Option<i32>,
    category: Option<String>,
}

async fn list_products(g: &Gateway, ctx: &CallCtx, query: Option<&str>) -> Response {
    let q: ProductsQuery = match parse_urlencoded(query.unwrap_or("").as_bytes(), "query") {
        Ok(q) => q,
        Err(r) => return r,
    };
    let category = match q.category.as_deref() {
        None => None,
        Some(c) => match crate::grpc::pb::product::Category::from_str_name(&c.to_uppercase()) {
            Some(c) => Some(c as i32),
            // A 422 at the parameter, as every other query error here and
            // `prism serve`'s own `/products/?category=` answer it.
            None => {
                return unprocessable(
                    vec!["query".into(), "category".into()],
                    "enum",
                    "Input should be 'ELECTRONICS', 'CLOTHING', 'FOOD' or 'BOOKS'",
                );
            }
        },
    };
    let request = ListProductsRequest {
        page: q.page.unwrap_or(1),
        page_size: q.page_size.unwrap_or(0),
        category,
    };
    let r = match products_call(g, ctx, |mut c, t| {
        let req = grpc_request(ctx, request, t);
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
    with_request_id(r, &ctx.request_id)
}

/// Each upstream instance's health and circuit state.
fn healthz(g: &Gateway) -> Response {
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

fn metrics(g: &Gateway) -> Response {
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

/// Bodies the gateway forwards are at most this large (the same limit as
/// axum's default, which the gateway used before it served HTTP itself).
const MAX_BODY: usize = 2 * 1024 * 1024;

/// The whole body of a request, or the error answer if it is too large or
/// broken off.
async fn read_body<B>(body: B) -> Result<Bytes, Response>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A declared length over the limit is refused before any of it is read.
    if body.size_hint().lower() > MAX_BODY as u64 {
        return Err(ApiError::payload_too_large().into_response());
    }
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large().into_response())
        }
        Err(e) => Err(detail(
            StatusCode::BAD_REQUEST,
            format!("Failed to read the request body: {e}"),
        )),
    }
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

impl Gateway {
    /// Answers one request. The gateway's few routes are matched on their
    /// patterns directly rather than through a router: on a proxy's hot path
    /// a router's per-request bookkeeping was a sixth of the gateway's own
    /// work.
    /// `client` is the address of the connection's peer, as a header value.
    pub async fn handle(&self, req: Request<Incoming>, client: &HeaderValue) -> Response {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let Some((route, param)) = Route::find(path) else {
            let get = matches!(parts.method, Method::GET | Method::HEAD);
            return match path {
                "/healthz" if get => healthz(self),
                "/metrics" if get => metrics(self),
                "/healthz" | "/metrics" => method_not_allowed("GET,HEAD"),
                _ if docs::Docs::serves(path) => {
                    self.docs.answer(Request::from_parts(parts, body)).await
                }
                _ => detail(StatusCode::NOT_FOUND, "Not Found"),
            };
        };
        let r = if route.allows(&parts.method) {
            self.route(route, param, &parts, body, client).await
        } else {
            method_not_allowed(route.allow())
        };
        self.count(route, &r);
        r
    }

    async fn route(
        &self,
        route: Route,
        param: &str,
        parts: &Parts,
        body: Incoming,
        client: &HeaderValue,
    ) -> Response {
        let ctx = &self.ctx(&parts.headers, client);
        let headers = &parts.headers;
        match route {
            Route::User => {
                by_id(route, param, |id: i64| {
                    pass_get(&self.users, "User", id_path("/users/", id), ctx)
                })
                .await
            }
            Route::Order => {
                by_id(route, param, |id: i64| {
                    pass_get(&self.orders, "Order", id_path("/orders/", id), ctx)
                })
                .await
            }
            Route::UserOrders => by_id(route, param, |id| user_orders(self, ctx, id)).await,
            Route::Profile => by_id(route, param, |id| user_profile(self, ctx, id)).await,
            Route::Product => by_id(route, param, |id| get_product(self, ctx, id)).await,
            Route::Products => list_products(self, ctx, parts.uri.query()).await,
            Route::Orders => with_body(body, ctx, |b| create_order(self, ctx, headers, b)).await,
            Route::Register => {
                with_body(body, ctx, |b| {
                    forward_post(
                        &self.users,
                        "User",
                        "/auth/register".into(),
                        ctx,
                        headers,
                        b,
                    )
                })
                .await
            }
            Route::Login => {
                let path = match parts.uri.query() {
                    Some(q) => format!("/auth/login?{q}"),
                    None => "/auth/login".to_owned(),
                };
                with_body(body, ctx, |b| {
                    forward_post(&self.users, "User", path, ctx, headers, b)
                })
                .await
            }
        }
    }
}

/// Runs `handler` with the route's parameter as a number, or answers the 422
/// that points at the parameter.
async fn by_id<T: std::str::FromStr, F: Future<Output = Response>>(
    route: Route,
    param: &str,
    handler: impl FnOnce(T) -> F,
) -> Response {
    match param.parse() {
        Ok(id) => handler(id).await,
        Err(_) => not_an_integer_path_param(route.param_name()),
    }
}

/// Runs `handler` with the whole request body, or answers why it could not
/// be read.
async fn with_body<F: Future<Output = Response>>(
    body: Incoming,
    ctx: &CallCtx,
    handler: impl FnOnce(Bytes) -> F,
) -> Response {
    // The deadline covers the whole request, reading its body included: a
    // client trickling a body does not hold a connection past it.
    let deadline = tokio::time::Instant::from_std(ctx.deadline);
    match tokio::time::timeout_at(deadline, read_body(body)).await {
        Ok(Ok(b)) => handler(b).await,
        Ok(Err(r)) => r,
        Err(_) => crate::http::error::body_not_in_time(),
    }
}

/// The running gateway: bound listeners, upstreams, health checkers.
///
/// Its workers are threads that each run alone (as nginx's worker processes
/// do): each accepts on a listener of its own, serves the connections it
/// accepted and sends their requests out on connections of its own, so that
/// a request never wakes another thread. A work-stealing runtime on the same
/// two cores passed each request between threads (client connection,
/// upstream connection) and served a fifth fewer requests.
pub struct GatewayApp {
    listener: tokio::net::TcpListener,
    /// The other workers' listeners, on the same address.
    more: Vec<std::net::TcpListener>,
    addr: std::net::SocketAddr,
    gateway: Gateway,
    health_every: Duration,
    client_idle_timeout: Duration,
    shutdown_timeout: Duration,
}

impl GatewayApp {
    pub async fn build(config: &crate::Config, registry: &Registry) -> anyhow::Result<GatewayApp> {
        let keys = TokenKeys::load(
            config.jwt_secret.as_deref(),
            &config.data_dir,
            config.token_ttl,
        )?;
        let workers = config.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let gateway = Gateway::new(registry, keys, workers)?;
        let addr = format!("{}:{}", config.host, config.port);
        let (listener, more) = crate::serve::bind_shared(&addr, workers.saturating_sub(1))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr()?;
        Ok(GatewayApp {
            listener,
            more,
            addr,
            gateway,
            health_every: Duration::from_millis(registry.health_interval_ms.max(50)),
            client_idle_timeout: Duration::from_millis(registry.client_idle_timeout_ms),
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
        let stop_on_signal = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop_on_signal.cancel();
        });
        let g = self.gateway.clone();
        let make = move |peer: std::net::SocketAddr, conn: &Arc<crate::serve::Conn>| {
            let (g, conn) = (g.clone(), conn.clone());
            // Made once per connection; each request clones it (a count
            // to bump) into its upstream requests' `x-forwarded-for`.
            let client = HeaderValue::from_maybe_shared(Bytes::from(peer.ip().to_string()))
                .expect("an IP address is a valid header value");
            // The answers are whole bodies: the request is over when the
            // handler returns, so no body needs to carry the guard.
            hyper::service::service_fn(move |req| {
                let (g, client) = (g.clone(), client.clone());
                let in_flight = conn.request();
                async move {
                    let r = g.handle(req, &client).await;
                    drop(in_flight);
                    Ok::<_, std::convert::Infallible>(r)
                }
            })
        };
        let (idle, drain) = (self.client_idle_timeout, self.shutdown_timeout);
        let mut others = Vec::new();
        for (n, listener) in (1..).zip(self.more) {
            let (worker_stop, make) = (stop.clone(), make.clone());
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            let spawned = std::thread::Builder::new()
                .name(format!("gateway-worker-{n}"))
                .spawn(move || {
                    upstream::set_worker(n);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    // A worker that cannot start drops its listener, so the
                    // kernel stops handing it connections; the others serve.
                    let served = runtime.and_then(|rt| {
                        rt.block_on(async move {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            crate::serve::serve(listener, idle, drain, worker_stop, make).await;
                            Ok(())
                        })
                    });
                    if let Err(e) = served {
                        tracing::error!(worker = n, error = %e, "gateway worker could not run");
                    }
                    let _ = done.send(());
                });
            others.push(finished);
            if let Err(e) = spawned {
                stop.cancel();
                for finished in others {
                    let _ = finished.await;
                }
                return Err(anyhow::anyhow!("cannot start gateway worker {n}: {e}"));
            }
        }
        crate::serve::serve(self.listener, idle, drain, stop.clone(), make).await;
        // The others drain as this one did, each within `drain`; a worker
        // gone (its sender dropped) counts as done.
        for finished in others {
            let _ = finished.await;
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
    use futures::StreamExt;

    use super::{
        Failure, HeaderMap, HeaderValue, MAX_BODY, Method, Route, StatusCode, grpc_failure,
        read_body,
    };

    /// An answer as `pass` gives it to the client, from the upstream's headers.
    fn passed(upstream: &[(&'static str, &'static str)]) -> Vec<(String, String)> {
        let mut headers = HeaderMap::new();
        for (k, v) in upstream {
            headers.append(*k, HeaderValue::from_static(v));
        }
        let answer = super::HttpAnswer {
            status: 201,
            headers,
            body: Default::default(),
        };
        let r = super::pass(answer, &HeaderValue::from_static("req-1"));
        assert_eq!(r.status(), StatusCode::CREATED);
        let mut out: Vec<_> = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn answers_keep_end_to_end_headers_and_get_the_request_id() {
        let own = |rest: &[(&str, &str)]| {
            let mut v: Vec<(String, String)> = rest
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            v.push(("x-request-id".into(), "req-1".into()));
            v.sort();
            v
        };
        // Hop-by-hop headers, and those `connection` names, stay behind.
        assert_eq!(
            passed(&[
                ("content-type", "application/json"),
                ("location", "/orders/7"),
                ("connection", "keep-alive, x-upstream-hint"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("x-upstream-hint", "only for the proxy"),
                ("x-request-id", "req-1"),
            ]),
            own(&[
                ("content-type", "application/json"),
                ("location", "/orders/7")
            ])
        );
        // The request's id, once, whatever the upstream said.
        for ids in [
            &[][..],
            &[("x-request-id", "req-1")],
            &[("x-request-id", "its own")],
            &[("x-request-id", "req-1"), ("x-request-id", "another")],
        ] {
            let mut upstream = vec![("etag", "\"v1\"")];
            upstream.extend_from_slice(ids);
            assert_eq!(passed(&upstream), own(&[("etag", "\"v1\"")]), "{ids:?}");
        }
    }

    #[test]
    fn grpc_statuses_made_from_transport_errors_mean_unreachable() {
        let refused = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        assert!(matches!(grpc_failure(&refused), Some(Failure::Connect(_))));
        let overloaded = tonic::Status::unavailable("overloaded");
        assert!(matches!(
            grpc_failure(&overloaded),
            Some(Failure::Unavailable(_))
        ));
        for s in [
            tonic::Status::deadline_exceeded("late"),
            tonic::Status::cancelled("Timeout expired"),
        ] {
            assert_eq!(grpc_failure(&s), Some(Failure::Timeout));
        }
        assert_eq!(
            grpc_failure(&tonic::Status::not_found("no such product")),
            None
        );
        // A message that did not decode is an answer gone wrong, not a
        // connection.
        assert_eq!(
            grpc_failure(&tonic::Status::internal("failed to decode Product")),
            None
        );
    }

    /// `Inner::ok` is indexed by a route's discriminant and built from `ALL`.
    #[test]
    fn all_routes_are_listed_in_declaration_order() {
        for (i, r) in Route::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let paths: std::collections::HashSet<_> = Route::ALL.iter().map(|r| r.path()).collect();
        assert_eq!(paths.len(), Route::ALL.len(), "one label per route");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused_whether_declared_or_streamed() {
        use bytes::Bytes;
        use http_body_util::{Full, StreamBody};
        use hyper::body::Frame;
        let chunk = || Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b' '; 1 << 20])));

        let at_limit = Full::new(Bytes::from(vec![b' '; MAX_BODY]));
        assert_eq!(read_body(at_limit).await.unwrap().len(), MAX_BODY);

        let declared = Full::new(Bytes::from(vec![b' '; MAX_BODY + 1]));
        let r = read_body(declared).await.unwrap_err();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

        // No length declared: the limit stops reading at the chunk that
        // crosses it, so the rest of the stream is never pulled.
        let pulled = std::sync::atomic::AtomicUsize::new(0);
        let stream = futures::stream::iter(std::iter::repeat_with(|| {
            pulled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            chunk()
        }))
        .take(10);
        let r = read_body(StreamBody::new(stream)).await.unwrap_err();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(pulled.load(std::sync::atomic::Ordering::Relaxed), 3);

        let broken = futures::stream::iter([
            chunk(),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "gone",
            )),
        ]);
        let r = read_body(StreamBody::new(broken)).await.unwrap_err();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn paths_find_their_route_and_parameter() {
        let found = |path| Route::find(path).map(|(r, p)| (r.path(), p));
        assert_eq!(found("/api/users/7"), Some(("/api/users/{user_id}", "7")));
        assert_eq!(
            found("/api/user-orders/7"),
            Some(("/api/user-orders/{user_id}", "7"))
        );
        assert_eq!(
            found("/user-profile/x"),
            Some(("/user-profile/{user_id}", "x"))
        );
        assert_eq!(found("/api/products"), Some(("/api/products", "")));
        assert_eq!(
            found("/api/products/3"),
            Some(("/api/products/{product_id}", "3"))
        );
        assert_eq!(found("/auth/login"), Some(("/auth/login", "")));
        for unknown in [
            "/api/users/",
            "/api/users/1/",
            "/api/users/1/x",
            "/api/users",
            "/orders/1",
            "/",
            "/healthz",
        ] {
            assert_eq!(found(unknown), None, "{unknown}");
        }
        assert_eq!(Route::Profile.param_name(), "user_id");
        assert_eq!(Route::Product.param_name(), "product_id");
        assert!(Route::User.allows(&Method::HEAD) && !Route::User.allows(&Method::POST));
        assert!(Route::Login.allows(&Method::POST) && !Route::Login.allows(&Method::GET));
    }
}
