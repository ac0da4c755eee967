use super::*;

async fn log_with(records: usize) -> (tempfile::TempDir, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    for i in 0..records {
        log.record(Entry {
            action: "RotateTenantKey",
            caller: "unix".into(),
            tenant: Some(format!("t{i}")),
            ..Entry::default()
        })
        .await
        .unwrap();
    }
    (dir, log)
}

fn lines(dir: &tempfile::TempDir) -> Vec<String> {
    fs::read_to_string(dir.path().join(AUDIT_LOG_FILE))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn check(lines: &[String]) -> Result<Verified, Broken> {
    verify(io::Cursor::new(lines.join("\n")))
}

#[tokio::test]
async fn an_intact_chain_verifies_and_reopening_continues_it() {
    let (dir, log) = log_with(3).await;
    drop(log);
    let reopened = AuditLog::open(dir.path()).unwrap();
    let head = reopened
        .record(Entry {
            action: "ShredTenant",
            caller: "unix".into(),
            phase: Phase::Answered,
            outcome: Some("OK".into()),
            ..Entry::default()
        })
        .await
        .unwrap();
    let all = lines(&dir);
    assert_eq!(check(&all), Ok(Verified { records: 4, head }));
    assert!(all[3].contains(r#""phase":"answered""#) && all[3].contains(r#""outcome":"OK""#));
}

#[tokio::test]
async fn a_second_writer_of_one_log_is_refused() {
    let (dir, log) = log_with(1).await;
    let err = AuditLog::open(dir.path()).err().unwrap();
    assert!(
        err.to_string()
            .contains("another process writes this audit log"),
        "{err}"
    );
    drop(log);
    AuditLog::open(dir.path()).unwrap();
}

#[tokio::test]
async fn an_edited_line_is_named() {
    let (dir, _log) = log_with(5).await;
    let mut all = lines(&dir);
    all[2] = all[2].replace("t2", "t9");
    assert_eq!(check(&all).unwrap_err().line, 3);
    // Editing and recomputing the hash breaks the next line's link instead.
    let mut body: Line = serde_json::from_str(&lines(&dir)[2]).unwrap();
    body.body.tenant = Some("t9".into());
    body.hash = hash_of(&body.body);
    let mut all = lines(&dir);
    all[2] = serde_json::to_string(&body).unwrap();
    let broken = check(&all).unwrap_err();
    assert_eq!(broken.line, 4);
    assert!(broken.problem.contains("chain is broken"), "{broken}");
}

#[tokio::test]
async fn a_deleted_or_moved_line_is_named() {
    let (dir, _log) = log_with(5).await;
    let mut deleted = lines(&dir);
    deleted.remove(1);
    let broken = check(&deleted).unwrap_err();
    assert_eq!(broken.line, 2);
    assert!(
        broken.problem.contains("record 3 where record 2 belongs"),
        "{broken}"
    );

    let mut swapped = lines(&dir);
    swapped.swap(3, 4);
    assert_eq!(check(&swapped).unwrap_err().line, 4);
    let mut garbage = lines(&dir);
    garbage[0] = "not json".into();
    assert_eq!(check(&garbage).unwrap_err().line, 1);
}

#[tokio::test]
async fn subject_ids_appear_only_as_keyed_hashes() {
    let (dir, log) = log_with(0).await;
    for _ in 0..2 {
        log.record(Entry {
            action: "ShredSubject",
            caller: "unix".into(),
            subject: Some(b"alice@example.com".to_vec()),
            ..Entry::default()
        })
        .await
        .unwrap();
    }
    let all = lines(&dir);
    assert!(!all.join("").contains("alice"));
    let subject = |line: &str| {
        serde_json::from_str::<Line>(line)
            .unwrap()
            .body
            .subject
            .unwrap()
    };
    assert_eq!(subject(&all[0]), subject(&all[1]));
    assert_eq!(subject(&all[0]).len(), 64);
}

#[test]
fn an_entry_debug_prints_the_subject_ids_length_only() {
    let entry = Entry {
        action: "ShredSubject",
        caller: "unix".into(),
        subject: Some(b"alice@example.com".to_vec()),
        ..Entry::default()
    };
    let shown = format!("{entry:?} {entry:#?}");
    for needle in ["alice", "example", "97, 108", "616c696365"] {
        assert!(!shown.contains(needle), "{shown}");
    }
    assert_eq!(
        format!("{entry:?}"),
        r#"Entry { action: "ShredSubject", phase: Asked, caller: "unix", tenant: None, subject: Some(<17 bytes>), outcome: None, detail: None }"#
    );
}

#[test]
fn the_last_line_is_read_from_the_end_whatever_the_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let check = |text: &str, expected: Option<&str>| {
        std::fs::write(&path, text).unwrap();
        assert_eq!(last_line(&path).unwrap().as_deref(), expected);
    };
    check("", None);
    check("\n\n", None);
    check("one", Some("one"));
    check("one\ntwo\n", Some("two"));
    let long = "x".repeat(300 * 1024);
    check(&format!("first\n{long}\n"), Some(long.as_str()));
    check(&format!("{long}\n"), Some(long.as_str()));
    let many: String = (0..20_000).map(|i| format!("record {i}\n")).collect();
    check(&many, Some("record 19999"));
    // A window that starts exactly at the last line's first byte.
    let exact = format!("{}\n{}\n", "a".repeat(10), "b".repeat(64 * 1024 - 1));
    check(&exact, Some("b".repeat(64 * 1024 - 1).as_str()));
}

#[tokio::test]
async fn record_all_chains_every_entry_with_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    let entries: Vec<Entry> = (0..2500)
        .map(|i| Entry {
            action: "Encrypt",
            phase: Phase::Counted,
            caller: format!("token:app-{i}"),
            ..Entry::default()
        })
        .collect();
    let head = log.record_all(&entries).await.unwrap();
    assert_eq!(log.head().await.unwrap(), (2500, head.clone()));
    drop(log);
    let reopened = AuditLog::open(dir.path()).unwrap();
    assert_eq!(reopened.head().await.unwrap(), (2500, head));
    let text = std::fs::read_to_string(dir.path().join(AUDIT_LOG_FILE)).unwrap();
    assert_eq!(verify(text.as_bytes()).unwrap().records, 2500);
}
