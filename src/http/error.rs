//! The one mapping from domain errors to HTTP: FastAPI's shapes
//! (`{"detail": "…"}`, and 422 with a list of `{loc, msg, type}`), real status
//! codes, `WWW-Authenticate` on 401 and `Retry-After` on 429. Internal errors
//! are logged here, inside the request's span (which carries its request id),
//! and the client only hears "Internal Server Error".

use axum::{
    Json,
    extract::rejection::{BytesRejection, PathRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::error::{Error, FieldError};

/// A domain error on its way to an HTTP client, with where the bad input came
/// from (`body`, `query` or `path`) for 422 locations.
#[derive(Debug)]
pub struct ApiError {
    pub error: Error,
    pub source: &'static str,
}

impl ApiError {
    pub fn query(error: Error) -> Self {
        ApiError {
            error,
            source: "query",
        }
    }

    pub fn path(error: Error) -> Self {
        ApiError {
            error,
            source: "path",
        }
    }

    /// An error about input that came from `source` (`body` or `query`).
    pub fn at(source: &'static str) -> impl Fn(Error) -> Self {
        move |error| ApiError { error, source }
    }

    pub fn payload_too_large() -> Self {
        Error::BadRequest(PAYLOAD_TOO_LARGE.into()).into()
    }
}

/// The cause of a 500, carried to the middleware that logs it with the request id.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

const PAYLOAD_TOO_LARGE: &str = "Request body too large";

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError {
            error,
            source: "body",
        }
    }
}

/// A 422 for input that could not be decoded at all.
pub fn unprocessable(loc: Vec<serde_json::Value>, kind: &str, msg: impl Into<String>) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"detail": [{"loc": loc, "msg": msg.into(), "type": kind}]})),
    )
        .into_response()
}

pub fn detail(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({"detail": detail.into()}))).into_response()
}

fn field_json(source: &str, f: &FieldError) -> serde_json::Value {
    let mut loc = vec![serde_json::Value::from(source)];
    loc.extend(f.field.split('.').map(serde_json::Value::from));
    json!({"loc": loc, "msg": f.msg, "type": f.kind})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self.error {
            Error::NotFound(m) => detail(StatusCode::NOT_FOUND, m),
            Error::Conflict(m) => detail(StatusCode::CONFLICT, m),
            Error::Validation(fields) => {
                let detail: Vec<_> = fields.iter().map(|f| field_json(self.source, f)).collect();
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Json(json!({ "detail": detail })),
                )
                    .into_response()
            }
            Error::BadRequest(m) if m == PAYLOAD_TOO_LARGE => {
                detail(StatusCode::PAYLOAD_TOO_LARGE, m)
            }
            Error::BadRequest(m) => detail(StatusCode::BAD_REQUEST, m),
            Error::Unauthenticated(m) => {
                let mut r = detail(StatusCode::UNAUTHORIZED, m);
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            Error::Forbidden(m) => detail(StatusCode::FORBIDDEN, m),
            Error::RateLimited { retry_after_secs } => {
                let mut r = detail(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many failed login attempts; try again later",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                r
            }
            Error::Unavailable(m) => {
                tracing::warn!(detail = %m, "dependency unavailable");
                detail(StatusCode::SERVICE_UNAVAILABLE, m)
            }
            Error::Internal(e) => {
                // Logged once, by the edge middleware, with the request id.
                let mut r = detail(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
                r.extensions_mut().insert(InternalCause(format!("{e:#}")));
                r
            }
        }
    }
}

/// The 422 for a path parameter `name` that should be an integer and is not
/// (FastAPI's wording), shared by every HTTP surface that reads ids from paths.
pub fn not_an_integer_path_param(name: &str) -> Response {
    unprocessable(
        vec!["path".into(), name.into()],
        "int_parsing",
        "Input should be a valid integer, unable to parse string as an integer",
    )
}

/// Path parameters that do not parse are 422s located at the parameter.
pub fn path_rejection(r: PathRejection, first_param: Option<String>) -> Response {
    use axum::extract::path::ErrorKind;
    if let PathRejection::FailedToDeserializePathParams(e) = &r {
        let located = match e.kind() {
            ErrorKind::ParseErrorAtKey {
                key, expected_type, ..
            } => Some((key.clone(), *expected_type)),
            ErrorKind::ParseError { expected_type, .. } => {
                first_param.map(|name| (name, *expected_type))
            }
            ErrorKind::ParseErrorAtIndex { expected_type, .. } => {
                Some(("?".to_owned(), *expected_type))
            }
            _ => None,
        };
        if let Some((key, expected_type)) = located {
            if expected_type.starts_with(['i', 'u']) {
                return not_an_integer_path_param(&key);
            }
            return unprocessable(
                vec!["path".into(), key.into()],
                "value_error",
                format!("Input should be a valid {expected_type}"),
            );
        }
    }
    unprocessable(vec!["path".into()], "value_error", r.body_text())
}

/// A body that could not be read: too large (413), stalled (408) or broken
/// off.
pub fn bytes_rejection(r: BytesRejection) -> Response {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large().into_response()
    } else if stalled(&r) {
        body_not_in_time()
    } else {
        detail(r.status(), r.body_text())
    }
}

/// 408: the client stopped sending its request body.
pub fn body_not_in_time() -> Response {
    detail(
        StatusCode::REQUEST_TIMEOUT,
        "The request body did not arrive in time",
    )
}

/// Whether reading a body failed because it stopped arriving (see
/// `crate::app`).
fn stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = Some(e);
    while let Some(err) = e {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        e = err.source();
    }
    false
}
