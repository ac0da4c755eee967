//! Graceful shutdown: a call in flight when the stop signal arrives finishes.
//! The root-key provider is held mid-call by a gate (a fault injector around
//! the real local root key), so the test does not depend on timing.

mod common;

use std::{sync::Arc, time::Duration};

use common::{Kms, Options, TestSidecar, faults::Hooked};
use keywarden::api::pb;
use tokio::sync::Notify;

/// The gate every Decrypt waits at.
struct Gate {
    entered: Notify,
    release: Notify,
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
    let gated = Arc::new(Gate {
        entered: Notify::new(),
        release: Notify::new(),
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
    let mut sidecar = TestSidecar::start_with_root(dir, Options::default(), hooked).await;
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
