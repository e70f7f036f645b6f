//! The store's read connections against a real PostgreSQL server.

use std::{str::FromStr, time::Duration};

use prism::db::reader::Readers;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{eventually, postgres_url};

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
