//! Server-Sent Events, WebSockets and background tasks (SPEC §6).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    STALLED_LOGIN, Sse, TestApp, WAIT, WsMessage, idle_connections_are_closed, node, node_clients,
    shared_postgres_config, spawn_app, spawn_with, spawn_with_idle_timeout, sqlite_and_postgres,
    stalled_body_answer, test_config,
};

async fn broadcast(app: &TestApp, token: &str, message: &str) {
    let r = app
        .client
        .post(app.url("/broadcast"))
        .query(&[("message", message)])
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status": "broadcasted"})
    );
}

#[tokio::test]
async fn sse_headers_and_the_counter() {
    let app = spawn_app().await;
    let mut sse = Sse::connect(&app, "/events", None).await;
    let h = &sse.response_headers;
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    let first = sse.next().await.unwrap();
    assert_eq!(first.id.as_deref(), Some("1"));
    assert_eq!(first.json()["count"], 1);
    assert!(first.json()["timestamp"].as_str().unwrap().contains('T'));
    assert_eq!(sse.next().await.unwrap().json()["count"], 2);
    // A reconnecting EventSource continues the count.
    let mut again = Sse::connect(&app, "/events", Some("41")).await;
    assert_eq!(again.next().await.unwrap().json()["count"], 42);
    app.stop().await;
}

#[tokio::test]
async fn named_events_carry_writes_from_every_protocol() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let mut sse = Sse::connect(&app, "/events/named", None).await;
    // REST write of another kind: a notification.
    let user = app
        .create(
            "/users/",
            Some(&alice),
            json!({"name": "Dora", "email": "dora@example.com"}),
        )
        .await;
    let n = sse.next_named("notification").await;
    let body = n.json();
    assert_eq!(body["type"], "info");
    assert_eq!(body["text"], format!("User {} created", user["id"]));
    assert_eq!(body["event"], "user.created");
    assert_eq!(n.id.as_deref(), Some(body["id"].to_string().as_str()));
    // A message over REST, then one over GraphQL: `message` events.
    app.send_json(
        Method::POST,
        "/messages",
        Some(&alice),
        Some(json!({"content": "via REST"})),
    )
    .await;
    let m = sse.next_named("message").await.json();
    assert_eq!(m["content"], "via REST");
    assert_eq!(m["user_id"], 1);
    app.graphql(
        r#"mutation { sendMessage(content: "via GraphQL", userId: 1) { id } }"#,
        json!({}),
        Some(&alice),
    )
    .await;
    assert_eq!(
        sse.next_named("message").await.json()["content"],
        "via GraphQL"
    );
    // A gRPC write too.
    let mut grpc =
        prism::grpc::pb::user::user_service_client::UserServiceClient::new(app.grpc().await);
    let mut req = tonic::Request::new(prism::grpc::pb::user::CreateUserRequest {
        name: "Gus".into(),
        email: "gus@example.com".into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    let gus = grpc.create_user(req).await.unwrap().into_inner();
    let n = sse.next_named("notification").await.json();
    assert_eq!(n["text"], format!("User {} created", gus.id));
    // The heartbeat (200 ms in tests), data `ping` as in the seed.
    let hb = sse.next_named("heartbeat").await;
    assert_eq!(hb.data, "ping");
    app.stop().await;
}

#[tokio::test]
async fn broadcast_reaches_every_stream_subscriber() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let r = app
        .client
        .post(app.url("/broadcast?message=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let mut a = Sse::connect(&app, "/stream", None).await;
    let mut b = Sse::connect(&app, "/stream", None).await;
    broadcast(&app, &alice, "hello all").await;
    // JSON body too.
    let (status, _) = app
        .send_json(
            Method::POST,
            "/broadcast",
            Some(&alice),
            Some(json!({"message": "second"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for sse in [&mut a, &mut b] {
        let first = sse.next().await.unwrap();
        assert_eq!(first.event, None, "the browser's default `message` event");
        assert!(first.id.is_some());
        assert_eq!(first.json()["message"], "hello all");
        assert!(first.json()["timestamp"].is_string());
        assert_eq!(sse.next().await.unwrap().json()["message"], "second");
    }
    let (status, _) = app
        .send_json(
            Method::POST,
            "/broadcast",
            Some(&alice),
            Some(json!({"message": ""})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    app.stop().await;
}

#[tokio::test]
async fn last_event_id_replays_exactly_what_was_missed() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let mut sse = Sse::connect(&app, "/stream", None).await;
    broadcast(&app, &alice, "one").await;
    let one = sse.next().await.unwrap();
    drop(sse);
    broadcast(&app, &alice, "two").await;
    broadcast(&app, &alice, "three").await;
    let mut resumed = Sse::connect(&app, "/stream", one.id.as_deref()).await;
    let two = resumed.next().await.unwrap();
    let three = resumed.next().await.unwrap();
    assert_eq!(
        (
            two.json()["message"].clone(),
            three.json()["message"].clone()
        ),
        (json!("two"), json!("three"))
    );
    broadcast(&app, &alice, "four").await;
    assert_eq!(resumed.next().await.unwrap().json()["message"], "four");
    // An id that is not an id: live from now.
    let mut fresh = Sse::connect(&app, "/stream", Some("not-a-number")).await;
    broadcast(&app, &alice, "five").await;
    assert_eq!(fresh.next().await.unwrap().json()["message"], "five");
    app.stop().await;
}

#[tokio::test]
async fn resuming_past_retention_gets_a_reset_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.event_retention = std::time::Duration::ZERO;
    let app = spawn_with(config).await;
    let alice = app.alice_token().await;
    broadcast(&app, &alice, "old").await;
    app.state.domain.events().enforce_retention().await.unwrap();
    broadcast(&app, &alice, "new").await;
    let mut sse = Sse::connect(&app, "/stream", Some("1")).await;
    let reset = sse.next().await.unwrap();
    assert_eq!(reset.event.as_deref(), Some("reset"));
    assert_eq!(reset.json(), json!({"reason": "history truncated"}));
    assert_eq!(sse.next().await.unwrap().json()["message"], "new");
    app.stop().await;
}

#[tokio::test]
async fn the_domain_feed_filters_by_type() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let mut sse = Sse::connect(&app, "/events/feed?types=order.*", None).await;
    app.send_json(
        Method::POST,
        "/messages",
        Some(&alice),
        Some(json!({"content": "not an order"})),
    )
    .await;
    let (_, order) = app
        .send_json(
            Method::POST,
            "/orders",
            Some(&alice),
            Some(json!({"total": 42.0})),
        )
        .await;
    let ev = sse.next().await.unwrap();
    assert_eq!(ev.event.as_deref(), Some("order.created"));
    let body = ev.json();
    assert_eq!(body["type"], "order.created");
    assert_eq!(
        body["payload"],
        json!({"order_id": order["id"], "user_id": 1, "total": 42.0})
    );
    assert_eq!(ev.id.unwrap(), body["id"].to_string());
    assert!(body["created_at"].is_string());
    app.stop().await;
}

#[tokio::test]
async fn tasks_run_for_real_and_stream_their_progress() {
    let app = spawn_app().await;
    let alice = app.alice_token().await;
    let (status, _) = app
        .send_json(
            Method::POST,
            "/tasks",
            None,
            Some(json!({"kind": "report"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app
        .send_json(
            Method::POST,
            "/tasks",
            Some(&alice),
            Some(json!({"kind": "nope"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Enough users that the report takes several steps.
    for i in 0..60 {
        app.send_json(
            Method::POST,
            "/users/",
            Some(&alice),
            Some(json!({"name": format!("u{i}"), "email": format!("u{i}@example.com")})),
        )
        .await;
    }
    let (status, started) = app
        .send_json(
            Method::POST,
            "/tasks",
            Some(&alice),
            Some(json!({"kind": "report"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = started["task_id"].as_str().unwrap().to_owned();
    let mut sse = Sse::connect(&app, &format!("/progress/{id}"), None).await;
    let mut last = -1;
    loop {
        let ev = sse
            .next()
            .await
            .expect("stream ended before completion")
            .json();
        assert_eq!(ev["task_id"], id);
        if ev.get("status").is_some() {
            assert_eq!(ev["status"], "completed");
            break;
        }
        let p = ev["progress"].as_i64().unwrap();
        assert!(p >= last && p <= 100, "progress went from {last} to {p}");
        last = p;
    }
    assert_eq!(last, 100);
    assert!(
        sse.next().await.is_none(),
        "the stream ends after completion"
    );
    let (status, task) = app.get_json(&format!("/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(task["status"], "completed");
    assert_eq!(task["result"]["users"], 63);
    assert_eq!(task["result"]["posts"], 3);
    assert_eq!(task["result"]["comments"], 4);
    assert_eq!(task["result"]["orders"], 2);
    assert_eq!(task["result"]["revenue"], 249.98);
    let admin = task["result"]["per_user"]
        .as_array()
        .unwrap()
        .iter()
        .find(|line| line["name"] == "admin")
        .expect("every user has a line");
    assert_eq!(admin["orders"], 0);
    // 0.0 exactly: serde_json compares -0.0 equal to it, so the text is checked.
    assert_eq!(admin["spent"].to_string(), "0.0");
    // Reconnecting after the fact still tells the whole story.
    let mut again = Sse::connect(&app, &format!("/progress/{id}"), None).await;
    assert_eq!(again.next().await.unwrap().json()["progress"], 100);
    assert_eq!(again.next().await.unwrap().json()["status"], "completed");
    assert!(again.next().await.is_none());
    // Unknown tasks are 404, not fake progress.
    let (status, body) = app.get_json("/progress/no-such-task").await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_FOUND, json!({"detail": "Task not found"}))
    );
    let (status, _) = app.get_json("/tasks/no-such-task").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn logs_stream_the_servers_own_records_to_admins() {
    let app = spawn_app().await;
    let (status, _) = app.get_json("/logs").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let alice = app.alice_token().await;
    let r = app
        .client
        .get(app.url("/logs"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let admin = app.admin_token().await;
    let r = app
        .client
        .get(app.url("/logs?level=loud"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["detail"][0]["msg"],
        "Input should be 'trace', 'debug', 'info', 'warn' or 'error'"
    );

    let r = app
        .client
        .get(app.url("/logs?level=info"))
        .bearer_auth(&admin)
        .timeout(std::time::Duration::from_secs(3600))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut sse = crate::helpers::Sse::from_response(r);
    // Something this server logs: a failed login.
    let marker = format!("nobody-{}", prism::auth::random_token(4));
    app.send_json(
        Method::POST,
        "/auth/login",
        None,
        Some(json!({"username": marker, "password": "wrong-password"})),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed login never reached the log stream"
        );
        let rec = sse.next().await.expect("log stream ended").json();
        if rec["message"] == "failed login" && rec["fields"]["username"] == marker.as_str() {
            assert_eq!(rec["level"], "info");
            assert!(rec["target"].as_str().unwrap().starts_with("prism"));
            assert!(rec["timestamp"].is_string());
            break;
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn one_ticker_feeds_sse_and_websocket() {
    let app = spawn_app().await;
    let mut sse = Sse::connect(&app, "/stock-prices", None).await;
    let mut ws = app.websocket("/ws/stock-prices", None).await;
    let mut from_sse = std::collections::HashSet::new();
    let mut from_ws = std::collections::HashSet::new();
    // Six ticks each: even if one client connects a few ticks later, they overlap.
    for _ in 0..6 {
        let t = sse.next().await.unwrap().json();
        assert_eq!(t["symbol"], "AAPL");
        let price = t["price"].as_f64().unwrap();
        assert!((100.0..=200.0).contains(&price));
        from_sse.insert(t.to_string());
        from_ws.insert(ws.next_json().await.to_string());
    }
    assert!(
        from_sse.intersection(&from_ws).count() >= 2,
        "the two clients saw different prices: {from_sse:?} vs {from_ws:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn websocket_echo_limits_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_ws_frame = 64 * 1024;
    let app = spawn_with(config).await;
    let mut ws = app.websocket("/ws", None).await;
    use futures::SinkExt;
    ws.0.send(WsMessage::Text("hi".into())).await.unwrap();
    assert_eq!(ws.next().await, Some(WsMessage::Text("Echo: hi".into())));
    ws.0.send(WsMessage::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await,
        Some(WsMessage::Binary(vec![1u8, 2, 3].into()))
    );
    let admin = app.admin_token().await;
    let stats: Value = app
        .client
        .get(app.url("/admin/stats"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stats["websocket_connections"].as_i64().unwrap() >= 1);

    // Over the limit: closed with 1009.
    let mut big = app.websocket("/ws", None).await;
    let _ = big
        .0
        .send(WsMessage::Text("x".repeat(100 * 1024).into()))
        .await;
    assert_eq!(big.close_code().await, Some(1009));

    // Shutdown closes with 1001.
    let stopping = tokio::spawn(app.stop());
    assert_eq!(ws.close_code().await, Some(1001));
    stopping.await.unwrap();
}

/// A client that stops reading is cut off once the server's buffers for it
/// fill, while another client keeps receiving everything; the stalled one can
/// resume from the last id it got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_client_is_dropped_and_others_keep_up() {
    const MESSAGES: usize = 600; // ~6 MB: more than the socket buffers hold
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.event_buffer = 16;
    let app = spawn_with(config).await;
    let alice = app.alice_token().await;

    // The stalled client: a tiny receive window, headers read, then silence.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(app.addr).await.unwrap();
    stalled
        .write_all(format!("GET /stream HTTP/1.1\r\nHost: {}\r\n\r\n", app.addr).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 256];
    let n = tokio::time::timeout(crate::helpers::WAIT, stalled.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));

    let mut fast = Sse::connect(&app, "/stream", None).await;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < MESSAGES {
            got.push(
                fast.next()
                    .await
                    .expect("the fast client was cut off")
                    .id
                    .unwrap(),
            );
        }
        got
    });
    let text = "x".repeat(10_000);
    for _ in 0..MESSAGES {
        broadcast(&app, &alice, &text).await;
    }
    let got = tokio::time::timeout(crate::helpers::WAIT, reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), MESSAGES);

    // The stalled client now reads what it was sent: the response body ends
    // (the chunked terminator; the connection itself stays open for reuse)
    // well before the last message.
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !received.ends_with(b"\r\n0\r\n\r\n") {
        let n = tokio::time::timeout(crate::helpers::WAIT, stalled.read(&mut buf))
            .await
            .expect("the stalled client's stream never ended: it was not cut off")
            .unwrap();
        assert!(n > 0, "connection closed");
        received.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert!(ids.len() < MESSAGES, "the stalled client was never cut off");
    // It resumes from its last id and gets the rest.
    let last_seen = ids.last().copied().unwrap_or("0");
    let missing = got
        .iter()
        .filter(|id| id.parse::<i64>().unwrap() > last_seen.parse::<i64>().unwrap())
        .count();
    let mut resumed = Sse::connect(&app, "/stream", Some(last_seen)).await;
    for _ in 0..missing {
        resumed.next().await.expect("resume ended early");
    }
    app.stop().await;
}

/// The `/ui` page in a real browser: headless Chromium shows the counter, a
/// broadcast sent with the page's own form, a ticker price and a message from
/// the GraphQL subscription. The screenshot is kept as a CI artifact.
#[tokio::test]
async fn the_ui_page_works_in_a_real_browser() {
    let Some(dir) = node_clients() else { return };
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("Chromium is missing: apt-get install chromium");
        }
        eprintln!("SKIPPED: browser test (no {chromium})");
        return;
    }
    let app = spawn_app().await;
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    let shot = target.join("ui-screenshot.png");
    let _ = std::fs::remove_file(&shot);
    let out = node(
        &dir,
        &[
            "ui.mjs",
            &app.url(""),
            "alice",
            prism::demo::ALICE_PASSWORD,
            shot.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "the browser test failed");
    let seen: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert!(seen["counter"].as_str().unwrap().parse::<u64>().unwrap() >= 2);
    assert!(seen["ticker"].as_str().unwrap().parse::<f64>().is_ok());
    assert!(
        seen["broadcast"]
            .as_str()
            .unwrap()
            .starts_with("hello from the browser")
    );
    assert!(
        seen["subscription"]
            .as_str()
            .unwrap()
            .starts_with("chat from the browser")
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "no screenshot"
    );
    app.stop().await;
}

/// A request whose body stops arriving is answered 408 once nothing has come
/// for the idle timeout: its request is in flight, so it is not closed as an
/// idle connection, and would otherwise hold the connection for ever.
#[tokio::test]
async fn a_request_body_that_stops_arriving_gets_408() {
    let app = spawn_with_idle_timeout(std::time::Duration::from_millis(100)).await;
    let got = stalled_body_answer(app.addr, STALLED_LOGIN).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(
        got.contains(r#"{"detail":"The request body did not arrive in time"}"#),
        "{got}"
    );
    // A body that does arrive is read as before.
    let token = app.alice_token().await;
    assert!(!token.is_empty());
    app.stop().await;
}

/// prism closes client connections that start no request for the idle
/// timeout: an idle keep-alive connection, a silent one and one whose request
/// head never completes. An SSE stream stays open however long it is silent:
/// its request is in flight until its body ends, not until its handler
/// returns.
#[tokio::test]
async fn idle_and_stalled_connections_are_closed_but_quiet_streams_are_not() {
    let app = spawn_with_idle_timeout(std::time::Duration::from_millis(100)).await;
    let alice = app.alice_token().await;
    // No keep-alive comment falls within the test: the stream is silent.
    let mut stream = Sse::connect(&app, "/stream", None).await;

    idle_connections_are_closed(app.addr, b"GET /users/1 HTTP/1.1\r\nhost: x\r\n").await;

    // The stream, older than all three, still delivers. A fresh client: a
    // pooled connection could be one prism is closing as idle.
    let mut app = app;
    app.client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(WAIT)
        .build()
        .unwrap();
    broadcast(&app, &alice, "still here").await;
    let event = stream.next().await.expect("the quiet stream was closed");
    assert_eq!(event.json()["message"], "still here");
    app.stop().await;
}

/// Shutdown ends open SSE streams (so the server can finish draining).
#[tokio::test]
async fn shutdown_ends_sse_streams() {
    let app = spawn_app().await;
    let mut stream = Sse::connect(&app, "/stream", None).await;
    let mut counter = Sse::connect(&app, "/events", None).await;
    assert!(counter.next().await.is_some());
    let stopping = tokio::spawn(app.stop());
    assert!(stream.next().await.is_none(), "/stream did not end");
    while counter.next().await.is_some() {}
    stopping.await.unwrap();
}

/// Two `prism serve` instances on one PostgreSQL database, their poll timers
/// too long to help: a post written through one reaches an SSE client of the
/// other, whose pump the writer's notification wakes (SPEC §1, scale-out).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_an_sse_client_of_one_instance_gets_a_post_written_through_another() {
    let Some(url) = crate::helpers::postgres_url().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = |sub: &str| {
        let mut c = shared_postgres_config(dir.path(), sub, &url);
        c.event_poll = std::time::Duration::from_secs(3600);
        c
    };
    let a = spawn_with(config("a")).await;
    let b = spawn_with(config("b")).await;
    let mut sse = Sse::connect(&b, "/events/feed?types=post.created", None).await;
    let alice = a.alice_token().await;
    let post = a
        .create(
            "/posts",
            Some(&alice),
            json!({"title": "Across", "content": "instances"}),
        )
        .await;
    let ev = sse.next().await.unwrap();
    assert_eq!(ev.event.as_deref(), Some("post.created"));
    assert_eq!(ev.json()["payload"], post);
    a.stop().await;
    b.stop().await;
}

/// Each new user, post, comment, message, product, order and broadcast is
/// stored and published as one: the answer, the row read back and the
/// event's payload (for an order, the summary its consumers read) are the
/// same JSON, on SQLite and on PostgreSQL (where each is a single statement).
/// A write that names a missing user or author, or a taken email, leaves
/// neither row nor event.
#[tokio::test]
async fn a_created_row_reads_back_as_its_answer_and_its_event() {
    let dir = tempfile::tempdir().unwrap();
    for config in sqlite_and_postgres(dir.path()).await {
        let app = spawn_with(config).await;
        let admin = app.admin_token().await;
        let mut feed = Sse::connect(
            &app,
            "/events/feed?types=user.created,post.created,comment.created,message.sent,product.created,order.created",
            None,
        )
        .await;
        let mut stream = Sse::connect(&app, "/stream", None).await;
        let taken = StatusCode::CONFLICT;
        let missing = StatusCode::UNPROCESSABLE_ENTITY;
        let refused = [
            (
                "/users/",
                json!({"name": "Bob again", "email": "bob@example.com"}),
                taken,
            ),
            (
                "/posts",
                json!({"title": "t", "content": "c", "author_id": 999_999}),
                missing,
            ),
            (
                "/posts/1/comments",
                json!({"content": "c", "user_id": 999_999}),
                missing,
            ),
            (
                "/messages",
                json!({"content": "c", "user_id": 999_999}),
                missing,
            ),
        ];
        for (path, body, expected) in refused {
            let (status, answer) = app
                .send_json(Method::POST, path, Some(&admin), Some(body))
                .await;
            assert_eq!(status, expected, "{path}: {answer}");
        }
        // (where, what, the event, where to read it back: {id} is the new id)
        let writes = [
            (
                "/users/",
                json!({"name": "Dora", "email": "dora@example.com", "age": 40}),
                "user.created",
                "/users/{id}",
            ),
            (
                "/posts",
                json!({"title": "Stored", "content": "once", "author_id": 2}),
                "post.created",
                "/posts/{id}",
            ),
            (
                "/posts/1/comments",
                json!({"content": "first", "user_id": 2}),
                "comment.created",
                "/posts/1/comments",
            ),
            (
                "/messages",
                json!({"content": "hello", "user_id": 2}),
                "message.sent",
                "/messages?user_id=2",
            ),
            (
                "/products/",
                json!({"name": "Gizmo", "description": "A gizmo",
                       "price": {"amount": 5.55, "currency": "EUR"}, "category": "FOOD",
                       "tags": ["b", "a"], "metadata": {"z": "1", "a": "2"}}),
                "product.created",
                "/products/{id}",
            ),
            (
                "/orders",
                json!({"user_id": 2, "total": 12.34, "status": "completed"}),
                "order.created",
                "/orders/{id}",
            ),
        ];
        let mut last_id = 0;
        for (path, body, kind, read_back) in writes {
            let row = app.create(path, Some(&admin), body).await;
            let ev = feed.next().await.unwrap().json();
            assert_eq!(ev["type"], kind, "a refused write left an event");
            let expected = match kind {
                "order.created" => {
                    json!({"order_id": row["id"], "user_id": 2, "total": 12.34})
                }
                _ => row.clone(),
            };
            assert_eq!(ev["payload"], expected);
            let (_, stored) = app
                .get_json(&read_back.replace("{id}", &row["id"].to_string()))
                .await;
            let stored = match stored.as_array() {
                Some(list) => list.last().unwrap().clone(),
                None => stored,
            };
            assert_eq!(stored, row, "{read_back}");
            last_id = ev["id"].as_i64().unwrap();
        }
        broadcast(&app, &admin, "to all").await;
        let b = stream.next().await.unwrap();
        assert_eq!(b.json()["message"], "to all");
        assert!(b.id.unwrap().parse::<i64>().unwrap() > last_id);
        app.stop().await;
    }
}

/// Updates, deletes and friendships are stored and published as one, on
/// SQLite and on PostgreSQL (where each is a single statement): an update's
/// answer, the row read back and the event's payload are the same JSON; a
/// delete's event names what went. A change that changes nothing (a patch to
/// the same values, a friendship that exists) and a change of something
/// missing announce nothing.
#[tokio::test]
async fn a_changed_row_reads_back_as_its_answer_and_its_event() {
    let dir = tempfile::tempdir().unwrap();
    for config in sqlite_and_postgres(dir.path()).await {
        let app = spawn_with(config).await;
        let admin = app.admin_token().await;
        let mut feed = Sse::connect(
            &app,
            "/events/feed?types=post.updated,post.deleted,product.updated,product.deleted,\
             friend.added,friend.removed",
            None,
        )
        .await;
        let mut next_event = async |kind: &str| {
            let ev = feed.next().await.expect("the feed ended").json();
            assert_eq!(ev["type"], kind, "{ev}");
            ev["payload"].clone()
        };
        let changed = async |method: Method, path: &str, body: Option<Value>| {
            let (status, answer) = app.send_json(method, path, Some(&admin), body).await;
            assert!(status.is_success(), "{path}: {status} {answer}");
            answer
        };
        let refused = async |method: Method, path: &str, body: Option<Value>| {
            let (status, answer) = app.send_json(method, path, Some(&admin), body).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {answer}");
        };

        let post = app
            .create(
                "/posts",
                Some(&admin),
                json!({"title": "Before", "content": "body", "author_id": 2}),
            )
            .await;
        let post_path = format!("/posts/{}", post["id"]);
        let mut last = post.clone();
        for (patch, title, content) in [
            (json!({"title": "After"}), "After", "body"),
            (json!({"content": "new body"}), "After", "new body"),
            (json!({"title": "Both", "content": "new"}), "Both", "new"),
        ] {
            let answer = changed(Method::PATCH, &post_path, Some(patch)).await;
            assert_eq!(
                (&answer["title"], &answer["content"]),
                (&json!(title), &json!(content))
            );
            assert_eq!(answer["created_at"], post["created_at"]);
            assert_ne!(answer["updated_at"], last["updated_at"]);
            assert_eq!(next_event("post.updated").await, answer);
            assert_eq!(app.get_json(&post_path).await.1, answer);
            last = answer;
        }
        let same = changed(Method::PATCH, &post_path, Some(json!({"title": "Both"}))).await;
        assert_eq!(same, last, "a patch to the same values changed the post");
        refused(Method::PATCH, "/posts/999999", Some(json!({"title": "x"}))).await;

        let product = app
            .create(
                "/products/",
                Some(&admin),
                json!({"name": "Gizmo", "price": {"amount": 5.55, "currency": "EUR"},
                       "category": "FOOD"}),
            )
            .await;
        let product_path = format!("/products/{}", product["id"]);
        let replacement = json!({"name": "Gadget", "description": "Replaced",
            "price": {"amount": 7.25, "currency": "USD"}, "category": "BOOKS",
            "tags": ["b", "a"], "metadata": {"z": "1", "a": "2"}});
        let answer = changed(Method::PUT, &product_path, Some(replacement.clone())).await;
        assert_eq!(answer["id"], product["id"]);
        assert_eq!(answer["name"], "Gadget");
        assert_eq!(answer["metadata"], replacement["metadata"]);
        assert_eq!(next_event("product.updated").await, answer);
        assert_eq!(app.get_json(&product_path).await.1, answer);
        refused(Method::PUT, "/products/999999", Some(replacement)).await;

        changed(Method::PUT, "/users/3/friends/2", None).await;
        assert_eq!(
            next_event("friend.added").await,
            json!({"user_id": 3, "friend_id": 2})
        );
        changed(Method::PUT, "/users/2/friends/3", None).await;
        changed(Method::DELETE, "/users/2/friends/3", None).await;
        assert_eq!(
            next_event("friend.removed").await,
            json!({"user_id": 2, "friend_id": 3})
        );
        refused(Method::DELETE, "/users/2/friends/3", None).await;

        changed(Method::DELETE, &post_path, None).await;
        assert_eq!(
            next_event("post.deleted").await,
            json!({"id": post["id"], "author_id": 2})
        );
        refused(Method::GET, &post_path, None).await;
        refused(Method::DELETE, &post_path, None).await;
        changed(Method::DELETE, &product_path, None).await;
        assert_eq!(
            next_event("product.deleted").await,
            json!({"id": product["id"]})
        );
        refused(Method::DELETE, &product_path, None).await;

        // Nothing refused or unchanged above was announced late: the next
        // event is this one.
        changed(Method::PUT, "/users/1/friends/3", None).await;
        assert_eq!(
            next_event("friend.added").await,
            json!({"user_id": 1, "friend_id": 3})
        );
        app.stop().await;
    }
}

/// Patches racing on one post, each of one field: every patch succeeds, each
/// answers with the post as it left it and announces exactly that, and none
/// undoes another (in event order, each event changes only its own field of
/// the one before), on SQLite and on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_patches_each_announce_the_post_as_they_left_it() {
    const PATCHES: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    for config in sqlite_and_postgres(dir.path()).await {
        let app = spawn_with(config).await;
        let admin = app.admin_token().await;
        let post = app
            .create(
                "/posts",
                Some(&admin),
                json!({"title": "t", "content": "c", "author_id": 2}),
            )
            .await;
        let path = format!("/posts/{}", post["id"]);
        let mut feed = Sse::connect(&app, "/events/feed?types=post.updated", None).await;
        let field = |i: usize| ["title", "content"][i % 2];
        let answers = futures::future::join_all((0..PATCHES).map(|i| {
            let (app, admin, path) = (&app, &admin, &path);
            async move {
                let patch = json!({field(i): format!("{} {i}", field(i))});
                let (status, answer) = app
                    .send_json(Method::PATCH, path, Some(admin), Some(patch))
                    .await;
                assert_eq!(status, StatusCode::OK, "{answer}");
                answer
            }
        }))
        .await;
        let mut announced = Vec::new();
        for _ in 0..PATCHES {
            announced.push(feed.next().await.expect("the feed ended").json()["payload"].clone());
        }
        let mut before = &post;
        for after in &announced {
            let changed: Vec<_> = ["title", "content"]
                .into_iter()
                .filter(|f| after[f] != before[f])
                .collect();
            assert_eq!(changed.len(), 1, "{before} -> {after}");
            let i: usize = after[changed[0]].as_str().unwrap()[changed[0].len() + 1..]
                .parse()
                .unwrap();
            assert_eq!(field(i), changed[0], "{after}");
            before = after;
        }
        assert_eq!(app.get_json(&path).await.1, *before);
        let sorted = |mut v: Vec<Value>| {
            v.sort_by_key(|p| p.to_string());
            v
        };
        assert_eq!(sorted(answers), sorted(announced));
        app.stop().await;
    }
}
