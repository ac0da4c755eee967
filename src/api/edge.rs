//! The edge: what every call passes on its headers, before a byte of its
//! body is read.
//!
//! 1. **Authentication.** The caller is named from the `authorization`
//!    header, the client certificate or the transport ([`Guard`]). A
//!    credential that fails is refused here: UNAUTHENTICATED.
//! 2. **Authorization, as far as the headers allow.** The body names the
//!    tenant, so here the question is whether the policy gives the caller
//!    the method's permission for *some* tenant (or, for methods that span
//!    tenants, for all). A caller with no such grant is refused here:
//!    PERMISSION_DENIED. The handler then authorizes the tenant the body
//!    names. Refusals are counted in the audit log (per interval, caller
//!    and reason), not written one by one.
//! 3. **The decode budget** ([`super::budget`]) and the method's message
//!    size limit (Crypto: `limits.max_request_bytes`; Admin:
//!    `server.admin_max_request_bytes`; health and reflection: 4 MiB).
//! 4. **A deadline**: the client's `grpc-timeout`, at most the server's
//!    ceiling (`server.call_timeout_seconds` for unary calls,
//!    `server.stream_timeout_seconds` for streams). When it passes, the call
//!    ends with DEADLINE_EXCEEDED, its handler is dropped.
//!
//! So an anonymous or unauthorized call costs a header check: no decode, no
//! allocation for its body, no keystore or KMS call. The table of methods
//! is [`METHODS`]; a method of the keywarden services missing from it is
//! refused (fail closed), every other path (gRPC health, reflection) passes
//! unauthenticated, as before.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::{Code, Status};

use super::{
    Shared,
    budget::{BudgetedBody, Charge, DecodeBudget, FieldCounter, Held, Release},
};
use crate::{
    auth::{CallActivity, Caller, Peer, Permission},
    observe::metrics::{Refusal, refused},
    observe::trace::CallTrace,
};

/// What the edge knows of a method.
#[derive(Clone, Copy, Debug)]
pub struct Method {
    pub path: &'static str,
    /// The audit log's name for it.
    pub action: &'static str,
    pub permission: Permission,
    /// Whether its request names a tenant (else it spans all tenants).
    pub tenant_scoped: bool,
    /// Whether the client sends a stream of messages.
    pub client_streaming: bool,
    /// Whether the server sends a stream of messages.
    pub server_streaming: bool,
    /// Whether the call is a stream either way (its deadline ceiling).
    pub streaming: bool,
    pub service: Service,
    /// A batch's items' field number: counted as the request arrives.
    pub batch_items: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Crypto,
    Admin,
}

const fn method(
    path: &'static str,
    action: &'static str,
    permission: Permission,
    tenant_scoped: bool,
    streams: (bool, bool),
    service: Service,
) -> Method {
    Method {
        path,
        action,
        permission,
        tenant_scoped,
        client_streaming: streams.0,
        server_streaming: streams.1,
        streaming: streams.0 || streams.1,
        service,
        batch_items: None,
    }
}

/// A batch method: its items (field 2 of the request) are counted as they
/// arrive.
const fn batch(method: Method) -> Method {
    Method {
        batch_items: Some(2),
        ..method
    }
}

const UNARY: (bool, bool) = (false, false);
const SERVER_STREAM: (bool, bool) = (false, true);
const BIDI: (bool, bool) = (true, true);
const CRYPTO_PREFIX: &str = "/keywarden.v1.Crypto/";
const ADMIN_PREFIX: &str = "/keywarden.v1.Admin/";

/// Every method of `keywarden.v1.Crypto` and `keywarden.v1.Admin`.
pub const METHODS: [Method; 24] = {
    use Permission as P;
    use Service::{Admin, Crypto};
    [
        method(
            "/keywarden.v1.Crypto/Encrypt",
            "Encrypt",
            P::Encrypt,
            true,
            UNARY,
            Crypto,
        ),
        method(
            "/keywarden.v1.Crypto/Decrypt",
            "Decrypt",
            P::Decrypt,
            true,
            UNARY,
            Crypto,
        ),
        batch(method(
            "/keywarden.v1.Crypto/EncryptBatch",
            "EncryptBatch",
            P::Encrypt,
            true,
            UNARY,
            Crypto,
        )),
        batch(method(
            "/keywarden.v1.Crypto/DecryptBatch",
            "DecryptBatch",
            P::Decrypt,
            true,
            UNARY,
            Crypto,
        )),
        method(
            "/keywarden.v1.Crypto/Rewrap",
            "Rewrap",
            P::Rewrap,
            true,
            UNARY,
            Crypto,
        ),
        method(
            "/keywarden.v1.Crypto/EncryptStream",
            "EncryptStream",
            P::Encrypt,
            true,
            BIDI,
            Crypto,
        ),
        method(
            "/keywarden.v1.Crypto/DecryptStream",
            "DecryptStream",
            P::Decrypt,
            true,
            BIDI,
            Crypto,
        ),
        method(
            "/keywarden.v1.Crypto/GenerateDataKey",
            "GenerateDataKey",
            P::DataKey,
            true,
            UNARY,
            Crypto,
        ),
        method(
            "/keywarden.v1.Crypto/DecryptDataKey",
            "DecryptDataKey",
            P::DataKey,
            true,
            UNARY,
            Crypto,
        ),
        method(
            "/keywarden.v1.Crypto/RewrapDataKey",
            "RewrapDataKey",
            P::DataKey,
            true,
            UNARY,
            Crypto,
        ),
        method(
            "/keywarden.v1.Admin/CreateTenant",
            "CreateTenant",
            P::AdminCreate,
            true,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/GetTenant",
            "GetTenant",
            P::AdminRead,
            true,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/ListTenants",
            "ListTenants",
            P::AdminRead,
            false,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/RotateTenantKey",
            "RotateTenantKey",
            P::AdminRotate,
            true,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/ShredTenant",
            "ShredTenant",
            P::AdminShred,
            true,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/ShredSubject",
            "ShredSubject",
            P::AdminShred,
            true,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/RotateRootKey",
            "RotateRootKey",
            P::AdminRotate,
            false,
            SERVER_STREAM,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/UpdateTenantPolicy",
            "UpdateTenantPolicy",
            P::AdminPolicy,
            true,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/GetAuditHead",
            "GetAuditHead",
            P::AuditRead,
            false,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Crypto/BlindIndex",
            "BlindIndex",
            P::Index,
            true,
            UNARY,
            Crypto,
        ),
        batch(method(
            "/keywarden.v1.Crypto/BlindIndexBatch",
            "BlindIndexBatch",
            P::Index,
            true,
            UNARY,
            Crypto,
        )),
        method(
            "/keywarden.v1.Admin/RotateIndexKey",
            "RotateIndexKey",
            P::AdminRotate,
            true,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/RetireIndexKey",
            "RetireIndexKey",
            P::AdminRotate,
            true,
            UNARY,
            Admin,
        ),
        method(
            "/keywarden.v1.Admin/GetIndexKeys",
            "GetIndexKeys",
            P::AdminRead,
            true,
            UNARY,
            Admin,
        ),
    ]
};

/// The largest request message of the services that are not keywarden's
/// (gRPC health and reflection): their requests name a service or a symbol.
/// They take no share of the decode budget.
pub const OTHER_MAX_REQUEST_BYTES: usize = 16 << 10;

/// What one method may take: its message size limit and its ceiling.
#[derive(Clone, Copy, Debug)]
pub struct EdgeLimits {
    pub crypto_max_request_bytes: usize,
    pub admin_max_request_bytes: usize,
    pub call_timeout: Duration,
    pub stream_timeout: Duration,
}

/// The edge around the gRPC routes. Cheap to clone (one per connection).
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    shared: Arc<EdgeShared>,
}

struct EdgeShared {
    api: Shared,
    budget: DecodeBudget,
    limits: EdgeLimits,
}

impl<S> Edge<S> {
    pub fn new(inner: S, api: Shared, budget: DecodeBudget, limits: EdgeLimits) -> Self {
        Self {
            inner,
            shared: Arc::new(EdgeShared {
                api,
                budget,
                limits,
            }),
        }
    }
}

/// What the edge decided for a call before its body.
enum Admission {
    Refused(Status),
    Admitted {
        limit: usize,
        release: Release,
        ceiling: Duration,
        /// A batch's items, counted as they arrive.
        items: Option<FieldCounter>,
        /// Whose share of the decode budget; None: health and reflection,
        /// which take none.
        caller: Option<String>,
    },
}

impl EdgeShared {
    fn admit<B>(&self, method: Option<&Method>, request: &mut http::Request<B>) -> Admission {
        let path = request.uri().path();
        let Some(method) = method else {
            if path.starts_with(CRYPTO_PREFIX) || path.starts_with(ADMIN_PREFIX) {
                // Not a method this sidecar has: tonic would answer
                // UNIMPLEMENTED; it does here, without reading the body.
                return Admission::Refused(Status::unimplemented("no such method"));
            }
            return Admission::Admitted {
                limit: OTHER_MAX_REQUEST_BYTES,
                release: Release::OnNextMessage,
                ceiling: self.limits.stream_timeout,
                items: None,
                caller: None,
            };
        };
        let Some(peer) = request.extensions().get::<Peer>().cloned() else {
            tracing::error!("a call arrived without its connection's details");
            return Admission::Refused(Status::internal("internal error"));
        };
        let guard = &self.api.guard;
        let caller: Caller = match guard.authenticate(request.headers(), &peer) {
            Ok(caller) => caller,
            Err(e) => {
                self.api
                    .count_refusal(method.action, &peer.name(), None, &e);
                return Admission::Refused(Status::from(e));
            }
        };
        if let Err(e) = guard.preauthorize(&caller, method.permission, method.tenant_scoped) {
            self.api
                .count_refusal(method.action, &caller.identity, None, &e);
            return Admission::Refused(Status::from(e));
        }
        // Only now does the call keep its connection open (server::conn).
        if let Some(activity) = request.extensions().get::<CallActivity>() {
            activity.admitted();
        }
        let identity = caller.identity.clone();
        request.extensions_mut().insert(caller);
        Admission::Admitted {
            caller: Some(identity),
            limit: match method.service {
                Service::Crypto => self.limits.crypto_max_request_bytes,
                Service::Admin => self.limits.admin_max_request_bytes,
            },
            release: if method.client_streaming {
                Release::OnNextMessage
            } else {
                Release::AtResponseEnd
            },
            ceiling: if method.streaming {
                self.limits.stream_timeout
            } else {
                self.limits.call_timeout
            },
            items: method
                .batch_items
                .map(|field| FieldCounter::new(field, self.api.limits.max_batch_items)),
        }
    }
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A call's deadline passed: counted as a refusal.
fn deadline_exceeded() -> Status {
    refused(Refusal::Deadline);
    Status::deadline_exceeded(
        "the call took longer than its deadline (the client's grpc-timeout or the server's ceiling)",
    )
}

impl<S, B> tower::Service<http::Request<B>> for Edge<S>
where
    S: tower::Service<http::Request<BudgetedBody<B>>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<EdgeBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The routes are always ready; each call takes a clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = METHODS.iter().find(|m| m.path == path);
        // Every call of keywarden's services runs in a trace (health and
        // reflection do not).
        let trace = method.map(|m| CallTrace::start(m.path, request.headers(), request.uri()));
        let admission = match &trace {
            Some(trace) => trace.in_scope(|| self.shared.admit(method, &mut request)),
            None => self.shared.admit(method, &mut request),
        };
        let (limit, release, ceiling, items, caller) = match admission {
            Admission::Refused(status) => {
                return Box::pin(std::future::ready(Ok(refusal(status, trace))));
            }
            Admission::Admitted {
                limit,
                release,
                ceiling,
                items,
                caller,
            } => (limit, release, ceiling, items, caller),
        };
        let timeout = grpc_timeout(request.headers()).map_or(ceiling, |t| t.min(ceiling));
        let deadline = Instant::now() + timeout;
        let held = Arc::new(Held::default());
        let request = request.map(|body| {
            BudgetedBody::new(
                body,
                &self.shared.budget,
                caller.as_deref().map_or(Charge::Free, Charge::Caller),
                limit,
                release,
                held.clone(),
                items,
            )
        });
        let mut inner = self.inner.clone();
        let batch_limit = self.shared.api.limits.max_batch_items;
        Box::pin(async move {
            let call = super::codec::with_batch_limit(batch_limit, inner.call(request));
            let call = tokio::time::timeout_at(deadline, call);
            let answered = match &trace {
                Some(trace) => trace.scope(call).await,
                None => call.await,
            };
            match answered {
                Err(_) => Ok(refusal(deadline_exceeded(), trace)),
                Ok(Ok(response)) => {
                    // A trailers-only answer (an error) has its status here.
                    if let Some(trace) = &trace {
                        observe_status(trace, response.headers());
                    }
                    Ok(response.map(|body| EdgeBody {
                        inner: body,
                        deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
                        _held: Some(held),
                        trace,
                        done: false,
                    }))
                }
                Ok(Err(e)) => Err(e),
            }
        })
    }
}

/// A call refused at the edge: a trailers-only gRPC response.
fn refusal(status: Status, trace: Option<CallTrace>) -> http::Response<EdgeBody> {
    if let Some(trace) = &trace {
        trace.finish(status.code() as i32);
    }
    status
        .into_http::<tonic::body::Body>()
        .map(|body| EdgeBody {
            inner: body,
            deadline: None,
            _held: None,
            trace: None,
            done: false,
        })
}

/// Records the gRPC status in `headers` (a response's, or its trailers), if
/// there is one, on the call's trace.
fn observe_status(trace: &CallTrace, headers: &http::HeaderMap) {
    if let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    {
        trace.finish(code);
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends with DEADLINE_EXCEEDED when the call's
    /// deadline passes, and holds the call's share of the decode budget
    /// until it is done.
    pub struct EdgeBody {
        #[pin]
        inner: tonic::body::Body,
        deadline: Option<Pin<Box<Sleep>>>,
        _held: Option<Arc<Held>>,
        // The call's trace: its body is polled inside it, and its exported
        // span ends when the body is dropped.
        trace: Option<CallTrace>,
        done: bool,
    }
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let trace = this.trace.as_ref();
        let polled = match trace {
            Some(trace) => trace.in_scope(|| this.inner.poll_frame(cx)),
            None => this.inner.poll_frame(cx),
        };
        match polled {
            Poll::Ready(None) => {
                *this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trace), Some(trailers)) = (trace, frame.trailers_ref()) {
                    observe_status(trace, trailers);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                *this.done = true;
                let mut trailers = http::HeaderMap::new();
                // A status with a fixed message always makes headers.
                let _ = deadline_exceeded().add_header(&mut trailers);
                if let Some(trace) = trace {
                    observe_status(trace, &trailers);
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The code of a trailers-only refusal, for tests of the edge.
pub fn refusal_code(response: &http::Response<EdgeBody>) -> Option<Code> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let parse = |v: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_method_of_the_proto_is_in_the_table_once() {
        let descriptor = <prost_types::FileDescriptorSet as prost::Message>::decode(
            super::super::pb::FILE_DESCRIPTOR_SET,
        )
        .unwrap();
        let mut paths: Vec<String> = descriptor
            .file
            .iter()
            .flat_map(|f| {
                let package = f.package().to_owned();
                f.service.iter().flat_map(move |s| {
                    let service = format!("{package}.{}", s.name());
                    s.method.iter().map(move |m| {
                        (
                            format!("/{service}/{}", m.name()),
                            m.client_streaming(),
                            m.server_streaming(),
                        )
                    })
                })
            })
            .map(|(path, client, server)| {
                let method = METHODS
                    .iter()
                    .find(|m| m.path == path)
                    .unwrap_or_else(|| panic!("{path} is not in METHODS"));
                assert_eq!(method.client_streaming, client, "{path}");
                assert_eq!(method.server_streaming, server, "{path}");
                assert_eq!(method.streaming, client || server, "{path}");
                path
            })
            .collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), METHODS.len());
    }
}
