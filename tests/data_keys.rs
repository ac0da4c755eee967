//! Data keys through real gRPC (issue 17, "Data keys"): GenerateDataKey,
//! DecryptDataKey and RewrapDataKey; the wrapped form in a key domain of its
//! own (no other call opens it, and these open nothing else); shreds; the
//! `datakey` permission; bad inputs; audit records.

mod common;

use std::{collections::BTreeMap, path::Path};

use keywarden::{
    api::pb::{
        self, admin_client::AdminClient, crypto_client::CryptoClient,
        decrypt_stream_request::Part as DPart, encrypt_stream_request::Part as EPart,
    },
    client::{self, Authed, Bearer},
    config::AuthConfig,
};
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;

use common::{Options, TestSidecar};

type Crypto = CryptoClient<Authed>;
type Admin = AdminClient<Authed>;

const UNDECRYPTABLE: &str = "ciphertext could not be decrypted: it is malformed, was altered, or was made for another tenant or context";
const RESERVED: &str = "context: keys beginning with \"keywarden.\" are reserved";

fn context(object: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("object".to_owned(), object.to_owned())])
}

fn expect_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, message: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), message, "{status:?}");
}

fn expect_failed_precondition<T: std::fmt::Debug>(result: Result<T, tonic::Status>, start: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().starts_with(start), "{status:?}");
}

async fn create(admin: &mut Admin, tenant: &str) {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: tenant.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn generate(
    crypto: &mut Crypto,
    tenant: &str,
    subject: &str,
    context: &BTreeMap<String, String>,
) -> Result<pb::GenerateDataKeyResponse, tonic::Status> {
    crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            tenant_id: tenant.into(),
            subject_id: subject.into(),
            context: context.clone(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn decrypt_key(
    crypto: &mut Crypto,
    tenant: &str,
    context: &BTreeMap<String, String>,
    wrapped: &[u8],
) -> Result<pb::DecryptDataKeyResponse, tonic::Status> {
    crypto
        .decrypt_data_key(pb::DecryptDataKeyRequest {
            tenant_id: tenant.into(),
            context: context.clone(),
            wrapped_data_key: wrapped.to_vec(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn rewrap_key(
    crypto: &mut Crypto,
    tenant: &str,
    context: &BTreeMap<String, String>,
    wrapped: &[u8],
) -> Result<pb::RewrapDataKeyResponse, tonic::Status> {
    crypto
        .rewrap_data_key(pb::RewrapDataKeyRequest {
            tenant_id: tenant.into(),
            context: context.clone(),
            wrapped_data_key: wrapped.to_vec(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn encrypt(crypto: &mut Crypto, tenant: &str, subject: &str, plaintext: &[u8]) -> Vec<u8> {
    crypto
        .encrypt(pb::EncryptRequest {
            tenant_id: tenant.into(),
            subject_id: subject.into(),
            context: context("o"),
            plaintext: plaintext.to_vec(),
            deterministic: false,
            key_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext
}

/// A streaming envelope made by EncryptStream.
async fn encrypt_stream(crypto: &mut Crypto, tenant: &str, plaintext: &[u8]) -> Vec<u8> {
    let requests = vec![
        pb::EncryptStreamRequest {
            part: Some(EPart::Start(pb::EncryptStreamStart {
                tenant_id: tenant.into(),
                subject_id: String::new(),
                context: context("o"),
            })),
        },
        pb::EncryptStreamRequest {
            part: Some(EPart::Chunk(plaintext.to_vec())),
        },
    ];
    let mut stream = crypto
        .encrypt_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut envelope = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        envelope.extend(m.chunk);
    }
    envelope
}

/// DecryptStream of `envelope`: its plaintext, or the status it ended with.
async fn decrypt_stream(
    crypto: &mut Crypto,
    tenant: &str,
    context: &BTreeMap<String, String>,
    envelope: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    let requests = vec![
        pb::DecryptStreamRequest {
            part: Some(DPart::Start(pb::DecryptStreamStart {
                tenant_id: tenant.into(),
                context: context.clone(),
            })),
        },
        pb::DecryptStreamRequest {
            part: Some(DPart::Chunk(envelope.to_vec())),
        },
    ];
    let mut stream = crypto
        .decrypt_stream(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut plaintext = Vec::new();
    while let Some(m) = stream.message().await? {
        plaintext.extend(m.chunk);
    }
    Ok(plaintext)
}

#[tokio::test]
async fn a_data_key_round_trips_under_a_tenant_key_and_a_subject_key() {
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("export-7");

    let made = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    assert_eq!(made.data_key.len(), 32);
    assert_eq!(made.key_version, 1);
    // docs/FORMAT.md, "Wrapped data keys": 01 05 01 [version]_32 ...
    assert_eq!(made.wrapped_data_key.len(), 83);
    assert_eq!(made.wrapped_data_key[..7], [1, 5, 1, 0, 0, 0, 1]);
    let opened = decrypt_key(&mut crypto, "acme", &ctx, &made.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!(opened.data_key, made.data_key);
    assert_eq!(opened.key_version, 1);

    // Two calls, two keys.
    let again = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    assert_ne!(again.data_key, made.data_key);

    let ada = generate(&mut crypto, "acme", "ada@example.com", &ctx)
        .await
        .unwrap();
    assert_eq!(ada.wrapped_data_key.len(), 99);
    assert_eq!(ada.wrapped_data_key[..3], [1, 5, 2]);
    // The subject key id is the one Encrypt uses for the subject.
    let sealed = encrypt(&mut crypto, "acme", "ada@example.com", b"x").await;
    assert_eq!(ada.wrapped_data_key[3..23], sealed[3..23]);
    let opened = decrypt_key(&mut crypto, "acme", &ctx, &ada.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!(opened.data_key, ada.data_key);
    sidecar.stop().await;
}

#[tokio::test]
async fn a_wrapped_data_key_opens_only_for_its_tenant_and_context() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme").await;
    create(&mut admin, "globex").await;
    let mut crypto = sidecar.crypto().await;
    let made = generate(&mut crypto, "acme", "", &context("a"))
        .await
        .unwrap();
    let w = &made.wrapped_data_key;
    for (tenant, ctx) in [
        ("globex", context("a")),
        ("acme", context("b")),
        ("acme", BTreeMap::new()),
    ] {
        expect_code(
            decrypt_key(&mut crypto, tenant, &ctx, w).await,
            Code::InvalidArgument,
            UNDECRYPTABLE,
        );
        expect_code(
            rewrap_key(&mut crypto, tenant, &ctx, w).await,
            Code::InvalidArgument,
            UNDECRYPTABLE,
        );
    }
    // Every byte changed, and every truncation, fails alike.
    for i in 0..w.len() {
        let mut bad = w.clone();
        bad[i] ^= 0x01;
        expect_code(
            decrypt_key(&mut crypto, "acme", &context("a"), &bad).await,
            Code::InvalidArgument,
            UNDECRYPTABLE,
        );
    }
    for len in [0, 1, 3, 7, 82] {
        expect_code(
            decrypt_key(&mut crypto, "acme", &context("a"), &w[..len]).await,
            Code::InvalidArgument,
            UNDECRYPTABLE,
        );
    }
    let long = [&w[..], &[0]].concat();
    expect_code(
        decrypt_key(&mut crypto, "acme", &context("a"), &long).await,
        Code::InvalidArgument,
        UNDECRYPTABLE,
    );
    sidecar.stop().await;
}

/// A wrapped data key sent to every call that opens ordinary data: refused
/// as undecryptable, whatever the context.
#[tokio::test]
async fn every_data_plane_reader_refuses_a_wrapped_data_key() {
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("a");
    for subject in ["", "ada"] {
        let w = generate(&mut crypto, "acme", subject, &ctx)
            .await
            .unwrap()
            .wrapped_data_key;
        // As it is, and with its suite byte rewritten to the one-shot suite
        // (the tag was made under a key derived with another label).
        let mut as_one_shot = w.clone();
        as_one_shot[1] = 0x01;
        for bytes in [w.clone(), as_one_shot] {
            expect_code(
                crypto
                    .decrypt(pb::DecryptRequest {
                        tenant_id: "acme".into(),
                        context: ctx.clone(),
                        ciphertext: bytes.clone(),
                    })
                    .await,
                Code::InvalidArgument,
                UNDECRYPTABLE,
            );
            let batch = crypto
                .decrypt_batch(pb::DecryptBatchRequest {
                    tenant_id: "acme".into(),
                    items: vec![pb::DecryptItem {
                        context: ctx.clone(),
                        ciphertext: bytes.clone(),
                    }],
                })
                .await
                .unwrap()
                .into_inner();
            match &batch.results[0].result {
                Some(pb::decrypt_result::Result::Error(e)) => {
                    assert_eq!(
                        (e.code, e.message.as_str()),
                        (Code::InvalidArgument as i32, UNDECRYPTABLE)
                    );
                }
                other => panic!("DecryptBatch opened a wrapped data key: {other:?}"),
            }
            expect_code(
                crypto
                    .rewrap(pb::RewrapRequest {
                        tenant_id: "acme".into(),
                        context: ctx.clone(),
                        ciphertext: bytes.clone(),
                    })
                    .await,
                Code::InvalidArgument,
                UNDECRYPTABLE,
            );
        }
        // DecryptStream: the wrapped key alone, and as a stream header with
        // its suite byte rewritten, followed by a segment's worth of bytes.
        let mut as_stream = w.clone();
        as_stream[1] = 0x02;
        as_stream.extend_from_slice(&[0u8; 64]);
        for bytes in [w.clone(), as_stream] {
            expect_code(
                decrypt_stream(&mut crypto, "acme", &ctx, &bytes).await,
                Code::InvalidArgument,
                UNDECRYPTABLE,
            );
        }
        // EncryptStream takes plaintext, not ciphertext: a wrapped data key
        // sent to it is only sealed like any bytes, and opens as such.
        let envelope = encrypt_stream(&mut crypto, "acme", &w).await;
        assert_eq!(
            decrypt_stream(&mut crypto, "acme", &context("o"), &envelope)
                .await
                .unwrap(),
            w
        );
    }
    sidecar.stop().await;
}

/// Ordinary ciphertexts (one-shot under a tenant key or a subject key,
/// streaming envelopes, a deterministic envelope's shape, a stored-key wrap)
/// sent to DecryptDataKey and RewrapDataKey: refused as undecryptable.
#[tokio::test]
async fn decrypt_data_key_refuses_every_other_ciphertext() {
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("o");
    // 32-byte plaintexts: the one-shot envelope is then 83 bytes (tenant
    // key) or 99 (subject key), as long as a wrapped data key.
    let one_shot = encrypt(&mut crypto, "acme", "", &[7; 32]).await;
    let subject = encrypt(&mut crypto, "acme", "ada", &[7; 32]).await;
    assert_eq!((one_shot.len(), subject.len()), (83, 99));
    let stream = encrypt_stream(&mut crypto, "acme", &[7; 37]).await;
    assert_eq!(stream.len(), 83);
    // Suite 0x04 (deterministic, AES-SIV): `01 04 01 [version]_32`, the SIV
    // and the ciphertext.
    let mut deterministic = vec![1, 4, 1, 0, 0, 0, 1];
    deterministic.extend_from_slice(&[0x5a; 16 + 60]);
    // The stored-key wrap of ada's subject key, as the keystore holds it.
    let rows = stored_subject_keys(&sidecar.dir.path().join("keystore.sqlite3")).await;
    assert_eq!(rows.len(), 1);
    let mut candidates = vec![one_shot, subject, stream, deterministic, rows[0].clone()];
    // And each with its suite byte rewritten to 0x05: parsed as a wrapped
    // data key, but the tag was made under another derived key.
    for c in candidates.clone() {
        let mut forged = c;
        forged[1] = 0x05;
        candidates.push(forged);
    }
    for bytes in &candidates {
        expect_code(
            decrypt_key(&mut crypto, "acme", &ctx, bytes).await,
            Code::InvalidArgument,
            UNDECRYPTABLE,
        );
        expect_code(
            rewrap_key(&mut crypto, "acme", &ctx, bytes).await,
            Code::InvalidArgument,
            UNDECRYPTABLE,
        );
    }
    sidecar.stop().await;
}

async fn stored_subject_keys(path: &Path) -> Vec<Vec<u8>> {
    use sqlx::Connection;
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    sqlx::query_scalar("SELECT wrapped FROM subject_keys")
        .fetch_all(&mut db)
        .await
        .unwrap()
}

#[tokio::test]
async fn rewrap_data_key_moves_a_tenant_key_one_to_the_primary_version_and_keeps_subjects() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("a");
    let tenant_key = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    let subject_key = generate(&mut crypto, "acme", "ada", &ctx).await.unwrap();
    admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();

    let moved = rewrap_key(&mut crypto, "acme", &ctx, &tenant_key.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!((moved.key_version, moved.previous_key_version), (2, 1));
    assert_eq!(moved.wrapped_data_key[..7], [1, 5, 1, 0, 0, 0, 2]);
    let opened = decrypt_key(&mut crypto, "acme", &ctx, &moved.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!(
        (opened.data_key, opened.key_version),
        (tenant_key.data_key, 2)
    );

    // A subject's data key stays under the subject's key, sealed afresh.
    let kept = rewrap_key(&mut crypto, "acme", &ctx, &subject_key.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!(
        kept.wrapped_data_key[..23],
        subject_key.wrapped_data_key[..23]
    );
    assert_ne!(kept.wrapped_data_key, subject_key.wrapped_data_key);
    let opened = decrypt_key(&mut crypto, "acme", &ctx, &kept.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!(opened.data_key, subject_key.data_key);
    // New data keys are wrapped under the new primary version.
    let fresh = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    assert_eq!(fresh.key_version, 2);
    sidecar.stop().await;
}

#[tokio::test]
async fn after_a_subject_or_tenant_shred_wrapped_data_keys_are_failed_precondition() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme").await;
    create(&mut admin, "gone").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("a");
    let ada = generate(&mut crypto, "acme", "ada", &ctx).await.unwrap();
    let bob = generate(&mut crypto, "acme", "bob", &ctx).await.unwrap();
    let tenant_key = generate(&mut crypto, "gone", "", &ctx).await.unwrap();
    let subject_of_gone = generate(&mut crypto, "gone", "carol", &ctx).await.unwrap();

    admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "acme".into(),
            subject_id: "ada".into(),
        })
        .await
        .unwrap();
    let shredded = "the data subject's key in tenant acme was shredded at ";
    expect_failed_precondition(
        decrypt_key(&mut crypto, "acme", &ctx, &ada.wrapped_data_key).await,
        shredded,
    );
    expect_failed_precondition(
        rewrap_key(&mut crypto, "acme", &ctx, &ada.wrapped_data_key).await,
        shredded,
    );
    // The shredded subject gets no new data key either; others are untouched.
    expect_failed_precondition(generate(&mut crypto, "acme", "ada", &ctx).await, shredded);
    let opened = decrypt_key(&mut crypto, "acme", &ctx, &bob.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!(opened.data_key, bob.data_key);

    admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: "gone".into(),
            confirm: "gone".into(),
        })
        .await
        .unwrap();
    let gone = "tenant gone was shredded at ";
    for w in [
        &tenant_key.wrapped_data_key,
        &subject_of_gone.wrapped_data_key,
    ] {
        expect_failed_precondition(decrypt_key(&mut crypto, "gone", &ctx, w).await, gone);
        expect_failed_precondition(rewrap_key(&mut crypto, "gone", &ctx, w).await, gone);
    }
    expect_failed_precondition(generate(&mut crypto, "gone", "", &ctx).await, gone);
    sidecar.stop().await;
}

#[tokio::test]
async fn bad_inputs_are_refused_and_context_before_the_tenant_is_looked_up() {
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let made = generate(&mut crypto, "acme", "", &context("a"))
        .await
        .unwrap();
    let reserved = BTreeMap::from([("keywarden.purpose".to_owned(), "x".to_owned())]);
    expect_code(
        generate(&mut crypto, "acme", "", &reserved).await,
        Code::InvalidArgument,
        RESERVED,
    );
    expect_code(
        decrypt_key(&mut crypto, "acme", &reserved, &made.wrapped_data_key).await,
        Code::InvalidArgument,
        RESERVED,
    );
    expect_code(
        rewrap_key(&mut crypto, "acme", &reserved, &made.wrapped_data_key).await,
        Code::InvalidArgument,
        RESERVED,
    );
    // The context is checked before the keystore is read for the tenant.
    expect_code(
        generate(&mut crypto, "nobody", "", &reserved).await,
        Code::InvalidArgument,
        RESERVED,
    );
    let empty_key = BTreeMap::from([(String::new(), "x".to_owned())]);
    expect_code(
        generate(&mut crypto, "acme", "", &empty_key).await,
        Code::InvalidArgument,
        "context: keys must not be empty",
    );
    let too_many: BTreeMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), String::new())).collect();
    let status = generate(&mut crypto, "acme", "", &too_many)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Unknown and malformed tenants.
    let status = generate(&mut crypto, "nobody", "", &context("a"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = decrypt_key(&mut crypto, "nobody", &context("a"), &made.wrapped_data_key)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = generate(&mut crypto, "not a tenant!", "", &context("a"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("tenant_id"), "{status:?}");
    // A subject id that is not one.
    let status = generate(&mut crypto, "acme", &"x".repeat(10_000), &context("a"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("subject_id"), "{status:?}");
    sidecar.stop().await;
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn token_line(name: &str, token: &SecretString) -> String {
    format!(
        "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\n",
        hex::encode(keywarden::auth::tokens::hash(token.expose_secret()))
    )
}

#[tokio::test]
async fn the_datakey_permission_is_needed_and_the_data_role_does_not_hold_it() {
    let files = tempfile::tempdir().unwrap();
    let billing = keywarden::auth::tokens::generate();
    let exporter = keywarden::auth::tokens::generate();
    let tokens = write(
        files.path(),
        "tokens.toml",
        &format!(
            "{}{}",
            token_line("billing", &billing),
            token_line("exporter", &exporter)
        ),
    );
    let policy = write(
        files.path(),
        "policy.toml",
        "[[grant]]\nidentity = \"token:billing\"\nallow = [\"data\"]\ntenants = [\"*\"]\n\
         [[grant]]\nidentity = \"token:exporter\"\nallow = [\"datakey\"]\ntenants = [\"acme\"]\n\
         [[grant]]\nidentity = \"token:admin\"\nallow = [\"admin\"]\ntenants = [\"*\"]\n",
    );
    let sidecar = TestSidecar::start_with(Options {
        auth: AuthConfig {
            tokens_file: Some(tokens),
            policy_file: Some(policy),
            ..AuthConfig::default()
        },
        ..Options::default()
    })
    .await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme").await;
    create(&mut admin, "globex").await;
    let as_token = |token: &SecretString| Bearer::new(Some(token)).unwrap();
    let mut billing = client::crypto(sidecar.channel().await, as_token(&billing));
    let mut exporter = client::crypto(sidecar.channel().await, as_token(&exporter));
    let ctx = context("a");

    // `data` encrypts, but hands out no keys.
    encrypt(&mut billing, "acme", "", b"x").await;
    expect_code(
        generate(&mut billing, "acme", "", &ctx).await,
        Code::PermissionDenied,
        "token:billing may not datakey for any tenant",
    );
    // `datakey`, for the tenants of its grant only.
    let made = generate(&mut exporter, "acme", "", &ctx).await.unwrap();
    expect_code(
        decrypt_key(&mut billing, "acme", &ctx, &made.wrapped_data_key).await,
        Code::PermissionDenied,
        "token:billing may not datakey for any tenant",
    );
    expect_code(
        rewrap_key(&mut billing, "acme", &ctx, &made.wrapped_data_key).await,
        Code::PermissionDenied,
        "token:billing may not datakey for any tenant",
    );
    let opened = decrypt_key(&mut exporter, "acme", &ctx, &made.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!(opened.data_key, made.data_key);
    rewrap_key(&mut exporter, "acme", &ctx, &made.wrapped_data_key)
        .await
        .unwrap();
    expect_code(
        generate(&mut exporter, "globex", "", &ctx).await,
        Code::PermissionDenied,
        "token:exporter may not datakey for tenant globex",
    );
    // And `datakey` alone does not decrypt data.
    let status = exporter
        .decrypt(pb::DecryptRequest {
            tenant_id: "acme".into(),
            context: ctx.clone(),
            ciphertext: vec![1; 60],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    sidecar.stop().await;
}

/// In both modes of `audit.data_plane`, as for Decrypt: counted (the
/// default) or one `answered` record per call; never a key's bytes.
#[tokio::test]
async fn data_key_calls_are_audited_like_decrypts_and_no_key_reaches_the_log() {
    use keywarden::config::{AuditConfig, DataPlaneAudit};
    for mode in [DataPlaneAudit::Counts, DataPlaneAudit::Every] {
        let sidecar = TestSidecar::start_with(Options {
            audit_config: AuditConfig {
                data_plane: mode,
                ..AuditConfig::default()
            },
            ..Options::default()
        })
        .await;
        create(&mut sidecar.admin().await, "acme").await;
        let mut crypto = sidecar.crypto().await;
        let ctx = context("a");
        let made = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
        decrypt_key(&mut crypto, "acme", &ctx, &made.wrapped_data_key)
            .await
            .unwrap();
        decrypt_key(&mut crypto, "acme", &context("b"), &made.wrapped_data_key)
            .await
            .unwrap_err();
        rewrap_key(&mut crypto, "acme", &ctx, &made.wrapped_data_key)
            .await
            .unwrap();
        sidecar.flush_audit_counts().await;
        let log = std::fs::read_to_string(sidecar.dir.path().join("audit.log")).unwrap();
        let records: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let phase = match mode {
            DataPlaneAudit::Every => "answered",
            _ => "counted",
        };
        let recorded = |action: &str, outcome: &str| {
            records
                .iter()
                .filter(|r| {
                    r["action"] == action
                        && r["outcome"] == outcome
                        && r["tenant"] == "acme"
                        && r["caller"] == "token:admin"
                        && r["phase"] == phase
                })
                .count()
        };
        assert_eq!(recorded("GenerateDataKey", "OK"), 1, "{log}");
        assert_eq!(recorded("DecryptDataKey", "OK"), 1, "{log}");
        assert_eq!(recorded("DecryptDataKey", "INVALID_ARGUMENT"), 1, "{log}");
        assert_eq!(recorded("RewrapDataKey", "OK"), 1, "{log}");
        for secret in [
            hex::encode(&made.data_key),
            hex::encode(&made.wrapped_data_key),
        ] {
            assert!(!log.contains(&secret));
        }
        sidecar.stop().await;
    }
}

/// The client side of issue 17: a large object sealed by the client as a
/// client stream (suite 0x06) under a data key from GenerateDataKey; a
/// reader with only the envelope asks DecryptDataKey for the key its header
/// carries. The sidecar's own readers refuse the envelope.
#[tokio::test]
async fn a_client_stream_opens_with_decrypt_data_key_alone_and_no_sidecar_reader_takes_it() {
    use keywarden::{
        envelope::{Provider, client_stream},
        secret::Key256,
    };
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("export-7");
    let object: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();

    let made = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    let key = Key256::from_slice(&made.data_key).unwrap();
    let envelope = client_stream::seal(
        Provider::default(),
        &key,
        &made.wrapped_data_key,
        "acme",
        &ctx,
        &object,
    )
    .unwrap();
    drop(key);

    // The reader: the envelope, the tenant and the context.
    let header = client_stream::parse_header(&envelope).unwrap().unwrap();
    let opened = decrypt_key(&mut crypto, "acme", &ctx, header.wrapped_data_key)
        .await
        .unwrap();
    let key = Key256::from_slice(&opened.data_key).unwrap();
    let plaintext =
        client_stream::open(Provider::default(), &key, &envelope, "acme", &ctx).unwrap();
    assert!(*plaintext == object);

    expect_code(
        decrypt_stream(&mut crypto, "acme", &ctx, &envelope).await,
        Code::InvalidArgument,
        UNDECRYPTABLE,
    );
    expect_code(
        crypto
            .decrypt(pb::DecryptRequest {
                tenant_id: "acme".into(),
                context: ctx.clone(),
                ciphertext: envelope[..1000].to_vec(),
            })
            .await,
        Code::InvalidArgument,
        UNDECRYPTABLE,
    );
    expect_code(
        decrypt_key(&mut crypto, "acme", &ctx, &envelope[..header.len]).await,
        Code::InvalidArgument,
        UNDECRYPTABLE,
    );
    sidecar.stop().await;
}

/// `keywarden datakey generate|decrypt`, `seal-file` and `open-file`, against
/// a real `keywarden serve` (the CLI uses the embedded admin token, whose
/// default grant names `datakey`).
#[test]
fn the_cli_generates_and_decrypts_data_keys_and_seals_and_opens_files() {
    use common::process::Sidecar;
    let tmp = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&tmp.path().join("data"), &tmp.path().join("kw.sock"));
    sidecar.ok(&["tenant", "create", "acme"]);

    let line = sidecar.ok(&[
        "datakey",
        "generate",
        "--tenant",
        "acme",
        "--context",
        "object=x",
    ]);
    let made: serde_json::Value = serde_json::from_str(&line).unwrap();
    let key = made["data_key"].as_str().unwrap();
    assert_eq!(key.len(), 64);
    let wrapped = made["wrapped_data_key"].as_str().unwrap();
    assert!(wrapped.starts_with("kw1:"), "{line}");
    assert_eq!(made["key_version"], 1);
    let opened = sidecar.ok(&[
        "datakey",
        "decrypt",
        "--tenant",
        "acme",
        "--context",
        "object=x",
        wrapped,
    ]);
    assert_eq!(opened, format!("{key}\n"));
    sidecar
        .cli(&[
            "datakey",
            "decrypt",
            "--tenant",
            "acme",
            "--context",
            "object=y",
            wrapped,
        ])
        .assert_failure("INVALID_ARGUMENT", "another context");
    // The wrapped data key is no ciphertext for `decrypt`.
    sidecar
        .cli(&[
            "decrypt",
            "--tenant",
            "acme",
            "--context",
            "object=x",
            wrapped,
        ])
        .assert_failure("INVALID_ARGUMENT", "decrypt of a wrapped data key");

    let object: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let plain = tmp.path().join("export.csv");
    let sealed = tmp.path().join("export.kw");
    let back = tmp.path().join("export.back.csv");
    std::fs::write(&plain, &object).unwrap();
    let p = |path: &Path| path.to_str().unwrap().to_owned();
    sidecar.ok(&[
        "seal-file",
        "--tenant",
        "acme",
        "--context",
        "object=export",
        &p(&plain),
        &p(&sealed),
    ]);
    let envelope = std::fs::read(&sealed).unwrap();
    assert_eq!(envelope[..2], [0x01, 0x06]);
    // 144-byte header, five segments of 16 bytes of tag each.
    assert_eq!(envelope.len(), 144 + object.len() + 16 * 5);
    sidecar.ok(&[
        "open-file",
        "--tenant",
        "acme",
        "--context",
        "object=export",
        &p(&sealed),
        &p(&back),
    ]);
    assert!(std::fs::read(&back).unwrap() == object);
    // A changed byte in the last segment: the command fails.
    let mut bad = envelope.clone();
    *bad.last_mut().unwrap() ^= 1;
    let tampered = tmp.path().join("tampered.kw");
    std::fs::write(&tampered, &bad).unwrap();
    sidecar
        .cli(&[
            "open-file",
            "--tenant",
            "acme",
            "--context",
            "object=export",
            &p(&tampered),
            &p(&tmp.path().join("tampered.out")),
        ])
        .assert_failure("INVALID_ARGUMENT", "open-file of a tampered file");
}

/// A tenant policy's minimum decryption version applies to wrapped data keys
/// as to data: one wrapped under an older version is refused by
/// DecryptDataKey and RewrapDataKey alike, so they are rewrapped before the
/// minimum is raised; a rewrapped one opens to the same key.
#[tokio::test]
async fn min_decrypt_version_refuses_older_wrapped_data_keys() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("a");
    let old = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();
    let moved = rewrap_key(&mut crypto, "acme", &ctx, &old.wrapped_data_key)
        .await
        .unwrap();
    admin
        .update_tenant_policy(pb::UpdateTenantPolicyRequest {
            tenant_id: "acme".into(),
            policy: Some(pb::TenantPolicy {
                min_decrypt_version: 2,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let refused = "tenant acme's policy refuses data of key version 1";
    expect_failed_precondition(
        decrypt_key(&mut crypto, "acme", &ctx, &old.wrapped_data_key).await,
        refused,
    );
    expect_failed_precondition(
        rewrap_key(&mut crypto, "acme", &ctx, &old.wrapped_data_key).await,
        refused,
    );
    let opened = decrypt_key(&mut crypto, "acme", &ctx, &moved.wrapped_data_key)
        .await
        .unwrap();
    assert_eq!(opened.data_key, old.data_key);
    sidecar.stop().await;
}

/// Each data-key call is one item against the tenant's rate, as Decrypt is.
#[tokio::test]
async fn every_data_key_call_takes_one_item_of_the_tenants_rate() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("a");
    let made = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    admin
        .update_tenant_policy(pb::UpdateTenantPolicyRequest {
            tenant_id: "acme".into(),
            policy: Some(pb::TenantPolicy {
                max_items_per_second: 1,
                burst: 3,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // A burst of 3: one call of each kind, then the fourth is refused.
    generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    decrypt_key(&mut crypto, "acme", &ctx, &made.wrapped_data_key)
        .await
        .unwrap();
    rewrap_key(&mut crypto, "acme", &ctx, &made.wrapped_data_key)
        .await
        .unwrap();
    let status = decrypt_key(&mut crypto, "acme", &ctx, &made.wrapped_data_key)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    sidecar.stop().await;
}

/// The gRPC metrics name the data-key calls like every other method (the
/// recorder of this test process, rendered as the admin listener would;
/// other tests of this binary may add to the counts, never take from them).
#[tokio::test]
async fn data_key_calls_are_metered_by_method_and_code() {
    let handle = keywarden::observe::metrics::install();
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme").await;
    let mut crypto = sidecar.crypto().await;
    let ctx = context("a");
    let made = generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    generate(&mut crypto, "acme", "", &ctx).await.unwrap();
    decrypt_key(&mut crypto, "acme", &context("b"), &made.wrapped_data_key)
        .await
        .unwrap_err();
    rewrap_key(&mut crypto, "acme", &ctx, &made.wrapped_data_key)
        .await
        .unwrap();
    let text = keywarden::observe::metrics::render(&handle);
    let handled = |method: &str, code: &str| -> f64 {
        let series = format!(
            "grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"keywarden.v1.Crypto\",\
             grpc_method=\"{method}\",grpc_code=\"{code}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(handled("GenerateDataKey", "OK") >= 2.0, "{text}");
    assert!(
        handled("DecryptDataKey", "INVALID_ARGUMENT") >= 1.0,
        "{text}"
    );
    assert!(handled("RewrapDataKey", "OK") >= 1.0, "{text}");
    assert!(!text.contains(&hex::encode(&made.data_key)));
    sidecar.stop().await;
}
