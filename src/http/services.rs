//! The HTTP surfaces of the microservices (SPEC §8): the users service
//! (users, accounts, and the order statistics it builds from `order.created`)
//! and the orders service (orders, which embed their user, fetched from the
//! users service, and its event feed).

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;
use std::time::{Duration, Instant};
use utoipa::{IntoParams, OpenApi};

use super::{
    Detail,
    error::ApiError,
    extract::{Auth, Json, Path, Query},
    openapi::ValidationDetail,
    users::ListParams,
};
use crate::{
    domain::{NewOrder, Order, consumers::OrderStats},
    error::Error,
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

/// What the orders service needs beyond the app: where the users are.
#[derive(Clone)]
pub struct OrdersCtx {
    app: AppState,
    users_url: String,
    http: reqwest::Client,
}

impl axum::extract::FromRef<OrdersCtx> for AppState {
    fn from_ref(ctx: &OrdersCtx) -> AppState {
        ctx.app.clone()
    }
}

/// How long the orders service waits for the users service when its caller
/// has not said how long it may take.
const USER_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// When the answer to this request is due: the time its caller gave it
/// (`x-request-timeout-ms`, as the gateway sends), counted from now, or
/// [`USER_FETCH_TIMEOUT`] from now if that is sooner or none was given.
fn answer_due(headers: &HeaderMap) -> Instant {
    let given = headers
        .get(X_REQUEST_TIMEOUT_MS)
        .and_then(time_given)
        .unwrap_or(USER_FETCH_TIMEOUT);
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
    let unavailable = || Error::Unavailable("User service unavailable".into());
    let left = due.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(unavailable());
    }
    let mut req = ctx
        .http
        .get(format!(
            "{}/users/{user_id}",
            ctx.users_url.trim_end_matches('/')
        ))
        .timeout(left)
        .header(X_REQUEST_TIMEOUT_MS, left.as_millis().max(1).to_string());
    if let Some(v) = headers.get(X_REQUEST_ID) {
        req = req.header(X_REQUEST_ID, v.clone());
    }
    if let Some(tp) = headers
        .get(TRACEPARENT)
        .and_then(|v| child_traceparent(v.as_bytes()))
    {
        req = req.header(TRACEPARENT, tp);
    }
    let r = req.send().await.map_err(|_| unavailable())?;
    match r.status().as_u16() {
        200 => Ok(r.json().await.ok()),
        404 => Ok(None),
        _ => Err(unavailable()),
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
    let user = match fetch_user(&ctx, order.user_id, &headers, due).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "order served without its user");
            None
        }
    };
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
    let user_id = new.user_id.unwrap_or(by.user_id);
    crate::domain::validate::Check::new()
        .non_negative("total", new.total)
        .finish()?;
    by.ensure_self_or_admin(user_id, "place orders for yourself")?;
    if fetch_user(&ctx, user_id, &headers, due).await?.is_none() {
        return Err(Error::invalid("user_id", "value_error", "User does not exist").into());
    }
    let order = ctx
        .app
        .domain
        .insert_order(user_id, new.total, new.status.unwrap_or_default())
        .await?;
    Ok((StatusCode::CREATED, Json(json!(order))).into_response())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "prism orders service",
        description = "Orders, which embed their user (SPEC §8)."
    ),
    paths(list_orders, get_order, create_order)
)]
pub struct OrdersServiceApi;

pub fn orders_service(state: AppState) -> Router {
    let ctx = OrdersCtx {
        users_url: state.config.users_url.clone(),
        http: reqwest::Client::new(),
        app: state.clone(),
    };
    Router::new()
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/{order_id}", get(get_order))
        .with_state(ctx)
}
