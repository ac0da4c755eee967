//! Traces: every keywarden call runs in a trace, named by a W3C
//! `traceparent` header when the caller sends a valid one, else by a new
//! random trace id. The trace id is in every log line of the call
//! (`call{trace_id=…}:` in text lines, `trace_id` in JSON lines: the log
//! reads it from the call's task-local context, not from a span, so that a
//! call pays for no span it does not export) and in its audit
//! records; with OTLP export on, the call is also an OpenTelemetry server
//! span, exported in batches.
//!
//! - **`traceparent`** ([W3C Trace Context], version `00` only): exactly
//!   `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, 55 bytes,
//!   lowercase hex, neither id all zeros, and exactly one such header. Any
//!   other value (another version, uppercase, a length other than 55, two
//!   headers) is ignored: the call gets a new trace, never an error, and the
//!   value is not logged. Only the sampled flag (bit 0) is read; other
//!   flags and `tracestate` are not.
//! - **Export** ([`export_wanted`]) is on only when the standard `OTEL_*`
//!   variables ask for it; off, a call costs a header parse, a random trace
//!   id and a task-local, and no span.
//!   On, each call is a span of kind server named like `keywarden.v1.Crypto/Encrypt`
//!   with OpenTelemetry's RPC attributes (`rpc.system`, `rpc.service`,
//!   `rpc.method`, `rpc.grpc.status_code`, `server.address`,
//!   `server.port`) and `keywarden.tenant`; never a subject id, a token or
//!   content. The caller's `traceparent` is its parent. Spans go through the
//!   SDK's batch processor: a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`,
//!   2048) that drops spans when full instead of making calls wait, flushed
//!   at shutdown ([`Exporter::shutdown`], waiting at most 5 s).
//!
//! Only spans of target [`RPC_TARGET`] are exported (no log events, no
//! other crate's spans), and they never reach the log.
//!
//! [W3C Trace Context]: https://www.w3.org/TR/trace-context/

use std::{
    fmt,
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of the spans that are exported (one per call).
pub const RPC_TARGET: &str = "keywarden::rpc";

/// Whether spans are exported: set once at start by [`Exporter::start`].
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// A W3C trace id: 16 bytes, never all zeros. Shown as 32 lowercase hex
/// digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

impl TraceId {
    /// A new random trace id (the thread's CSPRNG; all zeros is not an id).
    pub fn random() -> Self {
        loop {
            let bytes: [u8; 16] = rand::random();
            if bytes != [0; 16] {
                return TraceId(bytes);
            }
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", u128::from_be_bytes(self.0))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A span id: 8 bytes, never all zeros; 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", u64::from_be_bytes(self.0))
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A valid `traceparent` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    /// The caller's span: the parent of this call's span.
    pub parent_id: SpanId,
    /// Flag bit 0: the caller recorded its span.
    pub sampled: bool,
}

/// The length of a version `00` traceparent.
const TRACEPARENT_LEN: usize = 55;

impl TraceParent {
    /// Parses a header value as version `00` of W3C Trace Context writes it;
    /// `None` for anything else.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() != TRACEPARENT_LEN
            || !value.starts_with(b"00-")
            || value[35] != b'-'
            || value[52] != b'-'
        {
            return None;
        }
        let trace_id: [u8; 16] = lower_hex(&value[3..35])?;
        let parent_id: [u8; 8] = lower_hex(&value[36..52])?;
        let [flags] = lower_hex::<1>(&value[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id: TraceId(trace_id),
            parent_id: SpanId(parent_id),
            sampled: flags & 1 == 1,
        })
    }

    /// The request's one `traceparent` header, if it has exactly one and
    /// it is valid.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let mut values = headers.get_all("traceparent").iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Self::parse(value.as_bytes())
    }
}

/// `2 * N` lowercase hex digits as `N` bytes.
fn lower_hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if !digits
        .iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let mut bytes = [0; N];
    hex::decode_to_slice(digits, &mut bytes).ok()?;
    Some(bytes)
}

/// What the code a call runs can ask of its trace.
#[derive(Clone)]
struct CallContext {
    trace_id: TraceId,
    /// The exported span, when export is on.
    rpc: Option<tracing::Span>,
}

tokio::task_local! {
    static CALL: CallContext;
}

/// The trace id of the call being served, if any (for its audit records
/// and log lines).
pub fn current_trace_id() -> Option<TraceId> {
    CALL.try_with(|call| call.trace_id).ok()
}

/// Names the tenant of the call being served on its exported span
/// (`keywarden.tenant`). Give only a valid tenant id.
pub fn record_tenant(tenant: &str) {
    let _ = CALL.try_with(|call| {
        if let Some(rpc) = &call.rpc {
            rpc.record("keywarden.tenant", tenant);
        }
    });
}

/// One call's trace: its trace id, and its exported span when export is on.
/// The exported span ends when this is dropped (with the response body).
pub struct CallTrace {
    context: CallContext,
}

impl CallTrace {
    /// Starts the trace of a call to `path` (`/keywarden.v1.Crypto/Encrypt`)
    /// with the request's headers and URI.
    pub fn start(path: &str, headers: &http::HeaderMap, uri: &http::Uri) -> Self {
        let parent = TraceParent::from_headers(headers);
        let (trace_id, rpc) = if EXPORTING.load(Ordering::Relaxed) {
            let (trace_id, rpc) = exported_span(path, parent, uri);
            (trace_id, Some(rpc))
        } else {
            (parent.map_or_else(TraceId::random, |p| p.trace_id), None)
        };
        CallTrace {
            context: CallContext { trace_id, rpc },
        }
    }

    pub fn trace_id(&self) -> TraceId {
        self.context.trace_id
    }

    /// `future`, run inside the call's trace.
    pub fn scope<F: Future>(&self, future: F) -> impl Future<Output = F::Output> {
        CALL.scope(self.context.clone(), future)
    }

    /// `f`, run inside the call's trace (a poll of its response body).
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        CALL.sync_scope(self.context.clone(), f)
    }

    /// Records the call's gRPC status code on its exported span. Server
    /// spans are errors only for the codes OpenTelemetry's gRPC conventions
    /// name (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
    /// UNAVAILABLE, DATA_LOSS).
    pub fn finish(&self, code: i32) {
        if let Some(rpc) = &self.context.rpc {
            rpc.record("rpc.grpc.status_code", code);
            if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
                rpc.record("otel.status_code", "error");
            }
        }
    }
}

/// The exported span of a call, with the caller's span as its parent; and
/// its trace id (the caller's, or one the SDK chose).
fn exported_span(
    path: &str,
    parent: Option<TraceParent>,
    uri: &http::Uri,
) -> (TraceId, tracing::Span) {
    let name = path.strip_prefix('/').unwrap_or(path);
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        target: RPC_TARGET,
        parent: None,
        "rpc",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        server.address = Empty,
        server.port = Empty,
        keywarden.tenant = Empty,
    );
    if let Some(host) = uri.host() {
        span.record("server.address", host);
    }
    if let Some(port) = uri.port_u16() {
        span.record("server.port", port);
    }
    if let Some(parent) = parent {
        let remote = opentelemetry::trace::SpanContext::new(
            opentelemetry::trace::TraceId::from_bytes(parent.trace_id.0),
            opentelemetry::trace::SpanId::from_bytes(parent.parent_id.0),
            if parent.sampled {
                opentelemetry::trace::TraceFlags::SAMPLED
            } else {
                opentelemetry::trace::TraceFlags::default()
            },
            true,
            opentelemetry::trace::TraceState::NONE,
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        return (parent.trace_id, span);
    }
    // A root span: the SDK picks its trace id when the span is built.
    let id = span.context().span().span_context().trace_id();
    let trace_id = Some(id)
        .filter(|id| *id != opentelemetry::trace::TraceId::INVALID)
        .map_or_else(TraceId::random, |id| TraceId(id.to_bytes()));
    (trace_id, span)
}

/// Whether the standard `OTEL_*` variables (read through `var`) turn span
/// export on: `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn
/// it off; `OTEL_TRACES_EXPORTER=otlp`, `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` turn it on; nothing: off. Any other
/// exporter, an endpoint that is not an `http://` URL, or an OTLP protocol
/// other than `grpc`, is an error naming the variable.
pub fn export_wanted(var: impl Fn(&str) -> Option<String>) -> Result<bool, ExportError> {
    let set = |name: &str| {
        var(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    let on = match set("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => return Ok(false),
        Some("otlp") => true,
        Some(_) => {
            return Err(ExportError::new(
                "OTEL_TRACES_EXPORTER",
                "must be otlp or none: OTLP is the only exporter built in",
            ));
        }
        None => {
            set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        }
    };
    if on {
        // The traces endpoint wins over the general one.
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            if let Some(endpoint) = set(name) {
                if !endpoint.starts_with("http://") {
                    return Err(ExportError::new(
                        name,
                        "must be an http:// URL (e.g. http://otel-collector:4317): TLS to the \
                         collector is not built in",
                    ));
                }
                break;
            }
        }
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = set(name) {
                if protocol != "grpc" {
                    return Err(ExportError::new(
                        name,
                        "must be grpc: OTLP over gRPC is the only transport built in",
                    ));
                }
                break;
            }
        }
    }
    Ok(on)
}

/// Span export cannot start as configured.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {reason}")]
pub struct ExportError {
    pub variable: &'static str,
    pub reason: String,
}

impl ExportError {
    fn new(variable: &'static str, reason: impl Into<String>) -> Self {
        Self {
            variable,
            reason: reason.into(),
        }
    }
}

/// The OTLP span exporter, while export is on.
pub struct Exporter {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Exporter {
    /// Builds the exporter from the `OTEL_*` variables (endpoint, headers,
    /// timeout, compression, sampler, batch sizes, service name: the SDK
    /// reads them) and answers the layer that feeds it. Call inside the
    /// Tokio runtime that serves: the gRPC channel runs on it.
    pub fn start<S>() -> Result<(Self, impl tracing_subscriber::Layer<S>), ExportError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| ExportError::new("OTEL_EXPORTER_OTLP_ENDPOINT", e.to_string()))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                .is_ok_and(|attributes| attributes.contains("service.name="));
        if !named {
            resource = resource.with_service_name("keywarden");
        }
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("keywarden"))
            .with_location(false)
            .with_threads(false)
            .with_level(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::filter_fn(|meta| meta.target() == RPC_TARGET)
                    // The call spans are INFO: nothing below is ever exported.
                    .with_max_level_hint(tracing::level_filters::LevelFilter::INFO),
            );
        EXPORTING.store(true, Ordering::Relaxed);
        Ok((Exporter { provider }, layer))
    }

    /// Exports the spans still queued, and stops. Call before the runtime
    /// ends.
    pub fn shutdown(self) {
        EXPORTING.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the last spans could not be exported");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses_to_its_ids_and_flag() {
        let parsed = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(
            parsed.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parsed.parent_id.to_string(), "00f067aa0ba902b7");
        assert!(parsed.sampled);
        let unsampled =
            TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        // Flags other than bit 0 are ignored.
        let other =
            TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-fe").unwrap();
        assert!(!other.sampled);
    }

    #[test]
    fn every_malformed_traceparent_is_ignored() {
        let bad = [
            "",
            "00",
            // Zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            // Other versions, the forbidden one included.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Lengths: short ids, a longer version 00, trailing data.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Separators and non-hex.
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ];
        for value in bad {
            assert_eq!(TraceParent::parse(value.as_bytes()), None, "{value:?}");
        }
        // Not UTF-8 at all.
        let mut bytes = VALID.as_bytes().to_vec();
        bytes[10] = 0xff;
        assert_eq!(TraceParent::parse(&bytes), None);
    }

    #[test]
    fn two_traceparent_headers_are_ignored() {
        let mut headers = http::HeaderMap::new();
        headers.append("traceparent", VALID.parse().unwrap());
        assert!(TraceParent::from_headers(&headers).is_some());
        headers.append("traceparent", VALID.parse().unwrap());
        assert_eq!(TraceParent::from_headers(&headers), None);
        assert_eq!(TraceParent::from_headers(&http::HeaderMap::new()), None);
    }

    #[test]
    fn random_trace_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (TraceId::random(), TraceId::random());
        assert_ne!(a, b);
        let shown = a.to_string();
        assert_eq!(shown.len(), 32);
        assert!(TraceParent::parse(format!("00-{shown}-00f067aa0ba902b7-01").as_bytes()).is_some());
    }

    #[test]
    fn export_follows_the_standard_variables() {
        let with = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            export_wanted(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        assert!(!with(&[]).unwrap());
        assert!(!with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]).unwrap());
        assert!(with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")]).unwrap());
        assert!(with(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")]).unwrap());
        assert!(with(&[("OTEL_TRACES_EXPORTER", "otlp")]).unwrap());
        assert!(
            !with(&[
                ("OTEL_TRACES_EXPORTER", "none"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")
            ])
            .unwrap()
        );
        assert!(
            !with(&[
                ("OTEL_SDK_DISABLED", "true"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")
            ])
            .unwrap()
        );
        let e = with(&[("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert_eq!(e.variable, "OTEL_TRACES_EXPORTER");
        let e = with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ])
        .unwrap_err();
        assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_PROTOCOL");
        for endpoint in ["https://c:4317", "c:4317"] {
            let e = with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)]).unwrap_err();
            assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_ENDPOINT");
        }
        let e = with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c:4317"),
        ])
        .unwrap_err();
        assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        // The traces-specific protocol wins over the general one.
        assert!(
            with(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ])
            .unwrap()
        );
    }

    #[tokio::test]
    async fn a_call_scope_carries_its_trace_id_and_nothing_outside_does() {
        let trace = CallTrace::start(
            "/keywarden.v1.Crypto/Encrypt",
            &{
                let mut h = http::HeaderMap::new();
                h.insert("traceparent", VALID.parse().unwrap());
                h
            },
            &http::Uri::from_static("http://localhost/keywarden.v1.Crypto/Encrypt"),
        );
        assert_eq!(
            trace.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let inside = trace.scope(async { current_trace_id() }).await;
        assert_eq!(inside, Some(trace.trace_id()));
        assert_eq!(trace.in_scope(current_trace_id), Some(trace.trace_id()));
        assert_eq!(current_trace_id(), None);
    }
}
