//! Graceful shutdown: a call in flight when the stop signal arrives finishes.
//! The root-key provider is held mid-call by a gate (a fault injector around
//! the real local root key), so the test does not depend on timing.

mod common;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use common::{Kms, Options, TestSidecar};
use keywarden::{
    api::pb,
    ids::TenantId,
    kms::{GeneratedKey, KmsError, RootKeyProvider, WrapContext, WrappedKey},
    secret::Key256,
    store::UnixMillis,
};
use tokio::sync::Notify;

/// Delegates to the real provider, but holds every Decrypt at a gate.
struct Gated {
    inner: Arc<dyn RootKeyProvider>,
    entered: Notify,
    release: Notify,
}

#[async_trait]
impl RootKeyProvider for Gated {
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
        self.entered.notify_one();
        self.release.notified().await;
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

#[tokio::test]
async fn a_call_in_flight_when_shutdown_begins_completes() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let first = TestSidecar::start_in(dir.clone(), Options::default()).await;
    first
        .admin()
        .await
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    first.stop().await;

    // A fresh sidecar: its cache is cold, so Encrypt must unwrap, and waits at the gate.
    let gated = Arc::new(Gated {
        inner: common::provider(Kms::Local, dir.path(), None).await,
        entered: Notify::new(),
        release: Notify::new(),
    });
    let mut sidecar = TestSidecar::start_with_root(dir, Options::default(), gated.clone()).await;
    let mut crypto = sidecar.crypto().await;
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
    // The server keeps running while the call is held, however long that is.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !sidecar.stopped(),
        "the server stopped with a call in flight"
    );
    assert!(!call.is_finished());

    gated.release.notify_one();
    let answer = call.await.unwrap().expect("the call in flight succeeds");
    assert_eq!(answer.into_inner().key_version, 1);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !sidecar.stopped() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server finishes draining once the call is done");
    assert!(
        keywarden::client::connect(&sidecar.addr, None)
            .await
            .is_err(),
        "a stopped sidecar accepts no new connection"
    );
}
