//! A fault injector around a real root-key provider: every call goes to the
//! real provider, each Decrypt after a hook that may hold it (a gate) or
//! fail it (an outage for one tenant).

use std::{future::Future, pin::Pin, sync::Arc};

use async_trait::async_trait;
use keywarden::{
    ids::TenantId,
    kms::{GeneratedKey, KmsError, RootKeyProvider, WrapContext, WrappedKey},
    secret::Key256,
    store::UnixMillis,
};

/// What runs before each Decrypt, given its tenant; an error is answered
/// instead of the real provider's.
pub type BeforeDecrypt = Box<
    dyn Fn(&TenantId) -> Pin<Box<dyn Future<Output = Result<(), KmsError>> + Send>> + Send + Sync,
>;

pub struct Hooked {
    pub inner: Arc<dyn RootKeyProvider>,
    pub before_decrypt: BeforeDecrypt,
}

#[async_trait]
impl RootKeyProvider for Hooked {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn shared_key(&self, region: Option<&str>) -> Result<String, KmsError> {
        self.inner.shared_key(region)
    }
    async fn resolve_key(&self, key: &str, region: Option<&str>) -> Result<String, KmsError> {
        self.inner.resolve_key(key, region).await
    }
    async fn create_dedicated_key(
        &self,
        tenant: &TenantId,
        region: Option<&str>,
    ) -> Result<String, KmsError> {
        self.inner.create_dedicated_key(tenant, region).await
    }
    async fn generate_data_key(
        &self,
        root_key_id: &str,
        ctx: WrapContext<'_>,
    ) -> Result<GeneratedKey, KmsError> {
        self.inner.generate_data_key(root_key_id, ctx).await
    }
    async fn decrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Key256, KmsError> {
        (self.before_decrypt)(ctx.tenant).await?;
        self.inner.decrypt(ctx, wrapped).await
    }
    async fn re_encrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
        to_root_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        self.inner.re_encrypt(ctx, wrapped, to_root_key_id).await
    }
    async fn schedule_key_deletion(
        &self,
        root_key_id: &str,
        waiting_days: u32,
    ) -> Result<UnixMillis, KmsError> {
        self.inner
            .schedule_key_deletion(root_key_id, waiting_days)
            .await
    }
    async fn health(&self) -> Result<(), KmsError> {
        self.inner.health().await
    }
}
