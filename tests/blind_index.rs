//! Blind indexes through real gRPC (issue 17): BlindIndex, BlindIndexBatch,
//! RotateIndexKey, RetireIndexKey, GetIndexKeys; the token format of
//! docs/FORMAT.md, "Blind indexes"; the key's own domain; shreds; the
//! `index` permission; every refusal.

mod common;

use std::{collections::BTreeMap, path::Path, time::Duration};

use keywarden::{
    api::pb::{self, crypto_client::CryptoClient, index_transformation::Kind},
    client::{self, Authed, Bearer},
    config::AuthConfig,
    store::{Keystore, sqlite::SqliteKeystore},
};
use secrecy::SecretString;
use sqlx::Connection;
use tonic::{Code, Status};

use common::{Options, TestSidecar, tokio_clock};

type Crypto = CryptoClient<Authed>;
type Admin = pb::admin_client::AdminClient<Authed>;

const DAY: u64 = 86_400;

/// Transformations as a test lists them: (kind, count).
type Steps = &'static [(Kind, u32)];

fn value(v: &[u8]) -> pb::IndexValue {
    pb::IndexValue {
        value: v.to_vec(),
        transformations: vec![],
    }
}

fn transformed(v: &str, steps: &[(Kind, u32)]) -> pb::IndexValue {
    pb::IndexValue {
        value: v.as_bytes().to_vec(),
        transformations: steps
            .iter()
            .map(|(kind, count)| pb::IndexTransformation {
                kind: *kind as i32,
                count: *count,
            })
            .collect(),
    }
}

fn field(column: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("table".to_owned(), "users".to_owned()),
        ("column".to_owned(), column.to_owned()),
    ])
}

fn request(tenant: &str, column: &str, values: Vec<pb::IndexValue>) -> pb::BlindIndexRequest {
    pb::BlindIndexRequest {
        tenant_id: tenant.into(),
        context: field(column),
        values,
        bits: 32,
        key_version: 0,
        all_versions: false,
    }
}

async fn index(c: &mut Crypto, r: pb::BlindIndexRequest) -> Result<pb::BlindIndexResponse, Status> {
    c.blind_index(r).await.map(tonic::Response::into_inner)
}

/// The one token of a BlindIndex call that must succeed.
async fn token(c: &mut Crypto, r: pb::BlindIndexRequest) -> Vec<u8> {
    let mut answer = index(c, r).await.unwrap();
    assert_eq!(answer.tokens.len(), 1);
    answer.tokens.remove(0)
}

async fn email(c: &mut Crypto, tenant: &str, v: &str) -> Vec<u8> {
    token(c, request(tenant, "email", vec![value(v.as_bytes())])).await
}

fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, message: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), message, "{status:?}");
}

async fn create(admin: &mut Admin, tenant: &str, policy: Option<pb::TenantPolicy>) {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: tenant.into(),
            policy,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn index_keys(admin: &mut Admin, tenant: &str) -> pb::IndexKeys {
    admin
        .get_index_keys(pb::GetIndexKeysRequest {
            tenant_id: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn versions(keys: &pb::IndexKeys) -> Vec<(u32, bool)> {
    keys.versions
        .iter()
        .map(|v| (v.version, v.retired))
        .collect()
}

#[tokio::test]
async fn tokens_are_stable_and_differ_across_tenants_fields_values_bits_and_restarts_keep_them() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    create(&mut admin, "globex", None).await;
    // No index key before the first BlindIndex: made on first use.
    assert_eq!(index_keys(&mut admin, "acme").await.primary_version, 0);
    let mut c = sidecar.crypto().await;
    let ada = email(&mut c, "acme", "ada@example.com").await;
    // [version 1]_32 || 32 bits of hash.
    assert_eq!(ada.len(), 8);
    assert_eq!(ada[..4], [0, 0, 0, 1]);
    assert_eq!(email(&mut c, "acme", "ada@example.com").await, ada);
    let keys = index_keys(&mut admin, "acme").await;
    assert_eq!(
        (keys.primary_version, versions(&keys)),
        (1, vec![(1, false)])
    );
    // Another tenant, another field, another value.
    assert_ne!(email(&mut c, "globex", "ada@example.com").await, ada);
    assert_ne!(
        token(
            &mut c,
            request("acme", "backup_email", vec![value(b"ada@example.com")])
        )
        .await,
        ada
    );
    assert_ne!(email(&mut c, "acme", "bob@example.com").await, ada);
    // Bits: the token's length follows, unused low bits are zero, and the
    // hash differs (bits are part of its input).
    for (bits, len) in [(8, 5), (12, 6), (16, 6), (63, 12), (256, 36)] {
        let t = token(
            &mut c,
            pb::BlindIndexRequest {
                bits,
                ..request("acme", "email", vec![value(b"ada@example.com")])
            },
        )
        .await;
        assert_eq!(t.len(), len, "{bits}");
        assert_eq!(t[..4], [0, 0, 0, 1]);
        let unused = (8 - bits % 8) % 8;
        assert_eq!(t[len - 1] & ((1u8 << unused) - 1), 0, "{bits}");
        assert_ne!(t[4..], ada[4..], "{bits}");
    }
    // The key is in the keystore, not only in this sidecar's cache: a
    // restarted sidecar answers the same tokens.
    let dir = sidecar.dir.clone();
    sidecar.stop().await;
    let restarted = TestSidecar::start_in(dir, Options::default()).await;
    let mut c = restarted.crypto().await;
    assert_eq!(email(&mut c, "acme", "ada@example.com").await, ada);
    restarted.stop().await;
}

#[tokio::test]
async fn every_transformation_matches_as_documented() {
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme", None).await;
    let mut c = sidecar.crypto().await;
    let one = |v: pb::IndexValue| request("acme", "name", vec![v]);
    // (what is stored, what is queried, the transformations): equal tokens
    // with them, different ones without.
    let cases: [(&str, &str, Steps); 7] = [
        ("Ada@Example.COM", "ada@example.com", &[(Kind::CaseFold, 0)]),
        ("Straße", "STRASSE", &[(Kind::CaseFold, 0)]),
        ("e\u{301}cole", "\u{e9}cole", &[(Kind::Nfc, 0)]),
        ("\u{fb01}le", "file", &[(Kind::Nfkc, 0)]),
        (" \t ada \u{3000}\n", "ada", &[(Kind::Trim, 0)]),
        ("4111 1111 1111 1234", "1234", &[(Kind::LastChars, 4)]),
        (
            "  ADA\u{301}  ",
            "ad\u{c1}",
            &[(Kind::Trim, 0), (Kind::Nfc, 0), (Kind::CaseFold, 0)],
        ),
    ];
    for (stored, queried, steps) in cases {
        let a = token(&mut c, one(transformed(stored, steps))).await;
        let b = token(&mut c, one(transformed(queried, steps))).await;
        assert_eq!(a, b, "{stored:?} vs {queried:?} under {steps:?}");
        let raw_a = token(&mut c, one(value(stored.as_bytes()))).await;
        let raw_b = token(&mut c, one(value(queried.as_bytes()))).await;
        assert_ne!(raw_a, raw_b, "{stored:?} vs {queried:?} without");
    }
    // The transformations are part of the hash input: a value that no step
    // changes still hashes differently with them; order matters.
    let plain = token(&mut c, one(value(b"abc"))).await;
    assert_ne!(
        token(&mut c, one(transformed("abc", &[(Kind::Nfc, 0)]))).await,
        plain
    );
    assert_ne!(
        token(
            &mut c,
            one(transformed(
                "XXß",
                &[(Kind::CaseFold, 0), (Kind::LastChars, 2)]
            ))
        )
        .await,
        token(
            &mut c,
            one(transformed(
                "XXß",
                &[(Kind::LastChars, 2), (Kind::CaseFold, 0)]
            ))
        )
        .await
    );
    // Last N counts Unicode scalar values, not bytes.
    assert_eq!(
        token(
            &mut c,
            one(transformed("h\u{e9}llo\u{1f511}", &[(Kind::LastChars, 2)]))
        )
        .await,
        token(
            &mut c,
            one(transformed("o\u{1f511}", &[(Kind::LastChars, 2)]))
        )
        .await
    );
    // Bytes that are not UTF-8 take no transformation, but hash as they are.
    token(&mut c, one(value(&[0xff, 0xfe]))).await;
    expect_code(
        index(
            &mut c,
            one(pb::IndexValue {
                value: vec![0xff, 0xfe],
                transformations: vec![pb::IndexTransformation {
                    kind: Kind::Nfc as i32,
                    count: 0,
                }],
            }),
        )
        .await,
        Code::InvalidArgument,
        "values: a value with transformations must be UTF-8 text",
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn a_compound_index_binds_every_value_in_order_without_ambiguity() {
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme", None).await;
    let mut c = sidecar.crypto().await;
    let compound = |values: &[&str]| {
        request(
            "acme",
            "last_name+birth_year",
            values.iter().map(|v| value(v.as_bytes())).collect(),
        )
    };
    let both = token(&mut c, compound(&["lovelace", "1815"])).await;
    assert_eq!(token(&mut c, compound(&["lovelace", "1815"])).await, both);
    assert_ne!(token(&mut c, compound(&["1815", "lovelace"])).await, both);
    assert_ne!(token(&mut c, compound(&["lovelace"])).await, both);
    assert_ne!(token(&mut c, compound(&["lovelace", "1816"])).await, both);
    // Values are length-prefixed: no two splits of one string collide.
    assert_ne!(
        token(&mut c, compound(&["ab", "c"])).await,
        token(&mut c, compound(&["a", "bc"])).await
    );
    assert_ne!(
        token(&mut c, compound(&["", "abc"])).await,
        token(&mut c, compound(&["abc", ""])).await
    );
    // Each value has its own transformations.
    let mixed = request(
        "acme",
        "last_name+birth_year",
        vec![
            transformed("LOVELACE", &[(Kind::CaseFold, 0)]),
            value(b"1815"),
        ],
    );
    let mixed_lower = request(
        "acme",
        "last_name+birth_year",
        vec![
            transformed("lovelace", &[(Kind::CaseFold, 0)]),
            value(b"1815"),
        ],
    );
    assert_eq!(token(&mut c, mixed).await, token(&mut c, mixed_lower).await);
    sidecar.stop().await;
}

/// A table of rows, each with its blind-index token as the app stored it.
struct Table {
    rows: Vec<(String, Vec<u8>)>,
}

impl Table {
    /// The rows a query for `v` finds: those whose stored token is one of
    /// the query tokens (every live version's).
    async fn find(&self, c: &mut Crypto, v: &str) -> Vec<String> {
        let tokens = index(
            c,
            pb::BlindIndexRequest {
                all_versions: true,
                ..request("acme", "email", vec![value(v.as_bytes())])
            },
        )
        .await
        .unwrap()
        .tokens;
        self.rows
            .iter()
            .filter(|(_, stored)| tokens.contains(stored))
            .map(|(row, _)| row.clone())
            .collect()
    }

    async fn every_row_is_found(&self, c: &mut Crypto) {
        for (row, _) in &self.rows {
            assert_eq!(self.find(c, row).await, vec![row.clone()], "{row}");
        }
    }
}

/// The request for user0's email token under `key_version` (0: primary),
/// for every live version with `all_versions`.
fn user0(key_version: u32, all_versions: bool) -> pb::BlindIndexRequest {
    pb::BlindIndexRequest {
        key_version,
        all_versions,
        ..request("acme", "email", vec![value(b"user0@example.com")])
    }
}

async fn retire(admin: &mut Admin, version: u32) -> Result<pb::IndexKeys, Status> {
    admin
        .retire_index_key(pb::RetireIndexKeyRequest {
            tenant_id: "acme".into(),
            version,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn rotation_with_a_reindex_in_between_finds_every_row_throughout() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    let mut c = sidecar.crypto().await;
    let mut table = Table { rows: Vec::new() };
    for i in 0..12 {
        let v = format!("user{i}@example.com");
        let t = email(&mut c, "acme", &v).await;
        table.rows.push((v, t));
    }
    table.every_row_is_found(&mut c).await;

    // Rotate: new tokens are made under version 2; queries ask for both.
    let rotated = admin
        .rotate_index_key(pb::RotateIndexKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.primary_version, 2);
    assert_eq!(versions(&rotated), vec![(1, false), (2, false)]);
    let both = index(&mut c, user0(0, true)).await.unwrap();
    assert_eq!(both.key_version, 2);
    assert_eq!(both.tokens.len(), 2);
    assert_eq!(both.tokens[0][..4], [0, 0, 0, 2]);
    assert_eq!(both.tokens[1], table.rows[0].1);
    // Versions differ in their hash, not only in their prefix.
    assert_ne!(both.tokens[0][4..], both.tokens[1][4..]);
    // Asked for version 1 alone: the stored token.
    assert_eq!(token(&mut c, user0(1, false)).await, table.rows[0].1);
    table.every_row_is_found(&mut c).await;

    // Re-index row by row (the primary's token), querying throughout; a
    // row inserted meanwhile gets the primary's token.
    for i in 0..table.rows.len() {
        let v = table.rows[i].0.clone();
        table.rows[i].1 = email(&mut c, "acme", &v).await;
        assert_eq!(table.rows[i].1[..4], [0, 0, 0, 2]);
        table.every_row_is_found(&mut c).await;
    }
    let late = "late@example.com".to_owned();
    let t = email(&mut c, "acme", &late).await;
    table.rows.push((late, t));
    table.every_row_is_found(&mut c).await;

    // Done: version 1 is retired and computes nothing; the primary cannot be.
    expect_code(
        retire(&mut admin, 2).await,
        Code::FailedPrecondition,
        "blind-index key version 2 is tenant acme's primary: rotate first",
    );
    let keystore = sidecar.dir.path().join("keystore.sqlite3");
    let version_1 = index_key_rows(&keystore).await[0].2.clone().unwrap();
    let retired = retire(&mut admin, 1).await.unwrap();
    assert_gone_from_the_files(sidecar.dir.path(), &[version_1]).await;
    assert_eq!(versions(&retired), vec![(1, true), (2, false)]);
    assert!(retired.versions[0].retired_at.is_some());
    // Idempotent.
    retire(&mut admin, 1).await.unwrap();
    table.every_row_is_found(&mut c).await;
    let only = index(&mut c, user0(0, true)).await.unwrap();
    assert_eq!(only.tokens.len(), 1);
    expect_code(
        index(&mut c, user0(1, false)).await,
        Code::FailedPrecondition,
        "tenant acme's blind-index key version 1 is retired",
    );
    expect_code(
        index(&mut c, user0(3, false)).await,
        Code::InvalidArgument,
        "key_version: tenant acme has no blind-index key version 3",
    );
    expect_code(
        retire(&mut admin, 7).await,
        Code::InvalidArgument,
        "version: tenant acme has no blind-index key version 7",
    );
    // The keystore is consistent.
    let store = SqliteKeystore::open(&keystore).await.unwrap();
    assert_eq!(
        store.invariant_violations().await.unwrap(),
        Vec::<String>::new()
    );
    sidecar.stop().await;
}

/// Every row of a SQLite keystore's `blind_index_keys`:
/// (tenant, version, wrapped, tenant version, created at).
async fn index_key_rows(path: &Path) -> Vec<(String, i64, Option<Vec<u8>>, Option<i64>, i64)> {
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    sqlx::query_as(
        "SELECT tenant_id, version, wrapped, tenant_version, created_at_ms \
         FROM blind_index_keys ORDER BY 1, 2",
    )
    .fetch_all(&mut db)
    .await
    .unwrap()
}

/// Asserts that no byte string of `wrapped` keys (by their 16-byte tags,
/// which no other row shares) is left in the SQLite keystore's files, after
/// a checkpoint of its WAL.
async fn assert_gone_from_the_files(dir: &Path, wrapped: &[Vec<u8>]) {
    let path = dir.join("keystore.sqlite3");
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_name().to_string_lossy().starts_with("keystore") {
            continue;
        }
        let file = std::fs::read(entry.path()).unwrap();
        for key in wrapped {
            let tag = &key[key.len() - 16..];
            assert!(
                !file.windows(tag.len()).any(|w| w == tag),
                "a destroyed index key's bytes are still in {}",
                entry.path().display()
            );
        }
    }
}

#[tokio::test]
async fn a_keystore_copy_taken_before_a_tenant_shred_yields_no_token() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    let mut c = sidecar.crypto().await;
    email(&mut c, "acme", "ada@example.com").await;
    let keystore = sidecar.dir.path().join("keystore.sqlite3");
    // The copy (a backup, a replica), taken before the shred.
    let copy = index_key_rows(&keystore).await;
    assert_eq!(copy.len(), 1);
    let wrapped = copy[0].2.clone().unwrap();
    // The stored-key wrap, domain 0x02, under tenant key version 1.
    assert_eq!(
        (wrapped.len(), wrapped[0], wrapped[1], wrapped[2]),
        (83, 0x01, 0x03, 0x02)
    );
    assert_eq!(wrapped[3..7], [0, 0, 0, 1]);
    // No data-plane call opens it.
    expect_code(
        c.decrypt(pb::DecryptRequest {
            tenant_id: "acme".into(),
            context: BTreeMap::new(),
            ciphertext: wrapped.clone(),
        })
        .await,
        Code::InvalidArgument,
        "ciphertext could not be decrypted: it is malformed, was altered, or was made for another tenant or context",
    );
    admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: "acme".into(),
            confirm: "acme".into(),
        })
        .await
        .unwrap();
    assert!(index_key_rows(&keystore).await.is_empty());
    assert_gone_from_the_files(sidecar.dir.path(), std::slice::from_ref(&wrapped)).await;
    let shredded = |status: Result<pb::BlindIndexResponse, Status>| {
        let status = status.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().starts_with("tenant acme was shredded at "),
            "{status:?}"
        );
    };
    shredded(
        index(
            &mut c,
            request("acme", "email", vec![value(b"ada@example.com")]),
        )
        .await,
    );
    // The copied row put back (a restore of that table): the tenant key
    // versions that wrapped it are gone, and nothing computes a token.
    {
        let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", keystore.display()))
            .await
            .unwrap();
        let (tenant, version, wrapped, tenant_version, created) = copy[0].clone();
        sqlx::query(
            "INSERT INTO blind_index_keys (tenant_id, version, wrapped, tenant_version, \
             created_at_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(tenant)
        .bind(version)
        .bind(wrapped)
        .bind(tenant_version)
        .bind(created)
        .execute(&mut db)
        .await
        .unwrap();
    }
    let store = SqliteKeystore::open(&keystore).await.unwrap();
    assert_eq!(
        store.invariant_violations().await.unwrap(),
        vec![
            "a shredded tenant still has key material: tenant acme".to_owned(),
            "a blind-index key is wrapped by a tenant key version that does not exist \
             (never made, or destroyed): tenant acme"
                .to_owned()
        ]
    );
    drop(store);
    for all_versions in [false, true] {
        shredded(
            index(
                &mut c,
                pb::BlindIndexRequest {
                    all_versions,
                    ..request("acme", "email", vec![value(b"ada@example.com")])
                },
            )
            .await,
        );
    }
    // Nor after a restart (no cache left).
    let dir = sidecar.dir.clone();
    sidecar.stop().await;
    let restarted = TestSidecar::start_in(dir, Options::default()).await;
    let mut c = restarted.crypto().await;
    shredded(
        index(
            &mut c,
            request("acme", "email", vec![value(b"ada@example.com")]),
        )
        .await,
    );
    let status = restarted
        .admin()
        .await
        .rotate_index_key(pb::RotateIndexKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    restarted.stop().await;
}

/// Waits (20 s at most) until tenant acme is as `done` says: the policy
/// scheduler has acted.
async fn until(admin: &mut Admin, done: impl Fn(&pb::Tenant) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let tenant = admin
            .get_tenant(pb::GetTenantRequest {
                tenant_id: "acme".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if done(&tenant) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{tenant:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn retention_moves_index_keys_off_a_tenant_key_version_before_destroying_it() {
    let sidecar = TestSidecar::start_with(Options {
        clock: Some(tokio_clock()),
        policy_interval: Some(Duration::from_secs(60)),
        ..Options::default()
    })
    .await;
    let mut admin = sidecar.admin().await;
    create(
        &mut admin,
        "acme",
        Some(pb::TenantPolicy {
            rotation_period_seconds: DAY,
            retention_seconds: 2 * DAY,
            ..Default::default()
        }),
    )
    .await;
    let mut c = sidecar.crypto().await;
    // Index key version 1, wrapped by tenant key version 1.
    let ada = email(&mut c, "acme", "ada@example.com").await;
    let keystore = sidecar.dir.path().join("keystore.sqlite3");
    assert_eq!(index_key_rows(&keystore).await[0].3, Some(1));
    for day in 1..=3u32 {
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(DAY + 120)).await;
        tokio::time::resume();
        until(&mut admin, |t| t.primary_version == day + 1).await;
    }
    // Version 1 is destroyed (day 3 passes its retention of 2 days); the
    // index key was moved first, and its tokens are unchanged.
    until(&mut admin, |t| t.destroyed_versions.contains(&1)).await;
    let rows = index_key_rows(&keystore).await;
    assert!(rows[0].3 != Some(1), "still wrapped by version 1");
    assert_eq!(email(&mut c, "acme", "ada@example.com").await, ada);
    let store = SqliteKeystore::open(&keystore).await.unwrap();
    assert_eq!(
        store.invariant_violations().await.unwrap(),
        Vec::<String>::new()
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn blind_index_needs_the_index_permission_which_the_data_role_grants() {
    let files = tempfile::tempdir().unwrap();
    let tokens: Vec<(String, SecretString)> = ["app", "writer", "indexer"]
        .iter()
        .map(|name| ((*name).to_owned(), keywarden::auth::tokens::generate()))
        .collect();
    let tokens_file = files.path().join("tokens.toml");
    std::fs::write(
        &tokens_file,
        tokens
            .iter()
            .map(|(name, token)| {
                format!(
                    "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\n",
                    hex::encode(keywarden::auth::tokens::hash(
                        secrecy::ExposeSecret::expose_secret(token)
                    ))
                )
            })
            .collect::<String>(),
    )
    .unwrap();
    let policy = files.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[grant]]\nidentity = \"token:app\"\nallow = [\"data\"]\ntenants = [\"acme\"]\n\
         [[grant]]\nidentity = \"token:writer\"\nallow = [\"encrypt\", \"decrypt\"]\ntenants = [\"*\"]\n\
         [[grant]]\nidentity = \"token:indexer\"\nallow = [\"index\"]\ntenants = [\"acme\"]\n\
         [[grant]]\nidentity = \"token:admin\"\nallow = [\"admin\"]\ntenants = [\"*\"]\n",
    )
    .unwrap();
    let sidecar = TestSidecar::start_with(Options {
        auth: AuthConfig {
            tokens_file: Some(tokens_file),
            policy_file: Some(policy),
            ..AuthConfig::default()
        },
        ..Options::default()
    })
    .await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    create(&mut admin, "globex", None).await;
    let as_token = |name: &str| {
        let token = tokens.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let channel = sidecar.channel();
        async move { client::crypto(channel.await, Bearer::new(Some(&token)).unwrap()) }
    };
    let ask = |tenant: &str| request(tenant, "email", vec![value(b"ada@example.com")]);
    let mut app = as_token("app").await;
    let mut indexer = as_token("indexer").await;
    let mut writer = as_token("writer").await;
    let t = token(&mut app, ask("acme")).await;
    assert_eq!(token(&mut indexer, ask("acme")).await, t);
    expect_code(
        index(&mut app, ask("globex")).await,
        Code::PermissionDenied,
        "token:app may not index for tenant globex",
    );
    expect_code(
        index(&mut writer, ask("acme")).await,
        Code::PermissionDenied,
        "token:writer may not index for any tenant",
    );
    expect_code(
        writer
            .blind_index_batch(pb::BlindIndexBatchRequest {
                tenant_id: "acme".into(),
                items: vec![],
            })
            .await,
        Code::PermissionDenied,
        "token:writer may not index for any tenant",
    );
    // `index` alone does not encrypt; the admin token (admin role only here)
    // does not index, and the data role does not rotate index keys.
    assert_eq!(
        indexer
            .encrypt(pb::EncryptRequest {
                tenant_id: "acme".into(),
                subject_id: String::new(),
                context: BTreeMap::new(),
                plaintext: b"x".to_vec(),
                deterministic: false,
                key_version: 0,
            })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    expect_code(
        index(&mut sidecar.crypto().await, ask("acme")).await,
        Code::PermissionDenied,
        "token:admin may not index for any tenant",
    );
    let app_token = tokens.iter().find(|(n, _)| n == "app").unwrap().1.clone();
    let mut app_admin = client::admin(
        sidecar.channel().await,
        Bearer::new(Some(&app_token)).unwrap(),
    );
    expect_code(
        app_admin
            .rotate_index_key(pb::RotateIndexKeyRequest {
                tenant_id: "acme".into(),
            })
            .await,
        Code::PermissionDenied,
        "token:app may not admin:rotate for any tenant",
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn bad_inputs_are_refused_before_any_key_is_made() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    let mut c = sidecar.crypto().await;
    let ok = || request("acme", "email", vec![value(b"ada@example.com")]);
    let refusals: Vec<(pb::BlindIndexRequest, &str)> = vec![
        (
            pb::BlindIndexRequest { bits: 0, ..ok() },
            "bits: is 0; it must be 8 to 256",
        ),
        (
            pb::BlindIndexRequest { bits: 7, ..ok() },
            "bits: is 7; it must be 8 to 256",
        ),
        (
            pb::BlindIndexRequest { bits: 257, ..ok() },
            "bits: is 257; it must be 8 to 256",
        ),
        (
            pb::BlindIndexRequest {
                values: vec![],
                ..ok()
            },
            "values: a token needs at least one value",
        ),
        (
            pb::BlindIndexRequest {
                values: vec![value(b"x"); 17],
                ..ok()
            },
            "values: more than 16; a token takes 1 to 16 values",
        ),
        (
            pb::BlindIndexRequest {
                context: BTreeMap::from([("keywarden.purpose".to_owned(), "x".to_owned())]),
                ..ok()
            },
            "context: keys beginning with \"keywarden.\" are reserved",
        ),
        (
            pb::BlindIndexRequest {
                key_version: 1,
                all_versions: true,
                ..ok()
            },
            "all_versions: is allowed only with key_version 0",
        ),
        (
            pb::BlindIndexRequest {
                values: vec![transformed("x", &[(Kind::Unspecified, 0)])],
                ..ok()
            },
            "transformations: kind must be NFC, NFKC, CASE_FOLD, TRIM or LAST_CHARS",
        ),
        (
            pb::BlindIndexRequest {
                values: vec![transformed("x", &[(Kind::LastChars, 0)])],
                ..ok()
            },
            "transformations: LAST_CHARS needs a count of 1 to 4096",
        ),
        (
            pb::BlindIndexRequest {
                values: vec![transformed("x", &[(Kind::LastChars, 4097)])],
                ..ok()
            },
            "transformations: LAST_CHARS needs a count of 1 to 4096",
        ),
        (
            pb::BlindIndexRequest {
                values: vec![transformed("x", &[(Kind::Nfc, 3)])],
                ..ok()
            },
            "transformations: count is for LAST_CHARS only",
        ),
        (
            pb::BlindIndexRequest {
                values: vec![transformed("x", &[(Kind::Nfc, 0); 9])],
                ..ok()
            },
            "transformations: more than 8 for one value",
        ),
    ];
    for (bad, message) in refusals {
        expect_code(index(&mut c, bad).await, Code::InvalidArgument, message);
    }
    // A value with transformations over 64 KiB, and one over the plaintext
    // limit.
    expect_code(
        index(
            &mut c,
            request(
                "acme",
                "email",
                vec![transformed(&"x".repeat((64 << 10) + 1), &[(Kind::Nfkc, 0)])],
            ),
        )
        .await,
        Code::InvalidArgument,
        "values: a value with transformations is at most 65536 bytes",
    );
    expect_code(
        index(
            &mut c,
            request("acme", "email", vec![value(&vec![b'x'; (4 << 20) + 1])]),
        )
        .await,
        Code::InvalidArgument,
        "values: is 4194305 bytes; the limit is 4194304 bytes",
    );
    // None of these made the tenant's index key.
    assert_eq!(index_keys(&mut admin, "acme").await.primary_version, 0);
    expect_code(
        index(&mut c, request("nobody", "email", vec![value(b"x")])).await,
        Code::NotFound,
        "tenant nobody does not exist",
    );
    assert_eq!(
        index(&mut c, request("bad id!", "email", vec![value(b"x")]))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    expect_code(
        retire(&mut admin, 0).await,
        Code::InvalidArgument,
        "version: must be 1 or more",
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn a_batch_answers_each_item_as_the_unary_call_would() {
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme", None).await;
    let mut c = sidecar.crypto().await;
    let item = |v: &str, bits: u32| pb::BlindIndexItem {
        context: field("email"),
        values: vec![value(v.as_bytes())],
        bits,
        key_version: 0,
        all_versions: false,
    };
    let answer = c
        .blind_index_batch(pb::BlindIndexBatchRequest {
            tenant_id: "acme".into(),
            items: vec![
                item("ada@example.com", 32),
                item("x", 3),
                item("bob@example.com", 64),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.results.len(), 3);
    let ok = |i: usize| match &answer.results[i].result {
        Some(pb::blind_index_result::Result::Ok(r)) => r.tokens[0].clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ok(0), email(&mut c, "acme", "ada@example.com").await);
    assert_eq!(
        ok(2),
        token(
            &mut c,
            pb::BlindIndexRequest {
                bits: 64,
                ..request("acme", "email", vec![value(b"bob@example.com")])
            }
        )
        .await
    );
    match &answer.results[1].result {
        Some(pb::blind_index_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert_eq!(e.message, "bits: is 3; it must be 8 to 256");
        }
        other => panic!("{other:?}"),
    }
    // Empty, and over the limit (checked as the request arrives).
    expect_code(
        c.blind_index_batch(pb::BlindIndexBatchRequest {
            tenant_id: "acme".into(),
            items: vec![],
        })
        .await,
        Code::InvalidArgument,
        "items: a batch needs at least one item",
    );
    expect_code(
        c.blind_index_batch(pb::BlindIndexBatchRequest {
            tenant_id: "acme".into(),
            items: vec![item("x", 32); 10_001],
        })
        .await,
        Code::InvalidArgument,
        "items: more than 10000 items; the limit is 10000 per batch",
    );
    sidecar.stop().await;
}

/// `keywarden` (the client commands) against `sidecar`, with its admin token.
async fn cli(sidecar: &TestSidecar, args: &[&str]) -> (bool, String, String) {
    let token =
        secrecy::ExposeSecret::expose_secret(sidecar.admin_token.as_ref().unwrap()).to_owned();
    let addr = sidecar.addr.clone();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let output = common::process::keywarden()
            .env("KEYWARDEN_DATA_DIR", "/nonexistent/keywarden-test")
            .env("KEYWARDEN_TOKEN", token)
            .arg("--addr")
            .arg(addr)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_cli_computes_tokens_and_rotates_retires_and_lists_index_keys() {
    let sidecar = TestSidecar::start().await;
    create(&mut sidecar.admin().await, "acme", None).await;
    let mut c = sidecar.crypto().await;
    let expected = token(
        &mut c,
        pb::BlindIndexRequest {
            bits: 48,
            ..request(
                "acme",
                "email",
                vec![transformed(
                    " ADA@Example.com",
                    &[(Kind::Trim, 0), (Kind::CaseFold, 0), (Kind::LastChars, 11)],
                )],
            )
        },
    )
    .await;
    let args = [
        "blind-index",
        "--tenant",
        "acme",
        "--context",
        "table=users",
        "--context",
        "column=email",
        "--bits",
        "48",
        "--transform",
        "trim",
        "--transform",
        "case-fold",
        "--transform",
        "last-chars:11",
        " ADA@Example.com",
    ];
    let (ok, out, err) = cli(&sidecar, &args).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("{}\n", hex::encode(&expected)));
    // A compound of two values.
    let compound = token(
        &mut c,
        request(
            "acme",
            "name+year",
            vec![value(b"lovelace"), value(b"1815")],
        ),
    )
    .await;
    let (ok, out, err) = cli(
        &sidecar,
        &[
            "blind-index",
            "--tenant",
            "acme",
            "--context",
            "table=users",
            "--context",
            "column=name+year",
            "lovelace",
            "1815",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("{}\n", hex::encode(&compound)));
    let (ok, out, err) = cli(&sidecar, &["index-key", "rotate", "--tenant", "acme"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("primary index key version: 2"), "{out}");
    let (ok, out, err) = cli(&sidecar, &[&args[..], &["--all-versions"]].concat()).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("00000002"), "{out}");
    assert_eq!(lines[1], hex::encode(&expected));
    let (ok, out, err) = cli(
        &sidecar,
        &["index-key", "retire", "--tenant", "acme", "--version", "1"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("version 1: retired at"), "{out}");
    let (ok, out, _) = cli(&sidecar, &["index-key", "list", "--tenant", "acme"]).await;
    assert!(ok);
    assert!(out.contains("version 2: live"), "{out}");
    // Errors as every client command prints them.
    let (ok, _, err) = cli(&sidecar, &[&args[..], &["--key-version", "1"]].concat()).await;
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "FAILED_PRECONDITION: tenant acme's blind-index key version 1 is retired"
    );
    let (ok, _, err) = cli(
        &sidecar,
        &[
            "blind-index",
            "--tenant",
            "acme",
            "--transform",
            "upper",
            "x",
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("expected nfc, nfkc, case-fold, trim or last-chars:N"),
        "{err}"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn min_decrypt_version_refuses_an_index_key_wrapped_by_an_older_version() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    let mut c = sidecar.crypto().await;
    // Index key version 1, wrapped by tenant key version 1.
    let before = email(&mut c, "acme", "ada@example.com").await;
    admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();
    assert_eq!(email(&mut c, "acme", "ada@example.com").await, before);
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
    // The cached index key is refused too: the check is at each use.
    expect_code(
        index(
            &mut c,
            request("acme", "email", vec![value(b"ada@example.com")]),
        )
        .await,
        Code::FailedPrecondition,
        "tenant acme's policy refuses a blind-index key wrapped by key version 1: its minimum \
         decryption version is 2",
    );
    // A new index key version is wrapped by the primary, and computes.
    admin
        .rotate_index_key(pb::RotateIndexKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();
    let after = email(&mut c, "acme", "ada@example.com").await;
    assert_ne!(after, before);
    assert_eq!(after[..4], 2u32.to_be_bytes());
    // all_versions still includes version 1, and so is refused.
    let mut all = request("acme", "email", vec![value(b"ada@example.com")]);
    all.all_versions = true;
    assert_eq!(
        index(&mut c, all).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn the_work_of_transformations_is_bounded_per_value_and_per_call() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    let mut c = sidecar.crypto().await;
    // U+FDFA is 3 bytes that NFKC turns into 33: 6 KiB of it would pass
    // 64 KiB in one step, and is refused as it does.
    let expanding = "\u{fdfa}".repeat(2048);
    expect_code(
        index(
            &mut c,
            request(
                "acme",
                "name",
                vec![transformed(&expanding, &[(Kind::Nfkc, 0)])],
            ),
        )
        .await,
        Code::InvalidArgument,
        "values: a transformation made a value longer than 65536 bytes",
    );
    // Within the cap, eight steps over the expanded text read about 240
    // KiB a value: a batch's items are served until the call's 4 MiB are
    // read, and every later item is refused on its own.
    let fits = "\u{fdfa}".repeat(1024);
    let steps = [
        (Kind::Nfkc, 0),
        (Kind::CaseFold, 0),
        (Kind::Nfkc, 0),
        (Kind::CaseFold, 0),
        (Kind::Nfc, 0),
        (Kind::Nfkc, 0),
        (Kind::Trim, 0),
        (Kind::CaseFold, 0),
    ];
    let item = pb::BlindIndexItem {
        context: field("name"),
        values: vec![transformed(&fits, &steps)],
        bits: 32,
        ..Default::default()
    };
    let results = c
        .blind_index_batch(pb::BlindIndexBatchRequest {
            tenant_id: "acme".into(),
            items: vec![item; 40],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let served = results
        .iter()
        .take_while(|r| matches!(r.result, Some(pb::blind_index_result::Result::Ok(_))))
        .count();
    let per_value = fits.len() + 7 * 33 * 1024;
    assert_eq!(served, (4 << 20) / per_value, "{results:?}");
    for refused in &results[served..] {
        match &refused.result {
            Some(pb::blind_index_result::Result::Error(e)) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(
                    e.message,
                    "values: the transformations of one call read at most 4194304 bytes of text"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // The next call has a budget of its own.
    index(
        &mut c,
        request("acme", "name", vec![transformed(&fits, &steps)]),
    )
    .await
    .unwrap();
    sidecar.stop().await;
}

#[tokio::test]
async fn a_value_over_the_tenant_policys_size_limit_is_resource_exhausted() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(
        &mut admin,
        "acme",
        Some(pb::TenantPolicy {
            max_plaintext_bytes: 4,
            ..Default::default()
        }),
    )
    .await;
    let mut c = sidecar.crypto().await;
    index(&mut c, request("acme", "pin", vec![value(b"1234")]))
        .await
        .unwrap();
    expect_code(
        index(&mut c, request("acme", "pin", vec![value(b"12345")])).await,
        Code::ResourceExhausted,
        "a value is 5 bytes; tenant acme's policy allows 4",
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn a_tenant_holds_at_most_eight_live_index_key_versions() {
    let sidecar = TestSidecar::start().await;
    let mut admin = sidecar.admin().await;
    create(&mut admin, "acme", None).await;
    let mut c = sidecar.crypto().await;
    email(&mut c, "acme", "ada@example.com").await;
    let rotate = |admin: &mut Admin| {
        let mut admin = admin.clone();
        async move {
            admin
                .rotate_index_key(pb::RotateIndexKeyRequest {
                    tenant_id: "acme".into(),
                })
                .await
        }
    };
    for _ in 2..=8 {
        rotate(&mut admin).await.unwrap();
    }
    expect_code(
        rotate(&mut admin).await,
        Code::FailedPrecondition,
        "tenant acme has 8 live blind-index key versions, the most it may hold: retire an old \
         one first",
    );
    retire(&mut admin, 1).await.unwrap();
    rotate(&mut admin).await.unwrap();
    let keys = index_keys(&mut admin, "acme").await;
    assert_eq!(keys.primary_version, 9);
    sidecar.stop().await;
}
