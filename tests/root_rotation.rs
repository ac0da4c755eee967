//! Root key rotation across 1,000 tenants, with real parts: sidecar processes
//! configured for AWS KMS against moto's KMS API server, SIGKILLed half-way.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{moto, process::Sidecar};
use keywarden::{
    api::pb,
    client,
    store::{
        Keystore,
        sqlite::{KEYSTORE_FILE, SqliteKeystore},
    },
};
use tonic::Code;

const TENANTS: usize = 1000;

fn aws_env<'a>(endpoint: &'a str, key: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("KEYWARDEN_KMS_PROVIDER", "aws"),
        ("KEYWARDEN_KMS_REGION", moto::REGION),
        ("KEYWARDEN_KMS_KEY_ID", key),
        ("KEYWARDEN_KMS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", "keywarden-test"),
        ("AWS_SECRET_ACCESS_KEY", "keywarden-test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}

fn tenant(i: usize) -> String {
    format!("tenant-{i:04}")
}

/// Decrypts every ciphertext (tenant-key and subject-key) through `addr`.
async fn assert_all_decrypt(addr: &str, ciphertexts: &[(String, Vec<u8>, Vec<u8>)]) {
    // An app on the unix socket: the data plane, without a token.
    let channel = client::connect(addr, None).await.unwrap();
    for (tenant, plaintext, ciphertext) in ciphertexts {
        let opened = client::crypto(channel.clone(), client::Bearer::default())
            .decrypt(pb::DecryptRequest {
                tenant_id: tenant.clone(),
                context: BTreeMap::new(),
                ciphertext: ciphertext.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{tenant}: {e:?}"))
            .into_inner();
        assert_eq!(&opened.plaintext, plaintext, "{tenant}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_over_1000_tenants_resumes_after_sigkill_and_leaves_nothing_on_the_old_key() {
    let endpoint = moto::moto().endpoint.clone();
    let old_key = moto::create_key("old shared root key").await;
    let new_key = moto::create_key("new shared root key").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("k.sock");

    // 1,000 tenants under the old root key, each with a tenant-key and a
    // subject-key ciphertext.
    let sidecar = Sidecar::start_with_env(dir.path(), &socket, &aws_env(&endpoint, &old_key));
    let channel = sidecar.client().await;
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for i in (worker..TENANTS).step_by(8) {
                let id = tenant(i);
                channel
                    .admin()
                    .create_tenant(pb::CreateTenantRequest {
                        tenant_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                for subject in ["", "person"] {
                    let plaintext = format!("{id}/{subject}").into_bytes();
                    let sealed = channel
                        .crypto()
                        .encrypt(pb::EncryptRequest {
                            tenant_id: id.clone(),
                            subject_id: subject.into(),
                            context: BTreeMap::new(),
                            plaintext: plaintext.clone(),
                            deterministic: false,
                            key_version: 0,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    made.push((id.clone(), plaintext, sealed.ciphertext));
                }
            }
            made
        }));
    }
    let mut ciphertexts = Vec::new();
    for task in tasks {
        ciphertexts.extend(task.await.unwrap());
    }
    assert_eq!(ciphertexts.len(), 2 * TENANTS);
    sidecar.terminate();

    // The sidecars are configured with the new key; rotation is refused for
    // any other target.
    let sidecar = Sidecar::start_with_env(dir.path(), &socket, &aws_env(&endpoint, &new_key));
    let mut admin = sidecar.client().await.admin();
    let refused = admin
        .rotate_root_key(pb::RotateRootKeyRequest {
            to: old_key.clone(),
            ..Default::default()
        })
        .await;
    let refused = match refused {
        Err(status) => status,
        Ok(stream) => stream.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(
        refused.code(),
        Code::FailedPrecondition,
        "{}",
        refused.message()
    );

    // Start rotating, and SIGKILL the sidecar half-way.
    let mut updates = admin
        .rotate_root_key(pb::RotateRootKeyRequest {
            to: new_key.clone(),
            page_size: 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = updates.message().await.unwrap().unwrap();
    // Every tenant has key version 1 and a subject-index key.
    assert_eq!(
        (first.total, first.already_on_target, first.to.as_str()),
        (2 * TENANTS as u64, 0, new_key.as_str())
    );
    let mut seen = 0;
    while let Some(update) = updates.message().await.unwrap() {
        seen = update.rewrapped;
        if seen >= TENANTS as u64 {
            break;
        }
    }
    assert!(
        (TENANTS as u64..2 * TENANTS as u64).contains(&seen),
        "rewrapped {seen}"
    );
    sidecar.kill();

    // Restarted, the rotation resumes through the CLI and completes.
    let sidecar = Sidecar::start_with_env(dir.path(), &socket, &aws_env(&endpoint, &new_key));
    let done = sidecar.ok(&["root", "rotate", "--to", &new_key, "--page-size", "50"]);
    let already: u64 = done
        .split(", ")
        .find_map(|part| part.strip_suffix(" were there already"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected summary: {done}"));
    assert!(done.starts_with("done: "), "{done}");
    assert!(already >= seen, "{done}");
    assert!(
        done.contains(&format!("{} of 2000 keys moved", 2000 - already)),
        "{done}"
    );

    // Run again: nothing left to move.
    let again = sidecar.ok(&["root", "rotate"]);
    assert!(again.starts_with("done: 0 of 2000 keys moved"), "{again}");
    assert!(again.contains("2000 were there already"), "{again}");

    assert_all_decrypt(&sidecar.addr(), &ciphertexts).await;
    let mut admin = sidecar.client().await.admin();
    for i in (0..TENANTS).step_by(97) {
        let t = admin
            .get_tenant(pb::GetTenantRequest {
                tenant_id: tenant(i),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(t.versions.iter().all(|v| v.root_key_id == new_key), "{t:?}");
    }
    sidecar.terminate();

    // Nothing depends on the old key any more: every key the root key wraps
    // (1,000 versions, 1,000 subject-index keys) names the new one in the
    // keystore. (moto does not enforce a disabled key's state, so disabling
    // the old key would prove nothing here; the keystore is the evidence.)
    let store = SqliteKeystore::open(&dir.path().join(KEYSTORE_FILE))
        .await
        .unwrap();
    assert_eq!(
        store
            .count_shared_root_wrapped(None, &new_key)
            .await
            .unwrap(),
        (2000, 2000)
    );
    assert_eq!(
        store
            .count_shared_root_wrapped(None, &old_key)
            .await
            .unwrap(),
        (2000, 0)
    );
    drop(store);

    // A cold sidecar unwraps through the new key only, and every ciphertext
    // (tenant keys, and subject keys, which need the rewrapped subject-index
    // keys) still decrypts.
    let sidecar = Sidecar::start_with_env(dir.path(), &socket, &aws_env(&endpoint, &new_key));
    tokio::time::timeout(
        Duration::from_secs(120),
        assert_all_decrypt(&sidecar.addr(), &ciphertexts),
    )
    .await
    .expect("decrypting everything takes under two minutes");
    sidecar.terminate();
}
