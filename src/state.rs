//! Application state shared by every protocol: the domain, configuration,
//! token keys, and the counters behind `/stats`, `/admin/stats` and `/metrics`.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{LoginLimiter, TokenKeys},
    config::Config,
    domain::Domain,
    pool::ConnPool,
    relay::{RelayState, RelayStatus, SessionState},
};

/// Everything a handler may need, behind one `Arc`: axum clones the state for
/// every extractor of every request, so a clone must be one atomic increment.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
#[derive(Debug)]
pub struct Shared {
    pub domain: Domain,
    pub config: Arc<Config>,
    pub keys: TokenKeys,
    pub limiter: Arc<LoginLimiter>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server starts shutting down; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// Upgraded connections (WebSockets) live outside the HTTP server's own
    /// bookkeeping; shutdown waits for them here so their close frames go out.
    pub sessions: TaskTracker,
    /// Background jobs started by `POST /tasks`.
    pub jobs: TaskTracker,
    /// The simulated stock ticker shared by SSE and WebSocket clients.
    pub ticker: crate::realtime::ticker::Ticker,
    /// The NATS relay, when this process publishes its events.
    pub relay: Option<Arc<crate::relay::RelayStatus>>,
    /// The users service's consumer of `order.created`.
    pub order_consumer: Option<Arc<crate::relay::SessionState>>,
}

/// How long a user counts as active after an authenticated request.
const ACTIVE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Live counters of the application (the seed's `AppState`, made concurrent).
#[derive(Debug)]
pub struct Stats {
    pub started: Instant,
    /// Requests seen by the HTTP middleware since start.
    pub total_requests: AtomicU64,
    /// Open WebSocket connections (all WebSocket endpoints).
    pub websocket_connections: AtomicI64,
    /// Open Server-Sent Events streams.
    pub sse_connections: AtomicI64,
    /// Open GraphQL subscriptions.
    pub subscriptions: AtomicI64,
    /// Users who made an authenticated request recently, with when.
    active: Mutex<HashMap<i64, Instant>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            total_requests: AtomicU64::new(0),
            websocket_connections: AtomicI64::new(0),
            sse_connections: AtomicI64::new(0),
            subscriptions: AtomicI64::new(0),
            active: Mutex::new(HashMap::new()),
        }
    }
}

impl Stats {
    pub fn saw_user(&self, user_id: i64) {
        self.active.lock().insert(user_id, Instant::now());
    }

    /// Users active within the last fifteen minutes.
    pub fn active_users(&self) -> usize {
        let now = Instant::now();
        let mut active = self.active.lock();
        active.retain(|_, seen| now.duration_since(*seen) < ACTIVE_WINDOW);
        active.len()
    }

    pub fn requests(&self) -> u64 {
        self.total_requests.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    /// The matched route template (`/users/{user_id}`), never the raw path, so
    /// the number of series stays bounded.
    pub route: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: &'static str,
    pub route: Arc<str>,
}

/// Route templates as shared strings, so recording a request's metrics does
/// not allocate: there are only as many as the router has routes.
#[derive(Debug, Default)]
pub struct RouteNames(parking_lot::RwLock<std::collections::HashSet<Arc<str>>>);

impl RouteNames {
    pub fn intern(&self, route: &str) -> Arc<str> {
        if let Some(r) = self.0.read().get(route) {
            return r.clone();
        }
        let mut set = self.0.write();
        if let Some(r) = set.get(route) {
            return r.clone();
        }
        let r: Arc<str> = Arc::from(route);
        set.insert(r.clone());
        r
    }
}

/// Prometheus metrics, rendered by `GET /metrics`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub routes: RouteNames,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    events_head: Gauge,
    events_delivered: Gauge,
    events_gaps_settled: Gauge,
    event_notifications_sent: Gauge,
    event_subscribers: Gauge,
    cache_entries: Gauge,
    sse_connections: Gauge,
    websocket_connections: Gauge,
    parts: PartGauges,
}

/// Gauges read at scrape time from parts only some roles have: the orders
/// service's connections to the users service, the NATS relay and the users
/// service's order consumer. A role
/// without the part shows none of its gauges.
#[derive(Debug, Clone, Default)]
struct PartGauges {
    users_service: Arc<OnceLock<Arc<ConnPool>>>,
    relay: Arc<OnceLock<Arc<RelayStatus>>>,
    order_consumer: Arc<OnceLock<Arc<SessionState>>>,
    sqlite: Arc<
        OnceLock<(
            Arc<crate::db::writer::Writer>,
            Arc<crate::db::inline::InlineReads>,
        )>,
    >,
}

impl prometheus_client::collector::Collector for PartGauges {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
        };
        let mut gauges = Vec::new();
        if let Some(pool) = self.users_service.get() {
            gauges.push((
                "users_service_connections",
                "Connections open to the users service.",
                i64::try_from(pool.open()).unwrap_or(i64::MAX),
            ));
            gauges.push((
                "users_service_pending_requests",
                "Requests waiting for a connection to the users service, every one being busy.",
                i64::try_from(pool.pending()).unwrap_or(i64::MAX),
            ));
        }
        if let Some(relay) = self.relay.get() {
            let state = relay.state();
            gauges.push((
                "nats_relay_connected",
                "1 while the event relay is connected to NATS JetStream and publishing, else 0.",
                i64::from(state == RelayState::Connected),
            ));
            gauges.push((
                "nats_relay_standby",
                "1 while another instance sharing the database relays its events, else 0.",
                i64::from(state == RelayState::Standby),
            ));
            gauges.push((
                "nats_relay_position",
                "The last event id the relay has published (event_log_head minus this is its backlog).",
                relay.position(),
            ));
        }
        if let Some(consumer) = self.order_consumer.get() {
            let state = consumer.get();
            gauges.push((
                "order_consumer_connected",
                "1 while the users service is applying order.created events, else 0.",
                i64::from(state == RelayState::Connected),
            ));
            gauges.push((
                "order_consumer_standby",
                "1 while another users service sharing the database applies them, else 0.",
                i64::from(state == RelayState::Standby),
            ));
        }
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        if let Some((writer, reads)) = self.sqlite.get() {
            for (name, help, value) in [
                (
                    "sqlite_writes",
                    "Write transactions committed to SQLite.",
                    writer.writes(),
                ),
                (
                    "sqlite_commits",
                    "SQLite commits (each one fsync): fewer than the writes when writes queued and shared one.",
                    writer.commits(),
                ),
                (
                    "sqlite_lock_waits",
                    "Writes that found SQLite's write lock held by another process and waited for it.",
                    writer.lock_waits(),
                ),
                (
                    "sqlite_reads_moved",
                    "SQLite reads too long to run on an async worker, run again on a blocking thread.",
                    reads.moved(),
                ),
            ] {
                let counter = ConstCounter::new(value);
                counter.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Counter,
                )?)?;
            }
        }
        Ok(())
    }
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::with_prefix("prism"),
            routes: RouteNames::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            events_head: Gauge::default(),
            events_delivered: Gauge::default(),
            events_gaps_settled: Gauge::default(),
            event_notifications_sent: Gauge::default(),
            event_subscribers: Gauge::default(),
            cache_entries: Gauge::default(),
            sse_connections: Gauge::default(),
            websocket_connections: Gauge::default(),
            parts: PartGauges::default(),
        };
        let mut r = m.registry;
        r.register(
            "http_requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            m.latency.clone(),
        );
        r.register(
            "event_log_head",
            "Highest event id delivered by this process",
            m.events_head.clone(),
        );
        r.register(
            "events_delivered",
            "Events delivered to subscribers since start",
            m.events_delivered.clone(),
        );
        r.register(
            "event_log_gaps_settled",
            "Times this process's pump found an event id missing for long and waited for \
             the writers in flight to know it was rolled back (PostgreSQL)",
            m.events_gaps_settled.clone(),
        );
        r.register(
            "event_notifications_sent",
            "Notifications this process sent to wake the event pumps of other processes \
             sharing its PostgreSQL database (none while no other process listens)",
            m.event_notifications_sent.clone(),
        );
        r.register(
            "event_subscribers",
            "Live event-log subscriptions",
            m.event_subscribers.clone(),
        );
        r.register(
            "cache_entries",
            "Entities in the read cache",
            m.cache_entries.clone(),
        );
        r.register(
            "sse_connections",
            "Open Server-Sent Events streams",
            m.sse_connections.clone(),
        );
        r.register(
            "websocket_connections",
            "Open WebSocket connections",
            m.websocket_connections.clone(),
        );
        r.register_collector(Box::new(m.parts.clone()));
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    /// Reports the orders service's connections to the users service.
    pub fn watch_users_service(&self, pool: Arc<ConnPool>) {
        let _ = self.parts.users_service.set(pool);
    }

    /// Reports the NATS relay's connection and position.
    pub fn watch_relay(&self, relay: Arc<RelayStatus>) {
        let _ = self.parts.relay.set(relay);
    }

    /// Reports whether the users service's order consumer is at work.
    pub fn watch_order_consumer(&self, consumer: Arc<SessionState>) {
        let _ = self.parts.order_consumer.set(consumer);
    }

    /// Reports SQLite's commits and the writes they held, and the reads
    /// moved off the async workers.
    pub fn watch_sqlite(
        &self,
        writer: Arc<crate::db::writer::Writer>,
        reads: Arc<crate::db::inline::InlineReads>,
    ) {
        let _ = self.parts.sqlite.set((writer, reads));
    }

    /// Renders the registry, refreshing the gauges that are read at scrape time.
    pub fn render(&self, state: &AppState) -> String {
        let events = state.domain.events();
        self.events_head.set(events.head());
        self.events_delivered.set(events.delivered_count() as i64);
        self.events_gaps_settled.set(events.gaps_settled() as i64);
        self.event_notifications_sent
            .set(events.notifications_sent() as i64);
        self.event_subscribers.set(events.subscriber_count() as i64);
        self.cache_entries.set(state.domain.cache_size() as i64);
        self.sse_connections
            .set(state.stats.sse_connections.load(Ordering::Relaxed));
        self.websocket_connections
            .set(state.stats.websocket_connections.load(Ordering::Relaxed));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
