//! Running the sidecar: open the data directory, build the key manager, bind
//! the listeners, serve until told to stop, then drain.
//!
//! Shutdown is graceful: on SIGTERM or ctrl-c every listener stops accepting,
//! calls in flight finish (up to [`DRAIN_TIMEOUT`]), connections close with a
//! lingering close (see [`linger`]), and unix socket files are removed.
//! While it serves, the TLS, tokens and policy files reload on change and on
//! SIGHUP ([`crate::reload`]).

mod conn;
mod linger;
mod listen;
mod policies;
pub mod ready;
mod tls;

pub use crate::reload::tls::LiveTls;
pub use conn::{ConnLimits, MAX_HEADER_LIST_BYTES};
pub use listen::Listener;
pub use policies::spawn_policy_scheduler;
pub use ready::{Readiness, ReadyParts, ReadySettings};
pub use tls::tls_config;

use std::{
    fs, io,
    os::unix::fs::DirBuilderExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use secrecy::{ExposeSecret, SecretString};
use thiserror::Error;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::task::TaskTracker;
use tonic::service::Routes;

use crate::{
    api::{
        Shared,
        admin::AdminService,
        budget::DecodeBudget,
        codec,
        crypto::CryptoService,
        edge::{Edge, EdgeLimits, OTHER_MAX_REQUEST_BYTES},
        pb,
    },
    audit::{AuditLog, counts::Counts},
    auth::{
        Guard, Policy, StaticTokens,
        jwt::JwtVerifier,
        tokens::{ADMIN_TOKEN_FILE, ADMIN_TOKEN_NAME, load_or_create_admin_token},
    },
    config::{
        AdminListen, AuditSink, AuthConfig, Config, ConfigError, KmsProvider, ServerConfig,
        StoreBackend,
    },
    keys::{KeyManager, KeySettings},
    kms::{
        RootKeyProvider,
        aws::AwsKms,
        local::{LocalRootKey, ROOT_KEY_FILE},
        metered::Metered,
    },
    observe::{
        self,
        grpc::{GrpcMetrics, MethodLabels},
        metrics::TenantLabels,
    },
    rate::{Rate, TenantLimiter},
    receipt::{RECEIPT_KEY_FILE, ReceiptSigner},
    reload::Reloader,
    store::{
        Keystore, StoreError,
        metered::MeteredKeystore,
        postgres::{
            PostgresKeystore, PostgresOptions,
            events::{self, Signal},
        },
        sqlite::{KEYSTORE_FILE, SqliteKeystore},
    },
};

/// How long calls in flight may take to finish after a shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error("root key {path}: {source}")]
    RootKey { path: PathBuf, source: io::Error },
    #[error("keystore: {0}")]
    Keystore(#[from] StoreError),
    #[error("root-key provider: {0}")]
    Kms(#[from] crate::kms::KmsError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The backends [`open`] opened: the root-key provider (metered) and the
/// keystore, with what a PostgreSQL keystore also serves.
pub struct Backends {
    pub root: Arc<Metered>,
    pub store: Arc<dyn Keystore>,
    /// The PostgreSQL keystore's URL, to listen for other sidecars' changes.
    pub events: Option<SecretString>,
    /// The PostgreSQL keystore's pool, for the audit sink there.
    pub postgres: Option<sqlx::PgPool>,
}

/// Opens the data directory, the root-key provider the configuration names
/// (the local root key, created on first start, or AWS KMS) and the keystore
/// (SQLite in the data directory, or PostgreSQL).
pub async fn open(config: &Config) -> Result<Backends, StartError> {
    let dir = &config.data_dir;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StartError::DataDir {
            path: dir.clone(),
            source,
        })?;
    let root: Arc<dyn RootKeyProvider> = match config.kms.provider {
        KmsProvider::Local => Arc::new(open_local_root(dir)?),
        KmsProvider::Aws => {
            let settings = config.kms.aws_settings().ok_or_else(|| {
                ConfigError::new("kms", "provider = aws needs kms.region and kms.key_id")
            })?;
            let kms = AwsKms::connect(&settings, None).await?;
            tracing::info!(region = %settings.default_region, root_key = %kms.shared_key(None)?, "using AWS KMS");
            Arc::new(kms)
        }
    };
    let (store, events, postgres): (Arc<dyn Keystore>, _, _) =
        match (&config.store.backend, &config.store.url) {
            (StoreBackend::Postgres, Some(url)) => {
                let options = PostgresOptions {
                    max_connections: config.store.max_connections,
                    migrate: config.store.migrate,
                    ..PostgresOptions::default()
                };
                let store = PostgresKeystore::connect(url.expose_secret(), options).await?;
                tracing::info!(
                    migrate = config.store.migrate,
                    "using the PostgreSQL keystore"
                );
                let pool = store.pool();
                (Arc::new(store), Some(url.clone()), Some(pool))
            }
            (StoreBackend::Postgres, None) => {
                return Err(ConfigError::new(
                    "store.url",
                    "is required with backend = \"postgres\"",
                )
                .into());
            }
            (StoreBackend::Sqlite, _) => (
                Arc::new(SqliteKeystore::open(&dir.join(KEYSTORE_FILE)).await?),
                None,
                None,
            ),
        };
    Ok(Backends {
        root: Arc::new(Metered::new(root)),
        store: Arc::new(MeteredKeystore::new(store)),
        events,
        postgres,
    })
}

/// Follows other sidecars' changes to a shared keystore, evicting what they
/// make stale, for as long as the process runs.
fn follow_events(url: SecretString, keys: Arc<KeyManager>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(signal) = rx.recv().await {
            match signal {
                Signal::Event(event) => keys.apply_event(&event).await,
                Signal::Resync => keys.evict_all(),
            }
        }
    });
    tokio::spawn(async move {
        events::listen(url.expose_secret(), tx, std::future::pending()).await;
    });
}

fn open_local_root(dir: &std::path::Path) -> Result<LocalRootKey, StartError> {
    let key_path = dir.join(ROOT_KEY_FILE);
    let (root, created) =
        LocalRootKey::load_or_create(&key_path).map_err(|source| StartError::RootKey {
            path: key_path.clone(),
            source,
        })?;
    if created {
        tracing::warn!(path = %key_path.display(), root_key = root.id(), "generated a new local root key");
    }
    tracing::warn!(
        root_key = root.id(),
        "the local root key is for development: anyone who can read {} can unwrap every tenant key, \
         and a copy of it outlives any shred; use a KMS in production",
        key_path.display()
    );
    Ok(root)
}

/// The sidecar's gRPC service: Crypto, Admin, health and reflection, behind
/// the edge ([`crate::api::edge`]: authentication on headers, the decode
/// budget, message size limits and deadlines), measured outside it
/// ([`crate::observe::grpc`]: calls refused at the edge count too).
pub type Service = GrpcMetrics<Edge<Routes>>;

/// The `grpc_server_*` labels of a path the sidecar serves: keywarden's
/// methods ([`crate::api::edge::METHODS`]), gRPC health and reflection.
fn method_labels(path: &str) -> Option<MethodLabels> {
    const OTHERS: [(&str, bool, bool); 3] = [
        ("/grpc.health.v1.Health/Check", false, false),
        ("/grpc.health.v1.Health/Watch", false, true),
        (
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            true,
            true,
        ),
    ];
    if let Some(m) = crate::api::edge::METHODS.iter().find(|m| m.path == path) {
        return Some(MethodLabels::from_path(
            m.path,
            m.client_streaming,
            m.server_streaming,
        ));
    }
    OTHERS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|&(p, client, server)| MethodLabels::from_path(p, client, server))
}

/// The gRPC routes: Crypto, Admin, health and reflection, behind the edge,
/// with gRPC health SERVING from start to exit (tests, the load generator;
/// the sidecar uses [`routes_following`]).
pub async fn routes(shared: Shared) -> Service {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::crypto_server::CryptoServer<CryptoService>>()
        .await;
    health
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    routes_with(shared, health_service)
}

/// [`routes`] with gRPC health following `readiness`
/// ([`ready`]: per service, NOT_SERVING from a drain on).
pub async fn routes_following(shared: Shared, readiness: &Arc<Readiness>) -> Service {
    let (health, health_service) = tonic_health::server::health_reporter();
    readiness.follow(health).await;
    routes_with(shared, health_service)
}

fn routes_with<H: tonic_health::pb::health_server::Health>(
    shared: Shared,
    health_service: tonic_health::pb::health_server::HealthServer<H>,
) -> Service {
    let max = shared.limits.max_request_bytes;
    let server = shared.server.clone();
    codec::raise_max_batch_items(shared.limits.max_batch_items);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let mut builder = Routes::builder();
    builder
        .add_service(crypto_server(CryptoService::new(shared.clone()), max))
        .add_service(
            pb::admin_server::AdminServer::new(AdminService::new(shared.clone()))
                .max_decoding_message_size(server.admin_max_request_bytes),
        )
        .add_service(health_service.max_decoding_message_size(OTHER_MAX_REQUEST_BYTES))
        .add_service(reflection.max_decoding_message_size(OTHER_MAX_REQUEST_BYTES));
    let edge = Edge::new(
        builder.routes(),
        shared,
        DecodeBudget::new(
            server.decode_budget_bytes,
            server.decode_budget_per_caller_bytes,
            server.request_min_bytes_per_second,
        ),
        EdgeLimits {
            crypto_max_request_bytes: max,
            admin_max_request_bytes: server.admin_max_request_bytes,
            call_timeout: Duration::from_secs(server.call_timeout_seconds),
            stream_timeout: Duration::from_secs(server.stream_timeout_seconds),
        },
    );
    GrpcMetrics::new(edge, method_labels)
}

/// A `keywarden.v1.Crypto` service as the sidecar serves it, accepting
/// requests up to `max_request_bytes` (also serves `keywarden-bench echo`).
pub fn crypto_server<S: pb::crypto_server::Crypto>(
    service: S,
    max_request_bytes: usize,
) -> pb::crypto_server::CryptoServer<S> {
    pb::crypto_server::CryptoServer::new(service).max_decoding_message_size(max_request_bytes)
}

/// `S` with every call counted as admitted: [`admit_every_call`].
pub type AdmitEveryCall<S, B> =
    tower::util::MapRequest<S, fn(http::Request<B>) -> http::Request<B>>;

/// A service to [`serve`] without the edge: every call counts as admitted,
/// as the edge marks the calls it lets through
/// ([`crate::auth::CallActivity`]), so that connections stay open under the
/// same idle rule as the sidecar's callers (`keywarden-bench echo`).
pub fn admit_every_call<S, B>(service: S) -> AdmitEveryCall<S, B> {
    fn admit<B>(request: http::Request<B>) -> http::Request<B> {
        if let Some(activity) = request.extensions().get::<crate::auth::CallActivity>() {
            activity.admitted();
        }
        request
    }
    tower::util::MapRequest::new(service, admit::<B>)
}

/// Authentication and authorization as `auth` configures them, with the
/// embedded admin token if there is one. Starts the JWKS reloader.
pub fn guard(auth: &AuthConfig, admin_token: Option<&SecretString>) -> Result<Guard, ConfigError> {
    let tokens = match &auth.tokens_file {
        Some(path) => StaticTokens::load(path)?,
        None => StaticTokens::default(),
    };
    let mut embedded = StaticTokens::default();
    if let Some(token) = admin_token {
        embedded.add(ADMIN_TOKEN_NAME, token);
    }
    let jwt = match &auth.jwt {
        Some(config) => {
            let verifier = Arc::new(JwtVerifier::load(config)?);
            verifier
                .clone()
                .spawn_reloader(Duration::from_secs(config.reload_seconds));
            Some(verifier)
        }
        None => None,
    };
    let policy = match &auth.policy_file {
        Some(path) => Policy::load(path)?,
        None => Policy::default_policy(),
    };
    Ok(Guard::new(tokens, embedded, jwt, policy))
}

/// Serves `service` on every listener until `shutdown` resolves, then
/// drains: listeners close, every connection gets a GOAWAY, calls in flight
/// finish (up to [`DRAIN_TIMEOUT`]), closed connections linger. TCP
/// listeners use `tls` when given: each handshake takes the configuration
/// current at its accept ([`LiveTls`]). `server` bounds connections and their
/// timeouts ([`conn`], [`listen`]).
pub async fn serve<S, B>(
    service: S,
    listeners: Vec<Listener>,
    tls: Option<LiveTls>,
    server: &ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()>
where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let lingering = TaskTracker::new();
    let connections = TaskTracker::new();
    let places = Arc::new(tokio::sync::Semaphore::new(server.max_connections));
    let limits = Arc::new(ConnLimits::from(server));
    let mut loops = JoinSet::new();
    let mut socket_paths = Vec::new();
    for listener in listeners {
        let tls = match &listener {
            Listener::Tcp(_) => tls.clone(),
            Listener::Unix(_, path) => {
                socket_paths.push(path.clone());
                None
            }
        };
        let (service, limits, stop, lingering, connections) = (
            service.clone(),
            limits.clone(),
            stop_rx.clone(),
            lingering.clone(),
            connections.clone(),
        );
        loops.spawn(listener.accept_loop(
            places.clone(),
            stop_rx.clone(),
            move |io, mut peer, place| {
                if tls.is_some() {
                    peer.transport = crate::auth::Transport::Tls;
                }
                let io = Box::new(linger::Lingering::new(io, lingering.clone(), Some(place)));
                connections.spawn(conn::serve_connection(
                    io,
                    peer,
                    tls.as_ref().map(LiveTls::acceptor),
                    service.clone(),
                    limits.clone(),
                    stop.clone(),
                ));
            },
        ));
    }
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => {}
        Some(_) = loops.join_next() => {
            tracing::error!("a listener stopped accepting on its own; stopping");
        }
    }
    tracing::info!("shutting down: no new calls; draining calls in flight");
    let _ = stop_tx.send(true);
    let started = Instant::now();
    // The accept loops end at once, closing their listening sockets.
    while loops.join_next().await.is_some() {}
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "calls still in flight after the drain timeout; stopping anyway");
    }
    // Let closed connections finish their lingering close, so clients read
    // every last frame (each is bounded by LINGER_TIMEOUT).
    lingering.close();
    lingering.wait().await;
    for path in socket_paths {
        let _ = fs::remove_file(path);
    }
    tracing::info!(drain_ms = started.elapsed().as_millis() as u64, "stopped");
    Ok(())
}

/// What the gRPC services share, as `config` says, around `keys` and
/// `audit`: the embedded admin token (created on first start), the
/// receipt key, authentication and authorization, per-tenant limits and the
/// data-plane call counts (flushed to `audit` every interval).
pub fn shared(
    config: &Config,
    keys: Arc<KeyManager>,
    audit: Arc<AuditLog>,
) -> Result<Shared, StartError> {
    let admin_token = if config.auth.admin_token {
        let (token, created) =
            load_or_create_admin_token(&config.data_dir).map_err(|source| StartError::File {
                what: "admin token",
                path: config.data_dir.join(ADMIN_TOKEN_FILE),
                source,
            })?;
        if created {
            tracing::info!(path = %config.data_dir.join(ADMIN_TOKEN_FILE).display(), "created the admin token (the CLI finds it there)");
        }
        Some(token)
    } else {
        None
    };
    let receipts = ReceiptSigner::open(&config.data_dir).map_err(|source| StartError::File {
        what: "receipt key",
        path: config.data_dir.join(RECEIPT_KEY_FILE),
        source,
    })?;
    let counts = Arc::new(Counts::default());
    counts.clone().spawn_flusher(
        Arc::downgrade(&audit),
        Duration::from_secs(config.audit.count_interval_seconds),
    );
    Ok(Shared {
        keys,
        limits: config.limits.clone(),
        server: config.server.clone(),
        audit,
        data_plane_audit: config.audit.data_plane,
        counts,
        guard: Arc::new(guard(&config.auth, admin_token.as_ref())?),
        limiter: Arc::new(TenantLimiter::new(Rate {
            per_second: config.limits.tenant_items_per_second,
            burst: config.limits.tenant_burst,
        })),
        receipts: Arc::new(receipts),
        backup_retention: Duration::from_secs(
            u64::from(config.store.backup_retention_days) * 86_400,
        ),
        tenant_metrics: TenantLabels::new(config.admin.tenant_bound()).map(Arc::new),
    })
}

/// Reloads the TLS, tokens and policy files `config` names when they change
/// (and on SIGHUP with `hangup`) into `guard` and `tls`, for as long as the
/// returned [`Reloader`] lives. A refused file is a note in `readiness`'s
/// body, `reload_<file>` (e.g. `reload_tls`), until a good one replaces it.
pub fn start_reloads(
    config: &Config,
    guard: Arc<Guard>,
    tls: Option<LiveTls>,
    readiness: &Arc<Readiness>,
    hangup: bool,
) -> Reloader {
    let reloader = Reloader::start(config, guard, tls, hangup);
    let notes = readiness.clone();
    reloader
        .status()
        .set_observer(move |file, note| notes.set_note(&format!("reload_{file}"), note));
    reloader
}

/// `keywarden serve`: the whole sidecar from a configuration.
pub async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    config.validate()?;
    let started = Instant::now();
    // The recorder first, so that start-up's KMS and keystore calls count;
    // none when the admin listener is off (the macros then do nothing).
    let metrics = (config.admin.listen != AdminListen::Off).then(observe::metrics::install);
    let backends = open(&config).await?;
    let ready_root = backends.root.clone();
    let ready_store = backends.store.clone();
    let keys = Arc::new(KeyManager::new(
        backends.root,
        backends.store,
        config.cache.limits(),
        KeySettings {
            key_deletion_waiting_days: config.kms.deletion_waiting_days,
            provider: config.crypto.provider,
        },
    ));
    keys.spawn_cache_sweeper(config.cache.limits().sweep_interval());
    // Subject keys still in the legacy form move into the subject-key
    // domain in the background (docs/FORMAT.md, "The legacy form").
    keys.spawn_subject_key_upgrade(Duration::from_secs(60));
    if let Some(url) = backends.events {
        follow_events(url, keys.clone());
    }
    let audit = Arc::new(match (config.audit.sink, backends.postgres) {
        (AuditSink::Postgres, Some(pool)) => AuditLog::postgres(&config.data_dir, pool)?,
        _ => AuditLog::open(&config.data_dir)?,
    });
    spawn_policy_scheduler(
        &keys,
        Duration::from_secs(config.policy_interval_seconds),
        Arc::downgrade(&audit),
    );
    // Readiness (server/ready.rs): the checks start now; `/ready` and
    // gRPC health read it, and the shutdown below starts its drain.
    let readiness = Readiness::start(
        ReadyParts {
            store: ready_store,
            root: ready_root,
            audit: audit.clone(),
        },
        ReadySettings::new(config.cache.limits().stale_if_error),
    );
    let shared = shared(&config, keys, audit.clone())?;
    let counts = shared.counts.clone();
    let tls = config.tls.as_ref().map(tls_config).transpose()?;
    let mut listeners = Vec::new();
    for addr in &config.listen {
        listeners.push(Listener::bind(addr).await?);
    }
    let admin = match config.admin.listen {
        AdminListen::Off => None,
        AdminListen::Tcp(addr) => {
            Some(
                observe::http::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen {
                        addr: format!("{addr} (admin.listen)"),
                        source,
                    })?,
            )
        }
    };
    // The TLS, tokens and policy files reload on change and on SIGHUP, for
    // as long as the sidecar serves.
    let reloader = start_reloads(&config, shared.guard.clone(), tls.clone(), &readiness, true);
    let routes = routes_following(shared, &readiness).await;
    for listener in &listeners {
        tracing::info!(addr = %listener.local_addr(), "listening");
    }
    // The admin listener serves through the drain (probes and Prometheus
    // see it), and stops once the gRPC listeners have drained.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = match (admin, metrics) {
        (Some(listener), Some(metrics)) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(addr = %addr, "admin listener (/live, /ready, /metrics; no authentication)");
            }
            let ready = readiness.clone();
            let admin = observe::http::Admin {
                ready: Arc::new(move || {
                    let report = ready.report();
                    (report.ready, report.body)
                }),
                metrics,
            };
            Some(tokio::spawn(observe::http::serve(listener, admin, async {
                let _ = admin_stopped.await;
            })))
        }
        _ => None,
    };
    tracing::info!(
        data_dir = %config.data_dir.display(),
        crypto_provider = %config.crypto.provider,
        worker_threads = config.worker_threads,
        startup_ms = started.elapsed().as_millis() as u64,
        "keywarden serving"
    );
    // The drain starts (not ready, gRPC health NOT_SERVING) at the signal,
    // before serve stops the listeners and waits for calls in flight.
    let shutdown = async move {
        shutdown_signal().await;
        readiness.drain().await;
    };
    serve(routes, listeners, tls, &config.server, shutdown).await?;
    let _ = admin_stop.send(());
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    drop(reloader);
    if let Err(e) = counts.flush(&audit).await {
        tracing::error!(error = %e, "the audit log could not record the last data-plane counts");
    }
    Ok(())
}

/// Resolves on SIGTERM or ctrl-c (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
