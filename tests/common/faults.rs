//! A fault injector around a real root-key provider: every call goes to the
//! real provider, each Decrypt after a hook that may hold it (a gate) or
//! fail it (an outage for one tenant).

use std::{future::Future, pin::Pin, sync::Arc};

use keywarden::{
    ids::TenantId,
    kms::{
        KmsError, RootKeyProvider,
        forward::{Call, Forward},
    },
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

impl Forward for Hooked {
    fn inner(&self) -> &dyn RootKeyProvider {
        &*self.inner
    }

    async fn before(&self, call: Call<'_>) -> Result<(), KmsError> {
        match call {
            Call::Decrypt(ctx) => (self.before_decrypt)(ctx.tenant).await,
            _ => Ok(()),
        }
    }
}
