//! The sidecar as a process: real `keywarden serve` processes on unix sockets
//! in a temporary directory, driven through the CLI binary (and, where a call
//! must be in flight, through the library's gRPC client).

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use keywarden::api::pb;

use common::process::{PATIENCE, Sidecar, cli_at, keywarden, sigterm, wait_for_exit};

/// Decrypts through the CLI and returns the plaintext as text.
fn decrypt(sidecar: &Sidecar, args: &[&str]) -> String {
    let mut full = vec!["decrypt"];
    full.extend_from_slice(args);
    sidecar.ok(&full)
}

#[test]
fn restart_keeps_every_key_and_every_tombstone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let socket = tmp.path().join("kw.sock");

    let first = Sidecar::start(&data, &socket);
    for tenant in ["a", "b", "c"] {
        first.ok(&["tenant", "create", tenant]);
    }
    let a_v1 = first.encrypt(&[
        "--tenant",
        "a",
        "--context",
        "table=patients",
        "--context",
        "row=8812",
        "a under v1",
    ]);
    let alice = first.encrypt(&["--tenant", "a", "--subject", "alice", "alice's data"]);
    let bob = first.encrypt(&["--tenant", "a", "--subject", "bob", "bob's data"]);
    let b = first.encrypt(&["--tenant", "b", "b's data"]);
    let c = first.encrypt(&["--tenant", "c", "c's data"]);
    let rotated = first.ok(&["tenant", "rotate", "a"]);
    assert!(rotated.contains("primary:  v2"), "{rotated}");
    let a_v2 = first.encrypt(&["--tenant", "a", "--context", "table=patients", "a under v2"]);
    first.ok(&["tenant", "shred", "c", "--confirm", "c"]);
    first.ok(&["subject", "shred", "--tenant", "a", "bob"]);

    let (status, log) = first.terminate();
    assert_eq!(status.code(), Some(0), "exit after SIGTERM; log:\n{log}");
    assert!(
        !socket.exists(),
        "the socket file is still there after a clean exit; log:\n{log}"
    );

    let second = Sidecar::start(&data, &socket);
    let a_context = ["--context", "table=patients", "--context", "row=8812"];
    assert_eq!(
        decrypt(
            &second,
            &[&["--tenant", "a"][..], &a_context, &[&a_v1]].concat()
        ),
        "a under v1"
    );
    assert_eq!(
        decrypt(
            &second,
            &["--tenant", "a", "--context", "table=patients", &a_v2]
        ),
        "a under v2"
    );
    assert_eq!(decrypt(&second, &["--tenant", "a", &alice]), "alice's data");
    assert_eq!(decrypt(&second, &["--tenant", "b", &b]), "b's data");
    // alice still encrypts under her own key after the restart.
    let alice_again = second.encrypt(&["--tenant", "a", "--subject", "alice", "more"]);
    assert_eq!(decrypt(&second, &["--tenant", "a", &alice_again]), "more");

    // Tenant c's tombstone survived.
    let out = second.cli(&["encrypt", "--tenant", "c", "anything"]);
    out.assert_failure("FAILED_PRECONDITION", "encrypt for shredded tenant c");
    assert!(out.stderr.contains("shredded"), "{}", out.stderr);
    let out = second.cli(&["decrypt", "--tenant", "c", &c]);
    out.assert_failure("FAILED_PRECONDITION", "decrypt for shredded tenant c");
    assert!(out.stderr.contains("shredded"), "{}", out.stderr);
    second
        .cli(&["tenant", "create", "c"])
        .assert_failure("FAILED_PRECONDITION", "re-create shredded tenant c");
    let list = second.ok(&["tenant", "list"]);
    assert!(list.contains("c\tshredded\t"), "{list}");
    assert!(list.contains("a\tactive\tv2"), "{list}");
    assert!(list.contains("b\tactive\tv1"), "{list}");

    // bob's tombstone survived: his data stays unreadable and he gets no new key.
    let out = second.cli(&["decrypt", "--tenant", "a", &bob]);
    out.assert_failure("FAILED_PRECONDITION", "decrypt for shredded subject bob");
    assert!(out.stderr.contains("shredded"), "{}", out.stderr);
    let out = second.cli(&["encrypt", "--tenant", "a", "--subject", "bob", "new"]);
    out.assert_failure("FAILED_PRECONDITION", "encrypt for shredded subject bob");
    assert!(out.stderr.contains("shredded"), "{}", out.stderr);

    let shown = second.ok(&["tenant", "show", "a"]);
    assert!(shown.contains("primary:  v2"), "{shown}");
    assert!(
        shown.contains("decrypt only"),
        "v1 is still listed: {shown}"
    );

    let (status, log) = second.terminate();
    assert_eq!(status.code(), Some(0), "second exit; log:\n{log}");
}

#[test]
fn cli_prints_ciphertext_as_one_kw1_line_and_round_trips_stdin() {
    let tmp = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&tmp.path().join("data"), &tmp.path().join("kw.sock"));
    sidecar.ok(&["tenant", "create", "acme"]);

    let plaintext: &[u8] = b"\x00\x01line one\n\xff\xfe\x80 not UTF-8\r\nline three\n\n";
    let encrypted = cli_at(
        &sidecar.addr(),
        &["encrypt", "--tenant", "acme", "--context", "k=v", "-"],
        Some(plaintext),
    );
    encrypted.assert_success(&["encrypt", "-"]);
    let text = String::from_utf8(encrypted.stdout.clone()).expect("the ciphertext is text");
    assert!(text.starts_with("kw1:"), "{text:?}");
    assert!(text.ends_with('\n'), "{text:?}");
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    assert!(
        text.trim_end()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:".contains(&b)),
        "not kw1: and base64url: {text:?}"
    );

    // The line as printed, newline included, is valid input for decrypt.
    let decrypted = cli_at(
        &sidecar.addr(),
        &["decrypt", "--tenant", "acme", "--context", "k=v", "-"],
        Some(&encrypted.stdout),
    );
    decrypted.assert_success(&["decrypt", "-"]);
    assert_eq!(decrypted.stdout, plaintext);
    assert!(decrypted.stderr.is_empty(), "{}", decrypted.stderr);

    // The default for both is stdin too; the empty plaintext round-trips.
    let empty = cli_at(&sidecar.addr(), &["encrypt", "--tenant", "acme"], Some(b""));
    empty.assert_success(&["encrypt"]);
    let back = cli_at(
        &sidecar.addr(),
        &["decrypt", "--tenant", "acme"],
        Some(&empty.stdout),
    );
    back.assert_success(&["decrypt"]);
    assert!(back.stdout.is_empty(), "{:?}", back.stdout);
}

#[test]
fn cli_failures_exit_1_with_the_code_name_on_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&tmp.path().join("data"), &tmp.path().join("kw.sock"));
    sidecar.ok(&["tenant", "create", "acme"]);

    sidecar
        .cli(&["encrypt", "--tenant", "nobody", "x"])
        .assert_failure("NOT_FOUND", "encrypt for an unknown tenant");
    sidecar
        .cli(&["tenant", "show", "nobody"])
        .assert_failure("NOT_FOUND", "show an unknown tenant");

    let ciphertext = sidecar.encrypt(&["--tenant", "acme", "--context", "row=1", "secret"]);
    let out = sidecar.cli(&[
        "decrypt",
        "--tenant",
        "acme",
        "--context",
        "row=2",
        &ciphertext,
    ]);
    out.assert_failure("INVALID_ARGUMENT", "decrypt with another context");
    assert!(
        out.stderr
            .starts_with("INVALID_ARGUMENT: ciphertext could not be decrypted"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("secret"), "{}", out.stderr);

    let out = sidecar.cli(&["tenant", "shred", "acme", "--confirm", "acme2"]);
    out.assert_failure("INVALID_ARGUMENT", "shred with a mismatching --confirm");
    assert!(
        out.stderr.starts_with("INVALID_ARGUMENT: confirm:"),
        "{}",
        out.stderr
    );
    assert_eq!(
        decrypt(
            &sidecar,
            &["--tenant", "acme", "--context", "row=1", &ciphertext]
        ),
        "secret",
        "the tenant still works after a refused shred"
    );
    sidecar.encrypt(&["--tenant", "acme", "still works"]);

    for garbage in ["not a ciphertext", "kw1:!!!", "kw1:AAAA"] {
        sidecar
            .cli(&["decrypt", "--tenant", "acme", garbage])
            .assert_failure("INVALID_ARGUMENT", &format!("decrypt {garbage:?}"));
    }

    let nowhere = format!("unix:{}", tmp.path().join("nobody-here.sock").display());
    for args in [
        &["tenant", "list"][..],
        &["encrypt", "--tenant", "acme", "x"],
    ] {
        cli_at(&nowhere, args, None).assert_failure("UNAVAILABLE", "no sidecar at the address");
    }
}

#[test]
fn serve_refuses_a_non_loopback_tcp_listener_naming_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let run = common::process::exit_and_stderr;

    let mut command = keywarden();
    command
        .args(["serve", "--listen", "0.0.0.0:7499", "--data-dir"])
        .arg(&data);
    let (code, stderr) = run(command);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
    assert!(stderr.contains("0.0.0.0:7499"), "{stderr}");
    assert!(
        !data.exists(),
        "a refused configuration created the data dir"
    );

    let mut command = keywarden();
    command
        .env("KEYWARDEN_CACHE_TTL_SECONDS", "abc")
        .args(["serve", "--data-dir"])
        .arg(&data)
        .arg("--listen")
        .arg(format!("unix:{}", tmp.path().join("kw.sock").display()));
    let (code, stderr) = run(command);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("KEYWARDEN_CACHE_TTL_SECONDS"), "{stderr}");
    assert!(!stderr.contains("abc"), "the value is not echoed: {stderr}");
    assert!(
        !data.exists(),
        "a refused configuration created the data dir"
    );
}

/// Items and size of the batch that is in flight when SIGTERM arrives.
const BATCH_ITEMS: usize = 10_000;
const ITEM_BYTES: usize = 1024;

fn batch(tenant: &str, items: usize) -> pb::EncryptBatchRequest {
    pb::EncryptBatchRequest {
        tenant_id: tenant.to_owned(),
        items: (0..items)
            .map(|i| pb::EncryptItem {
                subject_id: String::new(),
                context: [("row".to_owned(), i.to_string())].into(),
                plaintext: vec![(i % 251) as u8; ITEM_BYTES],
                deterministic: false,
                key_version: 0,
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_call_in_flight_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&tmp.path().join("data"), &tmp.path().join("kw.sock"));
    let channel = sidecar.client().await;
    channel
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // A tenth of the batch first, to time this build on this machine: the
    // full batch takes about 2.6 s in a debug build on 2 cores (0.14 s in a
    // release build). SIGTERM goes out after a fifth of the expected
    // duration, at most 300 ms: the request's headers leave at once, which
    // is all the server needs to count the call as in flight.
    let warm_up = Instant::now();
    let mut crypto = channel.crypto();
    let small = crypto
        .encrypt_batch(batch("acme", BATCH_ITEMS / 10))
        .await
        .expect("the warm-up batch")
        .into_inner();
    assert_eq!(small.results.len(), BATCH_ITEMS / 10);
    let expected = warm_up.elapsed() * 10;
    let signal_after = (expected / 5).clamp(Duration::from_millis(20), Duration::from_millis(300));

    let request = batch("acme", BATCH_ITEMS);
    let started = Instant::now();
    let call = tokio::spawn(async move {
        let result = crypto.encrypt_batch(request).await;
        (result, Instant::now())
    });
    tokio::time::sleep(signal_after).await;
    sigterm(sidecar.pid());
    // `kill` has returned: the signal is pending on the sidecar.
    let in_flight_at_signal = !call.is_finished();
    let signalled = Instant::now();

    let (result, finished) = call.await.unwrap();
    eprintln!(
        "batch: expected to take {expected:?}; SIGTERM sent {:?} after the call started; \
         the call returned {:?} after it started",
        signalled - started,
        finished - started
    );
    assert!(
        in_flight_at_signal,
        "the batch had already returned when SIGTERM was sent ({:?} after the start), so this \
         test proves nothing: the warm-up misjudged the batch's duration",
        signalled - started
    );
    // Seen intermittently (about 1 run in 5 on 2 cores, debug or release):
    // UNKNOWN "h2 protocol error: error reading a body from connection ...
    // stream closed because of a broken pipe". The sidecar closes the socket
    // right after the last frame; a WINDOW_UPDATE the client is still sending
    // gets EPIPE, and the client drops the trailers it has not read yet.
    let response = match result {
        Ok(response) => response.into_inner(),
        Err(status) => panic!(
            "the call in flight failed after SIGTERM: {status:?}\nthe sidecar's log:\n{}",
            sidecar.log()
        ),
    };
    assert_eq!(response.results.len(), BATCH_ITEMS);
    for (i, r) in response.results.iter().enumerate() {
        assert!(
            matches!(r.result, Some(pb::encrypt_result::Result::Ok(_))),
            "item {i}: {r:?}"
        );
    }
    let mut sidecar = sidecar;
    let status = wait_for_exit(&mut sidecar.child, PATIENCE)
        .unwrap_or_else(|| panic!("no exit after SIGTERM; log:\n{}", sidecar.log()));
    let log = sidecar.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(!tmp.path().join("kw.sock").exists(), "socket left behind");
}

#[test]
fn two_sidecars_cannot_share_one_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("kw.sock");
    let data = tmp.path().join("data");
    let mut first = Sidecar::start(&data, &socket);
    first.ok(&["tenant", "create", "acme"]);

    let log = tmp.path().join("second.log");
    let mut second = keywarden()
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("data-of-the-second"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_for_exit(&mut second, PATIENCE);
    let second_log = fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        let _ = second.kill();
        let _ = second.wait();
    }
    let status = status.unwrap_or_else(|| {
        panic!("the second sidecar is still running on the same socket; its log:\n{second_log}")
    });
    assert!(!status.success(), "second sidecar: {status}\n{second_log}");
    assert!(
        second_log.contains(&socket.display().to_string())
            && second_log.contains("another process is serving on this socket"),
        "the error names the socket and the reason: {second_log}"
    );

    assert!(
        first.is_running(),
        "the first sidecar died:\n{}",
        first.log()
    );
    assert!(socket.exists(), "the first sidecar's socket file is gone");
    let shown = first.ok(&["tenant", "show", "acme"]);
    assert!(shown.contains("tenant:   acme"), "{shown}");
    first.encrypt(&["--tenant", "acme", "still serving"]);

    let (status, log) = first.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
}

#[test]
fn data_dir_and_root_key_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("nested").join("data");
    let sidecar = Sidecar::start(&data, &tmp.path().join("kw.sock"));
    sidecar.ok(&["tenant", "create", "acme"]);

    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "{}", data.display());
    assert_eq!(mode(&data.join("root.key")), 0o600, "root.key");
    assert_eq!(
        mode(&data.join("keystore.sqlite3")),
        0o600,
        "keystore.sqlite3"
    );

    let (status, log) = sidecar.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
}

#[test]
fn two_sidecars_cannot_share_one_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let first = Sidecar::start(&data, &tmp.path().join("first.sock"));
    let out = keywarden()
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("unix:{}", tmp.path().join("second.sock").display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("another process writes this audit log")
            && stderr.contains("give every sidecar its own data directory"),
        "{stderr}"
    );
    let (status, _) = first.terminate();
    assert!(status.success());
}

#[test]
fn cli_encrypts_deterministically_with_the_flag_and_decrypts_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&tmp.path().join("data"), &tmp.path().join("kw.sock"));
    sidecar.ok(&["tenant", "create", "acme"]);
    let args = [
        "--tenant",
        "acme",
        "--context",
        "column=email",
        "--deterministic",
        "ada@example.com",
    ];
    let first = sidecar.encrypt(&args);
    // The same line every time; suite 0x04 (kw1: then base64url of 01 04 ..).
    assert_eq!(sidecar.encrypt(&args), first);
    assert!(first.starts_with("kw1:AQQ"), "{first}");
    // Without the flag, a different line each time.
    let plain = [
        "--tenant",
        "acme",
        "--context",
        "column=email",
        "ada@example.com",
    ];
    assert_ne!(sidecar.encrypt(&plain), sidecar.encrypt(&plain));
    assert_eq!(
        decrypt(
            &sidecar,
            &["--tenant", "acme", "--context", "column=email", &first]
        ),
        "ada@example.com"
    );
    // After a rotation, --key-version 1 gives the old line again.
    sidecar.ok(&["tenant", "rotate", "acme"]);
    assert_ne!(sidecar.encrypt(&args), first);
    let mut old = args.to_vec();
    old.splice(5..5, ["--key-version", "1"]);
    assert_eq!(sidecar.encrypt(&old), first);
}
