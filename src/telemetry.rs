//! Logging: `tracing` to standard error (pretty or JSON lines), plus a tap
//! that feeds the server's own records to `GET /logs` live.

use std::sync::{Arc, OnceLock};

use chrono::{SecondsFormat, Utc};
use tokio::sync::broadcast;
use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::Context, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` wins over `level` when set.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(TapLayer);
    let result = match format {
        LogFormat::Pretty => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// Only the `/logs` tap, writing nothing: for test processes, where many
/// servers share one global subscriber and stderr would drown the results.
pub fn init_tap_only(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(TapLayer)
        .try_init();
}

/// One log record as `/logs` sends it: `{"level","message","target","timestamp"}`.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub level: Level,
    pub json: Arc<str>,
}

fn tap() -> &'static broadcast::Sender<LogRecord> {
    static TAP: OnceLock<broadcast::Sender<LogRecord>> = OnceLock::new();
    // Bounded: a slow `/logs` reader misses records instead of holding memory.
    TAP.get_or_init(|| broadcast::channel(1024).0)
}

/// Live log records from now on.
pub fn subscribe_logs() -> broadcast::Receiver<LogRecord> {
    tap().subscribe()
}

struct TapLayer;

impl<S: Subscriber> Layer<S> for TapLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let tx = tap();
        if tx.receiver_count() == 0 {
            return; // nobody is watching: cost nothing
        }
        let mut visitor = Message::default();
        event.record(&mut visitor);
        let meta = event.metadata();
        let json = serde_json::json!({
            "level": meta.level().as_str().to_lowercase(),
            "message": visitor.message,
            "target": meta.target(),
            "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            "fields": visitor.fields,
        })
        .to_string();
        let _ = tx.send(LogRecord {
            level: *meta.level(),
            json: json.into(),
        });
    }
}

#[derive(Default)]
struct Message {
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl tracing::field::Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields.insert(field.name().into(), value.into());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields.insert(field.name().into(), text.into());
        }
    }
}
