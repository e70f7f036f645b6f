//! Startup and shutdown as one object.
//!
//! [`App::build`] does everything that can fail before serving: open and
//! migrate the database, load demo data, start the event pump and the
//! retention worker, bind the listener (port 0 is fine: the real address is
//! reported). [`App::run_until_stopped`] serves until the shutdown future
//! resolves, then drains: stop accepting, let in-flight requests finish within
//! `shutdown_timeout`, end long-lived streams, stop workers, close the database.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use axum::{body::Body, extract::ConnectInfo};
use hyper::body::Body as _;
use hyper::{Request, body::Incoming};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use crate::{
    auth::{LoginLimiter, TokenKeys},
    config::Config,
    db::Db,
    demo,
    domain::Domain,
    events::{EventFilter, EventLog},
    http,
    realtime::ticker::Ticker,
    state::{AppState, Metrics, Shared, Stats},
};

/// Which program this process is: the all-in-one server or one microservice
/// (SPEC §1, §8). All share the domain code; they differ in what they serve
/// and which background workers they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `prism serve`: everything.
    Serve,
    /// `prism users-service`: users and accounts over HTTP; consumes `order.created`.
    Users,
    /// `prism orders-service`: orders over HTTP; publishes `order.created`.
    Orders,
    /// `prism products-service`: the catalogue over gRPC.
    Products,
}

impl Role {
    fn serves_http(self) -> bool {
        self != Role::Products
    }

    fn serves_grpc(self) -> bool {
        matches!(self, Role::Serve | Role::Products)
    }
}

pub struct App {
    role: Role,
    state: AppState,
    listener: Option<TcpListener>,
    http_addr: Option<SocketAddr>,
    grpc_listener: Option<TcpListener>,
    grpc_addr: Option<SocketAddr>,
    /// Background workers (event pump, retention), stopped on shutdown.
    workers: TaskTracker,
    /// Cancels the workers; separate from `state.shutdown`, which ends client
    /// streams first so that they can still be fed while requests drain.
    stop_workers: CancellationToken,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

impl App {
    /// The all-in-one server (`prism serve`).
    pub async fn build(config: Config) -> anyhow::Result<App> {
        Self::build_as(Role::Serve, config).await
    }

    pub async fn build_as(role: Role, mut config: Config) -> anyhow::Result<App> {
        let db = Db::connect(
            config.database_url.as_deref(),
            &config.data_dir,
            config.db_max_connections,
        )
        .await?;
        tracing::info!(database = db.kind(), "database ready");
        let keys = TokenKeys::load(
            config.jwt_secret.as_deref(),
            &config.data_dir,
            config.token_ttl,
        )?;
        let events = EventLog::open(
            db.clone(),
            config.event_buffer,
            config.event_poll,
            config.event_retention,
        )
        .await?;
        let domain = Domain::new(db, events.clone(), config.cache_capacity);
        if config.demo
            && let Some(password) =
                demo::load(role, &domain, config.admin_password.as_deref()).await?
        {
            // Shown once, on the operator's terminal; it is not stored anywhere in clear.
            tracing::warn!(username = "admin", password = %password, "generated the demo admin password; it will not be shown again");
        }

        // The demo's events are delivered before anyone can subscribe: a
        // client subscribing "live from now" must not be sent them later.
        events.catch_up().await?;

        let workers = TaskTracker::new();
        let stop_workers = CancellationToken::new();
        workers.spawn(events.clone().run_pump(stop_workers.clone()));
        workers.spawn(events.clone().run_announcer(stop_workers.clone()));
        workers.spawn(events.clone().run_retention(stop_workers.clone()));
        let ticker = Ticker::new(config.ticker_interval);
        let jobs = TaskTracker::new();
        if role == Role::Serve {
            workers.spawn(ticker.clone().run(stop_workers.clone()));
            // Tasks interrupted by the last stop run again (a report is idempotent).
            for id in domain.unfinished_tasks().await? {
                tracing::info!(task_id = %id, "resuming an interrupted task");
                let domain = domain.clone();
                jobs.spawn(async move { domain.run_task(&id).await });
            }
        }
        // prism serve publishes every event; the orders service its orders.
        let relay_filter = match role {
            Role::Serve => Some(EventFilter::all()),
            Role::Orders => Some(EventFilter::parse("order.*")),
            _ => None,
        };
        let relay = match (relay_filter, &config.nats_url) {
            (Some(filter), Some(url)) => {
                events.keep_unread_by(crate::relay::RELAY_POSITION);
                let status = Arc::new(crate::relay::RelayStatus::default());
                workers.spawn(crate::relay::run_relay(
                    domain.clone(),
                    url.clone(),
                    filter,
                    status.clone(),
                    stop_workers.clone(),
                ));
                Some(status)
            }
            _ => None,
        };
        let order_consumer = (role == Role::Users).then(|| {
            let status = Arc::new(crate::relay::SessionState::default());
            workers.spawn(crate::relay::run_order_consumer(
                domain.clone(),
                keys.clone(),
                config.nats_url.clone(),
                config.orders_url.clone(),
                status.clone(),
                stop_workers.clone(),
            ));
            status
        });

        let (listener, http_addr) = if role.serves_http() {
            let addr = format!("{}:{}", config.host, config.port);
            let l = crate::serve::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let a = l.local_addr()?;
            (Some(l), Some(a))
        } else {
            (None, None)
        };
        let (grpc_listener, grpc_addr) = if role.serves_grpc() {
            let grpc = format!("{}:{}", config.host, config.grpc_port);
            let l = crate::serve::bind(&grpc)
                .await
                .with_context(|| format!("cannot listen on {grpc} for gRPC"))?;
            let a = l.local_addr()?;
            // Clients learn the real port from `GET /`, also when 0 was asked for.
            config.grpc_port = a.port();
            (Some(l), Some(a))
        } else {
            (None, None)
        };

        let metrics = Arc::new(Metrics::default());
        if let Some(relay) = &relay {
            metrics.watch_relay(relay.clone());
        }
        if let Some(consumer) = &order_consumer {
            metrics.watch_order_consumer(consumer.clone());
        }
        if let crate::db::Pools::Sqlite { write, inline, .. } = &domain.db().pools {
            metrics.watch_sqlite(write.clone(), inline.clone());
        }
        let state = AppState::new(Shared {
            domain,
            limiter: Arc::new(LoginLimiter::new(config.login_max_failures)),
            config: Arc::new(config),
            keys,
            stats: Arc::new(Stats::default()),
            metrics,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            jobs,
            ticker,
            relay,
            order_consumer,
        });
        Ok(App {
            role,
            state,
            listener,
            http_addr,
            grpc_listener,
            grpc_addr,
            workers,
            stop_workers,
        })
    }

    /// The address HTTP is served on (the real port when 0 was asked for).
    /// Panics for the products service, which serves gRPC only.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr.expect("this service serves no HTTP")
    }

    /// The address gRPC is served on. Panics for services without gRPC.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr.expect("this service serves no gRPC")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let App {
            role,
            state,
            listener,
            http_addr,
            grpc_listener,
            grpc_addr,
            workers,
            stop_workers,
        } = self;
        let drain = state.config.shutdown_timeout;
        let streams_end = state.shutdown.clone();
        let mut server = match (listener, http_addr) {
            (Some(listener), Some(http_addr)) => {
                let app = http::router_for(role, state.clone());
                let idle = state.config.client_idle_timeout;
                tracing::info!(%http_addr, "HTTP listening on http://{http_addr}");
                let server = crate::serve::serve(
                    listener,
                    state.config.client_idle_timeout,
                    drain,
                    streams_end.clone(),
                    move |peer, conn| {
                        let (app, conn) = (app.clone(), conn.clone());
                        hyper::service::service_fn(move |mut req: Request<Incoming>| {
                            // The request stays in flight until its answer's
                            // body ends: an SSE stream is not idle.
                            let in_flight = conn.request();
                            req.extensions_mut().insert(ConnectInfo(peer));
                            // A body that stops arriving for the idle timeout
                            // is cut off (408), as a connection that sends
                            // nothing is: a request in flight is never closed
                            // as idle, so a trickled body would hold it for
                            // ever. Bodiless requests get no timer.
                            let req = req.map(|b| {
                                if b.is_end_stream() {
                                    Body::new(b)
                                } else {
                                    Body::new(TimeoutBody::new(idle, b))
                                }
                            });
                            let answer = app.clone().oneshot(req);
                            async move {
                                let r = answer.await?;
                                // Boxed again into axum's body type, so the
                                // HTTP server code is the same instance as the
                                // gateway's. With a body type of its own the
                                // binary's gateway used 4–16% more CPU per
                                // proxied request (three A/B runs), for no
                                // change in instruction count.
                                Ok::<_, Infallible>(
                                    r.map(|b| Body::new(crate::serve::Guarded::new(b, in_flight))),
                                )
                            }
                        })
                    },
                );
                tokio::spawn(async move {
                    server.await;
                    anyhow::Ok(())
                })
            }
            _ => tokio::spawn({
                let streams_end = streams_end.clone();
                async move {
                    streams_end.cancelled().await;
                    Ok(())
                }
            }),
        };

        let mut grpc = match (grpc_listener, grpc_addr) {
            (Some(grpc_listener), Some(grpc_addr)) => {
                let grpc_routes = crate::grpc::routes(state.clone(), role).await?;
                tracing::info!(%grpc_addr, "gRPC listening on {grpc_addr}");
                let server = crate::grpc::serve(
                    grpc_listener,
                    grpc_routes,
                    state.config.client_idle_timeout,
                    drain,
                    streams_end.clone(),
                );
                tokio::spawn(async move {
                    server.await;
                    anyhow::Ok(())
                })
            }
            _ => tokio::spawn({
                let streams_end = streams_end.clone();
                async move {
                    streams_end.cancelled().await;
                    Ok(())
                }
            }),
        };

        let failed: Option<anyhow::Error> = tokio::select! {
            res = &mut server => Some(match res {
                Ok(Ok(())) => anyhow::anyhow!("HTTP server stopped unexpectedly"),
                Ok(Err(e)) => e.context("HTTP server failed"),
                Err(e) => anyhow::Error::from(e).context("HTTP server task failed"),
            }),
            res = &mut grpc => Some(match res {
                Ok(Ok(())) => anyhow::anyhow!("gRPC server stopped unexpectedly"),
                Ok(Err(e)) => e.context("gRPC server failed"),
                Err(e) => anyhow::Error::from(e).context("gRPC server task failed"),
            }),
            _ = shutdown => None,
        };
        if let Some(e) = failed {
            // A listener failed: stop everything else, then report it.
            streams_end.cancel();
            server.abort();
            grpc.abort();
            stop_workers.cancel();
            workers.close();
            workers.wait().await;
            state.domain.db().close().await;
            return Err(e);
        }

        tracing::info!(
            timeout_secs = drain.as_secs(),
            "shutting down: draining in-flight requests"
        );
        streams_end.cancel();
        let both = async { tokio::join!(&mut server, &mut grpc) };
        match tokio::time::timeout(drain, both).await {
            Ok((http, grpc_result)) => {
                if let Ok(Err(e)) = http {
                    tracing::warn!(error = %e, "HTTP server error during shutdown");
                }
                if let Ok(Err(e)) = grpc_result {
                    tracing::warn!(error = %e, "gRPC server error during shutdown");
                }
                tracing::info!("all requests finished");
            }
            Err(_) => {
                tracing::warn!("drain timed out; closing the remaining connections");
                server.abort();
                grpc.abort();
            }
        }
        state.sessions.close();
        if tokio::time::timeout(drain, state.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("some WebSocket sessions did not close in time");
        }
        stop_workers.cancel();
        workers.close();
        workers.wait().await;
        state.domain.db().close().await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// A future that resolves on SIGINT or SIGTERM. The handlers are installed
/// by this call, not when the future is first polled: until they are, either
/// signal kills the process outright, without draining. So call it before
/// starting anything that a signal should stop gracefully.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).ok();
        let mut term = signal(SignalKind::terminate()).ok();
        async move {
            tokio::select! {
                Some(()) = recv(&mut int) => tracing::info!("received SIGINT"),
                Some(()) = recv(&mut term) => tracing::info!("received SIGTERM"),
                // Both streams ended: the runtime is going away anyway.
                else => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("received Ctrl-C");
    }
}

/// The next delivery of a signal whose handler could be installed; never,
/// otherwise.
#[cfg(unix)]
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => futures::future::pending().await,
    }
}
