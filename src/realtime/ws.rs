//! Plain WebSockets: `/ws` echoes, `/ws/stock-prices` streams the ticker.
//! Both count themselves in `/admin/stats`, cap message size (close 1009
//! above it), and close with 1001 when the server shuts down.

use std::sync::atomic::Ordering;

use axum::{
    extract::{
        State, WebSocketUpgrade,
        ws::{CloseFrame, Message, WebSocket},
    },
    response::Response,
};
use futures::{SinkExt, StreamExt};

use crate::{graphql::ws::is_too_big, state::AppState};

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Bytes a WebSocket reads at a time. tungstenite's default (128 KiB) is
/// zero-filled up front, so every idle connection would hold that much: with
/// 10,000 GraphQL subscribers, 1.4 GB of the server's memory. Messages here
/// are small; a larger one still arrives whole, in more reads.
const READ_BUFFER: usize = 4 * 1024;

/// prism's limits on a WebSocket: frames and messages up to `max_frame`
/// bytes (close 1009 above it), and a small read buffer.
pub fn with_limits(ws: WebSocketUpgrade, max_frame: usize) -> WebSocketUpgrade {
    ws.max_frame_size(max_frame)
        .max_message_size(max_frame)
        .read_buffer_size(READ_BUFFER)
}

/// Upgrades with prism's limits and runs `session` as a tracked, counted task.
fn upgrade<F, Fut>(state: AppState, ws: WebSocketUpgrade, session: F) -> Response
where
    F: FnOnce(AppState, WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = state.config.max_ws_frame;
    with_limits(ws, limit).on_upgrade(move |socket| {
        let sessions = state.sessions.clone();
        sessions.track_future(async move {
            let stats = state.stats.clone();
            stats.websocket_connections.fetch_add(1, Ordering::Relaxed);
            session(state, socket).await;
            stats.websocket_connections.fetch_sub(1, Ordering::Relaxed);
        })
    })
}

/// `WS /ws`: text `hi` → `Echo: hi`; binary frames come back as they were.
pub async fn echo(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    upgrade(state, ws, |state, mut socket| async move {
        loop {
            tokio::select! {
                msg = socket.recv() => {
                    let reply = match msg {
                        Some(Ok(Message::Text(t))) => Message::Text(format!("Echo: {}", t.as_str()).into()),
                        Some(Ok(Message::Binary(b))) => Message::Binary(b),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) | None => return,
                        Some(Err(e)) => {
                            if is_too_big(&e) {
                                let _ = socket.send(close(1009, "Message too big")).await;
                            }
                            return;
                        }
                    };
                    if socket.send(reply).await.is_err() {
                        return;
                    }
                }
                _ = state.shutdown.cancelled() => {
                    let _ = socket.send(close(1001, "Server shutting down")).await;
                    return;
                }
            }
        }
    })
}

/// `WS /ws/stock-prices`: the simulated ticker as JSON text messages.
pub async fn stock_prices(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    upgrade(state, ws, |state, socket| async move {
        let mut ticks = state.ticker.subscribe();
        let (mut sink, mut source) = socket.split();
        loop {
            tokio::select! {
                tick = ticks.recv() => match tick {
                    Ok(json) => {
                        if sink.send(Message::Text(json.as_ref().into())).await.is_err() {
                            return;
                        }
                    }
                    // Too slow for the ticker: skip to the latest price.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                msg = source.next() => match msg {
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Err(e)) => {
                        if is_too_big(&e) {
                            let _ = sink.send(close(1009, "Message too big")).await;
                        }
                        return;
                    }
                    Some(Ok(_)) => {} // nothing to say to a ticker
                },
                _ = state.shutdown.cancelled() => {
                    let _ = sink.send(close(1001, "Server shutting down")).await;
                    return;
                }
            }
        }
    })
}
