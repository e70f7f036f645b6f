//! Posts and their comments. A non-admin writes posts and comments only as
//! themselves, and updates or deletes only their own posts.

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
    error::{Error, Result},
    events, fetch_all, fetch_optional, tx_optional,
};

#[derive(Debug, Clone, Serialize, Deserialize, FromRow, ToSchema, PartialEq)]
pub struct Post {
    pub id: i64,
    pub title: String,
    pub content: String,
    pub author_id: i64,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, FromRow, ToSchema, PartialEq)]
pub struct Comment {
    pub id: i64,
    pub content: String,
    pub post_id: i64,
    pub user_id: i64,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
}

impl FromSqlite for Post {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Post {
            id: row.get("id")?,
            title: row.get("title")?,
            content: row.get("content")?,
            author_id: row.get("author_id")?,
            created_at: timestamp(row, "created_at")?,
            updated_at: timestamp(row, "updated_at")?,
        })
    }
}

impl FromSqlite for Comment {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Comment {
            id: row.get("id")?,
            content: row.get("content")?,
            post_id: row.get("post_id")?,
            user_id: row.get("user_id")?,
            created_at: timestamp(row, "created_at")?,
        })
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewPost {
    pub title: String,
    pub content: String,
    /// Defaults to the caller.
    #[serde(default, deserialize_with = "crate::domain::validate::whole_number")]
    pub author_id: Option<i64>,
}

/// A partial update: absent fields keep their value.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct PostPatch {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub content: Option<String>,
}

fn check_title(c: &mut Check, title: &str) {
    c.length("title", title, limits::TITLE.0, limits::TITLE.1);
}

fn check_content(c: &mut Check, content: &str) {
    c.length("content", content, limits::CONTENT.0, limits::CONTENT.1);
}

impl Domain {
    pub async fn list_posts(&self, author_id: Option<i64>, page: Page) -> Result<Vec<Post>> {
        Ok(match author_id {
            Some(author) => fetch_all!(
                &self.db,
                "SELECT id, title, content, author_id, created_at, updated_at FROM posts \
                 WHERE author_id = $1 ORDER BY id LIMIT $2 OFFSET $3",
                author,
                page.limit,
                page.offset,
            ),
            None => fetch_all!(
                &self.db,
                "SELECT id, title, content, author_id, created_at, updated_at FROM posts \
                 ORDER BY id LIMIT $1 OFFSET $2",
                page.limit,
                page.offset,
            ),
        })
    }

    /// A user's posts; 404 when the user does not exist.
    pub async fn posts_of_user(&self, user_id: i64, page: Page) -> Result<Vec<Post>> {
        self.get_user(user_id).await?;
        self.list_posts(Some(user_id), page).await
    }

    pub async fn get_post(&self, id: i64) -> Result<Post> {
        let post: Option<Post> = fetch_optional!(
            &self.db,
            "SELECT id, title, content, author_id, created_at, updated_at FROM posts WHERE id = $1",
            id,
        );
        post.ok_or_else(|| Error::NotFound("Post not found".into()))
    }

    /// Posts whose title or content contains `query`, ignoring case.
    pub async fn search_posts(&self, query: &str, page: Page) -> Result<Vec<Post>> {
        // LIKE metacharacters in the query match themselves.
        let escaped = query
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        let pattern = format!("%{escaped}%");
        // A scan of every post: past the inline budget it finishes on a
        // blocking thread (`db::inline`).
        Ok(fetch_all!(
            &self.db,
            "SELECT id, title, content, author_id, created_at, updated_at FROM posts \
             WHERE LOWER(title) LIKE $1 ESCAPE '\\' OR LOWER(content) LIKE $1 ESCAPE '\\' \
             ORDER BY id LIMIT $2 OFFSET $3",
            pattern,
            page.limit,
            page.offset,
        ))
    }

    pub async fn create_post(&self, by: &Principal, new: NewPost) -> Result<Post> {
        let author_id = new.author_id.unwrap_or(by.user_id);
        let mut c = Check::new();
        check_title(&mut c, &new.title);
        check_content(&mut c, &new.content);
        c.finish()?;
        by.ensure_self_or_admin(author_id, "create posts as yourself")?;
        let now = db::now();
        let post = Post {
            id: 0,
            title: new.title.clone(),
            content: new.content.clone(),
            author_id,
            created_at: now,
            updated_at: now,
        };
        self.events
            .insert(
                "INSERT INTO posts (title, content, author_id, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4)",
                &[&new.title, &new.content, &author_id, &now],
                "post.created",
                post,
                |e| missing_reference(e, "author_id", "Author"),
            )
            .await
    }

    /// Changes the fields present in `patch`. Only the author or an admin.
    pub async fn update_post(&self, by: &Principal, id: i64, patch: PostPatch) -> Result<Post> {
        let mut c = Check::new();
        if let Some(t) = &patch.title {
            check_title(&mut c, t);
        }
        if let Some(t) = &patch.content {
            check_content(&mut c, t);
        }
        c.finish()?;
        let current = self.get_post(id).await?;
        by.ensure_self_or_admin(current.author_id, "change your own posts")?;
        let title = patch.title.as_ref().unwrap_or(&current.title);
        let content = patch.content.as_ref().unwrap_or(&current.content);
        if *title == current.title && *content == current.content {
            // Nothing to write: no new updated_at, no post.updated for every
            // subscriber to receive.
            return Ok(current);
        }
        let post = Post {
            id,
            title: title.clone(),
            content: content.clone(),
            author_id: current.author_id,
            created_at: current.created_at,
            updated_at: db::now(),
        };
        // The event is the post as read and patched, so the write matches
        // only while the post is still as read: one statement on PostgreSQL.
        let changed = self
            .events
            .change(
                "UPDATE posts SET title = $1, content = $2, updated_at = $3 \
                 WHERE id = $4 AND title = $5 AND content = $6",
                &[
                    &post.title,
                    &post.content,
                    &post.updated_at,
                    &id,
                    &current.title,
                    &current.content,
                ],
                "post.updated",
                &post,
                Error::from,
            )
            .await?;
        if changed > 0 {
            return Ok(post);
        }
        // Another write got in between. Patch the post as it is now, under
        // its row lock, and announce it as the database returns it.
        let mut tx = self.db.begin().await?;
        let post: Option<Post> = tx_optional!(
            &mut tx,
            "UPDATE posts SET title = COALESCE($1, title), content = COALESCE($2, content), \
             updated_at = $3 WHERE id = $4 \
             RETURNING id, title, content, author_id, created_at, updated_at",
            patch.title,
            patch.content,
            db::now(),
            id
        )?;
        let post = post.ok_or_else(|| Error::NotFound("Post not found".into()))?;
        events::append(&mut tx, "post.updated", &post).await?;
        tx.commit().await?;
        self.events.committed();
        Ok(post)
    }

    /// Deletes a post and its comments. Only the author or an admin.
    pub async fn delete_post(&self, by: &Principal, id: i64) -> Result<()> {
        let current = self.get_post(id).await?;
        by.ensure_self_or_admin(current.author_id, "delete your own posts")?;
        // A post's author never changes, so the one read is the one deleted.
        let deleted = self
            .events
            .change(
                "DELETE FROM posts WHERE id = $1",
                &[&id],
                "post.deleted",
                &serde_json::json!({"id": id, "author_id": current.author_id}),
                Error::from,
            )
            .await?;
        if deleted == 0 {
            return Err(Error::NotFound("Post not found".into()));
        }
        Ok(())
    }

    /// The posts of each of `author_ids`, in id order.
    pub async fn posts_by_authors(&self, author_ids: &[i64]) -> Result<Vec<Post>> {
        self.rows_by_ids(
            "SELECT id, title, content, author_id, created_at, updated_at FROM posts \
             WHERE author_id IN ({ids}) ORDER BY id",
            author_ids,
        )
        .await
    }

    /// The comments on each of `post_ids`, in id order.
    pub async fn comments_by_posts(&self, post_ids: &[i64]) -> Result<Vec<Comment>> {
        self.rows_by_ids(
            "SELECT id, content, post_id, user_id, created_at FROM comments \
             WHERE post_id IN ({ids}) ORDER BY id",
            post_ids,
        )
        .await
    }

    pub async fn comments_of_post(&self, post_id: i64) -> Result<Vec<Comment>> {
        self.get_post(post_id).await?;
        Ok(fetch_all!(
            &self.db,
            "SELECT id, content, post_id, user_id, created_at FROM comments \
             WHERE post_id = $1 ORDER BY id",
            post_id,
        ))
    }

    /// Comments on a post, as `user_id` (the caller unless an admin says otherwise).
    pub async fn create_comment(
        &self,
        by: &Principal,
        post_id: i64,
        content: &str,
        user_id: Option<i64>,
    ) -> Result<Comment> {
        let user_id = user_id.unwrap_or(by.user_id);
        let mut c = Check::new();
        check_content(&mut c, content);
        c.finish()?;
        by.ensure_self_or_admin(user_id, "comment as yourself")?;
        self.get_post(post_id).await?;
        let now = db::now();
        let comment = Comment {
            id: 0,
            content: content.to_owned(),
            post_id,
            user_id,
            created_at: now,
        };
        self.events
            .insert(
                "INSERT INTO comments (content, post_id, user_id, created_at) VALUES ($1, $2, $3, $4)",
                &[&content, &post_id, &user_id, &now],
                "comment.created",
                comment,
                |e| missing_reference(e, "user_id", "User or post"),
            )
            .await
    }
}
