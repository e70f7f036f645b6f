//! The baseline for `bench/rest.sh`: a bare axum handler that answers
//! `GET /users/1` with the same JSON prism serves, from a struct in memory —
//! no database, no middleware. prism's throughput is measured against it.

use axum::{Json, Router, extract::Path, routing::get};
use serde::Serialize;

#[derive(Serialize)]
struct User {
    id: i64,
    name: &'static str,
    email: &'static str,
    age: Option<i32>,
    role: &'static str,
    created_at: &'static str,
}

async fn user(Path(id): Path<i64>) -> Json<User> {
    Json(User {
        id,
        name: "Alice",
        email: "alice@example.com",
        age: Some(30),
        role: "user",
        created_at: "2026-11-28T03:32:09.570087947Z",
    })
}

// The same allocator as prism, so the comparison measures the framework.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let port = std::env::args().nth(1).unwrap_or_else(|| "18001".into());
    let app = Router::new().route("/users/{id}", get(user));
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    axum::serve(listener, app).await.unwrap();
}
