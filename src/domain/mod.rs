//! The domain: users, posts, comments, messages, products and orders, their
//! rules and their SQL. Every protocol adapter calls these functions and
//! nothing else touches the tables, so a rule is written once.
//!
//! Each write commits its event to the log with it (`EventLog::insert`,
//! `EventLog::change`), then wakes the event pump; reads of hot single
//! entities go through an in-process cache that the pump keeps coherent (it
//! drops an entry when any process records a change to it).

pub mod cache;
pub mod consumers;
pub mod messages;
pub mod orders;
pub mod posts;
pub mod products;
pub mod tasks;
pub mod timestamp;
pub mod users;
pub mod validate;

use std::sync::Arc;

use crate::{
    db::Db,
    error::{Error, Result},
    events::EventLog,
};

pub use cache::Cache;
pub use messages::{Broadcast, Message};
pub use orders::{NewOrder, Order, OrderStatus};
pub use posts::{Comment, NewPost, Post, PostPatch};
pub use products::{Category, NewProduct, Price, Product};
pub use tasks::{NewTask, Task, TaskEvent};
pub use users::{NewUser, Registration, User};

/// Items a list returns when the client names no `limit`.
pub const DEFAULT_LIMIT: i64 = 100;
/// The largest `limit` honoured; larger ones are capped.
pub const MAX_LIMIT: i64 = 1000;

/// A window into an id-ordered list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

impl Page {
    /// Applies the list rules of SPEC §2: default 100, capped at 1000, no negatives.
    pub fn new(limit: Option<i64>, offset: Option<i64>) -> Result<Page> {
        let mut errors = Vec::new();
        if limit.is_some_and(|l| l < 0) {
            errors.push(validate::ge_error("limit", 0));
        }
        if offset.is_some_and(|o| o < 0) {
            errors.push(validate::ge_error("offset", 0));
        }
        if !errors.is_empty() {
            return Err(Error::Validation(errors));
        }
        Ok(Page {
            limit: limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
            offset: offset.unwrap_or(0),
        })
    }

    /// 1-based page numbers as in the seed's catalogue: `page < 1` is page 1,
    /// `page_size` 0 or absent is 20, capped at 100.
    pub fn numbered(page: Option<i64>, page_size: Option<i64>) -> (Page, i64, i64) {
        let page = page.unwrap_or(1).max(1);
        let size = match page_size.unwrap_or(0) {
            s if s <= 0 => 20,
            s => s.min(100),
        };
        (
            Page {
                limit: size,
                offset: (page - 1).saturating_mul(size),
            },
            page,
            size,
        )
    }
}

impl Default for Page {
    fn default() -> Self {
        Page {
            limit: DEFAULT_LIMIT,
            offset: 0,
        }
    }
}

/// The domain service: one per process, shared by every protocol. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Domain {
    pub(crate) db: Db,
    pub(crate) events: EventLog,
    pub(crate) users_cache: Arc<Cache<User>>,
    pub(crate) products_cache: Arc<Cache<Product>>,
    /// Orders are never changed or deleted once placed, so a cached one
    /// cannot go stale; `order.*` events still invalidate, should that change.
    pub(crate) orders_cache: Arc<Cache<Order>>,
}

impl Domain {
    /// Wires the domain to its database and event log, and registers the cache
    /// invalidation that keeps cached entities fresh across processes.
    pub fn new(db: Db, events: EventLog, cache_capacity: usize) -> Domain {
        let users_cache = Arc::new(Cache::new(cache_capacity));
        let products_cache = Arc::new(Cache::new(cache_capacity));
        let orders_cache = Arc::new(Cache::new(cache_capacity));
        {
            let users = users_cache.clone();
            let products = products_cache.clone();
            let orders = orders_cache.clone();
            events.on_event(move |event| {
                #[derive(serde::Deserialize)]
                struct Id {
                    id: i64,
                }
                let id = || event.payload_as::<Id>().map(|i| i.id);
                if event.kind.starts_with("user.") {
                    users.invalidate_by(id);
                } else if event.kind.starts_with("product.") {
                    products.invalidate_by(id);
                } else if event.kind.starts_with("order.") {
                    // Order events name the order `order_id`.
                    #[derive(serde::Deserialize)]
                    struct OrderId {
                        order_id: i64,
                    }
                    orders.invalidate_by(|| event.payload_as::<OrderId>().map(|o| o.order_id));
                }
            });
        }
        Domain {
            db,
            events,
            users_cache,
            products_cache,
            orders_cache,
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Entities held by the read caches.
    pub fn cache_size(&self) -> usize {
        self.users_cache.len() + self.products_cache.len() + self.orders_cache.len()
    }

    /// Rows whose `column` is one of `ids`, for `select` (a statement ending
    /// in `WHERE {column} IN ({ids})`, with `{ids}` filled in here), one query
    /// per [`db::MAX_IN_LIST`] ids: the batch loads behind GraphQL's nested
    /// fields and the report tasks.
    pub(crate) async fn rows_by_ids<T>(&self, select: &str, ids: &[i64]) -> Result<Vec<T>>
    where
        T: Send
            + Unpin
            + 'static
            + crate::db::inline::FromSqlite
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        let mut out = Vec::new();
        for chunk in ids.chunks(crate::db::MAX_IN_LIST) {
            let sql = select.replace("{ids}", &crate::db::placeholders(1, chunk.len()));
            self.db.count_read();
            let rows: Vec<T> = match &self.db.pools {
                crate::db::Pools::Sqlite { inline, .. } => {
                    inline.all_built(sql, chunk.to_vec()).await?
                }
                crate::db::Pools::Postgres { read, .. } => {
                    let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    q.fetch_all(&mut *read.acquire().await?).await?
                }
            };
            out.extend(rows);
        }
        Ok(out)
    }
}

/// Turns "the referenced user or post does not exist" into a validation error on
/// the field that named it.
pub(crate) fn missing_reference(e: sqlx::Error, field: &str, what: &str) -> Error {
    if crate::db::is_foreign_key_violation(&e) {
        Error::invalid(field, "value_error", format!("{what} does not exist"))
    } else {
        e.into()
    }
}

/// Rows whose event is the row itself, its id first ([`crate::events::Inserted`]).
macro_rules! inserted_as_themselves {
    ($($row:ty),*) => {$(
        impl crate::events::Inserted for $row {
            fn set_id(&mut self, id: i64) {
                self.id = id;
            }
        }
    )*};
}

inserted_as_themselves!(
    users::User,
    posts::Post,
    posts::Comment,
    messages::Message,
    products::Product
);
