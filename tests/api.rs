//! The gRPC API as a caller sees it: a real sidecar on loopback with the
//! SQLite keystore. Each test states one behaviour and runs twice, once per
//! root-key provider: `local::` (the local root key) and `aws::` (AWS KMS
//! through aws-sdk-kms, against moto's KMS API server).

mod common;

use std::collections::BTreeMap;

use common::{Kms, Options, TestSidecar};
use keywarden::{api::pb, config::RequestLimits};
use tonic::{Code, Status};

type Crypto = pb::crypto_client::CryptoClient<keywarden::client::Authed>;
type Admin = pb::admin_client::AdminClient<keywarden::client::Authed>;

const UNDECRYPTABLE: &str = "ciphertext could not be decrypted: it is malformed, was altered, or was made for another tenant or context";

fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn create(admin: &mut Admin, id: &str) -> pb::Tenant {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn encrypt(
    c: &mut Crypto,
    tenant: &str,
    subject: &str,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
) -> Result<pb::EncryptResponse, Status> {
    c.encrypt(pb::EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        context: context.clone(),
        plaintext: plaintext.to_vec(),
        deterministic: false,
        key_version: 0,
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn decrypt(
    c: &mut Crypto,
    tenant: &str,
    context: &BTreeMap<String, String>,
    ciphertext: &[u8],
) -> Result<pb::DecryptResponse, Status> {
    c.decrypt(pb::DecryptRequest {
        tenant_id: tenant.into(),
        context: context.clone(),
        ciphertext: ciphertext.to_vec(),
    })
    .await
    .map(tonic::Response::into_inner)
}

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, message_start: &str) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "message: {}", status.message());
    assert!(
        status.message().starts_with(message_start),
        "message {:?} should start with {message_start:?}",
        status.message()
    );
}

fn assert_undecryptable(result: Result<pb::DecryptResponse, Status>) {
    let status = result.expect_err("decryption should fail");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), UNDECRYPTABLE);
}

async fn round_trips_tenant_and_subject_keys_for_empty_small_and_1_mib_plaintexts(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        kms,
        ..Options::default()
    })
    .await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    create(&mut admin, "acme").await;
    let context = ctx(&[("table", "patients"), ("column", "diagnosis")]);
    for subject in ["", "patient-17"] {
        for len in [0usize, 1, 1 << 20] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sealed = encrypt(&mut c, "acme", subject, &context, &plaintext)
                .await
                .unwrap();
            assert_eq!(sealed.key_version, 1);
            let overhead = if subject.is_empty() { 51 } else { 67 };
            assert_eq!(sealed.ciphertext.len(), len + overhead);
            let opened = decrypt(&mut c, "acme", &context, &sealed.ciphertext)
                .await
                .unwrap();
            assert_eq!(
                opened.plaintext, plaintext,
                "subject {subject:?}, {len} bytes"
            );
            assert_eq!(opened.key_version, 1);
        }
    }
}

async fn another_tenant_another_context_or_any_flipped_bit_fails_with_one_message(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        kms,
        ..Options::default()
    })
    .await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    create(&mut admin, "tenant-a").await;
    create(&mut admin, "tenant-b").await;
    let context = ctx(&[("row", "42")]);
    for subject in ["", "alice"] {
        let sealed = encrypt(&mut c, "tenant-a", subject, &context, b"card 4111")
            .await
            .unwrap()
            .ciphertext;
        assert_undecryptable(decrypt(&mut c, "tenant-b", &context, &sealed).await);
        for other in [
            ctx(&[]),
            ctx(&[("row", "43")]),
            ctx(&[("Row", "42")]),
            ctx(&[("row", "42"), ("extra", "")]),
        ] {
            assert_undecryptable(decrypt(&mut c, "tenant-a", &other, &sealed).await);
        }
        for bit in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_undecryptable(decrypt(&mut c, "tenant-a", &context, &bad).await);
        }
        // The untouched ciphertext still decrypts: nothing above changed state.
        let opened = decrypt(&mut c, "tenant-a", &context, &sealed)
            .await
            .unwrap();
        assert_eq!(opened.plaintext, b"card 4111");
    }
}

async fn rotation_moves_encryption_to_the_new_version_and_old_ciphertexts_still_decrypt(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        kms,
        ..Options::default()
    })
    .await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    create(&mut admin, "acme").await;
    let context = ctx(&[("f", "email")]);
    let old = encrypt(&mut c, "acme", "", &context, b"v1 data")
        .await
        .unwrap();
    let old_subject = encrypt(&mut c, "acme", "bob", &context, b"bob v1")
        .await
        .unwrap();
    assert_eq!(old.key_version, 1);

    let rotated = admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.primary_version, 2);
    let versions: Vec<(u32, i32)> = rotated
        .versions
        .iter()
        .map(|v| (v.version, v.state))
        .collect();
    assert_eq!(
        versions,
        vec![
            (1, pb::KeyVersionState::Active as i32),
            (2, pb::KeyVersionState::Primary as i32)
        ]
    );

    let new = encrypt(&mut c, "acme", "", &context, b"v2 data")
        .await
        .unwrap();
    assert_eq!(new.key_version, 2);
    assert_eq!(
        decrypt(&mut c, "acme", &context, &old.ciphertext)
            .await
            .unwrap()
            .plaintext,
        b"v1 data"
    );
    assert_eq!(
        decrypt(&mut c, "acme", &context, &new.ciphertext)
            .await
            .unwrap()
            .key_version,
        2
    );

    let rewrapped = c
        .rewrap(pb::RewrapRequest {
            tenant_id: "acme".into(),
            context: context.clone(),
            ciphertext: old.ciphertext.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rewrapped.previous_key_version, rewrapped.key_version),
        (1, 2)
    );
    assert_ne!(rewrapped.ciphertext, old.ciphertext);
    let opened = decrypt(&mut c, "acme", &context, &rewrapped.ciphertext)
        .await
        .unwrap();
    assert_eq!(
        (opened.plaintext.as_slice(), opened.key_version),
        (&b"v1 data"[..], 2)
    );

    // A subject ciphertext stays under its subject key: sealed afresh, and
    // still erased by shredding the subject.
    let rewrapped = c
        .rewrap(pb::RewrapRequest {
            tenant_id: "acme".into(),
            context: context.clone(),
            ciphertext: old_subject.ciphertext.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rewrapped.ciphertext, old_subject.ciphertext);
    assert_eq!(
        decrypt(&mut c, "acme", &context, &rewrapped.ciphertext)
            .await
            .unwrap()
            .plaintext,
        b"bob v1"
    );
    admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "acme".into(),
            subject_id: "bob".into(),
        })
        .await
        .unwrap();
    assert_status(
        decrypt(&mut c, "acme", &context, &rewrapped.ciphertext).await,
        Code::FailedPrecondition,
        "the data subject's key in tenant acme was shredded at ",
    );

    // Rewrap with the wrong context is the same opaque failure, and changes nothing.
    let wrong = c
        .rewrap(pb::RewrapRequest {
            tenant_id: "acme".into(),
            context: ctx(&[("f", "phone")]),
            ciphertext: old.ciphertext.clone(),
        })
        .await;
    assert_status(wrong, Code::InvalidArgument, UNDECRYPTABLE);
}

async fn a_shredded_tenant_refuses_everything_and_others_are_untouched(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        kms,
        ..Options::default()
    })
    .await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    create(&mut admin, "gone").await;
    create(&mut admin, "stays").await;
    let context = ctx(&[]);
    let gone_ct = encrypt(&mut c, "gone", "", &context, b"x")
        .await
        .unwrap()
        .ciphertext;
    encrypt(&mut c, "gone", "someone", &context, b"y")
        .await
        .unwrap();
    let stays_ct = encrypt(&mut c, "stays", "", &context, b"kept")
        .await
        .unwrap()
        .ciphertext;

    let shred = admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: "gone".into(),
            confirm: "gone".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!shred.already_shredded);
    assert_eq!(
        (shred.destroyed_key_versions, shred.destroyed_subject_keys),
        (1, 1)
    );
    let at = shred.shredded_at.unwrap();

    let prefix = "tenant gone was shredded at ";
    assert_status(
        encrypt(&mut c, "gone", "", &context, b"x").await,
        Code::FailedPrecondition,
        prefix,
    );
    assert_status(
        encrypt(&mut c, "gone", "someone", &context, b"x").await,
        Code::FailedPrecondition,
        prefix,
    );
    assert_status(
        decrypt(&mut c, "gone", &context, &gone_ct).await,
        Code::FailedPrecondition,
        prefix,
    );
    let status = decrypt(&mut c, "gone", &context, &gone_ct)
        .await
        .unwrap_err();
    assert!(
        status.message().contains("Z: its keys are destroyed"),
        "{}",
        status.message()
    );
    assert_status(
        admin
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: "gone".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        prefix,
    );
    let tombstone = admin
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "gone".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tombstone.state, pb::TenantState::Shredded as i32);
    assert!(tombstone.versions.is_empty());
    assert_eq!(tombstone.shredded_at, Some(at));

    // Shredding again reports the first shred, not an error that hides it.
    let again = admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: "gone".into(),
            confirm: "gone".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_shredded);
    assert_eq!(again.shredded_at, Some(at));
    assert_eq!(
        (again.destroyed_key_versions, again.destroyed_subject_keys),
        (0, 0)
    );

    assert_eq!(
        decrypt(&mut c, "stays", &context, &stays_ct)
            .await
            .unwrap()
            .plaintext,
        b"kept"
    );
    encrypt(&mut c, "stays", "", &context, b"more")
        .await
        .unwrap();
}

async fn a_shredded_subject_is_erased_while_the_rest_of_its_tenant_decrypts(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        kms,
        ..Options::default()
    })
    .await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    create(&mut admin, "clinic").await;
    let context = ctx(&[("record", "visit")]);
    let alice = encrypt(&mut c, "clinic", "alice", &context, b"alice's file")
        .await
        .unwrap();
    let alice2 = encrypt(&mut c, "clinic", "alice", &context, b"alice again")
        .await
        .unwrap();
    let bob = encrypt(&mut c, "clinic", "bob", &context, b"bob's file")
        .await
        .unwrap();
    let shared = encrypt(&mut c, "clinic", "", &context, b"clinic data")
        .await
        .unwrap();
    // One subject, one key: both of alice's ciphertexts name the same key.
    assert_eq!(alice.ciphertext[..19], alice2.ciphertext[..19]);
    assert_ne!(alice.ciphertext[..19], bob.ciphertext[..19]);

    let shred = admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "clinic".into(),
            subject_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(shred.key_destroyed && !shred.already_shredded);

    let erased = "the data subject's key in tenant clinic was shredded at ";
    for ct in [&alice.ciphertext, &alice2.ciphertext] {
        assert_status(
            decrypt(&mut c, "clinic", &context, ct).await,
            Code::FailedPrecondition,
            erased,
        );
    }
    assert_status(
        encrypt(&mut c, "clinic", "alice", &context, b"new").await,
        Code::FailedPrecondition,
        erased,
    );
    assert_eq!(
        decrypt(&mut c, "clinic", &context, &bob.ciphertext)
            .await
            .unwrap()
            .plaintext,
        b"bob's file"
    );
    assert_eq!(
        decrypt(&mut c, "clinic", &context, &shared.ciphertext)
            .await
            .unwrap()
            .plaintext,
        b"clinic data"
    );

    let again = admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "clinic".into(),
            subject_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_shredded && !again.key_destroyed);
    assert_eq!(again.shredded_at, shred.shredded_at);

    // A subject that never had a key is tombstoned too, so it never gets one.
    let never = admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "clinic".into(),
            subject_id: "carol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!never.key_destroyed && !never.already_shredded);
    assert_status(
        encrypt(&mut c, "clinic", "carol", &context, b"x").await,
        Code::FailedPrecondition,
        erased,
    );
}

async fn bad_input_gets_a_clear_error_and_changes_nothing(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        limits: RequestLimits {
            max_plaintext_bytes: 1024,
            max_batch_items: 3,
            ..RequestLimits::default()
        },
        kms,
        ..Options::default()
    })
    .await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    create(&mut admin, "acme").await;
    let context = ctx(&[]);
    let good = encrypt(&mut c, "acme", "", &context, b"ok")
        .await
        .unwrap()
        .ciphertext;

    assert_status(
        encrypt(&mut c, "nobody", "", &context, b"x").await,
        Code::NotFound,
        "tenant nobody does not exist",
    );
    assert_status(
        decrypt(&mut c, "nobody", &context, &good).await,
        Code::NotFound,
        "tenant nobody does not exist",
    );
    assert_status(
        admin
            .get_tenant(pb::GetTenantRequest {
                tenant_id: "nobody".into(),
            })
            .await,
        Code::NotFound,
        "tenant nobody does not exist",
    );

    for (bad_id, message) in [
        (String::new(), "tenant_id: must not be empty"),
        (
            "a".repeat(129),
            "tenant_id: is 129 bytes; at most 128 are allowed",
        ),
        (
            "acme/../x".into(),
            "tenant_id: may contain only letters, digits, '.', '_' and '-'",
        ),
        (
            "acme corp".into(),
            "tenant_id: may contain only letters, digits, '.', '_' and '-'",
        ),
    ] {
        assert_status(
            encrypt(&mut c, &bad_id, "", &context, b"x").await,
            Code::InvalidArgument,
            message,
        );
        assert_status(
            decrypt(&mut c, &bad_id, &context, &good).await,
            Code::InvalidArgument,
            message,
        );
        assert_status(
            admin
                .create_tenant(pb::CreateTenantRequest {
                    tenant_id: bad_id.clone(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            message,
        );
        assert_status(
            admin
                .rotate_tenant_key(pb::RotateTenantKeyRequest {
                    tenant_id: bad_id.clone(),
                })
                .await,
            Code::InvalidArgument,
            message,
        );
        assert_status(
            admin
                .shred_tenant(pb::ShredTenantRequest {
                    tenant_id: bad_id.clone(),
                    confirm: bad_id.clone(),
                })
                .await,
            Code::InvalidArgument,
            message,
        );
    }
    // 128 bytes of the allowed characters is fine.
    create(&mut admin, &"a.b_c-D9".repeat(16)).await;

    for malformed in [
        &b""[..],
        b"\x01",
        b"hello",
        &good[..good.len() - 1],
        &good[..50],
    ] {
        assert_undecryptable(decrypt(&mut c, "acme", &context, malformed).await);
    }

    assert_status(
        encrypt(&mut c, "acme", "", &context, &[0u8; 1025]).await,
        Code::InvalidArgument,
        "plaintext: is 1025 bytes; the limit is 1024 bytes",
    );
    encrypt(&mut c, "acme", "", &context, &[0u8; 1024])
        .await
        .unwrap();
    assert_status(
        encrypt(&mut c, "acme", &"s".repeat(257), &context, b"x").await,
        Code::InvalidArgument,
        "subject_id: is 257 bytes; at most 256 are allowed",
    );
    assert_status(
        encrypt(&mut c, "acme", "", &ctx(&[("", "v")]), b"x").await,
        Code::InvalidArgument,
        "context: keys must not be empty",
    );

    let item = || pb::EncryptItem {
        subject_id: String::new(),
        context: ctx(&[]),
        plaintext: b"x".to_vec(),
        deterministic: false,
        key_version: 0,
    };
    assert_status(
        c.encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![item(); 4],
        })
        .await,
        Code::InvalidArgument,
        "items: more than 3 items; the limit is 3 per batch",
    );
    assert_status(
        c.decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![],
        })
        .await,
        Code::InvalidArgument,
        "items: a batch needs at least one item",
    );

    assert_status(
        admin
            .shred_tenant(pb::ShredTenantRequest {
                tenant_id: "acme".into(),
                confirm: "acme2".into(),
            })
            .await,
        Code::InvalidArgument,
        "confirm: must repeat tenant_id exactly",
    );
    assert_status(
        admin
            .shred_tenant(pb::ShredTenantRequest {
                tenant_id: "acme".into(),
                confirm: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "confirm: must repeat tenant_id exactly",
    );
    assert_status(
        admin
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: "acme".into(),
                ..Default::default()
            })
            .await,
        Code::AlreadyExists,
        "tenant acme already exists",
    );
    assert_status(
        admin
            .list_tenants(pb::ListTenantsRequest {
                page_size: 10,
                page_token: "not-a-token!".into(),
            })
            .await,
        Code::InvalidArgument,
        "page_token: is not a token this server issued",
    );

    // Nothing changed: still version 1, still active, the first ciphertext opens.
    let acme = admin
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (acme.state, acme.primary_version, acme.versions.len()),
        (pb::TenantState::Active as i32, 1, 1)
    );
    assert_eq!(
        decrypt(&mut c, "acme", &context, &good)
            .await
            .unwrap()
            .plaintext,
        b"ok"
    );
}

async fn batches_answer_per_item_so_one_bad_item_fails_alone(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        kms,
        ..Options::default()
    })
    .await;
    let (mut admin, mut c) = (sidecar.admin().await, sidecar.crypto().await);
    create(&mut admin, "acme").await;
    let items: Vec<pb::EncryptItem> = (0..100)
        .map(|i| pb::EncryptItem {
            subject_id: if i % 10 == 0 {
                format!("user-{i}")
            } else {
                String::new()
            },
            context: ctx(&[("row", &i.to_string())]),
            plaintext: format!("value {i}").into_bytes(),
            deterministic: false,
            key_version: 0,
        })
        .chain([pb::EncryptItem {
            subject_id: String::new(),
            context: ctx(&[("", "empty key")]),
            plaintext: b"bad".to_vec(),
            deterministic: false,
            key_version: 0,
        }])
        .collect();
    let sealed = c
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(sealed.len(), 101);
    let mut decrypt_items = Vec::new();
    for (i, result) in sealed.iter().enumerate().take(100) {
        let Some(pb::encrypt_result::Result::Ok(ok)) = &result.result else {
            panic!("item {i} failed: {result:?}");
        };
        decrypt_items.push(pb::DecryptItem {
            context: ctx(&[("row", &i.to_string())]),
            ciphertext: ok.ciphertext.clone(),
        });
    }
    let Some(pb::encrypt_result::Result::Error(error)) = &sealed[100].result else {
        panic!("the bad item should fail");
    };
    assert_eq!(
        (error.code, error.message.as_str()),
        (
            Code::InvalidArgument as i32,
            "context: keys must not be empty"
        )
    );

    // One item with the wrong context among good ones.
    decrypt_items[50].context = ctx(&[("row", "999")]);
    let opened = c
        .decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: "acme".into(),
            items: decrypt_items,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    for (i, result) in opened.iter().enumerate() {
        match &result.result {
            Some(pb::decrypt_result::Result::Ok(ok)) => {
                assert_ne!(i, 50);
                assert_eq!(ok.plaintext, format!("value {i}").into_bytes());
            }
            Some(pb::decrypt_result::Result::Error(e)) => {
                assert_eq!(i, 50);
                assert_eq!(
                    (e.code, e.message.as_str()),
                    (Code::InvalidArgument as i32, UNDECRYPTABLE)
                );
            }
            None => panic!("item {i} has no result"),
        }
    }
    // A batch for an unknown tenant fails as a whole.
    assert_status(
        c.encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "nobody".into(),
            items: vec![],
        })
        .await,
        Code::NotFound,
        "tenant nobody does not exist",
    );
}

async fn list_tenants_pages_through_every_tenant_in_id_order(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        kms,
        ..Options::default()
    })
    .await;
    let mut admin = sidecar.admin().await;
    let mut ids: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
    for id in &ids {
        create(&mut admin, id).await;
    }
    admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: "t07".into(),
            confirm: "t07".into(),
        })
        .await
        .unwrap();
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = admin
            .list_tenants(pb::ListTenantsRequest {
                page_size: 10,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.tenants.iter().map(|t| (t.tenant_id.clone(), t.state)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    ids.sort();
    assert_eq!(
        seen.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(seen[7].1, pb::TenantState::Shredded as i32);
    assert_eq!(seen[8].1, pb::TenantState::Active as i32);
}

async fn a_hundred_concurrent_first_requests_unwrap_the_tenant_key_once(kms: Kms) {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    // Create the tenant, then start a fresh sidecar so its cache is cold.
    let first = TestSidecar::start_in(
        dir.clone(),
        Options {
            kms,
            ..Options::default()
        },
    )
    .await;
    create(&mut first.admin().await, "cold").await;
    first.stop().await;
    let sidecar = TestSidecar::start_in(
        dir,
        Options {
            kms,
            ..Options::default()
        },
    )
    .await;
    let channel = sidecar.channel().await;
    assert_eq!(sidecar.decrypts(), 0);

    let calls: Vec<_> = (0..100)
        .map(|i| {
            let mut c = keywarden::client::crypto(channel.clone(), sidecar.admin_bearer());
            tokio::spawn(async move {
                encrypt(&mut c, "cold", "", &ctx(&[]), format!("{i}").as_bytes())
                    .await
                    .unwrap()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().key_version, 1);
    }
    assert_eq!(sidecar.decrypts(), 1);
}

async fn health_and_reflection_are_served(kms: Kms) {
    let sidecar = TestSidecar::start_with(Options {
        kms,
        ..Options::default()
    })
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(sidecar.channel().await);
    for service in ["keywarden.v1.Crypto", "keywarden.v1.Admin"] {
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            sidecar.channel().await,
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        ),
    ) = answer.message_response
    else {
        panic!("unexpected reflection answer");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "keywarden.v1.Admin",
            "keywarden.v1.Crypto"
        ]
    );
}

/// Runs each test once per root-key provider.
macro_rules! for_each_provider {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kms::Local).await
            })*
        }
        mod aws {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kms::Aws).await
            })*
        }
    };
}

for_each_provider!(
    round_trips_tenant_and_subject_keys_for_empty_small_and_1_mib_plaintexts,
    another_tenant_another_context_or_any_flipped_bit_fails_with_one_message,
    rotation_moves_encryption_to_the_new_version_and_old_ciphertexts_still_decrypt,
    a_shredded_tenant_refuses_everything_and_others_are_untouched,
    a_shredded_subject_is_erased_while_the_rest_of_its_tenant_decrypts,
    bad_input_gets_a_clear_error_and_changes_nothing,
    batches_answer_per_item_so_one_bad_item_fails_alone,
    list_tenants_pages_through_every_tenant_in_id_order,
    a_hundred_concurrent_first_requests_unwrap_the_tenant_key_once,
    health_and_reflection_are_served,
);
