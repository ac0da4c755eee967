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

use std::{
    pin::Pin,
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

/// The layer: [`GrpcMetrics::new`] around a service.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    classify: Classify,
}

impl<S> GrpcMetrics<S> {
    pub fn new(inner: S, classify: Classify) -> Self {
        Self { inner, classify }
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
        metrics::counter!(
            GRPC_STARTED,
            "grpc_type" => labels.grpc_type,
            "grpc_service" => labels.grpc_service,
            "grpc_method" => labels.grpc_method,
        )
        .increment(1);
        let stream = (labels.grpc_type != "unary").then(|| GaugeGuard::new(STREAMS_OPEN));
        let mut call = Call {
            labels,
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
    labels: MethodLabels,
    started: Instant,
    done: bool,
    _stream: Option<GaugeGuard>,
}

impl Call {
    fn handled(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let l = self.labels;
        metrics::counter!(
            GRPC_HANDLED,
            "grpc_type" => l.grpc_type,
            "grpc_service" => l.grpc_service,
            "grpc_method" => l.grpc_method,
            "grpc_code" => code,
        )
        .increment(1);
        metrics::histogram!(
            GRPC_HANDLING_SECONDS,
            "grpc_type" => l.grpc_type,
            "grpc_service" => l.grpc_service,
            "grpc_method" => l.grpc_method,
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.handled("CANCELLED");
    }
}

/// The canonical name of the `grpc-status` in `headers`, if there is one.
fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Unknown, tonic::Code::from_i32);
    Some(code_name(code))
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
                        .handled(grpc_status(trailers).unwrap_or("UNKNOWN"));
                }
            }
            Poll::Ready(None) => this.call.handled("UNKNOWN"),
            Poll::Ready(Some(Err(_))) => this.call.handled("UNKNOWN"),
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
