//! SQLite's read connections, pooled without sqlx's pool.
//!
//! sqlx's pool, each time a connection comes back, spawns a task that pings
//! the connection's worker thread before anyone may use it again: a task
//! and two more trips between threads for every read statement. For a
//! network database the ping finds a connection the server has dropped; an
//! SQLite connection is a file and a thread of this process, with nothing
//! between them to break. Without it, reads that go to SQLite served 20–35%
//! more requests (`GET /users/1/posts`, `GET /users/?limit=10`,
//! `GET /posts/1/comments`; docs/benchmarks.md).
//!
//! A statement cancelled part way (its request gone) leaves nothing behind:
//! the connection's worker stops reading rows once nobody takes them and
//! resets the statement before its next command.

use std::{
    ops::{Deref, DerefMut},
    time::Duration,
};

use sqlx::{
    ConnectOptions,
    sqlite::{SqliteConnectOptions, SqliteConnection},
};
use tokio::sync::{Semaphore, SemaphorePermit};

/// How long a read waits for a connection when all are busy, as sqlx's
/// pool waited by default.
const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(30);

/// Up to `max` read connections, opened as needed and kept.
#[derive(Debug)]
pub struct Readers {
    /// A stack: the most recently used connection, its statement cache
    /// warm, is taken first.
    idle: parking_lot::Mutex<Vec<SqliteConnection>>,
    /// One per connection that may be open; closed when the pool is.
    permits: Semaphore,
    opts: SqliteConnectOptions,
}

/// A read connection, back in its pool when dropped.
pub struct Reader<'a> {
    conn: Option<SqliteConnection>,
    readers: &'a Readers,
    _permit: SemaphorePermit<'a>,
}

impl Readers {
    /// Opens the first connection now, so that a database that cannot be
    /// read fails at start rather than at the first request.
    pub async fn open(opts: SqliteConnectOptions, max: u32) -> sqlx::Result<Readers> {
        let first = opts.connect().await?;
        Ok(Readers {
            idle: parking_lot::Mutex::new(vec![first]),
            permits: Semaphore::new(usize::try_from(max.max(1)).unwrap_or(1)),
            opts,
        })
    }

    pub async fn acquire(&self) -> sqlx::Result<Reader<'_>> {
        let permit = match tokio::time::timeout(WAIT_FOR_CONNECTION, self.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(sqlx::Error::PoolClosed),
            Err(_) => return Err(sqlx::Error::PoolTimedOut),
        };
        let idle = self.idle.lock().pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.opts.connect().await?,
        };
        Ok(Reader {
            conn: Some(conn),
            readers: self,
            _permit: permit,
        })
    }

    /// Refuses further reads and closes the idle connections; one in use
    /// closes when its reader is done.
    pub async fn close(&self) {
        self.permits.close();
        let idle = std::mem::take(&mut *self.idle.lock());
        for conn in idle {
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

impl Deref for Reader<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("a Reader holds its connection until dropped")
    }
}

impl DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("a Reader holds its connection until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        // Back on the stack before the permit is released (fields drop
        // after this), so whoever gets the permit finds it there.
        if let Some(conn) = self.conn.take()
            && !self.readers.permits.is_closed()
        {
            self.readers.idle.lock().push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{str::FromStr, time::Duration};

    use futures::StreamExt;
    use sqlx::sqlite::SqliteConnectOptions;

    use super::Readers;

    async fn readers(max: u32) -> (tempfile::TempDir, Readers) {
        let dir = tempfile::tempdir().unwrap();
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(dir.path().join("r.db"))
            .create_if_missing(true);
        (dir, Readers::open(opts, max).await.unwrap())
    }

    #[tokio::test]
    async fn connections_are_capped_and_reused() {
        let (_dir, readers) = readers(2).await;
        let a = readers.acquire().await.unwrap();
        let b = readers.acquire().await.unwrap();
        let third = readers.acquire();
        tokio::pin!(third);
        // Both connections are out: the third read waits however long.
        assert!(futures::poll!(third.as_mut()).is_pending());
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("a connection came back")
            .unwrap();
        drop((b, c));
        assert_eq!(readers.idle.lock().len(), 2, "never more than two opened");
        readers.close().await;
        assert!(matches!(
            readers.acquire().await,
            Err(sqlx::Error::PoolClosed)
        ));
    }

    /// A read abandoned part way (its request gone) leaves the connection
    /// fit for the next one, which gets its own rows.
    #[tokio::test]
    async fn a_read_dropped_part_way_leaves_the_connection_usable() {
        let (_dir, readers) = readers(1).await;
        {
            let mut conn = readers.acquire().await.unwrap();
            let mut rows = sqlx::query_scalar::<_, i64>(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
                 SELECT i FROM n",
            )
            .fetch(&mut *conn);
            assert_eq!(rows.next().await.unwrap().unwrap(), 1);
        }
        let mut conn = readers.acquire().await.unwrap();
        let answer: i64 = sqlx::query_scalar("SELECT 41 + 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(answer, 42);
    }
}
