//! GraphQL subscriptions over WebSocket, in both protocols: the current
//! `graphql-transport-ws` and the legacy `graphql-ws`
//! (subscriptions-transport-ws) that the seed's Strawberry router also offers.
//!
//! async-graphql's protocol state machine does the message work; this loop
//! owns the socket so that prism can add what a production server needs and
//! the state machine lacks: an operation sent before `connection_ack` closes
//! the socket with 4401 (in both protocols); the legacy protocol gets its `ka`
//! keep-alives; frames are capped; and on shutdown every running subscription
//! is completed before the socket closes with 1001.

use std::{collections::HashSet, sync::atomic::Ordering, time::Duration};

use async_graphql::http::{WebSocket as Protocol, WebSocketProtocols as Protocols, WsMessage};
use axum::{
    extract::ws::{CloseFrame, Message, WebSocket},
    http::HeaderMap,
};
use futures::{SinkExt, StreamExt};
use serde_json::Value;

use super::{GraphqlState, connection_token, operation_data, schema::Caller};

/// How often the legacy protocol's `ka` is sent.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long shutdown waits for subscriptions to report `complete`.
const DRAIN: Duration = Duration::from_secs(2);

/// The subprotocol the client offered that prism speaks, if any.
pub fn negotiate(headers: &HeaderMap) -> Option<Protocols> {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().parse::<Protocols>().ok())
}

/// The `type` and `id` of a protocol message (anything else is left to the
/// state machine, which rejects it).
fn kind_and_id(text: &str) -> (Option<String>, Option<String>) {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => (
            v.get("type").and_then(Value::as_str).map(str::to_owned),
            v.get("id").and_then(Value::as_str).map(str::to_owned),
        ),
        Err(_) => (None, None),
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

pub async fn serve(gs: GraphqlState, socket: WebSocket, protocol: Protocols) {
    let stats = gs.app.stats.clone();
    stats.websocket_connections.fetch_add(1, Ordering::Relaxed);
    run(gs, socket, protocol).await;
    stats.websocket_connections.fetch_sub(1, Ordering::Relaxed);
}

async fn run(gs: GraphqlState, socket: WebSocket, protocol: Protocols) {
    let legacy = matches!(protocol, Protocols::SubscriptionsTransportWS);
    let (mut sink, mut source) = socket.split();
    let (to_protocol, from_client) = tokio::sync::mpsc::channel::<String>(32);
    let app = gs.app.clone();
    let mut machine = Protocol::new(
        gs.schema.clone(),
        tokio_stream::wrappers::ReceiverStream::new(from_client),
        protocol,
    )
    .on_connection_init(move |payload| async move {
        let caller = match connection_token(&payload) {
            None => Caller::Anonymous,
            Some(token) => match app.keys.verify(&token) {
                Ok(p) => Caller::User(p),
                // The client claims an identity that does not verify: refuse
                // the connection (the state machine closes it).
                Err(_) => return Err(async_graphql::Error::new("Forbidden: invalid token")),
            },
        };
        Ok(operation_data(&app.domain, caller, false))
    });

    let shutdown = gs.app.shutdown.clone();
    let mut acked = false;
    let mut running: HashSet<String> = HashSet::new();
    // Operations the client ended itself: graphql-transport-ws says the server
    // sends no `complete` for those (the state machine would echo one).
    let mut ended_by_client: HashSet<String> = HashSet::new();
    let mut keep_alive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            incoming = source.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(t))) => t.to_string(),
                    Some(Ok(Message::Binary(b))) => match String::from_utf8(b.to_vec()) {
                        Ok(t) => t,
                        Err(_) => {
                            let _ = sink.send(close(4400, "Messages must be UTF-8 JSON")).await;
                            return;
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Err(e)) => {
                        if is_too_big(&e) {
                            let _ = sink.send(close(1009, "Message too big")).await;
                        }
                        return;
                    }
                };
                let (kind, id) = kind_and_id(&text);
                match kind.as_deref() {
                    Some("subscribe" | "start") if !acked => {
                        let _ = sink.send(close(4401, "Unauthorized")).await;
                        return;
                    }
                    Some("subscribe" | "start") => { running.extend(id); }
                    Some("complete" | "stop") => {
                        if let Some(id) = &id {
                            running.remove(id);
                            if !legacy {
                                ended_by_client.insert(id.clone());
                            }
                        }
                    }
                    _ => {}
                }
                if to_protocol.send(text).await.is_err() {
                    return;
                }
            }
            outgoing = machine.next() => {
                let Some(msg) = outgoing else {
                    let _ = sink.send(close(1000, "")).await;
                    return;
                };
                if let WsMessage::Text(text) = &msg
                    && let (Some(kind), Some(id)) = kind_and_id(text)
                    && kind == "complete"
                    && ended_by_client.remove(&id)
                {
                    continue;
                }
                if !forward(&mut sink, msg, &mut acked, &mut running, legacy).await {
                    return;
                }
            }
            _ = keep_alive.tick(), if legacy && acked => {
                if sink.send(Message::Text(r#"{"type":"ka"}"#.into())).await.is_err() {
                    return;
                }
            }
            _ = shutdown.cancelled() => {
                // Subscriptions end on the same signal; pass their `complete`
                // messages on before closing.
                let drained = tokio::time::timeout(DRAIN, async {
                    while !running.is_empty() {
                        match machine.next().await {
                            Some(msg) => {
                                if !forward(&mut sink, msg, &mut acked, &mut running, legacy).await {
                                    return;
                                }
                            }
                            None => return,
                        }
                    }
                });
                let _ = drained.await;
                let _ = sink.send(close(1001, "Server shutting down")).await;
                return;
            }
        }
    }
}

/// Sends one protocol message; tracks the ack and finished operations.
/// Returns false when the connection is over.
async fn forward(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    msg: WsMessage,
    acked: &mut bool,
    running: &mut HashSet<String>,
    legacy: bool,
) -> bool {
    match msg {
        WsMessage::Text(text) => {
            let (kind, id) = kind_and_id(&text);
            match kind.as_deref() {
                Some("connection_ack") => *acked = true,
                Some("complete" | "error") => {
                    if let Some(id) = id {
                        running.remove(&id);
                    }
                }
                _ => {}
            }
            if sink.send(Message::Text(text.into())).await.is_err() {
                return false;
            }
            if legacy && kind.as_deref() == Some("connection_ack") {
                return sink
                    .send(Message::Text(r#"{"type":"ka"}"#.into()))
                    .await
                    .is_ok();
            }
            if kind.as_deref() == Some("connection_error") {
                // The legacy protocol reports a refused init as a message; the
                // connection is over either way.
                let _ = sink.send(close(4403, "Forbidden")).await;
                return false;
            }
            true
        }
        WsMessage::Close(code, reason) => {
            let code = if code == 1002 && reason.starts_with("Forbidden") {
                4403
            } else {
                code
            };
            let _ = sink.send(close(code, &reason)).await;
            false
        }
    }
}

/// True when the socket failed because a frame or message exceeded the limit.
pub fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string().to_lowercase();
    text.contains("too long") || text.contains("too big") || text.contains("space limit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_either_protocol() {
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            "foo, graphql-transport-ws".parse().unwrap(),
        );
        assert!(matches!(negotiate(&h), Some(Protocols::GraphQLWS)));
        h.insert("sec-websocket-protocol", "graphql-ws".parse().unwrap());
        assert!(matches!(
            negotiate(&h),
            Some(Protocols::SubscriptionsTransportWS)
        ));
        h.insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        assert!(negotiate(&h).is_none());
    }

    #[test]
    fn reads_type_and_id() {
        assert_eq!(
            kind_and_id(r#"{"type":"subscribe","id":"1","payload":{}}"#),
            (Some("subscribe".into()), Some("1".into()))
        );
        assert_eq!(kind_and_id("not json"), (None, None));
    }
}
