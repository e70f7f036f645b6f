//! The store: SQLite (embedded default) or PostgreSQL, behind one enum.
//!
//! Both databases get the same schema (`migrations/sqlite`, `migrations/postgres`)
//! and, almost everywhere, the same SQL text: `$1` placeholders, `RETURNING` and
//! `ON CONFLICT` mean the same on both. Writes run in a transaction: [`on_tx!`]
//! runs one query expression against whichever transaction is live, so each
//! write is written once and type-checked for both drivers. Reads go through
//! [`fetch_all!`] and [`fetch_optional!`]: the same SQL text, run on SQLite
//! on the calling thread ([`inline`]) and on PostgreSQL through sqlx, so their
//! row types are read twice, by sqlx's `FromRow` and by
//! [`inline::FromSqlite`]. The few places where the dialects differ (the
//! event log's ordering lock, LISTEN/NOTIFY) match on the enum explicitly.
//!
//! SQLite gets a single writer connection ([`writer`]): SQLite allows one
//! writer at a time anyway, queueing writers in-process avoids `SQLITE_BUSY`
//! on lock upgrades, which a busy timeout cannot always cure, and the writers
//! that queue share one commit.

pub mod inline;
pub mod reader;
pub mod writer;

use std::{
    path::Path,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use sqlx::{
    ConnectOptions, PgPool, Postgres, Transaction,
    postgres::PgPoolOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous},
};

/// A pooled PostgreSQL connection idle for longer than this is pinged before
/// use, so that one the server dropped meanwhile (a restart, an idle timeout)
/// is replaced instead of failing a request.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pub pools: Pools,
    /// Read statements issued through [`fetch_all!`] and [`fetch_optional!`]
    /// (the event log's own reads are not counted): how tests prove that a
    /// GraphQL query's statement count does not grow with its result.
    reads: Arc<AtomicU64>,
}

/// The connection pools of whichever database is in use.
#[derive(Clone, Debug)]
pub enum Pools {
    Sqlite {
        /// Readers, run on the thread that asks ([`inline`]); WAL lets them
        /// run beside the writer.
        inline: Arc<inline::InlineReads>,
        /// The one writer connection.
        write: Arc<writer::Writer>,
    },
    Postgres {
        /// Writes, and what holds a connection of its own (LISTEN, the
        /// relay's lock).
        pool: PgPool,
        read: Arc<reader::Readers<sqlx::PgConnection>>,
    },
}

/// A write transaction on either database.
#[derive(Debug)]
pub enum Tx {
    Sqlite(writer::WriteTx),
    Postgres(Transaction<'static, Postgres>),
}

/// Every row of one read statement, as `Vec<T>`: `$sql` with `$arg`s bound
/// to `$1`, `$2`, ... (numbered in the order they appear). On SQLite it runs
/// on the calling thread ([`inline`]), on PostgreSQL through sqlx; `T`
/// implements both `FromRow` and [`inline::FromSqlite`]. Errors return from
/// the enclosing function. `fetch_all!(uncounted db, …)` is not counted in
/// [`Db::read_count`]: for background work (the event pump, retention) that
/// belongs to no request.
#[macro_export]
macro_rules! fetch_all {
    (uncounted $db:expr, $sql:expr $(, $arg:expr)* $(,)?) => {{
        let db: &$crate::db::Db = $db;
        match &db.pools {
            $crate::db::Pools::Sqlite { inline, .. } => inline.all($sql, ($($arg,)*)).await?,
            $crate::db::Pools::Postgres { read, .. } => {
                let mut reader = read.acquire().await?;
                sqlx::query_as($sql)$(.bind($arg))*.fetch_all(&mut *reader).await?
            }
        }
    }};
    ($db:expr, $sql:expr $(, $arg:expr)* $(,)?) => {{
        let db: &$crate::db::Db = $db;
        db.count_read();
        $crate::fetch_all!(uncounted db, $sql $(, $arg)*)
    }};
}

/// Like [`fetch_all!`], for the first row only, as `Option<T>`.
#[macro_export]
macro_rules! fetch_optional {
    (uncounted $db:expr, $sql:expr $(, $arg:expr)* $(,)?) => {{
        let db: &$crate::db::Db = $db;
        match &db.pools {
            $crate::db::Pools::Sqlite { inline, .. } => {
                inline.optional($sql, ($($arg,)*)).await?
            }
            $crate::db::Pools::Postgres { read, .. } => {
                let mut reader = read.acquire().await?;
                sqlx::query_as($sql)$(.bind($arg))*.fetch_optional(&mut *reader).await?
            }
        }
    }};
    ($db:expr, $sql:expr $(, $arg:expr)* $(,)?) => {{
        let db: &$crate::db::Db = $db;
        db.count_read();
        $crate::fetch_optional!(uncounted db, $sql $(, $arg)*)
    }};
}

/// Runs `$body` with `$conn` bound to the transaction's connection.
#[macro_export]
macro_rules! on_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::db::Tx::Sqlite(t) => {
                let $conn = &mut **t;
                $body
            }
            $crate::db::Tx::Postgres(t) => {
                let $conn = &mut **t;
                $body
            }
        }
    };
}

impl Db {
    /// Opens the database named by `database_url`, or the embedded SQLite file in
    /// `data_dir`, and brings its schema up to date.
    pub async fn connect(
        database_url: Option<&str>,
        data_dir: &Path,
        max_connections: u32,
    ) -> anyhow::Result<Db> {
        let db = match database_url {
            Some(url) => {
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(5))
                    // sqlx pings every connection it hands out: a second round
                    // trip to the server for each statement. As HikariCP does,
                    // only a connection idle for a while is checked; one in
                    // steady use has just proved itself.
                    .test_before_acquire(false)
                    .before_acquire(|conn, meta| {
                        Box::pin(async move {
                            if meta.idle_for > PING_IDLE_AFTER {
                                sqlx::Connection::ping(conn).await?;
                            }
                            Ok(true)
                        })
                    })
                    .connect(url)
                    .await;
                let pool = match pool {
                    Ok(pool) => pool,
                    // The pool retries a refused or unreachable server until
                    // its acquire timeout and then reports only that it
                    // timed out; one more try on its own says why.
                    Err(sqlx::Error::PoolTimedOut) => {
                        let once = <sqlx::PgConnection as sqlx::Connection>::connect(url);
                        let cause = match tokio::time::timeout(Duration::from_secs(5), once).await {
                            Ok(Err(e)) => e.into(),
                            // A server that swallows packets: nothing more to learn.
                            Err(_) | Ok(Ok(_)) => anyhow::anyhow!("no connection within 5 s"),
                        };
                        return Err(cause.context("cannot connect to PostgreSQL"));
                    }
                    Err(e) => {
                        return Err(anyhow::Error::from(e).context("cannot connect to PostgreSQL"));
                    }
                };
                sqlx::migrate!("./migrations/postgres")
                    .run(&pool)
                    .await
                    .context("PostgreSQL migration failed")?;
                let opts = sqlx::postgres::PgConnectOptions::from_str(url)?;
                let read = reader::Readers::open(
                    opts,
                    max_connections,
                    Some(PING_IDLE_AFTER),
                    Duration::from_secs(5),
                )
                .await
                .context("cannot connect to PostgreSQL for reading")?;
                Pools::Postgres {
                    pool,
                    read: Arc::new(read),
                }
            }
            None => {
                std::fs::create_dir_all(data_dir).with_context(|| {
                    format!("cannot create data directory {}", data_dir.display())
                })?;
                let opts = SqliteConnectOptions::from_str("sqlite://")?
                    .filename(data_dir.join("prism.db"))
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // FULL: a commit that prism has acknowledged survives a power
                    // cut, not only a process crash. Writes are not the hot path.
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(5));
                let mut write = opts
                    .connect()
                    .await
                    .context("cannot open the SQLite database")?;
                sqlx::migrate!("./migrations/sqlite")
                    .run(&mut write)
                    .await
                    .context("SQLite migration failed")?;
                let write = writer::Writer::new(write, opts.clone());
                let inline = inline::InlineReads::open(&data_dir.join("prism.db"), max_connections)
                    .context("cannot open the SQLite database for reading")?;
                Pools::Sqlite {
                    inline: Arc::new(inline),
                    write,
                }
            }
        };
        Ok(Db {
            pools: db,
            reads: Arc::default(),
        })
    }

    pub fn kind(&self) -> &'static str {
        match self.pools {
            Pools::Sqlite { .. } => "sqlite",
            Pools::Postgres { .. } => "postgres",
        }
    }

    /// The PostgreSQL pool, when that is the database in use.
    pub fn postgres(&self) -> Option<&PgPool> {
        match &self.pools {
            Pools::Postgres { pool, .. } => Some(pool),
            Pools::Sqlite { .. } => None,
        }
    }

    #[doc(hidden)]
    pub fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Read statements issued so far through [`fetch_all!`] and [`fetch_optional!`].
    pub fn read_count(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Starts a write transaction.
    pub async fn begin(&self) -> sqlx::Result<Tx> {
        Ok(match &self.pools {
            Pools::Sqlite { write, .. } => Tx::Sqlite(write.begin().await?),
            Pools::Postgres { pool, .. } => Tx::Postgres(pool.begin().await?),
        })
    }

    /// Answers when the database answers a trivial query (readiness), on
    /// SQLite through the connections that serve the hot reads.
    pub async fn ping(&self) -> crate::error::Result<()> {
        self.count_read();
        match &self.pools {
            Pools::Sqlite { inline, .. } => {
                inline
                    .read(|c| c.query_row("SELECT 1", [], |_| Ok(())))
                    .await
            }
            Pools::Postgres { read, .. } => {
                sqlx::query("SELECT 1")
                    .execute(&mut *read.acquire().await?)
                    .await?;
                Ok(())
            }
        }
    }

    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite { inline, write } => {
                inline.close();
                write.close().await;
            }
            Pools::Postgres { pool, read } => {
                read.close().await;
                pool.close().await;
            }
        }
    }
}

impl Tx {
    pub async fn commit(self) -> sqlx::Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }
}

/// True when `e` is a unique-constraint violation on `constraint` (PostgreSQL
/// names the constraint; SQLite names the columns, so the column list is checked).
pub fn is_unique_violation(e: &sqlx::Error, constraint: &str, sqlite_columns: &str) -> bool {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => match db.constraint() {
            Some(name) => name == constraint,
            None => db.message().contains(sqlite_columns),
        },
        _ => false,
    }
}

/// True when `e` is a foreign-key violation (the referenced row does not exist).
pub fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

/// Largest id list sent in one `IN (…)`: far below both databases' parameter
/// limits (SQLite 32,766; PostgreSQL 65,535).
pub const MAX_IN_LIST: usize = 500;

/// `$first, $first+1, …` for `n` parameters: the same text on both databases.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    /// Without the query planner stability guarantee (`.cargo/config.toml`),
    /// SQLite compiles a statement whose LIMIT is a bound parameter again at
    /// every run; a build that lost the flag is slower, not wrong, so only
    /// this test notices.
    #[tokio::test]
    async fn the_bundled_sqlite_plans_each_statement_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::Db::connect(None, dir.path(), 1).await.unwrap();
        let super::Pools::Sqlite { inline, .. } = &db.pools else {
            unreachable!("no database URL opens SQLite")
        };
        let used: Option<(i64,)> = inline
            .optional("SELECT sqlite_compileoption_used('ENABLE_QPSG')", ())
            .await
            .unwrap();
        assert_eq!(
            used,
            Some((1,)),
            "SQLite was built without SQLITE_ENABLE_QPSG"
        );
    }

    /// Readiness asks the connections that serve the hot reads: with those
    /// gone, the server is not ready, whatever sqlx's readers say.
    #[tokio::test]
    async fn readiness_asks_the_connections_that_serve_reads() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::Db::connect(None, dir.path(), 1).await.unwrap();
        db.ping().await.unwrap();
        let super::Pools::Sqlite { inline, .. } = &db.pools else {
            unreachable!("no database URL opens SQLite")
        };
        inline.close();
        let answer = db.ping().await;
        assert!(
            matches!(answer, Err(crate::error::Error::Unavailable(_))),
            "{answer:?}"
        );
    }

    /// A server that refuses connections is named as the cause, not hidden
    /// behind the pool's "timed out" after its retries.
    #[tokio::test]
    async fn a_refused_postgres_connection_says_why() {
        // Port 1 on the loopback: nothing listens there, so connecting is refused.
        let url = "postgres://postgres@127.0.0.1:1/test";
        let dir = tempfile::tempdir().unwrap();
        let err = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            super::Db::connect(Some(url), dir.path(), 2),
        )
        .await
        .expect("connect gave up within its acquire timeout");
        let Err(err) = err else {
            panic!("nothing listens on port 1, yet it connected");
        };
        let text = format!("{err:#}");
        assert!(text.starts_with("cannot connect to PostgreSQL: "), "{text}");
        assert!(text.contains("refused"), "{text}");
        assert!(!text.contains("timed out"), "{text}");
    }

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(super::placeholders(1, 3), "$1, $2, $3");
        assert_eq!(super::placeholders(2, 1), "$2");
    }
}
