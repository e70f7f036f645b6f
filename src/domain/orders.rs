//! Orders. A non-admin places orders only for themselves.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;

use super::{Domain, Page, validate::Check};
use crate::{
    auth::Principal,
    db,
    db::inline::{FromSqlite, timestamp},
    error::{Error, Result},
    events, fetch_all, fetch_optional,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    #[default]
    Pending,
    Completed,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Completed => "completed",
            OrderStatus::Cancelled => "cancelled",
        }
    }
}

impl TryFrom<String> for OrderStatus {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "pending" => Ok(OrderStatus::Pending),
            "completed" => Ok(OrderStatus::Completed),
            "cancelled" => Ok(OrderStatus::Cancelled),
            other => Err(format!("unknown order status {other:?}")),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, FromRow, ToSchema, PartialEq)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub total: f64,
    #[sqlx(try_from = "String")]
    pub status: OrderStatus,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
}

impl FromSqlite for Order {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        let status: String = row.get("status")?;
        Ok(Order {
            id: row.get("id")?,
            user_id: row.get("user_id")?,
            total: row.get("total")?,
            status: OrderStatus::try_from(status).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
            })?,
            created_at: timestamp(row, "created_at")?,
        })
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewOrder {
    /// Defaults to the caller.
    #[serde(default, deserialize_with = "crate::domain::validate::whole_number")]
    pub user_id: Option<i64>,
    pub total: f64,
    #[serde(default)]
    pub status: Option<OrderStatus>,
}

impl NewOrder {
    /// The rules every way of placing an order shares: a total of at least 0,
    /// orders for oneself only, and a status other than `pending` (an order
    /// placed as already completed or cancelled) for an admin only. Gives the
    /// order's user and status.
    pub fn check(&self, by: &Principal) -> Result<(i64, OrderStatus)> {
        let user_id = self.user_id.unwrap_or(by.user_id);
        Check::new().non_negative("total", self.total).finish()?;
        by.ensure_self_or_admin(user_id, "place orders for yourself")?;
        let status = self.status.unwrap_or_default();
        if status != OrderStatus::Pending && !by.is_admin() {
            return Err(Error::Forbidden(
                "Only an admin may place an order that is not pending".into(),
            ));
        }
        Ok((user_id, status))
    }
}

impl Domain {
    pub async fn list_orders(&self, user_id: Option<i64>, page: Page) -> Result<Vec<Order>> {
        Ok(match user_id {
            Some(user) => fetch_all!(
                &self.db,
                "SELECT id, user_id, total, status, created_at FROM orders WHERE user_id = $1 \
                 ORDER BY id LIMIT $2 OFFSET $3",
                user,
                page.limit,
                page.offset,
            ),
            None => fetch_all!(
                &self.db,
                "SELECT id, user_id, total, status, created_at FROM orders ORDER BY id LIMIT $1 OFFSET $2",
                page.limit,
                page.offset,
            ),
        })
    }

    /// The orders of each of `user_ids`, in id order.
    pub async fn orders_by_users(&self, user_ids: &[i64]) -> Result<Vec<Order>> {
        self.rows_by_ids(
            "SELECT id, user_id, total, status, created_at FROM orders \
             WHERE user_id IN ({ids}) ORDER BY id",
            user_ids,
        )
        .await
    }

    pub async fn get_order(&self, id: i64) -> Result<Order> {
        if let Some(order) = self.orders_cache.get(id) {
            return Ok(Order::clone(&order));
        }
        let generation = self.orders_cache.generation();
        let order: Option<Order> = fetch_optional!(
            &self.db,
            "SELECT id, user_id, total, status, created_at FROM orders WHERE id = $1",
            id,
        );
        let order = order.ok_or_else(|| Error::NotFound("Order not found".into()))?;
        self.orders_cache
            .put(id, Arc::new(order.clone()), generation);
        Ok(order)
    }

    /// Places an order. The user must exist here (the orders microservice checks
    /// with the users service instead, before calling this).
    pub async fn create_order(&self, by: &Principal, new: NewOrder) -> Result<Order> {
        let (user_id, status) = new.check(by)?;
        match self.get_user(user_id).await {
            Err(Error::NotFound(_)) => {
                return Err(Error::invalid(
                    "user_id",
                    "value_error",
                    "User does not exist",
                ));
            }
            other => other?,
        };
        self.insert_order(user_id, new.total, status).await
    }

    /// Records an order without checking its user: for callers that have
    /// checked already (the orders service asks the users service).
    pub async fn insert_order(
        &self,
        user_id: i64,
        total: f64,
        status: OrderStatus,
    ) -> Result<Order> {
        let now = db::now();
        let order = Order {
            id: 0,
            user_id,
            total,
            status,
            created_at: now,
        };
        self.events
            .insert(
                "INSERT INTO orders (user_id, total, status, created_at) VALUES ($1, $2, $3, $4)",
                &[&user_id, &total, &status.as_str(), &now],
                "order.created",
                order,
                Error::from,
            )
            .await
    }
}

impl events::Inserted for Order {
    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    /// Consumers (the users service's order counts, other systems through
    /// NATS) need only who ordered and how much.
    fn payload(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct OrderCreated {
            order_id: i64,
            user_id: i64,
            total: f64,
        }
        serde_json::to_string(&OrderCreated {
            order_id: self.id,
            user_id: self.user_id,
            total: self.total,
        })
    }
}
