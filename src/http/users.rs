//! The `/users` sub-application (mounted, with its own `/users/docs`).

use axum::{
    Router,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{MethodRouter, get},
};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use super::{
    Detail,
    error::ApiError,
    extract::{Auth, Input, Json, Path, Query},
    openapi::ValidationDetail,
};
use crate::{
    domain::{NewUser, Page, Post, User},
    state::AppState,
};

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListParams {
    /// At most this many items (default 100, capped at 1000).
    pub limit: Option<i64>,
    /// Skip this many items.
    pub offset: Option<i64>,
}

impl ListParams {
    pub fn page(&self) -> Result<Page, ApiError> {
        Page::new(self.limit, self.offset).map_err(ApiError::query)
    }
}

/// List users in id order.
#[utoipa::path(get, path = "/", params(ListParams), responses((status = 200, body = [User])))]
async fn list_users(
    state: axum::extract::State<AppState>,
    Query(q): Query<ListParams>,
) -> Result<Json<Vec<User>>, ApiError> {
    Ok(Json(state.domain.list_users(q.page()?).await?))
}

/// One user.
#[utoipa::path(get, path = "/{user_id}", params(("user_id" = i64, Path)),
    responses((status = 200, body = User), (status = 404, body = Detail)))]
async fn get_user(
    state: axum::extract::State<AppState>,
    Path(user_id): Path<i64>,
) -> Result<Response, ApiError> {
    let user = state.domain.get_user(user_id).await?;
    Ok(Json(&*user).into_response())
}

/// Create a user (no credentials: see `/auth/register` for accounts that log in).
/// Takes a JSON body, or `?name=&email=&age=` as in the seed.
#[utoipa::path(post, path = "/", request_body = NewUser, security(("bearer" = [])),
    responses((status = 201, body = User), (status = 401, body = Detail),
               (status = 409, body = Detail), (status = 422, body = ValidationDetail)))]
async fn create_user(
    state: axum::extract::State<AppState>,
    Auth(by): Auth,
    Input(new, from): Input<NewUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let user = state
        .domain
        .create_user(&by, new)
        .await
        .map_err(ApiError::at(from))?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// A user's posts.
#[utoipa::path(get, path = "/{user_id}/posts", params(("user_id" = i64, Path), ListParams),
    responses((status = 200, body = [Post]), (status = 404, body = Detail)))]
async fn user_posts(
    state: axum::extract::State<AppState>,
    Path(user_id): Path<i64>,
    Query(q): Query<ListParams>,
) -> Result<Json<Vec<Post>>, ApiError> {
    Ok(Json(state.domain.posts_of_user(user_id, q.page()?).await?))
}

/// A user's friends.
#[utoipa::path(get, path = "/{user_id}/friends", params(("user_id" = i64, Path)),
    responses((status = 200, body = [User]), (status = 404, body = Detail)))]
async fn user_friends(
    state: axum::extract::State<AppState>,
    Path(user_id): Path<i64>,
) -> Result<Json<Vec<User>>, ApiError> {
    Ok(Json(state.domain.friends_of(user_id).await?))
}

/// Befriend another user (both become friends). Only one of the two, or an admin.
#[utoipa::path(put, path = "/{user_id}/friends/{friend_id}", security(("bearer" = [])),
    params(("user_id" = i64, Path), ("friend_id" = i64, Path)),
    responses((status = 204), (status = 403, body = Detail), (status = 404, body = Detail)))]
async fn add_friend(
    state: axum::extract::State<AppState>,
    Auth(by): Auth,
    Path((user_id, friend_id)): Path<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    state
        .domain
        .add_friend(&by, user_id, friend_id)
        .await
        .map_err(ApiError::path)?;
    Ok(StatusCode::NO_CONTENT)
}

/// End a friendship (both directions). Only one of the two, or an admin.
#[utoipa::path(delete, path = "/{user_id}/friends/{friend_id}", security(("bearer" = [])),
    params(("user_id" = i64, Path), ("friend_id" = i64, Path)),
    responses((status = 204), (status = 403, body = Detail), (status = 404, body = Detail)))]
async fn remove_friend(
    state: axum::extract::State<AppState>,
    Auth(by): Auth,
    Path((user_id, friend_id)): Path<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    state.domain.remove_friend(&by, user_id, friend_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Users API", description = "Users and their friendships."),
    servers((url = "/users")),
    paths(list_users, get_user, create_user, user_posts, user_friends, add_friend, remove_friend),
)]
pub struct UsersApi;

/// The sub-application's root: `GET` lists, `POST` creates.
pub fn root() -> MethodRouter<AppState> {
    get(list_users).post(create_user)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/{user_id}", get(get_user))
        .route("/{user_id}/posts", get(user_posts))
        .route("/{user_id}/friends", get(user_friends))
        .route(
            "/{user_id}/friends/{friend_id}",
            axum::routing::put(add_friend).delete(remove_friend),
        )
}
