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
            .with(
                fmt::layer()
                    .with_ansi(colour(
                        std::io::IsTerminal::is_terminal(&std::io::stderr()),
                        |name| std::env::var_os(name),
                    ))
                    .with_writer(std::io::stderr),
            )
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

/// Whether pretty logs are coloured: on a terminal, unless `NO_COLOR` is set
/// (no-color.org), or anywhere when `CLICOLOR_FORCE` is (as `prism up` does
/// for its services when its own output is a terminal). A log file, a pipe
/// or a container's log then holds no escape codes.
fn colour(terminal: bool, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    let no_color = env("NO_COLOR").is_some_and(|v| !v.is_empty());
    let force = env("CLICOLOR_FORCE").is_some_and(|v| !v.is_empty() && v != "0");
    !no_color && (terminal || force)
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

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colours_only_on_a_terminal_unless_forced_or_refused() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.into())
        };
        assert!(colour(true, env(&[])));
        assert!(!colour(false, env(&[])), "a file or a pipe");
        assert!(colour(false, env(&[("CLICOLOR_FORCE", "1")])));
        assert!(!colour(false, env(&[("CLICOLOR_FORCE", "0")])));
        assert!(!colour(true, env(&[("NO_COLOR", "1")])));
        assert!(
            !colour(true, env(&[("NO_COLOR", "0")])),
            "any value refuses"
        );
        assert!(colour(true, env(&[("NO_COLOR", "")])), "empty is unset");
        assert!(!colour(
            false,
            env(&[("NO_COLOR", "1"), ("CLICOLOR_FORCE", "1")])
        ));
    }
}
