//! GraphQL on `/graphql`: the schema ([`schema`]), batched nested fields
//! ([`loaders`]), and the transports — GraphQL-over-HTTP (POST and GET, with
//! `application/graphql-response+json` content negotiation and its status
//! codes), WebSocket subscriptions in both `graphql-transport-ws` and the
//! legacy `graphql-ws` protocol, and GraphiQL served from the binary.

mod documents;
pub mod error;
pub mod loaders;
pub mod schema;
mod shared;
pub mod ws;

use std::sync::Arc;

use async_graphql::{
    Data, Schema, ServerError, ValidationMode, http::ALL_WEBSOCKET_PROTOCOLS,
    parser::types::OperationType,
};
use axum::{
    Router,
    body::Bytes,
    extract::{FromRequestParts, State, WebSocketUpgrade},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};

use crate::{domain::Domain, http::extract::bearer_token, state::AppState};
use documents::{Documents, may_skip_rules, missing_variable};
use loaders::Loaders;
use schema::{Caller, Mutation, Query, Subscription};

pub type PrismSchema = Schema<Query, Mutation, Subscription>;

/// Limits that keep one query from taking the server down.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_depth: usize,
    pub max_complexity: usize,
    pub max_query_bytes: usize,
    pub introspection: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 15,
            max_complexity: 2000,
            max_query_bytes: 100_000,
            introspection: true,
        }
    }
}

/// Builds the executable schema. Per-process data (domain, stats, shutdown)
/// lives in the schema; per-request data (caller, loaders) is added per request.
pub fn build_schema(state: &AppState, limits: Limits) -> PrismSchema {
    schema_validating(state, limits, ValidationMode::Strict)
}

/// The schema, validating queries with every rule (`Strict`) or with only
/// the limits and fragment cycles (`Fast`, for queries already found valid).
fn schema_validating(state: &AppState, limits: Limits, mode: ValidationMode) -> PrismSchema {
    let mut builder = Schema::build(Query, Mutation, Subscription)
        .validation_mode(mode)
        .data(state.domain.clone())
        .data(state.stats.clone())
        .data(state.shutdown.clone())
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity);
    if !limits.introspection {
        builder = builder.disable_introspection();
    }
    builder.finish()
}

/// The schema's SDL (`prism schema`).
pub fn sdl() -> String {
    Schema::build(Query, Mutation, Subscription).finish().sdl()
}

/// The data of one HTTP request or WebSocket connection: the caller and its
/// loaders (`cache`: see [`Loaders`]).
fn operation_data(domain: &Domain, caller: Caller, cache: bool) -> Data {
    let mut data = Data::default();
    data.insert(caller);
    data.insert(Loaders::new(domain.clone(), cache));
    data
}

fn caller_from(state: &AppState, headers: &HeaderMap) -> Caller {
    match bearer_token(headers) {
        None => Caller::Anonymous,
        Some(token) => match state.keys.verify(token) {
            Ok(p) => {
                state.stats.saw_user(p.user_id);
                Caller::User(p)
            }
            Err(e) => Caller::Invalid(e.to_string()),
        },
    }
}

/// The GraphQL endpoint's state: the app plus the schema.
#[derive(Clone)]
pub struct GraphqlState {
    app: AppState,
    schema: PrismSchema,
    /// The same schema with async-graphql's fast validation: the limits
    /// (depth, complexity) and fragment cycles, not the rules that find
    /// mistakes. For repeated requests those rules would answer as before
    /// (see [`documents`]).
    validated: PrismSchema,
    limits: Limits,
    documents: Arc<Documents>,
    /// Subscriptions over WebSocket: identical live ones run once.
    subscriptions: shared::Sharing<PrismSchema>,
}

pub fn router(state: AppState, limits: Limits) -> Router {
    let schema = build_schema(&state, limits);
    let validated = schema_validating(&state, limits, ValidationMode::Fast);
    let subscriptions = shared::Sharing::new(
        schema.clone(),
        state.config.event_buffer,
        state.stats.clone(),
    );
    Router::new()
        .route("/graphql", get(get_graphql).post(post_graphql))
        .route("/graphql/assets/{file}", get(asset))
        .with_state(GraphqlState {
            app: state,
            schema,
            validated,
            limits,
            documents: Arc::default(),
            subscriptions,
        })
}

/// Which media type the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Media {
    /// `application/graphql-response+json`: request errors get 4xx statuses.
    GraphqlResponse,
    /// `application/json` (also for `*/*` or no `Accept`): always 200 once parsed.
    Json,
}

impl Media {
    fn from_headers(headers: &HeaderMap) -> Media {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if accept.contains("application/graphql-response+json") {
            Media::GraphqlResponse
        } else {
            Media::Json
        }
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Media::GraphqlResponse => "application/graphql-response+json; charset=utf-8",
            Media::Json => "application/json; charset=utf-8",
        })
    }
}

/// A request that failed before execution: a client error with no `data`.
fn request_error(media: Media, status: StatusCode, message: &str, code: &str) -> Response {
    let body = json!({"errors": [{"message": message, "extensions": {"code": code}}]});
    // With application/json the spec keeps 200 for GraphQL errors, but a
    // request that is not GraphQL at all (bad JSON, wrong shape) is still a 400.
    respond(media, status, body)
}

fn respond(media: Media, status: StatusCode, body: Value) -> Response {
    respond_text(media, status, body.to_string())
}

fn respond_text(media: Media, status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, media.content_type());
    r
}

/// The parameters of a GraphQL-over-HTTP request, checked for shape.
struct Params {
    query: String,
    operation_name: Option<String>,
    variables: Option<Value>,
    extensions: Option<Value>,
}

impl Params {
    /// Validates the JSON (or query-string) parameters: `query` a string,
    /// `operationName` a string or null, `variables` and `extensions` maps or null.
    fn from_json(v: Value) -> Result<Params, &'static str> {
        let Value::Object(mut m) = v else {
            return Err("The request body must be a JSON object");
        };
        let query = match m.remove("query") {
            Some(Value::String(q)) => q,
            Some(_) => return Err("`query` must be a string"),
            None => return Err("Missing `query`"),
        };
        let operation_name = match m.remove("operationName") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err("`operationName` must be a string"),
        };
        let map_or_null = |v: Option<Value>, what| match v {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v)),
            Some(_) => Err(what),
        };
        Ok(Params {
            query,
            operation_name,
            variables: map_or_null(m.remove("variables"), "`variables` must be a map")?,
            extensions: map_or_null(m.remove("extensions"), "`extensions` must be a map")?,
        })
    }

    fn from_query_string(q: &str) -> Result<Params, &'static str> {
        let mut m = serde_json::Map::new();
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            let value = match &*k {
                "query" | "operationName" => Value::String(v.into_owned()),
                "variables" | "extensions" => serde_json::from_str(&v)
                    .map_err(|_| "`variables` and `extensions` must be JSON")?,
                _ => continue,
            };
            m.insert(k.into_owned(), value);
        }
        Params::from_json(Value::Object(m))
    }
}

async fn execute(
    gs: &GraphqlState,
    headers: &HeaderMap,
    params: Params,
    media: Media,
    method: &Method,
) -> Response {
    if params.query.len() > gs.limits.max_query_bytes {
        return request_error(
            media,
            request_status(media),
            &format!("Query is larger than {} bytes", gs.limits.max_query_bytes),
            "QUERY_TOO_LARGE",
        );
    }
    // Parse first (from the cache when the query was seen before): GET may
    // not run mutations, and a document that does not parse is a request
    // error with no `data`.
    let found = match gs
        .documents
        .parse(&params.query, params.operation_name.as_deref())
    {
        Ok(parsed) => parsed,
        Err(e) => {
            return request_error(
                media,
                request_status(media),
                &e.to_string(),
                "GRAPHQL_PARSE_FAILED",
            );
        }
    };
    if method == Method::GET {
        let op_is_mutation = found.doc.operations.iter().any(|(name, op)| {
            let selected = match (&params.operation_name, name) {
                (Some(want), Some(n)) => want == n.as_str(),
                (None, _) => true,
                _ => false,
            };
            selected && op.node.ty != OperationType::Query
        });
        if op_is_mutation {
            let mut r = request_error(
                media,
                StatusCode::METHOD_NOT_ALLOWED,
                "Only queries may be sent with GET; use POST",
                "METHOD_NOT_ALLOWED",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return r;
        }
    }
    let given = params.variables.as_ref().and_then(Value::as_object);
    if let Some(message) = missing_variable(&found.doc, params.operation_name.as_deref(), given) {
        return request_error(media, request_status(media), &message, "BAD_USER_INPUT");
    }
    let caller = caller_from(&gs.app, headers);
    if let Caller::Invalid(message) = &caller {
        // A token that does not verify is refused outright, whatever the
        // operation: the client believes it is someone it is not.
        let mut r = request_error(media, StatusCode::UNAUTHORIZED, message, "UNAUTHENTICATED");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let (schema, remember) = if may_skip_rules(&found, given) {
        (&gs.validated, None)
    } else {
        // Only a first pass is worth remembering: a known-valid operation
        // whose variables need every rule would otherwise copy its query and
        // take the cache's write lock on every request.
        let first = (!found.valid).then(|| (params.query.clone(), params.operation_name.clone()));
        (&gs.schema, first)
    };
    let mut req = async_graphql::Request::new(params.query);
    req.set_parsed_query(found.doc);
    if let Some(name) = params.operation_name {
        req = req.operation_name(name);
    }
    if let Some(vars) = params.variables {
        req = req.variables(async_graphql::Variables::from_json(vars));
    }
    if let Some(Value::Object(ext)) = params.extensions {
        for (k, v) in ext {
            if let Ok(v) = async_graphql::Value::from_json(v) {
                req.extensions.insert(k, v);
            }
        }
    }
    req.data = operation_data(&gs.app.domain, caller, true);
    let resp = schema.execute(req).await;
    // Errors without a path happened before execution (validation, variable
    // coercion, limits): a request error, 400 with no `data` under
    // application/graphql-response+json.
    let request_failed = resp.data == async_graphql::Value::Null
        && !resp.errors.is_empty()
        && resp.errors.iter().all(|e| e.path.is_empty());
    if let Some((query, operation)) = remember
        && !request_failed
    {
        gs.documents.found_valid(&query, operation.as_deref());
    }
    let errors: Vec<Value> = resp.errors.iter().map(error_json).collect();
    if request_failed {
        return respond(media, request_status(media), json!({"errors": errors}));
    }
    // Serialised straight from async-graphql's value, which keeps fields in
    // the order the query asked for them.
    #[derive(serde::Serialize)]
    struct Body<'a> {
        data: &'a async_graphql::Value,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        errors: Vec<Value>,
    }
    let body = serde_json::to_string(&Body {
        data: &resp.data,
        errors,
    })
    .unwrap_or_else(|_| r#"{"errors":[{"message":"Internal server error"}]}"#.into());
    respond_text(media, StatusCode::OK, body)
}

fn request_status(media: Media) -> StatusCode {
    match media {
        Media::GraphqlResponse => StatusCode::BAD_REQUEST,
        Media::Json => StatusCode::OK,
    }
}

fn error_json(e: &ServerError) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or_else(|_| json!({"message": e.message}));
    // async-graphql's own errors carry no code; give every error one for
    // clients to branch on. Every error prism's resolvers raise has one.
    if let Value::Object(m) = &mut v {
        let ext = m
            .entry("extensions")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(ext) = ext {
            ext.entry("code").or_insert_with(|| {
                Value::from(if e.path.is_empty() {
                    "GRAPHQL_VALIDATION_FAILED"
                } else if e.message.starts_with("Failed to parse \"") {
                    // An argument the schema's types allowed but its scalar
                    // refused at execution, such as an Int beyond 32 bits.
                    "BAD_USER_INPUT"
                } else {
                    "INTERNAL_SERVER_ERROR"
                })
            });
        }
    }
    v
}

async fn post_graphql(State(gs): State<GraphqlState>, headers: HeaderMap, body: Bytes) -> Response {
    let media = Media::from_headers(&headers);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/json") {
        return request_error(
            media,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Send the request as application/json",
            "BAD_REQUEST",
        );
    }
    if body.is_empty() {
        return request_error(
            media,
            StatusCode::BAD_REQUEST,
            "Missing request body",
            "BAD_REQUEST",
        );
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            return request_error(
                media,
                StatusCode::BAD_REQUEST,
                "Request body is not valid JSON",
                "BAD_REQUEST",
            );
        }
    };
    match Params::from_json(value) {
        Ok(params) => execute(&gs, &headers, params, media, &Method::POST).await,
        Err(msg) => request_error(media, StatusCode::BAD_REQUEST, msg, "BAD_REQUEST"),
    }
}

/// GET: a WebSocket upgrade for subscriptions, GraphiQL for a browser, or a
/// query in the URL.
async fn get_graphql(State(gs): State<GraphqlState>, parts: Parts) -> Response {
    let mut parts = parts;
    if parts.headers.contains_key(header::UPGRADE) {
        return websocket(gs, &mut parts).await;
    }
    let media = Media::from_headers(&parts.headers);
    let query = parts.uri.query().unwrap_or("");
    let wants_html = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html && !query.contains("query=") {
        return Html(GRAPHIQL_HTML).into_response();
    }
    match Params::from_query_string(query) {
        Ok(params) => execute(&gs, &parts.headers, params, media, &Method::GET).await,
        Err(msg) => request_error(media, StatusCode::BAD_REQUEST, msg, "BAD_REQUEST"),
    }
}

async fn websocket(gs: GraphqlState, parts: &mut Parts) -> Response {
    let Some(protocol) = ws::negotiate(&parts.headers) else {
        return crate::http::error::detail(
            StatusCode::BAD_REQUEST,
            "Offer the graphql-transport-ws or graphql-ws subprotocol",
        );
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(parts, &()).await {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    crate::realtime::ws::with_limits(upgrade, gs.app.config.max_ws_frame)
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| {
            let sessions = gs.app.sessions.clone();
            sessions.track_future(ws::serve(gs, socket, protocol))
        })
}

/// The token in a `connection_init` payload: `{"Authorization": "Bearer …"}`
/// (any case of the key, with or without the scheme).
fn connection_token(payload: &Value) -> Option<String> {
    let map = payload.as_object()?;
    let value = map
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.as_str())?;
    let token = match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t,
        _ => value,
    };
    Some(token.trim().to_owned()).filter(|t| !t.is_empty())
}

const GRAPHIQL_HTML: &str = include_str!("graphiql.html");

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, ctype): (&'static [u8], &str) = match file.as_str() {
        "graphiql.min.js" => (
            include_bytes!("../../assets/graphiql/graphiql.min.js"),
            "text/javascript",
        ),
        "graphiql.min.css" => (
            include_bytes!("../../assets/graphiql/graphiql.min.css"),
            "text/css",
        ),
        "react.production.min.js" => (
            include_bytes!("../../assets/graphiql/react.production.min.js"),
            "text/javascript",
        ),
        "react-dom.production.min.js" => (
            include_bytes!("../../assets/graphiql/react-dom.production.min.js"),
            "text/javascript",
        ),
        _ => return crate::http::error::detail(StatusCode::NOT_FOUND, "Not Found"),
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_str(ctype).unwrap_or(HeaderValue::from_static("text/plain")),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=86400"),
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_shape_is_checked() {
        assert!(Params::from_json(json!({"query": "{ a }"})).is_ok());
        assert!(Params::from_json(json!({"query": 1})).is_err());
        assert!(Params::from_json(json!({"notquery": "{ a }"})).is_err());
        assert!(Params::from_json(json!({"query": "{ a }", "variables": "x"})).is_err());
        assert!(
            Params::from_json(json!({"query": "{ a }", "variables": null, "operationName": null}))
                .is_ok()
        );
        assert!(Params::from_json(json!(["query"])).is_err());
    }

    #[test]
    fn connection_init_token_forms() {
        assert_eq!(
            connection_token(&json!({"Authorization": "Bearer abc"})).as_deref(),
            Some("abc")
        );
        assert_eq!(
            connection_token(&json!({"authorization": "abc"})).as_deref(),
            Some("abc")
        );
        assert_eq!(connection_token(&json!({})), None);
        assert_eq!(connection_token(&Value::Null), None);
    }
}
