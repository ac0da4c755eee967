//! The audit log as an auditor meets it: every Admin call recorded when asked
//! and when answered, refusals counted, no secret in any record, the chain
//! checked by `keywarden audit verify` (against anchors, telling a torn
//! write from an edit), admin calls refused while the log cannot be written,
//! a failed write cut back and a torn one repaired at start, and the
//! PostgreSQL sink's guards.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use common::{
    Options, TestSidecar, postgres,
    process::{Sidecar, keywarden},
};
use keywarden::{
    api::pb,
    audit::{AuditLog, Entry, GENESIS, Phase, Record},
    client,
    store::postgres::{PostgresKeystore, PostgresOptions},
};
use tonic::Code;

/// Runs `keywarden audit verify ARGS...`: its exit code, stdout and stderr.
fn verify_with(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = keywarden()
        .envs(env.iter().copied())
        .args(["audit", "verify"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify(file: &Path) -> (Option<i32>, String) {
    let (code, stdout, stderr) = verify_with(&[file.to_str().unwrap()], &[]);
    (code, format!("{stdout}{stderr}"))
}

#[tokio::test]
async fn admin_calls_are_recorded_without_secrets_and_tampering_is_named() {
    let sidecar = TestSidecar::start().await;
    let (mut admin, mut crypto) = (sidecar.admin().await, sidecar.crypto().await);
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "clinic".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let canary = b"CANARY-PLAINTEXT-7f3a9c";
    let sealed = crypto
        .encrypt(pb::EncryptRequest {
            tenant_id: "clinic".into(),
            subject_id: "patient-4711@example.org".into(),
            context: BTreeMap::new(),
            plaintext: canary.to_vec(),
            deterministic: false,
            key_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "clinic".into(),
            subject_id: "patient-4711@example.org".into(),
        })
        .await
        .unwrap();
    let refused = admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant_id: "clinic".into(),
            confirm: "not-clinic".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let file = sidecar.dir.path().join("audit.log");
    let log = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = log.lines().collect();

    // Three admin calls, each asked and answered; Encrypt is data plane.
    let actions: Vec<(String, String, Option<String>)> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["action"].as_str().unwrap().to_owned(),
                v["phase"].as_str().unwrap().to_owned(),
                v["outcome"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let expected: Vec<(String, String, Option<String>)> = [
        ("CreateTenant", "asked", None),
        ("CreateTenant", "answered", Some("OK")),
        ("ShredSubject", "asked", None),
        ("ShredSubject", "answered", Some("OK")),
        ("ShredTenant", "asked", None),
        ("ShredTenant", "answered", Some("INVALID_ARGUMENT")),
    ]
    .into_iter()
    .map(|(a, p, o)| (a.to_owned(), p.to_owned(), o.map(str::to_owned)))
    .collect();
    assert_eq!(actions, expected);

    // No plaintext, ciphertext, subject id or key bytes, in any encoding.
    let root_key = std::fs::read(sidecar.dir.path().join("root.key")).unwrap();
    let audit_key = std::fs::read(sidecar.dir.path().join("audit.key")).unwrap();
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    for needle in [
        String::from_utf8_lossy(canary).into_owned(),
        "patient-4711".to_owned(),
        hex::encode(&sealed.ciphertext[19..40]),
        b64(&sealed.ciphertext)[4..30].to_owned(),
        hex::encode(&root_key),
        b64(&root_key),
        hex::encode(&audit_key),
        b64(&audit_key),
    ] {
        assert!(!log.contains(&needle), "the audit log contains {needle:?}");
    }

    let (code, out) = verify(&file);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("ok: 6 records, chain intact; latest hash "),
        "{out}"
    );

    // Edit one line: verify names it.
    let tampered_dir = tempfile::tempdir().unwrap();
    let tampered = tampered_dir.path().join("audit.log");
    let mut edited = lines.clone();
    let changed = edited[3].replace("\"OK\"", "\"NOT_FOUND\"");
    edited[3] = &changed;
    std::fs::write(&tampered, edited.join("\n") + "\n").unwrap();
    let (code, out) = verify(&tampered);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("is broken at line 4: its content does not match its hash"),
        "{out}"
    );

    // Delete one line: verify names where the gap is.
    let mut deleted = lines.clone();
    deleted.remove(2);
    std::fs::write(&tampered, deleted.join("\n") + "\n").unwrap();
    let (code, out) = verify(&tampered);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("is broken at line 3: is record 4 where record 3 belongs"),
        "{out}"
    );

    // Reorder two lines.
    let mut reordered = lines.clone();
    reordered.swap(0, 1);
    std::fs::write(&tampered, reordered.join("\n") + "\n").unwrap();
    let (code, out) = verify(&tampered);
    assert_eq!(code, Some(1));
    assert!(out.contains("is broken at line 1:"), "{out}");
}

#[tokio::test]
async fn admin_calls_fail_closed_while_the_audit_log_cannot_be_written() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // Writes to /dev/full fail with ENOSPC, as a full disk would.
    let full = std::fs::OpenOptions::new()
        .append(true)
        .open("/dev/full")
        .unwrap();
    let audit = Arc::new(AuditLog::with_file(dir.path(), full).unwrap());
    let sidecar = TestSidecar::start_in(
        dir.clone(),
        Options {
            audit: Some(audit),
            ..Options::default()
        },
    )
    .await;
    let status = sidecar
        .admin()
        .await
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "unaudited".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::Unavailable,
            "the audit log is unavailable; retry later"
        )
    );
    sidecar.stop().await;

    // Nothing was created: a sidecar with a working log does not know it.
    let sidecar = TestSidecar::start_in(dir, Options::default()).await;
    let status = sidecar
        .admin()
        .await
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "unaudited".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

fn records(sidecar: &TestSidecar) -> Vec<serde_json::Value> {
    records_in(sidecar.dir.path())
}

fn records_in(data_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data_dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn encrypt_n(sidecar: &TestSidecar, n: usize) {
    let mut crypto = sidecar.crypto().await;
    for _ in 0..n {
        crypto
            .encrypt(pb::EncryptRequest {
                tenant_id: "clinic".into(),
                subject_id: String::new(),
                context: BTreeMap::new(),
                plaintext: b"x".to_vec(),
                deterministic: false,
                key_version: 0,
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn data_plane_calls_are_recorded_one_by_one_or_counted() {
    use keywarden::config::{AuditConfig, DataPlaneAudit};
    let every = TestSidecar::start_with(Options {
        audit_config: AuditConfig {
            data_plane: DataPlaneAudit::Every,
            count_interval_seconds: 60,
            ..AuditConfig::default()
        },
        ..Options::default()
    })
    .await;
    let mut admin = every.admin().await;
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "clinic".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    encrypt_n(&every, 3).await;
    let answered: Vec<_> = records(&every)
        .into_iter()
        .filter(|r| r["action"] == "Encrypt")
        .collect();
    assert_eq!(answered.len(), 3, "{answered:?}");
    for r in &answered {
        assert_eq!(r["phase"], "answered");
        assert_eq!(r["caller"], "token:admin");
        assert_eq!(r["tenant"], "clinic");
        assert_eq!(r["outcome"], "OK");
    }
    every.stop().await;

    let counted = TestSidecar::start_with(Options {
        audit_config: AuditConfig {
            data_plane: DataPlaneAudit::Counts,
            count_interval_seconds: 1,
            ..AuditConfig::default()
        },
        ..Options::default()
    })
    .await;
    counted
        .admin()
        .await
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "clinic".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    encrypt_n(&counted, 5).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let count = loop {
        let found: Vec<_> = records(&counted)
            .into_iter()
            .filter(|r| r["action"] == "Encrypt")
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(std::time::Instant::now() < deadline, "no counted record");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(count.len(), 1, "{count:?}");
    assert_eq!(count[0]["phase"], "counted");
    assert_eq!(count[0]["detail"], "5 calls");
    assert_eq!(count[0]["caller"], "token:admin");
    let dir = counted.dir.clone();
    counted.stop().await;
    let (code, text) = verify(&dir.path().join("audit.log"));
    assert_eq!(code, Some(0), "{text}");
}

/// The head of a log file: its record count and its last record's hash.
fn file_head(data_dir: &Path) -> (u64, String) {
    let text = std::fs::read(data_dir.join("audit.log")).unwrap();
    let last = text[..text.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap();
    let record = Record::parse(last).unwrap();
    (record.body.seq, record.hash)
}

#[tokio::test]
async fn refusals_are_counted_per_peer_and_reason_not_written_one_by_one() {
    let sidecar = TestSidecar::start().await;
    let bogus = client::Bearer::new(Some(&secrecy::SecretString::from(
        "kw_bogus_token_0000000000000000".to_owned(),
    )))
    .unwrap();
    // Three connections, so three source ports.
    for _ in 0..3 {
        let mut admin = client::admin(sidecar.channel().await, bogus.clone());
        for _ in 0..4 {
            let status = admin
                .list_tenants(pb::ListTenantsRequest::default())
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
        }
        let status = admin
            .get_audit_head(pb::GetAuditHeadRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    // Nothing written, nothing synced per refusal.
    assert_eq!(records(&sidecar), Vec::<serde_json::Value>::new());
    sidecar.flush_audit_counts().await;
    let counted: Vec<_> = records(&sidecar)
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["action"].as_str().unwrap().to_owned(),
                r["phase"].as_str().unwrap().to_owned(),
                r["caller"].as_str().unwrap().to_owned(),
                r.get("tenant").is_some(),
                r["outcome"].as_str().unwrap().to_owned(),
                r["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let row = |seq, action: &str, calls: &str| {
        (
            seq,
            action.to_owned(),
            "refused".to_owned(),
            "tcp 127.0.0.1".to_owned(),
            false,
            "UNAUTHENTICATED".to_owned(),
            calls.to_owned(),
        )
    };
    assert_eq!(
        counted,
        [
            row(1, "GetAuditHead", "3 calls"),
            row(2, "ListTenants", "12 calls")
        ]
    );
    let dir = sidecar.dir.clone();
    sidecar.stop().await;
    let (code, text) = verify(&dir.path().join("audit.log"));
    assert_eq!(code, Some(0), "{text}");
}

/// Appends a padding record with `detail_len` bytes of detail.
async fn pad(log: &AuditLog, detail_len: usize) {
    log.record(Entry {
        action: "Padding",
        phase: Phase::Answered,
        caller: "test".into(),
        detail: Some("x".repeat(detail_len)),
        ..Entry::default()
    })
    .await
    .unwrap();
}

/// Grows the audit log in `data_dir` with padding records to exactly
/// `target` bytes.
async fn pad_log_to(data_dir: &Path, target: u64) {
    let file = data_dir.join("audit.log");
    let size = || std::fs::metadata(&file).unwrap().len();
    let log = AuditLog::open(data_dir).unwrap();
    while target - size() > 2 << 20 {
        pad(&log, 1 << 20).await;
    }
    // What a record adds beyond its detail, measured, and one more byte if
    // the next sequence number has one more digit.
    let before = size();
    pad(&log, 1).await;
    let (seq, _) = file_head(data_dir);
    let digits = |n: u64| n.to_string().len() as u64;
    let overhead = size() - before - 1 + digits(seq + 1) - digits(seq);
    let detail = target - size() - overhead;
    pad(&log, usize::try_from(detail).unwrap()).await;
    assert_eq!(size(), target, "padding missed");
}

/// Bytes in one block of `ulimit -f` in this system's sh.
fn ulimit_block() -> u64 {
    let out = Command::new("sh")
        .args(["-c", "ulimit -f 1; cat /proc/self/limits"])
        .output()
        .unwrap();
    let limits = String::from_utf8(out.stdout).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// A temporary directory holding a data directory in which a sidecar,
/// now stopped, created tenant `acme` (two records), and where its socket
/// goes.
fn a_stopped_sidecar_with_tenant_acme() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let socket = tmp.path().join("kw.sock");
    let first = Sidecar::start(&data, &socket);
    first.ok(&["tenant", "create", "acme"]);
    let (status, log) = first.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    (tmp, data, socket)
}

/// Finding 4: a write that fails part-way (here EFBIG: the sidecar runs
/// under a file-size limit that falls inside its next record, so the write
/// is really partial) leaves the log at its last complete record, the chain
/// does not advance, the data plane still serves, and a restart with room
/// continues the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_file_size_limit_is_cut_back_and_a_restart_continues_the_chain() {
    let (tmp, data, socket) = a_stopped_sidecar_with_tenant_acme();

    // 8 MiB: above every other file the sidecar writes (the SQLite WAL
    // stays under 4 MiB); the log stops 60 bytes short of it.
    let block = ulimit_block();
    let blocks = (8 << 20) / block;
    let limit = blocks * block;
    pad_log_to(&data, limit - 60).await;
    let (records, head) = file_head(&data);

    let mut command = common::process::command("sh");
    command
        .arg("-c")
        .arg(format!(
            r#"trap "" XFSZ; ulimit -f {blocks}; exec "$0" "$@""#
        ))
        .arg(common::process::BIN)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()));
    let limited = Sidecar::spawn(command, &data, &socket, tmp.path().join("limited.log"));
    for tenant in ["beta", "gamma"] {
        limited
            .cli(&["tenant", "create", tenant])
            .assert_failure("UNAVAILABLE", "an admin call past the file-size limit");
        assert_eq!(
            std::fs::metadata(data.join("audit.log")).unwrap().len(),
            limit - 60,
            "the failed write was not cut back"
        );
        assert_eq!(file_head(&data), (records, head.clone()));
    }
    // The data plane does not wait on the log.
    let sealed = limited.encrypt(&["--tenant", "acme", "still served"]);
    let (status, log) = limited.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("the audit log could not record the last data-plane counts"),
        "{log}"
    );
    assert!(log.contains("File too large"), "{log}");
    let (code, text) = verify(&data.join("audit.log"));
    assert_eq!(
        (code, text),
        (
            Some(0),
            format!("ok: {records} records, chain intact; latest hash {head}\n")
        )
    );

    let again = Sidecar::start(&data, &socket);
    again.ok(&["tenant", "create", "beta"]);
    assert_eq!(
        again.ok(&["decrypt", "--tenant", "acme", &sealed]),
        "still served"
    );
    let (status, log) = again.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    let all = records_in(&data);
    let tail: Vec<_> = all[all.len() - 3..]
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["action"].as_str().unwrap(),
                r["phase"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tail,
        [
            (records + 1, "CreateTenant", "asked"),
            (records + 2, "CreateTenant", "answered"),
            (records + 3, "Decrypt", "counted"),
        ]
    );
    let (code, text) = verify(&data.join("audit.log"));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.starts_with(&format!("ok: {} records, chain intact", records + 3)),
        "{text}"
    );
}

/// Finding 4: a torn last record (a crash mid-write, or a disk that filled
/// under keywarden up to 5404065) is told apart from an edit by `audit
/// verify`, and cut off and recorded when the sidecar starts.
#[test]
fn a_torn_tail_is_told_from_an_edit_and_repaired_and_recorded_at_restart() {
    let (tmp, data, socket) = a_stopped_sidecar_with_tenant_acme();
    let file = data.join("audit.log");
    let intact = std::fs::read_to_string(&file).unwrap();
    let torn = &intact.lines().nth(1).unwrap()[..50];

    // An edited copy: exit 1, the line named.
    let copy = tmp.path().join("copy.log");
    std::fs::write(&copy, intact.replacen("acme", "acne", 1)).unwrap();
    let (code, stdout, stderr) = verify_with(&[copy.to_str().unwrap()], &[]);
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert_eq!(
        stderr,
        format!(
            "{} is broken at line 1: its content does not match its hash: the record was edited\n",
            copy.display()
        )
    );

    // The torn log: exit 3, the partial record named.
    std::fs::write(&file, format!("{intact}{torn}")).unwrap();
    let (code, stdout, stderr) = verify_with(&[file.to_str().unwrap()], &[]);
    let (_, head) = file_head_of(&intact);
    assert_eq!(code, Some(3), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        format!(
            "partial: 2 records, chain intact but for the partial records above; latest hash {head}\n"
        )
    );
    assert!(
        stderr.starts_with(&format!(
            "{}: the log ends in a partial record: 50 bytes after record 2 (",
            file.display()
        )),
        "{stderr}"
    );

    // The restart cuts it off and records that.
    let again = Sidecar::start(&data, &socket);
    again.ok(&["tenant", "create", "beta"]);
    let (status, log) = again.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("cut it off; recording the cut"), "{log}");
    let all = records_in(&data);
    let actions: Vec<_> = all
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["caller"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("CreateTenant", "token:admin"),
            ("CreateTenant", "token:admin"),
            ("AuditRepair", "keywarden"),
            ("CreateTenant", "token:admin"),
            ("CreateTenant", "token:admin"),
        ]
    );
    use sha2::Digest;
    assert_eq!(
        all[2]["detail"],
        format!(
            "cut 50 bytes after record 2 at start: a partial record (no newline) (SHA-256 of the cut bytes: {})",
            hex::encode(sha2::Sha256::digest(torn.as_bytes()))
        )
    );
    let (code, text) = verify(&file);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("ok: 5 records, chain intact"), "{text}");
}

fn file_head_of(text: &str) -> (u64, String) {
    let record = Record::parse(text.lines().last().unwrap().as_bytes()).unwrap();
    (record.body.seq, record.hash)
}

#[tokio::test]
async fn verify_checks_anchors_and_refuses_a_malformed_one_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    for _ in 0..3 {
        pad(&log, 10).await;
    }
    let file = dir.path().join("audit.log");
    let (records, head) = file_head(dir.path());
    let anchor = format!("{records}:{head}");
    let (code, stdout, _) = verify_with(&[file.to_str().unwrap(), "--anchor", &anchor], &[]);
    assert_eq!(
        (code, stdout),
        (
            Some(0),
            format!("ok: 3 records, chain intact; latest hash {head}\n")
        )
    );
    // The log moved away and a new one begun: the anchor is not in it.
    drop(log);
    std::fs::rename(&file, dir.path().join("old.log")).unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    pad(&log, 10).await;
    let (code, stdout, stderr) = verify_with(&[file.to_str().unwrap(), "--anchor", &anchor], &[]);
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert_eq!(
        stderr,
        format!(
            "{} is broken at its end: it holds 1 records, but the anchor names record 3: records \
             were removed from its end, or the log was replaced\n",
            file.display()
        )
    );
    for bad in ["3", "3:abc", &format!("three:{head}")] {
        let (code, stdout, stderr) = verify_with(&[file.to_str().unwrap(), "--anchor", bad], &[]);
        assert_eq!((code, stdout.as_str()), (Some(2), ""), "{bad}");
        assert!(
            stderr.contains("expected SEQ:HASH, a record's sequence number"),
            "{stderr}"
        );
    }
}

/// An audit log in a fresh PostgreSQL database, migrated, with `records`
/// records written through the sink.
async fn postgres_log(records: usize) -> (String, tempfile::TempDir, AuditLog) {
    let url = postgres::fresh_database().await;
    let store = PostgresKeystore::connect(&url, PostgresOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::postgres(dir.path(), store.pool()).unwrap();
    for i in 0..records {
        log.record(Entry {
            action: "CreateTenant",
            caller: "token:admin".into(),
            tenant: Some(format!("t{i}")),
            ..Entry::default()
        })
        .await
        .unwrap();
    }
    (url, dir, log)
}

/// `keywarden audit verify --postgres` passes with `records` records.
fn assert_postgres_log_verifies(url: &str, records: u64) {
    let (code, stdout, stderr) = verify_with(&["--postgres"], &[("KEYWARDEN_DATABASE_URL", url)]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with(&format!("ok: {records} records, chain intact")),
        "{stdout}"
    );
}

async fn sql_error(db: &mut sqlx::PgConnection, sql: &str) -> String {
    match sqlx::raw_sql(sql).execute(db).await {
        Ok(_) => panic!("{sql}: not refused"),
        Err(e) => e
            .as_database_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_else(|| e.to_string()),
    }
}

/// Finding 6: TRUNCATE refused, the head cannot be set back or removed,
/// even by the table's owner as long as the triggers stand; the sink keeps
/// writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_audit_log_cannot_be_truncated_nor_its_head_set_back() {
    let (url, _dir, log) = postgres_log(3).await;
    let (seq, head) = log.head().await.unwrap();
    assert_eq!(seq, 3);
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let refusals = [
        ("TRUNCATE audit_log", "audit_log is append-only"),
        ("TRUNCATE audit_log CASCADE", "audit_log is append-only"),
        (
            "TRUNCATE audit_head",
            "audit_head cannot be deleted or truncated",
        ),
        (
            "DELETE FROM audit_head",
            "audit_head cannot be deleted or truncated",
        ),
        (
            &format!("UPDATE audit_head SET seq = 0, hash = '{GENESIS}'"),
            "audit_head only moves forward: it is at record 3, not 0",
        ),
        (
            &format!("UPDATE audit_head SET hash = '{GENESIS}'"),
            "audit_head only moves forward: it is at record 3, not 3",
        ),
        (
            &format!("UPDATE audit_head SET seq = 4, hash = '{head}'"),
            "audit_head must name the last record of audit_log and its hash",
        ),
        // A record inserted and the head pointed at it with a wrong hash.
        (
            &format!(
                "BEGIN; INSERT INTO audit_log (seq, record) VALUES (4, 'x'); \
                 UPDATE audit_head SET seq = 4, hash = '{head}'"
            ),
            "audit_head must name the last record of audit_log and its hash",
        ),
    ];
    for (sql, refused) in refusals {
        assert_eq!(sql_error(&mut db, sql).await, refused, "{sql}");
        sqlx::raw_sql("ROLLBACK").execute(&mut db).await.ok();
    }
    assert_eq!(log.head().await.unwrap(), (3, head));
    log.record(Entry {
        action: "ShredTenant",
        caller: "token:admin".into(),
        ..Entry::default()
    })
    .await
    .unwrap();
    assert_postgres_log_verifies(&url, 4);
}

/// Finding 6: the runtime role of the two-role setup (README, "Database
/// roles") can write the log but neither empty it nor lift its guards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_role_can_append_but_not_truncate_nor_drop_the_guards() {
    let (url, dir, owner_log) = postgres_log(1).await;
    drop(owner_log);
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut db)
        .await
        .unwrap();
    let role = format!("{database}_app");
    sqlx::raw_sql(&format!(
        "CREATE ROLE \"{role}\" LOGIN PASSWORD 'app-secret'; \
         GRANT CONNECT ON DATABASE \"{database}\" TO \"{role}\"; \
         GRANT USAGE ON SCHEMA public TO \"{role}\"; \
         GRANT SELECT, INSERT ON audit_log TO \"{role}\"; \
         GRANT SELECT, UPDATE ON audit_head TO \"{role}\";"
    ))
    .execute(&mut db)
    .await
    .unwrap();
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let options = options.username(&role).password("app-secret");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .unwrap();
    let log = AuditLog::postgres(dir.path(), pool).unwrap();
    log.record(Entry {
        action: "CreateTenant",
        caller: "token:admin".into(),
        ..Entry::default()
    })
    .await
    .unwrap();
    let mut app = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    for (sql, refused) in [
        (
            "TRUNCATE audit_log",
            "permission denied for table audit_log",
        ),
        (
            "DELETE FROM audit_log",
            "permission denied for table audit_log",
        ),
        (
            "UPDATE audit_log SET record = 'x'",
            "permission denied for table audit_log",
        ),
        // (PostgreSQL says "relation" or "table" here, by command and
        // version.)
        (
            "ALTER TABLE audit_log DISABLE TRIGGER USER",
            "must be owner of table audit_log",
        ),
        (
            "DROP TRIGGER audit_head_forward ON audit_head",
            "must be owner of relation audit_head",
        ),
        (
            "SET session_replication_role = replica",
            "permission denied to set parameter \"session_replication_role\"",
        ),
        (
            "UPDATE audit_head SET seq = 1",
            "audit_head only moves forward: it is at record 2, not 1",
        ),
    ] {
        let error = sql_error(&mut app, sql).await;
        let owner = |e: &str| e.replace(" of relation ", " of table ");
        assert_eq!(owner(&error), owner(refused), "{sql}");
    }
    assert_postgres_log_verifies(&url, 2);
}

/// Finding 6: the table's owner can lift the guards and empty the log; the
/// head table then disagrees, or, reset too, only an anchor kept elsewhere
/// shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_an_anchor_catches_a_postgres_log_emptied_by_its_owner() {
    let (url, _dir, log) = postgres_log(5).await;
    let (seq, head) = log.head().await.unwrap();
    let anchor = format!("{seq}:{head}");
    let env = [("KEYWARDEN_DATABASE_URL", url.as_str())];
    let (code, stdout, _) = verify_with(&["--postgres", "--anchor", &anchor], &env);
    assert_eq!(
        (code, stdout),
        (
            Some(0),
            format!("ok: 5 records, chain intact; latest hash {head}\n")
        )
    );
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::raw_sql(
        "ALTER TABLE audit_log DISABLE TRIGGER USER; \
         ALTER TABLE audit_head DISABLE TRIGGER USER; \
         DELETE FROM audit_log WHERE seq > 2",
    )
    .execute(&mut db)
    .await
    .unwrap();
    // The head still names record 5.
    let (code, stdout, stderr) = verify_with(&["--postgres"], &env);
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert_eq!(
        stderr,
        format!(
            "the PostgreSQL audit log is broken at its end: it holds 2 records, but audit_head \
             names record 5 (hash {head}): the log or its head was changed behind the sidecars\n"
        )
    );
    // Emptied, and the head reset: intact by itself, caught by the anchor.
    sqlx::raw_sql(&format!(
        "TRUNCATE audit_log; UPDATE audit_head SET seq = 0, hash = '{GENESIS}'"
    ))
    .execute(&mut db)
    .await
    .unwrap();
    let (code, stdout, _) = verify_with(&["--postgres"], &env);
    assert_eq!(
        (code, stdout),
        (
            Some(0),
            format!("ok: 0 records, chain intact; latest hash {GENESIS}\n")
        )
    );
    let (code, stdout, stderr) = verify_with(&["--postgres", "--anchor", &anchor], &env);
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert_eq!(
        stderr,
        "the PostgreSQL audit log is broken at its end: it holds 0 records, but the anchor names \
         record 5: records were removed from its end, or the log was replaced\n"
    );
}
