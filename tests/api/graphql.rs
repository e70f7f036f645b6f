//! GraphQL (SPEC §4): the seed's operations, auth, limits, batching, the
//! HTTP transport's negotiation, and subscriptions over both WebSocket protocols.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, Ws, WsMessage, node, node_clients, spawn_app, spawn_with, test_config,
};

fn code(body: &Value) -> &str {
    body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("")
}

#[tokio::test]
async fn the_seeds_queries() {
    let app = spawn_app().await;
    let r = app
        .graphql(
            "query { user(id: 1) { id name email age } }",
            json!({}),
            None,
        )
        .await;
    assert_eq!(
        r,
        json!({"data": {"user": {"id": 1, "name": "Alice", "email": "alice@example.com", "age": 30}}})
    );
    let r = app
        .graphql("query { users { id name email } }", json!({}), None)
        .await;
    assert_eq!(r["data"]["users"].as_array().unwrap().len(), 3);
    assert_eq!(r["data"]["users"][1]["name"], "Bob");
    let r = app
        .graphql(
            "query { posts(authorId: 1) { id title content } }",
            json!({}),
            None,
        )
        .await;
    assert_eq!(
        r["data"]["posts"],
        json!([
            {"id": 1, "title": "First Post", "content": "Hello World"},
            {"id": 2, "title": "Second Post", "content": "GraphQL is great"}
        ])
    );
    let r = app
        .graphql(
            "query { userWithPosts(userId: 1) { id name email posts { id title comments { id content } } } }",
            json!({}),
            None,
        )
        .await;
    let posts = &r["data"]["userWithPosts"]["posts"];
    assert_eq!(posts[0]["comments"][1]["content"], "Thanks, Bob");
    assert_eq!(
        posts[1]["comments"][0]["content"],
        "Agreed, GraphQL is great"
    );
    let r = app
        .graphql(
            r#"{ searchPosts(query: "graphql") { id title } }"#,
            json!({}),
            None,
        )
        .await;
    assert_eq!(
        r["data"]["searchPosts"],
        json!([{"id": 2, "title": "Second Post"}])
    );
    let r = app
        .graphql(
            r#"{ searchPosts(query: "post", limit: 1, offset: 1) { id } }"#,
            json!({}),
            None,
        )
        .await;
    assert_eq!(r["data"]["searchPosts"], json!([{"id": 2}]));
    let r = app
        .graphql(
            "{ post(id: 1) { title authorId createdAt author { name } comments { userId postId } } missing: post(id: 99) { id } nobody: user(id: 99) { id } }",
            json!({}),
            None,
        )
        .await;
    assert_eq!(r["data"]["post"]["author"]["name"], "Alice");
    assert!(
        r["data"]["post"]["createdAt"]
            .as_str()
            .unwrap()
            .contains('T')
    );
    assert_eq!(r["data"]["missing"], Value::Null);
    assert_eq!(r["data"]["nobody"], Value::Null);
    let r = app
        .graphql(
            "{ users(limit: 1, offset: 1) { name friends { name } } }",
            json!({}),
            None,
        )
        .await;
    assert_eq!(
        r["data"]["users"],
        json!([{"name": "Bob", "friends": [{"name": "Alice"}]}])
    );
    app.stop().await;
}

#[tokio::test]
async fn the_seeds_mutations() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let r = app
        .graphql(
            r#"mutation { createUser(name: "Charlie", email: "charlie@example.com", age: 28) { id name email } }"#,
            json!({}),
            Some(&alice),
        )
        .await;
    assert_eq!(
        r,
        json!({"data": {"createUser": {"id": 4, "name": "Charlie", "email": "charlie@example.com"}}})
    );
    // ... and REST sees it.
    let (_, user) = app.get_json("/users/4").await;
    assert_eq!(user["name"], "Charlie");

    let r = app
        .graphql(
            "mutation($t: String!) { createPost(title: $t, content: \"Body\", authorId: 1) { id title authorId author { name } createdAt updatedAt } }",
            json!({"t": "Via GraphQL"}),
            Some(&alice),
        )
        .await;
    let post_id = r["data"]["createPost"]["id"].as_i64().unwrap();
    assert_eq!(r["data"]["createPost"]["author"]["name"], "Alice");
    let created = &r["data"]["createPost"]["createdAt"];
    assert_eq!(&r["data"]["createPost"]["updatedAt"], created);

    let r = app
        .graphql(
            &format!(r#"mutation {{ updatePost(postId: {post_id}, title: "Renamed") {{ title content updatedAt }} }}"#),
            json!({}),
            Some(&alice),
        )
        .await;
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert!(
        time(&r["data"]["updatePost"]["updatedAt"]) > time(created),
        "{r}"
    );
    assert_eq!(r["data"]["updatePost"]["title"], "Renamed");
    assert_eq!(r["data"]["updatePost"]["content"], "Body");
    let r = app
        .graphql(
            r#"mutation { updatePost(postId: 999, title: "x") { id } }"#,
            json!({}),
            Some(&alice),
        )
        .await;
    assert_eq!(r["data"]["updatePost"], Value::Null);

    let r = app
        .graphql(
            &format!(r#"mutation {{ createComment(postId: {post_id}, content: "Mine") {{ userId postId content }} }}"#),
            json!({}),
            Some(&alice),
        )
        .await;
    assert_eq!(r["data"]["createComment"]["userId"], 1);

    let r = app
        .graphql(
            r#"mutation { sendMessage(content: "hi", userId: 1) { id content userId timestamp } }"#,
            json!({}),
            Some(&alice),
        )
        .await;
    assert_eq!(r["data"]["sendMessage"]["content"], "hi");
    assert!(
        r["data"]["sendMessage"]["timestamp"]
            .as_str()
            .unwrap()
            .contains('T')
    );

    let delete = format!("mutation {{ deletePost(postId: {post_id}) }}");
    let r = app.graphql(&delete, json!({}), Some(&alice)).await;
    assert_eq!(r["data"]["deletePost"], true);
    let r = app.graphql(&delete, json!({}), Some(&alice)).await;
    assert_eq!(r["data"]["deletePost"], false);
    app.stop().await;
}

#[tokio::test]
async fn writes_follow_the_auth_and_owner_rules() {
    let app = spawn_app().await;
    let r = app
        .graphql(
            r#"mutation { sendMessage(content: "x", userId: 1) { id } }"#,
            json!({}),
            None,
        )
        .await;
    assert_eq!(code(&r), "UNAUTHENTICATED");
    let bob = app.bob_token().await;
    let r = app
        .graphql(
            r#"mutation { updatePost(postId: 1, title: "mine now") { id } }"#,
            json!({}),
            Some(&bob),
        )
        .await;
    assert_eq!(code(&r), "FORBIDDEN");
    let r = app
        .graphql(
            r#"mutation { sendMessage(content: "x", userId: 1) { id } }"#,
            json!({}),
            Some(&bob),
        )
        .await;
    assert_eq!(code(&r), "FORBIDDEN");
    let r = app
        .graphql(
            r#"mutation { createUser(name: "", email: "nope") { id } }"#,
            json!({}),
            Some(&bob),
        )
        .await;
    assert_eq!(code(&r), "BAD_USER_INPUT");
    assert_eq!(
        r["errors"][0]["extensions"]["fields"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let r = app
        .graphql(
            r#"mutation { createUser(name: "A", email: "alice@example.com") { id } }"#,
            json!({}),
            Some(&bob),
        )
        .await;
    assert_eq!(code(&r), "CONFLICT");
    // Nothing above changed anything.
    let r = app
        .graphql("{ post(id: 1) { title } users { id } }", json!({}), None)
        .await;
    assert_eq!(r["data"]["post"]["title"], "First Post");
    assert_eq!(r["data"]["users"].as_array().unwrap().len(), 3);
    // A token that does not verify is refused whatever the operation.
    let r = app
        .send(
            Method::POST,
            "/graphql",
            Some("bogus"),
            Some(json!({"query": "{ users { id } }"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(code(&body), "UNAUTHENTICATED");
    app.stop().await;
}

async fn raw(
    app: &TestApp,
    accept: Option<&str>,
    content_type: Option<&str>,
    body: &str,
) -> (StatusCode, String, Value) {
    let mut req = app.client.post(app.url("/graphql")).body(body.to_owned());
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    if let Some(c) = content_type {
        req = req.header("content-type", c);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn http_transport_negotiates_and_uses_the_right_status_codes() {
    let app = spawn_app().await;
    let ok = r#"{"query": "{ __typename }"}"#;
    let grj = Some("application/graphql-response+json");
    let json_ct = Some("application/json");
    let (s, ct, _) = raw(&app, grj, json_ct, ok).await;
    assert_eq!(s, 200);
    assert!(ct.starts_with("application/graphql-response+json"));
    let (s, ct, _) = raw(&app, Some("application/json"), json_ct, ok).await;
    assert_eq!(s, 200);
    assert!(ct.starts_with("application/json"));
    let (s, ct, _) = raw(&app, None, json_ct, ok).await;
    assert_eq!(s, 200);
    assert!(ct.starts_with("application/json"));
    // Not JSON at all / no content type / no body / wrong shapes: 4xx.
    assert_eq!(raw(&app, grj, json_ct, r#"{ "not a JSON"#).await.0, 400);
    assert_eq!(raw(&app, None, None, ok).await.0, 415);
    assert_eq!(raw(&app, None, json_ct, "").await.0, 400);
    assert_eq!(raw(&app, None, json_ct, r#"{"query": 1}"#).await.0, 400);
    assert_eq!(
        raw(
            &app,
            None,
            json_ct,
            r#"{"query": "{ a }", "variables": "x"}"#
        )
        .await
        .0,
        400
    );
    // Parse and validation failures: 400 without `data` for graphql-response+json,
    // 200 for application/json.
    let (s, _, body) = raw(&app, grj, json_ct, r#"{"query": "{"}"#).await;
    assert_eq!(s, 400);
    assert!(body.get("data").is_none());
    assert_eq!(
        raw(&app, Some("application/json"), json_ct, r#"{"query": "{"}"#)
            .await
            .0,
        200
    );
    let (s, _, body) = raw(&app, grj, json_ct, r#"{"query": "{ nope }"}"#).await;
    assert_eq!(s, 400);
    assert!(body.get("data").is_none());
    let coercion =
        r#"{"query": "query Q($id: Int!) { user(id: $id) { id } }", "variables": {"id": null}}"#;
    assert_eq!(raw(&app, grj, json_ct, coercion).await.0, 400);
    assert_eq!(
        raw(&app, Some("application/json"), json_ct, coercion)
            .await
            .0,
        200
    );

    // GET runs queries, never mutations.
    let r = app
        .get("/graphql?query=%7B%20user(id%3A%201)%20%7B%20name%20%7D%20%7D")
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["data"]["user"]["name"],
        "Alice"
    );
    let r = app
        .client
        .get(app.url("/graphql?query=mutation%20%7B%20deletePost(postId%3A%201)%20%7D"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = app
        .client
        .get(app.url("/graphql?query=query%20Q(%24n%3A%20String!)%20%7B%20__type(name%3A%20%24n)%20%7B%20name%20%7D%20%7D&variables=%7B%22n%22%3A%22User%22%7D"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["data"]["__type"]["name"],
        "User"
    );
    app.stop().await;
}

#[tokio::test]
async fn graphiql_is_served_from_the_binary() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/graphql"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("GraphiQL"));
    assert!(
        !html.contains("https://"),
        "GraphiQL must not load from a CDN"
    );
    for asset in [
        "graphiql.min.js",
        "graphiql.min.css",
        "react.production.min.js",
        "react-dom.production.min.js",
    ] {
        let r = app.get(&format!("/graphql/assets/{asset}")).await;
        assert_eq!(r.status(), 200, "{asset}");
        assert!(r.bytes().await.unwrap().len() > 1000);
    }
    app.stop().await;
}

/// A query already found valid skips the rules that find mistakes when it
/// comes again without variables; nothing a client sees changes. Repeated
/// valid requests get the same answers, and invalid ones, unknown operations,
/// bad variables and queries over the limits are refused every time.
#[tokio::test]
async fn repeated_queries_are_answered_and_refused_as_the_first_time() {
    let app = spawn_app().await;
    let url = app.url("/graphql");
    let (client, url) = (&app.client, url.as_str());
    let post = |body: Value| async move {
        let r = client
            .post(url)
            .header("accept", "application/graphql-response+json")
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    let two = "query A { user(id: 1) { name } } query B { user(id: 2) { name } }";
    let deep = format!(
        "{{ user(id: 1) {}{} }}",
        "{ friends ".repeat(20),
        "{ id }".to_owned() + &" }".repeat(20)
    );
    let by_variable = "query Q($id: Int!) { user(id: $id) { name } }";
    let flagged = "query F($f: Boolean!) { user(id: 1) { name email @include(if: $f) } }";
    let defaulted = "query N($id: Int = 1) { user(id: $id) { name } }";
    let search = "query S($q: String!) { searchPosts(query: $q) { id } }";
    let mut first = Vec::new();
    for round in 0..3 {
        let answers = vec![
            post(json!({"query": "{ user(id: 1) { name } }"})).await,
            post(json!({"query": two, "operationName": "B"})).await,
            post(json!({"query": two, "operationName": "A"})).await,
            post(json!({"query": two, "operationName": "C"})).await,
            post(json!({"query": two})).await,
            post(json!({"query": "{ user(id: 1) { name nope } }"})).await,
            post(json!({"query": deep})).await,
            post(json!({"query": by_variable, "variables": {"id": 2}})).await,
            post(json!({"query": by_variable, "variables": {"id": "x"}})).await,
            post(json!({"query": by_variable})).await,
            // Once an operation has passed with good variables, values the
            // full rules would refuse, or might, are still refused.
            post(json!({"query": by_variable, "variables": {"id": 1.5}})).await,
            post(json!({"query": by_variable, "variables": {"id": null}})).await,
            post(json!({"query": by_variable, "variables": {"id": -1}})).await,
            post(json!({"query": by_variable, "variables": {"id": 3_000_000_000_u64}})).await,
            post(json!({"query": flagged, "variables": {"f": true}})).await,
            post(json!({"query": flagged, "variables": {"f": "yes"}})).await,
            post(json!({"query": defaulted, "variables": {"id": 2}})).await,
            post(json!({"query": defaulted, "variables": {"id": null}})).await,
            post(json!({"query": search, "variables": {"q": "hello"}})).await,
            post(json!({"query": search, "variables": {"q": 5}})).await,
        ];
        if round == 0 {
            first = answers;
            continue;
        }
        assert_eq!(answers, first, "round {round}");
    }
    let status = |i: usize| first[i].0;
    let name = |i: usize| first[i].1["data"]["user"]["name"].clone();
    assert_eq!((status(0), name(0)), (StatusCode::OK, json!("Alice")));
    assert_eq!((status(1), name(1)), (StatusCode::OK, json!("Bob")));
    assert_eq!((status(2), name(2)), (StatusCode::OK, json!("Alice")));
    assert_eq!((status(7), name(7)), (StatusCode::OK, json!("Bob")));
    assert_eq!(
        (status(14), &first[14].1["data"]["user"]),
        (
            StatusCode::OK,
            &json!({"name": "Alice", "email": "alice@example.com"})
        )
    );
    assert_eq!((status(16), name(16)), (StatusCode::OK, json!("Bob")));
    assert_eq!(status(18), StatusCode::OK);
    for refused in [3, 4, 5, 6, 8, 9, 10, 11, 15, 19] {
        assert_eq!(
            status(refused),
            StatusCode::BAD_REQUEST,
            "{:?}",
            first[refused]
        );
        assert!(
            first[refused].1.get("data").is_none(),
            "{:?}",
            first[refused]
        );
    }
    let message = |i: usize| {
        first[i].1["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(message(5).contains("nope"), "{}", message(5));
    assert!(message(6).contains("nested too deep"), "{}", message(6));
    assert_eq!(
        message(9),
        r#"Variable "$id" of required type "Int!" was not provided."#
    );
    assert_eq!(code(&first[9].1), "BAD_USER_INPUT");
    // A default stands in for a variable not given, and only the operation
    // that runs needs its variables.
    let with_default = "query Q($id: Int! = 2) { user(id: $id) { name } }";
    let (status, body) = post(json!({"query": with_default})).await;
    assert_eq!(
        (status, &body["data"]["user"]["name"]),
        (StatusCode::OK, &json!("Bob"))
    );
    let other = "query A { user(id: 1) { name } } query B($id: Int!) { user(id: $id) { name } }";
    let (status, body) = post(json!({"query": other, "operationName": "A"})).await;
    assert_eq!(
        (status, &body["data"]["user"]["name"]),
        (StatusCode::OK, &json!("Alice"))
    );
    app.stop().await;
}

#[tokio::test]
async fn limits_are_graphql_errors_not_crashes() {
    let app = spawn_app().await;
    let deep = format!(
        "{{ user(id: 1) {}{} }}",
        "{ friends ".repeat(20),
        "{ id }".to_owned() + &" }".repeat(20)
    );
    let started = Instant::now();
    let r = app.graphql(&deep, json!({}), None).await;
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nested too deep"),
        "{r}"
    );
    let aliases: String = (0..3000)
        .map(|i| format!("a{i}: user(id: 1) {{ id }} "))
        .collect();
    let r = app
        .graphql(&format!("{{ {aliases} }}"), json!({}), None)
        .await;
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("complex"),
        "{r}"
    );
    let huge = format!("{{ __typename }} # {}", "x".repeat(150_000));
    let r = app.graphql(&huge, json!({}), None).await;
    assert_eq!(code(&r), "QUERY_TOO_LARGE");
    for bad in [
        "{",
        "{ user(id: ) }",
        "}}}",
        "query { user(id: \"x\") { id } }",
    ] {
        let r = app.graphql(bad, json!({}), None).await;
        assert!(r["errors"].is_array(), "{bad}: {r}");
        assert!(r.get("data").is_none_or(Value::is_null), "{bad}: {r}");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // Still serving.
    let r = app
        .graphql("{ user(id: 2) { name } }", json!({}), None)
        .await;
    assert_eq!(r["data"]["user"]["name"], "Bob");
    app.stop().await;
}

/// An Int beyond 32 bits (GraphQL's Int) passes validation and is refused
/// when the field runs: the client's mistake, not the server's.
#[tokio::test]
async fn out_of_range_ints_are_bad_user_input() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    for (query, variables) in [
        ("{ user(id: 2147483648) { id } }", json!({})),
        ("{ users(limit: -2147483649) { id } }", json!({})),
        (
            "query($id: Int!) { post(id: $id) { id } }",
            json!({"id": 4294967296u64}),
        ),
        ("mutation { deletePost(postId: 24578921864) }", json!({})),
    ] {
        let r = app.graphql(query, variables, Some(&alice)).await;
        assert!(r.get("data").is_none_or(Value::is_null), "{query}: {r}");
        let code = code(&r);
        assert!(
            code == "BAD_USER_INPUT" || code == "GRAPHQL_VALIDATION_FAILED",
            "{query}: {r}"
        );
    }
    app.stop().await;
}

/// Statements a query runs do not grow with the number of parents.
#[tokio::test]
async fn nested_fields_are_batched() {
    const QUERY: &str = "{ posts(limit: 1000) { author { name } comments { content } } }";
    let mut counts = Vec::new();
    for posts in [10usize, 200] {
        let dir = tempfile::tempdir().unwrap();
        // The event pump's own reads are not counted (they serve no request).
        let app = spawn_with(test_config(dir.path())).await;
        let admin = app.admin_token().await;
        for i in 0..posts {
            let author = 1 + (i % 3) as i64;
            let post = app
                .create(
                    "/posts",
                    Some(&admin),
                    json!({"title": format!("p{i}"), "content": "c", "author_id": author}),
                )
                .await;
            if i % 2 == 0 {
                app.send_json(
                    Method::POST,
                    &format!("/posts/{}/comments", post["id"]),
                    Some(&admin),
                    Some(json!({"content": "hi"})),
                )
                .await;
            }
        }
        let before = app.state.domain.db().read_count();
        let r = app.graphql(QUERY, json!({}), None).await;
        let after = app.state.domain.db().read_count();
        assert_eq!(r["data"]["posts"].as_array().unwrap().len(), posts + 3);
        assert!(r.get("errors").is_none(), "{r}");
        counts.push(after - before);
        app.stop().await;
    }
    assert_eq!(
        counts[0], counts[1],
        "statement counts for 10 and 200 posts: {counts:?}"
    );
    assert!(counts[0] <= 3, "{counts:?}");
}

#[tokio::test]
async fn introspection_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.graphql.introspection = false;
    let app = spawn_with(config).await;
    let r = app
        .graphql("{ __schema { types { name } } }", json!({}), None)
        .await;
    assert_eq!(r["data"]["__schema"], Value::Null, "{r}");
    let r = app
        .graphql("{ user(id: 1) { name } }", json!({}), None)
        .await;
    assert_eq!(r["data"]["user"]["name"], "Alice");
    app.stop().await;
}

// ---- subscriptions -------------------------------------------------------

async fn send_message_over_rest(app: &TestApp, token: &str, content: &str) {
    app.create("/messages", Some(token), json!({"content": content}))
        .await;
}

#[tokio::test]
async fn graphql_transport_ws_message_by_message() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let mut ws = app
        .websocket("/graphql", Some("graphql-transport-ws"))
        .await;
    ws.send_json(
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {alice}")}}),
    )
    .await;
    assert_eq!(ws.next_json().await["type"], "connection_ack");
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong");
    ws.send_json(json!({
        "id": "m", "type": "subscribe",
        "payload": {"query": "subscription { messageAdded(userId: 1) { id content userId timestamp } }"}
    }))
    .await;
    ws.send_json(json!({
        "id": "p", "type": "subscribe",
        "payload": {"query": "subscription { postCreated(authorId: 2) { title authorId } }"}
    }))
    .await;
    // A write through REST reaches the subscription.
    send_message_over_rest(&app, &alice, "over REST").await;
    let next = ws.next_json().await;
    assert_eq!(next["type"], "next");
    assert_eq!(next["id"], "m");
    assert_eq!(
        next["payload"]["data"]["messageAdded"]["content"],
        "over REST"
    );
    assert_eq!(next["payload"]["data"]["messageAdded"]["userId"], 1);
    // A mutation over the same socket reaches it too.
    ws.send_json(json!({
        "id": "w", "type": "subscribe",
        "payload": {"query": "mutation { sendMessage(content: \"over WS\", userId: 1) { id } }"}
    }))
    .await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = ws.next_json().await;
        seen.push((
            m["id"].as_str().unwrap().to_owned(),
            m["type"].as_str().unwrap().to_owned(),
            m,
        ));
    }
    assert!(seen.iter().any(|(id, t, _)| id == "w" && t == "next"));
    assert!(seen.iter().any(|(id, t, _)| id == "w" && t == "complete"));
    assert!(seen.iter().any(|(id, t, m)| id == "m"
        && t == "next"
        && m["payload"]["data"]["messageAdded"]["content"] == "over WS"));
    // The author filter: Alice's post is not delivered, Bob's is.
    let bob = app.bob_token().await;
    for (token, title) in [(&alice, "by alice"), (&bob, "by bob")] {
        app.send_json(
            Method::POST,
            "/posts",
            Some(token),
            Some(json!({"title": title, "content": "x"})),
        )
        .await;
    }
    let next = ws.next_json().await;
    assert_eq!(next["id"], "p");
    assert_eq!(
        next["payload"]["data"]["postCreated"],
        json!({"title": "by bob", "authorId": 2})
    );
    // The client completes one subscription; the other keeps running.
    ws.send_json(json!({"id": "m", "type": "complete"})).await;
    send_message_over_rest(&app, &alice, "after complete").await;
    app.send_json(
        Method::POST,
        "/posts",
        Some(&bob),
        Some(json!({"title": "again", "content": "x"})),
    )
    .await;
    let next = ws.next_json().await;
    assert_eq!(next["id"], "p", "no message after complete: {next}");
    app.stop().await;
}

#[tokio::test]
async fn legacy_graphql_ws_message_by_message() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let mut ws = app.websocket("/graphql", Some("graphql-ws")).await;
    ws.send_json(json!({"type": "connection_init", "payload": {}}))
        .await;
    assert_eq!(ws.next_json().await["type"], "connection_ack");
    assert_eq!(
        ws.next_json().await["type"],
        "ka",
        "a keep-alive right after the ack"
    );
    ws.send_json(json!({
        "id": "1", "type": "start",
        "payload": {"query": "subscription { messageAdded { content } }"}
    }))
    .await;
    send_message_over_rest(&app, &alice, "legacy").await;
    let data = ws.next_json().await;
    assert_eq!(data["type"], "data");
    assert_eq!(data["id"], "1");
    assert_eq!(data["payload"]["data"]["messageAdded"]["content"], "legacy");
    ws.send_json(json!({"id": "1", "type": "stop"})).await;
    let complete = ws.next_json().await;
    assert_eq!(complete, json!({"type": "complete", "id": "1"}));
    app.stop().await;
}

#[tokio::test]
async fn operations_before_the_ack_close_the_socket() {
    let app = spawn_app().await;
    for (protocol, kind) in [
        ("graphql-transport-ws", "subscribe"),
        ("graphql-ws", "start"),
    ] {
        let mut ws = app.websocket("/graphql", Some(protocol)).await;
        ws.send_json(json!({
            "id": "1", "type": kind,
            "payload": {"query": "subscription { messageAdded { id } }"}
        }))
        .await;
        assert_eq!(ws.close_code().await, Some(4401), "{protocol}");
    }
    app.stop().await;
}

/// A `graphql-transport-ws` socket past its `connection_ack`, anonymous.
async fn acked_socket(app: &TestApp) -> Ws {
    let mut ws = app
        .websocket("/graphql", Some("graphql-transport-ws"))
        .await;
    ws.send_json(json!({"type": "connection_init"})).await;
    assert_eq!(ws.next_json().await["type"], "connection_ack");
    ws
}

/// graphql-transport-ws: a second `subscribe` with the id of a running
/// operation closes the socket with 4409, as the protocol requires, rather
/// than replacing the first.
#[tokio::test]
async fn a_subscription_id_in_use_closes_the_socket_with_4409() {
    let app = spawn_app().await;
    let mut ws = acked_socket(&app).await;
    let subscribe = json!({
        "id": "1", "type": "subscribe",
        "payload": {"query": "subscription { messageAdded { id } }"}
    });
    ws.send_json(subscribe.clone()).await;
    ws.send_json(subscribe).await;
    assert_eq!(ws.close_code().await, Some(4409));
    app.stop().await;
}

/// A socket that never sends `connection_init` is closed with 4408 once the
/// client idle timeout passes.
#[tokio::test]
async fn a_socket_never_initialised_is_closed_with_4408() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.client_idle_timeout = std::time::Duration::from_millis(300);
    let app = spawn_with(config).await;
    for protocol in ["graphql-transport-ws", "graphql-ws"] {
        let mut ws = app.websocket("/graphql", Some(protocol)).await;
        assert_eq!(ws.close_code().await, Some(4408), "{protocol}");
    }
    app.stop().await;
}

/// A message the protocol does not know closes the socket with 4400 and a
/// reason that fits in a close frame (the state machine's own reason, which
/// lists every message type, did not).
#[tokio::test]
async fn an_unknown_message_type_closes_with_a_valid_4400() {
    let app = spawn_app().await;
    let mut ws = acked_socket(&app).await;
    ws.send_json(json!({"type": "bogus"})).await;
    assert_eq!(ws.close_code().await, Some(4400));
    app.stop().await;
}

#[tokio::test]
async fn a_bad_token_in_connection_init_closes_the_socket() {
    let app = spawn_app().await;
    for protocol in ["graphql-transport-ws", "graphql-ws"] {
        let mut ws = app.websocket("/graphql", Some(protocol)).await;
        ws.send_json(
            json!({"type": "connection_init", "payload": {"Authorization": "Bearer forged"}}),
        )
        .await;
        assert_eq!(ws.close_code().await, Some(4403), "{protocol}");
    }
    // No subprotocol at all is refused before the upgrade.
    let r = app
        .client
        .get(app.url("/graphql"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    app.stop().await;
}

/// Identical live subscriptions run once: sockets subscribing to the same
/// document as the same caller hold one event-log subscription between them,
/// and each is sent every message. One that replays history (`afterEventId`)
/// runs on its own; one leaving does not end the others' execution.
#[tokio::test]
async fn identical_subscriptions_share_one_execution() {
    use std::sync::atomic::Ordering;
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let events = app.state.domain.events().clone();
    let subscriptions = || app.state.stats.subscriptions.load(Ordering::Relaxed);
    let before = events.subscriber_count();
    let subscribe = |query: &'static str| {
        let app = &app;
        async move {
            let mut ws = acked_socket(app).await;
            ws.send_json(json!({"id": "s", "type": "subscribe", "payload": {"query": query}}))
                .await;
            ws
        }
    };
    let shared = "subscription { messageAdded { id content } }";
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(subscribe(shared).await);
    }
    // Every socket has joined and the execution reads the log: all are live.
    crate::helpers::eventually("the three subscriptions to be live", || async {
        (subscriptions() == 3 && events.subscriber_count() > before).then_some(())
    })
    .await;
    send_message_over_rest(&app, &alice, "to all three").await;
    for ws in &mut sockets {
        let m = ws.next_json().await;
        assert_eq!(m["id"], "s");
        assert_eq!(
            m["payload"]["data"]["messageAdded"]["content"],
            "to all three"
        );
    }
    assert_eq!(
        events.subscriber_count(),
        before + 1,
        "one execution for all three"
    );

    let mut replaying =
        subscribe("subscription { messageAdded(afterEventId: 0) { content } }").await;
    crate::helpers::eventually("the replaying subscription to run on its own", || async {
        (events.subscriber_count() == before + 2).then_some(())
    })
    .await;
    assert_eq!(replaying.next_json().await["type"], "next");

    // The first leaves; the other two are still sent what follows.
    sockets[0]
        .send_json(json!({"id": "s", "type": "complete"}))
        .await;
    crate::helpers::eventually("the first to leave", || async {
        (subscriptions() == 3).then_some(())
    })
    .await;
    send_message_over_rest(&app, &alice, "to the two left").await;
    for ws in &mut sockets[1..] {
        assert_eq!(
            ws.next_json().await["payload"]["data"]["messageAdded"]["content"],
            "to the two left"
        );
    }
    assert_eq!(events.subscriber_count(), before + 2);
    // With all three gone, so is their execution.
    drop(sockets);
    crate::helpers::eventually("the shared execution to end", || async {
        (events.subscriber_count() == before + 1).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn shutdown_completes_subscriptions_and_closes_with_1001() {
    let app = spawn_app().await;
    let mut ws = acked_socket(&app).await;
    ws.send_json(json!({
        "id": "s", "type": "subscribe",
        "payload": {"query": "subscription { messageAdded { id } }"}
    }))
    .await;
    // Once a message arrives, the subscription is certainly live.
    let alice = app.alice_token().await;
    send_message_over_rest(&app, &alice, "before shutdown").await;
    assert_eq!(ws.next_json().await["type"], "next");
    assert_eq!(
        app.state
            .stats
            .subscriptions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let stopping = tokio::spawn(app.stop());
    assert_eq!(ws.next_json().await, json!({"id": "s", "type": "complete"}));
    match ws.next().await {
        Some(WsMessage::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    stopping.await.unwrap();
}

// ---- third-party clients (node) -------------------------------------------

#[tokio::test]
async fn graphql_http_audit_suite_passes() {
    let Some(dir) = node_clients() else { return };
    let app = spawn_app().await;
    let out = node(&dir, &["audit.mjs", &app.url("/graphql")]).await;
    assert!(out.status.success(), "graphql-http audits failed");
    app.stop().await;
}

#[tokio::test]
async fn the_graphql_ws_client_library_subscribes() {
    let Some(dir) = node_clients() else { return };
    let app = spawn_app().await;
    let token = app.alice_token().await;
    let out = node(&dir, &["subscribe.mjs", &app.url(""), &token]).await;
    assert!(out.status.success(), "graphql-ws client failed");
    let delivered: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(
        delivered["data"]["messageAdded"]["content"],
        "from graphql-ws"
    );
    app.stop().await;
}

/// SPEC §2: a reconnecting client resumes from the last event id it saw. A
/// subscription's messages carry their `eventId`; subscribing again with
/// `afterEventId` replays what was sent meanwhile (filters applied), in
/// order, then goes live.
#[tokio::test]
async fn a_subscription_resumes_after_the_last_event_id_it_saw() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let bob = app.bob_token().await;
    let subscribe =
        |query: &str| json!({"id": "1", "type": "subscribe", "payload": {"query": query}});

    // From the start of the log (the demo has no messages), so the first
    // message cannot slip in before the subscription is running.
    let mut ws = acked_socket(&app).await;
    ws.send_json(subscribe(
        "subscription { messageAdded(userId: 1, afterEventId: 0) { content eventId } }",
    ))
    .await;
    send_message_over_rest(&app, &alice, "one").await;
    let first = ws.next_json().await;
    assert_eq!(first["payload"]["data"]["messageAdded"]["content"], "one");
    let seen = first["payload"]["data"]["messageAdded"]["eventId"]
        .as_i64()
        .unwrap_or_else(|| panic!("no eventId: {first}"));
    drop(ws);

    for (token, content) in [(&alice, "two"), (&bob, "bob's"), (&alice, "three")] {
        send_message_over_rest(&app, token, content).await;
    }
    let mut ws = acked_socket(&app).await;
    ws.send_json(subscribe(&format!(
        "subscription {{ messageAdded(userId: 1, afterEventId: {seen}) {{ content eventId }} }}"
    )))
    .await;
    let mut got = Vec::new();
    let mut last = seen;
    while got.len() < 3 {
        if got.len() == 2 {
            send_message_over_rest(&app, &alice, "four, live").await;
        }
        let next = ws.next_json().await;
        let m = &next["payload"]["data"]["messageAdded"];
        let id = m["eventId"].as_i64().unwrap_or_else(|| panic!("{next}"));
        assert!(id > last, "event ids go up: {next}");
        last = id;
        got.push(m["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, ["two", "three", "four, live"]);

    // Outside a subscription there is no event to name.
    let body = app
        .graphql("{ post(id: 1) { eventId } }", json!({}), None)
        .await;
    assert_eq!(body["data"]["post"]["eventId"], Value::Null);
    let mut ws = acked_socket(&app).await;
    ws.send_json(subscribe(
        "subscription { postCreated(afterEventId: -1) { id } }",
    ))
    .await;
    let error = ws.next_json().await;
    assert_eq!(error["type"], "next", "{error}");
    assert_eq!(
        error["payload"]["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{error}"
    );
    app.stop().await;
}
