use std::io::Write;

use serde::Serialize;
use sha2::{Digest, Sha256};

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
    verify(io::Cursor::new(lines.join("\n") + "\n"))
}

fn at(line: usize, problem: Problem) -> Broken {
    Broken::Record { line, problem }
}

/// A line with `body` as its hashed bytes, whatever they are: what a
/// forger who recomputes hashes writes.
fn forged(body: &str) -> String {
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    format!("{},\"hash\":\"{hash}\"}}", body.strip_suffix('}').unwrap())
}

/// The hashed bytes of a line, by the rule.
fn hashed(line: &str) -> String {
    format!("{}}}", &line[..line.len() - 75])
}

fn ok(records: u64, head: String) -> Result<Verified, Broken> {
    Ok(Verified {
        records,
        head,
        partial: Vec::new(),
    })
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
    assert_eq!(check(&all), ok(4, head));
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
    assert_eq!(
        check(&all),
        Err(at(3, Problem::NotARecord(NotARecord::Edited)))
    );
    // Editing and recomputing the hash breaks the next line's link instead.
    let mut all = lines(&dir);
    all[2] = forged(&hashed(&all[2]).replace("t2", "t9"));
    assert_eq!(check(&all), Err(at(4, Problem::Chain)));
}

#[tokio::test]
async fn a_deleted_or_moved_line_is_named() {
    let (dir, _log) = log_with(5).await;
    let mut deleted = lines(&dir);
    deleted.remove(1);
    assert_eq!(
        check(&deleted),
        Err(at(
            2,
            Problem::Sequence {
                found: 3,
                expected: 2
            }
        ))
    );
    assert_eq!(
        check(&deleted).unwrap_err().to_string(),
        "at line 2: is record 3 where record 2 belongs: records were deleted, inserted or moved"
    );

    let mut swapped = lines(&dir);
    swapped.swap(3, 4);
    assert_eq!(
        check(&swapped),
        Err(at(
            4,
            Problem::Sequence {
                found: 5,
                expected: 4
            }
        ))
    );
    let mut garbage = lines(&dir);
    garbage[0] = "not json".into();
    assert_eq!(
        check(&garbage),
        Err(at(1, Problem::NotARecord(NotARecord::NoHash)))
    );
}

/// Finding 12: the hash covers the line's exact bytes, and verify takes
/// only the form keywarden writes. Each change fails as an edit; made by a
/// forger who recomputes the hash, it fails as not keywarden's form.
#[tokio::test]
async fn any_change_to_a_records_bytes_fails_even_with_its_hash_recomputed() {
    let (dir, log) = log_with(0).await;
    log.record(Entry {
        action: "ShredTenant",
        caller: "token:Admin".into(),
        tenant: Some("acme".into()),
        ..Entry::default()
    })
    .await
    .unwrap();
    let line = lines(&dir).remove(0);
    let body = hashed(&line);
    assert!(body.starts_with(r#"{"seq":1,"time":""#), "{body}");
    let time = &body[body.find(r#""time""#).unwrap()..body.find(r#","action""#).unwrap()];
    // None: the parse error of the changed body (an unknown or duplicated
    // field).
    let changes: [(&str, String, Option<NotARecord>); 6] = [
        (
            "an added field",
            body.replacen(r#"{"seq":1,"#, r#"{"seq":1,"approved_by":"cfo","#, 1),
            None,
        ),
        (
            "a reordered field",
            body.replacen(&format!("{time},"), "", 1).replacen(
                r#""prev""#,
                &format!("{time},\"prev\""),
                1,
            ),
            Some(NotARecord::NotCanonical),
        ),
        (
            "a character re-encoded",
            body.replacen("Admin", r"\u0041dmin", 1),
            Some(NotARecord::NotCanonical),
        ),
        (
            "a space",
            body.replacen(r#""seq":1"#, r#""seq": 1"#, 1),
            Some(NotARecord::NotCanonical),
        ),
        (
            "an absent field written as null",
            body.replacen(r#","prev""#, r#","subject":null,"prev""#, 1),
            Some(NotARecord::NotCanonical),
        ),
        (
            "a duplicated field",
            body.replacen(r#","prev""#, r#","tenant":"acme","prev""#, 1),
            None,
        ),
    ];
    for (what, changed, forged_as) in changes {
        assert_ne!(changed, body, "{what}: the change did nothing");
        let edited = format!(
            "{}{}",
            &changed[..changed.len() - 1],
            &line[body.len() - 1..]
        );
        assert_eq!(
            Record::parse(edited.as_bytes()),
            Err(NotARecord::Edited),
            "{what}"
        );
        let forged_as = forged_as.unwrap_or_else(|| {
            NotARecord::Unreadable(
                serde_json::from_str::<Body>(&changed)
                    .unwrap_err()
                    .to_string(),
            )
        });
        assert_eq!(
            Record::parse(forged(&changed).as_bytes()),
            Err(forged_as),
            "{what}"
        );
    }
    let added = forged(&body.replacen(r#"{"seq":1,"#, r#"{"seq":1,"approved_by":"cfo","#, 1));
    assert!(
        matches!(Record::parse(added.as_bytes()), Err(NotARecord::Unreadable(m)) if m.starts_with("unknown field `approved_by`")),
        "{added}"
    );
    let duplicated = forged(&body.replacen(r#","prev""#, r#","tenant":"acme","prev""#, 1));
    assert!(
        matches!(Record::parse(duplicated.as_bytes()), Err(NotARecord::Unreadable(m)) if m.starts_with("duplicate field `tenant`")),
        "{duplicated}"
    );
    // The suffix itself: a space, uppercase hex, a field after the hash.
    let hash = Record::parse(line.as_bytes()).unwrap().hash;
    for suffix_change in [
        line.replacen(r#","hash":""#, r#", "hash":""#, 1),
        line.replacen(&hash, &hash.to_uppercase(), 1),
        line.replacen(&format!("{hash}\"}}"), &format!("{hash}\",\"x\":1}}"), 1),
    ] {
        assert_ne!(suffix_change, line);
        assert_eq!(
            Record::parse(suffix_change.as_bytes()),
            Err(NotARecord::NoHash),
            "{suffix_change}"
        );
    }
    let (seq, head) = (1, Record::parse(line.as_bytes()).unwrap().hash);
    assert_eq!(log.head().await.unwrap(), (seq, head));
}

/// Records written by keywarden up to 5404065 verify under the byte rule:
/// that writer's line (`serde_json` of the body with the hash flattened in)
/// is byte for byte what `seal` writes.
#[test]
fn lines_of_the_former_writer_are_the_same_bytes() {
    #[derive(Serialize)]
    struct FormerLine<'a> {
        #[serde(flatten)]
        body: &'a Body,
        hash: String,
    }
    let body = Body {
        seq: 7,
        time: "2026-01-02T03:04:05.678Z".into(),
        action: "ShredSubject".into(),
        phase: "answered".into(),
        caller: "jwt:\u{e9}ve \"q\" \\ / \u{1}\u{7f}\n\t".into(),
        tenant: Some("acme".into()),
        subject: Some("ab".repeat(32)),
        outcome: Some("OK".into()),
        detail: Some("version 3 \u{2028} \u{1F600}".into()),
        trace_id: None,
        prev: "cd".repeat(32),
    };
    let former_hash = hex::encode(Sha256::digest(serde_json::to_vec(&body).unwrap()));
    let former = serde_json::to_string(&FormerLine {
        body: &body,
        hash: former_hash.clone(),
    })
    .unwrap();
    assert_eq!(record::seal(&body), (former_hash.clone(), former.clone()));
    assert_eq!(
        Record::parse(former.as_bytes()),
        Ok(Record {
            body,
            hash: former_hash
        })
    );
    // A log the former writer wrote (a sidecar built from 5404065: an
    // admin call asked and answered, a subject shred, a refused tenant
    // shred, a count), kept as it was.
    let kept = include_str!("../../tests/data/audit-5404065.log");
    assert_eq!(
        verify(kept.as_bytes()),
        ok(
            7,
            "888df35e7cba4e4604991e91896b58e56912ee890aa874f8adcc488e15ef820d".into()
        )
    );
}

#[tokio::test]
async fn a_torn_tail_is_told_from_an_edit_and_the_remains_of_a_failed_write_are_named() {
    let (dir, _log) = log_with(3).await;
    let all = lines(&dir);
    let head = Record::parse(all[2].as_bytes()).unwrap().hash;
    let torn = format!("{}\n{}", all.join("\n"), &all[1][..40]);
    let verified = verify(torn.as_bytes()).unwrap();
    assert_eq!(
        verified,
        Verified {
            records: 3,
            head: head.clone(),
            partial: vec![Partial {
                line: 4,
                bytes: 40,
                after: 3,
                at_end: true
            }],
        }
    );
    assert!(
        verified.partial[0]
            .to_string()
            .starts_with("the log ends in a partial record: 40 bytes after record 3 ("),
        "{}",
        verified.partial[0]
    );
    // What keywarden up to 5404065 left after a failed write: the remains,
    // then the next record on the same line.
    let glued = format!("{}\n{}{}\n{}\n", all[0], &all[1][..55], all[1], all[2]);
    let verified = verify(glued.as_bytes()).unwrap();
    assert_eq!(
        verified.partial,
        [Partial {
            line: 2,
            bytes: 55,
            after: 1,
            at_end: false
        }]
    );
    assert_eq!((verified.records, verified.head), (3, head));
    assert_eq!(
        verified.partial[0].to_string(),
        "line 2: 55 bytes of a partial record before record 2 (a write that failed; the records \
         around it are intact)"
    );
    // Remains before an edited record are no excuse.
    let edited = format!(
        "{}\n{}{}\n",
        all[0],
        &all[1][..55],
        all[1].replace("t1", "t7")
    );
    assert_eq!(
        verify(edited.as_bytes()),
        Err(at(2, Problem::NotARecord(NotARecord::Edited)))
    );
}

#[tokio::test]
async fn anchors_catch_a_log_cut_emptied_or_rewritten() {
    let (dir, _log) = log_with(4).await;
    let all = lines(&dir);
    let hash = |i: usize| Record::parse(all[i].as_bytes()).unwrap().hash;
    let text = all.join("\n") + "\n";
    let anchor = |seq: u64, hash: String| Anchor { seq, hash };
    assert_eq!(
        verify_anchored(text.as_bytes(), &[anchor(2, hash(1)), anchor(4, hash(3))]),
        ok(4, hash(3))
    );
    assert_eq!(
        verify_anchored(text.as_bytes(), &[anchor(3, hash(1))]),
        Err(Broken::AnchorDiffers {
            line: 3,
            seq: 3,
            found: hash(2),
            anchored: hash(1)
        })
    );
    let cut = all[..2].join("\n") + "\n";
    assert_eq!(
        verify_anchored(cut.as_bytes(), &[anchor(4, hash(3))]),
        Err(Broken::ShorterThanAnchor { records: 2, seq: 4 })
    );
    assert_eq!(
        verify_anchored(&b""[..], &[anchor(4, hash(3))]),
        Err(Broken::ShorterThanAnchor { records: 0, seq: 4 })
    );
    assert_eq!(
        Broken::ShorterThanAnchor { records: 0, seq: 4 }.to_string(),
        "at its end: it holds 0 records, but the anchor names record 4: records were removed \
         from its end, or the log was replaced"
    );
    assert_eq!(
        format!("4:{}", hash(3)).parse::<Anchor>(),
        Ok(anchor(4, hash(3)))
    );
    for bad in [
        String::new(),
        "4".into(),
        format!("0:{}", hash(3)),
        format!("-1:{}", hash(3)),
        format!("4:{}", hash(3).to_uppercase()),
        format!("4:{}", &hash(3)[1..]),
        format!("4:{} ", hash(3)),
    ] {
        let err = bad.parse::<Anchor>().unwrap_err();
        assert!(err.starts_with("expected SEQ:HASH"), "{bad:?}: {err}");
    }
}

fn append(dir: &tempfile::TempDir, bytes: &[u8]) {
    fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join(AUDIT_LOG_FILE))
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_at_start_and_the_cut_is_recorded() {
    let (dir, log) = log_with(3).await;
    drop(log);
    let before = lines(&dir);
    let torn = &before[2].as_bytes()[..40];
    append(&dir, torn);
    let log = AuditLog::open(dir.path()).unwrap();
    let all = lines(&dir);
    assert_eq!(all[..3], before[..]);
    let repair = Record::parse(all[3].as_bytes()).unwrap();
    assert_eq!(
        (
            repair.body.action.as_str(),
            repair.body.phase.as_str(),
            repair.body.caller.as_str(),
            repair.body.outcome.as_deref(),
            repair.body.detail.as_deref(),
        ),
        (
            "AuditRepair",
            "answered",
            "keywarden",
            Some("OK"),
            Some(
                format!(
                    "cut 40 bytes after record 3 at start: a partial record (no newline) \
                     (SHA-256 of the cut bytes: {})",
                    hex::encode(Sha256::digest(torn))
                )
                .as_str()
            ),
        )
    );
    assert_eq!(log.head().await.unwrap(), (4, repair.hash.clone()));
    assert_eq!(check(&all), ok(4, repair.hash));
}

#[tokio::test]
async fn a_last_line_that_is_not_a_record_is_cut_off_but_an_edited_one_stops_the_start() {
    let (dir, log) = log_with(2).await;
    drop(log);
    append(&dir, b"\0\0\0\0\0\0\n");
    drop(AuditLog::open(dir.path()).unwrap());
    let all = lines(&dir);
    assert_eq!(all.len(), 3);
    let detail = Record::parse(all[2].as_bytes())
        .unwrap()
        .body
        .detail
        .unwrap();
    assert!(
        detail.starts_with("cut 7 bytes after record 2 at start: a last line that is not a record"),
        "{detail}"
    );

    let edited = lines(&dir)
        .into_iter()
        .map(|l| l.replace("AuditRepair", "AuditRepaid"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    fs::write(dir.path().join(AUDIT_LOG_FILE), &edited).unwrap();
    let err = AuditLog::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("its content does not match its hash: the record was edited; keywarden repairs only a torn last line"),
        "{err}"
    );
    // Nothing was changed.
    assert_eq!(
        fs::read_to_string(dir.path().join(AUDIT_LOG_FILE)).unwrap(),
        edited
    );
}

#[tokio::test]
async fn a_failed_write_leaves_the_chain_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    // Writes to /dev/full fail with ENOSPC, as a full disk would.
    let full = fs::OpenOptions::new()
        .append(true)
        .open("/dev/full")
        .unwrap();
    let log = AuditLog::with_file(dir.path(), full).unwrap();
    for _ in 0..2 {
        log.record(Entry {
            action: "CreateTenant",
            caller: "unix".into(),
            ..Entry::default()
        })
        .await
        .unwrap_err();
        assert_eq!(log.head().await.unwrap(), (0, GENESIS.to_owned()));
    }
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
        Record::parse(line.as_bytes())
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
        r#"Entry { action: "ShredSubject", phase: Asked, caller: "unix", tenant: None, subject: Some(<17 bytes>), outcome: None, detail: None, trace_id: None }"#
    );
}

#[test]
fn the_tail_is_read_from_the_end_whatever_the_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let check = |text: &str, complete: usize, expected: Option<(usize, &str)>| {
        std::fs::write(&path, text).unwrap();
        let found = file::tail(&fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(found.len, text.len() as u64);
        assert_eq!(found.complete, complete as u64);
        assert_eq!(
            found
                .last
                .map(|(at, line)| (at as usize, String::from_utf8(line).unwrap())),
            expected.map(|(at, line)| (at, line.to_owned()))
        );
    };
    check("", 0, None);
    check("torn", 0, None);
    check("\n\n", 2, Some((1, "")));
    check("one\n", 4, Some((0, "one")));
    check("one\ntwo\ntor", 8, Some((4, "two")));
    let long = "x".repeat(300 * 1024);
    check(
        &format!("first\n{long}\n"),
        6 + long.len() + 1,
        Some((6, long.as_str())),
    );
    check(
        &format!("{long}\n"),
        long.len() + 1,
        Some((0, long.as_str())),
    );
    check(&format!("a\nb\n{long}"), 4, Some((2, "b")));
    let many: String = (0..20_000).map(|i| format!("record {i}\n")).collect();
    check(&many, many.len(), Some((many.len() - 13, "record 19999")));
    // A window that starts exactly at the last line's first byte.
    let b = "b".repeat(64 * 1024 - 1);
    let exact = format!("{}\n{b}\n", "a".repeat(10));
    check(&exact, exact.len(), Some((11, b.as_str())));
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

#[tokio::test]
async fn a_trace_id_is_written_before_prev_hashed_and_checked_for_its_form() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    for trace in [None, Some(trace_id)] {
        log.record(Entry {
            action: "CreateTenant",
            caller: "unix".into(),
            tenant: Some("acme".into()),
            detail: Some("x".into()),
            trace_id: trace.map(str::to_owned),
            ..Entry::default()
        })
        .await
        .unwrap();
    }
    let all = lines(&dir);
    // Without a trace id, the record is the bytes it always was.
    assert!(!all[0].contains("trace_id"), "{}", all[0]);
    assert!(
        all[1].contains(&format!(r#""detail":"x","trace_id":"{trace_id}","prev":"#)),
        "{}",
        all[1]
    );
    // Hashed like every field: the rule's hashed bytes include it.
    assert_eq!(
        Record::parse(all[1].as_bytes()).unwrap().hash,
        hex::encode(Sha256::digest(hashed(&all[1]).as_bytes()))
    );
    assert_eq!(check(&all).unwrap().records, 2);
    // Edited, it fails; re-hashed in a form keywarden never writes, too.
    let edited = all[1].replace(trace_id, "5bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(Record::parse(edited.as_bytes()), Err(NotARecord::Edited));
    let body = hashed(&all[1]);
    for bad in [
        "4BF92F3577B34DA6A3CE929D0E0E4736",
        "00000000000000000000000000000000",
        "4bf92f",
        "traceparent",
    ] {
        let line = forged(&body.replace(trace_id, bad));
        assert_eq!(
            Record::parse(line.as_bytes()),
            Err(NotARecord::NotCanonical),
            "{bad}"
        );
    }
}
