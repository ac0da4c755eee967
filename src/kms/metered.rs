//! Counts the calls that reach a root-key provider, per operation. KMS calls
//! cost money and are rate-limited per account and region, so these counts
//! are what capacity planning (docs/SCALING.md) and alerts are about; the
//! tests use them to prove that the cache absorbs requests.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use async_trait::async_trait;

use super::{GeneratedKey, KmsError, RootKeyProvider, WrapContext, WrappedKey};
use crate::{ids::TenantId, secret::Key256, time::UnixMillis};

/// Calls made so far, per operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KmsCallCounts {
    pub generate_data_key: u64,
    pub decrypt: u64,
    pub re_encrypt: u64,
    pub create_key: u64,
    pub schedule_key_deletion: u64,
    pub describe: u64,
}

#[derive(Default)]
struct Counters {
    generate_data_key: AtomicU64,
    decrypt: AtomicU64,
    re_encrypt: AtomicU64,
    create_key: AtomicU64,
    schedule_key_deletion: AtomicU64,
    describe: AtomicU64,
}

/// A provider that counts what passes through it to `inner`.
pub struct Metered {
    inner: Arc<dyn RootKeyProvider>,
    counters: Counters,
}

impl Metered {
    pub fn new(inner: Arc<dyn RootKeyProvider>) -> Self {
        Self {
            inner,
            counters: Counters::default(),
        }
    }

    pub fn counts(&self) -> KmsCallCounts {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KmsCallCounts {
            generate_data_key: get(&c.generate_data_key),
            decrypt: get(&c.decrypt),
            re_encrypt: get(&c.re_encrypt),
            create_key: get(&c.create_key),
            schedule_key_deletion: get(&c.schedule_key_deletion),
            describe: get(&c.describe),
        }
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[async_trait]
impl RootKeyProvider for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn shared_key(&self, region: Option<&str>) -> Result<String, KmsError> {
        self.inner.shared_key(region)
    }

    async fn resolve_key(&self, key: &str, region: Option<&str>) -> Result<String, KmsError> {
        count(&self.counters.describe);
        self.inner.resolve_key(key, region).await
    }

    async fn create_dedicated_key(
        &self,
        tenant: &TenantId,
        region: Option<&str>,
    ) -> Result<String, KmsError> {
        count(&self.counters.create_key);
        self.inner.create_dedicated_key(tenant, region).await
    }

    async fn generate_data_key(
        &self,
        root_key_id: &str,
        ctx: WrapContext<'_>,
    ) -> Result<GeneratedKey, KmsError> {
        count(&self.counters.generate_data_key);
        self.inner.generate_data_key(root_key_id, ctx).await
    }

    async fn decrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Key256, KmsError> {
        count(&self.counters.decrypt);
        self.inner.decrypt(ctx, wrapped).await
    }

    async fn re_encrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
        to_root_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        count(&self.counters.re_encrypt);
        self.inner.re_encrypt(ctx, wrapped, to_root_key_id).await
    }

    async fn schedule_key_deletion(
        &self,
        root_key_id: &str,
        waiting_days: u32,
    ) -> Result<UnixMillis, KmsError> {
        count(&self.counters.schedule_key_deletion);
        self.inner
            .schedule_key_deletion(root_key_id, waiting_days)
            .await
    }

    async fn health(&self) -> Result<(), KmsError> {
        count(&self.counters.describe);
        self.inner.health().await
    }
}
