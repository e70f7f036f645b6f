//! gRPC (SPEC §5) with a real tonic client: every RPC, every status code,
//! pagination, the optional category filter, streaming, health, reflection,
//! and cross-protocol visibility.

use futures::StreamExt;
use prism::grpc::pb::{
    prism::{
        ChatSend, DomainEvent, SubscribeRequest, chat_client::ChatClient,
        events_client::EventsClient,
    },
    product::{
        Category, GetProductRequest, ListProductsRequest, Price, Product,
        product_service_client::ProductServiceClient,
    },
    user::{CreateUserRequest, StreamRequest, UserRequest, user_service_client::UserServiceClient},
};
use reqwest::StatusCode;
use serde_json::json;
use tonic::{Code, Request};

use crate::helpers::{TestApp, WAIT, spawn_app, spawn_with_idle_timeout, succeeds};

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// One unary call made by hand on a connection of its own, so that a test
/// holds the connection and picks the headers. With no `message` the request
/// body never ends. Returns the call's `grpc-status`, the connection's sender
/// (while it lives, the client does not close the connection) and its task,
/// which ends when the server closes the connection.
async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    message: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> (
    String,
    hyper::client::conn::http2::SendRequest<RawBody>,
    tokio::task::JoinHandle<()>,
) {
    use http_body_util::{BodyExt, Either, Full, StreamBody};
    let tcp = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect hung")
        .unwrap();
    let (mut send, conn) = tokio::time::timeout(
        WAIT,
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        ),
    )
    .await
    .expect("HTTP/2 handshake hung")
    .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let body: RawBody = match message {
        Some(m) => {
            let mut framed = vec![0];
            framed.extend((m.len() as u32).to_be_bytes());
            framed.extend(m);
            Either::Left(Full::new(bytes::Bytes::from(framed)))
        }
        None => Either::Right(StreamBody::new(futures::stream::pending())),
    };
    let mut req = hyper::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = tokio::time::timeout(WAIT, send.send_request(req.body(body).unwrap()))
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let in_head = response.headers().get("grpc-status").cloned();
    let rest = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("the answer's body hung")
        .unwrap();
    let status = in_head
        .or_else(|| rest.trailers()?.get("grpc-status").cloned())
        .expect("no grpc-status");
    (status.to_str().unwrap().to_owned(), send, conn)
}

type RawBody = http_body_util::Either<
    http_body_util::Full<bytes::Bytes>,
    http_body_util::StreamBody<
        futures::stream::Pending<
            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >,
    >,
>;

fn gizmo() -> Product {
    Product {
        id: 0,
        name: "Gizmo".into(),
        description: "A gizmo".into(),
        price: Some(Price {
            amount: 5.5,
            currency: "EUR".into(),
        }),
        category: Category::Food as i32,
        tags: vec!["a".into()],
        metadata: [("k".to_owned(), "v".to_owned())].into(),
    }
}

#[tokio::test]
async fn user_service_rpcs_and_statuses() {
    let app = spawn_app().await;
    let mut users = UserServiceClient::new(app.grpc().await);
    let alice = users
        .get_user(UserRequest { id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (alice.id, alice.name.as_str(), alice.email.as_str()),
        (1, "Alice", "alice@example.com")
    );

    let missing = users.get_user(UserRequest { id: 999 }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "User not found");

    let new = CreateUserRequest {
        name: "Grace".into(),
        email: "grace@example.com".into(),
    };
    let err = users.create_user(new.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = users
        .create_user(authed(new.clone(), "forged"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let token = app.alice_token().await;
    let created = users
        .create_user(authed(new.clone(), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "Grace");
    // Visible over REST at once.
    let (status, body) = app.get_json(&format!("/users/{}", created.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["email"], "grace@example.com");

    let dup = users.create_user(authed(new, &token)).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let bad = users
        .create_user(authed(
            CreateUserRequest {
                name: String::new(),
                email: "nope".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    app.stop().await;
}

#[tokio::test]
async fn stream_users_respects_the_limit_and_ends() {
    let app = spawn_app().await;
    let mut users = UserServiceClient::new(app.grpc().await);
    for (limit, expected) in [
        (2, vec![1, 2]),
        (0, vec![1, 2, 3]),
        (-5, vec![1, 2, 3]),
        (10, vec![1, 2, 3]),
    ] {
        let stream = users
            .stream_users(StreamRequest { limit })
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<i32> =
            tokio::time::timeout(WAIT, stream.map(|u| u.unwrap().id).collect::<Vec<_>>())
                .await
                .expect("stream did not end");
        assert_eq!(ids, expected, "limit {limit}");
    }
    app.stop().await;
}

#[tokio::test]
async fn product_service_rpcs_paging_and_filters() {
    let app = spawn_app().await;
    let mut products = ProductServiceClient::new(app.grpc().await);
    let widget = products
        .get_product(GetProductRequest { id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(widget.name, "Widget");
    assert_eq!(widget.price.as_ref().unwrap().amount, 9.99);
    assert_eq!(widget.category, Category::Electronics as i32);
    assert_eq!(widget.tags, ["tools"]);
    assert_eq!(widget.metadata["color"], "blue");
    let missing = products
        .get_product(GetProductRequest { id: 42 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "Product 42 not found");

    let list = |page, page_size, category: Option<Category>| ListProductsRequest {
        page,
        page_size,
        category: category.map(|c| c as i32),
    };
    let all = products
        .list_products(list(0, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.total_count, 2);
    assert_eq!(all.products.len(), 2);
    // ELECTRONICS is 0, the default: present means filter, absent means none.
    let electronics = products
        .list_products(list(1, 10, Some(Category::Electronics)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            electronics.total_count,
            electronics.products[0].name.as_str()
        ),
        (1, "Widget")
    );
    let books = products
        .list_products(list(1, 10, Some(Category::Books)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(books.products[0].name, "Gadget");
    let second = products
        .list_products(list(2, 1, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.total_count, second.products[0].name.as_str()),
        (2, "Gadget")
    );
    let beyond = products
        .list_products(list(9, 1, None))
        .await
        .unwrap()
        .into_inner();
    assert!(beyond.products.is_empty());
    let negative = products
        .list_products(list(-3, 500, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        negative.products.len(),
        2,
        "page < 1 is page 1; page_size capped, not refused"
    );
    let bad = products
        .list_products(ListProductsRequest {
            page: 1,
            page_size: 1,
            category: Some(17),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // Writes: token needed, admin role needed.
    assert_eq!(
        products.create_product(gizmo()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let alice = app.alice_token().await;
    assert_eq!(
        products
            .create_product(authed(gizmo(), &alice))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let admin = app.admin_token().await;
    let created = products
        .create_product(authed(gizmo(), &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.id, 3);
    let (_, rest) = app.get_json("/products/3").await;
    assert_eq!(rest["name"], "Gizmo");
    let mut changed = created.clone();
    changed.name = "Gizmo 2".into();
    let updated = products
        .update_product(authed(changed.clone(), &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.name, "Gizmo 2");
    changed.id = 99;
    assert_eq!(
        products
            .update_product(authed(changed, &admin))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let mut invalid = gizmo();
    invalid.price = Some(Price {
        amount: -1.0,
        currency: "EUR".into(),
    });
    assert_eq!(
        products
            .create_product(authed(invalid, &admin))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let mut priceless = gizmo();
    priceless.price = None;
    let refused = products
        .create_product(authed(priceless, &admin))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(refused.message(), "price: Field required");
    products
        .delete_product(authed(GetProductRequest { id: 3 }, &admin))
        .await
        .unwrap();
    assert_eq!(
        products
            .delete_product(authed(GetProductRequest { id: 3 }, &admin))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        products
            .delete_product(authed(GetProductRequest { id: 1 }, &alice))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    app.stop().await;
}

/// The codec's buffers start small (`prism::grpc::Codec`): a message many
/// times their size still arrives whole, both ways.
#[tokio::test]
async fn messages_larger_than_the_codec_buffers_go_both_ways() {
    let app = spawn_app().await;
    let mut products = ProductServiceClient::new(app.grpc().await);
    let admin = app.admin_token().await;
    let mut big = gizmo();
    big.description = "é".repeat(4_500);
    let created = products
        .create_product(authed(big.clone(), &admin))
        .await
        .unwrap()
        .into_inner();
    let fetched = products
        .get_product(GetProductRequest { id: created.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.description, big.description);
    app.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_resource_exhausted() {
    let app = spawn_app().await;
    let mut products =
        ProductServiceClient::new(app.grpc().await).max_encoding_message_size(64 << 20);
    let admin = app.admin_token().await;
    let mut huge = gizmo();
    huge.description = "x".repeat(5 << 20);
    let err = products
        .create_product(authed(huge, &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    app.stop().await;
}

#[tokio::test]
async fn chat_is_bidirectional_over_the_event_log() {
    let app = spawn_app().await;
    let token = app.alice_token().await;
    let mut chat = ChatClient::new(app.grpc().await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut incoming = chat
        .chat(authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    tx.send(ChatSend {
        content: "over gRPC".into(),
    })
    .await
    .unwrap();
    let first = tokio::time::timeout(WAIT, incoming.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((first.content.as_str(), first.user_id), ("over gRPC", 1));
    // Messages from other protocols arrive on the same stream.
    app.send_json(
        reqwest::Method::POST,
        "/messages",
        Some(&token),
        Some(json!({"content": "over REST"})),
    )
    .await;
    let second = tokio::time::timeout(WAIT, incoming.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.content, "over REST");
    assert!(second.event_id > first.event_id);
    // And what the chat sent is in the domain.
    let (_, messages) = app.get_json("/messages?user_id=1").await;
    assert!(
        messages
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["content"] == "over gRPC")
    );

    // Without a token, listening works but sending ends the call.
    let (tx2, rx2) = tokio::sync::mpsc::channel(4);
    let mut anon = chat
        .chat(Request::new(tokio_stream::wrappers::ReceiverStream::new(
            rx2,
        )))
        .await
        .unwrap()
        .into_inner();
    tx2.send(ChatSend {
        content: "who am I".into(),
    })
    .await
    .unwrap();
    let err = tokio::time::timeout(WAIT, anon.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Reconnecting with the last event id seen replays what came after it.
    let (_tx3, rx3) = tokio::sync::mpsc::channel::<ChatSend>(1);
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx3));
    request
        .metadata_mut()
        .insert("last-event-id", first.event_id.to_string().parse().unwrap());
    let mut resumed = chat.chat(request).await.unwrap().into_inner();
    let replayed = tokio::time::timeout(WAIT, resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (replayed.content.as_str(), replayed.event_id),
        ("over REST", second.event_id)
    );
    let (_tx4, rx4) = tokio::sync::mpsc::channel::<ChatSend>(1);
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx4));
    request
        .metadata_mut()
        .insert("last-event-id", "yesterday".parse().unwrap());
    let err = chat.chat(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    app.stop().await;
}

/// A subscription to the event feed; the channel's timeout bounds the wait
/// for it to start.
async fn subscribe(
    events: &mut EventsClient<tonic::transport::Channel>,
    after_id: Option<i64>,
    types: &[&str],
) -> tonic::Streaming<DomainEvent> {
    events
        .subscribe(SubscribeRequest {
            after_id,
            types: types.iter().map(|t| (*t).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Places an order over REST and checks that `live` delivers its
/// `order.created` next; returns the event.
async fn order_is_delivered(
    app: &TestApp,
    token: &str,
    live: &mut tonic::Streaming<DomainEvent>,
) -> DomainEvent {
    let (_, order) = app
        .send_json(
            reqwest::Method::POST,
            "/orders",
            Some(token),
            Some(json!({"total": 7.5})),
        )
        .await;
    let ev = tokio::time::timeout(WAIT, live.next())
        .await
        .expect("no event")
        .expect("the stream ended")
        .unwrap();
    assert_eq!(ev.r#type, "order.created");
    let payload: serde_json::Value = serde_json::from_str(&ev.payload_json).unwrap();
    assert_eq!(payload["order_id"], order["id"]);
    ev
}

#[tokio::test]
async fn event_feed_resumes_from_an_id() {
    let app = spawn_app().await;
    let token = app.alice_token().await;
    let mut events = EventsClient::new(app.grpc().await);
    let mut live = subscribe(&mut events, None, &["order.*"]).await;
    let ev = order_is_delivered(&app, &token, &mut live).await;
    // Replay from the start of the log: the demo's two orders, then this one.
    let mut replay = subscribe(&mut events, Some(0), &["order.created"]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(WAIT, replay.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        ids.push(e.id);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*ids.last().unwrap(), ev.id);
    app.stop().await;
}

#[tokio::test]
async fn health_and_reflection_answer() {
    let app = spawn_app().await;
    let channel = app.grpc().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "user.UserService", "product.ProductService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = tokio::time::timeout(WAIT, responses.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "user.UserService",
        "product.ProductService",
        "prism.v1.Chat",
        "prism.v1.Events",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    let (_, index) = app.get_json("/").await;
    assert_eq!(index["grpc"], app.grpc_addr.port());
    app.stop().await;
}

/// A different gRPC implementation: Python grpcio stubs generated by
/// grpcio-tools, from prism's protos and from the seed's own text, call every
/// RPC (tests/python/interop.py).
#[tokio::test]
async fn python_grpcio_stubs_interoperate() {
    let have_grpc = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_grpc {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("grpcio is missing: pip install -r tests/python/requirements.txt");
        }
        eprintln!(
            "SKIPPED: Python gRPC interoperability (pip install -r tests/python/requirements.txt)"
        );
        return;
    }
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let alice = app.alice_token().await;
    let root = env!("CARGO_MANIFEST_DIR");
    for protos in ["proto", "tests/python/seed"] {
        let mut interop = tokio::process::Command::new("python3");
        interop
            .args([
                "tests/python/interop.py",
                protos,
                &app.grpc_addr.to_string(),
                &admin,
                &alice,
            ])
            .current_dir(root);
        let what = format!("Python grpcio interop with stubs from {protos}");
        succeeds(interop, std::time::Duration::from_secs(120), &what).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn shutdown_ends_server_streams() {
    let app = spawn_app().await;
    let mut events = EventsClient::new(app.grpc().await);
    let mut live = subscribe(&mut events, None, &[]).await;
    let stopping = tokio::spawn(app.stop());
    // The stream completes cleanly rather than hanging or erroring.
    let end = tokio::time::timeout(WAIT, live.next())
        .await
        .expect("stream did not end");
    assert!(end.is_none(), "expected the end of the stream, got {end:?}");
    stopping.await.unwrap();
}

/// gRPC connections are watched like HTTP ones: one that never speaks and an
/// HTTP/2 connection whose calls have all ended are closed after the idle
/// timeout; a server stream, however quiet, keeps its connection.
#[tokio::test]
async fn idle_grpc_connections_are_closed_but_quiet_streams_are_not() {
    use tokio::io::AsyncReadExt;
    let app = spawn_with_idle_timeout(std::time::Duration::from_millis(100)).await;
    let token = app.alice_token().await;
    let mut live = subscribe(
        &mut EventsClient::new(app.grpc().await),
        None,
        &["order.created"],
    )
    .await;

    let mut silent = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(app.grpc_addr))
        .await
        .expect("connect hung")
        .unwrap();
    let (status, _send, served) = raw_call(
        app.grpc_addr,
        "/grpc.health.v1.Health/Check",
        Some(&[]),
        &[],
    )
    .await;
    assert_eq!(status, "0");
    let mut got = Vec::new();
    // A reset counts as closed.
    let _ = tokio::time::timeout(WAIT, silent.read_to_end(&mut got))
        .await
        .expect("the silent connection was never closed");
    assert!(got.is_empty(), "{got:?}");
    tokio::time::timeout(WAIT, served)
        .await
        .expect("the idle HTTP/2 connection was never closed")
        .unwrap();

    // The stream, older than both and silent all along, still delivers.
    order_is_delivered(&app, &token, &mut live).await;
    app.stop().await;
}

/// A call's `grpc-timeout` is its deadline on the server too: a call whose
/// message never arrives and a stream still going when it passes end with
/// DEADLINE_EXCEEDED, and a call within its deadline is served.
#[tokio::test]
async fn grpc_timeout_is_the_calls_deadline() {
    let app = spawn_app().await;
    let get_user = "/user.UserService/GetUser";
    let (status, _send, _conn) =
        raw_call(app.grpc_addr, get_user, None, &[("grpc-timeout", "100m")]).await;
    let deadline_exceeded = (Code::DeadlineExceeded as i32).to_string();
    assert_eq!(status, deadline_exceeded);
    // The live feed with no event to send: it would go on for ever.
    let (status, _send, _conn) = raw_call(
        app.grpc_addr,
        "/prism.v1.Events/Subscribe",
        Some(&[]),
        &[("grpc-timeout", "200m")],
    )
    .await;
    assert_eq!(status, deadline_exceeded);
    // UserRequest { id: 1 }: field 1, varint 1.
    let (status, _send, _conn) = raw_call(
        app.grpc_addr,
        get_user,
        Some(&[0x08, 0x01]),
        &[("grpc-timeout", "5S")],
    )
    .await;
    assert_eq!(status, "0");
    app.stop().await;
}
