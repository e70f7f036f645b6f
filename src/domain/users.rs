//! Users, their credentials and their friendships.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;

use super::{
    Domain, Page,
    validate::{Check, limits},
};
use crate::{
    auth::{self, Principal, Role},
    db,
    db::inline::{FromSqlite, timestamp},
    error::{Error, Result},
    fetch_all, fetch_optional,
};

/// A user of the system.
#[derive(Debug, Clone, Serialize, Deserialize, FromRow, ToSchema, PartialEq)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub age: Option<i32>,
    #[sqlx(try_from = "String")]
    pub role: Role,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
}

impl FromSqlite for User {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(User {
            id: row.get("id")?,
            name: row.get("name")?,
            email: row.get("email")?,
            age: row.get("age")?,
            role: Role::parse(row.get_ref("role")?.as_str()?),
            created_at: timestamp(row, "created_at")?,
        })
    }
}

impl From<String> for Role {
    fn from(s: String) -> Self {
        Role::parse(&s)
    }
}

/// What it takes to create a user without credentials (`POST /users/`, `createUser`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewUser {
    pub name: String,
    pub email: String,
    #[serde(default, deserialize_with = "crate::domain::validate::whole_number")]
    pub age: Option<i64>,
}

/// Self-service sign-up (`POST /auth/register`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct Registration {
    pub username: String,
    pub email: String,
    pub password: String,
}

/// Emails are compared and stored in lower case, so `Alice@Example.com` and
/// `alice@example.com` are one account.
fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

impl NewUser {
    fn validate(&self) -> Result<()> {
        let mut c = Check::new();
        c.length("name", &self.name, limits::NAME.0, limits::NAME.1)
            .email("email", self.email.trim());
        if let Some(age) = self.age {
            c.range("age", age, limits::AGE.0, limits::AGE.1);
        }
        c.finish()
    }
}

fn email_conflict(e: sqlx::Error) -> Error {
    if db::is_unique_violation(&e, "users_email_key", "users.email") {
        Error::Conflict("Email already registered".into())
    } else if db::is_unique_violation(&e, "users_username_key", "users.username") {
        Error::Conflict("Username already taken".into())
    } else {
        e.into()
    }
}

impl Domain {
    pub async fn list_users(&self, page: Page) -> Result<Vec<User>> {
        let sql = "SELECT id, name, email, age, role, created_at FROM users ORDER BY id LIMIT $1 OFFSET $2";
        Ok(fetch_all!(&self.db, sql, page.limit, page.offset))
    }

    /// A user by id, from the cache when possible.
    pub async fn get_user(&self, id: i64) -> Result<Arc<User>> {
        if let Some(user) = self.users_cache.get(id) {
            return Ok(user);
        }
        let generation = self.users_cache.generation();
        let sql = "SELECT id, name, email, age, role, created_at FROM users WHERE id = $1";
        let user: Option<User> = fetch_optional!(&self.db, sql, id);
        let user = Arc::new(user.ok_or_else(|| Error::NotFound("User not found".into()))?);
        self.users_cache.put(id, user.clone(), generation);
        Ok(user)
    }

    /// Users with the given ids (cache first, then one query for the rest);
    /// unknown ids are left out.
    pub async fn users_by_ids(&self, ids: &[i64]) -> Result<Vec<User>> {
        let mut found = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match self.users_cache.get(*id) {
                Some(u) => found.push((*u).clone()),
                None => missing.push(*id),
            }
        }
        if !missing.is_empty() {
            let generation = self.users_cache.generation();
            let rows: Vec<User> = self
                .rows_by_ids(
                    "SELECT id, name, email, age, role, created_at FROM users WHERE id IN ({ids})",
                    &missing,
                )
                .await?;
            for user in rows {
                self.users_cache
                    .put(user.id, Arc::new(user.clone()), generation);
                found.push(user);
            }
        }
        found.sort_by_key(|u| u.id);
        Ok(found)
    }

    /// The friends of each of `ids`, as `(user_id, friend)` pairs in friend id order.
    pub async fn friends_by_users(&self, ids: &[i64]) -> Result<Vec<(i64, User)>> {
        #[derive(FromRow)]
        struct Row {
            owner: i64,
            #[sqlx(flatten)]
            friend: User,
        }
        impl FromSqlite for Row {
            fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                Ok(Row {
                    owner: row.get("owner")?,
                    friend: User::from_sqlite(row)?,
                })
            }
        }
        let rows: Vec<Row> = self
            .rows_by_ids(
                "SELECT f.user_id AS owner, u.id, u.name, u.email, u.age, u.role, u.created_at \
                 FROM friendships f JOIN users u ON u.id = f.friend_id \
                 WHERE f.user_id IN ({ids}) ORDER BY u.id",
                ids,
            )
            .await?;
        Ok(rows.into_iter().map(|r| (r.owner, r.friend)).collect())
    }

    /// Creates a user without credentials. Any signed-in caller may do this.
    pub async fn create_user(&self, _by: &Principal, new: NewUser) -> Result<User> {
        new.validate()?;
        let email = normalise_email(&new.email);
        self.insert_user(&new.name, &email, new.age, Role::User, None, None)
            .await
    }

    /// Creates a user who can log in. The password is hashed off the async runtime.
    pub async fn register(&self, reg: Registration) -> Result<User> {
        let name = reg.username.clone();
        self.create_account(&name, None, reg, Role::User).await
    }

    /// Creates an account with credentials: the shared path of registration
    /// and of seeding the demo accounts.
    pub(crate) async fn create_account(
        &self,
        name: &str,
        age: Option<i64>,
        reg: Registration,
        role: Role,
    ) -> Result<User> {
        let mut c = Check::new();
        c.length("name", name, limits::NAME.0, limits::NAME.1)
            .username("username", &reg.username)
            .email("email", reg.email.trim())
            .length(
                "password",
                &reg.password,
                limits::PASSWORD.0,
                limits::PASSWORD.1,
            );
        if let Some(age) = age {
            c.range("age", age, limits::AGE.0, limits::AGE.1);
        }
        c.finish()?;
        let password = reg.password;
        let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
            .await
            .map_err(Error::internal)??;
        let email = normalise_email(&reg.email);
        self.insert_user(name, &email, age, role, Some(&reg.username), Some(&hash))
            .await
    }

    /// Stores a new user and its `user.created` event.
    async fn insert_user(
        &self,
        name: &str,
        email: &str,
        age: Option<i64>,
        role: Role,
        username: Option<&str>,
        password_hash: Option<&str>,
    ) -> Result<User> {
        let age = age.map(|a| a as i32);
        let role_name = role.as_str();
        let now = db::now();
        let user = User {
            id: 0,
            name: name.to_owned(),
            email: email.to_owned(),
            age,
            role,
            created_at: now,
        };
        self.events
            .insert(
                "INSERT INTO users (name, email, age, role, username, password_hash, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &name,
                    &email,
                    &age,
                    &role_name,
                    &username,
                    &password_hash,
                    &now,
                ],
                "user.created",
                user,
                email_conflict,
            )
            .await
    }

    /// Checks a username (or email) and password; the same error for an unknown
    /// name and a wrong password, and the same cost.
    pub async fn authenticate(&self, login: &str, password: &str) -> Result<User> {
        let sql = if login.contains('@') {
            "SELECT id, name, email, age, role, created_at, password_hash FROM users WHERE email = $1"
        } else {
            "SELECT id, name, email, age, role, created_at, password_hash FROM users WHERE username = $1"
        };
        let key = if login.contains('@') {
            normalise_email(login)
        } else {
            login.to_owned()
        };
        #[derive(FromRow)]
        struct Row {
            #[sqlx(flatten)]
            user: User,
            password_hash: Option<String>,
        }
        impl FromSqlite for Row {
            fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                Ok(Row {
                    user: User::from_sqlite(row)?,
                    password_hash: row.get("password_hash")?,
                })
            }
        }
        let row: Option<Row> = fetch_optional!(&self.db, sql, key);
        let (user, hash) = match row {
            Some(Row {
                user,
                password_hash: Some(hash),
            }) => (Some(user), hash),
            _ => (None, auth::dummy_hash().to_owned()),
        };
        let password = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
            .await
            .map_err(Error::internal)?;
        match user {
            Some(user) if ok => Ok(user),
            _ => Err(Error::Unauthenticated(
                "Incorrect username or password".into(),
            )),
        }
    }

    /// The user's friends, in id order.
    pub async fn friends_of(&self, user_id: i64) -> Result<Vec<User>> {
        self.get_user(user_id).await?;
        let sql = "SELECT u.id, u.name, u.email, u.age, u.role, u.created_at FROM friendships f \
                   JOIN users u ON u.id = f.friend_id WHERE f.user_id = $1 ORDER BY u.id";
        Ok(fetch_all!(&self.db, sql, user_id))
    }

    /// Either of the two may change their friendship, or an admin; both
    /// must exist.
    async fn may_change_friendship(
        &self,
        by: &Principal,
        user_id: i64,
        friend_id: i64,
    ) -> Result<()> {
        if by.user_id != friend_id {
            by.ensure_self_or_admin(user_id, "change your own friendships")?;
        }
        self.get_user(user_id).await?;
        self.get_user(friend_id).await?;
        Ok(())
    }

    /// Makes two users friends (both directions). Only one of the two, or an admin.
    pub async fn add_friend(&self, by: &Principal, user_id: i64, friend_id: i64) -> Result<()> {
        if user_id == friend_id {
            by.ensure_self_or_admin(user_id, "change your own friendships")?;
            return Err(Error::invalid(
                "friend_id",
                "value_error",
                "A user cannot befriend themselves",
            ));
        }
        self.may_change_friendship(by, user_id, friend_id).await?;
        // Already friends: nothing changes and no event.
        self.events
            .change(
                "INSERT INTO friendships (user_id, friend_id) VALUES ($1, $2), ($2, $1) \
                 ON CONFLICT DO NOTHING",
                &[&user_id, &friend_id],
                "friend.added",
                &serde_json::json!({"user_id": user_id, "friend_id": friend_id}),
                Error::from,
            )
            .await?;
        Ok(())
    }

    /// Ends a friendship (both directions). Only one of the two, or an admin.
    pub async fn remove_friend(&self, by: &Principal, user_id: i64, friend_id: i64) -> Result<()> {
        self.may_change_friendship(by, user_id, friend_id).await?;
        let removed = self
            .events
            .change(
                "DELETE FROM friendships \
                 WHERE (user_id = $1 AND friend_id = $2) OR (user_id = $2 AND friend_id = $1)",
                &[&user_id, &friend_id],
                "friend.removed",
                &serde_json::json!({"user_id": user_id, "friend_id": friend_id}),
                Error::from,
            )
            .await?;
        if removed == 0 {
            return Err(Error::NotFound("Friendship not found".into()));
        }
        Ok(())
    }

    /// How many users exist.
    pub async fn count_users(&self) -> Result<i64> {
        let n: Option<(i64,)> = fetch_optional!(&self.db, "SELECT COUNT(*) FROM users");
        Ok(n.map_or(0, |(n,)| n))
    }
}
