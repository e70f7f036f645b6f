//! `/auth/register`, `/auth/login` and tokens.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn register_then_login_every_way() {
    let app = spawn_app().await;
    let body = app.create("/auth/register", None, json!({"username": "carol", "email": "carol@example.com", "password": "carol-password"})).await;
    assert_eq!(body, json!({"message": "User created", "id": 4}));

    // JSON
    let token = app.login("carol", "carol-password").await;
    assert!(!token.is_empty());
    // Form (OAuth2 password flow)
    let r = app
        .client
        .post(app.url("/auth/login"))
        .form(&[("username", "carol"), ("password", "carol-password")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["token_type"], "bearer");
    // Query parameters, as in the seed; and by email.
    let r = app
        .client
        .post(app.url("/auth/login?username=carol@example.com&password=carol-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The token works for writes.
    let t = body["access_token"].as_str().unwrap();
    app.create("/messages", Some(t), json!({"content": "hi from carol"}))
        .await;
    app.stop().await;
}

#[tokio::test]
async fn registration_rules() {
    let app = spawn_app().await;
    let (status, body) = app
        .send_json(
            Method::POST,
            "/auth/register",
            None,
            Some(json!({"username": "alice", "email": "other@example.com", "password": "long-enough"})),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::CONFLICT,
            json!({"detail": "Username already taken"})
        )
    );
    let (status, body) = app
        .send_json(
            Method::POST,
            "/auth/register",
            None,
            Some(json!({"username": "alice2", "email": "alice@example.com", "password": "long-enough"})),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::CONFLICT,
            json!({"detail": "Email already registered"})
        )
    );
    let (status, body) = app
        .send_json(
            Method::POST,
            "/auth/register",
            None,
            Some(json!({"username": "x", "email": "bad", "password": "short"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"].as_array().unwrap().len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn wrong_password_then_rate_limit() {
    let app = spawn_app().await;
    let attempt = |password: &'static str| {
        app.send_json(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({"username": "bob", "password": password})),
        )
    };
    for _ in 0..10 {
        let (status, body) = attempt("wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, json!({"detail": "Incorrect username or password"}));
    }
    let r = app
        .send(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({"username": "bob", "password": "wrong"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    // Even the right password waits out the window.
    let (status, _) = attempt(prism::demo::BOB_PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another username from the same client is unaffected.
    app.alice_token().await;
    // Unknown users get the same answer as a wrong password.
    let (status, body) = app
        .send_json(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({"username": "nobody", "password": "whatever1"})),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNAUTHORIZED,
            json!({"detail": "Incorrect username or password"})
        )
    );
    app.stop().await;
}

#[tokio::test]
async fn tampered_and_foreign_tokens_are_refused() {
    let app = spawn_app().await;
    let token = app.alice_token().await;
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let foreign = prism::auth::TokenKeys::new(&[9u8; 32], std::time::Duration::from_secs(60))
        .unwrap()
        .issue(1, prism::auth::Role::Admin)
        .unwrap();
    for bad in [tampered, foreign] {
        let r = app
            .send(
                Method::POST,
                "/messages",
                Some(&bad),
                Some(json!({"content": "x"})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    app.stop().await;
}
