//! `keywarden-bench` against a real sidecar process: the load generator's
//! JSON, with the echo service beside it, and the start-up measurement. No
//! assertion on timing: only the shape of the results and zero errors.
//!
//! The sidecar is the `keywarden` binary beside `keywarden-bench`, as
//! `startup` finds it: `cargo test --workspace` (scripts/test) builds both.

use std::{
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_keywarden-bench");
/// How long the sidecar may take to accept connections.
const PATIENCE: Duration = Duration::from_secs(10);

/// A command with an empty environment (so no `KEYWARDEN_*` variable from
/// the caller's shell) but for info logging without colour codes, and no
/// admin listener: these tests run side by side, and every sidecar would
/// take the default 127.0.0.1:7401 (`startup`'s sidecars inherit it).
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("KEYWARDEN_ADMIN_LISTEN", "off");
    command
}

/// `keywarden-bench`, in a clean environment.
fn keywarden_bench() -> Command {
    command(BENCH)
}

/// What a `keywarden-bench` run printed.
struct Out {
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

/// `keywarden serve` on a unix socket in a temporary directory, killed on
/// drop.
struct Sidecar {
    child: Child,
    socket: PathBuf,
    data_dir: PathBuf,
}

impl Sidecar {
    fn start(dir: &Path) -> Sidecar {
        let binary = Path::new(BENCH).with_file_name("keywarden");
        assert!(
            binary.is_file(),
            "no sidecar binary at {}: build it first (cargo test --workspace does)",
            binary.display()
        );
        let (socket, data_dir) = (dir.join("kw.sock"), dir.join("data"));
        let log = fs::File::create(dir.join("kw.log")).unwrap();
        let child = command(&binary)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keywarden serve");
        let mut sidecar = Sidecar {
            child,
            socket,
            data_dir,
        };
        let deadline = Instant::now() + PATIENCE;
        while UnixStream::connect(&sidecar.socket).is_err() {
            let log = || fs::read_to_string(dir.join("kw.log")).unwrap_or_default();
            if let Some(status) = sidecar.child.try_wait().unwrap() {
                panic!("the sidecar exited ({status}); its log:\n{}", log());
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar did not start:\n{}",
                log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        sidecar
    }

    /// Runs `keywarden-bench ARGS` against this sidecar, as its host's
    /// operator (it finds the admin token in the data directory).
    fn cli(&self, args: &[&str]) -> Out {
        let out = keywarden_bench()
            .env("KEYWARDEN_DATA_DIR", &self.data_dir)
            .arg("--addr")
            .arg(format!("unix:{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run keywarden-bench");
        Out {
            status: out.status,
            stdout: out.stdout,
            stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `run ARGS --json` against `sidecar` and parses its output.
fn bench_run(sidecar: &Sidecar, args: &[&str]) -> Value {
    let full = [&["run", "--json"][..], args].concat();
    let out = sidecar.cli(&full);
    assert!(
        out.status.success(),
        "{full:?} failed ({}): {}",
        out.status,
        out.stderr
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{full:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// One target's row: measured `calls`, no error, sane percentiles.
fn assert_clean(result: &Value, target: &str, calls: u64, items_per_call: u64) {
    assert_eq!(result["target"], target, "{result:#}");
    assert_eq!(result["calls"], calls, "{result:#}");
    assert_eq!(result["items"], calls * items_per_call, "{result:#}");
    assert_eq!(result["errors"]["total"], 0, "{result:#}");
    assert_eq!(
        result["errors"]["by_code"],
        serde_json::json!({}),
        "{result:#}"
    );
    for rate in [
        "calls_per_second",
        "items_per_second",
        "plaintext_mb_per_second",
    ] {
        assert!(result[rate].as_f64().unwrap() > 0.0, "{rate}: {result:#}");
    }
    let latency = &result["latency_us"];
    let p = |name: &str| {
        latency[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {latency}"))
    };
    assert!(p("p50") > 0, "{latency}");
    assert!(
        p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("p99_9"),
        "{latency}"
    );
    // The histogram keeps 3 significant digits: a percentile may round up
    // past the exact maximum by that much.
    assert!(
        p("p99_9") as f64 <= p("max") as f64 * 1.001 + 1.0,
        "{latency}"
    );
}

#[test]
fn bench_run_measures_the_sidecar_beside_the_echo_service() {
    let tmp = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(tmp.path());

    let report = bench_run(
        &sidecar,
        &["--count", "200", "--warmup", "0s", "--echo", "--setup"],
    );
    let workload = &report["workload"];
    assert_eq!(workload["rpc"], "Encrypt", "{report:#}");
    assert_eq!(workload["op"], "encrypt");
    assert_eq!(workload["payload_bytes"], 128);
    assert_eq!(workload["concurrency"], 16);
    assert_eq!(workload["tenants"], 1);
    assert_eq!(workload["loop_kind"], "closed");
    assert_eq!(workload["count"], 200);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{report:#}");
    // Zero errors also means every answer had the size of a real envelope,
    // from the echo service too (BAD_RESPONSE otherwise).
    assert_clean(&results[0], "sidecar", 200, 1);
    assert_clean(&results[1], "echo", 200, 1);
    assert!(report["sidecar_to_echo_throughput"].as_f64().unwrap() > 0.0);
    assert!(report["notes"].to_string().contains("1 tenant(s) created"));

    // Batches of decrypts over several tenants picked by Zipf, at a rate.
    let report = bench_run(
        &sidecar,
        &[
            "--count",
            "60",
            "--warmup",
            "0s",
            "--echo",
            "--setup",
            "--op",
            "decrypt",
            "--batch",
            "5",
            "--payload",
            "1000",
            "--tenants",
            "4",
            "--distribution",
            "zipf",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--rate",
            "400",
        ],
    );
    assert_eq!(report["workload"]["rpc"], "DecryptBatch", "{report:#}");
    assert_eq!(report["workload"]["loop_kind"], "open");
    assert_eq!(report["workload"]["zipf_exponent"], 0.99);
    let results = report["results"].as_array().unwrap();
    assert_clean(&results[0], "sidecar", 60, 5);
    assert_clean(&results[1], "echo", 60, 5);
    assert!(report["sidecar_to_echo_throughput"].is_null());
    assert!(
        report["notes"]
            .to_string()
            .contains("3 tenant(s) created, 1 existed")
    );

    // Blind indexes, unary and in batches (issue 17): every answer is a
    // token of the size asked for, from the echo service too.
    let report = bench_run(
        &sidecar,
        &[
            "--count",
            "50",
            "--warmup",
            "0s",
            "--echo",
            "--op",
            "blind-index",
        ],
    );
    assert_eq!(report["workload"]["rpc"], "BlindIndex", "{report:#}");
    assert_eq!(report["workload"]["op"], "blind-index");
    let results = report["results"].as_array().unwrap();
    assert_clean(&results[0], "sidecar", 50, 1);
    assert_clean(&results[1], "echo", 50, 1);
    let report = bench_run(
        &sidecar,
        &[
            "--count",
            "20",
            "--warmup",
            "0s",
            "--op",
            "blind-index",
            "--batch",
            "10",
        ],
    );
    assert_eq!(report["workload"]["rpc"], "BlindIndexBatch", "{report:#}");
    assert_clean(&report["results"][0], "sidecar", 20, 10);
}

#[test]
fn bench_run_reports_failed_calls_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(tmp.path());
    // The tenant does not exist, and --cache cold skips the touch that would
    // stop the run before measuring.
    let args = [
        "run", "--json", "--count", "20", "--warmup", "0s", "--cache", "cold",
    ];
    let out = sidecar.cli(&args);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let result = &report["results"][0];
    assert_eq!(result["calls"], 0, "{report:#}");
    assert_eq!(result["errors"]["total"], 20);
    assert_eq!(result["errors"]["by_code"]["NOT_FOUND"], 20);
    assert!(out.stderr.contains("some calls failed"), "{}", out.stderr);
}

#[test]
fn bench_startup_measures_start_and_memory() {
    let out = keywarden_bench()
        .args(["startup", "--restarts", "2", "--tenants", "20", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["first_start"]["ready_ms"].as_f64().unwrap() > 0.0);
    assert!(report["first_start"]["logged_ms"].is_u64(), "{report:#}");
    assert_eq!(report["restarts"]["count"], 2);
    assert!(report["restarts"]["median_ms"].as_f64().unwrap() > 0.0);
    assert!(report["idle"]["rss_kib"].as_u64().unwrap() > 0);
    assert!(
        report["idle"]["hwm_kib"].as_u64().unwrap() >= report["idle"]["rss_kib"].as_u64().unwrap()
    );
    let cached = &report["cached_keys"];
    assert_eq!(cached["tenants"], 20, "{report:#}");
    assert!(cached["after"]["rss_kib"].as_u64().unwrap() > 0);
}
