//! The test harness: a real sidecar (real gRPC on loopback, the local root key
//! and the SQLite keystore in a temporary directory), served in-process so a
//! test can count the calls that reach the root-key provider.
#![allow(dead_code)]

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use keywarden::{
    api::{
        Shared,
        pb::{admin_client::AdminClient, crypto_client::CryptoClient},
    },
    client,
    config::{CacheConfig, Limits},
    keys::KeyManager,
    kms::{
        GeneratedKey, KmsError, RootKeyProvider, WrapContext, WrappedKey,
        local::{LocalRootKey, ROOT_KEY_FILE},
    },
    secret::Key256,
    server::{self, Listener},
    store::sqlite::{KEYSTORE_FILE, SqliteKeystore},
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// The real local root key, with a count of the calls that reach it.
pub struct CountingRoot {
    inner: LocalRootKey,
    pub decrypts: AtomicUsize,
    pub generates: AtomicUsize,
}

impl CountingRoot {
    pub fn open(dir: &Path) -> Self {
        let (inner, _) = LocalRootKey::load_or_create(&dir.join(ROOT_KEY_FILE)).unwrap();
        Self {
            inner,
            decrypts: AtomicUsize::new(0),
            generates: AtomicUsize::new(0),
        }
    }

    pub fn decrypts(&self) -> usize {
        self.decrypts.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl RootKeyProvider for CountingRoot {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn generate_data_key(&self, ctx: WrapContext<'_>) -> Result<GeneratedKey, KmsError> {
        self.generates.fetch_add(1, Ordering::SeqCst);
        self.inner.generate_data_key(ctx).await
    }

    async fn decrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Key256, KmsError> {
        self.decrypts.fetch_add(1, Ordering::SeqCst);
        // Yield so that concurrent requests really overlap with this unwrap.
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.inner.decrypt(ctx, wrapped).await
    }

    async fn health(&self) -> Result<(), KmsError> {
        self.inner.health().await
    }
}

#[derive(Default)]
pub struct Options {
    pub limits: Limits,
    pub cache: CacheConfig,
}

/// A sidecar serving on 127.0.0.1 with a free port.
pub struct TestSidecar {
    pub addr: String,
    pub root: Arc<CountingRoot>,
    pub dir: Arc<tempfile::TempDir>,
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
        let root = Arc::new(CountingRoot::open(dir.path()));
        Self::start_with_root(dir, options, root.clone(), root).await
    }

    /// A sidecar whose root-key calls go through `provider` (a fault
    /// injector wrapping the real local root key); `root` counts.
    pub async fn start_with_root(
        dir: Arc<tempfile::TempDir>,
        options: Options,
        root: Arc<CountingRoot>,
        provider: Arc<dyn RootKeyProvider>,
    ) -> Self {
        let store = SqliteKeystore::open(&dir.path().join(KEYSTORE_FILE))
            .await
            .unwrap();
        let keys = KeyManager::new(provider, Arc::new(store), options.cache.limits());
        let shared = Shared {
            keys: Arc::new(keys),
            limits: options.limits,
        };
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr();
        let routes = server::routes(shared).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::serve(routes, vec![listener], async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            root,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        client::connect(&self.addr).await.unwrap()
    }

    pub async fn crypto(&self) -> CryptoClient<Channel> {
        client::crypto(self.channel().await)
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        client::admin(self.channel().await)
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
