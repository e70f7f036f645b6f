//! The HTTP edge: routing, middleware, and the JSON routes of SPEC §3.
//!
//! Each sub-application (`users`, `products`, `admin`) owns its router and its
//! OpenAPI document, mounted under its prefix with its own Swagger UI, as
//! FastAPI mounts sub-apps. Handlers decode, call one domain function, encode.

pub mod admin;
pub mod auth;
pub mod content;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod products;
pub mod services;
pub mod users;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{Next, from_fn_with_state},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use serde_json::json;
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    trace::TraceLayer,
};
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    state::{AppState, RequestLabels, RouteLabels},
    trace::{X_REQUEST_TIMEOUT_MS, time_given},
};
use error::{ApiError, detail};
use extract::Json;

/// `{"detail": "…"}`, FastAPI's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Detail {
    pub detail: String,
}

/// Where everything is.
#[utoipa::path(get, path = "/", tag = "meta", responses((status = 200, description = "index of the protocols")))]
async fn index(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "graphql": "/graphql",
        "events": "/events",
        "websocket": "/ws",
        "admin": "/admin/docs",
        "docs": "/docs",
        "grpc": state.config.grpc_port,
        "ui": "/ui",
    }))
}

/// Request counter, active users and cache size (the seed's application state).
#[utoipa::path(get, path = "/stats", tag = "meta", responses((status = 200, description = "`{total_requests, active_users, cache_size}`")))]
async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "total_requests": state.stats.requests(),
        "active_users": state.stats.active_users(),
        "cache_size": state.domain.cache_size(),
    }))
}

/// Public settings.
#[utoipa::path(get, path = "/config", tag = "meta", responses((status = 200, description = "`{max_upload_size, ...}`")))]
async fn public_config(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.config.public_settings())
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "meta", responses((status = 200, description = "`{status: ok}`")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the database answers. With a NATS relay, its state is reported
/// too but does not make the server unready: every request is still served,
/// and the relay's outbox keeps each event until the broker has it.
#[utoipa::path(get, path = "/readyz", tag = "meta",
    responses((status = 200, description = "`{status: ready, database: ok}`, and `nats: connected`, `reconnecting` or `standby` (another instance relays) when events are relayed to NATS; on a users service, `order_consumer` likewise"), (status = 503, body = Detail)))]
async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return detail(StatusCode::SERVICE_UNAVAILABLE, "Shutting down");
    }
    match state.domain.db().ping().await {
        Ok(()) => {
            let mut body = json!({"status": "ready", "database": "ok"});
            if let Some(relay) = &state.relay {
                body["nats"] = json!(relay.state().as_str());
            }
            if let Some(consumer) = &state.order_consumer {
                body["order_consumer"] = json!(consumer.get().as_str());
            }
            Json(body).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness check: database unreachable");
            detail(StatusCode::SERVICE_UNAVAILABLE, "Database unavailable")
        }
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "meta", responses((status = 200, description = "Prometheus text")))]
async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    detail(StatusCode::NOT_FOUND, "Not Found")
}

async fn method_not_allowed() -> Response {
    detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "prism",
        description = "One domain over REST, GraphQL, gRPC, SSE and WebSockets. \
        Users, products and admin are mounted sub-applications with their own docs: \
        /users/docs, /products/docs, /admin/docs."
    ),
    paths(index, products::items_v1, products::items_v2),
    // The catalogue's query names it; utoipa adds only the schemas of bodies.
    components(schemas(crate::domain::Category))
)]
pub struct MainApi;

/// The operational routes every HTTP role serves ([`ops`]).
#[derive(OpenApi)]
#[openapi(paths(stats, public_config, healthz, readyz, metrics))]
struct OpsApi;

/// The main app's document: its own routes, and those of accounts and
/// content, which their modules describe.
fn main_api() -> utoipa::openapi::OpenApi {
    let mut doc = MainApi::openapi();
    doc.merge(OpsApi::openapi());
    doc.merge(auth::AuthApi::openapi());
    doc.merge(content::ContentApi::openapi());
    doc.merge(crate::realtime::RealtimeApi::openapi());
    doc
}

/// The document a microservice serves at `/openapi.json` (with `/docs`), as
/// each of the seed's FastAPI services does; `None` for the products
/// service, which speaks gRPC.
pub fn service_document(role: crate::app::Role) -> Option<utoipa::openapi::OpenApi> {
    use crate::app::Role;
    let mut doc = match role {
        Role::Users => {
            let mut doc = services::UsersServiceApi::openapi();
            doc.merge(auth::AuthApi::openapi());
            // Mounted at /users here too, but inside this document rather
            // than as a server of its own.
            let mut users = users::UsersApi::openapi();
            users.servers = None;
            doc.nest("/users", users)
        }
        Role::Orders => services::OrdersServiceApi::openapi(),
        Role::Serve | Role::Products => return None,
    };
    doc.merge(OpsApi::openapi());
    Some(openapi::finish(doc))
}

/// Every document prism serves, by where it is served.
pub fn documents() -> [(&'static str, utoipa::openapi::OpenApi); 4] {
    [
        ("/openapi.json", main_api()),
        ("/users/openapi.json", users::UsersApi::openapi()),
        ("/products/openapi.json", products::ProductsApi::openapi()),
        ("/admin/openapi.json", admin::AdminApi::openapi()),
    ]
    .map(|(at, doc)| (at, openapi::finish(doc)))
}

/// Counts requests, records metrics, and refuses declared bodies over the limit
/// before anything reads them.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    state.stats.total_requests.fetch_add(1, Ordering::Relaxed);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > state.config.max_upload_size) {
        return ApiError::payload_too_large().into_response();
    }
    let method = method_label(req.method());
    let route = state.metrics.routes.intern(
        req.extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", |p| p.as_str()),
    );
    // The gateway and the orders service say how long they will wait. Work
    // past that point makes an answer nobody reads while holding database
    // connections others are queueing for, so it stops there, as a gRPC
    // server stops a call past its deadline. Dropping the handler rolls back
    // its open transaction; a commit it already made stands, and its events
    // go out with the event pump's next poll.
    let given = req.headers().get(X_REQUEST_TIMEOUT_MS).and_then(time_given);
    let start = Instant::now();
    let out_of_time = || {
        detail(
            StatusCode::GATEWAY_TIMEOUT,
            "Deadline exceeded: no answer within the request's x-request-timeout-ms",
        )
    };
    let mut response = match given {
        None => next.run(req).await,
        // No time at all: nothing is started, whatever might have finished
        // at once.
        Some(time) if time.is_zero() => out_of_time(),
        Some(time) => tokio::time::timeout(time, next.run(req))
            .await
            .unwrap_or_else(|_| out_of_time()),
    };
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(cause) = response.extensions_mut().remove::<error::InternalCause>() {
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::error!(request_id, method, route = &*route, error = %cause.0, "internal error");
    }
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    state
        .metrics
        .latency
        .get_or_create(&RouteLabels { method, route })
        .observe(elapsed);
    response
}

fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Request ids unique across restarts without a random draw per request: a
/// random per-process prefix and a counter.
#[derive(Clone, Debug)]
struct RequestIds {
    prefix: Arc<str>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds {
            prefix: crate::auth::random_token(6).into(),
            next: Arc::default(),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // `{prefix}-{n:08x}`, without `format!`'s machinery: this runs for
        // every request.
        let mut digits = [0u8; 16];
        crate::trace::hex(&mut digits, n);
        let width = (16 - n.leading_zeros() as usize / 4).max(8);
        let mut id = Vec::with_capacity(self.prefix.len() + 1 + width);
        id.extend_from_slice(self.prefix.as_bytes());
        id.push(b'-');
        id.extend_from_slice(&digits[16 - width..]);
        HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
            .ok()
            .map(RequestId::new)
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    detail(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
}

/// Swagger UI for each document, at its path with `openapi.json` replaced
/// by `docs`.
fn docs(
    documents: impl IntoIterator<Item = (&'static str, utoipa::openapi::OpenApi)>,
) -> Router<AppState> {
    documents
        .into_iter()
        .fold(Router::new(), |router, (at, doc)| {
            let ui = at.replace("openapi.json", "docs");
            router.merge(SwaggerUi::new(ui).url(at, doc))
        })
}

/// Mounts a sub-application at `prefix`. Its root answers at both `/prefix`
/// and `/prefix/`, as a FastAPI mount does (the seed's clients call `/users/`).
pub fn mount(
    prefix: &str,
    root: axum::routing::MethodRouter<AppState>,
    sub: Router<AppState>,
) -> Router<AppState> {
    Router::new()
        .route(prefix, root.clone())
        .route(&format!("{prefix}/"), root)
        .nest(prefix, sub)
}

/// Health, readiness, metrics and stats: every HTTP service has them.
fn ops() -> Router<AppState> {
    Router::new()
        .route("/stats", get(stats))
        .route("/config", get(public_config))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The HTTP application of a role (see [`crate::app::Role`]).
pub fn router_for(role: crate::app::Role, state: AppState) -> Router {
    use crate::app::Role;
    match role {
        Role::Serve | Role::Products => router(state),
        Role::Users => edge(
            ops()
                .merge(services::users_service())
                .merge(docs(service_document(role).map(|d| ("/openapi.json", d))))
                .fallback(not_found)
                .method_not_allowed_fallback(method_not_allowed)
                .with_state(state.clone()),
            state,
        ),
        Role::Orders => edge(
            ops()
                .merge(crate::realtime::feed_router())
                .merge(docs(service_document(role).map(|d| ("/openapi.json", d))))
                .fallback(not_found)
                .with_state(state.clone())
                .merge(services::orders_service(state.clone()))
                .method_not_allowed_fallback(method_not_allowed),
            state,
        ),
    }
}

/// The whole HTTP application of `prism serve`. Tests can drive it without a socket.
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/", get(index))
        .merge(ops())
        .route("/api/v1/items", get(products::items_v1))
        .route("/api/v2/items", get(products::items_v2))
        .merge(auth::router())
        .merge(content::router())
        .merge(mount("/users", users::root(), users::router()))
        .merge(mount("/products", products::root(), products::router()))
        .nest("/admin", admin::router())
        .merge(docs(documents()))
        .merge(crate::realtime::router())
        .fallback(not_found)
        .with_state(state.clone())
        .merge(crate::graphql::router(state.clone(), state.config.graphql))
        // After the merge, so that `/graphql` answers a wrong method in the
        // same JSON as every other route.
        .method_not_allowed_fallback(method_not_allowed);
    edge(routes, state)
}

/// The middleware every HTTP service shares: request ids, tracing, request
/// counting and metrics, body limits, and panics turned into 500s.
///
/// One `layer` call with the whole stack, as axum advises: each call boxes
/// every route's service again, and axum clones a route's service, box by
/// box, for every request it routes there (22 clones and as many
/// allocations per `GET /users/1` with six separate calls).
fn edge(routes: Router, state: AppState) -> Router {
    let max_body = state.config.max_upload_size;
    routes.layer(
        tower::ServiceBuilder::new()
            .layer(CatchPanicLayer::custom(panic_response))
            .layer(SetRequestIdLayer::x_request_id(RequestIds::default()))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(
                TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    // DEBUG: a span per request is measurable at full load; internal
                    // errors carry the request id anyway (see `track`).
                    tracing::debug_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
                }),
            )
            .layer(from_fn_with_state(state, track))
            .layer(DefaultBodyLimit::max(max_body)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_prefix_and_the_count_in_hex() {
        let mut ids = RequestIds {
            prefix: "abc123".into(),
            next: Arc::default(),
        };
        let req = axum::http::Request::new(());
        for (n, expected) in [
            (0, "abc123-00000000"),
            (0xbeef, "abc123-0000beef"),
            (0xffff_ffff, "abc123-ffffffff"),
            (0x1_0000_0000, "abc123-100000000"),
            (u64::MAX, "abc123-ffffffffffffffff"),
        ] {
            ids.next.store(n, Ordering::Relaxed);
            let id = ids.make_request_id(&req).unwrap();
            assert_eq!(id.header_value(), expected);
        }
    }
}
