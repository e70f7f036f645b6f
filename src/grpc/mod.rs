//! gRPC (SPEC §5): the seed's `user.UserService` and `product.ProductService`,
//! prism's own `prism.v1.Chat` (bidirectional) and `prism.v1.Events`
//! (server-streaming), standard health checking and server reflection.
//!
//! Like every adapter, the services decode, call the domain, encode; domain
//! errors map to status codes in one place ([`status`]). Writes need
//! `authorization: Bearer <token>` metadata. Server streams are produced
//! lazily (a page or an event at a time, as the client's flow control allows),
//! so a slow client never makes the server buffer without bound.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    auth::Principal,
    domain::{self, Category, Domain, NewProduct, NewUser, Page, Price},
    error::Error,
    events::{EventFilter, Item},
    state::AppState,
};

/// Generated code for the protos in `proto/`.
pub mod pb {
    pub mod user {
        tonic::include_proto!("user");
    }
    pub mod product {
        tonic::include_proto!("product");
    }
    pub mod prism {
        tonic::include_proto!("prism.v1");
    }
    /// The descriptor set of all of them, for server reflection.
    pub const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
}

use pb::{
    prism::{
        ChatMessage, ChatSend, DomainEvent, SubscribeRequest, chat_server::Chat,
        events_server::Events,
    },
    product::{
        GetProductRequest, ListProductsRequest, Product as PbProduct, ProductList,
        product_service_server::ProductService,
    },
    user::{
        CreateUserRequest, StreamRequest, UserRequest, UserResponse,
        user_service_server::UserService,
    },
};

/// prost's codec with smaller buffers, for every generated service and
/// client (`build.rs`). tonic starts each call's encode and decode buffers at
/// 8 KiB; a long-lived stream keeps its encoder's for as long as it lasts, so
/// 10,000 event subscribers held 80 MB for messages of a few hundred bytes.
/// A larger message still grows the buffer as it needs.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

/// Bytes each call's encode and decode buffers start with.
const CODEC_BUFFER: usize = 1024;

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(buffers())
    }
}

fn buffers() -> tonic::codec::BufferSettings {
    // tonic's own yield threshold (32 KiB): a stream hands its batch on once
    // that much is encoded.
    tonic::codec::BufferSettings::new(CODEC_BUFFER, 32 * 1024)
}

/// Largest message accepted or sent (RESOURCE_EXHAUSTED above).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The one mapping from domain errors to gRPC statuses.
pub fn status(e: Error) -> Status {
    match e {
        Error::NotFound(m) => Status::not_found(m),
        Error::Conflict(m) => Status::already_exists(m),
        Error::Validation(fields) => Status::invalid_argument(
            fields
                .iter()
                .map(|f| format!("{}: {}", f.field, f.msg))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Error::BadRequest(m) => Status::invalid_argument(m),
        Error::Unauthenticated(m) => Status::unauthenticated(m),
        Error::Forbidden(m) => Status::permission_denied(m),
        Error::RateLimited { .. } => Status::resource_exhausted("Too many attempts"),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Internal(cause) => {
            tracing::error!(error = %format!("{cause:#}"), "internal error in a gRPC call");
            Status::internal("Internal error")
        }
    }
}

/// The caller named by `authorization: Bearer …` metadata.
fn principal(state: &AppState, metadata: &MetadataMap) -> Result<Principal, Status> {
    let value = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("Not authenticated"))?;
    let token = match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => return Err(Status::unauthenticated("Not authenticated")),
    };
    let p = state.keys.verify(token).map_err(status)?;
    state.stats.saw_user(p.user_id);
    Ok(p)
}

fn id64(id: i32) -> i64 {
    i64::from(id)
}

fn id32(id: i64) -> i32 {
    i32::try_from(id).unwrap_or(i32::MAX)
}

fn user_response(u: &domain::User) -> UserResponse {
    UserResponse {
        id: id32(u.id),
        name: u.name.clone(),
        email: u.email.clone(),
    }
}

fn category_from_pb(c: i32) -> Result<Category, Status> {
    use pb::product::Category as C;
    match C::try_from(c) {
        Ok(C::Electronics) => Ok(Category::Electronics),
        Ok(C::Clothing) => Ok(Category::Clothing),
        Ok(C::Food) => Ok(Category::Food),
        Ok(C::Books) => Ok(Category::Books),
        Err(_) => Err(Status::invalid_argument(format!("Unknown category {c}"))),
    }
}

fn category_to_pb(c: Category) -> i32 {
    use pb::product::Category as C;
    match c {
        Category::Electronics => C::Electronics as i32,
        Category::Clothing => C::Clothing as i32,
        Category::Food => C::Food as i32,
        Category::Books => C::Books as i32,
    }
}

fn product_to_pb(p: &domain::Product) -> PbProduct {
    PbProduct {
        id: id32(p.id),
        name: p.name.clone(),
        description: p.description.clone(),
        price: Some(pb::product::Price {
            amount: p.price.amount,
            currency: p.price.currency.clone(),
        }),
        category: category_to_pb(p.category),
        tags: p.tags.clone(),
        metadata: p
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn product_from_pb(p: PbProduct) -> Result<NewProduct, Status> {
    // proto3 cannot require a field; without this a product sent with no
    // price would be refused for its empty currency, which it never set.
    let price = p
        .price
        .ok_or_else(|| status(Error::invalid("price", "missing", "Field required")))?;
    Ok(NewProduct {
        name: p.name,
        description: p.description,
        price: Price {
            amount: price.amount,
            currency: price.currency,
        },
        category: category_from_pb(p.category)?,
        tags: p.tags,
        metadata: p.metadata.into_iter().collect(),
    })
}

/// Implements every service over the shared application state.
#[derive(Clone)]
pub struct Services {
    state: AppState,
}

impl Services {
    pub fn new(state: AppState) -> Self {
        Services { state }
    }

    fn domain(&self) -> &Domain {
        &self.state.domain
    }
}

#[tonic::async_trait]
impl UserService for Services {
    async fn get_user(&self, req: Request<UserRequest>) -> Result<Response<UserResponse>, Status> {
        let user = self
            .domain()
            .get_user(id64(req.get_ref().id))
            .await
            .map_err(status)?;
        Ok(Response::new(user_response(&user)))
    }

    async fn create_user(
        &self,
        req: Request<CreateUserRequest>,
    ) -> Result<Response<UserResponse>, Status> {
        let by = principal(&self.state, req.metadata())?;
        let CreateUserRequest { name, email } = req.into_inner();
        let user = self
            .domain()
            .create_user(
                &by,
                NewUser {
                    name,
                    email,
                    age: None,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(user_response(&user)))
    }

    type StreamUsersStream = BoxStream<UserResponse>;

    /// Users in id order, `limit` of them (all when `limit <= 0`), read a page
    /// at a time as the client consumes them.
    async fn stream_users(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamUsersStream>, Status> {
        const PAGE: i64 = 100;
        let limit = req.get_ref().limit;
        let remaining = if limit <= 0 {
            i64::MAX
        } else {
            i64::from(limit)
        };
        let domain = self.domain().clone();
        let shutdown = self.state.shutdown.clone();
        let pages = futures::stream::unfold((0i64, remaining), move |(offset, remaining)| {
            let domain = domain.clone();
            async move {
                if remaining <= 0 {
                    return None;
                }
                let take = remaining.min(PAGE);
                match domain
                    .list_users(Page {
                        limit: take,
                        offset,
                    })
                    .await
                {
                    Ok(users) if users.is_empty() => None,
                    Ok(users) => {
                        let n = users.len() as i64;
                        let next = if n < take {
                            (offset + n, 0)
                        } else {
                            (offset + n, remaining - n)
                        };
                        let items: Vec<Result<UserResponse, Status>> =
                            users.iter().map(|u| Ok(user_response(u))).collect();
                        Some((futures::stream::iter(items), next))
                    }
                    Err(e) => Some((futures::stream::iter(vec![Err(status(e))]), (offset, 0))),
                }
            }
        })
        .flatten()
        .take_until(shutdown.cancelled_owned());
        Ok(Response::new(Box::pin(pages)))
    }
}

#[tonic::async_trait]
impl ProductService for Services {
    async fn get_product(
        &self,
        req: Request<GetProductRequest>,
    ) -> Result<Response<PbProduct>, Status> {
        let p = self
            .domain()
            .get_product(id64(req.get_ref().id))
            .await
            .map_err(status)?;
        Ok(Response::new(product_to_pb(&p)))
    }

    /// 1-based pages: `page < 1` is page 1, `page_size` 0 is 20, capped at
    /// 100; the category filter applies only when the field is present.
    async fn list_products(
        &self,
        req: Request<ListProductsRequest>,
    ) -> Result<Response<ProductList>, Status> {
        let r = req.into_inner();
        let category = r.category.map(category_from_pb).transpose()?;
        let (window, _, _) = Page::numbered(Some(r.page.into()), Some(r.page_size.into()));
        let (products, total) = self
            .domain()
            .list_products(category, window)
            .await
            .map_err(status)?;
        Ok(Response::new(ProductList {
            products: products.iter().map(product_to_pb).collect(),
            total_count: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }

    async fn create_product(&self, req: Request<PbProduct>) -> Result<Response<PbProduct>, Status> {
        let by = principal(&self.state, req.metadata())?;
        let new = product_from_pb(req.into_inner())?;
        let p = self
            .domain()
            .create_product(&by, new)
            .await
            .map_err(status)?;
        Ok(Response::new(product_to_pb(&p)))
    }

    async fn update_product(&self, req: Request<PbProduct>) -> Result<Response<PbProduct>, Status> {
        let by = principal(&self.state, req.metadata())?;
        let body = req.into_inner();
        let id = id64(body.id);
        let new = product_from_pb(body)?;
        let p = self
            .domain()
            .update_product(&by, id, new)
            .await
            .map_err(status)?;
        Ok(Response::new(product_to_pb(&p)))
    }

    async fn delete_product(
        &self,
        req: Request<GetProductRequest>,
    ) -> Result<Response<()>, Status> {
        let by = principal(&self.state, req.metadata())?;
        self.domain()
            .delete_product(&by, id64(req.get_ref().id))
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl Chat for Services {
    type ChatStream = BoxStream<ChatMessage>;

    /// Receives the client's messages (each sent as the caller) and streams
    /// every message sent through any protocol, as committed.
    async fn chat(
        &self,
        req: Request<tonic::Streaming<ChatSend>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        // Listening is public; sending needs a token, checked at the first send.
        let by = principal(&self.state, req.metadata());
        // A reconnecting client names the last `event_id` it received, as an
        // EventSource does with its header, and misses nothing.
        let after = match req.metadata().get("last-event-id") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<i64>().ok())
                    .filter(|id| *id >= 0)
                    .ok_or_else(|| {
                        Status::invalid_argument(
                            "last-event-id: Input should be an event id (an integer >= 0)",
                        )
                    })?,
            ),
        };
        let mut incoming = req.into_inner();
        let domain = self.domain().clone();
        let (errors_tx, errors_rx) = tokio::sync::mpsc::channel::<Status>(1);
        let shutdown = self.state.shutdown.clone();
        // The sending half runs beside the stream; it ends with the client's
        // stream, the first error, or shutdown.
        self.state.jobs.spawn({
            let shutdown = shutdown.clone();
            async move {
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        n = incoming.next() => n,
                    };
                    let Some(Ok(send)) = next else { return };
                    let result = match &by {
                        Ok(p) => domain
                            .send_message(p, &send.content, None)
                            .await
                            .map_err(status),
                        Err(s) => Err(s.clone()),
                    };
                    if let Err(s) = result {
                        let _ = errors_tx.send(s).await;
                        return;
                    }
                }
            }
        });
        let messages = self
            .domain()
            .events()
            .subscribe(after, EventFilter::parse("message.sent"))
            // Cut off for falling behind: the stream ends; the client
            // reconnects with the last `event_id` it received.
            .take_while(|item| futures::future::ready(!matches!(item, Item::CutOff { .. })))
            .filter_map(|item| {
                futures::future::ready(match item {
                    Item::Event(e) => e.payload_shared::<domain::Message>().map(|m| {
                        Ok(ChatMessage {
                            event_id: e.id,
                            id: id32(m.id),
                            content: m.content,
                            user_id: id32(m.user_id),
                            timestamp: m
                                .timestamp
                                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                        })
                    }),
                    _ => None,
                })
            });
        let errors = tokio_stream::wrappers::ReceiverStream::new(errors_rx).map(Err);
        // An error from the sending half ends the call with that status.
        let merged = futures::stream::select(messages, errors)
            .scan(false, |failed, item| {
                let out = if *failed {
                    None
                } else {
                    *failed = item.is_err();
                    Some(item)
                };
                futures::future::ready(out)
            })
            .take_until(shutdown.cancelled_owned());
        Ok(Response::new(Box::pin(merged)))
    }
}

#[tonic::async_trait]
impl Events for Services {
    type SubscribeStream = BoxStream<DomainEvent>;

    /// The event log from `after_id` (or from now), filtered by type. A
    /// client that falls behind gets ABORTED with the id to resume from.
    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let filter = EventFilter::parse(&r.types.join(","));
        let events = self
            .domain()
            .events()
            .subscribe(r.after_id, filter)
            .scan(false, |ended, item| {
                let out = if *ended {
                    None
                } else {
                    Some(match item {
                        Item::Event(e) => Ok(DomainEvent {
                            id: e.id,
                            r#type: e.kind.clone(),
                            payload_json: e.payload.get().to_owned(),
                            created_at: e
                                .created_at
                                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                            reset: false,
                        }),
                        Item::Reset => Ok(DomainEvent {
                            reset: true,
                            ..Default::default()
                        }),
                        Item::CutOff { last_id } => {
                            *ended = true;
                            Err(Status::aborted(format!(
                                "Subscriber fell behind; resume with after_id = {}",
                                last_id.unwrap_or(0)
                            )))
                        }
                    })
                };
                futures::future::ready(out)
            })
            .take_until(self.state.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(events)))
    }
}

/// Serves `routes` on `listener` until `stop`, through the accept loop HTTP
/// uses ([`crate::serve`]) rather than tonic's own server: a connection with
/// no call in flight for `idle_timeout` (a silent one, or an HTTP/2
/// connection whose calls have ended) is closed, as gRPC's `MaxConnectionIdle`
/// does, while a stream however quiet keeps its connection; and shutdown
/// drains for at most `drain`, then drops what is left. A call's
/// `grpc-timeout` is its deadline: a handler still running then is dropped,
/// and a stream still going is ended, each with DEADLINE_EXCEEDED.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    idle_timeout: std::time::Duration,
    drain: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    use tower::ServiceExt;
    crate::serve::serve(listener, idle_timeout, drain, stop, move |_peer, conn| {
        let (routes, conn) = (routes.clone(), conn.clone());
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = conn.request();
            // One too far off to represent is none.
            let deadline = deadline(req.headers())
                .and_then(|limit| tokio::time::Instant::now().checked_add(limit));
            let answer = routes.clone().oneshot(req);
            async move {
                let answer = match deadline {
                    None => answer.await,
                    // The handler is dropped at the deadline, as when a
                    // client cancels; what it committed stays committed.
                    Some(at) => tokio::time::timeout_at(at, answer)
                        .await
                        .unwrap_or_else(|_| Ok(deadline_exceeded().into_http())),
                };
                let Ok(response) = answer;
                Ok::<_, std::convert::Infallible>(size_limit_status(response).map(|body| {
                    crate::serve::Guarded::new(Deadlined::new(body, deadline), in_flight)
                }))
            }
        })
    })
    .await
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("Deadline exceeded")
}

/// An answer's body that ends at its call's deadline: a stream still going
/// then ends with DEADLINE_EXCEEDED in its trailers, and what produced it is
/// dropped. A client that set a deadline cancels at it anyway; this is for
/// the one that does not.
struct Deadlined<B> {
    body: B,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
}

impl<B> Deadlined<B> {
    fn new(body: B, deadline: Option<tokio::time::Instant>) -> Self {
        Deadlined {
            body,
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
            ended: false,
        }
    }
}

impl<B> hyper::body::Body for Deadlined<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, B::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let Some(at) = &mut this.deadline else {
            return Poll::Pending;
        };
        if at.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.ended = true;
        let mut trailers = axum::http::HeaderMap::new();
        // Only a message that cannot be encoded fails; this one can.
        let _ = deadline_exceeded().add_header(&mut trailers);
        Poll::Ready(Some(Ok(hyper::body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The deadline a call's `grpc-timeout` sets: at most eight digits and a
/// unit (gRPC over HTTP/2). A malformed value is ignored, as tonic's server
/// ignores it.
fn deadline(headers: &axum::http::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = headers.get("grpc-timeout")?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// tonic reports a request over the size limit as OUT_OF_RANGE; gRPC's own
/// implementations (and SPEC §9) say RESOURCE_EXHAUSTED. The limit is checked
/// before any handler runs, so the status is in the trailers-only response
/// headers, where this rewrites it.
pub fn size_limit_status<B>(mut response: axum::http::Response<B>) -> axum::http::Response<B> {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if too_large {
        headers.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
    }
    response
}

/// The gRPC server's routes: every service with prism's message limits,
/// health checking and reflection.
pub async fn routes(
    state: AppState,
    role: crate::app::Role,
) -> anyhow::Result<tonic::service::Routes> {
    use pb::{
        prism::{chat_server::ChatServer, events_server::EventsServer},
        product::product_service_server::ProductServiceServer,
        user::user_service_server::UserServiceServer,
    };
    let services = Services::new(state);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // The products service serves the catalogue alone; `prism serve` everything.
    let everything = role == crate::app::Role::Serve;
    health_reporter
        .set_serving::<ProductServiceServer<Services>>()
        .await;
    if everything {
        health_reporter
            .set_serving::<UserServiceServer<Services>>()
            .await;
        health_reporter.set_serving::<ChatServer<Services>>().await;
        health_reporter
            .set_serving::<EventsServer<Services>>()
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut routes = tonic::service::Routes::default()
        .add_service(
            ProductServiceServer::new(services.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha);
    if everything {
        routes = routes
            .add_service(
                UserServiceServer::new(services.clone())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(ChatServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(EventsServer::new(services).max_decoding_message_size(MAX_MESSAGE));
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{HeaderMap, HeaderValue};

    fn deadline_of(value: &'static str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", HeaderValue::from_static(value));
        super::deadline(&headers)
    }

    #[test]
    fn grpc_timeout_units_and_malformed_values() {
        assert_eq!(deadline_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(deadline_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(deadline_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(deadline_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            deadline_of("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(deadline_of("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "5", "5s", "123456789S", "-5S", "5 S", "1.5S"] {
            assert_eq!(deadline_of(bad), None, "{bad:?}");
        }
        assert_eq!(super::deadline(&HeaderMap::new()), None);
    }
}
