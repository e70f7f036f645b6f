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
//! `order.created` to its per-user statistics, from JetStream (an ordered
//! consumer started after the stream sequence it stores with each change) or
//! — without a broker — straight from the orders service's `/events/feed`,
//! resuming with `Last-Event-ID` from the position it stores with each
//! change. Either way it applies whatever has arrived in one transaction, and
//! keeps a position per publisher, so a republished event changes nothing. A feed that no longer holds
//! every event after that position (retention removed them while the users
//! service was away) says so with a `reset`, and the users service takes its
//! statistics over from the orders service's totals instead.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream;
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::{
    auth::{Role, TokenKeys},
    domain::{
        Domain,
        consumers::{Applied, OrderCreated, OrderTotals},
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

/// A JetStream context on a new connection to `url`. `reconnected`, if
/// given, is notified whenever the connection is made again after a break.
async fn jetstream_context(
    url: &str,
    reconnected: Option<Arc<Notify>>,
) -> Result<jetstream::Context, async_nats::Error> {
    let mut options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(3));
    if let Some(reconnected) = reconnected {
        // The first connection is announced too.
        let connects = Arc::new(AtomicU64::new(0));
        options = options.event_callback(move |event| {
            let reconnected = reconnected.clone();
            let connects = connects.clone();
            async move {
                if matches!(event, async_nats::Event::Connected)
                    && connects.fetch_add(1, Ordering::Relaxed) > 0
                {
                    reconnected.notify_one();
                }
            }
        });
    }
    let client = options.connect(url).await?;
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
    state: SessionState,
    position: AtomicI64,
}

/// What a relay or a consumer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayState {
    /// Not connected (to JetStream, or to the orders service's feed); trying
    /// again.
    Reconnecting = 0,
    /// Connected and at work: publishing, or applying orders.
    Connected = 1,
    /// Another instance sharing the database (PostgreSQL) does the work.
    Standby = 2,
}

/// A [`RelayState`] that one task sets and others read.
#[derive(Debug, Default)]
pub struct SessionState(AtomicU8);

impl SessionState {
    pub fn get(&self) -> RelayState {
        match self.0.load(Ordering::Relaxed) {
            1 => RelayState::Connected,
            2 => RelayState::Standby,
            _ => RelayState::Reconnecting,
        }
    }

    fn set(&self, state: RelayState) {
        self.0.store(state as u8, Ordering::Relaxed);
    }
}

impl RelayStatus {
    pub fn state(&self) -> RelayState {
        self.state.get()
    }

    fn set(&self, state: RelayState) {
        self.state.set(state);
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

/// The key of the advisory lock that makes one users service at a time apply
/// `order.created` to a PostgreSQL database's statistics ("orders").
const CONSUMER_LOCK_KEY: i64 = 0x6f_72_64_65_72_73;

/// How often a relay or consumer on standby asks for the lock again, and how
/// often a consumer makes sure it still holds it.
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

/// On PostgreSQL, a connection holding the advisory lock `key`, or `None`
/// when another instance holds it. The lock lasts as long as the connection:
/// one that got it leaves the pool, and dropping it hands the lock on.
async fn advisory_lock(pool: &sqlx::PgPool, key: i64) -> sqlx::Result<Option<sqlx::PgConnection>> {
    let mut conn = pool.acquire().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
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
        Some(pool) => match advisory_lock(pool, RELAY_LOCK_KEY).await? {
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
    let reconnected = Arc::new(Notify::new());
    let js = jetstream_context(url, Some(reconnected.clone())).await?;
    let origin = domain.origin().await?;
    tracing::info!(url, "event relay connected to NATS JetStream");
    reconnect.connected(Instant::now());
    status.set(RelayState::Connected);
    // A live subscription only as a wake-up; the log itself is read below.
    let mut wake = Box::pin(domain.events().subscribe(None, EventFilter::all()));
    let mut after = 0;
    // The message id of the last event acknowledged, while it is known to be
    // the stream's last message (see `Publish::batch`).
    let mut chain = None;
    let to = Publish {
        js: &js,
        origin,
        filter,
        reconnected: &reconnected,
    };
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
        let (done, sent) = to.batch(&batch, after, &mut chain).await;
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

/// How long JetStream has to acknowledge a message before the relay takes
/// the connection for broken.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and what a relay session publishes.
struct Publish<'a> {
    js: &'a jetstream::Context,
    origin: i64,
    filter: &'a EventFilter,
    /// Notified when the client has connected again after a break.
    reconnected: &'a Notify,
}

impl Publish<'_> {
    /// Publishes the events of `batch` that match the filter, all sent before
    /// any acknowledgement is awaited, and returns the id of the last event
    /// done with (`after` if none): every matching event up to it is in the
    /// stream, in the log's order.
    ///
    /// Order holds because each message names the one sent before it as the
    /// stream's last message (`Nats-Expected-Last-Msg-Id`; `chain` carries
    /// the last one across batches). A message lost on the way (the
    /// connection cut mid-batch, and the messages after it sent on the next
    /// connection) makes JetStream refuse the next, and with it everything
    /// after, so the stream only ever holds a prefix of what was sent: a
    /// consumer keeping a position per publisher never skips an event.
    /// Another publisher writing to the stream in between also breaks the
    /// chain; that is not a failure, the refused events are simply sent again
    /// starting a new chain (so a stream shared by busy publishers costs a
    /// round trip per refusal, never an event).
    async fn batch(
        &self,
        batch: &[Arc<Event>],
        after: i64,
        chain: &mut Option<String>,
    ) -> (i64, Result<(), async_nats::Error>) {
        // A reconnect that came before this batch was sent lost none of it:
        // its notice is taken here, so that only a later one stops the wait.
        let _ = self.reconnected.notified().now_or_never();
        let mut last = chain.take();
        let mut acks = Vec::with_capacity(batch.len());
        let mut failed = None;
        for (i, event) in batch.iter().enumerate() {
            if !self.filter.matches(&event.kind) {
                continue;
            }
            let id = format!("{}:{}", self.origin, event.id);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            if let Some(last) = &last {
                headers.insert(
                    async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
                    last.as_str(),
                );
            }
            let subject = format!("prism.events.{}", event.kind);
            match self
                .js
                .publish_with_headers(subject, headers, event.json.clone().into())
                .await
            {
                Ok(ack) => acks.push((i, ack)),
                Err(e) => {
                    failed = Some((i, e.into()));
                    break;
                }
            }
            last = Some(id);
        }
        // Everything before the first event not acknowledged is done, the
        // events the filter passed over included.
        let done_before = |i: usize| i.checked_sub(1).map_or(after, |i| batch[i].id);
        for (i, ack) in acks {
            let acked = tokio::select! {
                acked = tokio::time::timeout(ACK_TIMEOUT, ack) => acked,
                // The acknowledgements of what went out on the broken
                // connection will never come: the rest of the batch is sent
                // again on the new one (what did arrive is dropped there as
                // a duplicate) rather than waited for until the timeout.
                () = self.reconnected.notified() => return (done_before(i), Ok(())),
            };
            let error: async_nats::Error = match acked {
                Ok(Ok(_)) => continue,
                Ok(Err(e))
                    if e.kind() == jetstream::context::PublishErrorKind::WrongLastMessageId =>
                {
                    return (done_before(i), Ok(()));
                }
                Ok(Err(e)) => e.into(),
                Err(_) => "JetStream did not acknowledge in time".into(),
            };
            return (done_before(i), Err(error));
        }
        if let Some((i, e)) = failed {
            return (done_before(i), Err(e));
        }
        *chain = last;
        (batch.last().map_or(after, |e| e.id), Ok(()))
    }
}

#[derive(Deserialize)]
struct WireEvent {
    id: i64,
    payload: WireOrder,
}

#[derive(Deserialize)]
struct WireOrder {
    user_id: i64,
    total: f64,
}

/// The most `order.created` applied in one transaction.
const APPLY_BATCH: usize = 512;

/// Applies `order.created` events to the users service's statistics until
/// `stop`: from JetStream when `nats_url` is set, else from `orders_url`'s feed.
pub async fn run_order_consumer(
    domain: Domain,
    keys: TokenKeys,
    nats_url: Option<String>,
    orders_url: String,
    status: Arc<SessionState>,
    stop: CancellationToken,
) {
    let mut reconnect = Reconnect::new("order consumer");
    while !stop.is_cancelled() {
        // Instances sharing a PostgreSQL database share its statistics. Each
        // could apply every order (positions make the second one change
        // nothing), but all would then do every write; one does, the others
        // stand by to take over.
        let lock = match domain.db().postgres() {
            None => None,
            Some(pool) => match advisory_lock(pool, CONSUMER_LOCK_KEY).await {
                Ok(Some(conn)) => Some(conn),
                Ok(None) => {
                    status.set(RelayState::Standby);
                    if !pause(&stop, STANDBY_RETRY).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    status.set(RelayState::Reconnecting);
                    if !pause(&stop, reconnect.failed(&e, Instant::now())).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let session = async {
            match &nats_url {
                Some(url) => consume_jetstream(&domain, url, &status, &stop, &mut reconnect).await,
                None => consume_feed(&domain, &keys, &orders_url, &status, &stop, &mut reconnect)
                    .await
                    .map(|()| Consumed::Stopped),
            }
        };
        // A session ended between two transactions, or in one (rolled back),
        // leaves the statistics and their positions consistent.
        let result = match lock {
            Some(mut conn) => tokio::select! {
                r = session => r,
                e = lock_lost(&mut conn) => Err(e),
            },
            None => session.await,
        };
        match result {
            Ok(Consumed::Stopped) => return,
            // The broker answers again; nothing to wait for.
            Ok(Consumed::Reconnected) => {
                tracing::debug!("NATS connection made again; the order consumer starts over");
            }
            Err(e) => {
                status.set(RelayState::Reconnecting);
                if !pause(&stop, reconnect.failed(&e, Instant::now())).await {
                    return;
                }
            }
        }
    }
}

/// Returns once the lock `conn` holds may be gone: its connection failed,
/// and another instance may have taken the lock over.
async fn lock_lost(conn: &mut sqlx::PgConnection) -> async_nats::Error {
    loop {
        tokio::time::sleep(STANDBY_RETRY).await;
        if let Err(e) = sqlx::query("SELECT 1").execute(&mut *conn).await {
            return format!("lost the order consumer's lock: {e}").into();
        }
    }
}

const CONSUMER: &str = "users-service";

/// The stream position, in the users service's `event_offsets`, of one
/// publisher's events from JetStream.
fn jetstream_position(source: &str) -> String {
    format!("{CONSUMER}:jetstream:{source}")
}

/// Where a message stands among the users service's JetStream positions: a
/// prism relay's message id `<origin>:<event id>` is that event in its
/// origin's log, which the relay publishes in order; any other message is
/// known by its place in the stream.
fn message_position(msg_id: Option<&str>, stream_sequence: u64) -> (String, i64) {
    msg_id.and_then(relayed_event).unwrap_or_else(|| {
        let seq = i64::try_from(stream_sequence).unwrap_or(i64::MAX);
        (jetstream_position("stream"), seq)
    })
}

fn relayed_event(msg_id: &str) -> Option<(String, i64)> {
    let (origin, id) = msg_id.split_once(':')?;
    let origin: i64 = origin.parse().ok()?;
    let id: i64 = id.parse().ok()?;
    (origin > 0 && id > 0).then(|| (jetstream_position(&origin.to_string()), id))
}

/// The stream position a key recorded by a build before ordered delivery
/// stands for: a message id, or `seq:<stream sequence>` for a message
/// without one.
fn legacy_key_position(key: &str) -> Option<(String, i64)> {
    match key.strip_prefix("seq:") {
        Some(seq) => Some((jetstream_position("stream"), seq.parse().ok()?)),
        None => relayed_event(key),
    }
}

/// Where the users service starts again in the stream: the sequence of the
/// last message it was handed.
fn jetstream_resume() -> String {
    format!("{CONSUMER}:jetstream")
}

/// How a consumer session ended, other than by an error.
enum Consumed {
    Stopped,
    /// The client connected again after a break, which the broker's side of
    /// the session may not have outlived.
    Reconnected,
}

async fn consume_jetstream(
    domain: &Domain,
    url: &str,
    status: &SessionState,
    stop: &CancellationToken,
    reconnect: &mut Reconnect,
) -> Result<Consumed, async_nats::Error> {
    // The ordered consumer lives on the broker only as long as the broker
    // runs, and would notice one restarted only at its next heartbeat (15 s):
    // a new connection starts a new session at once.
    let reconnected = Arc::new(Notify::new());
    let js = jetstream_context(url, Some(reconnected.clone())).await?;
    let mut stream = js.get_stream(STREAM).await?;
    let last_in_stream = stream.info().await?.state.last_sequence;
    let resume = jetstream_resume();
    let mut after = u64::try_from(domain.offset(&resume).await?).unwrap_or(0);
    if after > last_in_stream {
        // A new stream: its sequences started again. What it holds is read
        // from the start; the publishers' positions skip what was applied.
        tracing::warn!(
            after,
            last_in_stream,
            "the JetStream stream is behind the stored position; reading it from the start"
        );
        after = 0;
        for position in [resume.clone(), jetstream_position("stream")] {
            domain.set_offset(&position, 0).await?;
        }
    }
    // A build before ordered delivery used a durable consumer and kept the
    // id of every message it applied, and may have applied some out of
    // order. It had acknowledged everything up to its ack floor and was sent
    // nothing past its last delivery; in between, messages are checked
    // against its ids, which then become positions. (Without its consumer,
    // the whole stream is in between.)
    let mut old_delivered = None;
    if let Ok(old) = stream.consumer_info(CONSUMER).await {
        after = after.max(old.ack_floor.stream_sequence);
        old_delivered = Some(old.delivered.stream_sequence);
        stream.delete_consumer(CONSUMER).await?;
    }
    let mut keyed_through = if domain.has_applied_keys(CONSUMER).await? {
        Some(old_delivered.unwrap_or(last_in_stream))
    } else {
        None
    };
    let deliver_policy = if after == 0 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        }
    };
    // In stream order and each once per session (it recreates itself past
    // the last message it delivered), with no acknowledgements: where to
    // start again is stored with the changes.
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: "prism.events.order.created".into(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?.ready_chunks(APPLY_BATCH);
    tracing::info!(
        after,
        "users service consuming order.created from JetStream"
    );
    reconnect.connected(Instant::now());
    status.set(RelayState::Connected);
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return Ok(Consumed::Stopped),
            _ = reconnected.notified() => return Ok(Consumed::Reconnected),
            b = messages.next() => b,
        };
        let Some(batch) = batch else {
            return Err("JetStream message stream ended".into());
        };
        let mut handed = Vec::with_capacity(batch.len());
        for msg in batch {
            let msg = msg?;
            let msg_id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned());
            let seq = msg.info()?.stream_sequence;
            match serde_json::from_slice::<WireEvent>(&msg.payload) {
                Ok(ev) => handed.push((msg_id, seq, ev.payload)),
                Err(e) => {
                    tracing::warn!(error = %e, ?msg_id, seq, "skipping an unreadable order.created");
                }
            }
            after = seq;
        }
        // Up to `keyed_through`, by the earlier build's ids; past it, every
        // message before has been handled, in order, and positions do.
        let keyed = keyed_through.map_or(0, |k| {
            handed.iter().take_while(|(_, seq, _)| *seq <= k).count()
        });
        let positions: Vec<_> = handed[keyed..]
            .iter()
            .map(|(msg_id, seq, _)| message_position(msg_id.as_deref(), *seq))
            .collect();
        let keys: Vec<_> = handed[..keyed]
            .iter()
            .map(|(msg_id, seq, _)| msg_id.clone().unwrap_or_else(|| format!("seq:{seq}")))
            .collect();
        let once = keys
            .iter()
            .map(|key| Applied::Key {
                consumer: CONSUMER,
                key,
            })
            .chain(
                positions
                    .iter()
                    .map(|(stream, id)| Applied::Position { stream, id: *id }),
            );
        let events: Vec<_> = once
            .zip(&handed)
            .map(|(once, (_, _, order))| OrderCreated {
                once,
                user_id: order.user_id,
                total: order.total,
            })
            .collect();
        let through = i64::try_from(after).unwrap_or(i64::MAX);
        if keyed < handed.len() && keyed_through.take().is_some() {
            // Three steps, each one transaction, each leaving a state a
            // restart goes on from correctly.
            if let Some((_, last_keyed, _)) = keyed.checked_sub(1).map(|i| &handed[i]) {
                let last_keyed = i64::try_from(*last_keyed).unwrap_or(i64::MAX);
                domain
                    .apply_orders_created(&events[..keyed], Some((&resume, last_keyed)))
                    .await?;
            }
            domain
                .keys_to_positions(CONSUMER, legacy_key_position)
                .await?;
            domain
                .apply_orders_created(&events[keyed..], Some((&resume, through)))
                .await?;
        } else {
            domain
                .apply_orders_created(&events, Some((&resume, through)))
                .await?;
        }
    }
}

async fn consume_feed(
    domain: &Domain,
    keys: &TokenKeys,
    orders_url: &str,
    status: &SessionState,
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
        status.set(RelayState::Connected);
        // A task reads the body while the events before are being applied:
        // hyper reads a response's next chunk only once the last was taken,
        // so reading only between commits would get one event per commit.
        // Whatever has piled up is then applied together.
        let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel(APPLY_BATCH);
        let _reader = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                if chunks_tx.send(chunk).await.is_err() {
                    break;
                }
            }
        }));
        // Bytes until a whole event has arrived: a chunk may end inside a
        // character, which decoding each chunk on its own would mangle.
        let mut buf: Vec<u8> = Vec::new();
        let mut chunks = Vec::with_capacity(APPLY_BATCH);
        'feed: loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = chunks_rx.recv_many(&mut chunks, APPLY_BATCH) => n,
            };
            if received == 0 {
                return Err("the orders feed ended".into());
            }
            for chunk in chunks.drain(..) {
                buf.extend_from_slice(&chunk?);
            }
            let mut arrived = Vec::new();
            while let Some(block) = take_block(&mut buf) {
                if block.starts_with(b"event: reset\n") {
                    apply_feed_events(domain, &position, &arrived).await?;
                    arrived.clear();
                    let restored = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        r = restore_order_stats(domain, keys, &client, orders_url, &position, after) => r?,
                    };
                    if restored {
                        break 'feed;
                    }
                    continue;
                }
                if let Some(ev) =
                    sse_data(&block).and_then(|data| serde_json::from_str::<WireEvent>(&data).ok())
                {
                    arrived.push(ev);
                }
            }
            apply_feed_events(domain, &position, &arrived).await?;
        }
    }
}

/// Applies events from the orders feed, in transactions of at most
/// [`APPLY_BATCH`]; `position` moves with each.
async fn apply_feed_events(
    domain: &Domain,
    position: &str,
    events: &[WireEvent],
) -> Result<(), async_nats::Error> {
    for batch in events.chunks(APPLY_BATCH) {
        let batch: Vec<_> = batch
            .iter()
            .map(|ev| OrderCreated {
                once: Applied::Position {
                    stream: position,
                    id: ev.id,
                },
                user_id: ev.payload.user_id,
                total: ev.payload.total,
            })
            .collect();
        domain.apply_orders_created(&batch, None).await?;
    }
    Ok(())
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

    #[test]
    fn a_message_is_placed_by_its_relayed_event_or_else_by_its_stream_sequence() {
        let at = |origin: &str, id| (jetstream_position(origin), id);
        assert_eq!(message_position(Some("42:7"), 99), at("42", 7));
        // Not a prism relay's id, or none: the stream's order.
        for other in [
            None,
            Some("order-7"),
            Some("42:"),
            Some(":7"),
            Some("42:0"),
            Some("a:7"),
        ] {
            assert_eq!(message_position(other, 99), at("stream", 99), "{other:?}");
        }
        assert_eq!(legacy_key_position("42:7"), Some(at("42", 7)));
        assert_eq!(legacy_key_position("seq:99"), Some(at("stream", 99)));
        assert_eq!(legacy_key_position("order-7"), None);
    }
}
