//! GraphQL subscriptions over WebSocket, in both protocols: the current
//! `graphql-transport-ws` and the legacy `graphql-ws`
//! (subscriptions-transport-ws) that the seed's Strawberry router also offers.
//!
//! async-graphql's protocol state machine does the message work; this loop
//! owns the socket so that prism can add what a production server needs and
//! the state machine lacks: an operation sent before `connection_ack` closes
//! the socket with 4401 (in both protocols), and one whose id is already
//! running with 4409 (graphql-transport-ws); the legacy protocol gets its `ka`
//! keep-alives; a socket not initialised within the client idle timeout is
//! closed with 4408; frames are capped; and on shutdown every running subscription
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

/// The `type` and `id` of a message from the state machine. An operation's
/// results, nearly every message a subscriber is sent, need no tracking: the
/// state machine writes them as `{"type":"next",…` (`data` in the legacy
/// protocol), and they are passed on without parsing.
fn outgoing_kind_and_id(text: &str) -> (Option<String>, Option<String>) {
    if text.starts_with(r#"{"type":"next","#) || text.starts_with(r#"{"type":"data","#) {
        return (None, None);
    }
    kind_and_id(text)
}

/// A close frame. Its reason is cut to the 123 bytes a close frame has room
/// for (RFC 6455: a control frame carries at most 125, two of them the code):
/// the protocol state machine's reasons quote the client's bad message, and
/// a longer one makes the frame invalid, so the client would see a protocol
/// error in place of the reason.
fn close(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
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
        gs.subscriptions.clone(),
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
    // A socket that never sends `connection_init` holds a connection for
    // nothing: it is closed once the client idle timeout passes without an
    // ack (graphql-transport-ws names the code, 4408; Strawberry waits a
    // minute, as prism does by default).
    let init_deadline = tokio::time::sleep(gs.app.config.client_idle_timeout);
    tokio::pin!(init_deadline);
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
                    // graphql-transport-ws: an id already in use closes the
                    // socket (the state machine would quietly replace the
                    // first operation with the second).
                    Some("subscribe") if !legacy && id.as_ref().is_some_and(|id| running.contains(id)) => {
                        let id = id.unwrap_or_default();
                        let _ = sink.send(close(4409, &format!("Subscriber for {id} already exists"))).await;
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
                    && let (Some(kind), Some(id)) = outgoing_kind_and_id(text)
                    && kind == "complete"
                    && ended_by_client.remove(&id)
                {
                    continue;
                }
                if !forward(&mut sink, msg, &mut acked, &mut running, legacy).await {
                    return;
                }
            }
            _ = &mut init_deadline, if !acked => {
                let _ = sink.send(close(4408, "Connection initialisation timeout")).await;
                return;
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
            let (kind, id) = outgoing_kind_and_id(&text);
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
            // The state machine closes with 1002 for what it refuses;
            // graphql-transport-ws has codes of its own for both cases.
            let code = match code {
                1002 if reason.starts_with("Forbidden") => 4403,
                1002 if !legacy => 4400,
                code => code,
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
    fn close_reasons_fit_in_a_close_frame() {
        let long = "é".repeat(100);
        let Message::Close(Some(frame)) = close(4400, &long) else {
            unreachable!()
        };
        assert!(frame.reason.len() <= 123);
        assert!(long.starts_with(frame.reason.as_str()));
        let Message::Close(Some(frame)) = close(4401, "Unauthorized") else {
            unreachable!()
        };
        assert_eq!(frame.reason.as_str(), "Unauthorized");
    }

    #[test]
    fn results_pass_unparsed_and_the_rest_is_read() {
        for result in [
            r#"{"type":"next","id":"1","payload":{"data":{"type":"complete"}}}"#,
            r#"{"type":"data","id":"1","payload":{"data":null}}"#,
        ] {
            assert_eq!(outgoing_kind_and_id(result), (None, None));
        }
        assert_eq!(
            outgoing_kind_and_id(r#"{"type":"complete","id":"7"}"#),
            (Some("complete".into()), Some("7".into()))
        );
        assert_eq!(
            outgoing_kind_and_id(r#"{"type":"connection_ack"}"#),
            (Some("connection_ack".into()), None)
        );
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
