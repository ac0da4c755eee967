//! A PostgreSQL server for the tests, started from the system's binaries
//! (`initdb`, `pg_ctl`, `postgres`: on PATH, else the newest
//! /usr/lib/postgresql/*/bin; scripts/test installs them when missing). One
//! server per test binary, on a free loopback port, started on first use; each
//! test takes a database of its own with [`fresh_database`].
//!
//! With `KEYWARDEN_TEST_DATABASE_URL` set (e.g.
//! `postgres://user:password@db.internal:5432/postgres`), the tests use that
//! server instead and start none; the URL's database is where the test
//! databases are created from, and they are left behind.
//!
//! The server lives no longer than the test process: a small shell parent (the
//! "holder") starts it with `pg_ctl start`, takes commands (stop, crash,
//! start) on its standard input, a pipe from this process, and when that pipe
//! closes, which happens however the test process ends, stops PostgreSQL with
//! `pg_ctl stop -m fast` and deletes the server's temporary directory.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root, `initdb`
//! and the holder (and with it PostgreSQL) run as the system user `postgres`,
//! which owns the temporary directory.
//!
//! The cluster's default collation is ICU's `en-US` (where `B` sorts after
//! `a`), as on a typical production server with an `en_US.UTF-8` default,
//! rather than byte order: a backend that lets the database's collation decide
//! the order of tenant ids shows it here.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    os::unix::{fs::chown, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sqlx::Connection;

/// Names an existing server to use instead of starting one.
pub const URL_ENV: &str = "KEYWARDEN_TEST_DATABASE_URL";
/// The superuser `initdb` creates; local connections need no password.
pub const USER: &str = "keywarden_test";
/// The system user PostgreSQL runs as when the tests run as root.
const SYSTEM_USER: &str = "postgres";
/// How long PostgreSQL may take to start (`pg_ctl start -w -t`).
const START_TIMEOUT_SECS: u32 = 30;

/// The holder: `$1` pg_ctl, `$2` postgres, `$3` data directory, `$4` log
/// file, `$5` the temporary directory, `$6` options for postgres, `$7` the
/// start timeout in seconds. It answers `ready` or `failed` to each start and
/// `stopped` to each stop.
const HOLDER: &str = r#"pg_ctl=$1 postgres=$2 data=$3 log=$4 scratch=$5 opts=$6 timeout=$7
start() {
  if "$pg_ctl" start -w -t "$timeout" -D "$data" -l "$log" -p "$postgres" -o "$opts" >>"$scratch/pg_ctl.log" 2>&1
  then echo ready; else echo failed; fi
}
stop() {
  "$pg_ctl" stop -m "$1" -w -t 60 -D "$data" >>"$scratch/pg_ctl.log" 2>&1
}
start
while read -r command; do
  case $command in
    start) start ;;
    stop) stop fast; echo stopped ;;
    crash) stop immediate; echo stopped ;;
  esac
done
stop fast
rm -rf -- "$scratch"
"#;

/// A PostgreSQL server: one this process started, or the one
/// `KEYWARDEN_TEST_DATABASE_URL` names.
pub struct PgServer {
    /// Where CREATE DATABASE runs.
    admin_url: String,
    /// `None` for a server named by `KEYWARDEN_TEST_DATABASE_URL`.
    local: Option<Local>,
}

struct Local {
    port: u16,
    scratch: PathBuf,
    holder: Mutex<Holder>,
}

struct Holder {
    /// Closing it stops PostgreSQL and deletes `scratch`.
    stdin: Option<ChildStdin>,
    replies: BufReader<ChildStdout>,
    child: Child,
    running: bool,
}

static SERVER: OnceLock<PgServer> = OnceLock::new();

/// The shared server, started on first use.
pub fn server() -> &'static PgServer {
    SERVER.get_or_init(|| match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => PgServer {
            admin_url: url,
            local: None,
        },
        _ => PgServer::start_local(),
    })
}

/// A server of the test's own (always a local one, whatever
/// `KEYWARDEN_TEST_DATABASE_URL` says), for a test that stops or crashes it
/// without disturbing the tests sharing [`server`]. Dropping it stops it and
/// deletes its files.
pub fn dedicated() -> PgServer {
    PgServer::start_local_with("")
}

/// [`dedicated`] with more server settings (`-c name=value ...`), which
/// override the harness's own (e.g. `-c full_page_writes=on`, as in
/// production).
pub fn dedicated_with(settings: &str) -> PgServer {
    PgServer::start_local_with(settings)
}

/// A new, empty database on the shared server; answers its URL.
pub async fn fresh_database() -> String {
    server().fresh_database().await
}

/// Stops the shared server (`pg_ctl stop -m fast`), keeping its data. Blocks:
/// from async code with other tasks to run, call it in `spawn_blocking`.
pub fn stop() {
    server().stop();
}

/// Starts the shared server again after [`stop`], on the same port and data.
pub fn start() {
    server().start();
}

/// [`stop`], then [`start`].
pub fn restart() {
    server().restart();
}

impl PgServer {
    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        with_database(&self.admin_url, db)
    }

    /// The port of a local server.
    pub fn port(&self) -> u16 {
        self.local().port
    }

    /// Creates a new, uniquely named, empty database; answers its URL.
    pub async fn fresh_database(&self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!(
            "keywarden_test_{}_{}_{}",
            since.as_secs(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.admin_url));
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
        admin.close().await.ok();
        self.url(&name)
    }

    /// Stops a local server (`pg_ctl stop -m fast`: connections are closed,
    /// the data stays). Does nothing if it is stopped.
    pub fn stop(&self) {
        let mut holder = self.holder();
        if holder.running {
            holder.ask("stop");
            holder.running = false;
        }
    }

    /// Stops a local server as a crash would (`pg_ctl stop -m immediate`: no
    /// checkpoint, recovery at the next start).
    pub fn crash(&self) {
        let mut holder = self.holder();
        if holder.running {
            holder.ask("crash");
            holder.running = false;
        }
    }

    /// Starts a stopped local server again, on the same port and data, and
    /// waits until it accepts connections.
    pub fn start(&self) {
        let mut holder = self.holder();
        if !holder.running {
            if holder.ask("start") != "ready" {
                panic!("PostgreSQL did not start again\n{}", self.log());
            }
            holder.running = true;
        }
    }

    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// The data directory of a local server (`PGDATA`: the heap files under
    /// `base/`, the WAL under `pg_wal/`).
    pub fn data_dir(&self) -> PathBuf {
        self.local().scratch.join("data")
    }

    /// What PostgreSQL and pg_ctl logged, for a failure message.
    pub fn log(&self) -> String {
        log_of(&self.local().scratch)
    }

    fn local(&self) -> &Local {
        self.local.as_ref().unwrap_or_else(|| {
            panic!("the server {URL_ENV} names is not one the tests can stop or start")
        })
    }

    fn holder(&self) -> MutexGuard<'_, Holder> {
        self.local()
            .holder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn start_local() -> PgServer {
        Self::start_local_with("")
    }

    fn start_local_with(settings: &str) -> PgServer {
        let started = Instant::now();
        let bins = Binaries::find();
        let owner = run_as();
        let scratch = tempfile::Builder::new()
            .prefix("keywarden-pg-")
            .tempdir()
            .expect("create a temporary directory for PostgreSQL")
            .keep();
        if let Some((uid, gid)) = owner {
            chown(&scratch, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} failed: {e}", scratch.display()));
        }
        let data = scratch.join("data");
        bins.initdb(&data, &scratch, owner);
        // Trust, but only on the socket and 127.0.0.1 (the only address
        // PostgreSQL listens on). The file is PostgreSQL's: writing into it
        // keeps its owner.
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");

        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // No fsync: only a machine crash could lose data, and the tests cause
        // none. Commits stay synchronous, so a crash of PostgreSQL ([`PgServer::crash`])
        // loses no committed transaction, as in production.
        let options = format!(
            "-p {port} -k '{}' -c listen_addresses=127.0.0.1 -c max_connections=300 \
             -c fsync=off -c full_page_writes=off {settings}",
            scratch.display()
        );
        let mut command = Command::new("sh");
        command
            .args(["-c", HOLDER, "keywarden-postgres-holder"])
            .arg(&bins.pg_ctl)
            .arg(&bins.postgres)
            .arg(&data)
            .arg(scratch.join("postgres.log"))
            .arg(&scratch)
            .arg(&options)
            .arg(START_TIMEOUT_SECS.to_string())
            .current_dir(&scratch)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = owner {
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().expect("start sh (the PostgreSQL holder)");
        let mut holder = Holder {
            stdin: child.stdin.take(),
            replies: BufReader::new(child.stdout.take().unwrap()),
            child,
            running: false,
        };
        let reply = holder.reply();
        if reply != "ready" {
            let log = log_of(&scratch);
            drop(holder); // stops what started and deletes the directory
            panic!(
                "PostgreSQL did not start in {START_TIMEOUT_SECS} s (holder said {reply:?})\n{log}"
            );
        }
        holder.running = true;
        let server = PgServer {
            admin_url: format!("postgres://{USER}@127.0.0.1:{port}/postgres"),
            local: Some(Local {
                port,
                scratch,
                holder: Mutex::new(holder),
            }),
        };
        if std::env::var_os("KEYWARDEN_TEST_VERBOSE").is_some() {
            eprintln!(
                "PostgreSQL on port {port} started in {:?}",
                started.elapsed()
            );
        }
        server
    }
}

impl Holder {
    /// Sends `command` and answers the holder's reply.
    fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().expect("the holder's stdin is open");
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("the PostgreSQL holder is gone: {e}"));
        self.reply()
    }

    fn reply(&mut self) -> String {
        let mut line = String::new();
        self.replies
            .read_line(&mut line)
            .expect("read from the PostgreSQL holder");
        line.trim().to_owned()
    }
}

impl Drop for Holder {
    /// Closes the pipe (the holder stops PostgreSQL and deletes its files) and
    /// waits a while for the holder to finish.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                _ => return,
            }
        }
    }
}

/// The PostgreSQL programs the tests run.
struct Binaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    postgres: PathBuf,
}

impl Binaries {
    /// On PATH (a symlink is followed, so the three come from one
    /// installation), else in the newest /usr/lib/postgresql/*/bin.
    fn find() -> Binaries {
        if let Some(initdb) = on_path("initdb") {
            let real = fs::canonicalize(&initdb).unwrap_or(initdb);
            let dir = real.parent().unwrap().to_owned();
            let beside = |name: &str| {
                let path = dir.join(name);
                if path.is_file() {
                    path
                } else {
                    on_path(name).unwrap_or_else(|| {
                        panic!("{name} is neither beside {} nor on PATH", real.display())
                    })
                }
            };
            return Binaries {
                pg_ctl: beside("pg_ctl"),
                postgres: beside("postgres"),
                initdb: real,
            };
        }
        let newest = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<f64>().ok()?;
                let bin = entry.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, bin)| bin)
            .unwrap_or_else(|| {
                panic!(
                    "PostgreSQL's initdb is neither on PATH nor in /usr/lib/postgresql/*/bin: \
                     run ./scripts/test (it installs PostgreSQL), `apt-get install postgresql`, \
                     or set {URL_ENV} to a server's URL"
                )
            });
        Binaries {
            initdb: newest.join("initdb"),
            pg_ctl: newest.join("pg_ctl"),
            postgres: newest.join("postgres"),
        }
    }

    /// Creates the cluster in `data` (`scratch/data`), as `owner`.
    fn initdb(&self, data: &Path, scratch: &Path, owner: Option<(u32, u32)>) {
        let run = |locale: &[&str]| {
            let mut command = Command::new(&self.initdb);
            command
                .arg("-D")
                .arg(data)
                .args(["-U", USER, "--auth=trust", "--encoding=UTF8"])
                .args(locale)
                .args(["--no-sync", "--no-instructions"])
                .current_dir(scratch);
            if let Some((uid, gid)) = owner {
                command.uid(uid).gid(gid);
            }
            command
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", self.initdb.display()))
        };
        let icu = run(&[
            "--locale-provider=icu",
            "--icu-locale=en-US",
            "--locale=C.UTF-8",
        ]);
        if icu.status.success() {
            return;
        }
        // Older than PostgreSQL 15, or built without ICU, or no C.UTF-8.
        fs::remove_dir_all(data).ok();
        let plain = run(&["--locale=C"]);
        assert!(
            plain.status.success(),
            "initdb failed ({}):\n{}{}\nwith ICU:\n{}",
            plain.status,
            String::from_utf8_lossy(&plain.stdout),
            String::from_utf8_lossy(&plain.stderr),
            String::from_utf8_lossy(&icu.stderr),
        );
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// The user and group to run PostgreSQL as: `None` (this process's) unless
/// this process runs as root.
fn run_as() -> Option<(u32, u32)> {
    if id(&["-u"]) != Some(0) {
        return None;
    }
    match (id(&["-u", SYSTEM_USER]), id(&["-g", SYSTEM_USER])) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        _ => panic!(
            "the tests run as root, and PostgreSQL refuses to: they run it as the system user \
             {SYSTEM_USER:?}, which does not exist. Install PostgreSQL's package (it creates the \
             user), `useradd --system {SYSTEM_USER}`, run the tests as another user, or set {URL_ENV}"
        ),
    }
}

/// `id ARGS` as a number.
fn id(args: &[&str]) -> Option<u32> {
    let output = Command::new("id").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

fn log_of(scratch: &Path) -> String {
    let read = |name: &str| {
        fs::read_to_string(scratch.join(name)).unwrap_or_else(|e| format!("({name}: {e})"))
    };
    format!(
        "--- postgres.log ---\n{}--- pg_ctl.log ---\n{}",
        read("postgres.log"),
        read("pg_ctl.log")
    )
}

/// `url` with its database (the path) replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("not a URL: {url:?}"));
    let (before_query, query) = match rest.find('?') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = before_query.split('/').next().unwrap_or_default();
    format!("{scheme}://{authority}/{db}{query}")
}
