//! The gateway's OpenAPI document and its Swagger UI (`/openapi.json`,
//! `/docs`), as the seed's FastAPI gateway has them. Only a request that no
//! route matched comes here, so the proxy's hot path does not pay for them.
//!
//! A test checks that the document lists each of the gateway's routes
//! ([`super::Route`]) with the method it allows.

use axum::{body::Body, response::Response};
use hyper::{Request, body::Incoming};
use serde::Serialize;
use tower::ServiceExt;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    domain::{Order, User},
    http::openapi,
};

/// A user and their orders, fetched from the two services at once.
#[derive(Serialize, ToSchema)]
struct UserOrders {
    user: User,
    orders: Vec<Order>,
    /// The parts that could not be fetched (`/user-profile` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    degraded: Option<Vec<String>>,
}

/// The operations, each on a function that is never called: the gateway
/// matches its routes by hand.
#[allow(dead_code)]
mod operations {
    use super::UserOrders;
    use crate::{
        domain::{NewOrder, Order, Product, User},
        http::{Detail, products::CatalogueParams},
    };

    /// A user, from the users service.
    #[utoipa::path(get, path = "/api/users/{user_id}", tag = "users", params(("user_id" = i64, Path)),
        responses((status = 200, body = User), (status = 404, body = Detail),
                  (status = 503, body = Detail, description = "No instance of the service can answer")))]
    fn user() {}

    /// An order, with its user embedded by the orders service.
    #[utoipa::path(get, path = "/api/orders/{order_id}", tag = "orders", params(("order_id" = i64, Path)),
        responses((status = 200, body = Order, description = "The order, with `user` (a User, or null)"),
                  (status = 404, body = Detail), (status = 503, body = Detail)))]
    fn order() {}

    /// A user and their orders, fetched in parallel.
    #[utoipa::path(get, path = "/api/user-orders/{user_id}", tag = "orders", params(("user_id" = i64, Path)),
        responses((status = 200, body = UserOrders), (status = 404, body = Detail), (status = 503, body = Detail)))]
    fn user_orders() {}

    /// A user's profile: without the orders service, `"orders": []` and
    /// `"degraded": ["orders"]`.
    #[utoipa::path(get, path = "/user-profile/{user_id}", tag = "users", params(("user_id" = i64, Path)),
        responses((status = 200, body = UserOrders), (status = 404, body = Detail),
                  (status = 503, body = Detail, description = "User service unavailable")))]
    fn user_profile() {}

    /// Place an order (sent once: a POST is never retried).
    #[utoipa::path(post, path = "/orders", tag = "orders", request_body = NewOrder, security(("bearer" = [])),
        responses((status = 201, body = Order), (status = 403, body = Detail), (status = 503, body = Detail)))]
    fn create_order() {}

    /// A product, from the products service over gRPC.
    #[utoipa::path(get, path = "/api/products/{product_id}", tag = "products", params(("product_id" = i64, Path)),
        responses((status = 200, body = Product), (status = 404, body = Detail), (status = 503, body = Detail),
                  (status = 504, body = Detail)))]
    fn product() {}

    /// A page of products, from the products service over gRPC.
    #[utoipa::path(get, path = "/api/products", tag = "products", params(CatalogueParams),
        responses((status = 200, body = [Product], headers(("x-total-count" = i64))),
                  (status = 400, body = Detail), (status = 503, body = Detail)))]
    fn products() {}

    /// Every instance's health and circuit state.
    #[utoipa::path(get, path = "/healthz", tag = "meta", responses((status = 200)))]
    fn healthz() {}

    /// Prometheus metrics (text exposition format).
    #[utoipa::path(get, path = "/metrics", tag = "meta", responses((status = 200, content_type = "application/openmetrics-text", body = String)))]
    fn metrics() {}
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "prism gateway",
        description = "The API gateway over the users, orders and products services: \
        retries with backoff for idempotent requests, a circuit breaker per instance, \
        and an overall deadline."
    ),
    paths(
        operations::user,
        operations::order,
        operations::user_orders,
        operations::user_profile,
        operations::create_order,
        operations::product,
        operations::products,
        operations::healthz,
        operations::metrics
    )
)]
struct GatewayApi;

/// The gateway's document, with the accounts routes it forwards to the
/// users service.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = GatewayApi::openapi();
    doc.merge(crate::http::auth::AuthApi::openapi());
    openapi::finish(doc)
}

/// Serves `/openapi.json` and `/docs` (`None` for any other path).
pub struct Docs(axum::Router);

impl Docs {
    pub fn new() -> Docs {
        Docs(
            SwaggerUi::new("/docs")
                .url("/openapi.json", document())
                .into(),
        )
    }

    pub fn serves(path: &str) -> bool {
        path == "/openapi.json" || path == "/docs" || path.starts_with("/docs/")
    }

    pub async fn answer(&self, req: Request<Incoming>) -> Response {
        let r = self.0.clone().oneshot(req.map(Body::new)).await;
        match r {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_its_method() {
        let doc = document();
        for route in super::super::Route::ALL {
            let item = doc
                .paths
                .paths
                .get(route.path())
                .unwrap_or_else(|| panic!("{} is not documented", route.path()));
            let documented = if route.is_write() {
                item.post.is_some()
            } else {
                item.get.is_some()
            };
            assert!(documented, "{} {}", route.allow(), route.path());
        }
    }
}
