//! The admin listener: plain HTTP/1.1 on `[admin] listen` (by default
//! 127.0.0.1:7401), for probes and Prometheus, as linkerd2-proxy's admin
//! server does.
//!
//! | request        | answer |
//! |----------------|--------|
//! | `GET /live`    | 200 `ok` while the runtime is not wedged: a heartbeat task ticks every second, and /live is 503 once its last tick is older than [`LIVE_BOUND`] |
//! | `GET /ready`   | 200 or 503 with a JSON body, as the readiness hook says |
//! | `GET /metrics` | 200, every metric in Prometheus' text format (0.0.4) |
//! | any other path | 404 |
//! | not `GET`      | 405, `Allow: GET` |
//!
//! **No authentication**: whoever reaches the port reads `/metrics` (no
//! secret is in it, but tenant ids and traffic are). It listens on loopback
//! by default; in a pod, bind it to the pod's address only for the kubelet's
//! probes and Prometheus, and keep it from the rest of the network (a
//! NetworkPolicy).
//!
//! A stranger cannot hold it, nor keep the kubelet's probes out: one
//! request per connection (the answer closes it, as a kubelet's probe and
//! Prometheus expect), a request's headers must arrive within
//! [`HEADER_TIMEOUT`], headers are at most 16 KiB, and a connection lives at
//! most [`CONNECTION_LIFETIME`]. At most [`MAX_CONNECTIONS`] are open at
//! once: a new connection beyond them closes the oldest open one, so
//! connections held open without a request push out each other, never the
//! probe that sends its request as it connects (found by the review of
//! issue 16: refusing the newest let 16 silent connections fail every
//! probe). `/metrics` is rendered at most once per [`METRICS_MAX_AGE`] and
//! the text reused meanwhile, so a flood of scrapes costs the data plane
//! one render a second, not one per request. Request bodies are never read.
//! The server stops it once the gRPC listeners have drained, so it answers
//! through a drain.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hyper::{Method, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, task::AbortHandle, time::Instant};
use tokio_util::task::TaskTracker;

/// Whether the sidecar is ready, and the JSON body that says so.
pub type ReadyHook = Arc<dyn Fn() -> (bool, String) + Send + Sync>;

/// A ready hook that always says ready (until readiness is wired in).
pub fn always_ready() -> ReadyHook {
    Arc::new(|| (true, r#"{"ready":true}"#.to_owned()))
}

/// /live is 503 once the heartbeat's last tick is older than this.
pub const LIVE_BOUND: Duration = Duration::from_secs(10);
/// How often the heartbeat ticks (and the recorder's upkeep runs).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Connections served at once; a new one beyond them closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// `/metrics` answers with a text rendered at most this long ago.
pub const METRICS_MAX_AGE: Duration = Duration::from_secs(1);
/// The longest a connection is served; then it is closed after its request
/// in progress.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
const MAX_HEADER_BYTES: usize = 16 << 10;

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// What the admin listener serves.
#[derive(Clone)]
pub struct Admin {
    pub ready: ReadyHook,
    pub metrics: PrometheusHandle,
}

/// The last `/metrics` text and when it was rendered.
#[derive(Default)]
struct Rendered(std::sync::Mutex<Option<(Instant, Arc<str>)>>);

impl Rendered {
    /// The text rendered at most [`METRICS_MAX_AGE`] ago, rendering it anew
    /// when it is older.
    fn get(&self, handle: &PrometheusHandle) -> Arc<str> {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((at, text)) if at.elapsed() < METRICS_MAX_AGE => text.clone(),
            _ => {
                let text: Arc<str> = super::metrics::render(handle).into();
                *last = Some((Instant::now(), text.clone()));
                text
            }
        }
    }
}

/// The open connections, oldest first, by number.
#[derive(Default)]
struct Open(std::sync::Mutex<std::collections::VecDeque<(u64, AbortHandle)>>);

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(u64, AbortHandle)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for one more: closes the oldest while [`MAX_CONNECTIONS`]
    /// are open.
    fn make_room(&self) {
        let mut open = self.lock();
        while open.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = open.pop_front() {
                oldest.abort();
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut open = self.lock();
        if let Some(at) = open.iter().position(|(n, _)| *n == id) {
            open.remove(at);
        }
    }
}

/// Takes its connection off [`Open`] when the connection's task ends.
struct Registered(Arc<Open>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

/// The heartbeat: milliseconds since `base` at the last tick.
struct Heartbeat {
    base: Instant,
    last_ms: AtomicU64,
}

impl Heartbeat {
    fn age(&self) -> Duration {
        let now = self.base.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Serves `listener` until `shutdown` resolves; then stops accepting and
/// closes its connections after their request in progress.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) {
    let heartbeat = Arc::new(Heartbeat {
        base: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let ticker = {
        let heartbeat = Arc::downgrade(&heartbeat);
        let handle = admin.metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                let Some(heartbeat) = heartbeat.upgrade() else {
                    return;
                };
                let ms = u64::try_from(heartbeat.base.elapsed().as_millis()).unwrap_or(u64::MAX);
                heartbeat.last_ms.store(ms, Ordering::Relaxed);
                n += 1;
                if n.is_multiple_of(5) {
                    super::metrics::upkeep(&handle);
                }
            }
        })
    };
    let open = Arc::new(Open::default());
    let rendered = Arc::new(Rendered::default());
    let mut next_id: u64 = 0;
    let connections = TaskTracker::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        open.make_room();
        next_id += 1;
        let id = next_id;
        let registered = Registered(open.clone(), id);
        let (admin, heartbeat, rendered, mut stop) = (
            admin.clone(),
            heartbeat.clone(),
            rendered.clone(),
            stop_rx.clone(),
        );
        // Registered before the task can end, under the same lock.
        let mut list = open.lock();
        let task = connections.spawn(async move {
            let _registered = registered;
            let service = hyper::service::service_fn(move |request| {
                let response = answer(
                    request.method(),
                    request.uri().path(),
                    &admin,
                    &heartbeat,
                    &rendered,
                );
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(false)
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
            tokio::pin!(lifetime);
            let mut closing = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "admin connection ended with an error");
                        }
                        return;
                    }
                    () = &mut lifetime, if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = stop.wait_for(|stopped| *stopped), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
        list.push_back((id, task.abort_handle()));
        drop(list);
    }
    drop(listener);
    let _ = stop_tx.send(true);
    connections.close();
    // Each connection ends after its request in progress, or its header
    // timeout.
    let _ = tokio::time::timeout(HEADER_TIMEOUT * 2, connections.wait()).await;
    ticker.abort();
}

fn answer(
    method: &Method,
    path: &str,
    admin: &Admin,
    heartbeat: &Heartbeat,
    rendered: &Rendered,
) -> Response<String> {
    if method != Method::GET {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET")
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body("method not allowed\n".to_owned())
            .expect("a valid response");
    }
    let (status, content_type, body) = match path {
        "/live" => {
            let age = heartbeat.age();
            if age <= LIVE_BOUND {
                (
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    "ok\n".to_owned(),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!(
                        "wedged: the heartbeat last ticked {} ms ago\n",
                        age.as_millis()
                    ),
                )
            }
        }
        "/ready" => {
            let (ready, body) = (admin.ready)();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", body)
        }
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            rendered.get(&admin.metrics).to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(ready: bool) -> Admin {
        Admin {
            ready: Arc::new(move || (ready, format!("{{\"ready\":{ready}}}"))),
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
        }
    }

    fn heartbeat(age: Duration) -> Heartbeat {
        let base = Instant::now() - Duration::from_secs(3600);
        let last = Duration::from_secs(3600).saturating_sub(age);
        Heartbeat {
            base,
            last_ms: AtomicU64::new(last.as_millis() as u64),
        }
    }

    fn get(path: &str, admin: &Admin, heartbeat: &Heartbeat) -> (StatusCode, String, String) {
        let response = answer(&Method::GET, path, admin, heartbeat, &Rendered::default());
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        (response.status(), content_type, response.into_body())
    }

    #[tokio::test]
    async fn live_is_503_once_the_heartbeat_is_older_than_its_bound() {
        let admin = admin(true);
        let fresh = heartbeat(Duration::from_secs(1));
        assert_eq!(get("/live", &admin, &fresh).0, StatusCode::OK);
        assert_eq!(get("/live", &admin, &fresh).2, "ok\n");
        let at_bound = heartbeat(LIVE_BOUND - Duration::from_millis(100));
        assert_eq!(get("/live", &admin, &at_bound).0, StatusCode::OK);
        let wedged = heartbeat(LIVE_BOUND + Duration::from_secs(1));
        let (status, _, body) = get("/live", &admin, &wedged);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with("wedged: the heartbeat last ticked "),
            "{body}"
        );
    }

    #[tokio::test]
    async fn ready_answers_the_hook_as_json() {
        let beat = heartbeat(Duration::ZERO);
        assert_eq!(
            get("/ready", &admin(true), &beat),
            (
                StatusCode::OK,
                "application/json".into(),
                r#"{"ready":true}"#.into()
            )
        );
        assert_eq!(
            get("/ready", &admin(false), &beat),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json".into(),
                r#"{"ready":false}"#.into()
            )
        );
    }

    #[tokio::test]
    async fn other_paths_are_404_and_other_methods_405() {
        let (admin, beat) = (admin(true), heartbeat(Duration::ZERO));
        for path in ["/", "/nope", "/live/", "/metrics/x"] {
            assert_eq!(get(path, &admin, &beat).0, StatusCode::NOT_FOUND, "{path}");
        }
        for method in [
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
        ] {
            let response = answer(&method, "/metrics", &admin, &beat, &Rendered::default());
            assert_eq!(
                response.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method}"
            );
            assert_eq!(response.headers()[header::ALLOW], "GET");
        }
        let (status, content_type, _) = get("/metrics", &admin, &beat);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    }
}
