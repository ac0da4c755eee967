//! The test harness: a real sidecar (real gRPC on loopback, the local root key
//! and the SQLite keystore in a temporary directory), served in-process so a
//! test can count the calls that reach the root-key provider.
#![allow(dead_code)]

pub mod faults;
pub mod moto;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod proxy;

use std::{path::Path, sync::Arc, time::Duration};

use keywarden::{
    api::pb::{admin_client::AdminClient, crypto_client::CryptoClient},
    audit::AuditLog,
    client::{self, Authed, Bearer},
    config::{
        AuditConfig, AuthConfig, CacheConfig, Config, RequestLimits, ServerConfig, TlsConfig,
    },
    envelope::Provider,
    keys::{KeyManager, KeySettings},
    kms::{
        RootKeyProvider,
        aws::{AwsKms, AwsSettings},
        local::{LocalRootKey, ROOT_KEY_FILE},
        metered::Metered,
    },
    server::{self, Listener},
    store::{
        UnixMillis,
        sqlite::{KEYSTORE_FILE, SqliteKeystore},
    },
};
use secrecy::SecretString;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// Which root-key provider a test sidecar uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kms {
    /// The local root key file in the data directory.
    #[default]
    Local,
    /// AWS KMS through aws-sdk-kms, against moto's KMS API server. The
    /// shared root key is made on first start in a data directory and
    /// recorded there, so restarts find it again.
    Aws,
}

/// File in a test data directory naming its moto root key.
const MOTO_KEY_FILE: &str = "moto-root-key";

/// The provider `kms` names for the data directory `dir`, talking to KMS
/// through `endpoint` (moto's, or a proxy's in front of it).
pub async fn provider(kms: Kms, dir: &Path, endpoint: Option<&str>) -> Arc<dyn RootKeyProvider> {
    match kms {
        Kms::Local => Arc::new(
            LocalRootKey::load_or_create(&dir.join(ROOT_KEY_FILE))
                .unwrap()
                .0,
        ),
        Kms::Aws => {
            let endpoint = endpoint.map_or_else(|| moto::moto().endpoint.clone(), str::to_owned);
            let key_file = dir.join(MOTO_KEY_FILE);
            let key = match std::fs::read_to_string(&key_file) {
                Ok(key) => key,
                Err(_) => {
                    let key = moto::create_key("keywarden test root key").await;
                    std::fs::write(&key_file, &key).unwrap();
                    key
                }
            };
            let settings = AwsSettings {
                default_region: moto::REGION.into(),
                shared_keys: vec![(moto::REGION.into(), key)],
                endpoint_url: Some(endpoint),
                attempt_timeout: Duration::from_secs(2),
                max_attempts: 2,
            };
            Arc::new(
                AwsKms::connect(&settings, Some(moto::credentials()))
                    .await
                    .unwrap(),
            )
        }
    }
}

#[derive(Default)]
pub struct Options {
    pub limits: RequestLimits,
    /// Connections and calls: bounds and timeouts.
    pub server: ServerConfig,
    pub cache: CacheConfig,
    pub kms: Kms,
    /// The audit log; default: `audit.log` in the data directory.
    pub audit: Option<Arc<AuditLog>>,
    pub auth: AuthConfig,
    pub tls: Option<TlsConfig>,
    pub audit_config: AuditConfig,
    /// The key manager's clock; default: the system's.
    pub clock: Option<Arc<dyn Fn() -> UnixMillis + Send + Sync>>,
    /// Run the tenant-policy scheduler this often.
    pub policy_interval: Option<Duration>,
    /// The AES-256-GCM implementation.
    pub crypto: Provider,
}

/// A clock that starts at the system's time and then follows tokio's, so
/// paused time moves it.
pub fn tokio_clock() -> Arc<dyn Fn() -> UnixMillis + Send + Sync> {
    let wall = UnixMillis::now();
    let start = tokio::time::Instant::now();
    Arc::new(move || UnixMillis(wall.0 + i64::try_from(start.elapsed().as_millis()).unwrap()))
}

/// A sidecar serving on 127.0.0.1 with a free port.
pub struct TestSidecar {
    pub addr: String,
    /// The embedded admin token (`token:admin`: admin and data plane).
    pub admin_token: Option<SecretString>,
    /// Counts every call that reaches the root-key provider.
    pub root: Arc<Metered>,
    pub dir: Arc<tempfile::TempDir>,
    /// The audit log and its counts, to flush them when a test needs them
    /// (the server flushes them every `audit.count_interval_seconds`).
    audit: (Arc<AuditLog>, Arc<keywarden::audit::counts::Counts>),
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestSidecar {
    pub async fn start() -> Self {
        Self::start_in(Arc::new(tempfile::tempdir().unwrap()), Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        Self::start_in(Arc::new(tempfile::tempdir().unwrap()), options).await
    }

    /// A sidecar on an existing data directory (e.g. after another stopped).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, options: Options) -> Self {
        let provider = provider(options.kms, dir.path(), None).await;
        Self::start_with_root(dir, options, provider).await
    }

    /// A sidecar whose root-key calls go through `provider` (the real one, or
    /// a fault injector wrapping it).
    pub async fn start_with_root(
        dir: Arc<tempfile::TempDir>,
        options: Options,
        provider: Arc<dyn RootKeyProvider>,
    ) -> Self {
        let root = Arc::new(Metered::new(provider));
        let store = SqliteKeystore::open(&dir.path().join(KEYSTORE_FILE))
            .await
            .unwrap();
        let keys = KeyManager::new(
            root.clone(),
            Arc::new(store),
            options.cache.limits(),
            KeySettings {
                key_deletion_waiting_days: 7,
                provider: options.crypto,
            },
        );
        let mut keys = keys;
        if let Some(clock) = options.clock {
            keys = keys.with_clock(clock);
        }
        let keys = Arc::new(keys);
        keys.spawn_cache_sweeper(options.cache.limits().sweep_interval());
        let audit = options
            .audit
            .unwrap_or_else(|| Arc::new(AuditLog::open(dir.path()).unwrap()));
        if let Some(every) = options.policy_interval {
            server::spawn_policy_scheduler(&keys, every, Arc::downgrade(&audit));
        }
        let config = Config {
            data_dir: dir.path().to_owned(),
            limits: options.limits,
            server: options.server,
            cache: options.cache,
            auth: options.auth,
            tls: options.tls,
            audit: options.audit_config,
            ..Config::default()
        };
        let shared = server::shared(&config, keys, audit.clone()).unwrap();
        // The counts are flushed when the server stops, as `keywarden serve`
        // does, and when a test asks (`flush_audit_counts`).
        let audit = (audit, shared.counts.clone());
        let flushed_at_stop = audit.clone();
        let admin_token = std::fs::read_to_string(dir.path().join("admin.token"))
            .ok()
            .map(|t| SecretString::from(t.trim().to_owned()));
        let tls = config.tls.as_ref().map(|t| server::tls_config(t).unwrap());
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr();
        let routes = server::routes(shared).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let server_config = config.server.clone();
        let task = tokio::spawn(async move {
            server::serve(routes, vec![listener], tls, &server_config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
            let (log, counts) = flushed_at_stop;
            counts.flush(&log).await.unwrap();
        });
        Self {
            addr,
            admin_token,
            root,
            dir,
            audit,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        client::connect(&self.addr, None).await.unwrap()
    }

    /// The admin token as a client sends it.
    pub fn admin_bearer(&self) -> Bearer {
        Bearer::new(self.admin_token.as_ref()).unwrap()
    }

    /// A data-plane client holding the admin token.
    pub async fn crypto(&self) -> CryptoClient<Authed> {
        client::crypto(self.channel().await, self.admin_bearer())
    }

    pub async fn admin(&self) -> AdminClient<Authed> {
        client::admin(self.channel().await, self.admin_bearer())
    }

    /// Writes the counts of calls (data-plane calls, refusals) held since
    /// the last flush, as the server does every interval.
    pub async fn flush_audit_counts(&self) {
        self.audit.1.flush(&self.audit.0).await.unwrap();
    }

    /// Decrypt calls that reached the root-key provider so far.
    pub fn decrypts(&self) -> u64 {
        self.root.counts().decrypt
    }

    /// Tells the server to stop (as SIGTERM does) without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Whether the server has finished draining.
    pub fn stopped(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops serving and waits until the server has drained.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}
