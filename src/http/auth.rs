//! `/auth/register` and `/auth/login`: the only writes that need no token.

use std::net::SocketAddr;

use axum::{
    Router,
    extract::{ConnectInfo, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use super::{
    Detail,
    error::ApiError,
    extract::{Input, Json},
    openapi::ValidationDetail,
};
use crate::{domain::Registration, error::Error, state::AppState};

/// Credentials: `username` may also be the account's email.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Login {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

/// Create an account that can log in. JSON, form or query parameters.
#[utoipa::path(post, path = "/auth/register", request_body = Registration, tag = "auth",
    responses((status = 201, description = "`{message, id}`"), (status = 409, body = Detail),
              (status = 422, body = ValidationDetail)))]
async fn register(
    State(state): State<AppState>,
    Input(reg, from): Input<Registration>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let user = state
        .domain
        .register(reg)
        .await
        .map_err(ApiError::at(from))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"message": "User created", "id": user.id})),
    ))
}

/// Exchange a username (or email) and password for a bearer token. Form, JSON
/// or query parameters. Too many failures from one client for one username in
/// a minute answer 429 with `Retry-After`; behind a trusted proxy (the
/// gateway) the client is the one its `X-Forwarded-For` names.
#[utoipa::path(post, path = "/auth/login", request_body = Login, tag = "auth",
    responses((status = 200, body = TokenResponse), (status = 401, body = Detail),
              (status = 429, body = Detail)))]
async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Input(creds, _): Input<Login>,
) -> Result<Json<TokenResponse>, ApiError> {
    let ip = state.config.trusted_proxies.client(peer.ip(), &headers);
    state.limiter.check(ip, &creds.username)?;
    match state
        .domain
        .authenticate(&creds.username, &creds.password)
        .await
    {
        Ok(user) => {
            state.limiter.record_success(ip, &creds.username);
            state.stats.saw_user(user.id);
            Ok(Json(TokenResponse {
                access_token: state.keys.issue(user.id, user.role)?,
                token_type: "bearer",
                expires_in: state.keys.ttl().as_secs(),
            }))
        }
        Err(e @ Error::Unauthenticated(_)) => {
            state.limiter.record_failure(ip, &creds.username);
            tracing::info!(username = %creds.username, client = %ip, "failed login");
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(OpenApi)]
#[openapi(paths(register, login))]
pub struct AuthApi;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/register", post(register))
        .route("/auth/login", post(login))
}
