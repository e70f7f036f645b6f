//! PostgreSQL read connections, pooled without sqlx's pool.
//!
//! sqlx's pool, each time a connection comes back, spawns a task that pings
//! it before anyone may use it again: a round trip to the server for every
//! read statement. That is not needed after a statement that finished; a
//! connection that the server dropped while it sat idle is found by pinging
//! it before use once it has been idle a while, as the write pool's
//! `before_acquire` does. Without the ping, reads served 20–40% more
//! requests (`GET /users/1/posts`, `GET /posts/1/comments`, …;
//! docs/benchmarks.md).
//!
//! A statement abandoned part way (its request gone) leaves nothing behind:
//! sqlx's PostgreSQL connection reads what the server still had to say
//! before it sends the next query.
//!
//! The pool is generic over sqlx's connection; its tests use SQLite files,
//! which need no server. (SQLite's reads in prism go through [`super::inline`].)

use std::{
    ops::{Deref, DerefMut},
    time::{Duration, Instant},
};

use sqlx::{ConnectOptions, Connection};
use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};

/// How long a read waits for a connection when all are busy, as sqlx's
/// pool waited by default.
const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(30);

/// Up to `max` read connections, opened as needed and kept.
#[derive(Debug)]
pub struct Readers<C: Connection> {
    /// A stack: the most recently used connection, its statement cache
    /// warm, is taken first. Each with the time it was put back.
    idle: parking_lot::Mutex<Vec<(C, Instant)>>,
    /// One per connection that may be open; closed when the pool is.
    permits: Semaphore,
    opts: C::Options,
    /// A connection idle for longer than this is pinged before use, and
    /// replaced if it does not answer; `None`: never.
    check_idle_after: Option<Duration>,
    connect_timeout: Duration,
}

/// A read connection, back in its pool when dropped.
pub struct Reader<'a, C: Connection> {
    conn: Option<C>,
    readers: &'a Readers<C>,
    _permit: SemaphorePermit<'a>,
}

impl<C: Connection> Readers<C> {
    /// Opens the first connection now, so that a database that cannot be
    /// read fails at start rather than at the first request.
    pub async fn open(
        opts: C::Options,
        max: u32,
        check_idle_after: Option<Duration>,
        connect_timeout: Duration,
    ) -> sqlx::Result<Readers<C>> {
        let readers = Readers {
            idle: parking_lot::Mutex::new(Vec::new()),
            permits: Semaphore::new(usize::try_from(max.max(1)).unwrap_or(1)),
            opts,
            check_idle_after,
            connect_timeout,
        };
        let first = readers.connect().await?;
        readers.idle.lock().push((first, Instant::now()));
        Ok(readers)
    }

    async fn connect(&self) -> sqlx::Result<C> {
        tokio::time::timeout(self.connect_timeout, self.opts.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    pub async fn acquire(&self) -> sqlx::Result<Reader<'_, C>> {
        // A free connection is taken without arming a timer (a clock read):
        // the common case on every read statement.
        let permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(sqlx::Error::PoolClosed),
            Err(TryAcquireError::NoPermits) => {
                match tokio::time::timeout(WAIT_FOR_CONNECTION, self.permits.acquire()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(sqlx::Error::PoolClosed),
                    Err(_) => return Err(sqlx::Error::PoolTimedOut),
                }
            }
        };
        let conn = loop {
            let idle = self.idle.lock().pop();
            let Some((mut conn, since)) = idle else {
                break self.connect().await?;
            };
            let stale = self
                .check_idle_after
                .is_some_and(|after| since.elapsed() > after);
            if !stale {
                break conn;
            }
            let answered = tokio::time::timeout(self.connect_timeout, conn.ping()).await;
            if let Ok(Ok(())) = answered {
                break conn;
            }
            // Gone (the server restarted, or closed it for idling): the next
            // idle one, or a new one, serves instead.
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
        for (conn, _) in idle {
            let _ = conn.close().await;
        }
    }
}

impl<C: Connection> Deref for Reader<'_, C> {
    type Target = C;

    fn deref(&self) -> &C {
        self.conn
            .as_ref()
            .expect("a Reader holds its connection until dropped")
    }
}

impl<C: Connection> DerefMut for Reader<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn
            .as_mut()
            .expect("a Reader holds its connection until dropped")
    }
}

impl<C: Connection> Drop for Reader<'_, C> {
    fn drop(&mut self) {
        // Back on the stack before the permit is released (fields drop
        // after this), so whoever gets the permit finds it there.
        if let Some(conn) = self.conn.take()
            && !self.readers.permits.is_closed()
        {
            self.readers.idle.lock().push((conn, Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{str::FromStr, time::Duration};

    use futures::StreamExt;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

    use super::Readers;

    async fn readers(max: u32) -> (tempfile::TempDir, Readers<SqliteConnection>) {
        let dir = tempfile::tempdir().unwrap();
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(dir.path().join("r.db"))
            .create_if_missing(true);
        let readers = Readers::open(opts, max, None, Duration::from_secs(5));
        (dir, readers.await.unwrap())
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
