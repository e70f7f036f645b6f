//! Bookkeeping for event consumers and relays: stream positions, applied
//! events (idempotence: a redelivered event changes nothing), and the users
//! service's order statistics built from other services' `order.created`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Domain;
use crate::{
    db::{Tx, placeholders},
    error::{Error, Result},
    events, fetch_optional, sqlite_args, tx_all, tx_execute,
};

/// What the users service learned of a user's orders from `order.created`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, sqlx::FromRow, utoipa::ToSchema)]
pub struct OrderStats {
    pub user_id: i64,
    pub orders: i64,
    pub total: f64,
}

impl crate::db::inline::FromSqlite for OrderStats {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(OrderStats {
            user_id: row.get("user_id")?,
            orders: row.get("orders")?,
            total: row.get("total")?,
        })
    }
}

/// Every user's orders as the orders service holds them, up to and including
/// event `through`: what the users service starts again from when the orders
/// service no longer holds events it has not applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OrderTotals {
    /// The last event these totals include; later ones are not in them.
    pub through: i64,
    /// One entry per user with orders, in `user_id` order.
    pub users: Vec<OrderStats>,
}

/// How [`Domain::apply_order_created`] knows an event it has applied before.
#[derive(Debug, Clone, Copy)]
pub enum Applied<'a> {
    /// By its key, recorded for `consumer`: for messages that may come in any
    /// order. The keys are kept until [`Domain::keys_to_positions`]; prism's
    /// own consumers record them only while taking over what a build before
    /// ordered delivery left.
    Key { consumer: &'a str, key: &'a str },
    /// By its id in an ordered stream: applied if past the stream's stored
    /// position, which moves to it in the same transaction. Nothing is kept
    /// per event.
    Position { stream: &'a str, id: i64 },
}

/// An `order.created` from another service, for [`Domain::apply_orders_created`].
#[derive(Debug, Clone, Copy)]
pub struct OrderCreated<'a> {
    pub once: Applied<'a>,
    pub user_id: i64,
    pub total: f64,
}

/// Rows per statement when the statistics are written again: three values
/// each, well inside either database's limit on bound values.
const STATS_ROWS_PER_INSERT: usize = 500;

impl Domain {
    /// Where `consumer` is in its stream (0 before the first event).
    pub async fn offset(&self, consumer: &str) -> Result<i64> {
        let v: Option<(i64,)> = fetch_optional!(
            &self.db,
            "SELECT last_id FROM event_offsets WHERE consumer = $1",
            consumer.to_owned()
        );
        Ok(v.map_or(0, |(v,)| v))
    }

    pub async fn set_offset(&self, consumer: &str, last_id: i64) -> Result<()> {
        let mut tx = self.db.begin().await?;
        upsert_offset(&mut tx, consumer, last_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies one `order.created` from another service, at most once:
    /// returns whether it was new. See [`Applied`] for how a repeat is known.
    pub async fn apply_order_created(
        &self,
        once: Applied<'_>,
        user_id: i64,
        total: f64,
    ) -> Result<bool> {
        let event = OrderCreated {
            once,
            user_id,
            total,
        };
        Ok(self.apply_orders_created(&[event], None).await? == 1)
    }

    /// Applies `events` in order, each at most once, in one transaction, and
    /// moves `through`'s stream position to its id with them (where a
    /// consumer starts again: past every message it was handed, applied or
    /// not). Returns how many were new.
    pub async fn apply_orders_created(
        &self,
        events: &[OrderCreated<'_>],
        through: Option<(&str, i64)>,
    ) -> Result<usize> {
        let mut tx = self.db.begin().await?;
        let mut applied = 0;
        for event in events {
            // A batch is hundreds of statements, each run on this async
            // worker on SQLite: others get a turn in between.
            tokio::task::consume_budget().await;
            let fresh = match event.once {
                Applied::Key { consumer, key } => {
                    tx_execute!(
                        &mut tx,
                        "INSERT INTO processed_events (consumer, event_key) VALUES ($1, $2) \
                         ON CONFLICT DO NOTHING",
                        consumer,
                        key
                    )? == 1
                }
                Applied::Position { stream, id } => advance_offset(&mut tx, stream, id).await?,
            };
            if !fresh {
                continue;
            }
            tx_execute!(
                &mut tx,
                "INSERT INTO user_order_stats (user_id, orders, total) VALUES ($1, 1, $2) \
                 ON CONFLICT (user_id) DO UPDATE SET orders = user_order_stats.orders + 1, \
                 total = user_order_stats.total + excluded.total",
                event.user_id,
                event.total
            )?;
            applied += 1;
        }
        if let Some((stream, id)) = through {
            advance_offset(&mut tx, stream, id).await?;
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// The orders service's [`OrderTotals`]. While they are summed no order
    /// can commit (on PostgreSQL, writers queue behind [`events::hold_ids`]),
    /// so the totals and `through` describe the same moment.
    pub async fn order_totals(&self) -> Result<OrderTotals> {
        let mut tx = self.db.begin().await?;
        events::hold_ids(&mut tx).await?;
        // Every order: on SQLite, on a blocking thread.
        let mut users: Vec<OrderStats> = tx_all!(
            blocking &mut tx,
            "SELECT user_id, COUNT(*) AS orders, SUM(total) AS total FROM orders \
             GROUP BY user_id ORDER BY user_id"
        )?;
        let through = events::last_issued(&mut tx).await?;
        tx.commit().await?;
        for u in &mut users {
            u.total = to_cents(u.total);
        }
        Ok(OrderTotals { through, users })
    }

    /// Replaces every user's order statistics with `totals` and moves
    /// `position` to `totals.through`, in one transaction: the users
    /// service's way back after missing events it can no longer get.
    pub async fn restore_order_stats(&self, position: &str, totals: &OrderTotals) -> Result<()> {
        let mut tx = self.db.begin().await?;
        tx_execute!(blocking &mut tx, "DELETE FROM user_order_stats")?;
        for chunk in totals.users.chunks(STATS_ROWS_PER_INSERT) {
            let rows = (0..chunk.len())
                .map(|i| format!("({})", placeholders(3 * i + 1, 3)))
                .collect::<Vec<_>>()
                .join(", ");
            let sql =
                format!("INSERT INTO user_order_stats (user_id, orders, total) VALUES {rows}");
            // Only placeholders are spliced in; the values are bound.
            match &mut tx {
                Tx::Sqlite(t) => {
                    let args: Vec<_> = chunk
                        .iter()
                        .flat_map(|s| sqlite_args!(s.user_id, s.orders, s.total))
                        .collect();
                    t.blocking(move |c| c.execute(&sql, rusqlite::params_from_iter(args)))
                        .await?;
                }
                Tx::Postgres(t) => {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
                    for s in chunk {
                        q = q.bind(s.user_id).bind(s.orders).bind(s.total);
                    }
                    q.execute(&mut **t).await?;
                }
            }
        }
        upsert_offset(&mut tx, position, totals.through).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether `consumer` has keys recorded by [`Applied::Key`].
    pub async fn has_applied_keys(&self, consumer: &str) -> Result<bool> {
        let any: Option<(i32,)> = fetch_optional!(
            &self.db,
            "SELECT 1 FROM processed_events WHERE consumer = $1 LIMIT 1",
            consumer.to_owned()
        );
        Ok(any.is_some())
    }

    /// Turns `consumer`'s recorded keys into stream positions, in one
    /// transaction: each stream `position_of` names for a key moves to the
    /// highest id among its keys (never back), and the keys are deleted. Keys
    /// it names no stream for are dropped. For a consumer whose stream now
    /// arrives in order, so that a position says all an id set said.
    pub async fn keys_to_positions(
        &self,
        consumer: &str,
        position_of: impl Fn(&str) -> Option<(String, i64)>,
    ) -> Result<()> {
        let mut tx = self.db.begin().await?;
        let mut highest: HashMap<String, i64> = HashMap::new();
        // One key per event the consumer ever applied: on SQLite, read on a
        // blocking thread.
        let keys: Vec<(String,)> = tx_all!(
            blocking &mut tx,
            "SELECT event_key FROM processed_events WHERE consumer = $1",
            consumer.to_owned()
        )?;
        for (key,) in keys {
            if let Some((stream, id)) = position_of(&key) {
                let top = highest.entry(stream).or_insert(id);
                *top = (*top).max(id);
            }
        }
        for (stream, id) in &highest {
            advance_offset(&mut tx, stream, *id).await?;
        }
        tx_execute!(
            blocking &mut tx,
            "DELETE FROM processed_events WHERE consumer = $1",
            consumer.to_owned()
        )?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn order_stats(&self, user_id: i64) -> Result<OrderStats> {
        let row: Option<(i64, f64)> = fetch_optional!(
            &self.db,
            "SELECT orders, total FROM user_order_stats WHERE user_id = $1",
            user_id
        );
        let (orders, total) = row.unwrap_or((0, 0.0));
        Ok(OrderStats {
            user_id,
            orders,
            total: to_cents(total),
        })
    }

    /// A random id of this database, made on first use: relays name events
    /// `<origin>:<id>`, so whichever process relays an event, the broker sees
    /// the same message id and drops duplicates.
    pub async fn origin(&self) -> Result<i64> {
        const ORIGIN: &str = "SELECT value FROM prism_meta WHERE key = 'origin'";
        let existing: Option<(i64,)> = fetch_optional!(&self.db, ORIGIN);
        if let Some((v,)) = existing {
            return Ok(v);
        }
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        let candidate = (i64::from_le_bytes(b) & i64::MAX).max(1);
        let mut tx = self.db.begin().await?;
        tx_execute!(
            &mut tx,
            "INSERT INTO prism_meta (key, value) VALUES ('origin', $1) ON CONFLICT (key) DO NOTHING",
            candidate
        )?;
        tx.commit().await?;
        let v: Option<(i64,)> = fetch_optional!(&self.db, ORIGIN);
        v.map(|(v,)| v)
            .ok_or_else(|| Error::internal("the origin row vanished after it was written"))
    }
}

/// A sum of amounts as an amount: floating-point sums of cents drift.
fn to_cents(total: f64) -> f64 {
    (total * 100.0).round() / 100.0
}

/// Moves `stream`'s position to `id` if it is not there or past it yet, and
/// says whether it moved. A row lock orders two appliers of one stream
/// (instances sharing a database): the later one finds the position already
/// at its event.
async fn advance_offset(tx: &mut Tx, stream: &str, id: i64) -> Result<bool> {
    let moved = tx_execute!(
        tx,
        "INSERT INTO event_offsets (consumer, last_id) VALUES ($1, $2) \
         ON CONFLICT (consumer) DO UPDATE SET last_id = excluded.last_id \
         WHERE event_offsets.last_id < excluded.last_id",
        stream,
        id
    )?;
    Ok(moved == 1)
}

async fn upsert_offset(tx: &mut Tx, consumer: &str, last_id: i64) -> Result<()> {
    tx_execute!(
        tx,
        "INSERT INTO event_offsets (consumer, last_id) VALUES ($1, $2) \
         ON CONFLICT (consumer) DO UPDATE SET last_id = excluded.last_id",
        consumer,
        last_id
    )?;
    Ok(())
}
