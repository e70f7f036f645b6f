//! The service registry: a TOML file naming each upstream service, its
//! instances, and its resilience policy. Unknown keys are rejected.
//!
//! ```toml
//! [services.users]
//! instances = ["http://127.0.0.1:8001", "http://127.0.0.1:8011"]
//! timeout_ms = 2000          # per try
//!
//! [services.orders]
//! instances = ["http://127.0.0.1:8002"]
//!
//! [services.products]        # gRPC
//! instances = ["http://127.0.0.1:50052"]
//! ```

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;

use super::breaker;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub services: BTreeMap<String, ServiceSpec>,
    /// Overall deadline for one client request, all tries included, in ms [default: 5000]
    #[serde(default = "defaults::deadline_ms")]
    pub deadline_ms: u64,
    /// How often instances are health-checked, in ms [default: 1000]
    #[serde(default = "defaults::health_interval_ms")]
    pub health_interval_ms: u64,
    /// A client connection on which no request starts for this long is
    /// closed (an idle keep-alive connection, or a request head that never
    /// completes), in ms [default: 60000]
    #[serde(default = "defaults::client_idle_timeout_ms")]
    pub client_idle_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Base URLs of the instances (`http://host:port`).
    pub instances: Vec<String>,
    /// Timeout of one try, in ms [default: 2000]
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after the first try, for idempotent requests only [default: 2]
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// First backoff, in ms; doubles per retry, with full jitter [default: 50]
    #[serde(default = "defaults::backoff_ms")]
    pub backoff_ms: u64,
    /// Consecutive failures that open an instance's circuit [default: 5]
    #[serde(default = "defaults::failures_to_open")]
    pub failures_to_open: u32,
    /// How long a circuit stays open before a probe, in ms [default: 10000]
    #[serde(default = "defaults::open_ms")]
    pub open_ms: u64,
    /// Probes allowed at once while half-open [default: 1]
    #[serde(default = "defaults::half_open_probes")]
    pub half_open_probes: u32,
    /// How long a pooled connection to an instance may sit idle, in ms [default: 30000]
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Retries allowed as a fraction of requests (retry budget) [default: 0.2]
    #[serde(default = "defaults::retry_ratio")]
    pub retry_ratio: f64,
    /// Connections open to one instance at most [default: 256]
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Requests that may wait for a connection to one instance when all are
    /// busy; more are refused at once with 503 [default: no limit: each
    /// waits at most its try's `timeout_ms`]
    #[serde(default)]
    pub max_pending_requests: Option<usize>,
}

mod defaults {
    pub fn deadline_ms() -> u64 {
        5000
    }
    pub fn health_interval_ms() -> u64 {
        1000
    }
    pub fn client_idle_timeout_ms() -> u64 {
        60_000
    }
    pub fn timeout_ms() -> u64 {
        2000
    }
    pub fn retries() -> u32 {
        2
    }
    pub fn backoff_ms() -> u64 {
        50
    }
    pub fn failures_to_open() -> u32 {
        5
    }
    pub fn open_ms() -> u64 {
        10_000
    }
    pub fn half_open_probes() -> u32 {
        1
    }
    pub fn idle_timeout_ms() -> u64 {
        30_000
    }
    pub fn retry_ratio() -> f64 {
        0.2
    }
    // Measured (docs/benchmarks.md, "Gateway under a burst of clients"):
    // 3,000 and 6,000 clients through one users instance were all answered,
    // with a lower p99 at 256 than at 1,024 (Envoy's default) or uncapped.
    pub fn max_connections() -> usize {
        256
    }
}

impl ServiceSpec {
    pub fn new(instances: Vec<String>) -> Self {
        ServiceSpec {
            instances,
            timeout_ms: defaults::timeout_ms(),
            retries: defaults::retries(),
            backoff_ms: defaults::backoff_ms(),
            failures_to_open: defaults::failures_to_open(),
            open_ms: defaults::open_ms(),
            half_open_probes: defaults::half_open_probes(),
            idle_timeout_ms: defaults::idle_timeout_ms(),
            retry_ratio: defaults::retry_ratio(),
            max_connections: defaults::max_connections(),
            max_pending_requests: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn breaker_policy(&self) -> breaker::Policy {
        breaker::Policy {
            failures_to_open: self.failures_to_open,
            open_for: Duration::from_millis(self.open_ms),
            half_open_probes: self.half_open_probes.max(1),
        }
    }
}

impl Registry {
    pub fn from_file(path: &Path) -> anyhow::Result<Registry> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read registry {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("invalid registry {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Registry> {
        let r: Registry = toml::from_str(text)?;
        for name in ["users", "orders", "products"] {
            let spec = r
                .services
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("the registry names no `{name}` service"))?;
            anyhow::ensure!(
                !spec.instances.is_empty(),
                "service `{name}` has no instances"
            );
        }
        for (name, spec) in &r.services {
            anyhow::ensure!(
                spec.max_connections > 0,
                "service `{name}`: max_connections must be at least 1"
            );
            for url in &spec.instances {
                check_instance_url(url)
                    .map_err(|e| anyhow::anyhow!("service `{name}`: instance {url:?} {e}"))?;
            }
        }
        Ok(r)
    }

    /// The topology of `prism up` and of the services' default ports.
    pub fn local_default() -> Registry {
        let one = |url: &str| ServiceSpec::new(vec![url.to_owned()]);
        Registry {
            services: BTreeMap::from([
                ("users".to_owned(), one("http://127.0.0.1:8001")),
                ("orders".to_owned(), one("http://127.0.0.1:8002")),
                ("products".to_owned(), one("http://127.0.0.1:50052")),
            ]),
            deadline_ms: defaults::deadline_ms(),
            health_interval_ms: defaults::health_interval_ms(),
            client_idle_timeout_ms: defaults::client_idle_timeout_ms(),
        }
    }

    pub fn to_toml(&self) -> String {
        let mut out = format!(
            "deadline_ms = {}\nhealth_interval_ms = {}\n",
            self.deadline_ms, self.health_interval_ms
        );
        for (name, s) in &self.services {
            let instances: Vec<String> = s.instances.iter().map(|i| format!("{i:?}")).collect();
            out.push_str(&format!(
                "\n[services.{name}]\ninstances = [{}]\ntimeout_ms = {}\nretries = {}\n",
                instances.join(", "),
                s.timeout_ms,
                s.retries
            ));
        }
        out
    }
}

/// An instance is a base URL the gateway can open plain TCP connections to:
/// `http://host:port`, nothing after it (the gateway appends the paths).
fn check_instance_url(url: &str) -> anyhow::Result<()> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("is not a URL: {e}"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "must start with http:// (the gateway speaks plain HTTP/1.1 and h2c to its services)"
    );
    anyhow::ensure!(uri.host().is_some(), "has no host");
    anyhow::ensure!(
        matches!(uri.path(), "" | "/") && uri.query().is_none(),
        "must not have a path or query"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_rejects_unknown_keys() {
        let r = Registry::parse(
            r#"
            [services.users]
            instances = ["http://a:1", "http://b:2"]
            [services.orders]
            instances = ["http://c:3"]
            retries = 0
            [services.products]
            instances = ["http://d:4"]
            "#,
        )
        .unwrap();
        assert_eq!(r.services["users"].instances.len(), 2);
        assert_eq!(r.services["users"].timeout_ms, 2000);
        assert_eq!(r.services["orders"].retries, 0);
        assert_eq!(r.deadline_ms, 5000);
        assert!(Registry::parse("[services.users]\ninstances = []\nbogus = 1").is_err());
        assert!(Registry::parse("[services.users]\ninstances = [\"http://a:1\"]").is_err());
        assert_eq!(r.services["users"].max_connections, 256);
        assert_eq!(r.services["users"].max_pending_requests, None);
    }

    #[test]
    fn an_instance_needs_room_for_one_connection() {
        let with = |n: usize| {
            Registry::parse(&format!(
                "[services.users]\ninstances = [\"http://a:1\"]\nmax_connections = {n}\n\
                 [services.orders]\ninstances = [\"http://c:3\"]\n\
                 [services.products]\ninstances = [\"http://d:4\"]\n"
            ))
        };
        assert_eq!(with(1).unwrap().services["users"].max_connections, 1);
        let e = with(0).unwrap_err().to_string();
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn instance_urls_must_be_plain_http_base_urls() {
        let with = |url: &str| {
            Registry::parse(&format!(
                "[services.users]\ninstances = [{url:?}]\n\
                 [services.orders]\ninstances = [\"http://c:3\"]\n\
                 [services.products]\ninstances = [\"http://d:4\"]\n"
            ))
        };
        assert!(with("http://127.0.0.1:8001").is_ok());
        assert!(with("http://users.internal:8001/").is_ok());
        for bad in [
            "https://a:1",
            "a:1",
            "http://a:1/v1",
            "http://a:1/?x=1",
            "not a url",
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("service `users`"), "{bad}: {e}");
        }
    }

    #[test]
    fn default_round_trips() {
        let r = Registry::local_default();
        let again = Registry::parse(&r.to_toml()).unwrap();
        assert_eq!(
            again.services["products"].instances,
            ["http://127.0.0.1:50052"]
        );
    }
}
