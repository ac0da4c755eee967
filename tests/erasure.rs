//! Erasure and its guarantees, end to end: real `keywarden serve` processes on
//! unix sockets in temporary directories, each with its own data directory,
//! driven through the CLI binary.
//!
//! - the embedded default (no configuration): the admin token the first start
//!   makes, what the unix socket allows without it;
//! - erasure receipts: what they say, that they match the audit log, and that
//!   no single changed byte and no other sidecar's key verifies them;
//! - a canary grep: no plaintext, subject id, token, ciphertext or key byte
//!   reaches the log (at debug level), the CLI's output or the audit log.

mod common;

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD},
};
use keywarden::{
    api::pb,
    audit::{AUDIT_KEY_FILE, AUDIT_LOG_FILE},
    auth::tokens::ADMIN_TOKEN_FILE,
    envelope::text,
    kms::local::ROOT_KEY_FILE,
    receipt::{RECEIPT_KEY_FILE, RECEIPT_PUBLIC_KEY_FILE, Receipt, ReceiptError, ReceiptKind},
};
use serde_json::Value;

use common::process::{Out, Sidecar, cli_at, keywarden};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random source");
    hex::encode(bytes)
}

/// Runs the CLI against `addr` with extra environment variables and no
/// embedded admin token to find (KEYWARDEN_DATA_DIR points nowhere).
fn cli_env(addr: &str, env: &[(&str, &str)], args: &[&str]) -> Out {
    let output = keywarden()
        .env("KEYWARDEN_DATA_DIR", "/nonexistent/keywarden-test")
        .envs(env.iter().copied())
        .arg("--addr")
        .arg(addr)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the keywarden client");
    Out {
        status: output.status,
        stdout: output.stdout,
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// `keywarden receipt verify - --public-key KEY` with `receipt` on stdin.
fn verify_stdin(receipt: &[u8], public_key: &str) -> Out {
    let mut child = keywarden()
        .args(["receipt", "verify", "-", "--public-key", public_key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keywarden receipt verify");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(receipt)
        .expect("write the receipt to stdin");
    let output = child.wait_with_output().expect("wait for receipt verify");
    Out {
        status: output.status,
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `keywarden receipt verify FILE --public-key KEY`.
fn verify_file(file: &Path, public_key: &str) -> Out {
    let output = keywarden()
        .arg("receipt")
        .arg("verify")
        .arg(file)
        .args(["--public-key", public_key])
        .stdin(Stdio::null())
        .output()
        .expect("run keywarden receipt verify");
    Out {
        status: output.status,
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn stdout_text(out: &Out) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// A refused call: exit 1, nothing on stdout, stderr `PERMISSION_DENIED: `.
fn assert_denied(out: &Out, what: &str) {
    out.assert_failure("PERMISSION_DENIED", what);
}

/// The audit log's records, parsed.
fn audit_records(data: &Path) -> Vec<Value> {
    fs::read_to_string(data.join(AUDIT_LOG_FILE))
        .expect("read the audit log")
        .lines()
        .map(|line| serde_json::from_str(line).expect("an audit record is JSON"))
        .collect()
}

fn is_hex64(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---------------------------------------------------------------------------
// 1. The embedded default
// ---------------------------------------------------------------------------

#[test]
fn embedded_default_admin_token_is_made_once_and_gates_the_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let socket = tmp.path().join("kw.sock");
    assert!(!data.exists());

    // First start: nothing configured but where to keep data and listen.
    let sidecar = Sidecar::start(&data, &socket);
    let token_path = data.join(ADMIN_TOKEN_FILE);
    let token = fs::read_to_string(&token_path).expect("the first start made admin.token");
    let mode = fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin.token mode {mode:o}");
    assert!(token.trim().starts_with("kwt_"), "not a kwt_ token");
    assert!(token.trim().len() > 40, "a short admin token");
    assert!(
        sidecar.log().contains("created the admin token"),
        "{}",
        sidecar.log()
    );

    // As the quick start: the CLI finds the token through KEYWARDEN_DATA_DIR.
    let operator = |args: &[&str]| -> String {
        let out = sidecar.cli(args);
        assert!(
            !out.stderr.contains("PERMISSION_DENIED"),
            "{args:?}: {}",
            out.stderr
        );
        out.assert_success(args);
        stdout_text(&out)
    };
    let created = operator(&["tenant", "create", "acme"]);
    assert!(created.contains("tenant:   acme"), "{created}");
    let by_operator = sidecar.encrypt(&["--tenant", "acme", "operator's data"]);
    let by_operator_subject =
        sidecar.encrypt(&["--tenant", "acme", "--subject", "alice", "alice's data"]);
    assert_eq!(
        operator(&["decrypt", "--tenant", "acme", &by_operator]),
        "operator's data"
    );
    assert!(operator(&["tenant", "show", "acme"]).contains("state:    active"));

    // No token on the unix socket: the data plane works...
    let addr = sidecar.addr();
    let out = cli_at(&addr, &["encrypt", "--tenant", "acme", "app's data"], None);
    out.assert_success(&["encrypt (no token)"]);
    let by_app = stdout_text(&out).trim_end().to_owned();
    assert!(by_app.starts_with("kw1:"), "{by_app}");
    for (ciphertext, plaintext) in [
        (&by_operator, "operator's data"),
        (&by_operator_subject, "alice's data"),
        (&by_app, "app's data"),
    ] {
        let out = cli_at(&addr, &["decrypt", "--tenant", "acme", ciphertext], None);
        out.assert_success(&["decrypt (no token)"]);
        assert_eq!(stdout_text(&out), plaintext);
    }
    assert_eq!(
        operator(&["decrypt", "--tenant", "acme", &by_app]),
        "app's data"
    );

    // ...and the control plane is refused, changing nothing.
    let out = cli_at(&addr, &["tenant", "create", "intruder"], None);
    assert_denied(&out, "tenant create without a token");
    assert!(
        out.stderr.contains("unix may not admin:create"),
        "{}",
        out.stderr
    );
    sidecar
        .cli(&["tenant", "show", "intruder"])
        .assert_failure("NOT_FOUND", "the refused tenant create made a tenant");

    for (args, names) in [
        (
            &["tenant", "show", "acme"][..],
            Some("unix may not admin:read"),
        ),
        (
            &["tenant", "shred", "acme", "--confirm", "acme"],
            Some("unix may not admin:shred"),
        ),
        (&["subject", "shred", "--tenant", "acme", "alice"], None),
    ] {
        let out = cli_at(&addr, args, None);
        assert_denied(&out, &format!("{args:?} without a token"));
        if let Some(needle) = names {
            assert!(out.stderr.contains(needle), "{}", out.stderr);
        }
    }
    for args in [&["tenant", "list"][..], &["audit", "head"]] {
        assert_denied(
            &cli_at(&addr, args, None),
            &format!("{args:?} without a token"),
        );
    }

    // The tenant and alice are intact: everything still decrypts, either way.
    for (ciphertext, plaintext) in [
        (&by_operator, "operator's data"),
        (&by_operator_subject, "alice's data"),
        (&by_app, "app's data"),
    ] {
        assert_eq!(
            operator(&["decrypt", "--tenant", "acme", ciphertext]),
            plaintext
        );
        let out = cli_at(&addr, &["decrypt", "--tenant", "acme", ciphertext], None);
        out.assert_success(&["decrypt (no token) after refused shreds"]);
        assert_eq!(stdout_text(&out), plaintext);
    }
    let shown = operator(&["tenant", "show", "acme"]);
    assert!(shown.contains("state:    active"), "{shown}");
    assert!(shown.contains("primary:  v1"), "{shown}");

    // The audit log: each refusal counted as refused, by "unix"; no refused
    // call got as far as an "asked" record. (Refusals are counted, and the
    // counts written when the sidecar stops.)
    let (status, log) = sidecar.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    let records = audit_records(&data);
    for action in ["CreateTenant", "GetTenant", "ShredTenant", "ShredSubject"] {
        assert!(
            records.iter().any(|r| r["action"] == action
                && r["phase"] == "refused"
                && r["caller"] == "unix"
                && r["outcome"] == "PERMISSION_DENIED"),
            "no refused {action} record by unix: {records:#?}"
        );
    }
    // (Its data-plane calls are counted, phase "counted".)
    assert!(
        !records
            .iter()
            .any(|r| r["caller"] == "unix" && (r["phase"] == "asked" || r["phase"] == "answered")),
        "a call without a token got past the policy: {records:#?}"
    );
    assert!(
        !records.iter().any(
            |r| (r["action"] == "ShredTenant" || r["action"] == "ShredSubject")
                && r["phase"] != "refused"
        ),
        "a shred got past the policy: {records:#?}"
    );

    // Second start: the same token, not a new one.
    let sidecar = Sidecar::start(&data, &socket);
    let again = fs::read_to_string(&token_path).expect("admin.token after the restart");
    assert_eq!(again, token, "the second start replaced the admin token");
    let mode = fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin.token mode after the restart {mode:o}");
    assert!(
        !sidecar.log().contains("created the admin token"),
        "{}",
        sidecar.log()
    );
    let shown = sidecar.ok(&["tenant", "show", "acme"]);
    assert!(shown.contains("state:    active"), "{shown}");
    assert_eq!(
        sidecar.ok(&["decrypt", "--tenant", "acme", &by_app]),
        "app's data"
    );
    assert_denied(
        &cli_at(&sidecar.addr(), &["tenant", "show", "acme"], None),
        "tenant show without a token after the restart",
    );
    let (status, log) = sidecar.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
}

// ---------------------------------------------------------------------------
// 2. Erasure receipts
// ---------------------------------------------------------------------------

/// A receipt a sidecar wrote, and what is known about how it came to be.
struct Written {
    file: PathBuf,
    bytes: Vec<u8>,
    kind: ReceiptKind,
    tenant: &'static str,
    action: &'static str,
    /// The raw subject id, for subject receipts.
    subject: Option<&'static str>,
    destroyed_key_versions: u32,
    destroyed_subject_keys: u64,
}

/// Checks one receipt: the CLI verifies it (from stdin) and prints it, the
/// library agrees, its fields say what was destroyed, by whom, and point at
/// the "asked" audit record of the shred.
fn check_receipt(written: &Written, public_key: &str, records: &[Value]) -> Receipt {
    let text = std::str::from_utf8(&written.bytes).expect("the receipt is UTF-8");
    assert!(text.is_ascii(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(text.ends_with('\n'), "{text:?}");
    assert!(lines[1].starts_with("ed25519:"), "{text}");

    // The CLI: exit 0, "ok: signed by KEY" and the receipt, pretty.
    let out = verify_stdin(&written.bytes, public_key);
    out.assert_success(&["receipt", "verify", "-"]);
    let printed = stdout_text(&out);
    let (first, json) = printed.split_once('\n').expect("two parts");
    assert_eq!(first, format!("ok: signed by {public_key}"), "{printed}");
    let printed: Value = serde_json::from_str(json).expect("the CLI prints the receipt as JSON");
    let signed: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(printed, signed, "the CLI prints what was signed");

    // The public key given as a file works the same.
    let key_file = written.file.with_extension("pub");
    fs::write(&key_file, format!("{public_key}\n")).unwrap();
    let out = verify_stdin(&written.bytes, key_file.to_str().unwrap());
    out.assert_success(&["receipt", "verify", "-", "--public-key", "FILE"]);

    let receipt = keywarden::receipt::verify(text, public_key).expect("the library verifies it");
    assert_eq!(receipt.version, 1);
    assert_eq!(receipt.kind, written.kind);
    assert_eq!(
        signed["kind"],
        match written.kind {
            ReceiptKind::Tenant => "tenant",
            ReceiptKind::Subject => "subject",
        }
    );
    assert_eq!(receipt.tenant, written.tenant);
    assert_eq!(receipt.by, "token:admin");
    assert_eq!(receipt.signer, public_key);
    assert!(!receipt.already_shredded);
    assert_eq!(
        receipt.destroyed_key_versions, written.destroyed_key_versions,
        "{text}"
    );
    assert_eq!(
        receipt.destroyed_subject_keys, written.destroyed_subject_keys,
        "{text}"
    );
    assert!(
        receipt.shredded_at <= receipt.issued_at,
        "shredded {} after issued {}",
        receipt.shredded_at,
        receipt.issued_at
    );
    let backups = receipt
        .backups_may_hold_copies_until
        .as_deref()
        .expect("backups_may_hold_copies_until is present");
    assert!(
        backups > receipt.shredded_at.as_str(),
        "{backups} vs {}",
        receipt.shredded_at
    );
    assert!(
        signed
            .as_object()
            .unwrap()
            .contains_key("backups_may_hold_copies_until")
    );
    // A local root key: no dedicated KMS key to speak of.
    assert_eq!(receipt.root_key_id, None);
    assert_eq!(receipt.root_key_deletion_date, None);

    // The subject appears only as the audit log's keyed hash.
    match written.subject {
        Some(raw) => {
            let hash = receipt
                .subject
                .as_deref()
                .expect("a subject receipt names it");
            assert!(is_hex64(hash), "subject {hash:?} is not a 64-hex hash");
            assert_ne!(hash, raw);
            assert!(!text.contains(raw), "the receipt holds the raw subject id");
        }
        None => {
            assert_eq!(receipt.subject, None);
            assert!(!signed.as_object().unwrap().contains_key("subject"));
        }
    }

    // audit_record is the hash of the "asked" record of this shred.
    assert!(
        is_hex64(&receipt.audit_record),
        "audit_record {:?}",
        receipt.audit_record
    );
    let matching: Vec<&Value> = records
        .iter()
        .filter(|r| r["hash"] == receipt.audit_record.as_str())
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "audit_record {} is not the hash of exactly one audit record: {records:#?}",
        receipt.audit_record
    );
    let record = matching[0];
    assert_eq!(record["phase"], "asked", "{record}");
    assert_eq!(record["action"], written.action, "{record}");
    assert_eq!(record["tenant"], written.tenant, "{record}");
    assert_eq!(record["caller"], "token:admin", "{record}");
    match &receipt.subject {
        Some(hash) => assert_eq!(record["subject"], hash.as_str(), "{record}"),
        None => assert!(record.get("subject").is_none(), "{record}"),
    }
    // ...and its call was answered OK afterwards.
    assert!(
        records.iter().any(|r| r["action"] == written.action
            && r["phase"] == "answered"
            && r["outcome"] == "OK"
            && r["tenant"] == written.tenant
            && r["seq"].as_u64() > record["seq"].as_u64()),
        "{records:#?}"
    );
    receipt
}

#[test]
fn shred_receipts_verify_match_the_audit_log_and_no_changed_byte_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sidecar = Sidecar::start(&data, &tmp.path().join("kw.sock"));

    sidecar.ok(&["tenant", "create", "acme"]);
    sidecar.ok(&["tenant", "create", "globex"]);
    let bob = sidecar.encrypt(&["--tenant", "acme", "--subject", "bob-8812", "bob's data"]);
    let acme = sidecar.encrypt(&["--tenant", "acme", "acme's data"]);
    let carol = sidecar.encrypt(&["--tenant", "globex", "--subject", "carol", "carol's"]);
    sidecar.ok(&["tenant", "rotate", "globex"]);
    let globex = sidecar.encrypt(&["--tenant", "globex", "globex's data"]);

    let subject_file = tmp.path().join("subject.receipt");
    let said = sidecar.ok(&[
        "subject",
        "shred",
        "--tenant",
        "acme",
        "bob-8812",
        "--receipt",
        subject_file.to_str().unwrap(),
    ]);
    assert!(
        said.contains("shredded the subject's key in tenant acme"),
        "{said}"
    );
    assert!(
        !said.contains("ed25519:"),
        "the receipt went to stdout: {said}"
    );

    let tenant_file = tmp.path().join("tenant.receipt");
    let said = sidecar.ok(&[
        "tenant",
        "shred",
        "globex",
        "--confirm",
        "globex",
        "--receipt",
        tenant_file.to_str().unwrap(),
    ]);
    assert!(
        said.contains("shredded tenant globex at")
            && said.contains("destroyed 2 key version(s) and 1 subject key(s)"),
        "{said}"
    );
    assert!(
        !said.contains("ed25519:"),
        "the receipt went to stdout: {said}"
    );

    // The shreds took: bob and globex are gone, the rest of acme is not.
    sidecar
        .cli(&["decrypt", "--tenant", "acme", &bob])
        .assert_failure("FAILED_PRECONDITION", "bob after his shred");
    for ciphertext in [&carol, &globex] {
        sidecar
            .cli(&["decrypt", "--tenant", "globex", ciphertext])
            .assert_failure("FAILED_PRECONDITION", "globex after its shred");
    }
    assert_eq!(
        sidecar.ok(&["decrypt", "--tenant", "acme", &acme]),
        "acme's data"
    );

    let public_key = fs::read_to_string(data.join(RECEIPT_PUBLIC_KEY_FILE))
        .expect("receipt.pub in the data dir")
        .trim()
        .to_owned();
    assert!(public_key.starts_with("ed25519:"), "{public_key}");
    let public_key_file = data.join(RECEIPT_PUBLIC_KEY_FILE);
    let public_key_file = public_key_file.to_str().unwrap();

    let records = audit_records(&data);
    let receipts = [
        Written {
            bytes: fs::read(&subject_file).expect("the subject receipt file"),
            file: subject_file,
            kind: ReceiptKind::Subject,
            tenant: "acme",
            action: "ShredSubject",
            subject: Some("bob-8812"),
            destroyed_key_versions: 0,
            destroyed_subject_keys: 1,
        },
        Written {
            bytes: fs::read(&tenant_file).expect("the tenant receipt file"),
            file: tenant_file,
            kind: ReceiptKind::Tenant,
            tenant: "globex",
            action: "ShredTenant",
            subject: None,
            destroyed_key_versions: 2,
            destroyed_subject_keys: 1,
        },
    ];
    for written in &receipts {
        check_receipt(written, &public_key, &records);
        // Against receipt.pub itself, as an auditor would run it.
        verify_stdin(&written.bytes, public_key_file).assert_success(&[
            "receipt",
            "verify",
            "-",
            "--public-key",
            public_key_file,
        ]);
    }

    // Every single changed byte fails: all positions through the library and
    // through the CLI; the CLI also reads a sample of them from files.
    let started = Instant::now();
    let mut cli_runs = 0;
    for written in &receipts {
        let original = &written.bytes;
        let positions = original.len();
        let sample_every = positions.div_ceil(20);
        for position in 0..positions {
            let mut changed = original.clone();
            changed[position] ^= 0x01;
            let changed_text = String::from_utf8(changed.clone()).expect("still ASCII");
            let verdict = keywarden::receipt::verify(&changed_text, &public_key);
            assert!(
                verdict.is_err(),
                "{:?} receipt: byte {position} ({:?} -> {:?}) changed and it still verifies",
                written.kind,
                original[position] as char,
                changed[position] as char
            );

            let out = verify_stdin(&changed, &public_key);
            cli_runs += 1;
            assert_eq!(
                out.status.code(),
                Some(1),
                "{:?} receipt, byte {position} changed: receipt verify exited {} (stderr {:?})",
                written.kind,
                out.status,
                out.stderr
            );
            assert!(
                out.stderr.starts_with("the receipt does not verify: "),
                "{}",
                out.stderr
            );
            assert!(
                out.stdout.is_empty(),
                "byte {position}: printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            );

            // The file form proves something only while the unchanged file
            // verifies: see receipt_verify_reads_the_receipt_from_the_named_file.
            if position % sample_every == 0 || position == positions - 1 {
                let file = tmp.path().join(format!("flipped-{position}.receipt"));
                fs::write(&file, &changed).unwrap();
                let out = verify_file(&file, public_key_file);
                cli_runs += 1;
                assert!(
                    !out.status.success(),
                    "{:?} receipt file, byte {position} changed: receipt verify succeeded",
                    written.kind
                );
            }
        }
        eprintln!(
            "{:?} receipt: {positions} bytes, each changed alone, none verifies",
            written.kind
        );
    }
    eprintln!("byte flips: {cli_runs} CLI runs in {:?}", started.elapsed());

    // Another sidecar's key verifies none of them.
    let other_data = tmp.path().join("other-data");
    let other = Sidecar::start(&other_data, &tmp.path().join("other.sock"));
    let other_key_file = other_data.join(RECEIPT_PUBLIC_KEY_FILE);
    let other_key = fs::read_to_string(&other_key_file)
        .unwrap()
        .trim()
        .to_owned();
    assert_ne!(other_key, public_key);
    for written in &receipts {
        let text = std::str::from_utf8(&written.bytes).unwrap();
        assert_eq!(
            keywarden::receipt::verify(text, &other_key),
            Err(ReceiptError::BadSignature)
        );
        let out = verify_stdin(&written.bytes, other_key_file.to_str().unwrap());
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert!(
            out.stderr
                .starts_with("the receipt does not verify: the signature does not verify"),
            "{}",
            out.stderr
        );
        assert!(out.stdout.is_empty());
    }
    let (status, _) = other.terminate();
    assert!(status.success());
    let (status, log) = sidecar.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
}

/// `receipt verify FILE` reads the receipt from FILE, as its help says.
#[test]
fn receipt_verify_reads_the_receipt_from_the_named_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sidecar = Sidecar::start(&data, &tmp.path().join("kw.sock"));
    sidecar.ok(&["tenant", "create", "acme"]);
    let file = tmp.path().join("acme.receipt");
    sidecar.ok(&[
        "tenant",
        "shred",
        "acme",
        "--confirm",
        "acme",
        "--receipt",
        file.to_str().unwrap(),
    ]);
    let public_key_file = data.join(RECEIPT_PUBLIC_KEY_FILE);
    let public_key_file = public_key_file.to_str().unwrap();
    // The same bytes on stdin verify (see the test above).
    verify_stdin(&fs::read(&file).unwrap(), public_key_file).assert_success(&["verify -"]);

    let out = verify_file(&file, public_key_file);
    assert!(
        out.status.success(),
        "`keywarden receipt verify {} --public-key {public_key_file}` failed ({}): {}",
        file.display(),
        out.status,
        out.stderr
    );
    assert!(
        stdout_text(&out).starts_with("ok: signed by ed25519:"),
        "{}",
        stdout_text(&out)
    );
    let (status, _) = sidecar.terminate();
    assert!(status.success());
}

// ---------------------------------------------------------------------------
// 3. Secrets never leak
// ---------------------------------------------------------------------------

/// Everything a secret must never appear in, by where it came from.
#[derive(Default)]
struct Haystack {
    parts: Vec<(String, Vec<u8>)>,
}

impl Haystack {
    fn add(&mut self, what: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.parts.push((what.into(), bytes.into()));
    }

    /// A CLI run's stderr and, unless it is the secret itself (the output of
    /// a successful encrypt or decrypt), its stdout.
    fn run(&mut self, what: &str, out: &Out, keep_stdout: bool) {
        if keep_stdout {
            self.add(format!("{what}: stdout"), out.stdout.clone());
        }
        self.add(format!("{what}: stderr"), out.stderr.clone());
    }

    fn bytes(&self) -> usize {
        self.parts.iter().map(|(_, b)| b.len()).sum()
    }
}

/// The forms a secret might be printed in.
fn forms_of_bytes(name: &str, bytes: &[u8]) -> Vec<(String, String)> {
    vec![
        (format!("{name} (hex)"), hex::encode(bytes)),
        (format!("{name} (HEX)"), hex::encode_upper(bytes)),
        (format!("{name} (base64)"), STANDARD_NO_PAD.encode(bytes)),
        (format!("{name} (base64url)"), URL_SAFE_NO_PAD.encode(bytes)),
        (format!("{name} (bytes Debug)"), format!("{bytes:?}")),
    ]
}

#[test]
fn no_secret_reaches_the_log_the_cli_output_or_the_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sidecar =
        Sidecar::start_with_env(&data, &tmp.path().join("kw.sock"), &[("RUST_LOG", "debug")]);
    let addr = sidecar.addr();
    let canary = format!("CANARY-{}", random_hex(16));
    let subject = format!("subject-{}", random_hex(8));
    let bogus = format!("kwt_bogus{}", random_hex(16));
    let bogus_jwt = format!("bogus-jwt-{}", random_hex(16));
    let bogus_file = tmp.path().join("bogus.token");
    fs::write(&bogus_file, format!("{bogus}\n")).unwrap();
    let mut hay = Haystack::default();
    let mut ciphertexts: Vec<String> = Vec::new();

    // Admin set-up, through the CLI with the embedded token.
    for args in [
        &["tenant", "create", "acme"][..],
        &["tenant", "create", "other"],
    ] {
        let out = sidecar.cli(args);
        out.assert_success(args);
        hay.run(&args.join(" "), &out, true);
    }

    // Encrypt the canary: tenant key, subject key, and without a token.
    let encrypt = |hay: &mut Haystack, what: &str, out: Out| -> String {
        out.assert_success(&[what]);
        hay.run(what, &out, false);
        stdout_text(&out).trim_end().to_owned()
    };
    let plain = encrypt(
        &mut hay,
        "encrypt",
        sidecar.cli(&["encrypt", "--tenant", "acme", &canary]),
    );
    let of_subject = encrypt(
        &mut hay,
        "encrypt --subject",
        sidecar.cli(&[
            "encrypt",
            "--tenant",
            "acme",
            "--subject",
            &subject,
            &canary,
        ]),
    );
    let from_stdin = encrypt(
        &mut hay,
        "encrypt - (no token)",
        cli_at(
            &addr,
            &["encrypt", "--tenant", "acme", "--subject", &subject, "-"],
            Some(canary.as_bytes()),
        ),
    );
    ciphertexts.extend([plain.clone(), of_subject.clone(), from_stdin.clone()]);

    let decrypt = |hay: &mut Haystack, what: &str, ciphertext: &str| {
        let out = sidecar.cli(&["decrypt", "--tenant", "acme", ciphertext]);
        out.assert_success(&[what]);
        hay.run(what, &out, false);
        assert_eq!(stdout_text(&out), canary, "{what}");
    };
    decrypt(&mut hay, "decrypt", &plain);
    decrypt(&mut hay, "decrypt subject", &of_subject);
    decrypt(&mut hay, "decrypt stdin's", &from_stdin);

    // A blind index of the canary (issue 17): its token is a secret too.
    let index_args = [
        "blind-index",
        "--tenant",
        "acme",
        "--context",
        "column=canary",
        "--bits",
        "256",
        "--transform",
        "case-fold",
        &canary,
    ];
    let out = sidecar.cli(&index_args);
    out.assert_success(&index_args);
    hay.run("blind-index", &out, false);
    let index_token = stdout_text(&out).trim_end().to_owned();
    assert_eq!(index_token.len(), 2 * (4 + 32), "{index_token}");
    let out = sidecar.cli(&["index-key", "rotate", "--tenant", "acme"]);
    out.assert_success(&["index-key rotate"]);
    hay.run("index-key rotate", &out, true);

    // Rotate, then rewrap: the CLI has no rewrap command, so through gRPC.
    let out = sidecar.cli(&["tenant", "rotate", "acme"]);
    out.assert_success(&["tenant rotate"]);
    hay.run("tenant rotate", &out, true);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (rewrapped, refused) = runtime.block_on(async {
        let client = sidecar.client().await;
        let mut crypto = client.crypto();
        let rewrapped = crypto
            .rewrap(pb::RewrapRequest {
                tenant_id: "acme".into(),
                context: Default::default(),
                ciphertext: text::decode(&plain).unwrap(),
            })
            .await
            .expect("rewrap")
            .into_inner();
        assert_eq!(rewrapped.key_version, 2);
        let mut garbled = text::decode(&plain).unwrap();
        let last = garbled.len() - 1;
        garbled[last] ^= 0x01;
        let refused = crypto
            .rewrap(pb::RewrapRequest {
                tenant_id: "acme".into(),
                context: Default::default(),
                ciphertext: garbled,
            })
            .await
            .expect_err("rewrap of a changed ciphertext");
        (text::encode(&rewrapped.ciphertext), refused)
    });
    // Dropping the runtime closes the client's connection: an idle
    // connection whose client no longer answers would hold up the drain.
    drop(runtime);
    hay.add("rewrap refused: message", refused.message().to_owned());
    ciphertexts.push(rewrapped.clone());
    decrypt(&mut hay, "decrypt rewrapped", &rewrapped);

    // Shred the subject; its receipt goes to stdout.
    let out = sidecar.cli(&["subject", "shred", "--tenant", "acme", &subject]);
    out.assert_success(&["subject shred"]);
    let said = stdout_text(&out);
    let receipt_line = said
        .lines()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no receipt printed: {said}"));
    let subject_hash = serde_json::from_str::<Value>(receipt_line).unwrap()["subject"]
        .as_str()
        .expect("the receipt names the subject by its hash")
        .to_owned();
    hay.run("subject shred", &out, true);

    // Calls that fail.
    let mut garbled = plain.clone().into_bytes();
    let middle = garbled.len() / 2;
    garbled[middle] = if garbled[middle] == b'A' { b'B' } else { b'A' };
    let garbled = String::from_utf8(garbled).unwrap();
    ciphertexts.push(garbled.clone());
    let bogus_file_arg = bogus_file.to_str().unwrap();
    let failing: Vec<(&str, &str, Out)> = vec![
        (
            "decrypt a changed ciphertext",
            "INVALID_ARGUMENT",
            sidecar.cli(&["decrypt", "--tenant", "acme", &garbled]),
        ),
        (
            "decrypt a truncated ciphertext",
            "INVALID_ARGUMENT",
            sidecar.cli(&["decrypt", "--tenant", "acme", &plain[..plain.len() - 8]]),
        ),
        (
            "decrypt under the wrong tenant",
            "INVALID_ARGUMENT",
            sidecar.cli(&["decrypt", "--tenant", "other", &plain]),
        ),
        (
            "decrypt for an unknown tenant",
            "NOT_FOUND",
            sidecar.cli(&["decrypt", "--tenant", "nobody", &plain]),
        ),
        (
            "encrypt for an unknown tenant",
            "NOT_FOUND",
            sidecar.cli(&["encrypt", "--tenant", "nobody", &canary]),
        ),
        (
            "blind-index with bits out of range",
            "INVALID_ARGUMENT",
            sidecar.cli(&["blind-index", "--tenant", "acme", "--bits", "300", &canary]),
        ),
        (
            "blind-index for an unknown tenant",
            "NOT_FOUND",
            sidecar.cli(&["blind-index", "--tenant", "nobody", &canary]),
        ),
        (
            "decrypt of a shredded subject",
            "FAILED_PRECONDITION",
            sidecar.cli(&["decrypt", "--tenant", "acme", &of_subject]),
        ),
        (
            "encrypt for a shredded subject",
            "FAILED_PRECONDITION",
            sidecar.cli(&[
                "encrypt",
                "--tenant",
                "acme",
                "--subject",
                &subject,
                &canary,
            ]),
        ),
        (
            "shred the subject without a token",
            "PERMISSION_DENIED",
            cli_at(
                &addr,
                &["subject", "shred", "--tenant", "acme", &subject],
                None,
            ),
        ),
        (
            "encrypt with a bogus --token-file",
            "UNAUTHENTICATED",
            cli_env(
                &addr,
                &[],
                &[
                    "--token-file",
                    bogus_file_arg,
                    "encrypt",
                    "--tenant",
                    "acme",
                    &canary,
                ],
            ),
        ),
        (
            "subject shred with a bogus --token-file",
            "UNAUTHENTICATED",
            cli_env(
                &addr,
                &[],
                &[
                    "--token-file",
                    bogus_file_arg,
                    "subject",
                    "shred",
                    "--tenant",
                    "acme",
                    &subject,
                ],
            ),
        ),
        (
            "decrypt with a bogus KEYWARDEN_TOKEN",
            "UNAUTHENTICATED",
            cli_env(
                &addr,
                &[("KEYWARDEN_TOKEN", &bogus)],
                &["decrypt", "--tenant", "acme", &plain],
            ),
        ),
        (
            "tenant show with a bogus KEYWARDEN_TOKEN",
            "UNAUTHENTICATED",
            cli_env(
                &addr,
                &[("KEYWARDEN_TOKEN", &bogus)],
                &["tenant", "show", "acme"],
            ),
        ),
        (
            "encrypt with a bogus non-kwt KEYWARDEN_TOKEN",
            "UNAUTHENTICATED",
            cli_env(
                &addr,
                &[("KEYWARDEN_TOKEN", &bogus_jwt)],
                &[
                    "encrypt",
                    "--tenant",
                    "acme",
                    "--subject",
                    &subject,
                    &canary,
                ],
            ),
        ),
    ];
    for (what, code, out) in &failing {
        out.assert_failure(code, what);
        hay.run(what, out, true);
    }

    let out = sidecar.cli(&["audit", "head"]);
    out.assert_success(&["audit head"]);
    hay.run("audit head", &out, true);

    let admin_token = fs::read_to_string(data.join(ADMIN_TOKEN_FILE))
        .unwrap()
        .trim()
        .to_owned();
    let (status, log) = sidecar.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("keywarden serving"), "{log}");
    assert!(
        log.lines().any(|line| line.contains(" DEBUG ")),
        "RUST_LOG=debug logged nothing at debug level:\n{log}"
    );
    hay.add("the sidecar's log", log);
    let audit_log = fs::read(data.join(AUDIT_LOG_FILE)).unwrap();
    // Positive controls: what was searched is what was meant to be.
    let audit_text = String::from_utf8_lossy(&audit_log);
    assert!(
        audit_text.contains(&subject_hash) && audit_text.contains("\"ShredSubject\""),
        "the audit log does not record the subject's shred by its hash:\n{audit_text}"
    );
    assert!(
        audit_text.contains("\"outcome\":\"UNAUTHENTICATED\""),
        "the bogus tokens' refusals are not in the audit log:\n{audit_text}"
    );
    hay.add("audit.log", audit_log);
    let out = keywarden()
        .args(["audit", "verify"])
        .arg(data.join(AUDIT_LOG_FILE))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    hay.add("audit verify: stdout", out.stdout);
    hay.add("audit verify: stderr", out.stderr);

    // What must appear nowhere.
    let mut needles: Vec<(String, String)> = vec![
        ("the canary plaintext".into(), canary.clone()),
        ("the subject id".into(), subject.clone()),
        ("the admin token".into(), admin_token.clone()),
        (
            "the admin token's random part".into(),
            admin_token.trim_start_matches("kwt_").to_owned(),
        ),
        ("the bogus token".into(), bogus.clone()),
        ("the bogus non-kwt token".into(), bogus_jwt.clone()),
    ];
    needles.extend(forms_of_bytes("the canary", canary.as_bytes()));
    needles.push(("the blind-index token (hex)".into(), index_token.clone()));
    needles.extend(forms_of_bytes(
        "the blind-index token",
        &hex::decode(&index_token).unwrap(),
    ));
    needles.extend(forms_of_bytes("the subject id", subject.as_bytes()));
    for (i, ciphertext) in ciphertexts.iter().enumerate() {
        let body = ciphertext.strip_prefix("kw1:").expect("kw1: text");
        needles.push((format!("ciphertext {i}"), ciphertext.clone()));
        needles.push((format!("ciphertext {i}'s base64 body"), body.to_owned()));
        if let Ok(raw) = text::decode(ciphertext) {
            needles.push((format!("ciphertext {i} (hex)"), hex::encode(&raw)));
            needles.push((format!("ciphertext {i} (base64)"), STANDARD.encode(&raw)));
        }
    }
    for file in [ROOT_KEY_FILE, AUDIT_KEY_FILE, RECEIPT_KEY_FILE] {
        let key = fs::read(data.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(key.len(), 32, "{file}");
        needles.extend(forms_of_bytes(file, &key));
    }
    // Any other key file the data dir holds.
    for entry in fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".key")
            && ![ROOT_KEY_FILE, AUDIT_KEY_FILE, RECEIPT_KEY_FILE].contains(&name.as_str())
        {
            needles.extend(forms_of_bytes(&name, &fs::read(&path).unwrap()));
        }
    }

    let mut leaks = Vec::new();
    for (what, bytes) in &hay.parts {
        let text = String::from_utf8_lossy(bytes);
        for (secret, needle) in &needles {
            assert!(needle.len() >= 16, "{secret} is too short to search for");
            if text.contains(needle.as_str()) {
                leaks.push(format!("{secret} ({needle}) appears in {what}"));
            }
        }
    }
    eprintln!(
        "canary grep: searched {} bytes in {} outputs ({} of them the sidecar's log) for {} secret forms",
        hay.bytes(),
        hay.parts.len(),
        hay.parts
            .iter()
            .find(|(w, _)| w == "the sidecar's log")
            .map_or(0, |(_, b)| b.len()),
        needles.len()
    );
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
