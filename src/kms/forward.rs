//! A provider in front of another: every call goes to the inner provider,
//! the asynchronous ones after a hook. [`super::metered::Metered`] counts
//! calls this way; tests hold or fail them.

use async_trait::async_trait;

use super::{GeneratedKey, KmsError, RootKeyProvider, WrapContext, WrappedKey};
use crate::{ids::TenantId, secret::Key256, time::UnixMillis};

/// An asynchronous call on its way to the inner provider, with the binding
/// it is for.
#[derive(Clone, Copy, Debug)]
pub enum Call<'a> {
    ResolveKey,
    CreateDedicatedKey(&'a TenantId),
    GenerateDataKey(WrapContext<'a>),
    Decrypt(WrapContext<'a>),
    ReEncrypt(WrapContext<'a>),
    ScheduleKeyDeletion,
    Health,
}

/// A provider that forwards every call to [`Forward::inner`], each
/// asynchronous one after [`Forward::before`]. Every `Forward` is a
/// [`RootKeyProvider`].
pub trait Forward: Send + Sync + 'static {
    fn inner(&self) -> &dyn RootKeyProvider;

    /// Runs before `call` is forwarded; an error is answered instead of the
    /// inner provider's.
    fn before(&self, call: Call<'_>) -> impl Future<Output = Result<(), KmsError>> + Send;
}

#[async_trait]
impl<F: Forward> RootKeyProvider for F {
    fn kind(&self) -> &'static str {
        self.inner().kind()
    }

    fn shared_key(&self, region: Option<&str>) -> Result<String, KmsError> {
        self.inner().shared_key(region)
    }

    async fn resolve_key(&self, key: &str, region: Option<&str>) -> Result<String, KmsError> {
        self.before(Call::ResolveKey).await?;
        self.inner().resolve_key(key, region).await
    }

    async fn create_dedicated_key(
        &self,
        tenant: &TenantId,
        region: Option<&str>,
    ) -> Result<String, KmsError> {
        self.before(Call::CreateDedicatedKey(tenant)).await?;
        self.inner().create_dedicated_key(tenant, region).await
    }

    async fn generate_data_key(
        &self,
        root_key_id: &str,
        ctx: WrapContext<'_>,
    ) -> Result<GeneratedKey, KmsError> {
        self.before(Call::GenerateDataKey(ctx)).await?;
        self.inner().generate_data_key(root_key_id, ctx).await
    }

    async fn decrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Key256, KmsError> {
        self.before(Call::Decrypt(ctx)).await?;
        self.inner().decrypt(ctx, wrapped).await
    }

    async fn re_encrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
        to_root_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        self.before(Call::ReEncrypt(ctx)).await?;
        self.inner().re_encrypt(ctx, wrapped, to_root_key_id).await
    }

    async fn schedule_key_deletion(
        &self,
        root_key_id: &str,
        waiting_days: u32,
    ) -> Result<UnixMillis, KmsError> {
        self.before(Call::ScheduleKeyDeletion).await?;
        self.inner()
            .schedule_key_deletion(root_key_id, waiting_days)
            .await
    }

    async fn health(&self) -> Result<(), KmsError> {
        self.before(Call::Health).await?;
        self.inner().health().await
    }
}
