//! The HTTP surfaces of the microservices (SPEC §8): the users service
//! (users, accounts, and the order statistics it builds from `order.created`)
//! and the orders service (orders, which embed their user, fetched from the
//! users service, and its event feed).

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use http_body_util::Full;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use utoipa::{IntoParams, OpenApi};

use super::{
    Detail,
    error::ApiError,
    extract::{Admin, Auth, Json, Path, Query},
    openapi::ValidationDetail,
    users::ListParams,
};
use crate::{
    domain::{
        NewOrder, Order,
        consumers::{OrderStats, OrderTotals},
    },
    error::Error,
    pool::{self, ConnPool},
    state::AppState,
    trace::{TRACEPARENT, X_REQUEST_ID, X_REQUEST_TIMEOUT_MS, child_traceparent, time_given},
};

/// What the users service learned of a user's orders from the orders
/// service's `order.created` events.
#[utoipa::path(get, path = "/users/{user_id}/order-stats", params(("user_id" = i64, Path)),
    responses((status = 200, body = OrderStats), (status = 404, body = Detail)))]
async fn order_stats(
    State(state): State<AppState>,
    Path(user_id): Path<i64>,
) -> Result<Json<OrderStats>, ApiError> {
    state.domain.get_user(user_id).await?;
    Ok(Json(state.domain.order_stats(user_id).await?))
}

/// The users service's own routes; its document adds the users sub-app's,
/// the accounts' and the operational ones (see `crate::http::service_document`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "prism users service",
        description = "Users and accounts (SPEC §8)."
    ),
    paths(order_stats)
)]
pub struct UsersServiceApi;

pub fn users_service() -> Router<AppState> {
    Router::new()
        .merge(super::mount(
            "/users",
            super::users::root(),
            super::users::router(),
        ))
        .route("/users/{user_id}/order-stats", get(order_stats))
        .merge(super::auth::router())
}

/// What the orders service needs beyond the app: its connections to the
/// users service.
#[derive(Clone)]
pub struct OrdersCtx {
    app: AppState,
    users: Arc<ConnPool>,
    /// The path `users_url` gave, if any, without its trailing slash: the
    /// users service may sit under a prefix behind a proxy.
    users_path: Arc<str>,
}

impl axum::extract::FromRef<OrdersCtx> for AppState {
    fn from_ref(ctx: &OrdersCtx) -> AppState {
        ctx.app.clone()
    }
}

/// How long the orders service waits for the users service when its caller
/// has not said how long it may take.
const USER_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The part of its caller's time the orders service keeps for answering
/// after the users service: an order whose user cannot be fetched in time is
/// still served, before the caller's time runs out and the edge answers 504.
const ANSWER_MARGIN: Duration = Duration::from_millis(10);

/// When the users service must have answered: the time this request's caller
/// gave it (`x-request-timeout-ms`, as the gateway sends) less
/// [`ANSWER_MARGIN`], counted from now, or [`USER_FETCH_TIMEOUT`] from now if
/// that is sooner or no time was given.
fn answer_due(headers: &HeaderMap) -> Instant {
    let given = headers
        .get(X_REQUEST_TIMEOUT_MS)
        .and_then(time_given)
        .map_or(USER_FETCH_TIMEOUT, |t| t.saturating_sub(ANSWER_MARGIN));
    Instant::now() + given.min(USER_FETCH_TIMEOUT)
}

/// The user of an order, from the users service: `Ok(None)` when it does not
/// exist, `Err` when the service cannot say by `due`. The request's id, its
/// trace (a new span) and the time left go with the call.
async fn fetch_user(
    ctx: &OrdersCtx,
    user_id: i64,
    headers: &HeaderMap,
    due: Instant,
) -> Result<Option<serde_json::Value>, Error> {
    let unavailable = |why: &dyn std::fmt::Display| {
        tracing::warn!(error = %why, user_id, "cannot ask the users service");
        Error::Unavailable("User service unavailable".into())
    };
    let left = due.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(unavailable(&"no time left"));
    }
    let mut req = hyper::Request::new(Full::<Bytes>::default());
    *req.uri_mut() = format!("{}/users/{user_id}", ctx.users_path)
        .parse()
        .map_err(Error::internal)?;
    let h = req.headers_mut();
    if let Some(host) = ctx.users.host() {
        h.insert(header::HOST, host.clone());
    }
    let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
    h.insert(X_REQUEST_TIMEOUT_MS, HeaderValue::from(ms));
    if let Some(v) = headers.get(X_REQUEST_ID) {
        h.insert(X_REQUEST_ID, v.clone());
    }
    if let Some(tp) = headers
        .get(TRACEPARENT)
        .and_then(|v| child_traceparent(v.as_bytes()))
    {
        h.insert(TRACEPARENT, tp);
    }
    // The time covers waiting for a connection too: at most
    // `users_max_connections` are open, and a burst waits its turn for them.
    let answer = match tokio::time::timeout(left, ctx.users.exchange(req, None)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(unavailable(&e.message)),
        Err(_) => return Err(unavailable(&"timed out")),
    };
    match answer.status().as_u16() {
        200 => serde_json::from_slice(answer.body())
            .map(Some)
            .map_err(|e| unavailable(&format_args!("unreadable answer: {e}"))),
        404 => Ok(None),
        status => Err(unavailable(&format_args!("answered {status}"))),
    }
}

#[derive(Debug, serde::Deserialize, IntoParams)]
struct OrdersQuery {
    /// Only this user's orders.
    user_id: Option<i64>,
    /// At most this many items (default 100, capped at 1000).
    limit: Option<i64>,
    /// Skip this many items.
    offset: Option<i64>,
}

/// Orders in id order.
#[utoipa::path(get, path = "/orders", params(OrdersQuery), responses((status = 200, body = [Order])))]
async fn list_orders(
    State(ctx): State<OrdersCtx>,
    Query(q): Query<OrdersQuery>,
) -> Result<Response, ApiError> {
    let page = ListParams {
        limit: q.limit,
        offset: q.offset,
    }
    .page()?;
    Ok(Json(ctx.app.domain.list_orders(q.user_id, page).await?).into_response())
}

/// An order with its `"user"` embedded (null when the users service cannot
/// be reached: the order itself is still known).
#[utoipa::path(get, path = "/orders/{order_id}", params(("order_id" = i64, Path)),
    responses((status = 200, body = Order, description = "The order, with `user` (a User, or null)"),
               (status = 404, body = Detail)))]
async fn get_order(
    State(ctx): State<OrdersCtx>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let due = answer_due(&headers);
    let order = ctx.app.domain.get_order(id).await?;
    // Without an answer from the users service (`fetch_user` logs why), the
    // order is served with a null user.
    let user = fetch_user(&ctx, order.user_id, &headers, due)
        .await
        .unwrap_or(None);
    let mut body = serde_json::to_value(&order).map_err(Error::internal)?;
    body["user"] = user.unwrap_or(serde_json::Value::Null);
    Ok(Json(body).into_response())
}

/// Places an order after checking with the users service that its user exists.
#[utoipa::path(post, path = "/orders", request_body = NewOrder, security(("bearer" = [])),
    responses((status = 201, body = Order), (status = 403, body = Detail),
               (status = 422, body = ValidationDetail),
               (status = 503, body = Detail, description = "The users service cannot say whether the user exists")))]
async fn create_order(
    State(ctx): State<OrdersCtx>,
    Auth(by): Auth,
    headers: HeaderMap,
    Json(new): Json<NewOrder>,
) -> Result<Response, ApiError> {
    let due = answer_due(&headers);
    let (user_id, status) = new.check(&by)?;
    if fetch_user(&ctx, user_id, &headers, due).await?.is_none() {
        return Err(Error::invalid("user_id", "value_error", "User does not exist").into());
    }
    let order = ctx
        .app
        .domain
        .insert_order(user_id, new.total, status)
        .await?;
    Ok((StatusCode::CREATED, Json(order)).into_response())
}

/// Every user's order count and total, with the last event they include:
/// the users service starts its statistics again from these when this
/// service no longer holds `order.created` events it missed. Admin only:
/// orders wait while the totals are summed.
#[utoipa::path(get, path = "/order-stats", security(("bearer" = [])),
    responses((status = 200, body = OrderTotals), (status = 401, body = Detail),
               (status = 403, body = Detail)))]
async fn order_totals(
    State(ctx): State<OrdersCtx>,
    _admin: Admin,
) -> Result<Json<OrderTotals>, ApiError> {
    Ok(Json(ctx.app.domain.order_totals().await?))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "prism orders service",
        description = "Orders, which embed their user (SPEC §8)."
    ),
    paths(list_orders, get_order, create_order, order_totals)
)]
pub struct OrdersServiceApi;

/// Connecting to the users service on the same network takes microseconds;
/// one that does not accept within this is not going to answer in time.
const USERS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Idle connections to the users service are closed after this, well within
/// the users service's own idle timeout (60 s by default), so that the orders
/// service, not the server, is the one to close them.
const USERS_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub fn orders_service(state: AppState) -> Router {
    let config = &state.config;
    let users = Arc::new(ConnPool::new(
        &config.users_url,
        USERS_CONNECT_TIMEOUT,
        USERS_IDLE_TIMEOUT,
        pool::Limits {
            connections: config.users_max_connections,
            // Waiting is bounded by each request's time instead.
            waiting: usize::MAX,
        },
    ));
    state.metrics.watch_users_service(users.clone());
    let users_path = config
        .users_url
        .parse::<hyper::Uri>()
        .map(|u| u.path().trim_end_matches('/').to_owned())
        .unwrap_or_default();
    let ctx = OrdersCtx {
        users,
        users_path: users_path.into(),
        app: state.clone(),
    };
    Router::new()
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/{order_id}", get(get_order))
        .route("/order-stats", get(order_totals))
        .with_state(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_service_gets_the_callers_time_less_a_margin_to_answer_in() {
        for (given, expected) in [
            (None, USER_FETCH_TIMEOUT),
            (Some("not a number"), USER_FETCH_TIMEOUT),
            (Some("100"), Duration::from_millis(90)),
            (Some("10"), Duration::ZERO),
            (Some("3"), Duration::ZERO),
            (Some("60000"), USER_FETCH_TIMEOUT),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(ms) = given {
                headers.insert(X_REQUEST_TIMEOUT_MS, HeaderValue::from_static(ms));
            }
            let before = Instant::now();
            let due = answer_due(&headers);
            let after = Instant::now();
            assert!(
                before + expected <= due && due <= after + expected,
                "{given:?}: due {:?} after the call",
                due - before
            );
        }
    }
}
