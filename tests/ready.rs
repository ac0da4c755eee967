//! Readiness tells the truth: the PostgreSQL keystore stopped and started
//! again, the KMS cut off by the fault proxy (with no grace and with one), and
//! a drain. Each asserts the report (what `/ready` answers) and gRPC health
//! through a real tonic health client, against a sidecar wired as `keywarden
//! serve` wires it (`server::routes_following`, the drain at the signal), with
//! short check intervals so that each test runs in seconds.

mod common;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use common::{Kms, faults::Hooked, moto, postgres, proxy::Proxy};
use keywarden::{
    api::pb,
    audit::AuditLog,
    client::{self, Bearer},
    config::{CacheConfig, Config},
    keys::{KeyManager, KeySettings},
    kms::{RootKeyProvider, metered::Metered},
    server::ready::{Readiness, ReadyParts, ReadySettings},
    server::{self, Listener},
    store::{
        Keystore,
        postgres::{PostgresKeystore, PostgresOptions},
        sqlite::{KEYSTORE_FILE, SqliteKeystore},
    },
};
use secrecy::SecretString;
use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const CRYPTO: &str = "keywarden.v1.Crypto";
const ADMIN: &str = "keywarden.v1.Admin";

#[test]
fn readiness_names_the_services_as_the_wire_does() {
    use keywarden::server::ready::{ADMIN_SERVICE, CRYPTO_SERVICE};
    assert_eq!(CRYPTO_SERVICE, pb::crypto_server::SERVICE_NAME);
    assert_eq!(ADMIN_SERVICE, pb::admin_server::SERVICE_NAME);
    assert_eq!((CRYPTO, ADMIN), (CRYPTO_SERVICE, ADMIN_SERVICE));
}

/// Intervals short enough for a test; the bounds below follow from them.
fn settings(stale_if_error: Duration) -> ReadySettings {
    ReadySettings {
        keystore_interval: Duration::from_millis(200),
        keystore_timeout: Duration::from_secs(1),
        root_key_interval: Duration::from_millis(300),
        root_key_timeout: Duration::from_secs(1),
        stale_if_error,
    }
}

/// The README's bound on how long a check takes to turn: its interval plus
/// its timeout (one more interval of slack for a loaded machine).
fn bound(interval: Duration, timeout: Duration) -> Duration {
    interval * 2 + timeout + Duration::from_secs(1)
}

/// A sidecar serving on 127.0.0.1 with readiness, as `server::run` wires it.
struct Sidecar {
    addr: String,
    readiness: Arc<Readiness>,
    root: Arc<Metered>,
    admin_token: SecretString,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: Arc<TempDir>,
}

impl Sidecar {
    async fn start(
        dir: Arc<TempDir>,
        store: Arc<dyn Keystore>,
        provider: Arc<dyn RootKeyProvider>,
        cache: CacheConfig,
        settings: ReadySettings,
    ) -> Self {
        let audit = Arc::new(AuditLog::open(dir.path()).unwrap());
        Self::start_with_audit(dir, store, provider, cache, settings, audit).await
    }

    async fn start_with_audit(
        dir: Arc<TempDir>,
        store: Arc<dyn Keystore>,
        provider: Arc<dyn RootKeyProvider>,
        cache: CacheConfig,
        settings: ReadySettings,
        audit: Arc<AuditLog>,
    ) -> Self {
        let root = Arc::new(Metered::new(provider));
        let keys = Arc::new(KeyManager::new(
            root.clone(),
            store.clone(),
            cache.limits(),
            KeySettings {
                key_deletion_waiting_days: 7,
                provider: Default::default(),
            },
        ));
        let readiness = Readiness::start(
            ReadyParts {
                store,
                root: root.clone(),
                audit: audit.clone(),
            },
            settings,
        );
        let config = Config {
            data_dir: dir.path().to_owned(),
            cache,
            ..Config::default()
        };
        let shared = server::shared(&config, keys, audit).unwrap();
        let admin_token = SecretString::from(
            std::fs::read_to_string(dir.path().join("admin.token"))
                .unwrap()
                .trim()
                .to_owned(),
        );
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr();
        let routes = server::routes_following(shared, &readiness).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let draining = readiness.clone();
        let server_config = config.server.clone();
        let task = tokio::spawn(async move {
            server::serve(routes, vec![listener], None, &server_config, async move {
                let _ = stopped.await;
                draining.drain().await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            readiness,
            root,
            admin_token,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    async fn channel(&self) -> Channel {
        client::connect(&self.addr, None).await.unwrap()
    }

    fn bearer(&self) -> Bearer {
        Bearer::new(Some(&self.admin_token)).unwrap()
    }

    async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// Each service's gRPC health: overall, Crypto, Admin.
    async fn statuses(&self) -> [ServingStatus; 3] {
        let mut health = self.health().await;
        let mut out = [ServingStatus::Unknown; 3];
        for (slot, service) in out.iter_mut().zip(["", CRYPTO, ADMIN]) {
            *slot = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status();
        }
        out
    }

    fn body(&self) -> serde_json::Value {
        serde_json::from_str(&self.readiness.report().body).unwrap()
    }

    async fn create_tenant(&self, id: &str) {
        client::admin(self.channel().await, self.bearer())
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    async fn stop(mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the server drains")
                .unwrap();
        }
    }
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after
/// `within`. Answers how long it took.
async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SERVING: [ServingStatus; 3] = [ServingStatus::Serving; 3];

async fn sqlite(dir: &TempDir) -> Arc<dyn Keystore> {
    Arc::new(
        SqliteKeystore::open(&dir.path().join(KEYSTORE_FILE))
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keystore_stopped_makes_the_sidecar_not_ready_and_started_ready_again() {
    let pg = Arc::new(
        tokio::task::spawn_blocking(postgres::dedicated)
            .await
            .unwrap(),
    );
    let url = pg.fresh_database().await;
    let options = PostgresOptions {
        acquire_timeout: Duration::from_millis(500),
        ..PostgresOptions::default()
    };
    let store = Arc::new(PostgresKeystore::connect(&url, options).await.unwrap());
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let provider = common::provider(Kms::Local, dir.path(), None).await;
    let s = settings(Duration::ZERO);
    let sidecar = Sidecar::start(dir, store, provider, CacheConfig::default(), s).await;
    eventually(Duration::from_secs(5), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;
    assert_eq!(sidecar.statuses().await, SERVING);
    assert_eq!(
        sidecar.readiness.report().body,
        r#"{"ready":true,"checks":{"keystore":"ok","root_key":"ok","audit":"ok","draining":false},"notes":{}}"#
    );

    let stopping = pg.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap();
    let within = bound(s.keystore_interval, s.keystore_timeout);
    eventually(within, "not ready after the keystore stopped", || async {
        !sidecar.readiness.report().ready
    })
    .await;
    let body = sidecar.body();
    assert_eq!(body["ready"], false);
    let keystore = body["checks"]["keystore"].as_str().unwrap();
    assert!(
        ["failing: unavailable", "failing: timeout"].contains(&keystore),
        "{keystore}"
    );
    assert_eq!(body["checks"]["root_key"], "ok");
    // gRPC health follows (the follower runs at each check): every service.
    eventually(
        Duration::from_secs(2),
        "gRPC health NOT_SERVING",
        || async { sidecar.statuses().await == [ServingStatus::NotServing; 3] },
    )
    .await;

    let starting = pg.clone();
    tokio::task::spawn_blocking(move || starting.start())
        .await
        .unwrap();
    eventually(within, "ready after the keystore started", || async {
        sidecar.readiness.report().ready
    })
    .await;
    eventually(Duration::from_secs(2), "gRPC health SERVING", || async {
        sidecar.statuses().await == SERVING
    })
    .await;
    sidecar.stop().await;
}

/// moto's address, for a proxy in front of it.
fn moto_addr() -> SocketAddr {
    moto::moto()
        .endpoint
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .unwrap()
}

/// A sidecar (SQLite keystore) whose AWS KMS calls go through `proxy`.
async fn through(proxy: &Proxy, stale_if_error: Duration) -> Sidecar {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let provider = common::provider(Kms::Aws, dir.path(), Some(&proxy.endpoint())).await;
    let store = sqlite(&dir).await;
    let cache = CacheConfig {
        stale_if_error_seconds: stale_if_error.as_secs(),
        ..CacheConfig::default()
    };
    Sidecar::start(dir, store, provider, cache, settings(stale_if_error)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kms_cut_off_without_grace_makes_crypto_not_ready_and_admin_stays_serving() {
    let proxy = Proxy::start(moto_addr()).await;
    let sidecar = through(&proxy, Duration::ZERO).await;
    eventually(Duration::from_secs(10), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;
    assert_eq!(sidecar.statuses().await, SERVING);

    proxy.set_down(true);
    let s = settings(Duration::ZERO);
    eventually(
        bound(s.root_key_interval, s.root_key_timeout),
        "not ready after the KMS went away",
        || async { !sidecar.readiness.report().ready },
    )
    .await;
    let body = sidecar.body();
    let root_key = body["checks"]["root_key"].as_str().unwrap();
    assert!(
        ["failing: unavailable", "failing: timeout"].contains(&root_key),
        "{root_key}"
    );
    assert_eq!(body["checks"]["keystore"], "ok");
    // Crypto and the overall service follow; Admin needs no KMS for most calls.
    eventually(Duration::from_secs(2), "Crypto NOT_SERVING", || async {
        sidecar.statuses().await
            == [
                ServingStatus::NotServing,
                ServingStatus::NotServing,
                ServingStatus::Serving,
            ]
    })
    .await;

    proxy.set_down(false);
    eventually(
        bound(s.root_key_interval, s.root_key_timeout),
        "ready after the KMS came back",
        || async { sidecar.readiness.report().ready },
    )
    .await;
    eventually(Duration::from_secs(2), "gRPC health SERVING", || async {
        sidecar.statuses().await == SERVING
    })
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kms_cut_off_within_the_cache_grace_stays_ready_until_the_grace_ends() {
    let grace = Duration::from_secs(3);
    let proxy = Proxy::start(moto_addr()).await;
    let sidecar = through(&proxy, grace).await;
    eventually(Duration::from_secs(10), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;

    proxy.set_down(true);
    // The check fails, and the body says it is within the grace: still ready.
    let s = settings(grace);
    eventually(
        bound(s.root_key_interval, s.root_key_timeout),
        "the root key check failing within its grace",
        || async {
            sidecar.body()["checks"]["root_key"]
                .as_str()
                .unwrap()
                .starts_with("stale: ")
        },
    )
    .await;
    let last_success = sidecar.root.last_success().expect("a call succeeded");
    let report = sidecar.readiness.report();
    assert!(
        Instant::now() >= last_success + grace || report.ready,
        "{}",
        report.body
    );
    assert_eq!(sidecar.statuses().await, SERVING);

    // Not ready once the grace has passed since the last success, not before.
    eventually(
        grace + Duration::from_secs(2),
        "not ready after the grace",
        || async { !sidecar.readiness.report().ready },
    )
    .await;
    assert!(Instant::now() >= last_success + grace);
    assert!(
        sidecar.body()["checks"]["root_key"]
            .as_str()
            .unwrap()
            .starts_with("failing: ")
    );
    eventually(
        s.keystore_interval * 2 + Duration::from_secs(1),
        "Crypto NOT_SERVING after the grace",
        || async { sidecar.statuses().await[1] == ServingStatus::NotServing },
    )
    .await;

    proxy.set_down(false);
    eventually(
        bound(s.root_key_interval, s.root_key_timeout),
        "ready after the KMS came back",
        || async { sidecar.readiness.report().ready },
    )
    .await;
    sidecar.stop().await;
}

/// The gate every Decrypt waits at.
struct Gate {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_turns_health_not_serving_before_the_call_in_flight_finishes() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let s = settings(Duration::ZERO);
    // A tenant, made by a first sidecar; the second starts with a cold cache.
    let first = Sidecar::start(
        dir.clone(),
        sqlite(&dir).await,
        common::provider(Kms::Local, dir.path(), None).await,
        CacheConfig::default(),
        s,
    )
    .await;
    first.create_tenant("acme").await;
    first.stop().await;

    let gated = Arc::new(Gate {
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let gate = gated.clone();
    let hooked = Arc::new(Hooked {
        inner: common::provider(Kms::Local, dir.path(), None).await,
        before_decrypt: Box::new(move |_| {
            let gate = gate.clone();
            Box::pin(async move {
                gate.entered.notify_one();
                gate.release.notified().await;
                Ok(())
            })
        }),
    });
    let mut sidecar = Sidecar::start(
        dir.clone(),
        sqlite(&dir).await,
        hooked,
        CacheConfig::default(),
        s,
    )
    .await;
    eventually(Duration::from_secs(5), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;
    // Watch streams opened before the drain: what a client sees during it.
    let mut health = sidecar.health().await;
    let mut watches = Vec::new();
    for service in ["", CRYPTO, ADMIN] {
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service}");
        watches.push(watch);
    }

    let mut crypto = client::crypto(sidecar.channel().await, sidecar.bearer());
    let call = tokio::spawn(async move {
        crypto
            .encrypt(pb::EncryptRequest {
                tenant_id: "acme".into(),
                plaintext: b"in flight".to_vec(),
                ..Default::default()
            })
            .await
    });
    gated.entered.notified().await;

    sidecar.signal_stop();
    for watch in &mut watches {
        let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("a health update at the drain")
            .unwrap()
            .unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing);
    }
    assert!(!call.is_finished(), "the call in flight was held");
    let report = sidecar.readiness.report();
    assert!(!report.ready);
    assert_eq!(
        report.body,
        r#"{"ready":false,"checks":{"keystore":"ok","root_key":"ok","audit":"ok","draining":true},"notes":{}}"#
    );

    drop(watches);
    gated.release.notify_one();
    let answer = call.await.unwrap().expect("the call in flight succeeds");
    assert_eq!(answer.into_inner().key_version, 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn notes_appear_in_the_body_and_do_not_change_readiness() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let sidecar = Sidecar::start(
        dir.clone(),
        sqlite(&dir).await,
        common::provider(Kms::Local, dir.path(), None).await,
        CacheConfig::default(),
        settings(Duration::ZERO),
    )
    .await;
    eventually(Duration::from_secs(5), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;
    sidecar
        .readiness
        .set_note("tls", Some("reload failed: the key does not match".into()));
    let report = sidecar.readiness.report();
    assert!(report.ready);
    assert_eq!(
        report.body,
        r#"{"ready":true,"checks":{"keystore":"ok","root_key":"ok","audit":"ok","draining":false},"notes":{"tls":"reload failed: the key does not match"}}"#
    );
    sidecar.readiness.set_note("tls", None);
    assert!(sidecar.readiness.report().body.ends_with(r#""notes":{}}"#));
    sidecar.stop().await;
}

#[tokio::test]
async fn a_failed_audit_write_makes_the_sidecar_not_ready() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // Every write to /dev/full fails (ENOSPC), as on a full disk.
    let full = std::fs::OpenOptions::new()
        .append(true)
        .open("/dev/full")
        .unwrap();
    let audit = Arc::new(AuditLog::with_file(dir.path(), full).unwrap());
    let sidecar = Sidecar::start_with_audit(
        dir.clone(),
        sqlite(&dir).await,
        common::provider(Kms::Local, dir.path(), None).await,
        CacheConfig::default(),
        settings(Duration::ZERO),
        audit,
    )
    .await;
    // Nothing written yet: ready.
    eventually(Duration::from_secs(5), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;
    // An admin call's first record fails: the call is refused (fail closed),
    // and from then on the sidecar is not ready, at once.
    let refused = client::admin(sidecar.channel().await, sidecar.bearer())
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let report = sidecar.readiness.report();
    assert!(!report.ready);
    assert_eq!(
        report.body,
        r#"{"ready":false,"checks":{"keystore":"ok","root_key":"ok","audit":"failing: write","draining":false},"notes":{}}"#
    );
    // gRPC health follows within a keystore interval: every service.
    eventually(
        Duration::from_secs(2),
        "gRPC health NOT_SERVING",
        || async { sidecar.statuses().await == [ServingStatus::NotServing; 3] },
    )
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_sidecar_makes_no_kms_call_of_its_own_for_readiness() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let s = settings(Duration::ZERO);
    let sidecar = Sidecar::start(
        dir.clone(),
        sqlite(&dir).await,
        common::provider(Kms::Local, dir.path(), None).await,
        CacheConfig::default(),
        s,
    )
    .await;
    eventually(Duration::from_secs(5), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;
    // Calls succeed more often than the root key is checked (every 300 ms):
    // the checks count them and call DescribeKey (Health) no more.
    sidecar.create_tenant("t0").await;
    let describes = sidecar.root.counts().describe;
    for i in 1..15 {
        sidecar.create_tenant(&format!("t{i}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sidecar.root.counts().describe, describes);
    assert!(sidecar.readiness.report().ready);
    // Idle: the check calls Health again within an interval or two.
    eventually(
        bound(s.root_key_interval, s.root_key_timeout),
        "a health call when idle",
        || async { sidecar.root.counts().describe > describes },
    )
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_kms_call_has_the_root_key_checked_at_once_not_at_the_next_interval() {
    let proxy = Proxy::start(moto_addr()).await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let provider = common::provider(Kms::Aws, dir.path(), Some(&proxy.endpoint())).await;
    let store = sqlite(&dir).await;
    let s = ReadySettings {
        root_key_interval: Duration::from_secs(600),
        ..settings(Duration::ZERO)
    };
    let sidecar = Sidecar::start(dir, store, provider, CacheConfig::default(), s).await;
    eventually(Duration::from_secs(10), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;
    // Let the start's check run its course, so that the next is the
    // triggered one.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    proxy.set_down(true);
    let refused = client::admin(sidecar.channel().await, sidecar.bearer())
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Within the poll (1 s) and the check's timeout: far before 600 s.
    eventually(
        Duration::from_secs(1) + s.root_key_timeout + Duration::from_secs(1),
        "not ready soon after a KMS call failed",
        || async { !sidecar.readiness.report().ready },
    )
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_in_postgresql_is_tried_again_and_ready_when_it_takes_a_record() {
    let pg = Arc::new(
        tokio::task::spawn_blocking(postgres::dedicated)
            .await
            .unwrap(),
    );
    let url = pg.fresh_database().await;
    let options = PostgresOptions {
        acquire_timeout: Duration::from_millis(500),
        ..PostgresOptions::default()
    };
    let store = PostgresKeystore::connect(&url, options).await.unwrap();
    let pool = store.pool();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let audit = Arc::new(AuditLog::postgres(dir.path(), pool.clone()).unwrap());
    let provider = common::provider(Kms::Local, dir.path(), None).await;
    let s = settings(Duration::ZERO);
    let sidecar = Sidecar::start_with_audit(
        dir.clone(),
        Arc::new(store),
        provider,
        CacheConfig::default(),
        s,
        audit.clone(),
    )
    .await;
    eventually(Duration::from_secs(5), "ready at start", || async {
        sidecar.readiness.report().ready
    })
    .await;

    let stopping = pg.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap();
    // A write while the database is away fails: not ready, whatever else.
    audit
        .record(keywarden::audit::Entry {
            action: "Test",
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        sidecar.body()["checks"]["audit"],
        "failing: write",
        "{}",
        sidecar.readiness.report().body
    );

    let starting = pg.clone();
    tokio::task::spawn_blocking(move || starting.start())
        .await
        .unwrap();
    // No call writes meanwhile: readiness tries a record of its own.
    eventually(
        bound(s.keystore_interval, s.keystore_timeout),
        "ready after the database came back",
        || async { sidecar.readiness.report().ready },
    )
    .await;
    let records: Vec<(String,)> = sqlx::query_as("SELECT record FROM audit_log ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0].0.contains(r#""action":"AuditWritable""#),
        "{}",
        records[0].0
    );
    assert!(records[0].0.contains(r#""caller":"readiness""#));
    sidecar.stop().await;
}

/// `keywarden serve` itself: health follows readiness from the start, and a
/// Watch open at SIGTERM sees every service turn NOT_SERVING before the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywarden_serve_turns_health_not_serving_at_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, socket) = (tmp.path().join("data"), tmp.path().join("kw.sock"));
    let sidecar =
        tokio::task::spawn_blocking(move || common::process::Sidecar::start(&data, &socket))
            .await
            .unwrap();
    let channel = client::connect(&sidecar.addr(), None).await.unwrap();
    let mut health = HealthClient::new(channel);
    let mut watches = Vec::new();
    for service in ["", CRYPTO, ADMIN] {
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        // SERVING once the first checks passed (NOT_SERVING before).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = tokio::time::timeout_at(deadline, watch.message())
                .await
                .expect("SERVING within 5 s of the start")
                .unwrap()
                .unwrap()
                .status();
            if status == ServingStatus::Serving {
                break;
            }
        }
        watches.push(watch);
    }

    common::process::sigterm(sidecar.pid());
    for watch in &mut watches {
        let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("a health update at SIGTERM")
            .unwrap()
            .unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing);
    }
    drop(watches);
    drop(health);
    let mut sidecar = sidecar;
    eventually(Duration::from_secs(10), "the sidecar exits", || {
        let running = sidecar.is_running();
        async move { !running }
    })
    .await;
    let log = sidecar.log();
    assert!(log.contains("draining: not ready from now on"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

/// `/ready` over HTTP from the real binary, as a kubelet probes it: 200 with
/// the PostgreSQL keystore up, 503 naming the keystore within the stated
/// bound once the server stops (README: 5 s interval + 2 s timeout), 200
/// again within one interval of its return, and 503 naming the drain from
/// SIGTERM on, while a call still holds the drain open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywarden_serve_answers_ready_over_http_as_the_keystore_and_the_drain_go() {
    use common::process::http;

    let pg = postgres::dedicated();
    let url = pg.fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (data, socket) = (tmp.path().join("data"), tmp.path().join("kw.sock"));
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let env_admin = admin.clone();
    let sidecar = tokio::task::spawn_blocking(move || {
        common::process::Sidecar::start_with_env(
            &data,
            &socket,
            &[
                ("KEYWARDEN_STORE_BACKEND", "postgres"),
                ("KEYWARDEN_DATABASE_URL", &url),
                ("KEYWARDEN_ADMIN_LISTEN", &env_admin),
            ],
        )
    })
    .await
    .unwrap();
    let ready = |admin: String| async move {
        tokio::task::spawn_blocking(move || http(&admin, "GET", "/ready"))
            .await
            .unwrap()
    };
    let body = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();

    eventually(Duration::from_secs(10), "ready at start", || {
        let (admin, ready) = (admin.clone(), ready);
        async move { ready(admin).await.0 == 200 }
    })
    .await;

    pg.stop();
    let took = eventually(
        Duration::from_secs(7 + 3),
        "503 with the keystore down",
        || {
            let (admin, ready) = (admin.clone(), ready);
            async move { ready(admin).await.0 == 503 }
        },
    )
    .await;
    let (status, text) = ready(admin.clone()).await;
    assert_eq!(status, 503, "{text}");
    let report = body(&text);
    assert_eq!(report["ready"], false);
    assert_ne!(report["checks"]["keystore"], "ok", "{text}");
    assert!(!text.contains("postgres://"), "{text}");
    eprintln!("not ready {took:?} after the keystore stopped");

    pg.start();
    eventually(
        Duration::from_secs(5 + 5),
        "200 with the keystore back",
        || {
            let (admin, ready) = (admin.clone(), ready);
            async move { ready(admin).await.0 == 200 }
        },
    )
    .await;

    // A Watch holds the drain open: /ready must say 503 "draining" at once.
    let channel = client::connect(&sidecar.addr(), None).await.unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    common::process::sigterm(sidecar.pid());
    eventually(Duration::from_secs(2), "503 draining at SIGTERM", || {
        let (admin, ready) = (admin.clone(), ready);
        async move {
            let (status, text) = ready(admin).await;
            status == 503 && body(&text)["checks"]["draining"] == true
        }
    })
    .await;
    drop(watch);
    let mut sidecar = sidecar;
    eventually(Duration::from_secs(10), "the sidecar exits", || {
        let running = sidecar.is_running();
        async move { !running }
    })
    .await;
}
