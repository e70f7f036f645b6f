//! The `/admin` sub-application: everything needs the admin role except its
//! own `/admin/docs` and `/admin/openapi.json`.

use std::sync::atomic::Ordering;

use axum::{Router, extract::State, routing::get};
use serde::Serialize;
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use super::{
    Detail,
    error::ApiError,
    extract::{Admin, Json, Query},
    users::ListParams,
};
use crate::{domain::User, state::AppState};

/// One page of users, with roles, and how many there are.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminUsers {
    users: Vec<User>,
    total: i64,
}

/// Every user, with roles.
#[utoipa::path(get, path = "/users", params(ListParams), security(("bearer" = [])),
    responses((status = 200, body = AdminUsers), (status = 401, body = Detail),
              (status = 403, body = Detail)))]
async fn admin_users(
    State(state): State<AppState>,
    _admin: Admin,
    Query(q): Query<ListParams>,
) -> Result<Json<AdminUsers>, ApiError> {
    let users = state.domain.list_users(q.page()?).await?;
    let total = state.domain.count_users().await?;
    Ok(Json(AdminUsers { users, total }))
}

/// The effective settings, secrets masked.
#[utoipa::path(get, path = "/settings", security(("bearer" = [])),
    responses((status = 200, description = "`{settings: {...}}`"), (status = 403, body = Detail)))]
async fn admin_settings(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({"settings": state.config.admin_settings()})))
}

/// Live counters of this process.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminStats {
    /// Entries in the read caches (users, products, orders).
    cache_size: usize,
    websocket_connections: i64,
    sse_connections: i64,
    /// Open GraphQL subscriptions.
    subscriptions: i64,
    /// Live readers of the event log, on every protocol.
    event_subscribers: usize,
    events_delivered: u64,
    /// The newest event id.
    event_log_head: i64,
    total_requests: u64,
    active_users: usize,
    /// `sqlite` or `postgres`.
    database: &'static str,
    uptime_secs: u64,
}

/// Live counters of this process.
#[utoipa::path(get, path = "/stats", security(("bearer" = [])),
    responses((status = 200, body = AdminStats), (status = 403, body = Detail)))]
async fn admin_stats(State(state): State<AppState>, _admin: Admin) -> Json<AdminStats> {
    let s = &state.stats;
    let events = state.domain.events();
    Json(AdminStats {
        cache_size: state.domain.cache_size(),
        websocket_connections: s.websocket_connections.load(Ordering::Relaxed),
        sse_connections: s.sse_connections.load(Ordering::Relaxed),
        subscriptions: s.subscriptions.load(Ordering::Relaxed),
        event_subscribers: events.subscriber_count(),
        events_delivered: events.delivered_count(),
        event_log_head: events.head(),
        total_requests: s.requests(),
        active_users: s.active_users(),
        database: state.domain.db().kind(),
        uptime_secs: s.started.elapsed().as_secs(),
    })
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Admin Panel", description = "Administration; every route needs the admin role."),
    servers((url = "/admin")),
    paths(admin_users, admin_settings, admin_stats),
)]
pub struct AdminApi;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", get(admin_users))
        .route("/settings", get(admin_settings))
        .route("/stats", get(admin_stats))
}
