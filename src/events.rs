//! The event log: the outbox that every real-time surface reads.
//!
//! Every domain write writes its event with the change, through
//! [`EventLog::insert`] (a new row), [`EventLog::change`] (any other change)
//! or [`EventLog::record`] (the event is the change: a broadcast), so an event
//! exists exactly when the change it describes does. On SQLite that is one
//! transaction of the single writer; on PostgreSQL one statement that commits
//! by itself, a single round trip.
//! One *pump* task per process reads new rows in id order (one query per batch,
//! never per subscriber) and fans them out through a bounded in-memory
//! broadcast. [`EventLog::subscribe`] replays stored events after a given id and
//! then switches to the live feed, dropping what it already replayed, so a
//! subscriber sees every event once, in id order, with no gap at the switch.
//!
//! # Ordering on PostgreSQL
//! A sequence hands out ids at insert time, but transactions commit in any
//! order: id 11 can become visible before id 10, and a reader that remembers
//! only the highest id it has seen would skip 10 forever (the outbox trap).
//! prism does not make writers take turns to avoid it, which would put every
//! write's commit, fsync included, behind the one before. Instead:
//! - an event's insert takes a *shared* transaction-scoped advisory lock
//!   before it draws the id and holds it to commit, so writers never wait on
//!   each other, and `pg_locks` names every transaction that holds an id not
//!   yet final;
//! - the pump delivers an event only when every id below it is final. A missing
//!   id is usually a transaction a moment from committing, and its commit wakes
//!   the pump. If it is still missing after `GAP_WAIT`, the pump *settles*:
//!   it reads the highest committed id, then which transactions hold the lock,
//!   and waits for those to end. Every id below that highest one was drawn
//!   before it, so by a transaction that has committed, rolled back, or was
//!   among those waited for: whatever is still missing below it then was
//!   rolled back and is skipped for good. Settling only watches; no writer
//!   ever waits for it;
//! - every other reader (replays, the NATS relay) reads only up to the pump's
//!   head, so none of them can pass an id that is still to come.
//!
//! SQLite has a single writer, so its ids become visible in order by
//! construction.
//!
//! # Wake-ups
//! A local commit wakes the pump directly ([`EventLog::committed`]). On
//! PostgreSQL it also wakes this process's *announcer*, which sends
//! `NOTIFY prism_events` naming the highest committed id, so other processes
//! sharing the database wake their pumps too. The notification is sent after
//! the commit, in a statement of its own, not inside the writer's
//! transaction: PostgreSQL makes every transaction that notifies take one
//! database-wide lock from its commit until its commit record is on disk, so
//! notifying writers would take turns through their fsyncs instead of sharing
//! one (pgbench, two inserts per transaction, 32 clients: 10.7k transactions/s
//! without the notification, 3.9–5.0k with it). Commits that come while a
//! notification is on its way share the next one. The announcer notifies only
//! while another process listens: each pump's listening connection is named
//! in `pg_stat_activity` (`LISTENER_PREFIX`), the announcer looks for others'
//! at most once a second, and a pump that starts listening says so on the
//! channel (`HELLO`) before it first reads the log, so the others look again
//! and announce at once (a commit they did not announce because they did not
//! know of it yet is announced then). A process alone on its database sends
//! no notifications at all. A pump takes every
//! notification that has arrived at once and reads the log only if one names
//! an id past what it has read: its own commits, already read on the local
//! wake, and a burst of others' cost one read, not one each. A poll timer is
//! the safety net for a lost connection or notification, or a process that
//! stopped between a commit and its notification.
//!
//! # Slow subscribers
//! The broadcast holds `event_buffer` events. A subscriber that falls further
//! behind gets [`Item::CutOff`] with the last id it saw and its stream ends; the
//! writer and the other subscribers never wait for it. It resumes with
//! `subscribe(Some(last_id))`, served from the database.

use std::{
    collections::VecDeque,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::{FutureExt, Stream};
use parking_lot::RwLock;
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::{
    Arguments, Connection, FromRow,
    error::BoxDynError,
    postgres::{PgArguments, PgConnectOptions, PgConnection, PgListener, PgPoolOptions},
};
use tokio::{
    sync::{Notify, broadcast},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    db::{Db, Pools, Tx, WriteArg, writer::WriteTx},
    error::{Error, Result},
    fetch_optional, tx_execute, tx_optional,
};

/// The PostgreSQL NOTIFY channel that announces new events.
const CHANNEL: &str = "prism_events";
/// Key of the advisory lock that writers share while they hold an id that is
/// not final yet ("prism" in ASCII).
const ORDER_LOCK_KEY: i64 = 0x70_72_69_73_6d;
/// How long the pump waits for a missing id's transaction to commit before it
/// settles the gap (module docs). Commits take a few milliseconds; a gap that
/// outlives this is most likely a rollback, which holds back delivery by this
/// much.
const GAP_WAIT: Duration = Duration::from_millis(50);
/// How long settling waits for the transactions holding ids to end. They
/// hold them only from their event to their commit; one that does not let go
/// must not hold back the log unnoticed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest pause between two looks at whether those transactions ended.
/// PostgreSQL has no way to wait for another session's transaction by name,
/// and they take milliseconds, so settling looks again after 1 ms, then twice
/// as long each time up to this.
const SETTLE_POLL_MAX: Duration = Duration::from_millis(16);
/// The announcer's connection as `pg_stat_activity` shows it.
pub const ANNOUNCER_NAME: &str = "prism event announcer";
/// Every pump's listening connection's name starts with this, and goes on
/// with an id of its process's own.
pub const LISTENER_PREFIX: &str = "prism events ";
/// What a pump that starts listening notifies, so that announcers look for
/// listeners again.
const HELLO: &str = "hello";
/// How long the announcer goes by what it last found about other listeners.
const LISTENERS_RECHECK: Duration = Duration::from_secs(1);
/// How long the announcer waits after a failed notification before it
/// tries again (other processes poll meanwhile).
const ANNOUNCE_RETRY: Duration = Duration::from_secs(1);
/// How long one notification, connecting included, may take.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows per replay or pump query.
const PAGE: i64 = 500;

/// One committed domain event, shared by every subscriber (one allocation per
/// event, not per subscriber).
#[derive(Debug)]
pub struct Event {
    /// Position in the log; monotonic per database.
    pub id: i64,
    /// `user.created`, `post.created`, `message.sent`, `order.created`, `broadcast`, …
    pub kind: String,
    /// The event's data as stored (JSON).
    pub payload: Box<RawValue>,
    pub created_at: DateTime<Utc>,
    /// `{"id","type","payload","created_at"}`, serialised once for every surface.
    pub json: String,
    /// Wire forms rendered once and shared by every subscriber of a surface
    /// (an SSE frame per stream kind), so fan-out to thousands of clients
    /// formats each event once, not once per client.
    frames: [std::sync::OnceLock<bytes::Bytes>; FRAME_KINDS],
    /// The payload decoded by the first subscriber that wanted it typed
    /// (an `Option<T>`: `None` if it did not decode), shared with the rest.
    decoded: OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

/// How many distinct wire forms an event can be cached in.
pub const FRAME_KINDS: usize = 4;

#[derive(FromRow)]
struct EventRow {
    id: i64,
    event_type: String,
    payload: String,
    created_at: DateTime<Utc>,
}

impl crate::db::inline::FromSqlite for EventRow {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(EventRow {
            id: row.get("id")?,
            event_type: row.get("event_type")?,
            payload: row.get("payload")?,
            created_at: crate::db::inline::timestamp(row, "created_at")?,
        })
    }
}

impl Event {
    /// An event as it would be read from the log.
    pub fn new(id: i64, kind: &str, payload: &str, created_at: DateTime<Utc>) -> Result<Event> {
        Event::from_row(EventRow {
            id,
            event_type: kind.to_owned(),
            payload: payload.to_owned(),
            created_at,
        })
    }

    fn from_row(row: EventRow) -> Result<Event> {
        let payload = RawValue::from_string(row.payload).map_err(Error::internal)?;
        #[derive(Serialize)]
        struct Wire<'a> {
            id: i64,
            #[serde(rename = "type")]
            kind: &'a str,
            payload: &'a RawValue,
            created_at: String,
        }
        let json = serde_json::to_string(&Wire {
            id: row.id,
            kind: &row.event_type,
            payload: &payload,
            created_at: row.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        })
        .map_err(Error::internal)?;
        Ok(Event {
            id: row.id,
            kind: row.event_type,
            payload,
            created_at: row.created_at,
            json,
            frames: Default::default(),
            decoded: OnceLock::new(),
        })
    }

    /// The wire form number `slot` (< [`FRAME_KINDS`]) of this event, rendered
    /// by the first caller and shared after that.
    pub fn frame(&self, slot: usize, render: impl FnOnce(&Event) -> bytes::Bytes) -> bytes::Bytes {
        self.frames[slot].get_or_init(|| render(self)).clone()
    }

    /// The payload parsed into `T` (for adapters that need typed fields).
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(self.payload.get()).ok()
    }

    /// The payload as a `T`, parsed once for every subscriber of a typed
    /// surface (GraphQL subscriptions, gRPC streams) rather than once each.
    pub fn payload_shared<T>(&self) -> Option<T>
    where
        T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let decoded = self
            .decoded
            .get_or_init(|| Arc::new(self.payload_as::<T>()));
        match decoded.downcast_ref::<Option<T>>() {
            Some(t) => t.clone(),
            // Another surface decoded it as another type first.
            None => self.payload_as(),
        }
    }
}

/// Which event types a subscriber wants: exact names, or prefixes written `order.*`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    patterns: Arc<[Pattern]>,
}

#[derive(Debug)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses a comma-separated list (`order.*,user.created`); empty or `*` means all.
    pub fn parse(spec: &str) -> Self {
        let mut patterns = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "*" {
                return Self::all();
            }
            match part.strip_suffix('*') {
                Some(prefix) => patterns.push(Pattern::Prefix(prefix.to_owned())),
                None => patterns.push(Pattern::Exact(part.to_owned())),
            }
        }
        EventFilter {
            patterns: patterns.into(),
        }
    }

    /// The filter as an SQL condition on `event_type` whose values are bound
    /// from `$first` on, with those values; `None` when it takes every event,
    /// or names so many patterns that a statement of its own is not worth it.
    fn sql(&self, first: usize) -> Option<(String, Vec<&str>)> {
        const MOST: usize = 16;
        if self.patterns.is_empty() || self.patterns.len() > MOST {
            return None;
        }
        let mut terms = Vec::with_capacity(self.patterns.len());
        let mut values = Vec::with_capacity(self.patterns.len());
        for (i, p) in self.patterns.iter().enumerate() {
            let n = first + i;
            match p {
                Pattern::Exact(e) => {
                    terms.push(format!("event_type = ${n}"));
                    values.push(e.as_str());
                }
                Pattern::Prefix(pre) => {
                    let len = pre.chars().count();
                    terms.push(format!("substr(event_type, 1, {len}) = ${n}"));
                    values.push(pre.as_str());
                }
            }
        }
        Some((terms.join(" OR "), values))
    }

    pub fn matches(&self, kind: &str) -> bool {
        self.patterns.is_empty()
            || self.patterns.iter().any(|p| match p {
                Pattern::Exact(e) => e == kind,
                Pattern::Prefix(pre) => kind.starts_with(pre.as_str()),
            })
    }
}

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<Event>),
    /// The requested resume point is older than the retained history; the events
    /// that follow start at the oldest one still kept.
    Reset,
    /// The subscriber fell behind (or the database failed) and was cut off; the
    /// stream ends. Resume from `last_id`.
    CutOff {
        last_id: Option<i64>,
    },
}

type Hook = Box<dyn Fn(&Event) + Send + Sync>;

/// The per-process side of the log: pump, broadcast and subscriptions. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    live: broadcast::Sender<Arc<Event>>,
    /// Wakes the pump after a local commit.
    wake: Notify,
    /// Wakes the announcer after a local commit (PostgreSQL; module docs).
    announce: Notify,
    /// This process's listening connection's name (module docs).
    listener_name: String,
    /// Another process started listening since the announcer last looked.
    hello: AtomicBool,
    notifications_sent: AtomicU64,
    /// The highest id the pump has delivered; every id up to it is final.
    head: AtomicI64,
    /// On PostgreSQL, the highest id known final by the last settling: a gap
    /// below it is a rollback, not a transaction still to commit.
    settled: AtomicI64,
    /// Run by the pump for each event before it is broadcast (cache invalidation).
    hooks: RwLock<Vec<Hook>>,
    poll: Duration,
    retention: Duration,
    /// A consumer of this log whose unread events retention must keep (the
    /// NATS relay: an event it has not published yet is not lost to age).
    kept_for: OnceLock<&'static str>,
    /// Whether the last retention run was held back by `kept_for`.
    held: AtomicBool,
    delivered: AtomicU64,
    gaps_settled: AtomicU64,
    /// The pump is waiting for transactions holding ids to end.
    settling: AtomicBool,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("head", &self.head())
            .finish_non_exhaustive()
    }
}

/// Appends an event to the log inside the caller's write transaction, for a
/// change that takes more than the one statement of [`EventLog::insert`] or
/// [`EventLog::change`]. The event commits (or rolls back) with the change
/// it describes. Make it the transaction's last statement: on PostgreSQL,
/// from here to the commit the writer holds an id that holds back delivery of
/// every later event (module docs), so nothing slow or lock-taking should come
/// after it. Call [`EventLog::committed`] after the commit.
pub async fn append(tx: &mut Tx, kind: &str, payload: &impl Serialize) -> Result<i64> {
    let payload = serde_json::to_string(payload).map_err(Error::internal)?;
    match tx {
        Tx::Sqlite(t) => append_sqlite(t, kind, payload).await,
        Tx::Postgres(t) => append_postgres(&mut **t, kind, payload).await,
    }
}

/// [`append`] on PostgreSQL, in a transaction or as a statement of its own.
async fn append_postgres<'e>(
    on: impl sqlx::PgExecutor<'e>,
    kind: &str,
    payload: String,
) -> Result<i64> {
    Ok(sqlx::query_scalar(APPEND)
        .bind(kind)
        .bind(payload)
        .bind(Utc::now())
        .bind(ORDER_LOCK_KEY)
        .fetch_one(on)
        .await?)
}

/// [`append`] on SQLite, for a payload already serialised.
async fn append_sqlite(t: &mut WriteTx, kind: &str, payload: String) -> Result<i64> {
    let (id,): (i64,) = t
        .one(
            "INSERT INTO events (event_type, payload, created_at) VALUES ($1, $2, $3) \
             RETURNING id",
            crate::sqlite_args!(kind, payload, Utc::now()),
        )
        .await?;
    Ok(id)
}

/// [`append`]'s statement on PostgreSQL. See the module docs:
/// `held` runs before the insert draws its id (`nextval` is in the scan
/// above it), so the lock is held first.
const APPEND: &str = "WITH held AS (SELECT pg_advisory_xact_lock_shared($4)) \
                      INSERT INTO events (event_type, payload, created_at) \
                      SELECT $1, $2, $3 FROM held RETURNING id";

/// A row that [`EventLog::insert`] writes, with its event's payload.
pub trait Inserted: Serialize {
    fn set_id(&mut self, id: i64);

    /// The event's payload: JSON whose first member is the row's id, as a
    /// struct whose first field is its id serialises (`{"id":…`).
    fn payload(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }
}

/// Splits a payload whose first member is an id of 0 (`{"id":0,…`) around
/// that 0: what comes before the id and what after.
fn around_id(json: &str) -> Option<(&str, &str)> {
    let key = json.strip_prefix("{\"")?.find('"')?;
    let (head, tail) = json.split_at(key + 4);
    let rest = tail.strip_prefix('0')?;
    (head.ends_with("\":") && rest.starts_with([',', '}'])).then_some((head, rest))
}

/// `args`, then `kind`, then what `rest` adds, as one statement's arguments
/// on PostgreSQL.
fn pg_arguments<'a>(
    args: &[&(dyn WriteArg<'a> + 'a)],
    kind: &str,
    rest: impl FnOnce(&mut PgArguments) -> std::result::Result<(), BoxDynError>,
) -> Result<PgArguments> {
    let mut bound = PgArguments::default();
    args.iter()
        .try_for_each(|arg| arg.add_to(&mut bound))
        .and_then(|()| {
            bound.add(kind)?;
            rest(&mut bound)
        })
        .map_err(|e| Error::internal(format!("{kind}: {e}")))?;
    Ok(bound)
}

fn sqlite_arguments<'a>(args: &[&(dyn WriteArg<'a> + 'a)]) -> Vec<rusqlite::types::Value> {
    args.iter().map(|a| a.sqlite()).collect()
}

impl EventLog {
    /// Creates the log handle; nothing runs until [`EventLog::run_pump`] is spawned.
    pub async fn open(db: Db, buffer: usize, poll: Duration, retention: Duration) -> Result<Self> {
        // Ids up to here are history, so they must all be final.
        let head = settle(&db).await?;
        let (live, _) = broadcast::channel(buffer);
        Ok(EventLog {
            inner: Arc::new(Inner {
                db,
                live,
                wake: Notify::new(),
                announce: Notify::new(),
                listener_name: format!("{LISTENER_PREFIX}{}", uuid::Uuid::new_v4().simple()),
                hello: AtomicBool::new(false),
                notifications_sent: AtomicU64::new(0),
                head: AtomicI64::new(head),
                settled: AtomicI64::new(head),
                hooks: RwLock::new(Vec::new()),
                poll,
                retention,
                kept_for: OnceLock::new(),
                held: AtomicBool::new(false),
                delivered: AtomicU64::new(0),
                gaps_settled: AtomicU64::new(0),
                settling: AtomicBool::new(false),
            }),
        })
    }

    /// Registers a function the pump calls for every event, before subscribers
    /// see it. Must be quick: it runs on the pump.
    pub fn on_event(&self, hook: impl Fn(&Event) + Send + Sync + 'static) {
        self.inner.hooks.write().push(Box::new(hook));
    }

    /// Makes retention keep every event after `consumer`'s stored position
    /// (`event_offsets`), however old: that consumer still has to read it.
    pub fn keep_unread_by(&self, consumer: &'static str) {
        let _ = self.inner.kept_for.set(consumer);
    }

    /// Writes an event that is a change of its own (a broadcast) and gives
    /// its id. On PostgreSQL it is one statement, committed by itself: one
    /// round trip instead of three.
    pub async fn record(&self, kind: &str, payload: &impl Serialize) -> Result<i64> {
        let payload = serde_json::to_string(payload).map_err(Error::internal)?;
        let id = match &self.inner.db.pools {
            Pools::Postgres { pool, .. } => append_postgres(pool, kind, payload).await?,
            Pools::Sqlite { write, .. } => {
                let mut t = write.begin().await?;
                let id = append_sqlite(&mut t, kind, payload).await?;
                t.commit().await?;
                id
            }
        };
        self.committed();
        Ok(id)
    }

    /// Inserts `row` with `insert` (`INSERT … VALUES (…)`, no `RETURNING`,
    /// its arguments `args` in order) and, in the same transaction, its
    /// event `kind` with [`Inserted::payload`]; gives `row` with the id the
    /// insert drew. `on_error` turns the statement's failure (a foreign key
    /// that points nowhere, say) into the caller's error.
    ///
    /// On PostgreSQL both inserts are one statement, committed by itself:
    /// one round trip where a transaction takes four (`BEGIN`, the row, the
    /// event, `COMMIT`), each a wait for the server and work for both ends.
    /// The event's payload is then put together by the server: the payload
    /// serialised here with id 0, the drawn id in its place.
    pub async fn insert<'a, T: Inserted>(
        &self,
        insert: &str,
        args: &[&(dyn WriteArg<'a> + 'a)],
        kind: &str,
        mut row: T,
        on_error: impl FnOnce(sqlx::Error) -> Error,
    ) -> Result<T> {
        match &self.inner.db.pools {
            Pools::Postgres { pool, .. } => {
                row.set_id(0);
                let json = row.payload().map_err(Error::internal)?;
                let (head, rest) = around_id(&json).ok_or_else(|| {
                    Error::internal(format!("{kind}: the payload does not begin with its id"))
                })?;
                let n = args.len();
                // The main query reads only `inserted`, so the row is
                // written before `event` runs and takes the shared lock
                // (module docs).
                let sql = format!(
                    "WITH inserted AS ({insert} RETURNING id), \
                     held AS (SELECT pg_advisory_xact_lock_shared(${lock})), \
                     event AS (INSERT INTO events (event_type, payload, created_at) \
                     SELECT ${kind_at}, ${head_at} || inserted.id || ${rest_at}, ${now_at} \
                     FROM inserted, held) \
                     SELECT id FROM inserted",
                    kind_at = n + 1,
                    head_at = n + 2,
                    rest_at = n + 3,
                    now_at = n + 4,
                    lock = n + 5,
                );
                let bound = pg_arguments(args, kind, |a| {
                    a.add(head)?;
                    a.add(rest)?;
                    a.add(Utc::now())?;
                    a.add(ORDER_LOCK_KEY)
                })?;
                let id: i64 = sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), bound)
                    .fetch_one(pool)
                    .await
                    .map_err(on_error)?;
                row.set_id(id);
            }
            Pools::Sqlite { write, .. } => {
                let mut t = write.begin().await?;
                let (id,): (i64,) = t
                    .one(&format!("{insert} RETURNING id"), sqlite_arguments(args))
                    .await
                    .map_err(on_error)?;
                row.set_id(id);
                append_sqlite(&mut t, kind, row.payload().map_err(Error::internal)?).await?;
                t.commit().await?;
            }
        }
        self.committed();
        Ok(row)
    }

    /// Runs `statement` (an `INSERT`, `UPDATE` or `DELETE` without
    /// `RETURNING`, its arguments `args` in order) and, if it changed any
    /// row, appends its event `kind` with `payload` in the same transaction;
    /// gives how many rows it changed. `on_error` as for [`EventLog::insert`].
    ///
    /// One statement on PostgreSQL, as [`EventLog::insert`], so the payload
    /// is whatever the caller knows before the write: a caller whose event
    /// carries columns it does not set reads them first and makes the
    /// statement's `WHERE` match only while they are what it read.
    pub async fn change<'a>(
        &self,
        statement: &str,
        args: &[&(dyn WriteArg<'a> + 'a)],
        kind: &str,
        payload: &impl Serialize,
        on_error: impl FnOnce(sqlx::Error) -> Error,
    ) -> Result<u64> {
        let payload = serde_json::to_string(payload).map_err(Error::internal)?;
        let changed = match &self.inner.db.pools {
            Pools::Postgres { pool, .. } => {
                let n = args.len();
                // As in `insert`: the rows are changed before the lock is
                // taken. No row changed, no event.
                let sql = format!(
                    "WITH changed AS ({statement} RETURNING 1), \
                     held AS (SELECT pg_advisory_xact_lock_shared(${lock})), \
                     event AS (INSERT INTO events (event_type, payload, created_at) \
                     SELECT ${kind_at}, ${payload_at}, ${now_at} FROM held \
                     WHERE EXISTS (SELECT FROM changed)) \
                     SELECT count(*) FROM changed",
                    kind_at = n + 1,
                    payload_at = n + 2,
                    now_at = n + 3,
                    lock = n + 4,
                );
                let bound = pg_arguments(args, kind, |a| {
                    a.add(payload.as_str())?;
                    a.add(Utc::now())?;
                    a.add(ORDER_LOCK_KEY)
                })?;
                let changed: i64 = sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), bound)
                    .fetch_one(pool)
                    .await
                    .map_err(on_error)?;
                u64::try_from(changed).map_err(Error::internal)?
            }
            Pools::Sqlite { write, .. } => {
                let mut t = write.begin().await?;
                let changed = t
                    .execute(statement, sqlite_arguments(args))
                    .await
                    .map_err(on_error)?;
                if changed > 0 {
                    append_sqlite(&mut t, kind, payload).await?;
                    t.commit().await?;
                }
                changed
            }
        };
        if changed > 0 {
            self.committed();
        }
        Ok(changed)
    }

    /// Tells the pump, and on PostgreSQL the other processes, that a
    /// transaction with events just committed.
    pub fn committed(&self) {
        self.inner.wake.notify_one();
        self.inner.announce.notify_one();
    }

    /// The highest event id this process has delivered to live subscribers.
    pub fn head(&self) -> i64 {
        self.inner.head.load(Ordering::Acquire)
    }

    /// Gaps in the ids the pump has settled (module docs) since start.
    pub fn gaps_settled(&self) -> u64 {
        self.inner.gaps_settled.load(Ordering::Relaxed)
    }

    /// Whether the pump is settling a gap, waiting for the transactions that
    /// hold ids to end (module docs).
    pub fn settling(&self) -> bool {
        self.inner.settling.load(Ordering::Acquire)
    }

    /// Live subscriptions in this process.
    pub fn subscriber_count(&self) -> usize {
        self.inner.live.receiver_count()
    }

    /// Notifications sent to wake other processes' pumps since start
    /// (module docs, "Wake-ups").
    pub fn notifications_sent(&self) -> u64 {
        self.inner.notifications_sent.load(Ordering::Relaxed)
    }

    /// Events the pump has delivered since start.
    pub fn delivered_count(&self) -> u64 {
        self.inner.delivered.load(Ordering::Relaxed)
    }

    /// Delivered events after `after`, in id order, at most `limit` of them.
    /// Only up to the pump's head: an event past it may still have an earlier
    /// one to come (module docs).
    pub async fn read_after(&self, after: i64, limit: i64) -> Result<Vec<Arc<Event>>> {
        self.read_range(after, self.head(), limit).await
    }

    /// Every stored event after `after`, in id order, at most `limit` of them,
    /// including ones that an earlier id still to commit may yet precede: for
    /// looking at the log, not for consuming it in order.
    pub async fn read_stored(&self, after: i64, limit: i64) -> Result<Vec<Arc<Event>>> {
        self.read_range(after, i64::MAX, limit).await
    }

    /// Stored events with `after < id <= upto`, in id order, at most `limit`.
    async fn read_range(&self, after: i64, upto: i64, limit: i64) -> Result<Vec<Arc<Event>>> {
        let sql = "SELECT id, event_type, payload, created_at FROM events \
                   WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3";
        let db = &self.inner.db;
        let rows: Vec<EventRow> = crate::fetch_all!(uncounted db, sql, after, upto, limit);
        rows.into_iter()
            .map(|r| Event::from_row(r).map(Arc::new))
            .collect()
    }

    /// Like [`EventLog::read_after`], but only events `filter` may match: the
    /// database skips the others, so a subscriber resuming a narrow stream
    /// far back does not read the whole log through this process.
    async fn read_matching(
        &self,
        after: i64,
        limit: i64,
        filter: &EventFilter,
    ) -> Result<Vec<Arc<Event>>> {
        let Some((condition, values)) = filter.sql(3) else {
            return self.read_after(after, limit).await;
        };
        let sql = format!(
            "SELECT id, event_type, payload, created_at FROM events \
             WHERE id > $1 AND id <= $2 AND ({condition}) ORDER BY id LIMIT ${}",
            values.len() + 3
        );
        let upto = self.head();
        let rows: Vec<EventRow> = match &self.inner.db.pools {
            Pools::Sqlite { inline, .. } => {
                use rusqlite::types::Value;
                let params: Vec<Value> = [Value::Integer(after), Value::Integer(upto)]
                    .into_iter()
                    .chain(values.iter().map(|v| Value::Text((*v).to_owned())))
                    .chain([Value::Integer(limit)])
                    .collect();
                inline.all_built(sql, params).await?
            }
            Pools::Postgres { read, .. } => {
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(after)
                    .bind(upto);
                for v in &values {
                    q = q.bind(*v);
                }
                q.bind(limit).fetch_all(&mut *read.acquire().await?).await?
            }
        };
        rows.into_iter()
            .map(|r| Event::from_row(r).map(Arc::new))
            .collect()
    }

    /// Subscribes to the log. With `after = None` the stream is live from now;
    /// with `Some(id)` it first replays every stored event after `id`, then goes
    /// live without a gap or a duplicate. Only events matching `filter` are
    /// yielded, but resuming positions count every event.
    pub fn subscribe(
        &self,
        after: Option<i64>,
        filter: EventFilter,
    ) -> impl Stream<Item = Item> + Send + 'static {
        // Subscribe to the live feed *before* replaying, so nothing committed
        // during the replay can fall between the two.
        let state = SubState {
            log: self.clone(),
            rx: self.inner.live.subscribe(),
            filter,
            last: after,
            buf: VecDeque::new(),
            phase: if after.is_some() {
                Phase::Start
            } else {
                Phase::Live
            },
        };
        futures::stream::unfold(state, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
    }

    /// The pump: reads new events in id order and broadcasts them, until `stop`.
    pub async fn run_pump(self, stop: CancellationToken) {
        let mut listener = match self.inner.db.postgres() {
            Some(pool) => connect_listener(pool, &self.inner.listener_name).await,
            None => None,
        };
        let mut failures = 0u32;
        // The first id found missing below later ones, and since when.
        let mut gap: Option<(i64, Instant)> = None;
        loop {
            match self.pump_once().await {
                Ok(Pass::More) => continue,
                Ok(Pass::Idle) => {
                    failures = 0;
                    gap = None;
                }
                Ok(Pass::Gap(missing)) => {
                    failures = 0;
                    match gap {
                        Some((id, since)) if id == missing => {
                            if since.elapsed() >= GAP_WAIT {
                                gap = None;
                                match self.settle().await {
                                    Ok(()) => {
                                        self.inner.gaps_settled.fetch_add(1, Ordering::Relaxed);
                                        continue;
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, missing, "event pump cannot settle a gap in the log; retrying")
                                    }
                                }
                            }
                        }
                        _ => gap = Some((missing, Instant::now())),
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "event pump cannot read the log; retrying");
                }
            }
            let settle_at = gap.map(|(_, since)| since + GAP_WAIT);
            let wait = async {
                let Some(l) = listener.as_mut() else {
                    return futures::future::pending::<()>().await;
                };
                loop {
                    match l.recv().await {
                        Ok(first) => {
                            let mut newest = self.notified_id(&first);
                            // Those already here: polled once each, never waited for.
                            while let Some(Ok(Some(n))) = l.try_recv().now_or_never() {
                                newest = newest.max(self.notified_id(&n));
                            }
                            if newest > self.head() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "event notifications lost; polling until they return");
                            return futures::future::pending::<()>().await;
                        }
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                _ = wait => {}
                _ = tokio::time::sleep_until(settle_at.unwrap_or_else(Instant::now)), if settle_at.is_some() => {}
                _ = tokio::time::sleep(self.inner.poll) => {
                    if listener.is_none() && let Some(pool) = self.inner.db.postgres() {
                        listener = connect_listener(pool, &self.inner.listener_name).await;
                    }
                }
            }
        }
        tracing::debug!("event pump stopped");
    }

    /// The event id a notification names (0 for [`HELLO`], which names none);
    /// a notification without one (a build that sent none) could name any.
    fn notified_id(&self, n: &sqlx::postgres::PgNotification) -> i64 {
        if n.payload() == HELLO {
            // This process may have committed after the new listener's pump
            // read the log and before this hello arrived, and not notified
            // then, going by what its announcer had found before: it
            // announces again now, to a listener it knows of.
            self.inner.hello.store(true, Ordering::Release);
            self.inner.announce.notify_one();
            return 0;
        }
        n.payload().parse().unwrap_or(i64::MAX)
    }

    /// On PostgreSQL, tells the other processes sharing the database that
    /// this one committed events (module docs, "Wake-ups"), until `stop`. On
    /// SQLite there is no other process to tell.
    pub async fn run_announcer(self, stop: CancellationToken) {
        let Some(pool) = self.inner.db.postgres() else {
            return;
        };
        let mut announcer = Announcer {
            // The notification is only a wake-up for events already on disk:
            // its own commit need not wait for a flush.
            options: (*pool.connect_options())
                .clone()
                .application_name(ANNOUNCER_NAME)
                .options([("synchronous_commit", "off")]),
            conn: None,
            others: false,
            checked: None,
        };
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.inner.announce.notified() => {}
            }
            match announcer.announce(&self.inner).await {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("notifying other processes of new events again");
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "cannot notify other processes of new events; they find them by polling until this recovers");
                    }
                    // Those commits are still to announce, but not by a
                    // reconnect at every commit while the database is away.
                    self.inner.announce.notify_one();
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(ANNOUNCE_RETRY) => {}
                    }
                }
            }
        }
        // Commits of requests that finished while the server stopped.
        if self.inner.announce.notified().now_or_never().is_some() {
            let _ = announcer.announce(&self.inner).await;
        }
        if let Some(c) = announcer.conn {
            let _ = tokio::time::timeout(ANNOUNCE_TIMEOUT, c.close()).await;
        }
        tracing::debug!("event announcer stopped");
    }

    /// Delivers everything already in the log (hooks run, no subscriber yet
    /// to receive it), so that events written while starting are history to
    /// the first subscribers rather than news.
    pub async fn catch_up(&self) -> Result<()> {
        self.settle().await?;
        while let Pass::More = self.pump_once().await? {}
        Ok(())
    }

    /// Marks every id up to the highest committed one final (module docs).
    async fn settle(&self) -> Result<()> {
        self.inner.settling.store(true, Ordering::Release);
        let settled = settle(&self.inner.db).await;
        self.inner.settling.store(false, Ordering::Release);
        self.inner.settled.fetch_max(settled?, Ordering::AcqRel);
        Ok(())
    }

    /// Reads one page and broadcasts it up to the first id that may still
    /// come.
    async fn pump_once(&self) -> Result<Pass> {
        let head = self.head();
        let mut events = self.read_stored(head, PAGE).await?;
        let full = events.len() as i64 == PAGE;
        if events.is_empty() {
            return Ok(Pass::Idle);
        }
        let mut pass = if full { Pass::More } else { Pass::Idle };
        if self.inner.db.postgres().is_some() {
            let settled = self.inner.settled.load(Ordering::Acquire);
            let mut before = head;
            if let Some(at) = events.iter().position(|e| {
                let next_in_order = e.id == before + 1 || e.id - 1 <= settled;
                before = e.id;
                !next_in_order
            }) {
                pass = Pass::Gap(if at == 0 { head } else { events[at - 1].id } + 1);
                events.truncate(at);
            }
        }
        let hooks = self.inner.hooks.read();
        for event in events {
            for hook in hooks.iter() {
                hook(&event);
            }
            self.inner.head.store(event.id, Ordering::Release);
            self.inner.delivered.fetch_add(1, Ordering::Relaxed);
            // No receivers is not an error: events are in the log for later.
            let _ = self.inner.live.send(event);
        }
        Ok(pass)
    }

    /// Deletes events older than the retention period, remembering the highest
    /// id removed so that a client resuming from before it is told (`Reset`).
    pub async fn enforce_retention(&self) -> Result<u64> {
        let cutoff = Utc::now()
            - chrono::Duration::from_std(self.inner.retention).unwrap_or(chrono::Duration::MAX);
        self.truncate_before(cutoff).await
    }

    async fn truncate_before(&self, cutoff: DateTime<Utc>) -> Result<u64> {
        let mut tx = self.inner.db.begin().await?;
        // A scan of the log: on SQLite, on a blocking thread.
        let upto: Option<(Option<i64>,)> = tx_optional!(
            blocking &mut tx,
            "SELECT MAX(id) FROM events WHERE created_at < $1",
            cutoff
        )?;
        let Some(mut upto) = upto.and_then(|(v,)| v) else {
            return Ok(0);
        };
        if let Some(consumer) = self.inner.kept_for.get() {
            let position: Option<(i64,)> = tx_optional!(
                &mut tx,
                "SELECT last_id FROM event_offsets WHERE consumer = $1",
                *consumer
            )?;
            let position = position.map_or(0, |(v,)| v);
            let held = position < upto;
            if held && !self.inner.held.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    consumer,
                    position,
                    "keeping events past their retention until {consumer} has read them"
                );
            } else if !held {
                self.inner.held.store(false, Ordering::Relaxed);
            }
            upto = upto.min(position);
            if upto <= 0 {
                return Ok(0);
            }
        }
        let removed = tx_execute!(blocking &mut tx, "DELETE FROM events WHERE id <= $1", upto)?;
        tx_execute!(
            &mut tx,
            "INSERT INTO prism_meta (key, value) VALUES ('events_truncated_through', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            upto
        )?;
        tx.commit().await?;
        Ok(removed)
    }

    /// Runs [`EventLog::enforce_retention`] every minute until `stop`.
    pub async fn run_retention(self, stop: CancellationToken) {
        // First run a minute after start: start-up stays quick, and tests that
        // call `enforce_retention` themselves are not raced by the worker.
        let every = Duration::from_secs(60);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.enforce_retention().await {
                        tracing::warn!(error = %e, "event retention failed");
                    }
                }
            }
        }
    }

    async fn truncated_through(&self) -> Result<i64> {
        let db = &self.inner.db;
        let v: Option<(i64,)> = fetch_optional!(
            uncounted db,
            "SELECT value FROM prism_meta WHERE key = 'events_truncated_through'"
        );
        Ok(v.map_or(0, |(v,)| v))
    }
}

/// The highest committed event id, with every id below it final: on
/// PostgreSQL, once every transaction that held an id below it has ended
/// (module docs).
async fn settle(db: &Db) -> Result<i64> {
    let Some(pool) = db.postgres() else {
        return max_id(db).await;
    };
    // The highest id first, then the holders: every id below it was drawn
    // before it, by a transaction that took the lock before that and so, if
    // it has not ended by the second statement, is among the holders. The
    // other way round, one could take the lock after the holders were read
    // and draw an id below the highest one read.
    let max: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM events")
        .fetch_one(pool)
        .await?;
    let mut holders: Vec<String> = sqlx::query_scalar(ID_HOLDERS)
        .bind(ORDER_LOCK_KEY)
        .bind(None::<Vec<String>>)
        .fetch_all(pool)
        .await?;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    while !holders.is_empty() {
        if Instant::now() >= deadline {
            return Err(Error::internal(format!(
                "{} transactions holding event ids did not end within {SETTLE_TIMEOUT:?}",
                holders.len()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(SETTLE_POLL_MAX);
        holders = sqlx::query_scalar(ID_HOLDERS)
            .bind(ORDER_LOCK_KEY)
            .bind(&holders)
            .fetch_all(pool)
            .await?;
    }
    Ok(max.unwrap_or(0))
}

/// The transactions in this database holding the shared lock `$1` (writers
/// with an id not final yet), of those named in `$2` when it is not null.
/// `pg_locks` shows a bigint advisory key as two halves, sub-id 1.
const ID_HOLDERS: &str = "SELECT virtualtransaction FROM pg_locks \
     WHERE locktype = 'advisory' AND mode = 'ShareLock' AND granted \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid \
     AND objsubid = 1 AND ($2::text[] IS NULL OR virtualtransaction = ANY($2))";

/// Waits for every transaction that has drawn an event id to end, and keeps
/// others from drawing one until `tx` ends: from then on `tx` sees every
/// event there will be up to the highest id, and each one's change with it.
/// SQLite's single writer, which `tx` holds, gives this already. Unlike
/// settling, this makes new writers wait: keep `tx` short and rare.
pub async fn hold_ids(tx: &mut Tx) -> Result<()> {
    if let Tx::Postgres(t) = tx {
        // Writers hold the lock from their event to their commit, which is
        // quick; one that does not let go must not stall the log (and new
        // writers, queued behind this request) for longer than this.
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut **t)
            .await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ORDER_LOCK_KEY)
            .execute(&mut **t)
            .await?;
    }
    Ok(())
}

/// The id of the last event the log holds or has held, as `tx` sees it:
/// retention may have deleted the newest ones too.
pub async fn last_issued(tx: &mut Tx) -> Result<i64> {
    let id: Option<(Option<i64>,)> = tx_optional!(
        tx,
        "SELECT MAX(id) FROM (SELECT MAX(id) AS id FROM events UNION ALL \
         SELECT value FROM prism_meta WHERE key = 'events_truncated_through') AS ids"
    )?;
    Ok(id.and_then(|(v,)| v).unwrap_or(0))
}

/// What one pass of the pump found.
enum Pass {
    /// A full page was delivered: there may be more right away.
    More,
    /// Everything committed was delivered.
    Idle,
    /// Delivery stopped before this id, missing below later ones.
    Gap(i64),
}

async fn max_id(db: &Db) -> Result<i64> {
    let v: Option<(Option<i64>,)> = fetch_optional!(uncounted db, "SELECT MAX(id) FROM events");
    Ok(v.and_then(|(v,)| v).unwrap_or(0))
}

/// The announcer's connection and what it last found about other listeners.
struct Announcer {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    /// Another process was listening when last looked.
    others: bool,
    checked: Option<Instant>,
}

impl Announcer {
    /// Notifies the highest committed event id if another process listens,
    /// within [`ANNOUNCE_TIMEOUT`], connecting first if need be. On failure
    /// the connection is dropped and the listeners are looked for again.
    async fn announce(&mut self, log: &Inner) -> anyhow::Result<()> {
        let sent = tokio::time::timeout(ANNOUNCE_TIMEOUT, async {
            let conn = match &mut self.conn {
                Some(c) => c,
                None => self
                    .conn
                    .insert(PgConnection::connect_with(&self.options).await?),
            };
            let hello = log.hello.swap(false, Ordering::AcqRel);
            if hello
                || self
                    .checked
                    .is_none_or(|at| at.elapsed() >= LISTENERS_RECHECK)
            {
                self.others = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                     WHERE datname = current_database() \
                     AND starts_with(application_name, $1) AND application_name <> $2)",
                )
                .bind(LISTENER_PREFIX)
                .bind(&log.listener_name)
                .fetch_one(&mut *conn)
                .await?;
                self.checked = Some(Instant::now());
            }
            if self.others {
                sqlx::query(
                    "SELECT pg_notify($1, (SELECT COALESCE(MAX(id), 0) FROM events)::text)",
                )
                .bind(CHANNEL)
                .execute(conn)
                .await?;
                log.notifications_sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, sqlx::Error>(())
        })
        .await;
        let failed = match sent {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => anyhow::Error::from(e),
            Err(_) => anyhow::anyhow!("no answer within {ANNOUNCE_TIMEOUT:?}"),
        };
        self.conn = None;
        self.checked = None;
        Err(failed)
    }
}

/// Listens for other processes' notifications on a connection of its own,
/// named `name` so that their announcers find it (module docs), and tells
/// them it is there.
async fn connect_listener(pool: &sqlx::PgPool, name: &str) -> Option<PgListener> {
    let options = (*pool.connect_options()).clone().application_name(name);
    // sqlx's listener takes its connections, reconnecting too, from a pool.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options);
    let listening = async {
        let mut listener = PgListener::connect_with(&own).await?;
        listener.listen(CHANNEL).await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(HELLO)
            .execute(&mut listener)
            .await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match listening.await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "cannot LISTEN for events; polling instead");
            None
        }
    }
}

enum Phase {
    /// Check the resume point against the retained history.
    Start,
    Replay,
    Live,
    Done,
}

struct SubState {
    log: EventLog,
    rx: broadcast::Receiver<Arc<Event>>,
    filter: EventFilter,
    /// The last id delivered or skipped; the resume point.
    last: Option<i64>,
    buf: VecDeque<Arc<Event>>,
    phase: Phase,
}

impl SubState {
    async fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(event) = self.buf.pop_front() {
                self.last = Some(event.id);
                if self.filter.matches(&event.kind) {
                    return Some(Item::Event(event));
                }
                continue;
            }
            // The database reads are boxed: kept inline they made every
            // subscription's state 2.5 KiB, though a subscription spends its
            // life waiting on `rx` (a tenth of that).
            match self.phase {
                Phase::Done => return None,
                Phase::Start => match Box::pin(self.start()).await {
                    Ok(reset) => {
                        if reset {
                            return Some(Item::Reset);
                        }
                    }
                    Err(e) => return Some(self.cut_off(&e)),
                },
                Phase::Replay => {
                    let after = self.last.unwrap_or(0);
                    match Box::pin(self.log.read_matching(after, PAGE, &self.filter)).await {
                        Ok(page) => {
                            if (page.len() as i64) < PAGE {
                                self.phase = Phase::Live;
                            }
                            self.buf.extend(page);
                        }
                        Err(e) => return Some(self.cut_off(&e)),
                    }
                }
                Phase::Live => match self.rx.recv().await {
                    Ok(event) => {
                        if self.last.is_some_and(|last| event.id <= last) {
                            continue; // already replayed
                        }
                        self.last = Some(event.id);
                        if self.filter.matches(&event.kind) {
                            return Some(Item::Event(event));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.phase = Phase::Done;
                        return Some(Item::CutOff { last_id: self.last });
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }

    /// Validates the resume point; `Ok(true)` when history was truncated past it.
    async fn start(&mut self) -> Result<bool> {
        let after = self.last.unwrap_or(0);
        let head = max_id(&self.log.inner.db).await?.max(self.log.head());
        if after > head || after < 0 {
            // Not an id this log ever issued: ignore it and go live from now.
            self.last = None;
            self.phase = Phase::Live;
            return Ok(false);
        }
        self.phase = Phase::Replay;
        let truncated = self.log.truncated_through().await?;
        if after < truncated {
            self.last = Some(truncated);
            return Ok(true);
        }
        Ok(false)
    }

    fn cut_off(&mut self, e: &Error) -> Item {
        tracing::warn!(error = %e, "subscription cut off by a database error");
        self.phase = Phase::Done;
        Item::CutOff { last_id: self.last }
    }
}

#[cfg(test)]
mod tests {
    use super::{Event, EventFilter, around_id};

    #[test]
    fn a_payload_splits_around_its_leading_id_only() {
        assert_eq!(
            around_id(r#"{"id":0,"title":"t"}"#),
            Some((r#"{"id":"#, r#","title":"t"}"#))
        );
        assert_eq!(
            around_id(r#"{"order_id":0}"#),
            Some((r#"{"order_id":"#, "}"))
        );
        for not in [
            r#"{"id":7,"x":0}"#,
            r#"{"id":00}"#,
            r#"{"id":0.5}"#,
            r#"{"x":1,"id":0}"#,
            r#"{"id":"0"}"#,
            "{}",
            "[0]",
        ] {
            assert_eq!(around_id(not), None, "{not}");
        }
    }

    #[test]
    fn a_payload_is_decoded_once_and_shared_by_type() {
        #[derive(serde::Deserialize, Clone, Debug, PartialEq)]
        struct A {
            x: i64,
        }
        #[derive(serde::Deserialize, Clone, Debug, PartialEq)]
        struct B {
            x: i64,
            y: Option<i64>,
        }
        #[derive(serde::Deserialize, Clone, Debug)]
        struct C {
            #[allow(dead_code)]
            z: i64,
        }
        let e = Event::new(1, "t", r#"{"x": 3}"#, chrono::Utc::now()).unwrap();
        assert_eq!(e.payload_shared::<A>(), Some(A { x: 3 }));
        let kept = e.decoded.get().unwrap();
        assert_eq!(kept.downcast_ref::<Option<A>>(), Some(&Some(A { x: 3 })));
        // Another type is decoded on its own, and the first one is kept.
        assert_eq!(e.payload_shared::<B>(), Some(B { x: 3, y: None }));
        assert!(e.payload_shared::<C>().is_none());
        assert!(
            e.decoded
                .get()
                .unwrap()
                .downcast_ref::<Option<A>>()
                .is_some()
        );
    }

    #[test]
    fn filter_matches_exact_and_prefix() {
        let f = EventFilter::parse("order.*, user.created");
        assert!(f.matches("order.created"));
        assert!(f.matches("user.created"));
        assert!(!f.matches("user.updated"));
        assert!(!f.matches("post.created"));
        assert!(EventFilter::parse("").matches("anything"));
        assert!(EventFilter::parse("*").matches("anything"));
    }

    #[test]
    fn filter_as_sql_binds_its_values() {
        let filter = EventFilter::parse("order.*, user.created");
        let (sql, values) = filter.sql(2).unwrap();
        assert_eq!(sql, "substr(event_type, 1, 6) = $2 OR event_type = $3");
        assert_eq!(values, ["order.", "user.created"]);
        assert!(EventFilter::all().sql(2).is_none());
        let many = (0..17)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(EventFilter::parse(&many).sql(2).is_none());
    }
}
