//! One connection, from accept to close: the TLS handshake, HTTP/2, and the
//! timeouts that keep a stranger from holding it.
//!
//! - **Handshake.** The TLS handshake and the first admitted call's headers
//!   must arrive within `server.handshake_timeout_seconds` of the accept, or
//!   the connection is closed: a connection that is silent, or makes only
//!   calls refused at the edge or gRPC health and reflection calls, holds
//!   its place under `server.max_connections` for at most that long.
//! - **Idle.** A connection with no admitted call open for
//!   `server.idle_timeout_seconds` is closed (an HTTP/2 GOAWAY, then the
//!   close five seconds later, whatever is still open). An admitted call is
//!   one the edge let through to a keywarden method
//!   ([`crate::auth::CallActivity`]).
//! - **Keepalive.** After `server.keepalive_interval_seconds` without a frame
//!   from the client, the server sends an HTTP/2 PING; no answer within
//!   `server.keepalive_timeout_seconds` closes the connection (a peer that
//!   vanished without a FIN). This goes on during a drain, so a silent
//!   client holds a graceful shutdown for at most the interval plus the
//!   timeout (tests/limits.rs,
//!   `a_silent_client_cannot_hold_a_graceful_shutdown_past_the_keepalive`).
//! - **Streams.** At most `server.max_concurrent_streams` calls are open at
//!   once on a connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS), and a
//!   request's headers are at most 16 KiB (SETTINGS_MAX_HEADER_LIST_SIZE).
//! - **Shutdown.** A stop signal sends GOAWAY: calls in flight finish, no new
//!   ones start.
//!
//! Every request gets the connection's [`Peer`] in its extensions, for
//! authentication.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    auth::{CallActivity, Peer},
    config::ServerConfig,
};

/// Largest request header block (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE): room
/// for a JWT of several kilobytes.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;

/// The connection's HTTP/2 flow-control window: room for every stream's
/// window (`server.stream_window_bytes`) at once, so that calls whose bytes
/// wait unread (a call waiting for its share of the decode budget) can never
/// use up the window of the call they wait for, nor of small calls beside
/// them. hyper's default (1 MiB each) let one waiting call stall a whole
/// connection (issue 14's attack review).
fn connection_window(max_concurrent_streams: u32, stream_window: u32) -> u32 {
    max_concurrent_streams
        .saturating_mul(stream_window)
        .clamp(stream_window, (1 << 31) - 1)
}

/// How long a connection closed for idleness or a missed handshake may take
/// to finish its close before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A connection's byte stream: TCP or a unix socket, with or without TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// What a connection may hold, and for how long.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    pub max_concurrent_streams: u32,
    pub stream_window: u32,
}

impl From<&ServerConfig> for ConnLimits {
    fn from(c: &ServerConfig) -> Self {
        Self {
            handshake_timeout: Duration::from_secs(c.handshake_timeout_seconds),
            idle_timeout: Duration::from_secs(c.idle_timeout_seconds),
            keepalive_interval: (c.keepalive_interval_seconds > 0)
                .then(|| Duration::from_secs(c.keepalive_interval_seconds)),
            keepalive_timeout: Duration::from_secs(c.keepalive_timeout_seconds),
            max_concurrent_streams: c.max_concurrent_streams,
            stream_window: c.stream_window_bytes,
        }
    }
}

/// Calls open on a connection, and since when none is.
struct Activity {
    open: AtomicUsize,
    /// Whether any call has started: until then the handshake timeout
    /// applies, after it the idle timeout.
    started: AtomicBool,
    /// When the last call ended (or the connection was accepted).
    since: Mutex<Instant>,
    changed: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            since: Mutex::new(Instant::now()),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// A call arrived; it counts once the edge admits it.
    fn begin(self: &Arc<Self>) -> CallGuard {
        CallGuard(Arc::new(CallState {
            activity: self.clone(),
            admitted: AtomicBool::new(false),
        }))
    }

    /// Resolves once no call has been open for the applicable timeout.
    async fn idle(&self, limits: &ConnLimits) {
        loop {
            let changed = self.changed.notified();
            if self.open.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            let limit = if self.started.load(Ordering::SeqCst) {
                limits.idle_timeout
            } else {
                limits.handshake_timeout
            };
            let since = *self.since.lock().unwrap_or_else(|p| p.into_inner());
            let deadline = since + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = changed => {}
            }
        }
    }
}

/// One call, and whether the edge admitted it.
struct CallState {
    activity: Arc<Activity>,
    admitted: AtomicBool,
}

impl CallState {
    fn admit(&self) {
        if !self.admitted.swap(true, Ordering::SeqCst) {
            let activity = &self.activity;
            activity.open.fetch_add(1, Ordering::SeqCst);
            activity.started.store(true, Ordering::SeqCst);
            activity.changed.notify_one();
        }
    }
}

/// One call; its drop ends it.
struct CallGuard(Arc<CallState>);

impl CallGuard {
    fn activity(&self) -> CallActivity {
        let state = self.0.clone();
        CallActivity::new(move || state.admit())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.0.admitted.load(Ordering::SeqCst) {
            return;
        }
        let activity = &self.0.activity;
        if activity.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            *activity.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        activity.changed.notify_one();
    }
}

/// The service of one connection: puts the [`Peer`] and a
/// [`CallActivity`] into every request and counts the admitted calls open (a
/// call is open until its response body is done).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    peer: Peer,
    activity: Arc<Activity>,
}

impl<S, B> tower::Service<http::Request<Incoming>> for Tracked<S>
where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Incoming>) -> Self::Future {
        let call = self.activity.begin();
        request.extensions_mut().insert(self.peer.clone());
        request.extensions_mut().insert(call.activity());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody { inner, _call: call }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call open until it is done.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        _call: CallGuard,
    }
}

impl<B: Body<Data = Bytes>> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one accepted connection until it closes, `stop` turns true (then
/// it drains: GOAWAY, calls in flight finish), or a timeout closes it.
pub async fn serve_connection<S, B>(
    io: Box<dyn Io>,
    mut peer: Peer,
    tls: Option<TlsAcceptor>,
    service: S,
    limits: Arc<ConnLimits>,
    mut stop: watch::Receiver<bool>,
) where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let accepted = Instant::now();
    // keywarden_connections_open, from the accept to the close.
    let _open = crate::observe::metrics::GaugeGuard::new(crate::observe::metrics::CONNECTIONS_OPEN);
    let io: Box<dyn Io> = match tls {
        None => io,
        Some(acceptor) => {
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)).await {
                Ok(Ok(stream)) => {
                    peer.certs = stream.get_ref().1.peer_certificates().map(|certs| {
                        Arc::new(certs.iter().map(|c| c.clone().into_owned()).collect())
                    });
                    Box::new(stream)
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer.name(), error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer.name(), "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let activity = Arc::new(Activity::new());
    // The handshake timeout counts from the accept, TLS included.
    *activity.since.lock().unwrap_or_else(|p| p.into_inner()) = accepted;
    let tracked = Tracked {
        inner: service,
        peer,
        activity: activity.clone(),
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(connection_window(
            limits.max_concurrent_streams,
            limits.stream_window,
        ))
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(tracked));
    tokio::pin!(conn);
    let mut closing_since: Option<Instant> = None;
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|stopped| *stopped), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = activity.idle(&limits), if closing_since.is_none() && !draining => {
                closing_since = Some(Instant::now());
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(closing_since.map_or_else(Instant::now, |at| at + CLOSE_GRACE)), if closing_since.is_some() => {
                // A peer that never sent the HTTP/2 preface does not close.
                return;
            }
        }
    }
}
