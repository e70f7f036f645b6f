//! SQLite's one writer connection, with group commit.
//!
//! A commit is durable once SQLite has synced its write-ahead log to disk
//! (`synchronous=FULL`): one fsync per transaction. With a transaction per
//! write, that fsync bounded prism to about 3k writes/s however many clients
//! wrote at once, the disk waiting rather than the CPU working.
//!
//! Here the writers that queue for the connection while another works share
//! one SQLite transaction. Each runs inside a savepoint of its own, so its
//! failure rolls back its own statements and nobody else's; one `COMMIT`, one
//! fsync, then makes the whole group durable. No writer returns from
//! [`WriteTx::commit`] before its group's `COMMIT` has, so a write that prism
//! acknowledged is exactly as durable as before. A writer that finds nobody
//! waiting commits at once, so a lone write waits for no one.
//!
//! Within a group, later writers see earlier ones' changes, as they would
//! have after separate commits: the order of the writes is the order in which
//! they took the connection, as before.
//!
//! The connection is rusqlite's, and a write's statements run on the async
//! worker that holds it: an insert takes microseconds, about what handing it
//! to a thread of its own and back cost (sqlx's way, twelve context switches
//! per write; docs/benchmarks.md, "Store writes"). What can wait on the disk
//! or on another process runs on a blocking thread instead: the group's
//! `COMMIT` (the fsync), a `BEGIN IMMEDIATE` that finds SQLite's write lock
//! held by another process (taken at `BEGIN`, the lock is never waited for
//! after it), and the few statements that touch many rows
//! ([`WriteTx::blocking`]).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use rusqlite::{Connection, ErrorCode, OpenFlags, params_from_iter, types::Value};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, oneshot, watch};

use super::inline::{FromSqlite, query_all, query_optional};

/// How long a writer waits for the connection before giving up (answered
/// as the database being unavailable): long enough for any burst of writes
/// to drain, short enough that a stuck connection surfaces.
const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(30);

/// How long a write waits for SQLite's write lock while another process
/// (the `sqlite3` shell, a backup) holds it.
const WAIT_FOR_LOCK: Duration = Duration::from_secs(5);

/// Prepared statements kept: every write statement prism has.
const STATEMENT_CACHE: usize = 64;

/// A group's outcome: `None` until its `COMMIT` has returned, then the
/// error's text if it failed.
type Outcome = Option<Result<(), Arc<str>>>;

/// The connection, held: `None` only after a failed commit whose
/// connection could not be reopened; the next writer tries again.
type Held = OwnedMutexGuard<Option<Connection>>;

/// The writer connection and the group waiting to be committed on it.
pub struct Writer {
    conn: Arc<Mutex<Option<Connection>>>,
    /// Writers (and the committer) waiting for `conn`: a writer that sees
    /// none leaves no one to join its group, so it commits at once.
    queued: AtomicUsize,
    /// The writers whose savepoints are released but not yet committed.
    group: parking_lot::Mutex<Group>,
    /// Wakes the committer: a writer left its group for it to commit, or
    /// left the group's transaction open.
    wake: Arc<Notify>,
    /// Set by [`Writer::close`]: later writes are refused, not reopened.
    closed: AtomicBool,
    /// Transactions committed, and the writes they held.
    commits: AtomicU64,
    writes: AtomicU64,
    /// Times another process held SQLite's write lock when a group began.
    lock_waits: AtomicU64,
    path: PathBuf,
}

struct Group {
    members: usize,
    done: watch::Sender<Outcome>,
}

impl Group {
    fn new() -> Group {
        Group {
            members: 0,
            done: watch::channel(None).0,
        }
    }
}

/// One writer's transaction: a savepoint inside its group's transaction,
/// holding the connection until it commits or is dropped (rolled back).
pub struct WriteTx {
    /// `None` while a statement runs on a blocking thread, which has it.
    held: Option<Held>,
    writer: Arc<Writer>,
    /// The savepoint is still to be released or rolled back.
    open: bool,
}

impl std::fmt::Debug for WriteTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx").field("open", &self.open).finish()
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.open
            && let Some(held) = &self.held
        {
            self.writer.roll_back(held);
        }
    }
}

/// Counts a writer in `queued` while it waits, whether it gets the
/// connection or is cancelled.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Opens the writer connection to the database at `path`.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    // No mutex of SQLite's own: the connection is used by whoever holds
    // `Writer::conn`, one at a time.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // FULL: a commit that prism has acknowledged survives a power cut, not
    // only a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Only `BEGIN IMMEDIATE` can find SQLite's write lock taken (by another
    // process), and it then waits for it on a blocking thread
    // (`Writer::begin`); nothing waits on an async worker.
    conn.busy_timeout(Duration::ZERO)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

impl Writer {
    /// Opens the writer connection to the database at `path` (migrated,
    /// in WAL mode) and starts the committer on the current runtime; the
    /// committer ends when the writer is dropped.
    pub fn open(path: &Path) -> rusqlite::Result<Arc<Writer>> {
        let conn = connect(path)?;
        let writer = Arc::new(Writer {
            conn: Arc::new(Mutex::new(Some(conn))),
            queued: AtomicUsize::new(0),
            group: parking_lot::Mutex::new(Group::new()),
            wake: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            lock_waits: AtomicU64::new(0),
            path: path.to_owned(),
        });
        tokio::spawn(committer(Arc::downgrade(&writer), writer.wake.clone()));
        Ok(writer)
    }

    async fn lock(&self) -> sqlx::Result<Held> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _queued = Queued(&self.queued);
        let mut held = tokio::time::timeout(WAIT_FOR_CONNECTION, self.conn.clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(sqlx::Error::PoolClosed);
        }
        if held.is_none() {
            *held = Some(connect(&self.path).map_err(to_sqlx)?);
        }
        Ok(held)
    }

    /// Starts a write: joins the open group transaction, or begins one.
    pub async fn begin(self: &Arc<Self>) -> sqlx::Result<WriteTx> {
        let held = self.lock().await?;
        let Some(conn) = held.as_ref() else {
            return Err(sqlx::Error::PoolClosed);
        };
        let idle = conn.is_autocommit();
        let mut tx = WriteTx {
            held: Some(held),
            writer: self.clone(),
            open: false,
        };
        if idle {
            let begun = tx.conn()?.execute_batch("BEGIN IMMEDIATE");
            match begun {
                Ok(()) => {}
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => {
                    self.lock_waits.fetch_add(1, Ordering::Relaxed);
                    tx.blocking(|c| {
                        c.busy_timeout(WAIT_FOR_LOCK)?;
                        let begun = c.execute_batch("BEGIN IMMEDIATE");
                        c.busy_timeout(Duration::ZERO)?;
                        begun
                    })
                    .await?;
                }
                Err(e) => return Err(to_sqlx(e)),
            }
        }
        if let Err(e) = tx.conn()?.execute_batch("SAVEPOINT w") {
            // The group's transaction, begun or not, is the committer's to end.
            self.wake.notify_one();
            return Err(to_sqlx(e));
        }
        tx.open = true;
        Ok(tx)
    }

    /// Rolls back the savepoint of the writer holding `held`. Some errors (a
    /// full disk, an I/O error) make SQLite roll back the whole transaction,
    /// not only the statement; the group's writers are then told that their
    /// writes are lost, before anyone else can begin a new transaction and
    /// commit it in their name.
    fn roll_back(&self, held: &Held) {
        if let Some(c) = held.as_ref() {
            let undone = c.execute_batch("ROLLBACK TO w; RELEASE w");
            if undone.is_err() || c.is_autocommit() {
                if !c.is_autocommit() {
                    let _ = c.execute_batch("ROLLBACK");
                }
                self.fail_group("the transaction was rolled back");
            }
        }
        // The group's transaction must not stay open, holding SQLite's write
        // lock, in case no other writer comes.
        self.wake.notify_one();
    }

    fn fail_group(&self, cause: &str) {
        let group = std::mem::replace(&mut *self.group.lock(), Group::new());
        if group.members > 0 {
            tracing::error!(cause, waiting = group.members, "SQLite transaction lost");
        }
        group.done.send_replace(Some(Err(cause.into())));
    }

    /// Commits the group's transaction, if one is open, on a blocking thread
    /// and tells the group's members how it went; it completes even if the
    /// caller stops waiting. `own`: the caller's write is in the group
    /// without being one of its waiting members.
    async fn commit_group(self: &Arc<Self>, held: Held, own: bool) -> sqlx::Result<()> {
        let writer = self.clone();
        tokio::task::spawn_blocking(move || writer.commit_now(held, own))
            .await
            .map_err(|e| commit_failed(&e.to_string()))?
            .map_err(|e| commit_failed(&e))
    }

    /// A failed commit leaves the connection in a state that cannot be
    /// trusted (SQLite may or may not have rolled back), so it is replaced.
    fn commit_now(&self, mut held: Held, own: bool) -> Result<(), Arc<str>> {
        let result = match held.as_ref() {
            Some(c) if !c.is_autocommit() => c.execute_batch("COMMIT").map_err(|e| e.to_string()),
            Some(_) => Ok(()),
            None => Err("the database is closed".to_owned()),
        };
        let group = std::mem::replace(&mut *self.group.lock(), Group::new());
        match result {
            Ok(()) => {
                let writes = group.members + usize::from(own);
                if writes > 0 {
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    self.writes.fetch_add(writes as u64, Ordering::Relaxed);
                }
                group.done.send_replace(Some(Ok(())));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, waiting = group.members, "SQLite commit failed");
                let text: Arc<str> = e.into();
                group.done.send_replace(Some(Err(text.clone())));
                if let Some(old) = held.take() {
                    let _ = old.close();
                }
                if !self.closed.load(Ordering::Acquire) {
                    *held = connect(&self.path).ok();
                }
                Err(text)
            }
        }
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Writes committed so far: more than [`Writer::commits`] by the writes
    /// that shared a commit.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Times a write found SQLite's write lock held by another process and
    /// waited for it.
    pub fn lock_waits(&self) -> u64 {
        self.lock_waits.load(Ordering::Relaxed)
    }

    /// Commits what is pending and closes the connection.
    pub async fn close(self: &Arc<Self>) {
        let held = self.conn.clone().lock_owned().await;
        self.closed.store(true, Ordering::Release);
        let writer = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut held = held;
            let pending = held.as_ref().is_some_and(|c| !c.is_autocommit());
            if pending {
                let _ = writer.commit_now(held, false);
                return;
            }
            if let Some(c) = held.take() {
                let _ = c.close();
            }
        })
        .await;
        if let Some(c) = self.conn.lock().await.take() {
            let _ = c.close();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The committer holds only a weak reference; woken, it finds the
        // writer gone and ends.
        self.wake.notify_one();
    }
}

impl WriteTx {
    fn conn(&self) -> sqlx::Result<&Connection> {
        self.held
            .as_ref()
            .and_then(|held| held.as_ref())
            .ok_or(sqlx::Error::PoolClosed)
    }

    /// Runs one statement; the rows it changed.
    pub async fn execute(&mut self, sql: &str, args: Vec<Value>) -> sqlx::Result<u64> {
        let c = self.conn()?;
        let changed = super::inline::prepare(c, sql)
            .and_then(|mut s| s.execute(params_from_iter(args)))
            .map_err(to_sqlx)?;
        Ok(changed as u64)
    }

    /// The one row a statement returns.
    pub async fn one<T: FromSqlite>(&mut self, sql: &str, args: Vec<Value>) -> sqlx::Result<T> {
        let c = self.conn()?;
        super::inline::prepare(c, sql)
            .and_then(|mut s| s.query_row(params_from_iter(args), T::from_sqlite))
            .map_err(to_sqlx)
    }

    /// The first row a statement returns, if any.
    pub async fn optional<T: FromSqlite>(
        &mut self,
        sql: &str,
        args: Vec<Value>,
    ) -> sqlx::Result<Option<T>> {
        let c = self.conn()?;
        query_optional(c, sql, params_from_iter(args)).map_err(to_sqlx)
    }

    /// Every row a statement returns.
    pub async fn all<T: FromSqlite>(
        &mut self,
        sql: &str,
        args: Vec<Value>,
    ) -> sqlx::Result<Vec<T>> {
        let c = self.conn()?;
        query_all(c, sql, params_from_iter(args)).map_err(to_sqlx)
    }

    /// [`WriteTx::execute`] on a blocking thread.
    pub async fn execute_blocking(
        &mut self,
        sql: &'static str,
        args: Vec<Value>,
    ) -> sqlx::Result<u64> {
        self.blocking(move |c| super::inline::prepare(c, sql)?.execute(params_from_iter(args)))
            .await
            .map(|n| n as u64)
    }

    /// [`WriteTx::optional`] on a blocking thread.
    pub async fn optional_blocking<T: FromSqlite + Send + 'static>(
        &mut self,
        sql: &'static str,
        args: Vec<Value>,
    ) -> sqlx::Result<Option<T>> {
        self.blocking(move |c| query_optional(c, sql, params_from_iter(args)))
            .await
    }

    /// [`WriteTx::all`] on a blocking thread.
    pub async fn all_blocking<T: FromSqlite + Send + 'static>(
        &mut self,
        sql: &'static str,
        args: Vec<Value>,
    ) -> sqlx::Result<Vec<T>> {
        self.blocking(move |c| query_all(c, sql, params_from_iter(args)))
            .await
    }

    /// Runs `f` on the connection on a blocking thread: for what may wait
    /// on the disk or touch many rows. Should the writer stop waiting, its
    /// savepoint is rolled back there once `f` is done.
    pub async fn blocking<T, F>(&mut self, f: F) -> sqlx::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let held = self.held.take().ok_or(sqlx::Error::PoolClosed)?;
        let (back, returned) = oneshot::channel();
        let writer = self.writer.clone();
        let open = self.open;
        tokio::task::spawn_blocking(move || {
            // A panic must not leave this writer's statements in the group's
            // transaction: it comes back as an error, and the savepoint is
            // rolled back like any other.
            let out = match held.as_ref() {
                Some(c) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c))) {
                    Ok(out) => out.map_err(to_sqlx),
                    Err(_) => Err(sqlx::Error::WorkerCrashed),
                },
                None => Err(sqlx::Error::PoolClosed),
            };
            if let Err((held, _)) = back.send((held, out)) {
                if open {
                    writer.roll_back(&held);
                } else {
                    // A `BEGIN` nobody waits for: the committer ends it.
                    drop(held);
                    writer.wake.notify_one();
                }
            }
        });
        let (held, out) = returned.await.map_err(|_| sqlx::Error::PoolClosed)?;
        self.held = Some(held);
        out
    }

    /// Releases this writer's savepoint and returns once its group is
    /// committed: at once when nobody is waiting for the connection,
    /// otherwise once those waiting have joined the group.
    pub async fn commit(mut self) -> sqlx::Result<()> {
        self.conn()?.execute_batch("RELEASE w").map_err(to_sqlx)?;
        self.open = false;
        let writer = self.writer.clone();
        let held = self.held.take().ok_or(sqlx::Error::PoolClosed)?;
        if held.as_ref().is_some_and(Connection::is_autocommit) {
            // RELEASE of a savepoint ends the transaction only when SQLite
            // had already rolled it back, with the group's writes.
            writer.fail_group("the transaction was rolled back");
            return Err(commit_failed("the transaction was rolled back"));
        }
        if writer.queued.load(Ordering::Acquire) == 0 {
            return writer.commit_group(held, true).await;
        }
        let mut done = {
            let mut group = writer.group.lock();
            group.members += 1;
            group.done.subscribe()
        };
        writer.wake.notify_one();
        drop(held);
        let outcome = done
            .wait_for(Option::is_some)
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?
            .clone();
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(commit_failed(&e)),
            None => unreachable!("wait_for returns a value it waited for"),
        }
    }
}

/// What every writer of a group whose commit failed is told: the database
/// could not make the write durable, so it did not happen.
fn commit_failed(cause: &str) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other(format!("commit failed: {cause}")))
}

/// rusqlite's error as sqlx's, which the domain layer reads (constraint
/// violations by kind, an unavailable database as I/O).
pub fn to_sqlx(e: rusqlite::Error) -> sqlx::Error {
    match e {
        rusqlite::Error::QueryReturnedNoRows => sqlx::Error::RowNotFound,
        rusqlite::Error::SqliteFailure(code, message) => match code.code {
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull => sqlx::Error::Io(std::io::Error::other(
                message.unwrap_or_else(|| code.to_string()),
            )),
            _ => sqlx::Error::Database(Box::new(WriteError {
                message: message.unwrap_or_else(|| code.to_string()),
                code: code.extended_code,
            })),
        },
        other => sqlx::Error::Decode(Box::new(other)),
    }
}

/// An error SQLite gave a write, as sqlx's database error.
#[derive(Debug)]
pub struct WriteError {
    message: String,
    /// SQLite's extended result code.
    code: i32,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WriteError {}

impl sqlx::error::DatabaseError for WriteError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use rusqlite::ffi;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                sqlx::error::ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => sqlx::error::ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => sqlx::error::ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => sqlx::error::ErrorKind::CheckViolation,
            _ => sqlx::error::ErrorKind::Other,
        }
    }
}

/// Commits the groups writers left behind: it queues for the connection
/// behind the writers already waiting, who join the group first, so a group
/// is everyone who queued while the one before it was being written.
async fn committer(writer: Weak<Writer>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(writer) = writer.upgrade() else {
            return;
        };
        match writer.lock().await {
            Ok(held) => {
                let idle = held.as_ref().is_none_or(Connection::is_autocommit);
                if !idle || writer.group.lock().members > 0 {
                    let _ = writer.commit_group(held, false).await;
                }
            }
            Err(sqlx::Error::PoolClosed) => {}
            Err(e) => {
                // The connection stayed busy for the whole wait, or could
                // not be reopened: the group's writers are still waiting.
                tracing::warn!(error = %e, "SQLite committer could not get the connection; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                writer.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use sqlx::{ConnectOptions, Connection, sqlite::SqliteConnectOptions};

    use super::{WriteTx, Writer};
    use crate::db::{Db, Pools};

    async fn open() -> (tempfile::TempDir, Db, Arc<Writer>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(None, dir.path(), 2).await.unwrap();
        let Pools::Sqlite { write, .. } = &db.pools else {
            unreachable!("no database URL opens SQLite")
        };
        let writer = write.clone();
        let mut tx = writer.begin().await.unwrap();
        tx.execute("CREATE TABLE t (v INTEGER NOT NULL UNIQUE)", vec![])
            .await
            .unwrap();
        within(tx.commit()).await.unwrap();
        (dir, db, writer)
    }

    async fn insert(tx: &mut WriteTx, v: i64) -> sqlx::Result<()> {
        tx.execute(
            "INSERT INTO t (v) VALUES ($1)",
            vec![rusqlite::types::Value::Integer(v)],
        )
        .await
        .map(|_| ())
    }

    async fn values(db: &Db) -> Vec<i64> {
        let Pools::Sqlite { inline, .. } = &db.pools else {
            unreachable!()
        };
        let rows: Vec<(i64,)> = inline.all("SELECT v FROM t ORDER BY v", ()).await.unwrap();
        rows.into_iter().map(|(v,)| v).collect()
    }

    /// Spawns a writer that begins (queueing behind whoever holds the
    /// connection), inserts `v` and commits.
    fn spawn_write(writer: &Arc<Writer>, v: i64) -> tokio::task::JoinHandle<sqlx::Result<()>> {
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut tx = writer.begin().await?;
            insert(&mut tx, v).await?;
            tx.commit().await
        })
    }

    /// `f`'s output; a commit that never comes fails the test instead of
    /// hanging it.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("finished within 10 s")
    }

    async fn until_queued(writer: &Writer, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while writer.queued.load(std::sync::atomic::Ordering::Acquire) < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writers queued for the connection");
    }

    #[tokio::test]
    async fn writers_that_queue_share_one_commit() {
        let (_dir, db, writer) = open().await;
        let (commits, writes) = (writer.commits(), writer.writes());
        let mut first = writer.begin().await.unwrap();
        let others: Vec<_> = (2..=20).map(|v| spawn_write(&writer, v)).collect();
        until_queued(&writer, 19).await;
        insert(&mut first, 1).await.unwrap();
        within(first.commit()).await.unwrap();
        for w in others {
            within(w).await.unwrap().unwrap();
        }
        assert_eq!(values(&db).await, (1..=20).collect::<Vec<_>>());
        assert_eq!(writer.writes() - writes, 20);
        assert_eq!(
            writer.commits() - commits,
            1,
            "20 queued writes, one commit"
        );
    }

    #[tokio::test]
    async fn a_failed_write_in_a_group_takes_back_only_its_own_changes() {
        let (_dir, db, writer) = open().await;
        let mut first = writer.begin().await.unwrap();
        let duplicate = spawn_write(&writer, 1);
        until_queued(&writer, 1).await;
        let last = spawn_write(&writer, 3);
        until_queued(&writer, 2).await;
        insert(&mut first, 1).await.unwrap();
        insert(&mut first, 2).await.unwrap();
        within(first.commit()).await.unwrap();
        let refused = within(duplicate).await.unwrap().unwrap_err();
        assert!(
            crate::db::is_unique_violation(&refused, "t_v_key", "t.v"),
            "{refused}"
        );
        within(last).await.unwrap().unwrap();
        assert_eq!(values(&db).await, [1, 2, 3]);
    }

    /// Reads run beside an open write (WAL): they neither wait for it nor
    /// see its changes before they are committed.
    #[tokio::test]
    async fn reads_do_not_wait_for_an_open_write_nor_see_it() {
        let (_dir, db, writer) = open().await;
        let mut tx = writer.begin().await.unwrap();
        insert(&mut tx, 1).await.unwrap();
        assert_eq!(within(values(&db)).await, Vec::<i64>::new());
        within(tx.commit()).await.unwrap();
        assert_eq!(within(values(&db)).await, [1]);
    }

    /// Code that panics on the blocking thread, part way through a write,
    /// leaves none of that write behind: only the writers after it commit.
    #[tokio::test]
    async fn a_panic_on_the_blocking_thread_takes_back_its_write() {
        let (_dir, db, writer) = open().await;
        let mut tx = writer.begin().await.unwrap();
        insert(&mut tx, 1).await.unwrap();
        let crashed = tx
            .blocking(|_| -> rusqlite::Result<()> { panic!("this test's statement panics") })
            .await;
        assert!(
            matches!(crashed, Err(sqlx::Error::WorkerCrashed)),
            "{crashed:?}"
        );
        drop(tx);
        within(spawn_write(&writer, 2)).await.unwrap().unwrap();
        assert_eq!(values(&db).await, [2]);
    }

    /// An acknowledged write survives a power cut (the log synced at each
    /// commit, in WAL mode) and references are checked, on the connection
    /// that writes.
    #[tokio::test]
    async fn the_writer_syncs_each_commit_and_checks_references() {
        use rusqlite::types::Value;
        let (_dir, _db, writer) = open().await;
        let tx = writer.begin().await.unwrap();
        let c = tx.conn().unwrap();
        let pragma =
            |name: &str| -> Value { c.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
        assert_eq!(pragma("synchronous"), Value::Integer(2), "synchronous=FULL");
        assert_eq!(pragma("foreign_keys"), Value::Integer(1));
        assert_eq!(pragma("journal_mode"), Value::Text("wal".into()));
    }

    /// Another process holding SQLite's write lock makes a write wait for
    /// it (off the async worker), not fail.
    #[tokio::test]
    async fn a_write_waits_for_another_process_holding_the_lock() {
        let (dir, db, writer) = open().await;
        let other = rusqlite::Connection::open(dir.path().join("prism.db")).unwrap();
        other
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO t (v) VALUES (1)")
            .unwrap();
        let write = spawn_write(&writer, 2);
        tokio::time::timeout(Duration::from_secs(10), async {
            while writer.lock_waits() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the write found the lock held");
        other.execute_batch("COMMIT").unwrap();
        within(write).await.unwrap().unwrap();
        assert_eq!(values(&db).await, [1, 2]);
    }

    #[tokio::test]
    async fn a_closed_database_refuses_writes_rather_than_reopening() {
        let (_dir, db, writer) = open().await;
        within(spawn_write(&writer, 1)).await.unwrap().unwrap();
        db.close().await;
        assert!(matches!(writer.begin().await, Err(sqlx::Error::PoolClosed)));
    }

    /// A writer that gives up alone must not leave the group's transaction
    /// open: it would hold SQLite's write lock, and another process (the
    /// `sqlite3` shell, a backup) could not write until prism wrote again.
    #[tokio::test]
    async fn a_writer_dropped_alone_leaves_the_database_unlocked() {
        let (dir, db, writer) = open().await;
        let mut tx = writer.begin().await.unwrap();
        insert(&mut tx, 7).await.unwrap();
        drop(tx);
        let mut other = SqliteConnectOptions::new()
            .filename(dir.path().join("prism.db"))
            .busy_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        sqlx::query("INSERT INTO t (v) VALUES (8)")
            .execute(&mut other)
            .await
            .expect("the write lock was released");
        other.close().await.unwrap();
        assert_eq!(values(&db).await, [8]);
    }
}
