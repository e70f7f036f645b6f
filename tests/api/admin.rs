//! The `/admin` sub-application.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn admin_routes_need_the_admin_role() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let admin = app.admin_token().await;
    for path in ["/admin/users", "/admin/settings", "/admin/stats"] {
        let r = app.get(path).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body, json!({"detail": "Admin role required"}));
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    // The role comes before the query's validation.
    let r = app
        .client
        .get(app.url("/admin/users?limit=many"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Docs stay public.
    assert_eq!(app.get("/admin/docs/").await.status(), StatusCode::OK);
    assert_eq!(
        app.get("/admin/openapi.json").await.status(),
        StatusCode::OK
    );
    app.stop().await;
}

#[tokio::test]
async fn admin_views() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let get = |path: &'static str| {
        let req = app.client.get(app.url(path)).bearer_auth(&admin);
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let users = get("/admin/users").await;
    assert_eq!(users["total"], 3);
    assert_eq!(users["users"][2]["role"], "admin");
    let settings = get("/admin/settings").await;
    assert_eq!(settings["settings"]["database"], "sqlite");
    assert!(
        !settings
            .to_string()
            .contains(crate::helpers::ADMIN_PASSWORD)
    );
    app.get("/users/1").await; // fills the cache
    let stats = get("/admin/stats").await;
    for key in [
        "cache_size",
        "websocket_connections",
        "sse_connections",
        "subscriptions",
        "total_requests",
    ] {
        assert!(stats[key].is_number(), "{key} missing: {stats}");
    }
    assert!(stats["cache_size"].as_u64().unwrap() >= 1);
    assert!(stats["active_users"].as_u64().unwrap() >= 1);
    app.stop().await;
}
