//! Background tasks: real jobs over the data whose state and progress live in
//! the database (`tasks`) and whose progress is announced on the event log
//! (`task.progress`, `task.completed`, `task.failed`), so `/progress/{id}`
//! can be watched from any instance, and resumed after a reconnect.
//!
//! The one kind today is `report`: a summary of users, posts, comments and
//! orders, computed page by page (progress after each page). A task that was
//! running when the process stopped is run again from the start at the next
//! start-up ([`Domain::unfinished_tasks`]); the report is idempotent.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;

use super::{Domain, Page};
use crate::{
    auth::Principal,
    db,
    db::inline::{FromSqlite, timestamp},
    error::{Error, Result},
    fetch_all, fetch_optional,
};

/// Users summarised per step of a report.
const REPORT_PAGE: i64 = 25;

#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct Task {
    pub task_id: String,
    pub kind: String,
    /// `pending`, `running`, `completed` or `failed`.
    pub status: String,
    /// 0 to 100.
    pub progress: i32,
    /// The job's output once completed.
    #[schema(value_type = Object)]
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub updated_at: DateTime<Utc>,
}

#[derive(FromRow)]
struct TaskRow {
    id: String,
    kind: String,
    status: String,
    progress: i32,
    result: Option<String>,
    error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl FromSqlite for TaskRow {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(TaskRow {
            id: row.get("id")?,
            kind: row.get("kind")?,
            status: row.get("status")?,
            progress: row.get("progress")?,
            result: row.get("result")?,
            error: row.get("error")?,
            created_at: timestamp(row, "created_at")?,
            updated_at: timestamp(row, "updated_at")?,
        })
    }
}

impl From<TaskRow> for Task {
    fn from(r: TaskRow) -> Task {
        Task {
            task_id: r.id,
            kind: r.kind,
            status: r.status,
            progress: r.progress,
            result: r.result.and_then(|s| serde_json::from_str(&s).ok()),
            error: r.error,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// What a client asks for (`POST /tasks`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewTask {
    /// The job to run; `report` is the one kind.
    pub kind: String,
}

/// The events a task announces, as stored in the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskEvent {
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl Domain {
    /// Records a new task; the caller starts it with [`Domain::run_task`].
    pub async fn create_task(&self, by: &Principal, new: NewTask) -> Result<Task> {
        if new.kind != "report" {
            return Err(Error::invalid("kind", "enum", "Input should be 'report'"));
        }
        let now = db::now();
        let task = Task {
            task_id: uuid::Uuid::new_v4().to_string(),
            kind: new.kind,
            status: "pending".into(),
            progress: 0,
            result: None,
            error: None,
            created_at: now,
            updated_at: now,
        };
        self.events
            .change(
                "INSERT INTO tasks (id, kind, status, progress, created_by, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6)",
                &[
                    &task.task_id,
                    &task.kind,
                    &task.status,
                    &task.progress,
                    &by.user_id,
                    &now,
                ],
                "task.created",
                &TaskEvent {
                    task_id: task.task_id.clone(),
                    progress: Some(0),
                    status: Some(task.status.clone()),
                },
                Error::from,
            )
            .await?;
        Ok(task)
    }

    pub async fn get_task(&self, id: &str) -> Result<Task> {
        let row: Option<TaskRow> = fetch_optional!(
            &self.db,
            "SELECT id, kind, status, progress, result, error, created_at, updated_at FROM tasks WHERE id = $1",
            id.to_owned()
        );
        row.map(Task::from)
            .ok_or_else(|| Error::NotFound("Task not found".into()))
    }

    /// Tasks that were pending or running when the process last stopped.
    pub async fn unfinished_tasks(&self) -> Result<Vec<String>> {
        let ids: Vec<(String,)> = fetch_all!(
            &self.db,
            "SELECT id FROM tasks WHERE status IN ('pending', 'running') ORDER BY created_at"
        );
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// Runs a task to the end, recording progress; failures are recorded on
    /// the task rather than returned.
    pub async fn run_task(&self, id: &str) {
        if let Err(e) = self.run_report(id).await {
            tracing::error!(task_id = id, error = %e, "task failed");
            let _ = self.finish_task(id, Err(e.to_string())).await;
        }
    }

    async fn run_report(&self, id: &str) -> Result<()> {
        self.set_progress(id, "running", 0).await?;
        let users = self.count_users().await?;
        let mut summary = Report::default();
        let mut offset = 0;
        loop {
            let page = self
                .list_users(Page {
                    limit: REPORT_PAGE,
                    offset,
                })
                .await?;
            if page.is_empty() {
                break;
            }
            let ids: Vec<i64> = page.iter().map(|u| u.id).collect();
            let posts = self.posts_by_authors(&ids).await?;
            let author_of: std::collections::HashMap<i64, i64> =
                posts.iter().map(|p| (p.id, p.author_id)).collect();
            let post_ids: Vec<i64> = posts.iter().map(|p| p.id).collect();
            let comments = self.comments_by_posts(&post_ids).await?;
            let orders = self.orders_by_users(&ids).await?;
            for user in &page {
                let authored = posts.iter().filter(|p| p.author_id == user.id).count();
                let received = comments
                    .iter()
                    .filter(|c| author_of.get(&c.post_id) == Some(&user.id))
                    .count();
                let mine: Vec<_> = orders.iter().filter(|o| o.user_id == user.id).collect();
                // Not `sum()`: a float sum of nothing is -0.0, which a user
                // without orders would be shown as having spent.
                let spent = mine.iter().fold(0.0, |a, o| a + o.total);
                for o in &mine {
                    *summary
                        .orders_by_status
                        .entry(o.status.as_str().to_owned())
                        .or_default() += 1;
                }
                summary.users += 1;
                summary.posts += authored;
                summary.comments += received;
                summary.orders += mine.len();
                summary.revenue += spent;
                summary.per_user.push(UserLine {
                    user_id: user.id,
                    name: user.name.clone(),
                    posts: authored,
                    comments_received: received,
                    orders: mine.len(),
                    spent: (spent * 100.0).round() / 100.0,
                });
            }
            offset += REPORT_PAGE;
            let done = offset.min(users.max(1));
            let progress = ((done * 100) / users.max(1)).clamp(0, 99) as i32;
            self.set_progress(id, "running", progress).await?;
        }
        summary.revenue = (summary.revenue * 100.0).round() / 100.0;
        summary
            .per_user
            .sort_by(|a, b| b.posts.cmp(&a.posts).then(a.user_id.cmp(&b.user_id)));
        self.finish_task(
            id,
            Ok(serde_json::to_value(&summary).map_err(Error::internal)?),
        )
        .await
    }

    async fn set_progress(&self, id: &str, status: &str, progress: i32) -> Result<()> {
        self.events
            .change(
                "UPDATE tasks SET status = $1, progress = $2, updated_at = $3 WHERE id = $4",
                &[&status, &progress, &db::now(), &id],
                "task.progress",
                &TaskEvent {
                    task_id: id.to_owned(),
                    progress: Some(progress),
                    status: None,
                },
                Error::from,
            )
            .await?;
        Ok(())
    }

    async fn finish_task(
        &self,
        id: &str,
        outcome: std::result::Result<serde_json::Value, String>,
    ) -> Result<()> {
        let (status, progress, result, error) = match outcome {
            Ok(v) => ("completed", 100, Some(v.to_string()), None),
            Err(e) => ("failed", 100, None, Some(e)),
        };
        self.events
            .change(
                "UPDATE tasks SET status = $1, progress = $2, result = $3, error = $4, \
                 updated_at = $5 WHERE id = $6",
                &[&status, &progress, &result, &error, &db::now(), &id],
                &format!("task.{status}"),
                &TaskEvent {
                    task_id: id.to_owned(),
                    progress: Some(progress),
                    status: Some(status.to_owned()),
                },
                Error::from,
            )
            .await?;
        Ok(())
    }
}

#[derive(Debug, Default, Serialize)]
struct Report {
    users: usize,
    posts: usize,
    comments: usize,
    orders: usize,
    revenue: f64,
    orders_by_status: BTreeMap<String, usize>,
    per_user: Vec<UserLine>,
}

#[derive(Debug, Serialize)]
struct UserLine {
    user_id: i64,
    name: String,
    posts: usize,
    comments_received: usize,
    orders: usize,
    spent: f64,
}
