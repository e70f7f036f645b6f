//! The one error type of the domain. Every protocol adapter maps it exactly once
//! (HTTP status and `{"detail"}`, later `tonic::Status` and GraphQL error codes),
//! so REST, GraphQL and gRPC cannot disagree about what went wrong.
//!
//! Internal errors carry their cause for the log; adapters never send it to a client.

use std::fmt;

/// One invalid input field, in the words FastAPI uses (`loc`, `msg`, `type`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// The field's name as the client spelled it (snake_case).
    pub field: String,
    /// A sentence a person can act on.
    pub msg: String,
    /// A machine-readable kind, e.g. `string_too_long`, `value_error`, `missing`.
    pub kind: &'static str,
}

impl FieldError {
    pub fn new(field: impl Into<String>, kind: &'static str, msg: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            msg: msg.into(),
            kind,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thing asked for does not exist; the message names it ("User not found").
    #[error("{0}")]
    NotFound(String),
    /// The write collides with existing data (a duplicate email).
    #[error("{0}")]
    Conflict(String),
    /// The input breaks a validation rule; nothing was changed.
    #[error("invalid input: {}", describe(.0))]
    Validation(Vec<FieldError>),
    /// The request is malformed in a way that is not about one field.
    #[error("{0}")]
    BadRequest(String),
    /// No credentials, or credentials that do not verify.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the right to do this.
    #[error("{0}")]
    Forbidden(String),
    /// Too many attempts; the client may try again after this many seconds.
    #[error("too many attempts")]
    RateLimited { retry_after_secs: u64 },
    /// A dependency (database, broker, upstream) cannot be reached right now.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; logged at the edge, never shown.
    #[error("internal error: {0}")]
    Internal(#[source] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// "field: message; field: message", for logs and for errors that end a
/// command (a bad `--admin-password` must say what is wrong with it).
fn describe(fields: &[FieldError]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|f| format!("{}: {}", f.field, f.msg))
        .collect();
    parts.join("; ")
}

impl Error {
    pub fn invalid(field: &str, kind: &'static str, msg: impl Into<String>) -> Error {
        Error::Validation(vec![FieldError::new(field, kind, msg)])
    }

    pub fn internal(e: impl fmt::Display) -> Error {
        Error::Internal(anyhow::anyhow!("{e}"))
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Error::Unavailable("Database unavailable".into())
            }
            _ => Error::Internal(e.into()),
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::{CannotOpen, DatabaseBusy, DatabaseLocked};
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked | CannotOpen) => {
                Error::Unavailable("Database unavailable".into())
            }
            _ => Error::Internal(e.into()),
        }
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(e)
    }
}
