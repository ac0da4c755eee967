//! The log: lines on standard error, as text (the default) or as JSON lines
//! for log shippers (`log.format = "json"`), filtered by `RUST_LOG`
//! (default `info`); and, when the `OTEL_*` variables ask for it, the
//! exported spans beside it ([`super::trace`]).
//!
//! A JSON line is one object with, in this order:
//!
//! | field | what |
//! |---|---|
//! | `timestamp` | RFC 3339, UTC, milliseconds: `2026-12-01T21:40:12.345Z` |
//! | `level` | `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE` |
//! | `target` | the module that wrote it, e.g. `keywarden::server` |
//! | `trace_id` | the call's trace id (32 hex digits), only for lines written while serving a call |
//! | `message` | the message |
//! | `fields` | the line's other fields (`{"error":"…"}`), only when it has some |
//!
//! Span names and other span fields are not written: `trace_id` is the one
//! span field a JSON line carries. (tracing-subscriber's own JSON format
//! nests it under `span`/`spans` beside every span's fields, and names
//! event fields by where they came from; log shippers query flat, fixed
//! names, so this format is written here, in one small `FormatEvent`.)

use serde::{Deserialize, Serialize};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    Layer as _,
    filter::{EnvFilter, FilterExt, LevelFilter, filter_fn},
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::{Filter, SubscriberExt},
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use super::trace::{self, ExportError, Exporter, RPC_TARGET};

/// `[log] format`: how lines are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-12-01T21:40:12.345678Z  INFO call{trace_id=…}: keywarden::api: message`
    #[default]
    Text,
    /// One JSON object per line (see the module's table).
    Json,
}

/// The log filter when `RUST_LOG` is not set: `info`, but only warnings and
/// errors of the OpenTelemetry SDK (a failed span export is an error line
/// of target `opentelemetry_sdk`, one per failed batch).
const DEFAULT_FILTER: &str =
    "info,opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn";

/// What [`init`] started and must be stopped at the end.
pub struct Telemetry {
    exporter: Option<Exporter>,
}

impl Telemetry {
    /// Exports the spans still queued. Call before the runtime ends.
    pub fn shutdown(self) {
        if let Some(exporter) = self.exporter {
            exporter.shutdown();
        }
    }
}

/// Installs the log (in `format`) and, if `export` (see
/// [`trace::export_wanted`]), the OTLP span exporter. Call once, inside the
/// Tokio runtime that serves.
pub fn init(format: LogFormat, export: bool) -> Result<Telemetry, ExportError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colours only for a terminal: a file or a log shipper gets plain text.
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let lines = match format {
        LogFormat::Text => lines.event_format(TextLines).boxed(),
        LogFormat::Json => lines.event_format(JsonLines).boxed(),
    }
    .with_filter(lines_filter(filter));
    let registry = tracing_subscriber::registry().with(lines);
    if !export {
        registry.init();
        return Ok(Telemetry { exporter: None });
    }
    let (exporter, spans) = Exporter::start()?;
    registry.with(spans).init();
    Ok(Telemetry {
        exporter: Some(exporter),
    })
}

/// What reaches the log: what `filter` (`RUST_LOG`) lets through, less the
/// exported spans. (The hint of the latter, all levels, leaves `filter`'s
/// in force: a `debug!` below it costs a level comparison, as it did with
/// `filter` alone.)
fn lines_filter<S>(filter: EnvFilter) -> impl Filter<S> {
    filter_fn(|meta| meta.target() != RPC_TARGET)
        .with_max_level_hint(LevelFilter::TRACE)
        .and(filter)
}

/// The text line format: tracing-subscriber's default (`Full`) line, with
/// the call's trace id where a span would be:
/// `2026-12-01T21:40:12.345678Z  WARN call{trace_id=…}: keywarden::api: message error=…`.
/// (Written here rather than by a span per call: a span costs every call a
/// registry slot, a formatted field and an enter and exit per poll, about
/// 8 % of a unary call's instructions, for the few calls that log at all.)
struct TextLines;

impl<S, N> FormatEvent<S, N> for TextLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::time::FormatTime as _;
        let meta = event.metadata();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut writer)?;
        write!(writer, " {:>5} ", meta.level().as_str())?;
        if let Some(id) = trace::current_trace_id() {
            write!(writer, "call{{trace_id={id}}}: ")?;
        }
        write!(writer, "{}: ", meta.target())?;
        context.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The JSON line format (the module's table).
struct JsonLines;

#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    level: &'a str,
    target: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
    message: String,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    fields: serde_json::Map<String, serde_json::Value>,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields(serde_json::Map::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        let message = match fields.remove("message") {
            Some(serde_json::Value::String(message)) => message,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let line = Line {
            timestamp: crate::time::UnixMillis::now().to_string(),
            level: meta.level().as_str(),
            target: meta.target(),
            trace_id: trace::current_trace_id().map(|id| id.to_string()),
            message,
            fields,
        };
        let json = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writer.write_str(&json)?;
        writer.write_char('\n')
    }
}

/// An event's fields as JSON values.
struct Fields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0
            .insert(field.name().to_owned(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captures what the JSON format writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `format` writes for a warning with `message` inside a call and
    /// an info line outside it.
    async fn log_a_call<F>(format: F, message: &'static str) -> (trace::CallTrace, String)
    where
        F: FormatEvent<
                tracing_subscriber::Registry,
                tracing_subscriber::fmt::format::DefaultFields,
            > + Send
            + Sync
            + 'static,
    {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(format)
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        );
        let _default = tracing::subscriber::set_default(subscriber);
        let trace = trace::CallTrace::start(
            "/keywarden.v1.Admin/CreateTenant",
            &http::HeaderMap::new(),
            &http::Uri::from_static("http://localhost/"),
        );
        trace
            .scope(async { tracing::warn!(attempt = 2, "{message}") })
            .await;
        tracing::info!("outside");
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        (trace, text)
    }

    #[test]
    fn the_log_filter_keeps_the_level_hint_of_rust_log() {
        let hint = |directives: &str| {
            Filter::<tracing_subscriber::Registry>::max_level_hint(&lines_filter(EnvFilter::new(
                directives,
            )))
        };
        assert_eq!(hint("info"), Some(LevelFilter::INFO));
        assert_eq!(hint("warn,keywarden=debug"), Some(LevelFilter::DEBUG));
    }

    #[tokio::test]
    async fn a_json_line_has_the_documented_fields_and_the_call_trace_id() {
        let (trace, text) = log_a_call(JsonLines, "the \"thing\" failed").await;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = lines[0].as_object().unwrap();
        let mut keys: Vec<&str> = first.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "fields",
                "level",
                "message",
                "target",
                "timestamp",
                "trace_id"
            ],
        );
        assert_eq!(first["level"], "WARN");
        assert_eq!(first["message"], "the \"thing\" failed");
        assert_eq!(first["fields"], serde_json::json!({"attempt": 2}));
        assert_eq!(first["trace_id"], trace.trace_id().to_string());
        assert_eq!(first["target"], module_path!());
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        // In the written order, too.
        assert!(text.starts_with("{\"timestamp\":"));
        assert!(lines[1].get("trace_id").is_none());
        assert!(lines[1].get("fields").is_none());
    }

    #[tokio::test]
    async fn a_text_line_carries_the_call_trace_id_where_a_span_would_be() {
        let (trace, text) = log_a_call(TextLines, "the thing failed").await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let (time, rest) = lines[0].split_once(' ').unwrap();
        assert!(time.ends_with('Z') && time.len() == 27, "{time}");
        assert_eq!(
            rest,
            format!(
                " WARN call{{trace_id={}}}: {}: the thing failed attempt=2",
                trace.trace_id(),
                module_path!()
            )
        );
        let (_, rest) = lines[1].split_once(' ').unwrap();
        assert_eq!(rest, format!(" INFO {}: outside", module_path!()));
    }
}
