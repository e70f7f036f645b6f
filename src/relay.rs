//! Moving events between processes, reliably.
//!
//! **Relay** ([`run_relay`]): publishes this database's event log to NATS
//! JetStream (`prism.events.<type>` in the stream `PRISM_EVENTS`). It reads
//! from a stored position, publishes each event with the message id
//! `<origin>:<event id>` and waits for JetStream's ack before moving the
//! position, so a broker outage or a crash loses nothing: the relay resumes
//! from the last acknowledged event, and whatever it publishes twice the
//! broker drops as a duplicate within its window (consumers also apply each
//! event at most once).
//!
//! **Consumer** ([`run_order_consumer`]): the users service applies
//! `order.created` to its per-user statistics, from JetStream (a durable pull
//! consumer, acked after the change commits) or — without a broker — straight
//! from the orders service's `/events/feed`, resuming with `Last-Event-ID`
//! from the position it stores with each change. A feed that no longer holds
//! every event after that position (retention removed them while the users
//! service was away) says so with a `reset`, and the users service takes its
//! statistics over from the orders service's totals instead.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream;
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Role, TokenKeys},
    domain::{
        Domain,
        consumers::{Applied, OrderTotals},
    },
    events::{Event, EventFilter, Item},
};

pub const STREAM: &str = "PRISM_EVENTS";
/// The relay's position in `event_offsets`.
pub const RELAY_POSITION: &str = "nats-relay";

async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Reconnecting a long-running session (the relay, the consumer) after it
/// broke: the wait before each new try, and how loudly to say so.
///
/// An outage ends once a session has stayed up for [`Reconnect::HEALTHY`]. A
/// session that gets going and breaks again soon after (a peer that accepts
/// and then fails every time) is the same outage: its waits keep growing and
/// it is not reported again.
#[derive(Debug)]
struct Reconnect {
    what: &'static str,
    backoff: Duration,
    /// Tries that failed in this outage.
    failures: u32,
    /// When the current session got going.
    up_since: Option<Instant>,
    /// Whether this outage's first resumption has been reported.
    resumed: bool,
}

impl Reconnect {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);
    const HEALTHY: Duration = Duration::from_secs(10);

    fn new(what: &'static str) -> Reconnect {
        Reconnect {
            what,
            backoff: Self::FIRST,
            failures: 0,
            up_since: None,
            resumed: false,
        }
    }

    /// The session got going.
    fn connected(&mut self, now: Instant) {
        self.up_since = Some(now);
        if self.failures > 0 && !self.resumed {
            self.resumed = true;
            tracing::info!(failed_tries = self.failures, "{} resumed", self.what);
        }
    }

    /// How long to wait after the session broke with `error`. The first
    /// failure of an outage is a warning; the tries after it, every few
    /// seconds for as long as the peer is away, would bury the log, so they
    /// are debug lines.
    fn failed(&mut self, error: &dyn std::fmt::Display, now: Instant) -> Duration {
        if self
            .up_since
            .take()
            .is_some_and(|t| now.duration_since(t) >= Self::HEALTHY)
        {
            *self = Reconnect::new(self.what);
        }
        if self.failures == 0 {
            tracing::warn!(%error, "{} interrupted; retrying until it resumes", self.what);
        } else {
            tracing::debug!(%error, failed_tries = self.failures, "{} still interrupted", self.what);
        }
        self.failures += 1;
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(Self::MAX);
        wait
    }
}

async fn jetstream_context(url: &str) -> Result<jetstream::Context, async_nats::Error> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(url)
        .await?;
    let js = jetstream::new(client);
    js.get_or_create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["prism.events.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    Ok(js)
}

/// What `/metrics` and `/readyz` show of a running relay.
#[derive(Debug, Default)]
pub struct RelayStatus {
    state: AtomicU8,
    position: AtomicI64,
}

/// What a relay is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayState {
    /// Not connected to JetStream; trying again.
    Reconnecting = 0,
    /// Connected and publishing.
    Connected = 1,
    /// Another instance sharing the database (PostgreSQL) relays its events.
    Standby = 2,
}

impl RelayStatus {
    pub fn state(&self) -> RelayState {
        match self.state.load(Ordering::Relaxed) {
            1 => RelayState::Connected,
            2 => RelayState::Standby,
            _ => RelayState::Reconnecting,
        }
    }

    fn set(&self, state: RelayState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// The id of the last event the relay is done with (published and
    /// acknowledged, or not for the broker), as stored.
    pub fn position(&self) -> i64 {
        self.position.load(Ordering::Relaxed)
    }
}

impl RelayState {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::Reconnecting => "reconnecting",
            RelayState::Connected => "connected",
            RelayState::Standby => "standby",
        }
    }
}

/// The key of the session-level advisory lock that makes one relay at a time
/// publish a PostgreSQL database's events ("relay" in ASCII).
const RELAY_LOCK_KEY: i64 = 0x72_65_6c_61_79;

/// How often a relay on standby asks for the lock again.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// Events read from the log at a time; the position is stored once per batch,
/// so a crash republishes at most this many (which the broker drops as
/// duplicates).
const BATCH: i64 = 256;

/// Publishes every event matching `filter` to JetStream until `stop`.
/// After a break it resumes from the last event JetStream acknowledged.
pub async fn run_relay(
    domain: Domain,
    url: String,
    filter: EventFilter,
    status: Arc<RelayStatus>,
    stop: CancellationToken,
) {
    let mut reconnect = Reconnect::new("event relay");
    while !stop.is_cancelled() {
        let session = relay_session(&domain, &url, &filter, &status, &stop, &mut reconnect).await;
        let wait = match session {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Standby) => {
                status.set(RelayState::Standby);
                STANDBY_RETRY
            }
            Err(e) => {
                status.set(RelayState::Reconnecting);
                reconnect.failed(&e, Instant::now())
            }
        };
        if !pause(&stop, wait).await {
            return;
        }
    }
}

/// How a relay session ended, other than by an error.
enum Ended {
    Stopped,
    /// Another instance holds the relay lock.
    Standby,
}

/// On PostgreSQL, a connection holding the relay lock, or `None` when another
/// instance holds it. The lock lasts as long as the connection: one that got
/// it leaves the pool, and dropping it hands the lock on.
async fn relay_lock(pool: &sqlx::PgPool) -> sqlx::Result<Option<sqlx::PgConnection>> {
    let mut conn = pool.acquire().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RELAY_LOCK_KEY)
        .fetch_one(&mut *conn)
        .await?;
    Ok(got.then(|| conn.detach()))
}

async fn relay_session(
    domain: &Domain,
    url: &str,
    filter: &EventFilter,
    status: &RelayStatus,
    stop: &CancellationToken,
    reconnect: &mut Reconnect,
) -> Result<Ended, async_nats::Error> {
    // Instances sharing a PostgreSQL database share its event log: one of
    // them publishes it, the others stand by to take over.
    let mut lock = match domain.db().postgres() {
        Some(pool) => match relay_lock(pool).await? {
            Some(conn) => Some(conn),
            None => {
                status
                    .position
                    .store(domain.offset(RELAY_POSITION).await?, Ordering::Relaxed);
                return Ok(Ended::Standby);
            }
        },
        None => None,
    };
    let js = jetstream_context(url).await?;
    let origin = domain.origin().await?;
    tracing::info!(url, "event relay connected to NATS JetStream");
    reconnect.connected(Instant::now());
    status.set(RelayState::Connected);
    // A live subscription only as a wake-up; the log itself is read below.
    let mut wake = Box::pin(domain.events().subscribe(None, EventFilter::all()));
    let mut after = 0;
    while !stop.is_cancelled() {
        // The lock went with its connection if that broke; another relay may
        // have it now.
        if let Some(conn) = lock.as_mut() {
            sqlx::query("SELECT 1").execute(conn).await?;
        }
        // A relay that had the lock before may have got further.
        after = after.max(domain.offset(RELAY_POSITION).await?);
        status.position.store(after, Ordering::Relaxed);
        let batch = domain.events().read_after(after, BATCH).await?;
        if batch.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return Ok(Ended::Stopped),
                item = wake.next() => {
                    if matches!(item, None | Some(Item::CutOff { .. })) {
                        wake = Box::pin(domain.events().subscribe(None, EventFilter::all()));
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        // One at a time, each acknowledged before the next is sent: an event
        // lost in a reconnect is sent again before any later one, so the
        // stream keeps the log's order.
        let mut done = after;
        let mut sent = Ok(());
        for event in &batch {
            if filter.matches(&event.kind)
                && let Err(e) = publish(&js, origin, event).await
            {
                sent = Err(e);
                break;
            }
            done = event.id;
        }
        // What was acknowledged is stored even when the broker failed part
        // way, so that as little as possible is sent twice.
        if done > after {
            domain.set_offset(RELAY_POSITION, done).await?;
            after = done;
        }
        sent?;
    }
    Ok(Ended::Stopped)
}

/// Publishes one event and waits for JetStream's acknowledgement.
async fn publish(
    js: &jetstream::Context,
    origin: i64,
    event: &Event,
) -> Result<(), async_nats::Error> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{origin}:{}", event.id).as_str());
    let ack = js
        .publish_with_headers(
            format!("prism.events.{}", event.kind),
            headers,
            event.json.clone().into(),
        )
        .await?;
    tokio::time::timeout(Duration::from_secs(5), ack)
        .await
        .map_err(|_| "JetStream did not acknowledge in time")??;
    Ok(())
}

#[derive(Deserialize)]
struct WireEvent {
    id: i64,
    payload: OrderCreated,
}

#[derive(Deserialize)]
struct OrderCreated {
    user_id: i64,
    total: f64,
}

/// Applies `order.created` events to the users service's statistics until
/// `stop`: from JetStream when `nats_url` is set, else from `orders_url`'s feed.
pub async fn run_order_consumer(
    domain: Domain,
    keys: TokenKeys,
    nats_url: Option<String>,
    orders_url: String,
    stop: CancellationToken,
) {
    let mut reconnect = Reconnect::new("order consumer");
    while !stop.is_cancelled() {
        let result = match &nats_url {
            Some(url) => consume_jetstream(&domain, url, &stop, &mut reconnect).await,
            None => consume_feed(&domain, &keys, &orders_url, &stop, &mut reconnect).await,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                if !pause(&stop, reconnect.failed(&e, Instant::now())).await {
                    return;
                }
            }
        }
    }
}

const CONSUMER: &str = "users-service";

async fn consume_jetstream(
    domain: &Domain,
    url: &str,
    stop: &CancellationToken,
    reconnect: &mut Reconnect,
) -> Result<(), async_nats::Error> {
    let js = jetstream_context(url).await?;
    let stream = js.get_stream(STREAM).await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            CONSUMER,
            jetstream::consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                filter_subject: "prism.events.order.created".into(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(10),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    tracing::info!("users service consuming order.created from JetStream");
    reconnect.connected(Instant::now());
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(msg) = msg else {
            return Err("JetStream message stream ended".into());
        };
        let msg = msg?;
        let key = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_else(|| {
                format!("seq:{}", msg.info().map(|i| i.stream_sequence).unwrap_or(0))
            });
        match serde_json::from_slice::<WireEvent>(&msg.payload) {
            Ok(ev) => {
                domain
                    .apply_order_created(
                        Applied::Key {
                            consumer: CONSUMER,
                            key: &key,
                        },
                        ev.payload.user_id,
                        ev.payload.total,
                    )
                    .await?;
            }
            Err(e) => tracing::warn!(error = %e, key, "skipping an unreadable order.created"),
        }
        msg.ack().await?;
    }
}

async fn consume_feed(
    domain: &Domain,
    keys: &TokenKeys,
    orders_url: &str,
    stop: &CancellationToken,
    reconnect: &mut Reconnect,
) -> Result<(), async_nats::Error> {
    let orders_url = orders_url.trim_end_matches('/');
    let position = format!("{CONSUMER}:feed");
    let client = reqwest::Client::new();
    // Each pass follows the feed from the stored position until it fails
    // or, after a restore, must start again from the restored one.
    loop {
        let after = domain.offset(&position).await?;
        let response = client
            .get(format!("{orders_url}/events/feed?types=order.created"))
            .header("last-event-id", after.to_string())
            .send()
            .await?
            .error_for_status()?;
        tracing::info!(
            orders_url,
            after,
            "users service consuming order.created from the orders feed"
        );
        reconnect.connected(Instant::now());
        let mut body = response.bytes_stream();
        // Bytes until a whole event has arrived: a chunk may end inside a
        // character, which decoding each chunk on its own would mangle.
        let mut buf: Vec<u8> = Vec::new();
        'feed: loop {
            let chunk = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                c = body.next() => c,
            };
            let Some(chunk) = chunk else {
                return Err("the orders feed ended".into());
            };
            buf.extend_from_slice(&chunk?);
            while let Some(block) = take_block(&mut buf) {
                if block.starts_with(b"event: reset\n") {
                    let restored = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        r = restore_order_stats(domain, keys, &client, orders_url, &position, after) => r?,
                    };
                    if restored {
                        break 'feed;
                    }
                    continue;
                }
                let Some(data) = sse_data(&block) else {
                    continue;
                };
                if let Ok(ev) = serde_json::from_str::<WireEvent>(&data) {
                    domain
                        .apply_order_created(
                            Applied::Position {
                                stream: &position,
                                id: ev.id,
                            },
                            ev.payload.user_id,
                            ev.payload.total,
                        )
                        .await?;
                }
            }
        }
    }
}

/// The user id of the tokens the users service signs for itself: no user's.
const SERVICE_PRINCIPAL: i64 = 0;

/// How long the orders service gets to sum every user's orders.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// The orders feed has lost events after `after` that this service never
/// applied (it was away for longer than the orders service keeps them):
/// takes the order statistics over from the orders service's own totals
/// (`/order-stats`), as of an event from which the feed goes on. Returns
/// whether it did; an orders service too old to have the totals is only
/// reported, and the feed goes on from what it still holds.
async fn restore_order_stats(
    domain: &Domain,
    keys: &TokenKeys,
    client: &reqwest::Client,
    orders_url: &str,
    position: &str,
    after: i64,
) -> Result<bool, async_nats::Error> {
    // The services share the token secret (SPEC §8); the totals are an
    // admin's to read.
    let token = keys.issue(SERVICE_PRINCIPAL, Role::Admin)?;
    let response = client
        .get(format!("{orders_url}/order-stats"))
        .bearer_auth(token)
        .timeout(RESTORE_TIMEOUT)
        .send()
        .await?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        tracing::error!(
            orders_url,
            after,
            "the orders feed no longer holds some order.created events this service had not applied, and the orders service has no /order-stats to restore from; their orders are missing from the order statistics"
        );
        return Ok(false);
    }
    let totals: OrderTotals = response.error_for_status()?.json().await?;
    domain.restore_order_stats(position, &totals).await?;
    tracing::warn!(
        orders_url,
        after,
        through = totals.through,
        users = totals.users.len(),
        "the orders feed no longer holds some order.created events this service had not applied; order statistics restored from the orders service's totals"
    );
    Ok(true)
}

/// The next whole Server-Sent Events block taken off the front of `buf`,
/// once one has arrived.
fn take_block(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let end = buf.windows(2).position(|w| w == b"\n\n")?;
    Some(buf.drain(..end + 2).collect())
}

/// The data of one Server-Sent Events block (its `data:` lines joined), or
/// `None` for a block without data (a comment, a keep-alive).
fn sse_data(block: &[u8]) -> Option<String> {
    let data: String = String::from_utf8_lossy(block)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start)
        .collect();
    (!data.is_empty()).then_some(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnecting_waits_longer_each_try_and_starts_over_after_a_healthy_session() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = Reconnect::new("test session");
        let ms = |r: &mut Reconnect, n, now| -> Vec<u128> {
            (0..n).map(|_| r.failed(&"down", now).as_millis()).collect()
        };
        assert_eq!(
            ms(&mut r, 8, at(0)),
            [200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        // Up, and broken again at once: the same outage, still waiting long.
        r.connected(at(1));
        assert!(r.resumed);
        assert_eq!(ms(&mut r, 1, at(2)), [5000]);
        assert_eq!(r.failures, 9);
        // Up for long enough: the next break is a new outage.
        r.connected(at(3));
        assert_eq!(
            ms(&mut r, 2, at(3 + Reconnect::HEALTHY.as_secs())),
            [200, 400]
        );
        assert_eq!((r.failures, r.resumed), (2, false));
    }

    #[test]
    fn an_event_split_inside_a_character_reads_whole() {
        let stream = ": keep-alive\n\nid: 7\ndata: {\"name\":\"Zoë\"}\n\n".as_bytes();
        // Inside the two bytes of "ë".
        let split = stream.iter().position(|b| *b >= 0x80).unwrap() + 1;
        let mut buf = stream[..split].to_vec();
        let keep_alive = take_block(&mut buf).unwrap();
        assert_eq!(sse_data(&keep_alive), None);
        assert_eq!(take_block(&mut buf), None, "the event has not all arrived");
        buf.extend_from_slice(&stream[split..]);
        let event = take_block(&mut buf).unwrap();
        assert_eq!(sse_data(&event).as_deref(), Some(r#"{"name":"Zoë"}"#));
        assert!(buf.is_empty());
    }
}
