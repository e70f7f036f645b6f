//! The `/products` sub-application.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{eventually, postgres_url, shared_postgres_config, spawn_app, spawn_with};

fn gizmo() -> serde_json::Value {
    json!({
        "name": "Gizmo",
        "description": "A gizmo",
        "price": {"amount": 5.5, "currency": "EUR"},
        "category": "FOOD",
        "tags": ["a", "b"],
        "metadata": {"k": "v"}
    })
}

#[tokio::test]
async fn list_is_a_bare_array_with_total_header() {
    let app = spawn_app().await;
    let r = app.get("/products/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-total-count"], "2");
    let list: serde_json::Value = r.json().await.unwrap();
    assert_eq!(list[0]["name"], "Widget");
    assert_eq!(list[0]["price"], json!({"amount": 9.99, "currency": "USD"}));
    assert_eq!(list[0]["category"], "ELECTRONICS");
    assert_eq!(list[0]["tags"], json!(["tools"]));
    assert_eq!(list[0]["metadata"], json!({"color": "blue"}));

    let r = app.get("/products/?category=BOOKS").await;
    assert_eq!(r.headers()["x-total-count"], "1");
    let list: serde_json::Value = r.json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "Gadget");

    let r = app.get("/products/?page=2&page_size=1").await;
    let list: serde_json::Value = r.json().await.unwrap();
    assert_eq!(list[0]["name"], "Gadget");
    // page < 1 is page 1
    let (_, list) = app.get_json("/products/?page=0&page_size=1").await;
    assert_eq!(list[0]["name"], "Widget");
    let (status, err) = app.get_json("/products/?category=TOYS").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["detail"][0]["loc"], json!(["query", "category"]));
    app.stop().await;
}

#[tokio::test]
async fn get_product_and_not_found() {
    let app = spawn_app().await;
    let (status, p) = app.get_json("/products/2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(p["description"], "A gadget");
    assert_eq!(p["metadata"], json!({"size": "M"}));
    let (status, body) = app.get_json("/products/99").await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Product 99 not found"})
        )
    );
    app.stop().await;
}

#[tokio::test]
async fn catalogue_writes_need_the_admin_role() {
    let app = spawn_app().await;
    let (status, _) = app
        .send_json(Method::POST, "/products/", None, Some(gizmo()))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let alice = app.alice_token().await;
    let (status, body) = app
        .send_json(Method::POST, "/products/", Some(&alice), Some(gizmo()))
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::FORBIDDEN,
            json!({"detail": "Admin role required"})
        )
    );
    let (status, _) = app
        .send_json(Method::DELETE, "/products/1", Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The role is checked before the body is read, as a FastAPI dependency
    // would be: a body with errors is still a 403 for a caller without it.
    for (method, path) in [(Method::POST, "/products/"), (Method::PUT, "/products/1")] {
        let (status, _) = app
            .send_json(method, path, Some(&alice), Some(json!({})))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }

    let admin = app.admin_token().await;
    let created = app.create("/products/", Some(&admin), gizmo()).await;
    assert_eq!(created["id"], 3);
    assert_eq!(created["price"]["currency"], "EUR");

    // The cached copy is replaced by the update at once.
    let (_, before) = app.get_json("/products/3").await;
    assert_eq!(before["name"], "Gizmo");
    let mut changed = gizmo();
    changed["name"] = json!("Gizmo 2");
    let (status, updated) = app
        .send_json(
            Method::PUT,
            "/products/3",
            Some(&admin),
            Some(changed.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["name"], "Gizmo 2");
    let (_, after) = app.get_json("/products/3").await;
    assert_eq!(after["name"], "Gizmo 2");
    let (status, _) = app
        .send_json(Method::PUT, "/products/77", Some(&admin), Some(changed))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _) = app
        .send_json(Method::DELETE, "/products/3", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get_json("/products/3").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .send_json(Method::DELETE, "/products/3", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn invalid_products_are_rejected_whole() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let mut bad = gizmo();
    bad["price"] = json!({"amount": -1, "currency": "dollars"});
    bad["name"] = json!("");
    let (status, err) = app
        .send_json(Method::POST, "/products/", Some(&admin), Some(bad))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let locs: Vec<_> = err["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["loc"].clone())
        .collect();
    assert_eq!(
        locs,
        [
            json!(["body", "name"]),
            json!(["body", "price", "amount"]),
            json!(["body", "price", "currency"])
        ]
    );
    let mut bad = gizmo();
    bad["category"] = json!("TOYS");
    let (status, err) = app
        .send_json(Method::POST, "/products/", Some(&admin), Some(bad))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["detail"][0]["loc"], json!(["body", "category"]));
    let mut bad = gizmo();
    bad.as_object_mut().unwrap().remove("price");
    let (status, err) = app
        .send_json(Method::POST, "/products/", Some(&admin), Some(bad))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["detail"][0]["loc"], json!(["body", "price"]));
    assert_eq!(err["detail"][0]["type"], "missing");
    let r = app.get("/products/").await;
    assert_eq!(r.headers()["x-total-count"], "2");
    app.stop().await;
}

/// Two instances on one PostgreSQL database: a product cached by one is
/// refreshed there when the other changes it (the event log invalidates caches).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cache_follows_writes_from_another_instance() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = spawn_with(shared_postgres_config(dir.path(), "a", &url)).await;
    let b = spawn_with(shared_postgres_config(dir.path(), "b", &url)).await;
    let (_, cached) = b.get_json("/products/1").await;
    assert_eq!(cached["name"], "Widget");
    let admin = a.admin_token().await;
    let mut changed = cached.clone();
    changed["name"] = json!("Widget Pro");
    let (status, _) = a
        .send_json(Method::PUT, "/products/1", Some(&admin), Some(changed))
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("instance B to see the update", || async {
        let (_, p) = b.get_json("/products/1").await;
        (p["name"] == "Widget Pro").then_some(())
    })
    .await;
    a.stop().await;
    b.stop().await;
}
