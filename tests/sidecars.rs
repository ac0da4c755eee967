//! Many sidecars, one keystore: separate `keywarden serve` processes sharing
//! a real PostgreSQL (started by the harness from the system's binaries), with
//! cache TTLs of 5 minutes, so only LISTEN/NOTIFY can explain what they see.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use common::{
    postgres,
    process::{Client, Sidecar},
};
use keywarden::{
    api::pb,
    store::{
        Keystore,
        postgres::{PostgresKeystore, PostgresOptions},
    },
};
use tonic::Code;

/// A sidecar on PostgreSQL at `url`, with a cache TTL of 5 minutes and a data
/// directory of its own (its audit log) under `root_dir`, holding a copy of
/// one local root key that every sidecar of the test shares.
fn sidecar(root_dir: &Path, name: &str, url: &str) -> Sidecar {
    let shared_key = root_dir.join("root.key");
    if !shared_key.exists() {
        keywarden::secret::load_or_create_key_file(&shared_key).unwrap();
    }
    let data_dir = root_dir.join(name);
    std::fs::create_dir_all(&data_dir).unwrap();
    let key = data_dir.join("root.key");
    if !key.exists() {
        std::fs::copy(&shared_key, &key).unwrap();
    }
    let socket = root_dir.join(format!("{name}.sock"));
    Sidecar::start_with_env(
        &data_dir,
        &socket,
        &[
            ("KEYWARDEN_STORE_BACKEND", "postgres"),
            ("KEYWARDEN_DATABASE_URL", url),
            ("KEYWARDEN_CACHE_TTL_SECONDS", "300"),
            ("KEYWARDEN_CACHE_TTI_SECONDS", "300"),
        ],
    )
}

async fn channel(sidecar: &Sidecar) -> Client {
    sidecar.client().await
}

async fn create(channel: &Client, tenant: &str) {
    channel
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: tenant.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn encrypt(
    channel: &Client,
    tenant: &str,
    plaintext: &[u8],
) -> Result<pb::EncryptResponse, tonic::Status> {
    channel
        .crypto()
        .encrypt(pb::EncryptRequest {
            tenant_id: tenant.into(),
            plaintext: plaintext.to_vec(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn decrypt(
    channel: &Client,
    tenant: &str,
    ciphertext: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    channel
        .crypto()
        .decrypt(pb::DecryptRequest {
            tenant_id: tenant.into(),
            context: BTreeMap::new(),
            ciphertext: ciphertext.to_vec(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

async fn shred(channel: &Client, tenant: &str) {
    channel
        .admin()
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: tenant.into(),
            confirm: tenant.into(),
        })
        .await
        .unwrap();
}

/// Polls Encrypt until the tenant is refused as shredded; answers how long
/// that took. Fails after `limit`.
async fn time_until_refused(
    channel: &Client,
    tenant: &str,
    since: Instant,
    limit: Duration,
) -> Duration {
    loop {
        match encrypt(channel, tenant, b"probe").await {
            Err(status) if status.code() == Code::FailedPrecondition => return since.elapsed(),
            Err(status) => panic!("unexpected {status:?}"),
            Ok(_) => {
                assert!(
                    since.elapsed() < limit,
                    "{tenant} still served {limit:?} after its shred"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn assert_invariants(url: &str) {
    let store = PostgresKeystore::connect(url, PostgresOptions::default())
        .await
        .unwrap();
    assert_eq!(
        store.invariant_violations().await.unwrap(),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_share_tenants_and_a_shred_reaches_the_others_within_a_second() {
    let url = postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars: Vec<Sidecar> = ["one", "two", "three"]
        .iter()
        .map(|n| sidecar(dir.path(), n, &url))
        .collect();
    let (one, two, three) = (
        channel(&sidecars[0]).await,
        channel(&sidecars[1]).await,
        channel(&sidecars[2]).await,
    );

    // Created through the first, encrypted through the second, decrypted through the third.
    create(&one, "shared").await;
    let sealed = encrypt(&two, "shared", b"across sidecars").await.unwrap();
    assert_eq!(
        decrypt(&three, "shared", &sealed.ciphertext).await.unwrap(),
        b"across sidecars"
    );

    // 100 shreds through the first; the others had the tenant cached (TTL 5 min).
    let mut delays = Vec::new();
    for i in 0..100 {
        let tenant = format!("shred-{i:03}");
        create(&one, &tenant).await;
        encrypt(&two, &tenant, b"warm").await.unwrap();
        encrypt(&three, &tenant, b"warm").await.unwrap();
        shred(&one, &tenant).await;
        let since = Instant::now();
        let (a, b) = tokio::join!(
            time_until_refused(&two, &tenant, since, Duration::from_secs(1)),
            time_until_refused(&three, &tenant, since, Duration::from_secs(1)),
        );
        delays.extend([a, b]);
    }
    delays.sort();
    let (p50, p99, max) = (
        percentile(&delays, 0.50),
        percentile(&delays, 0.99),
        delays[delays.len() - 1],
    );
    println!(
        "shred propagation over {} observations (100 shreds x 2 sidecars): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        delays.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    assert!(max < Duration::from_secs(1), "max {max:?}");
    assert_invariants(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_rotating_one_tenant_make_consecutive_versions_and_every_ciphertext_decrypts()
{
    let url = postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        sidecar(dir.path(), "a", &url),
        sidecar(dir.path(), "b", &url),
    );
    let (ca, cb) = (channel(&a).await, channel(&b).await);
    create(&ca, "busy").await;

    let rotate_50 = |c: Client| async move {
        let mut done = 0;
        while done < 50 {
            match c
                .admin()
                .rotate_tenant_key(pb::RotateTenantKeyRequest {
                    tenant_id: "busy".into(),
                })
                .await
            {
                Ok(_) => done += 1,
                // Lost too many races in a row: the caller retries, as documented.
                Err(status) if status.code() == Code::Aborted => {}
                Err(status) => panic!("{status:?}"),
            }
        }
    };
    let encrypting = {
        let (ca, cb) = (ca.clone(), cb.clone());
        tokio::spawn(async move {
            let mut made = Vec::new();
            for i in 0..200 {
                let c = if i % 2 == 0 { &ca } else { &cb };
                let plaintext = format!("during rotation {i}").into_bytes();
                made.push((
                    plaintext.clone(),
                    encrypt(c, "busy", &plaintext).await.unwrap().ciphertext,
                ));
            }
            made
        })
    };
    tokio::join!(rotate_50(ca.clone()), rotate_50(cb.clone()));
    let made = encrypting.await.unwrap();

    let tenant = ca
        .admin()
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "busy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<u32> = tenant.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, (1..=101).collect::<Vec<_>>());
    assert_eq!(tenant.primary_version, 101);
    for (plaintext, ciphertext) in &made {
        assert_eq!(&decrypt(&cb, "busy", ciphertext).await.unwrap(), plaintext);
        assert_eq!(&decrypt(&ca, "busy", ciphertext).await.unwrap(), plaintext);
    }
    assert_invariants(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_postgres_restart_cached_keys_serve_admin_is_unavailable_and_everything_recovers()
{
    let server = postgres::dedicated();
    let url = server.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (s1, s2, s3) = (
        sidecar(dir.path(), "one", &url),
        sidecar(dir.path(), "two", &url),
        sidecar(dir.path(), "three", &url),
    );
    let (one, two, three) = (channel(&s1).await, channel(&s2).await, channel(&s3).await);
    create(&one, "steady").await;
    create(&one, "later-gone").await;
    let sealed = encrypt(&two, "steady", b"through the outage")
        .await
        .unwrap();
    for c in [&one, &two, &three] {
        encrypt(c, "steady", b"warm").await.unwrap();
    }

    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    // Cached keys keep serving.
    for c in [&one, &two, &three] {
        encrypt(c, "steady", b"during").await.unwrap();
        assert_eq!(
            decrypt(c, "steady", &sealed.ciphertext).await.unwrap(),
            b"through the outage"
        );
    }
    // Admin calls need the keystore.
    let status = one
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "during-outage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert_eq!(status.message(), "the keystore is unavailable; retry later");

    let server = tokio::task::spawn_blocking(move || {
        server.start();
        server
    })
    .await
    .unwrap();
    // Every listener reconnects (and resynchronizes) on its own.
    let deadline = Instant::now() + Duration::from_secs(20);
    for s in [&s1, &s2, &s3] {
        while s.log().matches("listening for keystore events").count() < 2 {
            assert!(
                Instant::now() < deadline,
                "a listener did not reconnect:\n{}",
                s.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Admin works again, without a sidecar restart.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match one
            .admin()
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: "after-outage".into(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    // A shred after the outage reaches the others through the new listeners.
    encrypt(&two, "later-gone", b"warm").await.unwrap();
    encrypt(&three, "later-gone", b"warm").await.unwrap();
    shred(&one, "later-gone").await;
    let since = Instant::now();
    time_until_refused(&two, "later-gone", since, Duration::from_secs(1)).await;
    time_until_refused(&three, "later-gone", since, Duration::from_secs(1)).await;
    assert_invariants(&url).await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_while_rotating_and_shredding_leaves_the_keystore_consistent() {
    let url = postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let victim = sidecar(dir.path(), "victim", &url);
    let c = channel(&victim).await;
    for i in 0..40 {
        create(&c, &format!("t{i:02}")).await;
        encrypt(&c, &format!("t{i:02}"), b"x").await.unwrap();
    }
    // Rotations, subject keys and shreds in flight from several tasks...
    let mut work = Vec::new();
    for i in 0..40 {
        let c = c.clone();
        work.push(tokio::spawn(async move {
            let tenant = format!("t{i:02}");
            for round in 0..20 {
                let _ = c
                    .admin()
                    .rotate_tenant_key(pb::RotateTenantKeyRequest {
                        tenant_id: tenant.clone(),
                    })
                    .await;
                let _ = c
                    .crypto()
                    .encrypt(pb::EncryptRequest {
                        tenant_id: tenant.clone(),
                        subject_id: format!("s{round}"),
                        plaintext: b"y".to_vec(),
                        ..Default::default()
                    })
                    .await;
                if round == 10 && i % 2 == 0 {
                    let _ = c
                        .admin()
                        .shred_tenant(pb::ShredTenantRequest {
                            tenant_id: tenant.clone(),
                            confirm: tenant.clone(),
                        })
                        .await;
                }
            }
        }));
    }
    // ...and the sidecar dies mid-way.
    tokio::time::sleep(Duration::from_millis(700)).await;
    victim.kill();
    for w in work {
        let _ = w.await;
    }
    assert_invariants(&url).await;
    // A new sidecar takes over the same keystore and serves.
    let heir = sidecar(dir.path(), "heir", &url);
    let c = channel(&heir).await;
    c.admin()
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "t01".into(),
        })
        .await
        .unwrap();
    assert_invariants(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_migrations_refuses_an_unmigrated_keystore_and_changes_nothing() {
    let url = postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("KEYWARDEN_STORE_BACKEND", "postgres"),
        ("KEYWARDEN_DATABASE_URL", url.as_str()),
    ];
    let output = common::process::keywarden()
        .envs(env)
        .args(["serve", "--check-migrations", "--listen"])
        .arg(format!("unix:{}", dir.path().join("k.sock").display()))
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not migrated"), "{stderr}");
    assert!(
        !stderr.contains(&url),
        "the database URL must not be printed: {stderr}"
    );
    // Nothing was created: the schema is still absent.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert_eq!(tables, 0);

    // Once a sidecar has migrated, a checking sidecar starts.
    sidecar(dir.path(), "migrator", &url).terminate();
    let checker = Sidecar::start_with_env(
        dir.path(),
        &dir.path().join("checker.sock"),
        &[
            ("KEYWARDEN_STORE_BACKEND", "postgres"),
            ("KEYWARDEN_DATABASE_URL", &url),
            ("KEYWARDEN_STORE_MIGRATE", "false"),
        ],
    );
    create(&channel(&checker).await, "fine").await;
}

/// Runs `keywarden audit verify --postgres` against `url`.
fn verify_postgres_audit(url: &str) -> (Option<i32>, String) {
    let output = common::process::keywarden()
        .env("KEYWARDEN_DATABASE_URL", url)
        .args(["audit", "verify", "--postgres"])
        .output()
        .unwrap();
    (
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_write_one_audit_chain_into_postgres_and_tampering_is_named() {
    let url = postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let data_dir = dir.path().join(name);
        std::fs::create_dir_all(&data_dir).unwrap();
        let shared_key = dir.path().join("root.key");
        if !shared_key.exists() {
            keywarden::secret::load_or_create_key_file(&shared_key).unwrap();
        }
        std::fs::copy(&shared_key, data_dir.join("root.key")).unwrap();
        Sidecar::start_with_env(
            &data_dir,
            &dir.path().join(format!("{name}.sock")),
            &[
                ("KEYWARDEN_STORE_BACKEND", "postgres"),
                ("KEYWARDEN_DATABASE_URL", &url),
                ("KEYWARDEN_AUDIT_SINK", "postgres"),
            ],
        )
    };
    let (one, two) = (start("one"), start("two"));
    let (c1, c2) = (channel(&one).await, channel(&two).await);
    // Interleaved admin calls from both sidecars, some concurrent.
    let mut calls = Vec::new();
    for i in 0..10 {
        let (a, b) = (c1.clone(), c2.clone());
        calls.push(tokio::spawn(async move {
            create(&a, &format!("a{i}")).await;
            create(&b, &format!("b{i}")).await;
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    shred(&c2, "a0").await;
    // One refused call is recorded too.
    let refused = c1
        .admin()
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);

    let (code, text) = verify_postgres_audit(&url);
    assert_eq!(code, Some(0), "{text}");
    // 20 creates + 1 shred + 1 get, each asked and answered.
    assert!(text.contains("ok: 44 records, chain intact"), "{text}");
    assert!(!text.contains(&url));
    let head = c1
        .admin()
        .get_audit_head(pb::GetAuditHeadRequest {})
        .await
        .unwrap()
        .into_inner();
    // The head counts the 44 and this call's own "asked" record.
    assert_eq!(head.records, 45);
    assert_eq!(head.head.len(), 64);

    // The table is append-only, even for the sidecars' own role.
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let edit =
        sqlx::query("UPDATE audit_log SET record = replace(record, 'a1', 'a9') WHERE seq = 5")
            .execute(&mut db)
            .await
            .unwrap_err();
    assert!(edit.to_string().contains("append-only"), "{edit}");
    let delete = sqlx::query("DELETE FROM audit_log WHERE seq = 5")
        .execute(&mut db)
        .await
        .unwrap_err();
    assert!(delete.to_string().contains("append-only"), "{delete}");

    // The table's owner can drop the guard; verify still names the record.
    sqlx::query("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE audit_log SET record = replace(record, 'token:admin', 'token:other') WHERE seq = 6",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let (code, text) = verify_postgres_audit(&url);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("broken at line 6"), "{text}");
    one.terminate();
    two.terminate();
}

/// A stream open on one sidecar ends when another sidecar shreds its
/// tenant: the shred's event wakes it (docs/SECURITY.md 12.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_on_one_sidecar_ends_when_another_shreds_its_tenant() {
    use keywarden::api::pb::decrypt_stream_request::Part as DPart;
    use keywarden::api::pb::encrypt_stream_request::Part as EPart;
    let url = postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        sidecar(dir.path(), "a", &url),
        sidecar(dir.path(), "b", &url),
    );
    let (ca, cb) = (channel(&a).await, channel(&b).await);
    create(&ca, "acme").await;
    // A 1 MiB streaming envelope, made on b.
    let mut sealed = cb
        .crypto()
        .encrypt_stream(tokio_stream::iter([
            pb::EncryptStreamRequest {
                part: Some(EPart::Start(pb::EncryptStreamStart {
                    tenant_id: "acme".into(),
                    ..Default::default()
                })),
            },
            pb::EncryptStreamRequest {
                part: Some(EPart::Chunk(vec![3; 1 << 20])),
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut envelope = Vec::new();
    while let Some(m) = sealed.message().await.unwrap() {
        envelope.extend(m.chunk);
    }
    // b opens it slowly; a shreds the tenant meanwhile.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::DecryptStreamRequest {
        part: Some(DPart::Start(pb::DecryptStreamStart {
            tenant_id: "acme".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    tx.send(pb::DecryptStreamRequest {
        part: Some(DPart::Chunk(envelope[..100_000].to_vec())),
    })
    .await
    .unwrap();
    let mut opened = cb
        .crypto()
        .decrypt_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(!opened.message().await.unwrap().unwrap().chunk.is_empty());
    shred(&ca, "acme").await;
    // No more input is needed for the stream to end: the event wakes it.
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match opened.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended OK after the shred"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the stream ends soon after the shred on the other sidecar");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().starts_with("tenant acme was shredded at "),
        "{status:?}"
    );
    drop(tx);
}

/// Issue 17: blind-index keys shared through PostgreSQL. Two sidecars making
/// a tenant's first index key at once agree on one key; a rotation, a
/// retirement and a shred on one reach the other's cache (TTL 5 min) within
/// a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_share_blind_index_keys_and_see_each_others_rotations_and_shreds() {
    let url = postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        sidecar(dir.path(), "a", &url),
        sidecar(dir.path(), "b", &url),
    );
    let (ca, cb) = (channel(&a).await, channel(&b).await);
    create(&ca, "idx").await;
    let ask = |key_version: u32, all_versions: bool| pb::BlindIndexRequest {
        tenant_id: "idx".into(),
        context: BTreeMap::from([("column".to_owned(), "email".to_owned())]),
        values: vec![pb::IndexValue {
            value: b"ada@example.com".to_vec(),
            transformations: vec![],
        }],
        bits: 64,
        key_version,
        all_versions,
    };
    let tokens = |c: Client, key_version: u32, all_versions: bool| async move {
        c.crypto()
            .blind_index(ask(key_version, all_versions))
            .await
            .map(|r| r.into_inner().tokens)
    };
    // The first BlindIndex on both at once: one index key wins.
    let (ta, tb) = tokio::join!(tokens(ca.clone(), 0, false), tokens(cb.clone(), 0, false));
    let (ta, tb) = (ta.unwrap(), tb.unwrap());
    assert_eq!(ta, tb);
    assert_eq!(ta[0][..4], [0, 0, 0, 1]);

    /// Polls `check` on b until it holds; fails after a second.
    async fn within_a_second<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let since = Instant::now();
        while !check().await {
            assert!(since.elapsed() < Duration::from_secs(1), "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    ca.admin()
        .rotate_index_key(pb::RotateIndexKeyRequest {
            tenant_id: "idx".into(),
        })
        .await
        .unwrap();
    within_a_second("b did not see the rotation", || {
        let cb = cb.clone();
        async move { tokens(cb, 0, true).await.unwrap().len() == 2 }
    })
    .await;
    assert_eq!(tokens(cb.clone(), 1, false).await.unwrap(), ta);
    ca.admin()
        .retire_index_key(pb::RetireIndexKeyRequest {
            tenant_id: "idx".into(),
            version: 1,
        })
        .await
        .unwrap();
    within_a_second("b did not see the retirement", || {
        let cb = cb.clone();
        async move {
            tokens(cb, 1, false)
                .await
                .is_err_and(|s| s.code() == Code::FailedPrecondition)
        }
    })
    .await;
    shred(&ca, "idx").await;
    within_a_second("b did not see the shred", || {
        let cb = cb.clone();
        async move {
            tokens(cb, 0, false)
                .await
                .is_err_and(|s| s.code() == Code::FailedPrecondition)
        }
    })
    .await;
    assert_invariants(&url).await;
}
