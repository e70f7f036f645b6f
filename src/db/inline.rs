//! SQLite reads on the thread that asks for them.
//!
//! sqlx runs every SQLite connection on a thread of its own: a statement is a
//! message to that thread and each row a message back. For a page of posts
//! that was 3.5 context switches, and more kernel time than prism's own work
//! (docs/benchmarks.md, "Store reads"). A read on a WAL database never waits
//! for the writer and mostly takes microseconds, about what the trips between
//! threads cost. So every SQLite read (entities by id, pages, the batches
//! behind GraphQL's nested fields, the event log) runs here instead, on the
//! async worker that wants the rows, each on a connection of its own from a
//! small stack (rusqlite on the same SQLite build as sqlx, which keeps the
//! writer).
//!
//! An async worker must not be held for long, and a read's length is not
//! known beforehand (a page of a thousand long posts, the comments of 500
//! posts). So a read runs here with a budget of SQLite virtual-machine steps;
//! one that needs more is interrupted and run again from the start on one of
//! tokio's blocking threads, without a budget. A read can safely run twice,
//! and only a large one pays for the first try, a small part of its cost.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// SQLite virtual-machine steps a read may take on an async worker, a few
/// hundred microseconds: a page of 100 posts takes about 1,000 steps, one of
/// 1,000 a little over this.
const INLINE_STEPS: i32 = 10_000;

/// How long a read over the budget waits for its turn when
/// `db_max_connections` of them are running, as sqlx's pool waited.
const WAIT_FOR_TURN: Duration = Duration::from_secs(30);

/// Prepared statements kept per connection: every hot read, and the batch
/// reads' `IN` lists of the lengths seen most.
const STATEMENT_CACHE: usize = 64;

/// A row type read through rusqlite (the sqlx path derives `FromRow`).
pub trait FromSqlite: Sized {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

/// A single value, such as a `COUNT(*)`.
impl<A: rusqlite::types::FromSql> FromSqlite for (A,) {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?,))
    }
}

impl<A: rusqlite::types::FromSql, B: rusqlite::types::FromSql> FromSqlite for (A, B) {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?, row.get(1)?))
    }
}

struct Conn {
    conn: Connection,
    /// What the connection's progress handler answers: interrupt the
    /// statement (it ran out of its budget on an async worker) or go on.
    budgeted: Arc<AtomicBool>,
}

/// Read-only connections to the SQLite database, opened as needed and kept.
/// A read holds one only while it runs, never across an await: one for each
/// async worker at most, and one for each read over the budget, of which
/// `db_max_connections` run at once.
pub struct InlineReads {
    path: PathBuf,
    idle: parking_lot::Mutex<Vec<Conn>>,
    closed: AtomicBool,
    long_reads: Arc<Semaphore>,
    /// Reads that ran out of their budget here (`/metrics`).
    moved: AtomicU64,
}

impl std::fmt::Debug for InlineReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineReads")
            .field("path", &self.path)
            .field("idle", &self.idle.lock().len())
            .finish()
    }
}

impl InlineReads {
    /// Opens the first connection now, so that a database that cannot be
    /// read fails at start rather than at the first request.
    pub fn open(path: &Path, max_long_reads: u32) -> rusqlite::Result<InlineReads> {
        let first = connect(path)?;
        Ok(InlineReads {
            path: path.to_owned(),
            idle: parking_lot::Mutex::new(vec![first]),
            closed: AtomicBool::new(false),
            moved: AtomicU64::new(0),
            long_reads: Arc::new(Semaphore::new(
                usize::try_from(max_long_reads.max(1)).unwrap_or(1),
            )),
        })
    }

    fn take(&self) -> Result<Conn> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::Unavailable("Database unavailable".into()));
        }
        let idle = self.idle.lock().pop();
        match idle {
            Some(conn) => Ok(conn),
            None => Ok(connect(&self.path)?),
        }
    }

    fn put(&self, conn: Conn) {
        if !self.closed.load(Ordering::Relaxed) {
            self.idle.lock().push(conn);
        }
    }

    /// Runs `read` here within the step budget, or again on a blocking
    /// thread when it needs more (module docs).
    pub async fn read<T, F>(self: &Arc<Self>, read: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.take()?;
        conn.budgeted.store(true, Ordering::Relaxed);
        match read(&conn.conn) {
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) => {
                self.put(conn);
                self.moved.fetch_add(1, Ordering::Relaxed);
                let turn = self.long_reads.clone().acquire_owned();
                let permit = match tokio::time::timeout(WAIT_FOR_TURN, turn).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) | Err(_) => {
                        return Err(Error::Unavailable("Database unavailable".into()));
                    }
                };
                let conn = self.take()?;
                conn.budgeted.store(false, Ordering::Relaxed);
                let this = self.clone();
                // The permit goes with the read: it is held until the read
                // ends, even if whoever asked stops waiting for it.
                tokio::task::spawn_blocking(move || {
                    let rows = read(&conn.conn);
                    this.put(conn);
                    drop(permit);
                    rows
                })
                .await
                .map_err(Error::internal)?
                .map_err(Error::from)
            }
            rows => {
                self.put(conn);
                Ok(rows?)
            }
        }
    }

    /// Every row `sql` selects with `params` bound to `$1`, `$2`, ... in order.
    pub async fn all<T, P>(self: &Arc<Self>, sql: &'static str, params: P) -> Result<Vec<T>>
    where
        T: FromSqlite + Send + 'static,
        P: rusqlite::Params + Clone + Send + 'static,
    {
        self.read(move |c| query_all(c, sql, params.clone())).await
    }

    /// Every row of a statement made at run time (an `IN` list, a filter),
    /// with `params` bound to `$1`, `$2`, ... in order.
    pub async fn all_built<T, V>(self: &Arc<Self>, sql: String, params: Vec<V>) -> Result<Vec<T>>
    where
        T: FromSqlite + Send + 'static,
        V: rusqlite::ToSql + Send + 'static,
    {
        self.read(move |c| query_all(c, &sql, rusqlite::params_from_iter(&params)))
            .await
    }

    /// The first row `sql` selects, if any.
    pub async fn optional<T, P>(self: &Arc<Self>, sql: &'static str, params: P) -> Result<Option<T>>
    where
        T: FromSqlite + Send + 'static,
        P: rusqlite::Params + Clone + Send + 'static,
    {
        self.read(move |c| query_optional(c, sql, params.clone()))
            .await
    }

    /// Reads that needed more than the budget, run on a blocking thread.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Refuses further reads and closes the idle connections; one in use
    /// closes when its read is done.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.long_reads.close();
        self.idle.lock().clear();
    }
}

/// A cached statement for `sql`, whose parameters are bound by position:
/// they must be numbered in the order they first appear, as prism's are
/// (sqlx binds `$n` by its number, so a statement that broke the rule would
/// read differently here; debug builds check).
pub(crate) fn prepare<'c>(
    c: &'c Connection,
    sql: &str,
) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    let statement = c.prepare_cached(sql)?;
    debug_assert!(
        (1..=statement.parameter_count()).all(|i| {
            statement
                .parameter_name(i)
                .map(|n| n.strip_prefix('$') == Some(&i.to_string()))
                == Some(true)
        }),
        "parameters of {sql:?} are not $1, $2, ... in order"
    );
    Ok(statement)
}

/// Every row `sql` selects with `params`, on `c` (a reader or the writer).
pub(crate) fn query_all<T: FromSqlite>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Vec<T>> {
    prepare(c, sql)?
        .query_map(params, T::from_sqlite)?
        .collect()
}

/// The first row `sql` selects with `params`, if any, on `c`.
pub(crate) fn query_optional<T: FromSqlite>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Option<T>> {
    prepare(c, sql)?
        .query_row(params, T::from_sqlite)
        .optional()
}

fn connect(path: &Path) -> rusqlite::Result<Conn> {
    // No mutex of SQLite's own: a connection is used by one thread at a time.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // A reader of a WAL database waits only while another connection
    // recovers the log after a crash.
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "query_only", true)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let budgeted = Arc::new(AtomicBool::new(true));
    let answer = budgeted.clone();
    conn.progress_handler(INLINE_STEPS, Some(move || answer.load(Ordering::Relaxed)))?;
    Ok(Conn { conn, budgeted })
}

/// A timestamp column as prism writes it (RFC 3339 text, sqlx's encoding).
pub fn timestamp(
    row: &rusqlite::Row<'_>,
    column: &str,
) -> rusqlite::Result<chrono::DateTime<chrono::Utc>> {
    let text = row.get_ref(column)?.as_str()?;
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{FromSqlite, InlineReads};

    struct N(i64);

    impl FromSqlite for N {
        fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
            row.get(0).map(N)
        }
    }

    fn database() -> (tempfile::TempDir, Arc<InlineReads>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let c = rusqlite::Connection::open(&path).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        drop(c);
        let reads = Arc::new(InlineReads::open(&path, 2).unwrap());
        (dir, reads)
    }

    const COUNT: &str = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
                         SELECT i FROM n";

    /// A read larger than the budget is not cut short: it runs again on a
    /// blocking thread and returns every row.
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_over_the_budget_finishes_on_a_blocking_thread() {
        let (_dir, reads) = database();
        let small: Vec<N> = reads.all(COUNT, (10,)).await.unwrap();
        assert_eq!(small.len(), 10);
        assert_eq!(reads.moved(), 0, "a small read runs where it was asked for");
        let large: Vec<N> = reads.all(COUNT, (200_000,)).await.unwrap();
        assert_eq!(large.len(), 200_000);
        assert_eq!(large.last().unwrap().0, 200_000);
        assert_eq!(reads.moved(), 1);
        // Both connections came back; a read after the large one is budgeted
        // again and still served.
        let again: Option<N> = reads.optional(COUNT, (3,)).await.unwrap();
        assert_eq!(again.unwrap().0, 1);
        assert_eq!(reads.moved(), 1);
    }

    #[tokio::test]
    async fn a_closed_store_refuses_reads() {
        let (_dir, reads) = database();
        reads.close();
        let err = reads.all::<N, _>(COUNT, (1,)).await.err().unwrap();
        assert!(
            matches!(err, crate::error::Error::Unavailable(_)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn the_connections_cannot_write() {
        let (_dir, reads) = database();
        let err = reads
            .read(|c| c.execute("CREATE TABLE t (x INTEGER)", ()))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("readonly"), "{err}");
    }
}
