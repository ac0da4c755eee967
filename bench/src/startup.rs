//! `keywarden-bench startup`: how long `keywarden serve` takes from process
//! spawn to its first answered gRPC call, and how much resident memory it
//! holds, idle and with many tenants' keys cached.
//!
//! The sidecar is the `keywarden` binary that `--binary` names, by default
//! the one beside this program (cargo builds both into the same directory,
//! e.g. target/release/). Every sidecar here is its `serve` on the embedded
//! default (no `KEYWARDEN_*` variable from the caller's environment), on a
//! free port of 127.0.0.1, with its data in a fresh temporary directory:
//!
//! 1. the first start, which creates the data directory (root key, keystore,
//!    admin token, receipt key), then its idle memory after a second;
//! 2. `--restarts` restarts on that directory (median and max);
//! 3. with `--tenants K` > 0: K tenants are created, the sidecar is
//!    restarted (an empty cache, K tenants in the keystore) and its memory
//!    read, then one Encrypt per tenant caches every tenant's keys, and the
//!    memory is read again. For this step only, the cache is set to hold K
//!    tenants for an hour (`KEYWARDEN_CACHE_MAX_KEYS`, `_TTL_SECONDS`,
//!    `_TTI_SECONDS`), so nothing is evicted while it is measured.
//!
//! "Ready" is the first `grpc.health.v1.Health/Check` answered SERVING,
//! polled every millisecond from the spawn on. Memory is VmRSS (resident
//! now) and VmHWM (peak resident) from /proc/PID/status.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use clap::Args;
use serde::Serialize;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::{bench_context, setup_tenants, tenant_ids, touch_tenants};
use keywarden::{auth::tokens::ADMIN_TOKEN_FILE, client};

/// How long a sidecar may take to answer.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long a sidecar may take to exit after SIGTERM: at exit it writes its
/// last data-plane counts to the audit log, one synced record per tenant
/// and caller, which takes tens of seconds after 100,000 tenants.
const STOP_PATIENCE: Duration = Duration::from_secs(600);
/// How long a sidecar is left alone before its idle memory is read.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Args, Debug, Clone)]
pub struct StartupArgs {
    /// Restarts measured after the first start.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub restarts: u32,
    /// Tenants whose keys are cached for the memory measurement (0: skip it).
    #[arg(long, default_value_t = 100_000)]
    pub tenants: u32,
    /// Calls in flight while creating and touching the tenants.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Keep the temporary data directory (its path is printed on stderr).
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The sidecar binary to measure [default: keywarden beside this program].
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

impl StartupArgs {
    /// The sidecar binary: `--binary`, or `keywarden` beside this program.
    fn sidecar_binary(&self) -> Result<PathBuf, String> {
        let binary = match &self.binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find this program: {e}"))?
                .with_file_name("keywarden"),
        };
        if binary.is_file() {
            Ok(binary)
        } else {
            Err(format!(
                "there is no sidecar binary at {}: build it (cargo build --release) or name it \
                 with --binary",
                binary.display()
            ))
        }
    }
}

/// Resident memory of a process, in KiB.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the most resident so far.
    pub hwm_kib: u64,
}

/// Reads VmRSS and VmHWM from the text of /proc/PID/status.
pub fn parse_status(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|n| n.trim().parse().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

fn memory(pid: u32) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_status(&text).ok_or_else(|| format!("{path} has no VmRSS or VmHWM"))
}

/// One start of a sidecar.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Start {
    /// Spawn to the first answered health check.
    pub ready_ms: f64,
    /// What the sidecar logged as `startup_ms` (its own view: from reading
    /// the configuration to serving, without process start-up).
    pub logged_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Restarts {
    pub count: usize,
    pub median_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
    pub logged_median_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct CachedKeys {
    pub tenants: u32,
    pub setup_seconds: f64,
    /// The restart with the tenants in the keystore and nothing cached.
    pub restart: Start,
    /// After that restart, idle.
    pub before: Memory,
    pub touch_seconds: f64,
    /// After one Encrypt per tenant.
    pub after: Memory,
    /// SIGTERM to exit after that: the final flush of the data-plane counts
    /// (one synced audit record per tenant) is most of it.
    pub stop_seconds: f64,
    pub added_kib: i64,
    pub bytes_per_cached_tenant: f64,
}

#[derive(Debug, Serialize)]
pub struct StartupReport {
    /// The first start, which creates the data directory.
    pub first_start: Start,
    pub restarts: Restarts,
    /// The first start's sidecar, idle after it.
    pub idle: Memory,
    pub cached_keys: Option<CachedKeys>,
    pub notes: Vec<String>,
}

/// A sidecar process, killed on drop if still running.
struct Sidecar {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Sidecar {
    /// Spawns `binary serve` on `data` and waits for its first answer.
    async fn start(
        binary: &Path,
        data: &Path,
        log: PathBuf,
        env: &[(&str, String)],
    ) -> Result<(Self, Start), String> {
        let addr = free_port()?;
        let stderr = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = Command::new(binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KEYWARDEN_") {
                command.env_remove(name);
            }
        }
        command
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("serve")
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg(&addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let spawned = Instant::now();
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start a sidecar: {e}"))?;
        let mut sidecar = Sidecar { child, addr, log };
        let ready = sidecar.wait_ready(spawned).await?;
        let logged_ms = sidecar.logged_startup_ms();
        Ok((
            sidecar,
            Start {
                ready_ms: ready.as_secs_f64() * 1e3,
                logged_ms,
            },
        ))
    }

    async fn wait_ready(&mut self, spawned: Instant) -> Result<Duration, String> {
        loop {
            if let Ok(channel) = client::connect(&self.addr, None).await {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                if let Ok(answer) = health.check(HealthCheckRequest::default()).await
                    && answer.into_inner().status() == ServingStatus::Serving
                {
                    return Ok(spawned.elapsed());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the sidecar exited ({status}) before answering; its log:\n{}",
                    self.log_text()
                ));
            }
            if spawned.elapsed() > PATIENCE {
                return Err(format!(
                    "the sidecar did not answer within {PATIENCE:?}; its log:\n{}",
                    self.log_text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn logged_startup_ms(&self) -> Option<u64> {
        let log = self.log_text();
        let rest = &log[log.find("startup_ms=")? + "startup_ms=".len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and waits for the exit (SIGKILL after [`STOP_PATIENCE`]);
    /// tells how long the exit took.
    async fn stop(mut self) -> Result<Duration, String> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < STOP_PATIENCE {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let log = self.log_text();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        Err(format!(
            "the sidecar ({}) did not stop within {STOP_PATIENCE:?} of SIGTERM; the end of its log:\n{}",
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<String, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.to_string())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// The median of `values` (sorted here).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

pub async fn run(args: StartupArgs) -> ExitCode {
    let dir = std::env::temp_dir().join(format!(
        "keywarden-bench-startup-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let result = match fs::create_dir_all(&dir) {
        Ok(()) => measure(&args, &dir).await,
        Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
    };
    if args.keep {
        eprintln!("keywarden-bench startup: kept {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    match result {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("a report serializes")
                );
            } else {
                print!("{}", table(&report));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keywarden-bench startup: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn measure(args: &StartupArgs, dir: &Path) -> Result<StartupReport, String> {
    let binary = args.sidecar_binary()?;
    let data = dir.join("data");
    let log = |name: &str| dir.join(format!("{name}.log"));

    let (sidecar, first_start) = Sidecar::start(&binary, &data, log("first"), &[]).await?;
    tokio::time::sleep(SETTLE).await;
    let idle = memory(sidecar.pid())?;
    sidecar.stop().await?;

    let mut starts = Vec::new();
    for i in 0..args.restarts {
        let (sidecar, start) =
            Sidecar::start(&binary, &data, log(&format!("restart-{i}")), &[]).await?;
        starts.push(start);
        sidecar.stop().await?;
    }
    let mut ready: Vec<f64> = starts.iter().map(|s| s.ready_ms).collect();
    let mut logged: Vec<f64> = starts
        .iter()
        .filter_map(|s| s.logged_ms.map(|ms| ms as f64))
        .collect();
    let restarts = Restarts {
        count: starts.len(),
        median_ms: median(&mut ready),
        max_ms: ready.iter().copied().fold(0.0, f64::max),
        min_ms: ready.iter().copied().fold(f64::INFINITY, f64::min),
        logged_median_ms: (!logged.is_empty()).then(|| median(&mut logged) as u64),
    };

    let mut notes = vec![
        "ready = spawn of `keywarden serve` to the first Health/Check answered SERVING, polled \
         every millisecond; logged = the sidecar's own startup_ms"
            .to_owned(),
    ];
    let cached_keys = if args.tenants > 0 {
        notes.push(format!(
            "cached keys: the cache was set to hold {} tenants for an hour \
             (KEYWARDEN_CACHE_MAX_KEYS, _TTL_SECONDS, _TTI_SECONDS) for that step only",
            args.tenants.max(100_000)
        ));
        Some(cached_keys(args, &binary, &data, log).await?)
    } else {
        None
    };
    Ok(StartupReport {
        first_start,
        restarts,
        idle,
        cached_keys,
        notes,
    })
}

/// Step 3: memory before and after every tenant's keys are cached.
async fn cached_keys(
    args: &StartupArgs,
    binary: &Path,
    data: &Path,
    log: impl Fn(&str) -> PathBuf,
) -> Result<CachedKeys, String> {
    let env = [
        (
            "KEYWARDEN_CACHE_MAX_KEYS",
            args.tenants.max(100_000).to_string(),
        ),
        ("KEYWARDEN_CACHE_TTL_SECONDS", "3600".to_owned()),
        ("KEYWARDEN_CACHE_TTI_SECONDS", "3600".to_owned()),
    ];
    let ids = tenant_ids("bench", args.tenants);
    let concurrency = args.concurrency as usize;
    let token = client::find_token("", Some(&data.join(ADMIN_TOKEN_FILE)), |_| None)?;
    let bearer = client::Bearer::new(token.as_ref())?;

    let (sidecar, _) = Sidecar::start(binary, data, log("setup"), &env).await?;
    let channel = client::connect(&sidecar.addr, None).await?;
    let started = Instant::now();
    setup_tenants(client::admin(channel, bearer.clone()), &ids, concurrency).await?;
    let setup_seconds = started.elapsed().as_secs_f64();
    sidecar.stop().await?;

    let (sidecar, restart) = Sidecar::start(binary, data, log("cached"), &env).await?;
    tokio::time::sleep(SETTLE).await;
    let before = memory(sidecar.pid())?;
    let channel = client::connect(&sidecar.addr, None).await?;
    let clients: Vec<_> = (0..concurrency)
        .map(|_| client::crypto(channel.clone(), bearer.clone()))
        .collect();
    let started = Instant::now();
    touch_tenants(&clients, &ids, &bench_context()).await?;
    let touch_seconds = started.elapsed().as_secs_f64();
    // Closed before the stop, so the sidecar has no connection to drain.
    drop((clients, channel));
    tokio::time::sleep(SETTLE).await;
    let after = memory(sidecar.pid())?;
    let stop_seconds = sidecar.stop().await?.as_secs_f64();
    let added_kib = after.rss_kib as i64 - before.rss_kib as i64;
    Ok(CachedKeys {
        tenants: args.tenants,
        setup_seconds,
        restart,
        before,
        touch_seconds,
        after,
        stop_seconds,
        added_kib,
        bytes_per_cached_tenant: added_kib as f64 * 1024.0 / f64::from(args.tenants),
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn table(r: &StartupReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let logged = |ms: Option<u64>| ms.map_or("-".to_owned(), |ms| format!("{ms} ms"));
    let _ = writeln!(
        out,
        "first start (creates the data directory): ready in {:.1} ms (logged {})",
        r.first_start.ready_ms,
        logged(r.first_start.logged_ms)
    );
    let _ = writeln!(
        out,
        "restarts ({}): ready in median {:.1} ms, max {:.1} ms, min {:.1} ms (logged median {})",
        r.restarts.count,
        r.restarts.median_ms,
        r.restarts.max_ms,
        r.restarts.min_ms,
        logged(r.restarts.logged_median_ms)
    );
    let _ = writeln!(
        out,
        "idle after the first start: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        mib(r.idle.rss_kib),
        mib(r.idle.hwm_kib)
    );
    if let Some(c) = &r.cached_keys {
        let _ = writeln!(
            out,
            "{} tenants created in {:.1} s; restart with them in the keystore: ready in {:.1} ms",
            c.tenants, c.setup_seconds, c.restart.ready_ms
        );
        let _ = writeln!(
            out,
            "  idle, nothing cached:    VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            mib(c.before.rss_kib),
            mib(c.before.hwm_kib)
        );
        let _ = writeln!(
            out,
            "  every tenant cached ({:.1} s): VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            c.touch_seconds,
            mib(c.after.rss_kib),
            mib(c.after.hwm_kib)
        );
        let _ = writeln!(
            out,
            "  added: {:.1} MiB, {:.0} bytes per cached tenant",
            c.added_kib as f64 / 1024.0,
            c.bytes_per_cached_tenant
        );
        let _ = writeln!(
            out,
            "  then SIGTERM to exit: {:.1} s (the last data-plane counts go to the audit log)",
            c.stop_seconds
        );
    }
    for note in &r.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}
