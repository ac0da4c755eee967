//! What a PostgreSQL keystore keeps of a shredded tenant's wrapped keys, and
//! the operator's procedure that removes them from the server's data
//! directory (README, "Erasure on PostgreSQL"; docs/SECURITY.md §4.8 and
//! §12.7), against a real PostgreSQL server of the test's own, set up as in
//! production where it matters (`full_page_writes = on`, WAL segments
//! recycled by default).
//!
//! The test scans every file of the data directory (the heap under `base/`,
//! the WAL under `pg_wal/`, everything else) for the exact bytes of each
//! wrapped key, after each step.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use keywarden::{
    ids::{SubjectKeyId, TenantId},
    kms::WrappedKey,
    store::{
        Keystore, NewTenant, Placement, SubjectKeyRecord, TenantPolicy, UnixMillis,
        postgres::{PostgresKeystore, PostgresOptions},
    },
};
use sqlx::{Connection, PgConnection};

/// Bytes that stand for a wrapped key: random, so no other file holds them.
fn key_bytes() -> Vec<u8> {
    let mut bytes = vec![0u8; 60];
    getrandom::fill(&mut bytes).unwrap();
    bytes
}

/// The wrapped keys of one tenant: the subject-index key, version 1, three
/// subject keys and a blind-index key.
struct TenantKeys {
    id: TenantId,
    index: Vec<u8>,
    version: Vec<u8>,
    subjects: Vec<Vec<u8>>,
    blind_index: Vec<u8>,
}

/// Wrapped keys per tenant.
const KEYS: usize = 6;

impl TenantKeys {
    fn all(&self) -> Vec<&[u8]> {
        let mut all = vec![
            self.index.as_slice(),
            self.version.as_slice(),
            self.blind_index.as_slice(),
        ];
        all.extend(self.subjects.iter().map(Vec::as_slice));
        all
    }
}

async fn create(store: &Arc<PostgresKeystore>, id: &str) -> TenantKeys {
    let keys = TenantKeys {
        id: TenantId::parse("tenant_id", id).unwrap(),
        index: key_bytes(),
        version: key_bytes(),
        subjects: (0..3).map(|_| key_bytes()).collect(),
        blind_index: key_bytes(),
    };
    let wrapped = |bytes: &[u8]| WrappedKey {
        root_key_id: "local:0123456789abcdef".into(),
        ciphertext: bytes.to_vec(),
    };
    store
        .create_tenant(NewTenant {
            id: keys.id.clone(),
            created_at: UnixMillis(1_000),
            placement: Placement::shared(),
            policy: TenantPolicy::default(),
            first_key: wrapped(&keys.version),
            index_key: wrapped(&keys.index),
        })
        .await
        .unwrap();
    for (n, subject) in (1u8..).zip(&keys.subjects) {
        store
            .insert_subject_key(
                &keys.id,
                SubjectKeyId([n; 16]),
                SubjectKeyRecord {
                    wrapped: subject.clone(),
                    tenant_version: 1,
                },
                UnixMillis(2_000),
            )
            .await
            .unwrap();
    }
    assert!(
        store
            .add_blind_index_key(&keys.id, 1, &keys.blind_index, 1, UnixMillis(2_500))
            .await
            .unwrap()
    );
    keys
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Where the data directory holds any of `keys`: how many of them are in
/// the heap and other files outside `pg_wal/`, and how many in the WAL.
#[derive(Debug, PartialEq, Eq)]
struct Found {
    /// Keys (of those asked for) in at least one file outside `pg_wal/`.
    outside_wal: usize,
    /// Keys in at least one WAL segment.
    in_wal: usize,
    /// The files that hold any, relative to the data directory.
    files: Vec<String>,
}

fn scan(data: &Path, keys: &[&[u8]]) -> Found {
    let contents: Vec<(String, Vec<u8>)> = files(data)
        .into_iter()
        .filter_map(|path| {
            let bytes = std::fs::read(&path).ok()?;
            let relative = path.strip_prefix(data).unwrap().display().to_string();
            Some((relative, bytes))
        })
        .collect();
    let holds = |bytes: &[u8], key: &[u8]| memchr::memmem::find(bytes, key).is_some();
    let mut found = Found {
        outside_wal: 0,
        in_wal: 0,
        files: Vec::new(),
    };
    for key in keys {
        let mut outside = false;
        let mut wal = false;
        for (name, bytes) in &contents {
            if holds(bytes, key) {
                if name.starts_with("pg_wal/") {
                    wal = true;
                } else {
                    outside = true;
                }
                if !found.files.contains(name) {
                    found.files.push(name.clone());
                }
            }
        }
        found.outside_wal += usize::from(outside);
        found.in_wal += usize::from(wal);
    }
    found.files.sort();
    found
}

async fn sql(connection: &mut PgConnection, statement: &str) {
    let started = std::time::Instant::now();
    sqlx::raw_sql(statement)
        .execute(&mut *connection)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
    eprintln!("{statement}: {:?}", started.elapsed());
}

/// `command TABLE` for each table that holds wrapped keys.
async fn for_each_key_table(connection: &mut PgConnection, command: &str) {
    for table in ["tenants", "tenant_keys", "subject_keys", "blind_index_keys"] {
        sql(connection, &format!("{command} {table}")).await;
    }
}

/// Runs the README's procedure after a shred and shows, step by step, where
/// the shredded tenant's six wrapped keys are: a plain VACUUM leaves them in
/// the heap's free space, VACUUM FULL takes them out of the heap but not out
/// of the WAL, and a WAL switch and a checkpoint (with `wal_recycle = off`)
/// remove them from the data directory. The other tenant's keys stay.
#[tokio::test]
async fn the_readme_procedure_removes_a_shredded_tenants_keys_from_heap_and_wal() {
    let server = common::postgres::dedicated_with("-c full_page_writes=on");
    let data = server.data_dir();
    let url = server.fresh_database().await;
    let store = Arc::new(
        PostgresKeystore::connect(
            &url,
            PostgresOptions {
                migrate: true,
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let mut admin = PgConnection::connect(&url).await.unwrap();

    // The bystander first, so the victim's rows sit below it in each page
    // and its dead tuples are not overwritten when VACUUM compacts the page.
    let bystander = create(&store, "bystander").await;
    let victim = create(&store, "victim").await;
    let (victim_keys, bystander_keys) = (victim.all(), bystander.all());
    sql(&mut admin, "CHECKPOINT").await;
    let before = scan(&data, &victim_keys);
    eprintln!("before the shred: {before:?}");
    assert_eq!(
        (before.outside_wal, before.in_wal),
        (KEYS, KEYS),
        "{before:?}"
    );

    let shred = store
        .shred_tenant(&victim.id, UnixMillis(3_000))
        .await
        .unwrap();
    assert_eq!(
        (shred.destroyed_key_versions, shred.destroyed_subject_keys),
        (1, 3)
    );
    sql(&mut admin, "CHECKPOINT").await;
    let shredded = scan(&data, &victim_keys);
    eprintln!("after the shred and a checkpoint: {shredded:?}");
    assert_eq!(
        (shredded.outside_wal, shredded.in_wal),
        (KEYS, KEYS),
        "dead tuples hold every key: {shredded:?}"
    );

    // Plain VACUUM reclaims the dead tuples, but does not zero the space
    // they held.
    for_each_key_table(&mut admin, "VACUUM").await;
    sql(&mut admin, "CHECKPOINT").await;
    let vacuumed = scan(&data, &victim_keys);
    eprintln!("after VACUUM and a checkpoint: {vacuumed:?}");
    assert_eq!(vacuumed.in_wal, KEYS, "{vacuumed:?}");
    assert!(
        vacuumed.outside_wal >= 1,
        "the freed space still holds keys: {vacuumed:?}"
    );

    // The procedure. 1: WAL segments are deleted, not renamed for reuse.
    sql(&mut admin, "ALTER SYSTEM SET wal_recycle = off").await;
    sql(&mut admin, "SELECT pg_reload_conf()").await;
    // 2: the keystore's tables rewritten, without the dead tuples.
    for_each_key_table(&mut admin, "VACUUM FULL").await;
    sql(&mut admin, "CHECKPOINT").await;
    let rewritten = scan(&data, &victim_keys);
    eprintln!("after VACUUM FULL and a checkpoint: {rewritten:?}");
    assert_eq!(rewritten.outside_wal, 0, "{rewritten:?}");
    assert_eq!(
        rewritten.in_wal, KEYS,
        "the WAL still holds every key: {rewritten:?}"
    );

    // 3: a new WAL segment, and a checkpoint, which removes the segments
    // before it.
    sql(&mut admin, "SELECT pg_switch_wal()").await;
    sql(&mut admin, "CHECKPOINT").await;
    let removed = scan(&data, &victim_keys);
    eprintln!("after pg_switch_wal() and a checkpoint: {removed:?}");
    assert_eq!(
        removed,
        Found {
            outside_wal: 0,
            in_wal: 0,
            files: Vec::new()
        }
    );

    // The scan finds what is there: the bystander's keys, live in the heap.
    let live = scan(&data, &bystander_keys);
    assert_eq!(live.outside_wal, KEYS, "{live:?}");
    assert!(store.tenant(&bystander.id).await.unwrap().is_some());
    admin.close().await.unwrap();
}
