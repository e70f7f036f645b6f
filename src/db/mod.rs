//! The store: SQLite (embedded default) or PostgreSQL, behind one enum.
//!
//! Both databases get the same schema (`migrations/sqlite`, `migrations/postgres`)
//! and, almost everywhere, the same SQL text: `$1` placeholders, `RETURNING` and
//! `ON CONFLICT` mean the same on both. Reads go through [`fetch_all!`] and
//! [`fetch_optional!`], writes through [`tx_execute!`], [`tx_one!`],
//! [`tx_optional!`] and [`tx_all!`] in a transaction: each statement is
//! written once, with its arguments, and runs on SQLite through rusqlite on
//! the calling thread ([`inline`], [`writer`]) and on PostgreSQL through
//! sqlx. So row types are read twice, by sqlx's `FromRow` and by
//! [`inline::FromSqlite`], and arguments bound twice, by sqlx's `Encode` and
//! by [`SqliteArg`] (which encodes as sqlx does, so rows written before read
//! the same). The few places where the dialects differ (the event log's
//! ordering lock, LISTEN/NOTIFY, a statement built at run time) match on the
//! enum explicitly.
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
        /// Writes, and what holds a connection of its own (the relay's
        /// lock). The event log's listener and announcer connect apart.
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

/// The values of a write statement's arguments, for rusqlite.
#[doc(hidden)]
#[macro_export]
macro_rules! sqlite_args {
    ($($arg:expr),*) => {{
        let args: ::std::vec::Vec<rusqlite::types::Value> =
            ::std::vec![$($crate::db::SqliteArg::sqlite(&$arg)),*];
        args
    }};
}

/// One statement in a write transaction: on SQLite the [`writer::WriteTx`]
/// method `$sqlite`, on PostgreSQL `sqlx::$query(…).$fetch(…)`, its answer
/// passed through `$answer`.
#[doc(hidden)]
#[macro_export]
macro_rules! tx_statement {
    ($tx:expr, $sqlite:ident, $query:ident, $fetch:ident, $answer:expr, $sql:expr $(, $arg:expr)*) => {
        match $tx {
            $crate::db::Tx::Sqlite(t) => t.$sqlite($sql, $crate::sqlite_args!($($arg),*)).await,
            $crate::db::Tx::Postgres(t) => sqlx::$query($sql)$(.bind($arg))*
                .$fetch(&mut **t)
                .await
                .map($answer),
        }
    };
}

/// Runs one write statement in the transaction `$tx` (`&mut Tx`): `$sql`
/// with `$arg`s bound to `$1`, `$2`, ... in order, as [`fetch_all!`] binds
/// them. On SQLite it runs on the calling thread ([`writer`]), on
/// PostgreSQL through sqlx. Gives the rows it changed, as `sqlx::Result<u64>`
/// (constraint violations read the same on both). `tx_execute!(blocking tx,
/// …)` runs it on a blocking thread on SQLite: for a statement that may
/// touch many rows.
#[macro_export]
macro_rules! tx_execute {
    (blocking $tx:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::tx_statement!($tx, execute_blocking, query, execute,
            |r: sqlx::postgres::PgQueryResult| r.rows_affected(), $sql $(, $arg)*)
    };
    ($tx:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::tx_statement!($tx, execute, query, execute,
            |r: sqlx::postgres::PgQueryResult| r.rows_affected(), $sql $(, $arg)*)
    };
}

/// Like [`tx_execute!`], for a statement that returns exactly one row, as
/// `sqlx::Result<T>` (`T` implements `FromRow` and [`inline::FromSqlite`]).
#[macro_export]
macro_rules! tx_one {
    ($tx:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::tx_statement!($tx, one, query_as, fetch_one, ::std::convert::identity, $sql $(, $arg)*)
    };
}

/// Like [`tx_one!`], for the first row if any, as `sqlx::Result<Option<T>>`;
/// `tx_optional!(blocking tx, …)` runs on a blocking thread on SQLite.
#[macro_export]
macro_rules! tx_optional {
    (blocking $tx:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::tx_statement!($tx, optional_blocking, query_as, fetch_optional,
            ::std::convert::identity, $sql $(, $arg)*)
    };
    ($tx:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::tx_statement!($tx, optional, query_as, fetch_optional,
            ::std::convert::identity, $sql $(, $arg)*)
    };
}

/// Like [`tx_one!`], for every row, as `sqlx::Result<Vec<T>>`;
/// `tx_all!(blocking tx, …)` runs on a blocking thread on SQLite.
#[macro_export]
macro_rules! tx_all {
    (blocking $tx:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::tx_statement!($tx, all_blocking, query_as, fetch_all,
            ::std::convert::identity, $sql $(, $arg)*)
    };
    ($tx:expr, $sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::tx_statement!($tx, all, query_as, fetch_all,
            ::std::convert::identity, $sql $(, $arg)*)
    };
}

/// A value bound to a write statement on SQLite, encoded as sqlx encodes it
/// (so rows written by either read the same: timestamps as RFC 3339 text).
pub trait SqliteArg {
    fn sqlite(&self) -> rusqlite::types::Value;
}

macro_rules! sqlite_arg_integer {
    ($($t:ty),*) => {$(
        impl SqliteArg for $t {
            fn sqlite(&self) -> rusqlite::types::Value {
                rusqlite::types::Value::Integer(i64::from(*self))
            }
        }
    )*};
}

sqlite_arg_integer!(i64, i32, u32, bool);

impl SqliteArg for f64 {
    fn sqlite(&self) -> rusqlite::types::Value {
        rusqlite::types::Value::Real(*self)
    }
}

impl SqliteArg for str {
    fn sqlite(&self) -> rusqlite::types::Value {
        rusqlite::types::Value::Text(self.to_owned())
    }
}

impl SqliteArg for String {
    fn sqlite(&self) -> rusqlite::types::Value {
        rusqlite::types::Value::Text(self.clone())
    }
}

impl SqliteArg for chrono::DateTime<chrono::Utc> {
    fn sqlite(&self) -> rusqlite::types::Value {
        rusqlite::types::Value::Text(self.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false))
    }
}

impl<T: SqliteArg + ?Sized> SqliteArg for &T {
    fn sqlite(&self) -> rusqlite::types::Value {
        (**self).sqlite()
    }
}

impl<T: SqliteArg> SqliteArg for Option<T> {
    fn sqlite(&self) -> rusqlite::types::Value {
        match self {
            Some(v) => v.sqlite(),
            None => rusqlite::types::Value::Null,
        }
    }
}

/// An argument of a write statement that is put together at run time, for
/// either database: [`crate::events::EventLog::insert`] takes its insert's
/// arguments as a list of these. `'a` is what the value borrows (sqlx encodes
/// an `Option<&'a str>` only for as long as the `&str` lives).
pub trait WriteArg<'a>: SqliteArg + Sync {
    fn add_to(
        &self,
        args: &mut sqlx::postgres::PgArguments,
    ) -> Result<(), sqlx::error::BoxDynError>;
}

impl<'a, T> WriteArg<'a> for T
where
    T: SqliteArg + Sync + sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres> + 'a,
{
    fn add_to(
        &self,
        args: &mut sqlx::postgres::PgArguments,
    ) -> Result<(), sqlx::error::BoxDynError> {
        sqlx::Arguments::add(args, self)
    }
}

/// The present as both databases keep it. PostgreSQL stores microseconds, so
/// a row built from this reads the same as the copy stored from it.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6)
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
                // sqlx migrates; rusqlite writes from then on ([`writer`]).
                let mut migrate = opts
                    .connect()
                    .await
                    .context("cannot open the SQLite database")?;
                sqlx::migrate!("./migrations/sqlite")
                    .run(&mut migrate)
                    .await
                    .context("SQLite migration failed")?;
                sqlx::Connection::close(migrate)
                    .await
                    .context("cannot open the SQLite database")?;
                let write = writer::Writer::open(&data_dir.join("prism.db"))
                    .context("cannot open the SQLite database for writing")?;
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
            Pools::Postgres { pool, .. } => {
                // sqlx 0.9.0's `begin`, dropped while `BEGIN` is on its way
                // (a client hung up), leaves the session in a transaction
                // that nothing ends, and the pool hands the connection on:
                // every write made on it after is answered and never
                // commits (transact-rs/sqlx#4393). Run in a task of its own,
                // `begin` finishes whatever becomes of the caller, and a
                // transaction begun for no one is dropped there, which
                // rolls it back.
                let pool = pool.clone();
                let begun = tokio::spawn(async move { pool.begin().await })
                    .await
                    .map_err(|_| sqlx::Error::WorkerCrashed)??;
                Tx::Postgres(begun)
            }
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
