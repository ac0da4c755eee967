//! The audit log as an auditor meets it: every Admin call recorded when asked
//! and when answered, refusals included, no secret in any record, the chain
//! checked by `keywarden audit verify`, and admin calls refused while the log
//! cannot be written.

mod common;

use std::{collections::BTreeMap, process::Command, sync::Arc};

use common::{Options, TestSidecar};
use keywarden::{api::pb, audit::AuditLog};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_keywarden");

fn verify(file: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
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
    std::fs::read_to_string(sidecar.dir.path().join("audit.log"))
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
