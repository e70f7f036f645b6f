//! Integration tests: one binary, every test against a real prism on port 0
//! (real sockets, real SQLite, and PostgreSQL when `PRISM_TEST_DATABASE_URL` is set).

mod admin;
mod auth;
mod event_log;
mod gateway;
mod graphql;
mod grpc;
mod helpers;
mod lifecycle;
mod nats;
mod products;
mod realtime;
mod rest;
mod store;
mod users;
