//! Chat messages. A non-admin sends messages only as themselves.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;

use super::{
    Domain, Page, missing_reference,
    validate::{Check, limits},
};
use crate::{
    auth::Principal,
    db,
    db::inline::{FromSqlite, timestamp},
    error::Result,
    fetch_all,
};

#[derive(Debug, Clone, Serialize, Deserialize, FromRow, ToSchema, PartialEq)]
pub struct Message {
    pub id: i64,
    pub content: String,
    pub user_id: i64,
    /// When the message was sent (ISO-8601).
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub timestamp: DateTime<Utc>,
}

impl FromSqlite for Message {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Message {
            id: row.get("id")?,
            content: row.get("content")?,
            user_id: row.get("user_id")?,
            timestamp: timestamp(row, "timestamp")?,
        })
    }
}

impl Domain {
    pub async fn list_messages(&self, user_id: Option<i64>, page: Page) -> Result<Vec<Message>> {
        Ok(match user_id {
            Some(user) => fetch_all!(
                &self.db,
                "SELECT id, content, user_id, timestamp FROM messages WHERE user_id = $1 \
                 ORDER BY id LIMIT $2 OFFSET $3",
                user,
                page.limit,
                page.offset,
            ),
            None => fetch_all!(
                &self.db,
                "SELECT id, content, user_id, timestamp FROM messages ORDER BY id LIMIT $1 OFFSET $2",
                page.limit,
                page.offset,
            ),
        })
    }

    /// Sends a message as `user_id` (the caller unless an admin says otherwise).
    pub async fn send_message(
        &self,
        by: &Principal,
        content: &str,
        user_id: Option<i64>,
    ) -> Result<Message> {
        let user_id = user_id.unwrap_or(by.user_id);
        Check::new()
            .length("content", content, limits::CONTENT.0, limits::CONTENT.1)
            .finish()?;
        by.ensure_self_or_admin(user_id, "send messages as yourself")?;
        let now = db::now();
        let message = Message {
            id: 0,
            content: content.to_owned(),
            user_id,
            timestamp: now,
        };
        self.events
            .insert(
                "INSERT INTO messages (content, user_id, timestamp) VALUES ($1, $2, $3)",
                &[&content, &user_id, &now],
                "message.sent",
                message,
                |e| missing_reference(e, "user_id", "User"),
            )
            .await
    }
}

/// A pub/sub broadcast (`POST /broadcast`), as stored in the event log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Broadcast {
    pub message: String,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub timestamp: DateTime<Utc>,
}

impl Domain {
    /// Publishes a broadcast to every `/stream` subscriber. It is an event in
    /// the log like any other, so a subscriber that reconnects gets the ones
    /// it missed. Any signed-in user may broadcast.
    pub async fn broadcast(&self, _by: &Principal, message: &str) -> Result<(i64, Broadcast)> {
        Check::new()
            .length("message", message, limits::CONTENT.0, limits::CONTENT.1)
            .finish()?;
        let b = Broadcast {
            message: message.to_owned(),
            timestamp: Utc::now(),
        };
        let id = self.events.record("broadcast", &b).await?;
        Ok((id, b))
    }
}
