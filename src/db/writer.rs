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

use std::{
    ops::{Deref, DerefMut},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use sqlx::{
    ConnectOptions, Connection,
    sqlite::{SqliteConnectOptions, SqliteConnection, SqliteTransactionManager as Tm},
};
// Not re-exported by sqlx: how a transaction is begun on a connection that
// the transaction cannot borrow (it is held by a lock guard).
use sqlx_core::transaction::TransactionManager;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, watch};

/// How long a writer waits for the connection before giving up (answered
/// as the database being unavailable): long enough for any burst of writes
/// to drain, short enough that a stuck connection surfaces.
const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(30);

/// A group's outcome: `None` until its `COMMIT` has returned, then the
/// error's text if it failed.
type Outcome = Option<Result<(), Arc<str>>>;

/// The writer connection and the group waiting to be committed on it.
pub struct Writer {
    /// `None` only after a failed commit whose connection could not be
    /// reopened; the next writer tries again.
    conn: Arc<Mutex<Option<SqliteConnection>>>,
    /// Writers (and the committer) waiting for `conn`: a writer that sees
    /// none leaves no one to join its group, so it commits at once.
    queued: AtomicUsize,
    /// The writers whose savepoints are released but not yet committed.
    group: parking_lot::Mutex<Group>,
    /// Wakes the committer: a writer left its group for it to commit, or
    /// left the group's transaction open.
    wake: Arc<Notify>,
    /// Set while a `COMMIT` is on its way: found set, the commit before was
    /// cancelled part way, and whether it was sent is known only once the
    /// connection's worker has answered what it was sent before.
    committing: AtomicBool,
    /// Set when a writer rolled back. Some errors (a full disk, an I/O
    /// error) make SQLite roll back the whole transaction, not only the
    /// statement, and the next savepoint would then begin a transaction of
    /// its own. So a rollback ends the group: it is committed before anyone
    /// else writes, and if it was lost, its members are told.
    rolled_back: AtomicBool,
    /// Set by [`Writer::close`]: later writes are refused, not reopened.
    closed: AtomicBool,
    /// Transactions committed, and the writes they held.
    commits: AtomicU64,
    writes: AtomicU64,
    opts: SqliteConnectOptions,
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
    conn: OwnedMutexGuard<Option<SqliteConnection>>,
    writer: Arc<Writer>,
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

impl Deref for WriteTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("a WriteTx holds an open connection")
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("a WriteTx holds an open connection")
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.open
            && let Some(conn) = self.conn.as_mut()
        {
            // Queued on the connection's worker ahead of anything the next
            // writer sends: the savepoint is gone before the next one starts.
            Tm::start_rollback(conn);
            self.writer.rolled_back.store(true, Ordering::Release);
            // The group's transaction must not stay open, holding SQLite's
            // write lock, in case no other writer comes.
            self.writer.wake.notify_one();
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

/// Wakes the committer if dropped, unless forgotten.
struct WakeOnDrop<'a>(&'a Notify);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

impl Writer {
    /// Takes over `conn`, opened with `opts` (which reopen it after a failed
    /// commit), and starts the committer on the current runtime; the
    /// committer ends when the writer is dropped.
    pub fn new(conn: SqliteConnection, opts: SqliteConnectOptions) -> Arc<Writer> {
        let writer = Arc::new(Writer {
            conn: Arc::new(Mutex::new(Some(conn))),
            queued: AtomicUsize::new(0),
            group: parking_lot::Mutex::new(Group::new()),
            wake: Arc::new(Notify::new()),
            committing: AtomicBool::new(false),
            rolled_back: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            opts,
        });
        tokio::spawn(committer(Arc::downgrade(&writer), writer.wake.clone()));
        writer
    }

    async fn lock(&self) -> sqlx::Result<OwnedMutexGuard<Option<SqliteConnection>>> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _queued = Queued(&self.queued);
        let mut conn = tokio::time::timeout(WAIT_FOR_CONNECTION, self.conn.clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(sqlx::Error::PoolClosed);
        }
        if conn.is_none() {
            *conn = Some(self.opts.connect().await?);
        }
        Ok(conn)
    }

    /// Starts a write: joins the open group transaction, or begins one.
    pub async fn begin(self: &Arc<Self>) -> sqlx::Result<WriteTx> {
        let mut guard = self.lock().await?;
        if self.rolled_back.load(Ordering::Acquire) {
            self.commit_group(&mut guard, false).await.ok();
        }
        let Some(conn) = guard.as_mut() else {
            // The failed commit's connection could not be reopened.
            return Err(sqlx::Error::PoolClosed);
        };
        if Tm::get_transaction_depth(conn) == 0 {
            Tm::begin(conn, None).await?;
        }
        Tm::begin(conn, None).await?;
        Ok(WriteTx {
            conn: guard,
            writer: self.clone(),
            open: true,
        })
    }

    /// Commits the group's transaction on `conn`, if one is open, and tells
    /// the group's members how it went. A failed commit leaves the
    /// connection in a state that cannot be trusted (SQLite may or may not
    /// have rolled back), so it is replaced.
    /// `own`: the caller's write is in the group without being one of its
    /// waiting members.
    async fn commit_group(
        &self,
        conn: &mut Option<SqliteConnection>,
        own: bool,
    ) -> sqlx::Result<()> {
        // Cancelled before the group hears the outcome, the committer takes
        // over: the group's members are waiting for it.
        let wake_committer = WakeOnDrop(&self.wake);
        self.rolled_back.store(false, Ordering::Release);
        let result = match conn.as_mut() {
            Some(c) => self.commit_on(c).await,
            None => Err(sqlx::Error::PoolClosed),
        };
        let group = std::mem::replace(&mut *self.group.lock(), Group::new());
        std::mem::forget(wake_committer);
        match result {
            Ok(()) => {
                if group.members + usize::from(own) > 0 {
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    self.writes
                        .fetch_add((group.members + usize::from(own)) as u64, Ordering::Relaxed);
                }
                group.done.send_replace(Some(Ok(())));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, waiting = group.members, "SQLite commit failed");
                let text: Arc<str> = e.to_string().into();
                group.done.send_replace(Some(Err(text.clone())));
                if let Some(old) = conn.take() {
                    let _ = old.close_hard().await;
                }
                *conn = self.opts.connect().await.ok();
                Err(commit_failed(&text))
            }
        }
    }

    async fn commit_on(&self, c: &mut SqliteConnection) -> sqlx::Result<()> {
        if self.committing.load(Ordering::Acquire) {
            c.ping().await?;
        }
        if Tm::get_transaction_depth(c) == 0 {
            return Ok(());
        }
        self.committing.store(true, Ordering::Release);
        let r = Tm::commit(c).await;
        self.committing.store(false, Ordering::Release);
        r
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

    /// Commits what is pending and closes the connection.
    pub async fn close(&self) {
        let mut conn = self.conn.lock().await;
        self.closed.store(true, Ordering::Release);
        if self.group.lock().members > 0 {
            let _ = self.commit_group(&mut conn, false).await;
        }
        if let Some(c) = conn.take() {
            let _ = c.close().await;
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
    /// Releases this writer's savepoint and returns once its group is
    /// committed: at once when nobody is waiting for the connection,
    /// otherwise once those waiting have joined the group.
    pub async fn commit(mut self) -> sqlx::Result<()> {
        Tm::commit(&mut self).await?;
        self.open = false;
        let writer = self.writer.clone();
        if writer.queued.load(Ordering::Acquire) == 0 {
            return writer.commit_group(&mut self.conn, true).await;
        }
        let mut done = {
            let mut group = writer.group.lock();
            group.members += 1;
            group.done.subscribe()
        };
        writer.wake.notify_one();
        drop(self);
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
            Ok(mut conn) => {
                let _ = writer.commit_group(&mut conn, false).await;
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
        sqlx::query("CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")
            .execute(&mut *tx)
            .await
            .unwrap();
        within(tx.commit()).await.unwrap();
        (dir, db, writer)
    }

    async fn insert(tx: &mut WriteTx, v: i64) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO t (v) VALUES ($1)")
            .bind(v)
            .execute(&mut **tx)
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
