//! Configuration: one typed tree, filled from (highest first) command-line flags,
//! `PRISM_*` environment variables, an optional TOML file and built-in defaults.
//!
//! [`Settings`] is the *input* shape: every field optional, so the three sources
//! can be layered field by field, and unknown keys in the TOML file are rejected.
//! [`Config`] is the *runtime* shape: validated, defaults applied, durations typed.
//! Everything below documents its unit and default, and `config_defaults` in the
//! tests pins those defaults so a change to one is a deliberate act.

use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// How log records are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, coloured when standard error is a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Settings shared by every `prism` command. Each flag can also be given as an
/// environment variable (shown in `--help`) or as a key of the `--config` TOML file.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on for HTTP [default: 127.0.0.1]
    #[arg(long, env = "PRISM_HOST")]
    pub host: Option<String>,

    /// HTTP port; 0 picks a free one [default: 8000]
    #[arg(long, env = "PRISM_PORT")]
    pub port: Option<u16>,

    /// gRPC port; 0 picks a free one [default: 50051]
    #[arg(long, env = "PRISM_GRPC_PORT")]
    pub grpc_port: Option<u16>,

    /// Directory for the embedded SQLite database and the generated signing secret [default: ./prism-data]
    #[arg(long, env = "PRISM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// `postgres://…` to use PostgreSQL instead of the embedded SQLite database
    #[arg(long, env = "PRISM_DATABASE_URL")]
    pub database_url: Option<String>,

    /// `nats://…` of a NATS server with JetStream that receives every domain event
    #[arg(long, env = "PRISM_NATS_URL")]
    pub nats_url: Option<String>,

    /// Log format [default: pretty]
    #[arg(long, env = "PRISM_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Log filter, `RUST_LOG` syntax; `RUST_LOG` itself wins when set [default: info]
    #[arg(long, env = "PRISM_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Load the demo rows and an `admin` account into an empty database
    #[arg(long, env = "PRISM_DEMO", num_args = 0..=1, default_missing_value = "true")]
    pub demo: Option<bool>,

    /// Password of the demo `admin` account (8 to 128 characters); generated and printed once when unset
    #[arg(long, env = "PRISM_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,

    /// Secret that signs access tokens; generated once into `<data-dir>/jwt-secret` when unset
    #[arg(long, env = "PRISM_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Lifetime of an access token, in seconds [default: 3600]
    #[arg(long, env = "PRISM_TOKEN_TTL_SECS")]
    pub token_ttl_secs: Option<u64>,

    /// Largest accepted request body, in bytes; larger ones get 413 [default: 10000000]
    #[arg(long, env = "PRISM_MAX_UPLOAD_SIZE")]
    pub max_upload_size: Option<usize>,

    /// How long shutdown waits for in-flight requests, in seconds [default: 10]
    #[arg(long, env = "PRISM_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<u64>,

    /// How long a client connection may go without starting a request before it is
    /// closed, in milliseconds; covers idle keep-alive connections and request heads
    /// that never complete, never a request being served [default: 60000]
    #[arg(long, env = "PRISM_CLIENT_IDLE_TIMEOUT_MS")]
    pub client_idle_timeout_ms: Option<u64>,

    /// How long events stay in the event log for resuming clients, in hours [default: 168]
    #[arg(long, env = "PRISM_EVENT_RETENTION_HOURS")]
    pub event_retention_hours: Option<u64>,

    /// Events buffered per process for live subscribers; one that falls further behind
    /// is cut off and resumes from the log [default: 4096]
    #[arg(long, env = "PRISM_EVENT_BUFFER")]
    pub event_buffer: Option<usize>,

    /// How often the event log is polled when no wake-up arrives, in milliseconds [default: 1000]
    #[arg(long, env = "PRISM_EVENT_POLL_MS")]
    pub event_poll_ms: Option<u64>,

    /// Entities kept in the in-process read cache [default: 10000]
    #[arg(long, env = "PRISM_CACHE_CAPACITY")]
    pub cache_capacity: Option<usize>,

    /// Failed logins per client and username per minute before 429 [default: 10]
    #[arg(long, env = "PRISM_LOGIN_MAX_FAILURES")]
    pub login_max_failures: Option<u32>,

    /// Reverse proxies whose `X-Forwarded-For` names the client (login limits, logs): addresses or CIDR ranges separated by commas, `*` for any, empty for none [default: 127.0.0.0/8,::1]
    #[arg(long, env = "PRISM_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,

    /// Read connections to the database; writes have their own (SQLite: one; PostgreSQL: a pool of this size) [default: 8]
    #[arg(long, env = "PRISM_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,

    /// Largest WebSocket message accepted, in bytes; larger closes with 1009 [default: 1048576]
    #[arg(long, env = "PRISM_MAX_WS_FRAME")]
    pub max_ws_frame: Option<usize>,

    /// Runtime worker threads; absent means one per CPU core
    #[arg(long, env = "PRISM_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Base URL of the users service (orders-service calls it) [default: http://127.0.0.1:8001]
    #[arg(long, env = "PRISM_USERS_URL")]
    pub users_url: Option<String>,

    /// Connections the orders service may open to the users service; more requests wait for one [default: 256]
    #[arg(long, env = "PRISM_USERS_MAX_CONNECTIONS")]
    pub users_max_connections: Option<usize>,

    /// Base URL of the orders service (users-service follows its events without NATS) [default: http://127.0.0.1:8002]
    #[arg(long, env = "PRISM_ORDERS_URL")]
    pub orders_url: Option<String>,

    /// The gateway's service registry (TOML); without it, the local default topology
    #[arg(long, env = "PRISM_REGISTRY")]
    pub registry: Option<PathBuf>,

    /// Seconds between `heartbeat` events on `/events/named` [default: 15]
    #[arg(long, env = "PRISM_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<u64>,

    /// Seconds between keep-alive comments on every SSE stream [default: 15]
    #[arg(long, env = "PRISM_SSE_KEEP_ALIVE_SECS")]
    pub sse_keep_alive_secs: Option<u64>,

    /// Milliseconds between ticks of `/events` [default: 1000]
    #[arg(long, env = "PRISM_COUNTER_INTERVAL_MS")]
    pub counter_interval_ms: Option<u64>,

    /// Milliseconds between prices of the simulated stock ticker [default: 1000]
    #[arg(long, env = "PRISM_TICKER_INTERVAL_MS")]
    pub ticker_interval_ms: Option<u64>,

    /// Deepest GraphQL selection accepted [default: 15]
    #[arg(long, env = "PRISM_GRAPHQL_MAX_DEPTH")]
    pub graphql_max_depth: Option<usize>,

    /// Highest GraphQL query complexity accepted (one point per field) [default: 2000]
    #[arg(long, env = "PRISM_GRAPHQL_MAX_COMPLEXITY")]
    pub graphql_max_complexity: Option<usize>,

    /// Largest GraphQL query text accepted, in bytes [default: 100000]
    #[arg(long, env = "PRISM_GRAPHQL_MAX_QUERY_BYTES")]
    pub graphql_max_query_bytes: Option<usize>,

    /// Answer GraphQL introspection queries (GraphiQL needs them) [default: true]
    #[arg(long, env = "PRISM_GRAPHQL_INTROSPECTION")]
    pub graphql_introspection: Option<bool>,
}

impl Settings {
    /// Reads a TOML settings file; unknown keys are an error, so a typo is never
    /// silently ignored.
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
    }

    /// Field-wise overlay: a value set in `self` wins over `lower`.
    pub fn overlay(self, lower: Settings) -> anyhow::Result<Settings> {
        // Going through JSON keeps this generic over the field list, so a new
        // setting cannot be forgotten here.
        let mut base = serde_json::to_value(lower)?;
        let top = serde_json::to_value(self)?;
        if let (Some(base), serde_json::Value::Object(top)) = (base.as_object_mut(), top) {
            for (k, v) in top {
                if !v.is_null() {
                    base.insert(k, v);
                }
            }
        }
        Ok(serde_json::from_value(base)?)
    }

    /// Applies defaults and checks ranges.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let d = Config::default();
        let cfg = Config {
            host: self.host.unwrap_or(d.host),
            port: self.port.unwrap_or(d.port),
            grpc_port: self.grpc_port.unwrap_or(d.grpc_port),
            data_dir: self.data_dir.unwrap_or(d.data_dir),
            database_url: self.database_url.filter(|s| !s.is_empty()),
            nats_url: self.nats_url.filter(|s| !s.is_empty()),
            log_format: self.log_format.unwrap_or(d.log_format),
            log_level: self.log_level.unwrap_or(d.log_level),
            demo: self.demo.unwrap_or(d.demo),
            admin_password: self.admin_password.filter(|s| !s.is_empty()),
            jwt_secret: self.jwt_secret.filter(|s| !s.is_empty()),
            token_ttl: self.token_ttl_secs.map_or(d.token_ttl, Duration::from_secs),
            max_upload_size: self.max_upload_size.unwrap_or(d.max_upload_size),
            shutdown_timeout: self
                .shutdown_timeout_secs
                .map_or(d.shutdown_timeout, Duration::from_secs),
            client_idle_timeout: self
                .client_idle_timeout_ms
                .map_or(d.client_idle_timeout, Duration::from_millis),
            event_retention: self
                .event_retention_hours
                .map_or(d.event_retention, |h| Duration::from_secs(h * 3600)),
            event_buffer: self.event_buffer.unwrap_or(d.event_buffer),
            event_poll: self
                .event_poll_ms
                .map_or(d.event_poll, Duration::from_millis),
            cache_capacity: self.cache_capacity.unwrap_or(d.cache_capacity),
            login_max_failures: self.login_max_failures.unwrap_or(d.login_max_failures),
            trusted_proxies: match self.trusted_proxies {
                Some(p) => p
                    .parse()
                    .map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?,
                None => d.trusted_proxies,
            },
            db_max_connections: self.db_max_connections.unwrap_or(d.db_max_connections),
            max_ws_frame: self.max_ws_frame.unwrap_or(d.max_ws_frame),
            worker_threads: self.worker_threads.filter(|n| *n > 0),
            users_url: self.users_url.unwrap_or(d.users_url),
            users_max_connections: self
                .users_max_connections
                .unwrap_or(d.users_max_connections),
            orders_url: self.orders_url.unwrap_or(d.orders_url),
            registry: self.registry,
            heartbeat_interval: self
                .heartbeat_secs
                .map_or(d.heartbeat_interval, Duration::from_secs),
            sse_keep_alive: self
                .sse_keep_alive_secs
                .map_or(d.sse_keep_alive, Duration::from_secs),
            counter_interval: self
                .counter_interval_ms
                .map_or(d.counter_interval, Duration::from_millis),
            ticker_interval: self
                .ticker_interval_ms
                .map_or(d.ticker_interval, Duration::from_millis),
            graphql: crate::graphql::Limits {
                max_depth: self.graphql_max_depth.unwrap_or(d.graphql.max_depth),
                max_complexity: self
                    .graphql_max_complexity
                    .unwrap_or(d.graphql.max_complexity),
                max_query_bytes: self
                    .graphql_max_query_bytes
                    .unwrap_or(d.graphql.max_query_bytes),
                introspection: self
                    .graphql_introspection
                    .unwrap_or(d.graphql.introspection),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The validated runtime configuration. See [`Settings`] for what each field means.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub grpc_port: u16,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub demo: bool,
    pub admin_password: Option<String>,
    pub jwt_secret: Option<String>,
    pub token_ttl: Duration,
    pub max_upload_size: usize,
    pub shutdown_timeout: Duration,
    pub client_idle_timeout: Duration,
    pub event_retention: Duration,
    pub event_buffer: usize,
    pub event_poll: Duration,
    pub cache_capacity: usize,
    pub login_max_failures: u32,
    pub trusted_proxies: crate::forwarded::TrustedProxies,
    pub db_max_connections: u32,
    pub max_ws_frame: usize,
    pub worker_threads: Option<usize>,
    pub users_url: String,
    pub users_max_connections: usize,
    pub orders_url: String,
    pub registry: Option<PathBuf>,
    pub heartbeat_interval: Duration,
    pub sse_keep_alive: Duration,
    pub counter_interval: Duration,
    pub ticker_interval: Duration,
    pub graphql: crate::graphql::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 8000,
            grpc_port: 50051,
            data_dir: PathBuf::from("prism-data"),
            database_url: None,
            nats_url: None,
            log_format: LogFormat::Pretty,
            log_level: "info".into(),
            demo: false,
            admin_password: None,
            jwt_secret: None,
            token_ttl: Duration::from_secs(3600),
            max_upload_size: 10_000_000,
            shutdown_timeout: Duration::from_secs(10),
            client_idle_timeout: Duration::from_secs(60),
            event_retention: Duration::from_secs(168 * 3600),
            event_buffer: 4096,
            event_poll: Duration::from_millis(1000),
            cache_capacity: 10_000,
            login_max_failures: 10,
            trusted_proxies: crate::forwarded::TrustedProxies::loopback(),
            db_max_connections: 8,
            max_ws_frame: 1 << 20,
            worker_threads: None,
            users_url: "http://127.0.0.1:8001".into(),
            users_max_connections: 256,
            orders_url: "http://127.0.0.1:8002".into(),
            registry: None,
            heartbeat_interval: Duration::from_secs(15),
            sse_keep_alive: Duration::from_secs(15),
            counter_interval: Duration::from_millis(1000),
            ticker_interval: Duration::from_millis(1000),
            graphql: crate::graphql::Limits::default(),
        }
    }
}

impl Config {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.event_buffer >= 1, "event_buffer must be at least 1");
        anyhow::ensure!(
            self.db_max_connections >= 2,
            "db_max_connections must be at least 2"
        );
        anyhow::ensure!(
            self.max_upload_size >= 1,
            "max_upload_size must be at least 1"
        );
        anyhow::ensure!(
            !self.client_idle_timeout.is_zero(),
            "client_idle_timeout_ms must be at least 1"
        );
        anyhow::ensure!(
            !self.token_ttl.is_zero(),
            "token_ttl_secs must be at least 1"
        );
        anyhow::ensure!(
            self.users_max_connections >= 1,
            "users_max_connections must be at least 1"
        );
        anyhow::ensure!(
            self.users_url
                .parse::<hyper::Uri>()
                .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some()),
            "users_url must be an http:// URL, such as http://127.0.0.1:8001"
        );
        if let Some(password) = &self.admin_password {
            // Checked here, before anything is written: `--demo` creates the
            // account after Alice's and Bob's, and a refused password would
            // leave a database that holds demo users but no admin.
            // The domain's own rule for every password, so the two cannot drift.
            let (min, max) = crate::domain::validate::limits::PASSWORD;
            crate::domain::validate::Check::new()
                .length("admin_password", password, min, max)
                .finish()
                .map_err(|e| anyhow::anyhow!("PRISM_ADMIN_PASSWORD / {e}"))?;
        }
        if let Some(url) = &self.database_url {
            anyhow::ensure!(
                url.starts_with("postgres://") || url.starts_with("postgresql://"),
                "database_url must be a postgres:// URL (the embedded SQLite database needs no URL)"
            );
        }
        Ok(())
    }

    /// A configuration for tests and embedding: everything default except the
    /// data directory, with both listeners on free ports.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            port: 0,
            grpc_port: 0,
            data_dir: data_dir.into(),
            ..Config::default()
        }
    }

    /// The settings a client may see (`GET /config`): nothing secret, nothing
    /// that reveals the deployment.
    pub fn public_settings(&self) -> serde_json::Value {
        serde_json::json!({
            "max_upload_size": self.max_upload_size,
            "token_ttl_secs": self.token_ttl.as_secs(),
            "event_retention_hours": self.event_retention.as_secs() / 3600,
            "list_limit_default": crate::domain::DEFAULT_LIMIT,
            "list_limit_max": crate::domain::MAX_LIMIT,
        })
    }

    /// Effective settings for administrators (`GET /admin/settings`): secrets and
    /// credentials in URLs are masked.
    pub fn admin_settings(&self) -> serde_json::Value {
        serde_json::json!({
            "host": self.host,
            "port": self.port,
            "grpc_port": self.grpc_port,
            "data_dir": self.data_dir,
            "database": if self.database_url.is_some() { "postgres" } else { "sqlite" },
            "nats": self.nats_url.is_some(),
            "log_format": self.log_format,
            "log_level": self.log_level,
            "demo": self.demo,
            "jwt_secret_source": if self.jwt_secret.is_some() { "config" } else { "data_dir" },
            "token_ttl_secs": self.token_ttl.as_secs(),
            "max_upload_size": self.max_upload_size,
            "shutdown_timeout_secs": self.shutdown_timeout.as_secs(),
            "client_idle_timeout_ms": self.client_idle_timeout.as_millis() as u64,
            "event_retention_hours": self.event_retention.as_secs() / 3600,
            "event_buffer": self.event_buffer,
            "event_poll_ms": self.event_poll.as_millis() as u64,
            "cache_capacity": self.cache_capacity,
            "login_max_failures": self.login_max_failures,
            "trusted_proxies": self.trusted_proxies.to_string(),
            "db_max_connections": self.db_max_connections,
            "max_ws_frame": self.max_ws_frame,
            "heartbeat_secs": self.heartbeat_interval.as_secs(),
            "sse_keep_alive_secs": self.sse_keep_alive.as_secs(),
            "counter_interval_ms": self.counter_interval.as_millis() as u64,
            "ticker_interval_ms": self.ticker_interval.as_millis() as u64,
            "graphql_max_depth": self.graphql.max_depth,
            "graphql_max_complexity": self.graphql.max_complexity,
            "graphql_max_query_bytes": self.graphql.max_query_bytes,
            "graphql_introspection": self.graphql.introspection,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults() {
        let c = Settings::default().resolve().unwrap();
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 8000);
        assert_eq!(c.grpc_port, 50051);
        assert_eq!(c.max_upload_size, 10_000_000);
        assert_eq!(c.token_ttl, Duration::from_secs(3600));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.client_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.event_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.event_buffer, 4096);
        assert_eq!(c.login_max_failures, 10);
        assert_eq!(c.trusted_proxies.to_string(), "127.0.0.0/8,::1/128");
        assert_eq!(c.log_format, LogFormat::Pretty);
        assert!(!c.demo);
        assert!(c.database_url.is_none());
        assert_eq!(c.graphql.max_depth, 15);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.sse_keep_alive, Duration::from_secs(15));
        assert_eq!(c.max_ws_frame, 1 << 20);
        assert_eq!(c.graphql.max_complexity, 2000);
        assert_eq!(c.graphql.max_query_bytes, 100_000);
        assert!(c.graphql.introspection);
        assert_eq!(c.users_url, "http://127.0.0.1:8001");
        assert_eq!(c.users_max_connections, 256);
    }

    #[test]
    fn flags_win_over_file() {
        let file: Settings = toml::from_str("port = 9000\nhost = \"0.0.0.0\"").unwrap();
        let cli = Settings {
            port: Some(9100),
            ..Settings::default()
        };
        let c = cli.overlay(file).unwrap().resolve().unwrap();
        assert_eq!(c.port, 9100);
        assert_eq!(c.host, "0.0.0.0");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Settings>("prot = 9000").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn a_demo_admin_password_too_short_to_log_in_with_is_refused_up_front() {
        let with = |p: &str| {
            Settings {
                admin_password: Some(p.into()),
                ..Settings::default()
            }
            .resolve()
        };
        let err = with("short").unwrap_err().to_string();
        assert!(err.contains("admin_password"), "{err}");
        assert!(with("long-enough").is_ok());
    }

    #[test]
    fn non_postgres_url_is_rejected() {
        let s = Settings {
            database_url: Some("mysql://x".into()),
            ..Settings::default()
        };
        assert!(s.resolve().is_err());
    }

    #[test]
    fn the_users_service_is_reached_over_plain_http_with_room_for_a_connection() {
        let resolved = |url: &str, connections: usize| {
            Settings {
                users_url: Some(url.into()),
                users_max_connections: Some(connections),
                ..Settings::default()
            }
            .resolve()
        };
        let c = resolved("http://users.internal:8001/base", 1).unwrap();
        assert_eq!(c.users_max_connections, 1);
        for (url, connections, expected) in [
            (
                "https://users.internal",
                1,
                "users_url must be an http:// URL",
            ),
            ("users.internal:8001", 1, "users_url must be an http:// URL"),
            ("http://", 1, "users_url must be an http:// URL"),
            (
                "http://users.internal",
                0,
                "users_max_connections must be at least 1",
            ),
        ] {
            let err = resolved(url, connections).unwrap_err().to_string();
            assert!(err.contains(expected), "{url}, {connections}: {err}");
        }
    }
}
