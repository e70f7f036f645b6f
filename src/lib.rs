//! prism: one domain (users, posts, comments, messages, products, orders)
//! served over REST, GraphQL, gRPC, Server-Sent Events and WebSockets.
//!
//! # Layout
//! - [`config`]: the typed configuration tree (flags, `PRISM_*`, TOML).
//! - [`db`]: SQLite or PostgreSQL behind one enum; migrations for both.
//! - [`domain`]: the entities, their rules and SQL — the only code that writes.
//! - [`events`]: the transactional event log and its in-process fan-out, which
//!   feeds every real-time surface.
//! - [`auth`]: password hashing, tokens, the caller's identity, login limits.
//! - [`forwarded`]: the client behind a trusted reverse proxy (`X-Forwarded-For`).
//! - [`state`]: application state and metrics shared by every protocol.
//! - [`http`]: the REST edge (axum): routing, extractors, error mapping, docs.
//! - [`graphql`]: the GraphQL schema, DataLoaders and transports (HTTP, WebSocket).
//! - [`grpc`]: the seed's gRPC services, prism's streaming ones, health, reflection.
//! - [`realtime`]: Server-Sent Events, WebSockets, background tasks, `/ui`.
//! - [`gateway`]: the API gateway over the microservices (registry, breakers, retries).
//! - [`pool`]: capped HTTP/1.1 keep-alive connections to one upstream instance,
//!   for the gateway and the orders service's calls to the users service.
//! - [`relay`]: events between processes: the outbox relay to NATS JetStream and consumers.
//! - [`app`]: startup and graceful shutdown of every role.
//! - [`demo`]: the demo data of `--demo`.
//! - [`up`]: `prism up`, the whole microservice topology in one command.

pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod error;
pub mod events;
pub mod forwarded;
pub mod gateway;
pub mod graphql;
pub mod grpc;
pub mod http;
pub mod pool;
pub mod realtime;
pub mod relay;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod trace;
pub mod up;

pub use app::App;
pub use config::Config;
