//! `spawn_app()` and friends: each test gets its own data directory (or its
//! own PostgreSQL database) and its own port.

use std::{net::SocketAddr, time::Duration};

use prism::{App, Config};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};

pub const ADMIN_PASSWORD: &str = "admin-test-password";
/// Upper bound for any single network wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// Keeps the temporary data directory alive as long as the app.
    pub dir: Option<tempfile::TempDir>,
}

/// A test configuration: free port, demo data, a known admin password.
pub fn test_config(dir: &std::path::Path) -> Config {
    Config {
        demo: true,
        admin_password: Some(ADMIN_PASSWORD.into()),
        ..Config::for_tests(dir)
    }
}

/// prism on SQLite in a fresh directory, with the demo data.
pub async fn spawn_app() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut app = spawn_with(test_config(dir.path())).await;
    app.dir = Some(dir);
    app
}

/// prism with a given configuration.
pub async fn spawn_with(config: Config) -> TestApp {
    let app = App::build(config).await.expect("prism failed to start");
    let addr = app.http_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        stop: Some(stop),
        handle: Some(handle),
        dir: None,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let r = self.get(path).await;
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Sends `body` as JSON with an optional bearer token.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    pub async fn send_json(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let r = self.send(method, path, token, body).await;
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let (status, body) = self
            .send_json(
                Method::POST,
                "/auth/login",
                None,
                Some(serde_json::json!({"username": username, "password": password})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "login failed: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn admin_token(&self) -> String {
        self.login("admin", ADMIN_PASSWORD).await
    }

    pub async fn alice_token(&self) -> String {
        self.login("alice", prism::demo::ALICE_PASSWORD).await
    }

    pub async fn bob_token(&self) -> String {
        self.login("bob", prism::demo::BOB_PASSWORD).await
    }

    /// Graceful shutdown; fails the test if it errors or hangs.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("shutdown hung")
            .unwrap()
            .unwrap();
    }
}

/// A fresh PostgreSQL database for one test, or `None` (with a notice) when
/// `PRISM_TEST_DATABASE_URL` is unset. Under `CI=true` a missing URL fails the
/// test instead, so CI can never skip the PostgreSQL half silently.
pub async fn postgres_url() -> Option<String> {
    let Ok(admin_url) = std::env::var("PRISM_TEST_DATABASE_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("PRISM_TEST_DATABASE_URL must be set under CI=true");
        }
        eprintln!("SKIPPED: PostgreSQL test (set PRISM_TEST_DATABASE_URL to run it)");
        return None;
    };
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("cannot connect to PRISM_TEST_DATABASE_URL");
    let name = format!("prism_test_{}", prism::auth::random_token(8));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').unwrap().0;
    Some(format!("{base}/{name}"))
}

/// Waits until `f` returns `Some`, polling; fails after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
