//! A provider in front of another: every call goes to the inner provider,
//! the asynchronous ones after a hook, timed, and their outcome is shown to
//! another. [`super::metered::Metered`] counts and times calls and notes the
//! last success this way; tests hold or fail them.

use async_trait::async_trait;

use super::{GeneratedKey, KmsError, RootKeyProvider, WrapContext, WrappedKey};
use crate::{ids::TenantId, observe::metrics::Timer, secret::Key256, time::UnixMillis};

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

    /// Runs once `call` is let through, just before it is forwarded; the
    /// timer it answers (if any) records the inner call's outcome and
    /// duration.
    fn start(&self, _call: Call<'_>) -> Option<Timer> {
        None
    }

    /// Runs when the inner provider answered `call` (not when `before`
    /// refused it), with its outcome. Nothing by default.
    fn after(&self, _call: Call<'_>, _outcome: Result<(), &KmsError>) {}
}

/// Forwards one call: `before`, then `start`, then the inner call, timed,
/// then `after`.
async fn forward<F: Forward + ?Sized, T>(
    f: &F,
    call: Call<'_>,
    inner: impl Future<Output = Result<T, KmsError>>,
) -> Result<T, KmsError> {
    f.before(call).await?;
    let timer = f.start(call);
    let result = inner.await;
    if let Some(timer) = timer {
        timer.finish(&result);
    }
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
        forward(
            self,
            Call::ResolveKey,
            self.inner().resolve_key(key, region),
        )
        .await
    }

    async fn create_dedicated_key(
        &self,
        tenant: &TenantId,
        region: Option<&str>,
    ) -> Result<String, KmsError> {
        forward(
            self,
            Call::CreateDedicatedKey(tenant),
            self.inner().create_dedicated_key(tenant, region),
        )
        .await
    }

    async fn generate_data_key(
        &self,
        root_key_id: &str,
        ctx: WrapContext<'_>,
    ) -> Result<GeneratedKey, KmsError> {
        forward(
            self,
            Call::GenerateDataKey(ctx),
            self.inner().generate_data_key(root_key_id, ctx),
        )
        .await
    }

    async fn decrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Key256, KmsError> {
        forward(self, Call::Decrypt(ctx), self.inner().decrypt(ctx, wrapped)).await
    }

    async fn re_encrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
        to_root_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        forward(
            self,
            Call::ReEncrypt(ctx),
            self.inner().re_encrypt(ctx, wrapped, to_root_key_id),
        )
        .await
    }

    async fn schedule_key_deletion(
        &self,
        root_key_id: &str,
        waiting_days: u32,
    ) -> Result<UnixMillis, KmsError> {
        forward(
            self,
            Call::ScheduleKeyDeletion,
            self.inner()
                .schedule_key_deletion(root_key_id, waiting_days),
        )
        .await
    }

    async fn health(&self) -> Result<(), KmsError> {
        forward(self, Call::Health, self.inner().health()).await
    }
}
