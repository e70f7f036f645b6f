//! The store's read connections: SQLite reads too long for an async worker,
//! and PostgreSQL connections the server dropped.

use std::{str::FromStr, time::Duration};

use futures::StreamExt;
use prism::db::reader::Readers;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{eventually, postgres_url, spawn_app};

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
    let pool = db.postgres().unwrap();
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
