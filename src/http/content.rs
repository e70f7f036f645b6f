//! REST routes for posts, comments, messages and orders. SPEC §3 names only
//! the user and product sub-applications; these give REST clients the same
//! writes GraphQL and gRPC have, under the same rules.

use axum::{Router, extract::State, http::StatusCode, routing::get};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{
    Detail,
    error::ApiError,
    extract::{Auth, Json, Path, Query},
    openapi::ValidationDetail,
};
use crate::{
    domain::{Comment, Message, NewOrder, NewPost, Order, Page, Post, PostPatch},
    state::AppState,
};

#[derive(Debug, Deserialize, IntoParams)]
pub struct PostQuery {
    /// Only posts by this author.
    pub author_id: Option<i64>,
    /// Only posts whose title or content contains this text (any case).
    pub q: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// List posts, optionally by author or matching a search.
#[utoipa::path(get, path = "/posts", params(PostQuery), tag = "posts",
    responses((status = 200, body = [Post])))]
async fn list_posts(
    State(state): State<AppState>,
    Query(q): Query<PostQuery>,
) -> Result<Json<Vec<Post>>, ApiError> {
    let page = Page::new(q.limit, q.offset).map_err(ApiError::query)?;
    Ok(Json(match &q.q {
        Some(text) => state.domain.search_posts(text, page).await?,
        None => state.domain.list_posts(q.author_id, page).await?,
    }))
}

#[utoipa::path(get, path = "/posts/{post_id}", params(("post_id" = i64, Path)), tag = "posts",
    responses((status = 200, body = Post), (status = 404, body = Detail)))]
async fn get_post(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<Post>, ApiError> {
    Ok(Json(state.domain.get_post(id).await?))
}

/// Publish a post; `author_id` defaults to the caller.
#[utoipa::path(post, path = "/posts", request_body = NewPost, tag = "posts", security(("bearer" = [])),
    responses((status = 201, body = Post), (status = 401, body = Detail),
              (status = 403, body = Detail), (status = 422, body = ValidationDetail)))]
async fn create_post(
    State(state): State<AppState>,
    Auth(by): Auth,
    Json(new): Json<NewPost>,
) -> Result<(StatusCode, Json<Post>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.domain.create_post(&by, new).await?),
    ))
}

/// Change a post's title or content (author or admin).
#[utoipa::path(patch, path = "/posts/{post_id}", request_body = PostPatch, tag = "posts",
    security(("bearer" = [])), params(("post_id" = i64, Path)),
    responses((status = 200, body = Post), (status = 403, body = Detail), (status = 404, body = Detail)))]
async fn update_post(
    State(state): State<AppState>,
    Auth(by): Auth,
    Path(id): Path<i64>,
    Json(patch): Json<PostPatch>,
) -> Result<Json<Post>, ApiError> {
    Ok(Json(state.domain.update_post(&by, id, patch).await?))
}

/// Delete a post and its comments (author or admin).
#[utoipa::path(delete, path = "/posts/{post_id}", tag = "posts", security(("bearer" = [])),
    params(("post_id" = i64, Path)),
    responses((status = 204), (status = 403, body = Detail), (status = 404, body = Detail)))]
async fn delete_post(
    State(state): State<AppState>,
    Auth(by): Auth,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    state.domain.delete_post(&by, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/posts/{post_id}/comments", params(("post_id" = i64, Path)), tag = "posts",
    responses((status = 200, body = [Comment]), (status = 404, body = Detail)))]
async fn list_comments(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<Vec<Comment>>, ApiError> {
    Ok(Json(state.domain.comments_of_post(id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewComment {
    pub content: String,
    /// Defaults to the caller; only an admin may name someone else.
    #[serde(default, deserialize_with = "crate::domain::validate::whole_number")]
    pub user_id: Option<i64>,
}

#[utoipa::path(post, path = "/posts/{post_id}/comments", request_body = NewComment, tag = "posts",
    security(("bearer" = [])), params(("post_id" = i64, Path)),
    responses((status = 201, body = Comment), (status = 404, body = Detail),
              (status = 422, body = ValidationDetail)))]
async fn create_comment(
    State(state): State<AppState>,
    Auth(by): Auth,
    Path(id): Path<i64>,
    Json(new): Json<NewComment>,
) -> Result<(StatusCode, Json<Comment>), ApiError> {
    let c = state
        .domain
        .create_comment(&by, id, &new.content, new.user_id)
        .await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ByUserQuery {
    /// Only items of this user.
    pub user_id: Option<i64>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

impl ByUserQuery {
    fn page(&self) -> Result<Page, ApiError> {
        Page::new(self.limit, self.offset).map_err(ApiError::query)
    }
}

#[utoipa::path(get, path = "/messages", params(ByUserQuery), tag = "messages",
    responses((status = 200, body = [Message])))]
async fn list_messages(
    State(state): State<AppState>,
    Query(q): Query<ByUserQuery>,
) -> Result<Json<Vec<Message>>, ApiError> {
    Ok(Json(
        state.domain.list_messages(q.user_id, q.page()?).await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewMessage {
    pub content: String,
    /// Defaults to the caller; only an admin may name someone else.
    #[serde(default, deserialize_with = "crate::domain::validate::whole_number")]
    pub user_id: Option<i64>,
}

/// Send a chat message; every real-time surface sees it.
#[utoipa::path(post, path = "/messages", request_body = NewMessage, tag = "messages",
    security(("bearer" = [])),
    responses((status = 201, body = Message), (status = 403, body = Detail),
              (status = 422, body = ValidationDetail)))]
async fn send_message(
    State(state): State<AppState>,
    Auth(by): Auth,
    Json(new): Json<NewMessage>,
) -> Result<(StatusCode, Json<Message>), ApiError> {
    let m = state
        .domain
        .send_message(&by, &new.content, new.user_id)
        .await?;
    Ok((StatusCode::CREATED, Json(m)))
}

#[utoipa::path(get, path = "/orders", params(ByUserQuery), tag = "orders",
    responses((status = 200, body = [Order])))]
async fn list_orders(
    State(state): State<AppState>,
    Query(q): Query<ByUserQuery>,
) -> Result<Json<Vec<Order>>, ApiError> {
    Ok(Json(state.domain.list_orders(q.user_id, q.page()?).await?))
}

#[utoipa::path(get, path = "/orders/{order_id}", params(("order_id" = i64, Path)), tag = "orders",
    responses((status = 200, body = Order), (status = 404, body = Detail)))]
async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<Order>, ApiError> {
    Ok(Json(state.domain.get_order(id).await?))
}

/// Place an order; `user_id` defaults to the caller.
#[utoipa::path(post, path = "/orders", request_body = NewOrder, tag = "orders",
    security(("bearer" = [])),
    responses((status = 201, body = Order), (status = 403, body = Detail),
              (status = 422, body = ValidationDetail)))]
async fn create_order(
    State(state): State<AppState>,
    Auth(by): Auth,
    Json(new): Json<NewOrder>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.domain.create_order(&by, new).await?),
    ))
}

#[derive(OpenApi)]
#[openapi(paths(
    list_posts,
    get_post,
    create_post,
    update_post,
    delete_post,
    list_comments,
    create_comment,
    list_messages,
    send_message,
    list_orders,
    get_order,
    create_order
))]
pub struct ContentApi;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/posts", get(list_posts).post(create_post))
        .route(
            "/posts/{post_id}",
            get(get_post).patch(update_post).delete(delete_post),
        )
        .route(
            "/posts/{post_id}/comments",
            get(list_comments).post(create_comment),
        )
        .route("/messages", get(list_messages).post(send_message))
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/{order_id}", get(get_order))
}
