//! Startup, graceful shutdown and persistence (SPEC §7).

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    ADMIN_PASSWORD, Process, WAIT, alice_token_at, json_at, spawn_with, test_config,
};

#[tokio::test]
async fn data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(test_config(dir.path())).await;
    let token = app.alice_token().await;
    let created = app
        .create(
            "/users/",
            Some(&token),
            json!({"name": "Persisted", "email": "persisted@example.com"}),
        )
        .await;
    app.stop().await;

    let app = spawn_with(test_config(dir.path())).await;
    let (status, fetched) = app.get_json(&format!("/users/{}", created["id"])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, created);
    // The demo is not loaded twice, and tokens from before the restart still verify.
    let (_, users) = app.get_json("/users/").await;
    assert_eq!(users.as_array().unwrap().len(), 4);
    app.create("/messages", Some(&token), json!({"content": "still me"}))
        .await;
    app.stop().await;
}

/// Every write prism acknowledged was committed: killed without warning
/// (no shutdown to finish anything) right after 200 concurrent writes, which
/// share commits, prism restarts with every one of them.
#[tokio::test]
async fn acknowledged_writes_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let token = alice_token_at(&client, &server.url("")).await;
    let writes = (0..200).map(|i| {
        let request = client
            .post(server.url("/posts"))
            .bearer_auth(&token)
            .json(&json!({"title": format!("t{i}"), "content": "kept"}));
        async move {
            let answer = request.send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::CREATED);
            let post: serde_json::Value = answer.json().await.unwrap();
            post["id"].as_i64().unwrap()
        }
    });
    let ids = futures::future::join_all(writes).await;
    server.signal("-KILL");
    server.wait_exit().await;

    let server = Server::start(dir.path()).await;
    for id in ids {
        let post = json_at(&client, server.url(&format!("/posts/{id}"))).await;
        assert_eq!(post["content"], "kept", "post {id}: {post}");
    }
    server.signal("-TERM");
    assert!(server.wait_exit().await.success());
}

/// `prism serve` as a child process.
struct Server;

impl Server {
    async fn start(data_dir: &std::path::Path) -> Process {
        Self::start_with(data_dir, &[]).await
    }

    async fn start_with(data_dir: &std::path::Path, extra: &[&str]) -> Process {
        let mut args = vec!["serve", "--demo", "--port", "0", "--grpc-port", "0"];
        args.extend_from_slice(extra);
        Process::start(&args, data_dir, &[("PRISM_ADMIN_PASSWORD", ADMIN_PASSWORD)]).await
    }
}

/// The signal handlers are in place before prism serves anything: a SIGTERM
/// or SIGINT the moment it says it is listening stops it cleanly instead of
/// killing it.
#[tokio::test]
async fn a_signal_right_after_start_up_is_a_graceful_stop() {
    for (sig, number) in [("-TERM", 15), ("-INT", 2)] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path()).await;
        let caught = caught_signals(server.child.id().unwrap());
        assert!(
            caught & (1 << (number - 1)) != 0,
            "{sig} not handled yet when prism reported listening (SigCgt {caught:x})"
        );
        server.signal(sig);
        let status = server.wait_exit().await;
        assert!(status.success(), "{sig}: exit status {status:?}");
    }
}

/// The process's caught-signal mask (`SigCgt` in `/proc/PID/status`).
fn caught_signals(pid: u32) -> u64 {
    u64::from_str_radix(&proc_status(pid, "SigCgt"), 16).unwrap()
}

/// One field of `/proc/PID/status`.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} line in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// Without the opt-out, mimalloc's heap is backed by transparent huge pages
/// and memory that idle connections hold a few KiB of is resident 2 MiB at
/// a time.
#[tokio::test]
async fn the_server_opts_out_of_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    assert_eq!(proc_status(server.child.id().unwrap(), "THP_enabled"), "0");
    server.signal("-TERM");
    assert!(server.wait_exit().await.success());
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let token = alice_token_at(&client, &server.url("")).await;

    let stats_url = server.url("/stats");
    let requests = |client: reqwest::Client| {
        let url = stats_url.clone();
        async move {
            let v: serde_json::Value = client.get(url).send().await.unwrap().json().await.unwrap();
            v["total_requests"].as_u64().unwrap()
        }
    };
    let before = requests(client.clone()).await;

    // A request whose body arrives in two halves, with SIGTERM in between.
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    body_tx
        .send(Ok(br#"{"name": "In Flight", "#.to_vec()))
        .await
        .unwrap();
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = server.url("/users/");
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(
                    tokio_stream::wrappers::ReceiverStream::new(body_rx),
                ))
                .send()
                .await
        }
    });
    // Wait until the server has started on it: each /stats call counts itself,
    // so the in-flight request shows as one more than the calls made.
    let mut polls = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        polls += 1;
        if requests(client.clone()).await > before + polls {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "request never reached the server"
        );
    }

    server.signal("-TERM");
    body_tx
        .send(Ok(br#""email": "inflight@example.com"}"#.to_vec()))
        .await
        .unwrap();
    drop(body_tx);
    let response = tokio::time::timeout(WAIT, in_flight)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: serde_json::Value = response.json().await.unwrap();

    let status = server.wait_exit().await;
    assert!(status.success(), "exit status {status:?}");

    // What was acknowledged is there after a restart.
    let server = Server::start(dir.path()).await;
    let fetched = json_at(&client, server.url(&format!("/users/{}", created["id"]))).await;
    assert_eq!(fetched["email"], "inflight@example.com");
    server.signal("-INT");
    assert!(server.wait_exit().await.success());
}

/// `--worker-threads 1` switches to the single-threaded scheduler: requests,
/// the event pump and the SSE feed all share one thread, and it still drains.
#[tokio::test]
async fn one_worker_thread_serves_streams_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--worker-threads", "1"]).await;
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let mut feed = client
        .get(server.url("/stream"))
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let token = alice_token_at(&client, &server.url("")).await;
    let sent = client
        .post(server.url("/broadcast"))
        .bearer_auth(token)
        .json(&json!({"message": "one thread"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    let mut seen = String::new();
    tokio::time::timeout(WAIT, async {
        use futures::StreamExt;
        while !seen.contains("one thread") {
            let chunk = feed.next().await.expect("feed ended").unwrap();
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the broadcast never reached the feed");

    server.signal("-TERM");
    assert!(server.wait_exit().await.success());
}
