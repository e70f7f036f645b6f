//! The application-level routes of SPEC §3, error shapes and limits.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{Sse, documents_hold, schemathesis, spawn_app, spawn_with, test_config};

#[tokio::test]
async fn index_names_every_protocol() {
    let app = spawn_app().await;
    let (status, body) = app.get_json("/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["graphql"], "/graphql");
    assert_eq!(body["events"], "/events");
    assert_eq!(body["websocket"], "/ws");
    assert_eq!(body["admin"], "/admin/docs");
    assert_eq!(body["docs"], "/docs");
    assert_eq!(body["ui"], "/ui");
    assert!(body["grpc"].is_u64());
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app().await;
    let (status, body) = app.get_json("/healthz").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"status": "ready", "database": "ok"}))
    );
    app.get("/users/1").await;
    let r = app.get("/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        text.contains(
            r#"prism_http_requests_total{method="GET",route="/users/{user_id}",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("prism_http_request_duration_seconds_bucket"));
    assert!(text.contains("prism_event_log_head"));
    assert!(!text.contains("nats_relay"), "no relay, no relay gauges");
    // The demo data was written at start-up.
    let counter = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let (writes, commits) = (
        counter("prism_sqlite_writes_total"),
        counter("prism_sqlite_commits_total"),
    );
    assert!(
        writes >= commits && commits >= 1,
        "{writes} writes, {commits} commits"
    );
    app.stop().await;
}

#[tokio::test]
async fn stats_count_requests_and_config_is_public() {
    let app = spawn_app().await;
    let (_, first) = app.get_json("/stats").await;
    let (_, second) = app.get_json("/stats").await;
    assert_eq!(
        second["total_requests"].as_u64().unwrap(),
        first["total_requests"].as_u64().unwrap() + 1
    );
    assert!(second["active_users"].is_u64());
    assert!(second["cache_size"].is_u64());
    let (status, config) = app.get_json("/config").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(config["max_upload_size"], 10_000_000);
    assert!(config.get("jwt_secret").is_none());
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_json() {
    let app = spawn_app().await;
    let (status, body) = app.get_json("/no/such/thing").await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"detail": "Not Found"}))
    );
    for path in ["/stats", "/graphql", "/users/1"] {
        let (status, body) = app.send_json(Method::DELETE, path, None, None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(body, json!({"detail": "Method Not Allowed"}), "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn request_id_is_generated_and_propagated() {
    let app = spawn_app().await;
    let r = app.get("/healthz").await;
    assert!(r.headers().contains_key("x-request-id"));
    let r = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    app.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_upload_size = 1_000;
    let app = spawn_with(config).await;
    let token = app.alice_token().await;
    let big = json!({"name": "x".repeat(2_000), "email": "big@example.com"});
    // Declared length over the limit.
    let (status, body) = app
        .send_json(Method::POST, "/users/", Some(&token), Some(big.clone()))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body, json!({"detail": "Request body too large"}));
    // Chunked, so no length is declared: the extractor's limit catches it.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(serde_json::to_vec(&big).unwrap())];
    let r = app
        .client
        .post(app.url("/users/"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (_, users) = app.get_json("/users/").await;
    assert!(
        users
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["email"] != "big@example.com")
    );
    app.stop().await;
}

/// A request head over the limit is refused with 431 before any handler
/// runs; one with large but usual headers (a big cookie) is served.
#[tokio::test]
async fn request_heads_over_64_kib_get_431() {
    let app = spawn_app().await;
    let get_with = |bytes: usize| {
        app.client
            .get(app.url("/users/1"))
            .header("cookie", format!("session={}", "a".repeat(bytes)))
            .send()
    };
    assert_eq!(get_with(32 * 1024).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        get_with(80 * 1024).await.unwrap().status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    app.stop().await;
}

/// A caller that says how long it will wait (`x-request-timeout-ms`, as the
/// gateway and the orders service say it) gets a 504 once that time has run
/// out, rather than an answer it no longer waits for, and the write it asked
/// for is not made.
#[tokio::test]
async fn a_write_past_its_callers_time_is_answered_504_and_not_made() {
    use sqlx::{ConnectOptions, Connection};
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(test_config(dir.path())).await;
    let token = app.alice_token().await;
    // Another process's write transaction on the same database file keeps
    // prism's writes waiting (for up to SQLite's busy timeout, 5 s).
    let mut other = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("prism.db"))
        .connect()
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let r = app
        .client
        .post(app.url("/users/"))
        .bearer_auth(&token)
        .header("x-request-timeout-ms", "100")
        .json(&json!({"name": "Late", "email": "late@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["detail"],
        "Deadline exceeded: no answer within the request's x-request-timeout-ms"
    );
    other.close().await.unwrap();
    // prism's one write connection takes writes in turn: once this one is
    // made, the interrupted one has been rolled back.
    app.create(
        "/users/",
        Some(&token),
        json!({"name": "Next", "email": "next@example.com"}),
    )
    .await;
    let (_, users) = app.get_json("/users/").await;
    let emails: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["email"].as_str())
        .collect();
    assert!(emails.contains(&"next@example.com"), "{emails:?}");
    assert!(!emails.contains(&"late@example.com"), "{emails:?}");
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with(
            r#"prism_http_requests_total{method="POST",route="/users/",status="504"} 1"#
        )),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn malformed_json_is_a_422() {
    let app = spawn_app().await;
    let token = app.alice_token().await;
    let r = app
        .client
        .post(app.url("/users/"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["detail"][0]["type"], "json_invalid");
    // No body at all is a missing body, as FastAPI says, with or without a
    // content type.
    for content_type in [None, Some("application/json")] {
        let mut req = app.client.post(app.url("/posts")).bearer_auth(&token);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["detail"],
            json!([{"loc": ["body"], "msg": "Field required", "type": "missing"}])
        );
    }
    app.stop().await;
}

/// Inputs read as JSON Schema and pydantic read them.
#[tokio::test]
async fn bodies_are_objects_and_whole_numbers_are_integers() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let post =
        |body: serde_json::Value| app.send_json(Method::POST, "/users/", Some(&alice), Some(body));

    // serde alone would fill a struct from an array.
    let (status, body) = app
        .send_json(
            Method::PATCH,
            "/posts/1",
            Some(&alice),
            Some(json!([null, null])),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["body"]));
    assert_eq!(body["detail"][0]["type"], "model_attributes_type");

    let (status, user) = post(json!({"name": "Py", "email": "py@example.com", "age": 30.0})).await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    assert_eq!(user["age"], 30);
    for (age, kind) in [
        (json!(30.5), "int_from_float"),
        (json!(1e300), "int_type"),
        (json!(9223372036854775808u64), "int_type"),
        (json!("thirty"), "int_type"),
    ] {
        let (status, body) =
            post(json!({"name": "Py", "email": "py2@example.com", "age": age})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{age}");
        assert_eq!(body["detail"][0]["loc"], json!(["body", "age"]), "{age}");
        assert_eq!(body["detail"][0]["type"], kind, "{age}");
    }
    let (_, body) = app.get_json("/users/?limit=ten").await;
    assert_eq!(
        body["detail"][0]["msg"],
        "Input should be a valid integer, unable to parse string as an integer"
    );
    let (_, body) = app.get_json("/products/?category=TOYS").await;
    assert_eq!(
        body["detail"][0]["msg"],
        "Input should be 'ELECTRONICS', 'CLOTHING', 'FOOD' or 'BOOKS'"
    );

    let (status, body) = app.get_json("/users/?offset=9223372036854775808").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["query", "offset"]));
    assert_eq!(body["detail"][0]["type"], "int_parsing_size");

    // The rule is about the path's ids, so the error is located there.
    let (status, body) = app
        .send_json(Method::PUT, "/users/1/friends/1", Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["path", "friend_id"]));
    app.stop().await;
}

#[tokio::test]
async fn versioned_items_views() {
    let app = spawn_app().await;
    let (status, v1) = app.get_json("/api/v1/items").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["items"].as_array().unwrap().len(), 2);
    assert_eq!(v1["items"][0]["name"], "Widget");
    let (_, v2) = app.get_json("/api/v2/items?page=1&page_size=1").await;
    let fields: Vec<&String> = v2.as_object().unwrap().keys().collect();
    assert_eq!(fields, ["version", "items", "metadata"]);
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        v2["metadata"],
        json!({"total": 2, "page": 1, "page_size": 1})
    );
    app.stop().await;
}

#[tokio::test]
async fn docs_are_served_from_the_binary() {
    let app = spawn_app().await;
    for (docs, spec, title) in [
        ("/docs/", "/openapi.json", "prism"),
        ("/users/docs/", "/users/openapi.json", "Users API"),
        ("/products/docs/", "/products/openapi.json", "Products API"),
        ("/admin/docs/", "/admin/openapi.json", "Admin Panel"),
    ] {
        let r = app.get(docs).await;
        assert_eq!(r.status(), StatusCode::OK, "{docs}");
        let html = r.text().await.unwrap();
        assert!(html.contains("swagger-ui"), "{docs}: {html}");
        assert!(!html.contains("https://"), "{docs} loads assets from a CDN");
        let (status, openapi) = app.get_json(spec).await;
        assert_eq!(status, StatusCode::OK, "{spec}");
        assert!(
            openapi["openapi"].as_str().unwrap().starts_with("3.1"),
            "{spec}"
        );
        assert_eq!(openapi["info"]["title"], title);
    }
    let (_, users_spec) = app.get_json("/users/openapi.json").await;
    assert!(users_spec["paths"]["/{user_id}"]["get"].is_object());
    // The streams and tasks are in /docs, as a FastAPI app lists them.
    let (_, main_spec) = app.get_json("/openapi.json").await;
    for path in [
        "/events",
        "/events/named",
        "/events/feed",
        "/stream",
        "/logs",
    ] {
        let ok = &main_spec["paths"][path]["get"]["responses"]["200"];
        assert!(
            ok["content"]["text/event-stream"].is_object(),
            "{path}: {ok}"
        );
    }
    let broadcast = &main_spec["paths"]["/broadcast"]["post"];
    assert_eq!(broadcast["security"], json!([{"bearer": []}]));
    let task = &main_spec["paths"]["/tasks"]["post"]["responses"]["202"];
    assert!(task["headers"]["location"].is_object(), "{task}");
    assert!(main_spec["paths"]["/progress/{task_id}"]["get"]["responses"]["404"].is_object());
    let initializer = app.get("/docs/swagger-initializer.js").await;
    assert_eq!(initializer.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn every_documented_operation_is_served_as_documented() {
    let app = spawn_app().await;
    let checked = documents_hold(&app.client, &app.url(""), &SPECS).await;
    assert!(checked > 30, "only {checked} operations documented");
    app.stop().await;
}

const SPECS: [&str; 4] = [
    "/openapi.json",
    "/users/openapi.json",
    "/products/openapi.json",
    "/admin/openapi.json",
];

#[tokio::test]
async fn schemathesis_finds_the_documents_true() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    schemathesis(&app.url(""), &SPECS, &admin).await;
    app.stop().await;
}

#[tokio::test]
async fn posts_comments_messages_and_orders_over_rest() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let post = app
        .create(
            "/posts",
            Some(&alice),
            json!({"title": "Hi", "content": "From REST"}),
        )
        .await;
    assert_eq!(post["author_id"], 1);
    let id = post["id"].as_i64().unwrap();
    let c = app
        .create(
            &format!("/posts/{id}/comments"),
            Some(&alice),
            json!({"content": "first"}),
        )
        .await;
    assert_eq!(c["user_id"], 1);
    let (_, comments) = app.get_json(&format!("/posts/{id}/comments")).await;
    assert_eq!(comments.as_array().unwrap().len(), 1);
    let (_, found) = app.get_json("/posts?q=from%20rest").await;
    assert_eq!(found[0]["id"], id);
    let m = app
        .create("/messages", Some(&alice), json!({"content": "hello"}))
        .await;
    assert_eq!(m["user_id"], 1);
    assert!(m["timestamp"].as_str().unwrap().contains('T'));
    let o = app
        .create("/orders", Some(&alice), json!({"total": 12.5}))
        .await;
    assert_eq!(o["status"], "pending");
    // A customer cannot place an order as already completed; an admin can
    // (recording one taken elsewhere).
    let completed = json!({"total": 3.0, "status": "completed", "user_id": 1});
    let (status, body) = app
        .send_json(
            Method::POST,
            "/orders",
            Some(&alice),
            Some(completed.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let admin = app.admin_token().await;
    let placed = app.create("/orders", Some(&admin), completed).await;
    assert_eq!(placed["status"], "completed");
    let (_, orders) = app.get_json("/orders?user_id=1").await;
    assert_eq!(orders.as_array().unwrap().len(), 3);
    let (status, body) = app.get_json("/orders/999").await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"detail": "Order not found"}))
    );
    let (_, order) = app.get_json("/orders/2").await;
    assert_eq!(order["total"], 149.99);
    assert_eq!(order["status"], "completed");
    // Orders never change once placed: the second read of one, new or old,
    // is served from the cache.
    for id in [o["id"].as_i64().unwrap(), 2] {
        let path = format!("/orders/{id}");
        let (_, first) = app.get_json(&path).await;
        let reads = app.state.domain.db().read_count();
        let (_, again) = app.get_json(&path).await;
        assert_eq!(app.state.domain.db().read_count(), reads, "{path}");
        assert_eq!(again, first);
    }
    assert_eq!(app.get_json(&format!("/orders/{}", o["id"])).await.1, o);
    app.stop().await;
}

#[tokio::test]
async fn a_patch_that_changes_nothing_writes_nothing() {
    let app = spawn_app().await;
    let (alice, bob) = (app.alice_token().await, app.bob_token().await);
    let (_, before) = app.get_json("/posts/1").await;
    let mut feed = Sse::connect(&app, "/events/feed?types=post.*", None).await;
    for patch in [json!({}), json!({"title": "First Post", "content": null})] {
        let (status, after) = app
            .send_json(Method::PATCH, "/posts/1", Some(&alice), Some(patch))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(after, before, "updated_at moved");
    }
    // Still only the author's to make.
    let (status, _) = app
        .send_json(Method::PATCH, "/posts/1", Some(&bob), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, after) = app
        .send_json(
            Method::PATCH,
            "/posts/1",
            Some(&alice),
            Some(json!({"title": "First Post!"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(after["updated_at"], before["updated_at"]);
    // Events come in order, so the first is this change's if the no-op
    // patches recorded none.
    let first = feed.next().await.expect("feed ended");
    let event: serde_json::Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(event["payload"]["title"], "First Post!", "{event}");
    app.stop().await;
}

#[tokio::test]
async fn owners_write_their_own_content_only() {
    let app = spawn_app().await;
    let bob = app.bob_token().await;
    let alice = app.alice_token().await;
    let admin = app.admin_token().await;
    // Bob may not write as Alice, nor touch her post.
    let (status, _) = app
        .send_json(
            Method::POST,
            "/posts",
            Some(&bob),
            Some(json!({"title": "x", "content": "y", "author_id": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = app
        .send_json(
            Method::PATCH,
            "/posts/1",
            Some(&bob),
            Some(json!({"title": "pwned"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = app
        .send_json(Method::DELETE, "/posts/1", Some(&bob), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app
        .send_json(
            Method::POST,
            "/messages",
            Some(&bob),
            Some(json!({"content": "x", "user_id": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, post) = app.get_json("/posts/1").await;
    assert_eq!(post["title"], "First Post");
    // Alice may; an admin may too.
    let (status, post) = app
        .send_json(
            Method::PATCH,
            "/posts/1",
            Some(&alice),
            Some(json!({"title": "Edited"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(post["title"], "Edited");
    assert_eq!(post["content"], "Hello World");
    let (status, _) = app
        .send_json(Method::DELETE, "/posts/3", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get_json("/posts/3").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Writes without a token are refused.
    let r = app
        .send(
            Method::POST,
            "/posts",
            None,
            Some(json!({"title": "x", "content": "y"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    app.stop().await;
}
