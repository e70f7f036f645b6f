//! The `/products` sub-application (mounted, with its own `/products/docs`),
//! and the versioned catalogue views `/api/v1/items` and `/api/v2/items`.

use axum::{
    Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{
    Detail,
    error::ApiError,
    extract::{Admin, Json, Path, Query},
    openapi::ValidationDetail,
};
use crate::{
    domain::{Category, NewProduct, Page, Product},
    state::AppState,
};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CatalogueParams {
    /// 1-based page; below 1 means 1.
    pub page: Option<i64>,
    /// Items per page; 0 or absent means 20, capped at 100.
    pub page_size: Option<i64>,
    /// Only this category.
    pub category: Option<Category>,
}

impl CatalogueParams {
    async fn fetch(&self, state: &AppState) -> Result<(Vec<Product>, i64, i64, i64), ApiError> {
        let (window, page, size) = Page::numbered(self.page, self.page_size);
        let (items, total) = state.domain.list_products(self.category, window).await?;
        Ok((items, total, page, size))
    }
}

/// One page of the catalogue as a bare list (as in the seed); the number of
/// matching products is in `X-Total-Count`.
#[utoipa::path(get, path = "/", params(CatalogueParams),
    responses((status = 200, body = [Product], headers(("x-total-count" = i64)))))]
async fn list_products(
    State(state): State<AppState>,
    Query(q): Query<CatalogueParams>,
) -> Result<Response, ApiError> {
    let (items, total, _, _) = q.fetch(&state).await?;
    let mut r = Json(items).into_response();
    r.headers_mut().insert(
        HeaderName::from_static("x-total-count"),
        HeaderValue::from(total),
    );
    Ok(r)
}

/// One product.
#[utoipa::path(get, path = "/{product_id}", params(("product_id" = i64, Path)),
    responses((status = 200, body = Product), (status = 404, body = Detail)))]
async fn get_product(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let p = state.domain.get_product(id).await?;
    Ok(Json(&*p).into_response())
}

/// Add a product (admin).
#[utoipa::path(post, path = "/", request_body = NewProduct, security(("bearer" = [])),
    responses((status = 201, body = Product), (status = 401, body = Detail),
              (status = 403, body = Detail), (status = 422, body = ValidationDetail)))]
async fn create_product(
    State(state): State<AppState>,
    Admin(by): Admin,
    Json(new): Json<NewProduct>,
) -> Result<(StatusCode, Json<Product>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.domain.create_product(&by, new).await?),
    ))
}

/// Replace a product (admin).
#[utoipa::path(put, path = "/{product_id}", request_body = NewProduct, security(("bearer" = [])),
    params(("product_id" = i64, Path)),
    responses((status = 200, body = Product), (status = 403, body = Detail),
              (status = 404, body = Detail), (status = 422, body = ValidationDetail)))]
async fn update_product(
    State(state): State<AppState>,
    Admin(by): Admin,
    Path(id): Path<i64>,
    Json(new): Json<NewProduct>,
) -> Result<Json<Product>, ApiError> {
    Ok(Json(state.domain.update_product(&by, id, new).await?))
}

/// Delete a product (admin).
#[utoipa::path(delete, path = "/{product_id}", security(("bearer" = [])),
    params(("product_id" = i64, Path)),
    responses((status = 204), (status = 403, body = Detail), (status = 404, body = Detail)))]
async fn delete_product(
    State(state): State<AppState>,
    Admin(by): Admin,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    state.domain.delete_product(&by, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Version 1 of the items view.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemsV1 {
    #[schema(example = 1)]
    version: u8,
    items: Vec<Product>,
}

/// Version 2 of the items view: version 1 with paging metadata.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemsV2 {
    #[schema(example = 2)]
    version: u8,
    items: Vec<Product>,
    metadata: PageMetadata,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PageMetadata {
    /// Matching products on every page.
    total: i64,
    page: i64,
    page_size: i64,
}

/// Version 1 of the items view: `{"version": 1, "items": [...]}`.
#[utoipa::path(get, path = "/api/v1/items", params(CatalogueParams), tag = "items",
    responses((status = 200, body = ItemsV1)))]
pub async fn items_v1(
    State(state): State<AppState>,
    Query(q): Query<CatalogueParams>,
) -> Result<Json<ItemsV1>, ApiError> {
    let (items, _, _, _) = q.fetch(&state).await?;
    Ok(Json(ItemsV1 { version: 1, items }))
}

/// Version 2 of the items view, with paging metadata.
#[utoipa::path(get, path = "/api/v2/items", params(CatalogueParams), tag = "items",
    responses((status = 200, body = ItemsV2)))]
pub async fn items_v2(
    State(state): State<AppState>,
    Query(q): Query<CatalogueParams>,
) -> Result<Json<ItemsV2>, ApiError> {
    let (items, total, page, page_size) = q.fetch(&state).await?;
    Ok(Json(ItemsV2 {
        version: 2,
        items,
        metadata: PageMetadata {
            total,
            page,
            page_size,
        },
    }))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Products API", description = "The product catalogue. Writes need the admin role."),
    servers((url = "/products")),
    paths(list_products, get_product, create_product, update_product, delete_product),
)]
pub struct ProductsApi;

/// The sub-application's root: `GET` lists, `POST` creates.
pub fn root() -> MethodRouter<AppState> {
    get(list_products).post(create_product)
}

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/{product_id}",
        get(get_product).put(update_product).delete(delete_product),
    )
}
