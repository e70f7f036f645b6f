//! Extractors that speak FastAPI's error dialect. axum's own extractors answer
//! bad input with plain-text 400s and 415s; these answer 422 with a located
//! `{"detail": [{loc, msg, type}]}`, 413 as `{"detail"}`, and 401 with
//! `WWW-Authenticate: Bearer`, so a client sees one error format everywhere.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{ApiError, bytes_rejection, path_rejection, unprocessable};
use axum::extract::FromRef;

use crate::{auth::Principal, error::Error, state::AppState};

/// A JSON request body.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(bytes_rejection)?;
        parse_json(&bytes).map(Json)
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Input taken from a JSON or form body, or, when the body is empty, from the
/// query string — the seed called `POST /users/?name=…` and
/// `/auth/login?username=…`, and those calls keep working. The second field
/// is where it came from (`body` or `query`), for the locations of the
/// domain's validation errors ([`ApiError::at`]).
#[derive(Debug)]
pub struct Input<T>(pub T, pub &'static str);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Input<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let query = req.uri().query().unwrap_or("").to_owned();
        let form = is_form(req.headers());
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(bytes_rejection)?;
        if bytes.is_empty() {
            parse_urlencoded(query.as_bytes(), "query").map(|v| Input(v, "query"))
        } else if form {
            parse_urlencoded(&bytes, "body").map(|v| Input(v, "body"))
        } else {
            parse_json(&bytes).map(|v| Input(v, "body"))
        }
    }
}

/// Query-string parameters.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let q = parts.uri.query().unwrap_or("");
        parse_urlencoded(q.as_bytes(), "query").map(Query)
    }
}

/// Path parameters.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(p) => Ok(Path(p.0)),
            Err(rejection) => {
                // A single-value path error does not name its parameter; the
                // raw parameters do, and a 422 should point at it.
                let name = axum::extract::RawPathParams::from_request_parts(parts, state)
                    .await
                    .ok()
                    .and_then(|raw| raw.iter().next().map(|(k, _)| k.to_owned()));
                Err(path_rejection(rejection, name))
            }
        }
    }
}

/// The caller, from `Authorization: Bearer <token>`; 401 without a valid one.
#[derive(Debug)]
pub struct Auth(pub Principal);

impl<S> FromRequestParts<S> for Auth
where
    S: Send + Sync,
    AppState: axum::extract::FromRef<S>,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let state = AppState::from_ref(state);
        let token = bearer_token(&parts.headers).ok_or_else(|| {
            ApiError::from(Error::Unauthenticated("Not authenticated".into())).into_response()
        })?;
        let principal = state
            .keys
            .verify(token)
            .map_err(|e| ApiError::from(e).into_response())?;
        state.stats.saw_user(principal.user_id);
        Ok(Auth(principal))
    }
}

/// The caller, who must hold the admin role: 401 without a valid token, 403
/// without the role. Checked before the query and body are read, as a
/// FastAPI dependency is, so a caller without the right gets 403 whatever
/// the request's input (and learns nothing from its validation).
#[derive(Debug)]
pub struct Admin(pub Principal);

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    AppState: axum::extract::FromRef<S>,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let Auth(principal) = Auth::from_request_parts(parts, state).await?;
        principal
            .ensure_admin()
            .map_err(|e| ApiError::from(e).into_response())?;
        Ok(Admin(principal))
    }
}

/// The token of an `Authorization: Bearer …` header, if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"))
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    // No body at all is a missing body, as FastAPI reports it, not bad JSON.
    if bytes.is_empty() {
        return Err(unprocessable(
            vec!["body".into()],
            "missing",
            "Field required",
        ));
    }
    // Every body prism reads is an object; serde would also fill a struct
    // from an array (`[null, null]`), which no client means.
    if let Some(first) = bytes.iter().find(|b| !b.is_ascii_whitespace())
        && *first != b'{'
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(unprocessable(
            vec!["body".into()],
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return unprocessable(
                vec!["body".into(), inner.column().into()],
                "json_invalid",
                "JSON decode error",
            );
        }
        data_error("body", &path, &strip_position(&inner.to_string()))
    })
}

pub(crate) fn parse_urlencoded<T: DeserializeOwned>(
    input: &[u8],
    source: &str,
) -> Result<T, Response> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(input));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        data_error(source, &path, &e.into_inner().to_string())
    })
}

/// Builds the 422 for a decoding error at `path` with serde's `message`.
fn data_error(source: &str, path: &str, message: &str) -> Response {
    let mut loc: Vec<Value> = vec![source.into()];
    loc.extend(
        path.split('.')
            .filter(|p| !p.is_empty() && *p != "?")
            .map(|p| Value::from(p.trim_start_matches('[').trim_end_matches(']'))),
    );
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next())
    {
        loc.push(field.into());
        return unprocessable(loc, "missing", "Field required");
    }
    let (kind, msg) = if message.contains("to fit in target type") {
        // std's words for an integer out of the type's range.
        (
            "int_parsing_size",
            "Unable to parse input string as an integer, exceeded maximum size".to_owned(),
        )
    } else if message.contains("invalid digit") {
        (
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer".to_owned(),
        )
    } else if message.contains("expected i") && has_fraction(message) {
        (
            "int_from_float",
            "Input should be a valid integer, got a number with a fractional part".to_owned(),
        )
    } else if message.contains("expected i") {
        ("int_type", "Input should be a valid integer".to_owned())
    } else if message.contains("invalid float") || message.contains("expected f64") {
        ("float_parsing", "Input should be a valid number".to_owned())
    } else if let Some(msg) = enum_message(message) {
        ("enum", msg)
    } else {
        ("value_error", message.to_owned())
    };
    unprocessable(loc, kind, msg)
}

/// Whether serde's "invalid value: floating point `30.5`, expected i64" is
/// about a number with a fractional part (rather than one too large).
fn has_fraction(message: &str) -> bool {
    message
        .split_once("floating point `")
        .and_then(|(_, m)| m.split('`').next())
        .and_then(|n| n.parse::<f64>().ok())
        .is_some_and(|n| n.fract() != 0.0)
}

/// pydantic's words for serde's "unknown variant `x`, expected one of `A`,
/// `B`": "Input should be 'A' or 'B'".
fn enum_message(message: &str) -> Option<String> {
    let (_, expected) = message
        .strip_prefix("unknown variant")?
        .split_once("expected")?;
    let names: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|n| format!("'{n}'"))
        .collect();
    let (last, rest) = names.split_last()?;
    Some(if rest.is_empty() {
        format!("Input should be {last}")
    } else {
        format!("Input should be {} or {last}", rest.join(", "))
    })
}

/// serde_json appends " at line 1 column 7"; clients do not need it.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_variants_are_named_as_pydantic_names_them() {
        let serde = "unknown variant `toys`, expected one of `ELECTRONICS`, `CLOTHING`, `BOOKS`";
        assert_eq!(
            enum_message(serde).unwrap(),
            "Input should be 'ELECTRONICS', 'CLOTHING' or 'BOOKS'"
        );
        assert_eq!(
            enum_message("unknown variant `b`, expected `a`").unwrap(),
            "Input should be 'a'"
        );
        assert_eq!(enum_message("invalid type: map"), None);
    }

    #[test]
    fn bearer_token_is_parsed_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn strip_position_removes_serde_suffix() {
        assert_eq!(strip_position("bad thing at line 1 column 7"), "bad thing");
    }
}
