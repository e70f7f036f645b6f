//! Domain errors as GraphQL errors: the message a client can show and
//! `extensions.code` a client can branch on (`NOT_FOUND`, `BAD_USER_INPUT`,
//! `UNAUTHENTICATED`, `FORBIDDEN`, `CONFLICT`, …). Internal errors are logged
//! here and reach the client only as "Internal server error".

use async_graphql::ErrorExtensions;

use crate::error::Error;

pub fn gql_error(e: Error) -> async_graphql::Error {
    let (code, message) = match &e {
        Error::NotFound(m) => ("NOT_FOUND", m.clone()),
        Error::Conflict(m) => ("CONFLICT", m.clone()),
        Error::Validation(fields) => {
            let message = fields
                .iter()
                .map(|f| format!("{}: {}", f.field, f.msg))
                .collect::<Vec<_>>()
                .join("; ");
            let fields = serde_json::to_value(fields).unwrap_or_default();
            return async_graphql::Error::new(message).extend_with(|_, ext| {
                ext.set("code", "BAD_USER_INPUT");
                if let Ok(v) = async_graphql::Value::from_json(fields.clone()) {
                    ext.set("fields", v);
                }
            });
        }
        Error::BadRequest(m) => ("BAD_USER_INPUT", m.clone()),
        Error::Unauthenticated(m) => ("UNAUTHENTICATED", m.clone()),
        Error::Forbidden(m) => ("FORBIDDEN", m.clone()),
        Error::RateLimited { .. } => ("RATE_LIMITED", e.to_string()),
        Error::Unavailable(m) => ("SERVICE_UNAVAILABLE", m.clone()),
        Error::Internal(cause) => {
            tracing::error!(error = %format!("{cause:#}"), "internal error in a GraphQL resolver");
            ("INTERNAL_SERVER_ERROR", "Internal server error".to_owned())
        }
    };
    async_graphql::Error::new(message).extend_with(|_, ext| ext.set("code", code))
}

/// An error with a code, for failures found at the GraphQL edge itself.
pub fn coded(code: &'static str, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message.into()).extend_with(|_, ext| ext.set("code", code))
}
