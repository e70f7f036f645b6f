//! The `/users` sub-application.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{Sse, spawn_app};

#[tokio::test]
async fn get_user_returns_alice() {
    let app = spawn_app().await;
    let (status, body) = app.get_json("/users/1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], 1);
    assert_eq!(body["name"], "Alice");
    assert_eq!(body["email"], "alice@example.com");
    assert_eq!(body["age"], 30);
    assert!(body.get("password_hash").is_none());
    app.stop().await;
}

#[tokio::test]
async fn unknown_and_malformed_ids() {
    let app = spawn_app().await;
    let (status, body) = app.get_json("/users/999").await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"detail": "User not found"}))
    );
    let (status, body) = app.get_json("/users/abc").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["path", "user_id"]));
    assert_eq!(body["detail"][0]["type"], "int_parsing");
    let (status, _) = app.get_json("/users/999/friends").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get_json("/users/999/posts").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn list_is_ordered_paged_and_capped() {
    let app = spawn_app().await;
    for path in ["/users/", "/users"] {
        let (status, body) = app.get_json(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let ids: Vec<i64> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3]);
    }
    let (_, body) = app.get_json("/users/?limit=1&offset=1").await;
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert_eq!(body[0]["name"], "Bob");
    let (status, _) = app.get_json("/users/?limit=5000").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.get_json("/users/?limit=-1").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["query", "limit"]));
    let (status, body) = app.get_json("/users/?limit=abc").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["query", "limit"]));
    app.stop().await;
}

#[tokio::test]
async fn posts_and_friends_of_a_user() {
    let app = spawn_app().await;
    let (_, posts) = app.get_json("/users/1/posts").await;
    let titles: Vec<&str> = posts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["First Post", "Second Post"]);
    assert_eq!(posts[0]["author_id"], 1);
    let (_, friends) = app.get_json("/users/1/friends").await;
    assert_eq!(friends.as_array().unwrap().len(), 1);
    assert_eq!(friends[0]["name"], "Bob");
    let (_, friends) = app.get_json("/users/2/friends").await;
    assert_eq!(friends[0]["name"], "Alice");
    app.stop().await;
}

#[tokio::test]
async fn create_user_needs_a_token_and_valid_input() {
    let app = spawn_app().await;
    let body = json!({"name": "Charlie", "email": "charlie@example.com", "age": 28});
    let r = app
        .send(Method::POST, "/users/", None, Some(body.clone()))
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = app
        .send(
            Method::POST,
            "/users/",
            Some("not-a-token"),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let token = app.alice_token().await;
    let created = app.create("/users/", Some(&token), body.clone()).await;
    assert_eq!(created["name"], "Charlie");
    assert_eq!(created["id"], 4);
    let (_, fetched) = app.get_json("/users/4").await;
    assert_eq!(fetched, created);

    // The seed's query-parameter form.
    let post_query = |query: &str| {
        app.client
            .post(app.url(&format!("/users/?{query}")))
            .bearer_auth(&token)
            .send()
    };
    let r = post_query("name=Dana&email=dana@example.com")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Query parameters still need the required fields, and a value the
    // domain refuses is located where it came from too.
    for (query, kind) in [
        ("name=Eve", "missing"),
        ("name=Eve&email=not-an-address", "value_error"),
    ] {
        let r = post_query(query).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let err: serde_json::Value = r.json().await.unwrap();
        assert_eq!(err["detail"][0]["loc"], json!(["query", "email"]), "{err}");
        assert_eq!(err["detail"][0]["type"], kind, "{err}");
    }

    // Duplicate email, any case.
    let (status, err) = app
        .send_json(
            Method::POST,
            "/users/",
            Some(&token),
            Some(json!({"name": "C2", "email": "Charlie@Example.com"})),
        )
        .await;
    assert_eq!(
        (status, err),
        (
            StatusCode::CONFLICT,
            json!({"detail": "Email already registered"})
        )
    );

    // Every broken rule is reported, and nothing is written.
    let (status, err) = app
        .send_json(
            Method::POST,
            "/users/",
            Some(&token),
            Some(json!({"name": "", "email": "nope", "age": 151})),
        )
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
            json!(["body", "email"]),
            json!(["body", "age"])
        ]
    );
    let (_, all) = app.get_json("/users/").await;
    assert_eq!(all.as_array().unwrap().len(), 5);
    app.stop().await;
}

#[tokio::test]
async fn friendships_are_made_by_one_of_the_two() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let bob = app.bob_token().await;
    let (status, _) = app
        .send_json(Method::PUT, "/users/1/friends/3", Some(&bob), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app
        .send_json(Method::PUT, "/users/3/friends/2", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, friends) = app.get_json("/users/2/friends").await;
    let names: Vec<&str> = friends
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Alice", "admin"]);
    app.stop().await;
}

#[tokio::test]
async fn friendships_are_ended_by_one_of_the_two() {
    let app = spawn_app().await;
    let (admin, alice, bob) = (
        app.admin_token().await,
        app.alice_token().await,
        app.bob_token().await,
    );
    let mut feed = Sse::connect(&app, "/events/feed?types=friend.*", None).await;
    let (status, _) = app
        .send_json(Method::PUT, "/users/3/friends/2", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    feed.next_named("friend.added").await;
    // Alice is neither of the two.
    let (status, _) = app
        .send_json(Method::DELETE, "/users/3/friends/2", Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Bob is the second of the two.
    let (status, _) = app
        .send_json(Method::DELETE, "/users/1/friends/2", Some(&bob), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let removed = feed.next_named("friend.removed").await;
    let payload = &serde_json::from_str::<serde_json::Value>(&removed.data).unwrap()["payload"];
    assert_eq!(payload, &json!({"user_id": 1, "friend_id": 2}));
    for user in [1, 2] {
        let (_, friends) = app.get_json(&format!("/users/{user}/friends")).await;
        let ids: Vec<i64> = friends
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, if user == 1 { vec![] } else { vec![3] }, "user {user}");
    }
    let (status, body) = app
        .send_json(Method::DELETE, "/users/2/friends/1", Some(&bob), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["detail"], "Friendship not found");
    let (status, _) = app
        .send_json(Method::DELETE, "/users/1/friends/2", None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}
