//! Server-Sent Events and WebSockets (SPEC §6), background tasks, and the
//! `/ui` page.
//!
//! Every domain stream here is fed from the event log: `id:` is the event id,
//! `Last-Event-ID` resumes (missed events replayed from the database, then
//! live), and a client that falls behind is cut off and resumes, so it never
//! slows the writer or other clients. Streams end when the server shuts down.

pub mod ticker;
pub mod ws;

use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};
use chrono::{SecondsFormat, Utc};
use futures::{Stream, StreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::{
    domain::{NewTask, Task, TaskEvent},
    events::{Event, EventFilter, Item},
    http::{
        Detail,
        error::ApiError,
        extract::{Admin, Auth, Input, Json, Path, Query},
    },
    state::{AppState, Stats},
};

/// Keeps `sse_connections` right however a stream ends.
struct Open(Arc<Stats>);

impl Open {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.sse_connections.fetch_add(1, Ordering::Relaxed);
        Open(stats.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.sse_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which cached wire form of an event a surface uses ([`Event::frame`]).
mod slot {
    pub const STREAM: usize = 0;
    pub const FEED: usize = 1;
    pub const MESSAGE: usize = 2;
    pub const NOTIFICATION: usize = 3;
}

/// One SSE frame: `event:` (optional), `data:` and `id:` (optional) lines.
/// Every line of `data` gets its own `data:` prefix, as the format requires.
fn frame(id: Option<i64>, event: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 40);
    if let Some(e) = event {
        out.push_str("event: ");
        out.push_str(e);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(&id.to_string());
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// An SSE response with SPEC §6's headers and keep-alive comments; the stream
/// ends on shutdown. Frames are pre-rendered bytes, shared between clients
/// where the event is the same.
fn sse(state: &AppState, events: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let open = Open::new(&state.stats);
    let every = state.config.sse_keep_alive;
    let keep_alive = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval_at(
        tokio::time::Instant::now() + every,
        every,
    ))
    .map(|_| Some(Bytes::from_static(b":keep-alive\n\n")));
    // The events' end (None) ends the response; keep-alives never do.
    let body = stream::select(
        events.map(Some).chain(stream::once(async { None })),
        keep_alive,
    )
    .take_while(|f| futures::future::ready(f.is_some()))
    .filter_map(futures::future::ready)
    .take_until(state.shutdown.clone().cancelled_owned())
    .map(move |f| {
        let _counted = &open;
        Ok::<_, Infallible>(f)
    });
    let mut r = Response::new(Body::from_stream(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// The resume point a reconnecting EventSource sends; anything that is not an
/// id is ignored (live from now).
fn last_event_id(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id >= 0)
}

fn reset_event() -> Bytes {
    Bytes::from_static(b"event: reset\ndata: {\"reason\":\"history truncated\"}\n\n")
}

/// Domain events as SSE, through `render` (which may skip an event). Ends when
/// the subscriber is cut off; the client resumes with `Last-Event-ID`.
fn log_stream(
    state: &AppState,
    after: Option<i64>,
    filter: EventFilter,
    render: impl Fn(&Event) -> Option<Bytes> + Send + 'static,
) -> impl Stream<Item = Bytes> + Send + 'static {
    state
        .domain
        .events()
        .subscribe(after, filter)
        .take_while(|item| futures::future::ready(!matches!(item, Item::CutOff { .. })))
        .filter_map(move |item| {
            futures::future::ready(match item {
                Item::Event(e) => render(&e),
                Item::Reset => Some(reset_event()),
                Item::CutOff { .. } => None,
            })
        })
}

/// `GET /events`: a counter every second, `{"count": N, "timestamp": "…"}`.
/// The count is the event id, so a reconnecting client continues from where
/// it was instead of starting at 1.
#[utoipa::path(get, path = "/events", tag = "streams", params(("Last-Event-ID" = Option<i64>, Header, description = "Continue the count from here")),
    responses((status = 200, description = "`data: {\"count\": N, \"timestamp\": \"…\"}` every second", content_type = "text/event-stream", body = String)))]
async fn counter(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let start = last_event_id(&headers).unwrap_or(0);
    let tick = state.config.counter_interval;
    let events = stream::unfold(start, move |count| async move {
        tokio::time::sleep(tick).await;
        let count = count + 1;
        let data = json!({
            "count": count,
            "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        });
        Some((frame(Some(count), None, &data.to_string()), count))
    });
    sse(&state, events)
}

/// The entity and id an event is about, for human-readable notifications.
fn describe(e: &Event) -> String {
    let (entity, verb) = e
        .kind
        .split_once('.')
        .unwrap_or((e.kind.as_str(), "happened"));
    let mut entity = entity.to_owned();
    if let Some(first) = entity.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    #[derive(Deserialize)]
    struct Ids {
        id: Option<serde_json::Value>,
        order_id: Option<i64>,
        task_id: Option<String>,
        progress: Option<i32>,
        message: Option<String>,
    }
    match e.payload_as::<Ids>() {
        Some(Ids {
            message: Some(m), ..
        }) if e.kind == "broadcast" => format!("Broadcast: {m}"),
        Some(Ids {
            task_id: Some(id),
            progress: Some(p),
            ..
        }) if e.kind == "task.progress" => format!("{entity} {id} at {p}%"),
        Some(Ids {
            order_id: Some(id), ..
        }) => format!("{entity} {id} {verb}"),
        Some(Ids {
            task_id: Some(id), ..
        }) => format!("{entity} {id} {verb}"),
        Some(Ids { id: Some(id), .. }) => format!("{entity} {id} {verb}"),
        _ => format!("{entity} {verb}"),
    }
}

/// `GET /events/named`: `message` for every message sent, `notification` for
/// every other domain event, and a `heartbeat` (`ping`).
#[utoipa::path(get, path = "/events/named", tag = "streams", params(("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id: missed events are replayed, then live")),
    responses((status = 200, description = "`event: message` (a Message), `event: notification` (`{\"type\", \"text\", \"event\", \"id\"}`) and `event: heartbeat` (`ping`)", content_type = "text/event-stream", body = String)))]
async fn named(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let domain = log_stream(&state, last_event_id(&headers), EventFilter::all(), |e| {
        Some(if e.kind == "message.sent" {
            e.frame(slot::MESSAGE, |e| {
                frame(Some(e.id), Some("message"), e.payload.get())
            })
        } else {
            e.frame(slot::NOTIFICATION, |e| {
                let data = json!({
                    "type": "info",
                    "text": describe(e),
                    "event": e.kind,
                    "id": e.id,
                });
                frame(Some(e.id), Some("notification"), &data.to_string())
            })
        })
    });
    let every = state.config.heartbeat_interval;
    let heartbeat = stream::unfold((), move |()| async move {
        tokio::time::sleep(every).await;
        Some((Bytes::from_static(b"event: heartbeat\ndata: ping\n\n"), ()))
    });
    sse(&state, stream::select(domain, heartbeat))
}

/// `GET /stream`: every broadcast, `{"message", "timestamp"}`, with no event
/// name (the browser's default `message`).
#[utoipa::path(get, path = "/stream", tag = "streams", params(("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id: missed events are replayed, then live")),
    responses((status = 200, description = "every broadcast, `{\"message\", \"timestamp\"}`, as the default `message` event", content_type = "text/event-stream", body = String)))]
async fn broadcasts(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let events = log_stream(
        &state,
        last_event_id(&headers),
        EventFilter::parse("broadcast"),
        |e| Some(e.frame(slot::STREAM, |e| frame(Some(e.id), None, e.payload.get()))),
    );
    sse(&state, events)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct BroadcastIn {
    pub message: String,
}

/// `{"status": "broadcasted"}`, as the seed answers.
#[derive(Debug, Serialize, ToSchema)]
struct Broadcasted {
    #[schema(example = "broadcasted")]
    status: &'static str,
}

/// A started task: where to follow it is `/progress/{task_id}`.
#[derive(Debug, Serialize, ToSchema)]
struct Accepted {
    task_id: String,
    /// `pending` until the job picks it up.
    status: String,
}

/// `POST /broadcast?message=…` (or a JSON body): publish to every `/stream`.
#[utoipa::path(post, path = "/broadcast", tag = "broadcast", security(("bearer" = [])),
    params(("message" = Option<String>, Query, description = "The message, instead of a JSON body")),
    request_body(content = Option<BroadcastIn>, description = "The message, instead of the query"),
    responses((status = 200, body = Broadcasted)))]
async fn broadcast(
    State(state): State<AppState>,
    Auth(by): Auth,
    Input(b, from): Input<BroadcastIn>,
) -> Result<Json<Broadcasted>, ApiError> {
    state
        .domain
        .broadcast(&by, &b.message)
        .await
        .map_err(ApiError::at(from))?;
    Ok(Json(Broadcasted {
        status: "broadcasted",
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
struct FeedQuery {
    /// Comma-separated event types; `order.*` matches a prefix.
    types: Option<String>,
}

/// `GET /events/feed?types=…`: every domain event, resumable.
#[utoipa::path(get, path = "/events/feed", tag = "streams", params(FeedQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id: missed events are replayed, then live")),
    responses((status = 200, description = "`id: <event id>`, `event: <type>`, `data: {\"id\", \"type\", \"payload\", \"created_at\"}`", content_type = "text/event-stream", body = String)))]
async fn feed(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<FeedQuery>,
) -> Response {
    let filter = EventFilter::parse(q.types.as_deref().unwrap_or(""));
    let events = log_stream(&state, last_event_id(&headers), filter, |e| {
        Some(e.frame(slot::FEED, |e| {
            frame(Some(e.id), Some(e.kind.as_str()), e.json.as_str())
        }))
    });
    sse(&state, events)
}

/// `POST /tasks` `{"kind": "report"}`: starts a background job; 202 with its id.
#[utoipa::path(post, path = "/tasks", tag = "tasks", security(("bearer" = [])), request_body = NewTask,
    responses((status = 202, body = Accepted, headers(("location" = String, description = "`/tasks/{task_id}`")))))]
async fn create_task(
    State(state): State<AppState>,
    Auth(by): Auth,
    Json(new): Json<NewTask>,
) -> Result<Response, ApiError> {
    let task = state.domain.create_task(&by, new).await?;
    let domain = state.domain.clone();
    let id = task.task_id.clone();
    state.jobs.spawn(async move { domain.run_task(&id).await });
    let location = HeaderValue::from_str(&format!("/tasks/{}", task.task_id));
    let mut r = (
        StatusCode::ACCEPTED,
        Json(Accepted {
            task_id: task.task_id,
            status: task.status,
        }),
    )
        .into_response();
    if let Ok(v) = location {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// `GET /tasks/{task_id}`: state, progress and (once completed) the result.
#[utoipa::path(get, path = "/tasks/{task_id}", tag = "tasks", params(("task_id" = String, Path)),
    responses((status = 200, body = Task), (status = 404, body = Detail)))]
async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(state.domain.get_task(&id).await?))
}

fn progress_event(task_id: &str, progress: i32) -> Bytes {
    frame(
        None,
        None,
        &json!({"task_id": task_id, "progress": progress}).to_string(),
    )
}

fn completed_event(task_id: &str, status: &str) -> Bytes {
    frame(
        None,
        None,
        &json!({"task_id": task_id, "status": status}).to_string(),
    )
}

/// `GET /progress/{task_id}`: the task's progress, then `completed` (or
/// `failed`), then the stream ends. Unknown tasks are 404.
#[utoipa::path(get, path = "/progress/{task_id}", tag = "streams", params(("task_id" = String, Path)),
    responses((status = 200, description = "`{\"task_id\", \"progress\"}` (0 to 100), then `{\"task_id\", \"status\": \"completed\"}` (or `failed`), then the end", content_type = "text/event-stream", body = String),
              (status = 404, body = Detail)))]
async fn progress(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    // Subscribe before reading the state, so no change falls in between.
    let live = state
        .domain
        .events()
        .subscribe(None, EventFilter::parse("task.*"));
    let task = state.domain.get_task(&id).await?;
    let mut first = vec![progress_event(&id, task.progress)];
    if matches!(task.status.as_str(), "completed" | "failed") {
        first.push(completed_event(&id, &task.status));
        return Ok(sse(&state, stream::iter(first)));
    }
    // The pump may still be delivering events older than the state just
    // read (committed, not yet broadcast when the live feed began): progress
    // only grows, so one below what was already sent is one of those.
    let shown = task.progress;
    let updates = stream::unfold(
        (Box::pin(live), id, shown, false),
        |(mut live, id, mut shown, done)| async move {
            if done {
                return None;
            }
            loop {
                match live.next().await? {
                    Item::Event(e) => {
                        let Some(t) = e.payload_as::<TaskEvent>().filter(|t| t.task_id == id)
                        else {
                            continue;
                        };
                        if let Some(status) = e
                            .kind
                            .strip_prefix("task.")
                            .filter(|s| matches!(*s, "completed" | "failed"))
                        {
                            let last = vec![progress_event(&id, 100), completed_event(&id, status)];
                            return Some((stream::iter(last), (live, id, 100, true)));
                        }
                        let progress = t.progress.unwrap_or(0);
                        if progress < shown {
                            continue;
                        }
                        shown = progress;
                        let next = vec![progress_event(&id, progress)];
                        return Some((stream::iter(next), (live, id, shown, false)));
                    }
                    // Cut off: the client reconnects and starts from the
                    // persisted progress.
                    Item::CutOff { .. } => return None,
                    Item::Reset => continue,
                }
            }
        },
    )
    .flatten();
    Ok(sse(&state, stream::iter(first).chain(updates)))
}

#[derive(Debug, Deserialize, IntoParams)]
struct LogQuery {
    /// The least severe level to send: trace, debug, info, warn or error.
    level: Option<String>,
}

/// `GET /logs` (admin): this server's log records as they happen.
#[utoipa::path(get, path = "/logs", tag = "streams", security(("bearer" = [])), params(LogQuery),
    responses((status = 200, description = "`{\"level\", \"message\", \"target\", \"timestamp\"}` per log record", content_type = "text/event-stream", body = String),
              (status = 403, body = Detail)))]
async fn logs(
    State(state): State<AppState>,
    _admin: Admin,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let min: tracing::Level = match q.level.as_deref() {
        None => tracing::Level::TRACE,
        Some(l) => l.parse().map_err(|_| {
            ApiError::query(crate::error::Error::invalid(
                "level",
                "enum",
                "Input should be 'trace', 'debug', 'info', 'warn' or 'error'",
            ))
        })?,
    };
    let rx = crate::telemetry::subscribe_logs();
    let records = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |r| {
        futures::future::ready(match r {
            // Level order: ERROR < WARN < … < TRACE, so "at least as severe" is <=.
            Ok(rec) if rec.level <= min => Some(frame(None, None, &rec.json)),
            _ => None,
        })
    });
    Ok(sse(&state, records))
}

/// `GET /stock-prices`: the simulated ticker (shared with the WebSocket).
#[utoipa::path(get, path = "/stock-prices", tag = "streams",
    responses((status = 200, description = "simulated quotes, `{\"symbol\": \"AAPL\", \"price\": 123.45}`", content_type = "text/event-stream", body = String)))]
async fn stock_prices(State(state): State<AppState>) -> Response {
    let ticks = tokio_stream::wrappers::BroadcastStream::new(state.ticker.subscribe())
        .filter_map(|t| futures::future::ready(t.ok().map(|json| frame(None, None, &json))));
    sse(&state, ticks)
}

/// The live dashboard.
#[utoipa::path(get, path = "/ui", tag = "meta", responses((status = 200, content_type = "text/html", body = String)))]
async fn ui() -> Html<&'static str> {
    Html(include_str!("ui.html"))
}

/// The HTTP routes of this module, for the main app's document. The
/// WebSockets are left out, as FastAPI leaves them out: OpenAPI cannot say
/// what an upgrade carries.
#[derive(OpenApi)]
#[openapi(
    paths(counter, named, feed, broadcasts, broadcast, create_task, get_task, progress, logs, stock_prices, ui),
    tags((name = "streams", description = "Server-Sent Events: `text/event-stream` that stays open"))
)]
pub struct RealtimeApi;

/// Only the domain event feed: what the orders service offers its consumers.
pub fn feed_router() -> Router<AppState> {
    Router::new().route("/events/feed", get(feed))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/events", get(counter))
        .route("/events/named", get(named))
        .route("/events/feed", get(feed))
        .route("/stream", get(broadcasts))
        .route("/broadcast", post(broadcast))
        .route("/tasks", post(create_task))
        .route("/tasks/{task_id}", get(get_task))
        .route("/progress/{task_id}", get(progress))
        .route("/logs", get(logs))
        .route("/stock-prices", get(stock_prices))
        .route("/ws", get(ws::echo))
        .route("/ws/stock-prices", get(ws::stock_prices))
        .route("/ui", get(ui))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_the_sse_format() {
        assert_eq!(
            frame(Some(3), Some("message"), "{}"),
            "event: message\ndata: {}\nid: 3\n\n"
        );
        assert_eq!(frame(None, None, "a\nb"), "data: a\ndata: b\n\n");
    }

    #[test]
    fn last_event_id_ignores_junk() {
        let mut h = HeaderMap::new();
        assert_eq!(last_event_id(&h), None);
        h.insert("last-event-id", "42".parse().unwrap());
        assert_eq!(last_event_id(&h), Some(42));
        h.insert("last-event-id", "abc".parse().unwrap());
        assert_eq!(last_event_id(&h), None);
        h.insert("last-event-id", "-3".parse().unwrap());
        assert_eq!(last_event_id(&h), None);
    }

    #[test]
    fn notifications_name_the_entity() {
        let event = |kind: &str, payload: &str| Event::new(7, kind, payload, Utc::now()).unwrap();
        assert_eq!(
            describe(&event("user.created", r#"{"id":3}"#)),
            "User 3 created"
        );
        assert_eq!(
            describe(&event("order.created", r#"{"order_id":2}"#)),
            "Order 2 created"
        );
        assert_eq!(
            describe(&event("broadcast", r#"{"message":"hi"}"#)),
            "Broadcast: hi"
        );
        assert_eq!(
            describe(&event("task.progress", r#"{"task_id":"t1","progress":40}"#)),
            "Task t1 at 40%"
        );
        assert_eq!(
            describe(&event("task.completed", r#"{"task_id":"t1"}"#)),
            "Task t1 completed"
        );
    }
}
