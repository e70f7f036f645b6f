//! The store's connections: SQLite reads too long for an async worker,
//! PostgreSQL connections the server dropped, and PostgreSQL transactions
//! their callers dropped.

use std::{str::FromStr, time::Duration};

use futures::StreamExt;
use prism::db::reader::Readers;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{WAIT, eventually, postgres_url, spawn_app};

/// A read too long to run on an async worker (a search that scans every
/// post) is moved to a blocking thread and still answers in full, while
/// short reads keep running where they are asked for.
#[tokio::test]
async fn a_read_too_long_for_a_worker_still_answers_in_full() {
    let app = spawn_app().await;
    let token = app.alice_token().await;
    let statuses: Vec<StatusCode> = futures::stream::iter(0..3000)
        .map(|i| {
            let (app, token) = (&app, &token);
            async move {
                let title = if i % 3 == 0 {
                    format!("needle {i}")
                } else {
                    format!("hay {i}")
                };
                app.send(
                    Method::POST,
                    "/posts",
                    Some(token),
                    Some(json!({"title": title, "content": "c"})),
                )
                .await
                .status()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    let moved = || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("prism_sqlite_reads_moved_total "))
            .expect("the counter is exported")
            .parse::<u64>()
            .unwrap()
    };
    let before = moved().await;
    let (status, page) = app.get_json("/posts?limit=10").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.as_array().unwrap().len(), 10);
    assert_eq!(moved().await, before, "a page of ten fits the budget");

    let (status, found) = app.get_json("/posts?q=needle&limit=1000").await;
    assert_eq!(status, StatusCode::OK);
    let titles: Vec<&str> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles.len(), 1000, "every third of 3,000 posts");
    assert!(
        titles.iter().all(|t| t.starts_with("needle ")),
        "{titles:?}"
    );
    assert_eq!(
        moved().await,
        before + 1,
        "the scan ran on a blocking thread"
    );
    app.stop().await;
}

/// A read connection the server has dropped (a restart, an idle timeout,
/// an administrator) is replaced before a read uses it, not handed out to
/// fail the read.
#[tokio::test]
async fn a_read_connection_the_server_dropped_is_replaced() {
    let Some(url) = postgres_url().await else {
        return;
    };
    // Every connection counts as idle long enough to be checked.
    let readers = Readers::<sqlx::PgConnection>::open(
        PgConnectOptions::from_str(&url).unwrap(),
        1,
        Some(Duration::ZERO),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *readers.acquire().await.unwrap())
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(ended);
    eventually("the server to end the backend", || {
        let admin = admin.clone();
        async move {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_one(&admin)
                    .await
                    .unwrap();
            (left == 0).then_some(())
        }
    })
    .await;
    let mut conn = readers.acquire().await.unwrap();
    let new_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .expect("the dropped connection was replaced");
    assert_ne!(new_pid, pid);
}

/// A request is dropped at whatever it awaits when its client hangs up. One
/// dropped while its transaction begins must not leave the connection, back
/// in the pool, inside that transaction: every write made on it after that
/// would be answered and never commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_dropped_while_it_begins_leaves_no_connection_in_it() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let app = prism::App::build(prism::Config {
        database_url: Some(url),
        ..prism::Config::for_tests(std::env::temp_dir())
    })
    .await
    .unwrap();
    let db = app.state().domain.db().clone();
    // Dropped after ever more polls: before `BEGIN` is sent, while its answer
    // is on its way, once it has begun.
    for polls in 1..=64 {
        let mut begin = std::pin::pin!(db.begin());
        for _ in 0..polls {
            if futures::poll!(begin.as_mut()).is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    no_connection_left_in_a_transaction(db.postgres().unwrap()).await;
}

/// Waits until no connection to this test's database sits inside a
/// transaction (those just dropped roll back a moment later).
async fn no_connection_left_in_a_transaction(pool: &sqlx::PgPool) {
    eventually("no connection left in a transaction", || async {
        let stuck: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (stuck == 0).then_some(())
    })
    .await;
}

/// Clients that hang up mid-write, some while their write is in a
/// transaction (patches racing on one post fall back to one that locks the
/// row), leave nothing behind on PostgreSQL: each write after them is
/// answered, committed and read back, and no connection is left inside a
/// transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_clients_hanging_up_mid_write_leave_later_writes_committed() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let app = crate::helpers::spawn_with(crate::helpers::shared_postgres_config(
        dir.path(),
        "prism",
        &url,
    ))
    .await;
    let token = app.alice_token().await;
    let patch = |client: reqwest::Client, i: u64| {
        let (url, token) = (app.url("/posts/1"), token.clone());
        async move {
            client
                .patch(url)
                .bearer_auth(token)
                .json(&json!({"title": format!("racing {i}")}))
                .send()
                .await
        }
    };
    // Each gives up after 1 to 6 ms, hanging up wherever its write is.
    let impatient: Vec<_> = (0..6)
        .map(|ms| {
            reqwest::Client::builder()
                .timeout(Duration::from_millis(ms + 1))
                .build()
                .unwrap()
        })
        .collect();
    let hung_up = futures::stream::iter(0..400u64)
        .map(|i| patch(impatient[i as usize % impatient.len()].clone(), i))
        .buffer_unordered(32)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    assert!(hung_up > 0, "no client hung up");

    let patient = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    for i in 0..40 {
        let answer = patch(patient.clone(), 1000 + i).await.unwrap();
        assert_eq!(
            answer.status(),
            StatusCode::OK,
            "{}",
            answer.text().await.unwrap()
        );
        let (status, post) = app.get_json("/posts/1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(post["title"], format!("racing {}", 1000 + i));
    }
    no_connection_left_in_a_transaction(app.state.domain.db().postgres().unwrap()).await;
    app.stop().await;
}
