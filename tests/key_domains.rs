//! Key domains: no data-plane call can open or mint a key the sidecar stores
//! (docs/FORMAT.md, "How subject keys are stored"; docs/SECURITY.md 12.1).
//!
//! - The attack of the review at df0a846: a copy of a `subject_keys` row,
//!   taken before `ShredSubject`, sent to Decrypt with the context the row
//!   was sealed with, gave back the raw subject key; Encrypt with that
//!   context minted a row. Replayed here against every entry point, with a
//!   row in today's form and one in the legacy form, written by the
//!   keywarden of df0a846 (tests/data/legacy/, made by its make.sh).
//! - The upgrade: keystores written in the legacy form (SQLite and
//!   PostgreSQL) are rewrapped into the subject-key domain; every subject's
//!   data still decrypts, before, during and after, and no legacy row is
//!   left (in SQLite, not even its bytes in the file).

mod common;

use std::{collections::BTreeMap, path::Path, sync::Arc};

use keywarden::{
    api::pb::{
        self, crypto_client::CryptoClient, decrypt_stream_request::Part as DPart,
        encrypt_stream_request::Part as EPart,
    },
    client::Authed,
    envelope::{Context, Mode, text},
    error::Error,
    ids::{SubjectId, TenantId},
    keys::{KeyManager, KeySettings},
    kms::{KmsError, RootKeyProvider, local::LocalRootKey},
    store::{
        Keystore,
        postgres::{PostgresKeystore, PostgresOptions},
        sqlite::SqliteKeystore,
    },
};
use serde::Deserialize;
use sqlx::Connection;
use tonic::Code;

use common::{Options, TestSidecar, faults::Hooked};

type Crypto = CryptoClient<Authed>;

const RESERVED_MESSAGE: &str = "context: keys beginning with \"keywarden.\" are reserved";

fn legacy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/legacy")
}

/// The context a subject key row was sealed with before the subject-key
/// domain (and the one the attack sends).
fn row_context(subject_key_id: &[u8]) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("keywarden.purpose".to_owned(), "subject-key".to_owned()),
        ("keywarden.subject".to_owned(), hex::encode(subject_key_id)),
    ])
}

/// Every row of a SQLite keystore's `subject_keys`: (tenant, id, wrapped).
async fn sqlite_rows(path: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    sqlx::query_as("SELECT tenant_id, subject_key_id, wrapped FROM subject_keys ORDER BY 1, 2")
        .fetch_all(&mut db)
        .await
        .unwrap()
}

fn expect_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, message: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), message, "{status:?}");
}

const UNDECRYPTABLE: &str = "ciphertext could not be decrypted: it is malformed, was altered, or was made for another tenant or context";

/// Sends a copied row, as it is and with its suite byte rewritten to the
/// deterministic envelope's (0x04), to every entry point that opens data,
/// with the context it was sealed with (refused as reserved) and without
/// context (refused as undecryptable); and tries to mint a row through
/// every entry point that seals, randomized or deterministic. Nothing is
/// opened, nothing is minted.
async fn replay_the_attack(crypto: &mut Crypto, tenant: &str, id: &[u8], row: &[u8]) {
    let mut as_deterministic = row.to_vec();
    as_deterministic[1] = 0x04;
    for row in [row, &as_deterministic[..]] {
        replay_the_row(crypto, tenant, id, row).await;
    }
    for deterministic in [false, true] {
        try_to_mint(crypto, tenant, id, deterministic).await;
    }
}

/// Sends `row` to Decrypt, DecryptBatch, Rewrap and DecryptStream.
async fn replay_the_row(crypto: &mut Crypto, tenant: &str, id: &[u8], row: &[u8]) {
    for (context, message) in [
        (row_context(id), RESERVED_MESSAGE),
        (BTreeMap::new(), UNDECRYPTABLE),
        (
            BTreeMap::from([("purpose".to_owned(), "subject-key".to_owned())]),
            UNDECRYPTABLE,
        ),
    ] {
        expect_code(
            crypto
                .decrypt(pb::DecryptRequest {
                    tenant_id: tenant.into(),
                    context: context.clone(),
                    ciphertext: row.to_vec(),
                })
                .await,
            Code::InvalidArgument,
            message,
        );
        let batch = crypto
            .decrypt_batch(pb::DecryptBatchRequest {
                tenant_id: tenant.into(),
                items: vec![pb::DecryptItem {
                    context: context.clone(),
                    ciphertext: row.to_vec(),
                }],
            })
            .await
            .unwrap()
            .into_inner();
        match &batch.results[0].result {
            Some(pb::decrypt_result::Result::Error(e)) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(e.message, message);
            }
            other => panic!("a copied row opened in DecryptBatch: {other:?}"),
        }
        expect_code(
            crypto
                .rewrap(pb::RewrapRequest {
                    tenant_id: tenant.into(),
                    context: context.clone(),
                    ciphertext: row.to_vec(),
                })
                .await,
            Code::InvalidArgument,
            message,
        );
        let requests = vec![
            pb::DecryptStreamRequest {
                part: Some(DPart::Start(pb::DecryptStreamStart {
                    tenant_id: tenant.into(),
                    context: context.clone(),
                })),
            },
            pb::DecryptStreamRequest {
                part: Some(DPart::Chunk(row.to_vec())),
            },
        ];
        let answer = match crypto.decrypt_stream(tokio_stream::iter(requests)).await {
            Err(status) => Err(status),
            Ok(response) => {
                let mut stream = response.into_inner();
                let mut plaintext = Vec::new();
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => plaintext.extend(m.chunk),
                        Ok(None) => break Ok(plaintext),
                        Err(status) => break Err(status),
                    }
                }
            }
        };
        expect_code(answer, Code::InvalidArgument, message);
    }
}

/// Minting: the reserved context is refused by every entry point that
/// seals, so nothing can make a row-shaped ciphertext under it, whether
/// randomized or deterministic.
async fn try_to_mint(crypto: &mut Crypto, tenant: &str, id: &[u8], deterministic: bool) {
    let context = row_context(id);
    expect_code(
        crypto
            .encrypt(pb::EncryptRequest {
                tenant_id: tenant.into(),
                subject_id: String::new(),
                context: context.clone(),
                plaintext: vec![7; 32],
                deterministic,
                key_version: 0,
            })
            .await,
        Code::InvalidArgument,
        RESERVED_MESSAGE,
    );
    let batch = crypto
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: tenant.into(),
            items: vec![pb::EncryptItem {
                subject_id: String::new(),
                context: context.clone(),
                plaintext: vec![7; 32],
                deterministic,
                key_version: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    match &batch.results[0].result {
        Some(pb::encrypt_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert_eq!(e.message, RESERVED_MESSAGE);
        }
        other => panic!("EncryptBatch sealed under the reserved context: {other:?}"),
    }
    let requests = vec![
        pb::EncryptStreamRequest {
            part: Some(EPart::Start(pb::EncryptStreamStart {
                tenant_id: tenant.into(),
                subject_id: String::new(),
                context: context.clone(),
            })),
        },
        pb::EncryptStreamRequest {
            part: Some(EPart::Chunk(vec![7; 32])),
        },
    ];
    expect_code(
        crypto.encrypt_stream(tokio_stream::iter(requests)).await,
        Code::InvalidArgument,
        RESERVED_MESSAGE,
    );
    // Any key in the namespace, not just the two the legacy form used.
    expect_code(
        crypto
            .encrypt(pb::EncryptRequest {
                tenant_id: tenant.into(),
                subject_id: String::new(),
                context: BTreeMap::from([("keywarden.anything".to_owned(), String::new())]),
                plaintext: vec![],
                deterministic,
                key_version: 0,
            })
            .await,
        Code::InvalidArgument,
        RESERVED_MESSAGE,
    );
}

#[tokio::test]
async fn a_row_copied_before_a_subject_shred_opens_nowhere_and_nothing_mints_one() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut crypto = sidecar.crypto().await;
    let sealed = crypto
        .encrypt(pb::EncryptRequest {
            tenant_id: "acme".into(),
            subject_id: "ada@example.com".into(),
            context: BTreeMap::from([("table".to_owned(), "users".to_owned())]),
            plaintext: b"ada's record".to_vec(),
            deterministic: false,
            key_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // The copy (a backup, a replica, a WAL archive), taken before the shred.
    let rows = sqlite_rows(&sidecar.dir.path().join("keystore.sqlite3")).await;
    assert_eq!(rows.len(), 1);
    let (tenant, id, row) = rows.into_iter().next().unwrap();
    assert_eq!(tenant, "acme");
    // Today's form: suite 0x03, the subject-key domain.
    assert_eq!((row.len(), row[0], row[1], row[2]), (83, 0x01, 0x03, 0x01));
    admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "acme".into(),
            subject_id: "ada@example.com".into(),
        })
        .await
        .unwrap();
    replay_the_attack(&mut crypto, "acme", &id, &row).await;
    // The shredded subject's data stays shredded, and no attempt above
    // left a subject key behind.
    let status = crypto
        .decrypt(pb::DecryptRequest {
            tenant_id: "acme".into(),
            context: BTreeMap::from([("table".to_owned(), "users".to_owned())]),
            ciphertext: sealed.ciphertext,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .starts_with("the data subject's key in tenant acme was shredded at "),
        "{status:?}"
    );
    assert!(
        sqlite_rows(&sidecar.dir.path().join("keystore.sqlite3"))
            .await
            .is_empty()
    );
    sidecar.stop().await;
}

/// Issue 17: a blind-index key row (domain 0x02), copied from the keystore,
/// opens nowhere on the data plane and nothing there mints one; and a
/// subject key row is not an index key (nor the converse: domains differ).
#[tokio::test]
async fn a_copied_blind_index_key_row_opens_nowhere_and_nothing_mints_one() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut crypto = sidecar.crypto().await;
    let ask = pb::BlindIndexRequest {
        tenant_id: "acme".into(),
        context: BTreeMap::from([("column".to_owned(), "email".to_owned())]),
        values: vec![pb::IndexValue {
            value: b"ada@example.com".to_vec(),
            transformations: vec![],
        }],
        bits: 64,
        key_version: 0,
        all_versions: false,
    };
    let token = crypto.blind_index(ask.clone()).await.unwrap().into_inner();
    let path = sidecar.dir.path().join("keystore.sqlite3");
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    let (version, row): (i64, Vec<u8>) =
        sqlx::query_as("SELECT version, wrapped FROM blind_index_keys WHERE tenant_id = 'acme'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    drop(db);
    assert_eq!((row.len(), row[1], row[2]), (83, 0x03, 0x02));
    let binding = u32::try_from(version).unwrap().to_be_bytes();
    replay_the_attack(&mut crypto, "acme", &binding, &row).await;
    // A BlindIndex call with the reserved context is refused like the others.
    expect_code(
        crypto
            .blind_index(pb::BlindIndexRequest {
                context: row_context(&binding),
                ..ask.clone()
            })
            .await,
        Code::InvalidArgument,
        RESERVED_MESSAGE,
    );
    // Nothing above changed the index key.
    assert_eq!(
        crypto.blind_index(ask).await.unwrap().into_inner().tokens,
        token.tokens
    );
    sidecar.stop().await;
}

/// A ciphertext of the fixtures: made by the keywarden of df0a846.
#[derive(Deserialize)]
struct Fixture {
    tenant: String,
    subject: String,
    context: BTreeMap<String, String>,
    plaintext: String,
    ciphertext: String,
}

fn fixtures(name: &str) -> Vec<Fixture> {
    serde_json::from_slice(&std::fs::read(legacy_dir().join(name)).unwrap()).unwrap()
}

/// Copies a fixture file into `dir` (mode 0600, as keywarden wants its keys).
fn install(from: &str, dir: &Path, to: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(to);
    std::fs::copy(legacy_dir().join(from), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn a_legacy_row_copied_before_a_shred_opens_nowhere() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    install("sqlite-keystore.sqlite3", dir.path(), "keystore.sqlite3");
    install("root.key", dir.path(), "root.key");
    // The copy of alice's row at legacy-a, in the legacy form.
    let rows = sqlite_rows(&dir.path().join("keystore.sqlite3")).await;
    let legacy: Vec<_> = rows.iter().filter(|(_, _, w)| w[1] == 0x01).collect();
    assert_eq!(legacy.len(), rows.len(), "the fixture is all legacy rows");
    let sidecar = TestSidecar::start_in(dir.clone(), Options::default()).await;
    let mut crypto = sidecar.crypto().await;
    let mut admin = sidecar.admin().await;
    let alice = fixtures("sqlite-ciphertexts.json")
        .into_iter()
        .find(|f| f.tenant == "legacy-a" && f.subject == "alice")
        .unwrap();
    // It decrypts before the shred (the legacy form keeps working)...
    let opened = crypto
        .decrypt(pb::DecryptRequest {
            tenant_id: alice.tenant.clone(),
            context: alice.context.clone(),
            ciphertext: text::decode(&alice.ciphertext).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, alice.plaintext.as_bytes());
    admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "legacy-a".into(),
            subject_id: "alice".into(),
        })
        .await
        .unwrap();
    // ...and after it, no row of the copy opens, with the context it was
    // sealed with or without.
    for (tenant, id, row) in &legacy {
        replay_the_attack(&mut crypto, tenant, id, row).await;
    }
    sidecar.stop().await;
}

/// Decrypts every fixture ciphertext through `keys`: the shredded subject
/// (bob) answers as shredded, every other one gives its plaintext back.
async fn decrypt_all(keys: &KeyManager, fixtures: &[Fixture]) {
    for f in fixtures {
        let tenant = keys
            .active_tenant(&TenantId::parse("t", &f.tenant).unwrap())
            .await
            .unwrap();
        let context: Context = f.context.clone();
        let opened = keys
            .decrypt(&tenant, &context, &text::decode(&f.ciphertext).unwrap())
            .await;
        if f.subject == "bob" {
            assert!(
                matches!(opened, Err(Error::SubjectShredded { .. })),
                "{opened:?}"
            );
        } else {
            assert_eq!(
                &opened.unwrap().plaintext[..],
                f.plaintext.as_bytes(),
                "{} {}",
                f.tenant,
                f.subject
            );
        }
    }
}

/// A root key that is unavailable for `tenant`: an upgrade interrupted
/// there must leave its rows for the next run.
fn unavailable_for(root_key_file: &Path, tenant: &'static str) -> Arc<dyn RootKeyProvider> {
    Arc::new(Hooked {
        inner: Arc::new(LocalRootKey::load_or_create(root_key_file).unwrap().0),
        before_decrypt: Box::new(move |t| {
            let refused = t.as_str() == tenant;
            Box::pin(async move {
                if refused {
                    return Err(KmsError::Unavailable("injected".into()));
                }
                Ok(())
            })
        }),
    })
}

fn manager(root: Arc<dyn RootKeyProvider>, store: Arc<dyn Keystore>) -> KeyManager {
    KeyManager::new(
        root,
        store,
        keywarden::config::CacheConfig::default().limits(),
        KeySettings::default(),
    )
}

/// The upgrade on one keystore: interrupted (legacy-b's root key
/// unavailable), resumed, then run again with nothing left to do; every
/// subject decrypts before, in between and after.
async fn upgrade_and_check(
    store: Arc<dyn Keystore>,
    root_key_file: &Path,
    fixtures: &[Fixture],
) -> Vec<Vec<u8>> {
    let root = LocalRootKey::load_or_create(root_key_file).unwrap().0;
    let legacy_before: Vec<Vec<u8>> = store
        .legacy_subject_keys(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, _, record)| record.wrapped)
        .collect();
    // alice@a (v1), alice@b (v1), carol@a (v2); bob@a was shredded.
    assert_eq!(legacy_before.len(), 3);

    let interrupted = manager(unavailable_for(root_key_file, "legacy-b"), store.clone());
    let first = interrupted.upgrade_subject_keys().await.unwrap();
    assert_eq!((first.rewrapped, first.failed), (2, 1));
    let left = store.legacy_subject_keys(None, 100).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0.as_str(), "legacy-b");

    let keys = manager(Arc::new(root), store.clone());
    // In between, rows of both forms serve.
    decrypt_all(&keys, fixtures).await;
    let second = keys.upgrade_subject_keys().await.unwrap();
    assert_eq!((second.rewrapped, second.failed), (1, 0));
    assert!(
        store
            .legacy_subject_keys(None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let third = keys.upgrade_subject_keys().await.unwrap();
    assert_eq!(third, Default::default());
    // A fresh manager (no cache) opens every subject from the new rows.
    let fresh = manager(
        Arc::new(LocalRootKey::load_or_create(root_key_file).unwrap().0),
        store.clone(),
    );
    decrypt_all(&fresh, fixtures).await;
    // New data for an upgraded subject seals under the same key.
    let tenant = fresh
        .active_tenant(&TenantId::parse("t", "legacy-a").unwrap())
        .await
        .unwrap();
    let sealed = fresh
        .encrypt(
            &tenant,
            Some(&SubjectId::parse("s", "alice").unwrap()),
            &Context::new(),
            b"new",
            Mode::Randomized,
            0,
        )
        .await
        .unwrap();
    let old_alice = fixtures
        .iter()
        .find(|f| f.tenant == "legacy-a" && f.subject == "alice")
        .unwrap();
    assert_eq!(
        sealed.ciphertext[3..19],
        text::decode(&old_alice.ciphertext).unwrap()[3..19],
        "the same subject key id"
    );
    legacy_before
}

#[tokio::test]
async fn a_legacy_sqlite_keystore_is_upgraded_and_its_old_rows_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    install("sqlite-keystore.sqlite3", dir.path(), "keystore.sqlite3");
    install("root.key", dir.path(), "root.key");
    let path = dir.path().join("keystore.sqlite3");
    let store: Arc<dyn Keystore> = Arc::new(SqliteKeystore::open(&path).await.unwrap());
    let old_rows = upgrade_and_check(
        store.clone(),
        &dir.path().join("root.key"),
        &fixtures("sqlite-ciphertexts.json"),
    )
    .await;
    // Every row is in the subject-key domain now.
    for (_, _, wrapped) in sqlite_rows(&path).await {
        assert_eq!((wrapped.len(), wrapped[1]), (83, 0x03));
    }
    assert!(store.invariant_violations().await.unwrap().is_empty());
    drop(store);
    // And once the write-ahead log is checkpointed (SQLite does it every
    // 1000 pages, keywarden after every shred), the legacy rows' bytes are
    // not in the database files: secure_delete overwrote them.
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with("keystore") {
            files.push(std::fs::read(entry.path()).unwrap());
        }
    }
    for row in &old_rows {
        // The tag: 16 bytes no other row shares.
        let tag = &row[row.len() - 16..];
        for file in &files {
            assert!(
                !file.windows(tag.len()).any(|w| w == tag),
                "a legacy row's bytes are still in the keystore files"
            );
        }
    }
}

#[tokio::test]
async fn a_legacy_postgres_keystore_is_upgraded_and_its_old_rows_are_gone() {
    let url = common::postgres::fresh_database().await;
    // The keystore as the keywarden of df0a846 left it: schema version 3.
    let dump = std::fs::read_to_string(legacy_dir().join("postgres-keystore.sql")).unwrap();
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(&dump).execute(&mut db).await.unwrap();
    db.close().await.unwrap();
    // Opening it applies the migrations it lacks.
    let store: Arc<dyn Keystore> = Arc::new(
        PostgresKeystore::connect(&url, PostgresOptions::default())
            .await
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    install("postgres-root.key", dir.path(), "root.key");
    upgrade_and_check(
        store.clone(),
        &dir.path().join("root.key"),
        &fixtures("postgres-ciphertexts.json"),
    )
    .await;
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    let forms: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT get_byte(wrapped, 1), count(*) FROM subject_keys GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(forms, [(3, 3)]);
    assert!(store.invariant_violations().await.unwrap().is_empty());
}

/// The data-key calls (issue 17) against the same attacks: a copied
/// subject-key row, and the reserved context, refused by GenerateDataKey,
/// DecryptDataKey and RewrapDataKey; and the data-key kinds (a wrapped data
/// key, suite 0x05, and a client stream's header, suite 0x06) refused by
/// every data-plane reader, with the reserved context or without.
#[tokio::test]
async fn the_data_key_kinds_are_key_domains_of_their_own() {
    use keywarden::{
        envelope::{Provider, client_stream},
        secret::Key256,
    };
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut crypto = sidecar.crypto().await;
    crypto
        .encrypt(pb::EncryptRequest {
            tenant_id: "acme".into(),
            subject_id: "ada@example.com".into(),
            context: BTreeMap::new(),
            plaintext: b"x".to_vec(),
            deterministic: false,
            key_version: 0,
        })
        .await
        .unwrap();
    let rows = sqlite_rows(&sidecar.dir.path().join("keystore.sqlite3")).await;
    let (_, id, row) = rows.into_iter().next().unwrap();

    // A stored subject key is no wrapped data key, with the context it was
    // sealed with (reserved) or without; and no call mints one under the
    // reserved context.
    for (context, message) in [
        (row_context(&id), RESERVED_MESSAGE),
        (BTreeMap::new(), UNDECRYPTABLE),
    ] {
        expect_code(
            crypto
                .decrypt_data_key(pb::DecryptDataKeyRequest {
                    tenant_id: "acme".into(),
                    context: context.clone(),
                    wrapped_data_key: row.clone(),
                })
                .await,
            Code::InvalidArgument,
            message,
        );
        expect_code(
            crypto
                .rewrap_data_key(pb::RewrapDataKeyRequest {
                    tenant_id: "acme".into(),
                    context: context.clone(),
                    wrapped_data_key: row.clone(),
                })
                .await,
            Code::InvalidArgument,
            message,
        );
    }
    for subject in ["", "ada@example.com"] {
        expect_code(
            crypto
                .generate_data_key(pb::GenerateDataKeyRequest {
                    tenant_id: "acme".into(),
                    subject_id: subject.into(),
                    context: row_context(&id),
                })
                .await,
            Code::InvalidArgument,
            RESERVED_MESSAGE,
        );
    }

    // A wrapped data key and a client stream, each sent to every data-plane
    // reader as a copied row was.
    let made = crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            tenant_id: "acme".into(),
            subject_id: "ada@example.com".into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    replay_the_attack(&mut crypto, "acme", &id, &made.wrapped_data_key).await;
    let key = Key256::from_slice(&made.data_key).unwrap();
    let envelope = client_stream::seal(
        Provider::default(),
        &key,
        &made.wrapped_data_key,
        "acme",
        &Context::new(),
        b"object",
    )
    .unwrap();
    replay_the_attack(&mut crypto, "acme", &id, &envelope).await;
    sidecar.stop().await;
}
