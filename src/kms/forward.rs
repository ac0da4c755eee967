//! A provider in front of another: every call goes to the inner provider,
//! the asynchronous ones after a hook, and their outcome is shown to another.
//! [`super::metered::Metered`] counts calls and notes the last success this
//! way; tests hold or fail them.

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

    /// Runs when the inner provider answered `call` (not when `before`
    /// refused it), with its outcome. Nothing by default.
    fn after(&self, _call: Call<'_>, _outcome: Result<(), &KmsError>) {}
}

/// Shows `result` to [`Forward::after`] and hands it back.
fn seen<F: Forward, T>(f: &F, call: Call<'_>, result: Result<T, KmsError>) -> Result<T, KmsError> {
    f.after(call, result.as_ref().map(|_| ()));
    result
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
        let call = Call::ResolveKey;
        self.before(call).await?;
        seen(self, call, self.inner().resolve_key(key, region).await)
    }

    async fn create_dedicated_key(
        &self,
        tenant: &TenantId,
        region: Option<&str>,
    ) -> Result<String, KmsError> {
        let call = Call::CreateDedicatedKey(tenant);
        self.before(call).await?;
        seen(
            self,
            call,
            self.inner().create_dedicated_key(tenant, region).await,
        )
    }

    async fn generate_data_key(
        &self,
        root_key_id: &str,
        ctx: WrapContext<'_>,
    ) -> Result<GeneratedKey, KmsError> {
        let call = Call::GenerateDataKey(ctx);
        self.before(call).await?;
        seen(
            self,
            call,
            self.inner().generate_data_key(root_key_id, ctx).await,
        )
    }

    async fn decrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Key256, KmsError> {
        let call = Call::Decrypt(ctx);
        self.before(call).await?;
        seen(self, call, self.inner().decrypt(ctx, wrapped).await)
    }

    async fn re_encrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
        to_root_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        let call = Call::ReEncrypt(ctx);
        self.before(call).await?;
        seen(
            self,
            call,
            self.inner().re_encrypt(ctx, wrapped, to_root_key_id).await,
        )
    }

    async fn schedule_key_deletion(
        &self,
        root_key_id: &str,
        waiting_days: u32,
    ) -> Result<UnixMillis, KmsError> {
        let call = Call::ScheduleKeyDeletion;
        self.before(call).await?;
        let result = self
            .inner()
            .schedule_key_deletion(root_key_id, waiting_days)
            .await;
        seen(self, call, result)
    }

    async fn health(&self) -> Result<(), KmsError> {
        let call = Call::Health;
        self.before(call).await?;
        seen(self, call, self.inner().health().await)
    }
}
