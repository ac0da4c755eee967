//! `grpc_server_started_total`, `grpc_server_handled_total` and
//! `grpc_server_handling_seconds` as a tower layer around the gRPC routes,
//! outside the edge, so that calls refused at the edge are counted too.
//!
//! A call is started when its headers arrive. It is handled when its
//! status is known: at once for a trailers-only answer (`grpc-status` in the
//! headers, as every refusal at the edge is), else when the response body
//! ends with its trailers. A response body dropped before its trailers (the
//! client went away, the connection closed) counts as CANCELLED; one that
//! ends without a `grpc-status` as UNKNOWN. The duration runs from the
//! headers to that moment. Streaming calls hold `keywarden_streams_open`
//! until their response body is gone.
//!
//! Labels come from a fixed table (the caller's `classify`): a path that is
//! not a method the sidecar serves counts as `grpc_service="unknown"`,
//! `grpc_method="unknown"`, so a stranger cannot make series by inventing
//! paths.
//!
//! The metric handles of each method (and of each code it ends with) are
//! looked up in the recorder once and kept ([`Handles`]): a lookup builds
//! and compares a labelled key, about 6,000 instructions a call for the
//! three series, which was most of what metrics cost a call (BENCHMARKS.md,
//! "Metrics on the hot path").

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, OnceLock, RwLock},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};

use super::metrics::{GRPC_HANDLED, GRPC_HANDLING_SECONDS, GRPC_STARTED, GaugeGuard, STREAMS_OPEN};

/// What the labels say of a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodLabels {
    /// unary | client_stream | server_stream | bidi_stream
    pub grpc_type: &'static str,
    /// e.g. keywarden.v1.Crypto
    pub grpc_service: &'static str,
    /// e.g. Encrypt
    pub grpc_method: &'static str,
}

impl MethodLabels {
    /// The labels of `path` ("/package.Service/Method"), with its type from
    /// whether each side streams.
    pub fn from_path(path: &'static str, client_stream: bool, server_stream: bool) -> Self {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let (service, method) = trimmed.split_once('/').unwrap_or(("unknown", "unknown"));
        Self {
            grpc_type: match (client_stream, server_stream) {
                (false, false) => "unary",
                (true, false) => "client_stream",
                (false, true) => "server_stream",
                (true, true) => "bidi_stream",
            },
            grpc_service: service,
            grpc_method: method,
        }
    }

    const UNKNOWN: Self = Self {
        grpc_type: "unary",
        grpc_service: "unknown",
        grpc_method: "unknown",
    };
}

/// Finds a request path's labels; `None`: not a method served here.
pub type Classify = fn(&str) -> Option<MethodLabels>;

/// One method's metric handles: its started counter and duration histogram,
/// and a handled counter per gRPC code, made on the code's first use.
struct MethodHandles {
    labels: MethodLabels,
    started: metrics::Counter,
    handling: metrics::Histogram,
    handled: [OnceLock<metrics::Counter>; 17],
}

impl MethodHandles {
    fn new(l: MethodLabels) -> Self {
        Self {
            labels: l,
            started: metrics::counter!(
                GRPC_STARTED,
                "grpc_type" => l.grpc_type,
                "grpc_service" => l.grpc_service,
                "grpc_method" => l.grpc_method,
            ),
            handling: metrics::histogram!(
                GRPC_HANDLING_SECONDS,
                "grpc_type" => l.grpc_type,
                "grpc_service" => l.grpc_service,
                "grpc_method" => l.grpc_method,
            ),
            handled: Default::default(),
        }
    }

    fn handled(&self, code: tonic::Code) -> &metrics::Counter {
        let l = self.labels;
        self.handled[(code as usize).min(16)].get_or_init(|| {
            metrics::counter!(
                GRPC_HANDLED,
                "grpc_type" => l.grpc_type,
                "grpc_service" => l.grpc_service,
                "grpc_method" => l.grpc_method,
                "grpc_code" => code_name(code),
            )
        })
    }
}

/// The handles of every method seen, by its labels (a fixed table, so the
/// map is bounded by the methods served, plus "unknown").
#[derive(Default)]
struct Handles(RwLock<HashMap<(&'static str, &'static str), Arc<MethodHandles>>>);

impl Handles {
    fn get(&self, labels: MethodLabels) -> Arc<MethodHandles> {
        let key = (labels.grpc_service, labels.grpc_method);
        if let Some(found) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return found.clone();
        }
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(MethodHandles::new(labels)))
            .clone()
    }
}

/// The layer: [`GrpcMetrics::new`] around a service.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    classify: Classify,
    handles: Arc<Handles>,
}

impl<S> GrpcMetrics<S> {
    /// Takes the metric handles from the recorder installed now (none: the
    /// handles do nothing).
    pub fn new(inner: S, classify: Classify) -> Self {
        Self {
            inner,
            classify,
            handles: Arc::default(),
        }
    }
}

impl<S, ReqB, B> tower::Service<http::Request<ReqB>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes>,
{
    type Response = http::Response<MeteredBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        let labels = (self.classify)(request.uri().path()).unwrap_or(MethodLabels::UNKNOWN);
        let handles = self.handles.get(labels);
        handles.started.increment(1);
        let stream = (labels.grpc_type != "unary").then(|| GaugeGuard::new(STREAMS_OPEN));
        let mut call = Call {
            handles,
            started: Instant::now(),
            done: false,
            _stream: stream,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if let Some(code) = grpc_status(response.headers()) {
                // Trailers-only: the call's status is known now.
                call.handled(code);
            }
            Ok(response.map(|inner| MeteredBody { inner, call }))
        })
    }
}

/// A call being measured; its drop before its status counts CANCELLED.
struct Call {
    handles: Arc<MethodHandles>,
    started: Instant,
    done: bool,
    _stream: Option<GaugeGuard>,
}

impl Call {
    fn handled(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.handles.handled(code).increment(1);
        self.handles
            .handling
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.handled(tonic::Code::Cancelled);
    }
}

/// The `grpc-status` in `headers`, if there is one (a value that is not a
/// code: UNKNOWN).
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(tonic::Code::Unknown, tonic::Code::from_i32),
    )
}

/// The canonical upper-case name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call's status when its trailers
    /// pass (or it ends, or is dropped).
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Call,
    }
}

impl<B: Body<Data = Bytes>> Body for MeteredBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.call
                        .handled(grpc_status(trailers).unwrap_or(tonic::Code::Unknown));
                }
            }
            Poll::Ready(None) => this.call.handled(tonic::Code::Unknown),
            Poll::Ready(Some(Err(_))) => this.call.handled(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
