//! Sidecars as processes: `keywarden serve` on a unix socket in a temporary
//! directory, and the CLI binary run against it.

use std::{
    fs,
    io::Write,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use keywarden::{
    api::pb::{admin_client::AdminClient, crypto_client::CryptoClient},
    client::{Authed, Bearer},
};
use secrecy::SecretString;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_keywarden");
/// How long a sidecar may take to accept connections, or to exit.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A `keywarden` command with a clean environment: no `KEYWARDEN_*` variable
/// from the caller's shell, info logging, no colour codes in the log, no
/// admin listener.
pub fn keywarden() -> Command {
    command(BIN)
}

/// [`keywarden`]'s clean environment for another program (e.g. a shell
/// that sets limits, then runs keywarden).
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYWARDEN_") {
            command.env_remove(name);
        }
    }
    // No admin listener unless a test asks for one (KEYWARDEN_ADMIN_LISTEN):
    // tests run sidecars side by side, and 127.0.0.1:7401 is one port.
    command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("KEYWARDEN_ADMIN_LISTEN", "off");
    command
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `command`, which must exit on its own (a `serve` that refuses its
/// configuration): its exit code and stderr.
pub fn exit_and_stderr(mut command: Command) -> (i32, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keywarden");
    let Some(status) = wait_for_exit(&mut child, PATIENCE) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("keywarden did not exit within {PATIENCE:?}");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code().expect("an exit code"), stderr)
}

pub fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed: {status}");
}

/// A `keywarden serve` process on a unix socket, with its stderr in a file.
/// Killed on drop if it is still running.
pub struct Sidecar {
    pub child: Child,
    socket: PathBuf,
    log: PathBuf,
    data_dir: PathBuf,
}

impl Sidecar {
    /// Starts a sidecar on `data_dir` listening on `socket`, and waits until
    /// the socket accepts a connection. The log goes to `socket` + `.log`.
    pub fn start(data_dir: &Path, socket: &Path) -> Sidecar {
        let log = socket.with_extension("log");
        let mut command = keywarden();
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()));
        Self::spawn(command, data_dir, socket, log)
    }

    /// [`Sidecar::start`] with extra environment variables (configuration).
    pub fn start_with_env(data_dir: &Path, socket: &Path, env: &[(&str, &str)]) -> Sidecar {
        let log = socket.with_extension("log");
        let mut command = keywarden();
        command
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()));
        Self::spawn(command, data_dir, socket, log)
    }

    /// Kills the process with SIGKILL, as a crash would, and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn spawn(mut command: Command, data_dir: &Path, socket: &Path, log: PathBuf) -> Sidecar {
        let stderr = fs::File::create(&log).expect("create the log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn keywarden serve");
        let mut sidecar = Sidecar {
            child,
            socket: socket.to_owned(),
            log,
            data_dir: data_dir.to_owned(),
        };
        sidecar.wait_until_ready();
        sidecar
    }

    pub fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "the sidecar exited ({status}) before serving; its log:\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "the sidecar did not accept connections on {} within {PATIENCE:?}; its log:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Accepting comes with binding; the log line follows right after.
        let deadline = Instant::now() + PATIENCE;
        while !self.log().contains("keywarden serving") {
            assert!(
                Instant::now() < deadline,
                "the socket accepts but the log never said \"keywarden serving\":\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The `--addr` of this sidecar.
    pub fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Runs a client command against this sidecar, as its host's operator
    /// (the CLI finds the sidecar's admin token in its data directory).
    pub fn cli(&self, args: &[&str]) -> Out {
        cli_with(&self.addr(), Some(&self.data_dir), args, None)
    }

    /// The embedded admin token, as a client sends it.
    pub fn bearer(&self) -> Bearer {
        let token = fs::read_to_string(self.data_dir.join("admin.token")).expect("the admin token");
        Bearer::new(Some(&SecretString::from(token.trim().to_owned()))).unwrap()
    }

    /// A gRPC client of this sidecar holding its admin token.
    pub async fn client(&self) -> Client {
        Client {
            channel: keywarden::client::connect(&self.addr(), None)
                .await
                .unwrap(),
            bearer: self.bearer(),
        }
    }

    /// Runs a client command that must succeed, and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        out.assert_success(args);
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    /// `encrypt` through the CLI: the `kw1:` line, without its newline.
    pub fn encrypt(&self, args: &[&str]) -> String {
        let mut full = vec!["encrypt"];
        full.extend_from_slice(args);
        let stdout = self.ok(&full);
        let line = stdout
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("{full:?}: no newline after the ciphertext: {stdout:?}"));
        assert!(
            line.starts_with("kw1:") && !line.contains('\n'),
            "{stdout:?}"
        );
        line.to_owned()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        sigterm(self.pid());
        let status = wait_for_exit(&mut self.child, PATIENCE).unwrap_or_else(|| {
            panic!(
                "the sidecar did not exit within {PATIENCE:?} of SIGTERM; its log:\n{}",
                self.log()
            )
        });
        (status, self.log())
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

/// What a client command did.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Out {
    pub fn assert_success(&self, args: &[&str]) {
        assert!(
            self.status.success(),
            "{args:?} failed ({}): {}",
            self.status,
            self.stderr
        );
    }

    /// Exit 1, nothing on stdout, and stderr starting with `CODE: `.
    pub fn assert_failure(&self, code: &str, what: &str) {
        assert_eq!(
            self.status.code(),
            Some(1),
            "{what}: expected exit 1, got {} (stderr: {})",
            self.status,
            self.stderr
        );
        assert!(
            self.stderr.starts_with(&format!("{code}: ")),
            "{what}: expected stderr to start with \"{code}: \", got {:?}",
            self.stderr
        );
        assert!(
            self.stdout.is_empty(),
            "{what}: expected nothing on stdout, got {:?}",
            String::from_utf8_lossy(&self.stdout)
        );
    }
}

/// A channel and the token its calls carry.
#[derive(Clone)]
pub struct Client {
    pub channel: Channel,
    pub bearer: Bearer,
}

impl Client {
    pub fn admin(&self) -> AdminClient<Authed> {
        keywarden::client::admin(self.channel.clone(), self.bearer.clone())
    }

    pub fn crypto(&self) -> CryptoClient<Authed> {
        keywarden::client::crypto(self.channel.clone(), self.bearer.clone())
    }
}

/// Runs `keywarden --addr ADDR ARGS...` with `stdin` (or nothing) on stdin,
/// without a token (as an app on the unix socket would).
pub fn cli_at(addr: &str, args: &[&str], stdin: Option<&[u8]>) -> Out {
    cli_with(addr, None, args, stdin)
}

/// Runs the CLI; with `data_dir`, it finds the admin token there.
pub fn cli_with(addr: &str, data_dir: Option<&Path>, args: &[&str], stdin: Option<&[u8]>) -> Out {
    let mut child = keywarden()
        .env(
            "KEYWARDEN_DATA_DIR",
            data_dir.unwrap_or(Path::new("/nonexistent/keywarden-test")),
        )
        .arg("--addr")
        .arg(addr)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the keywarden client");
    {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        if let Some(bytes) = stdin {
            pipe.write_all(bytes).expect("write the client's stdin");
        }
    }
    let output = child.wait_with_output().expect("wait for the client");
    Out {
        status: output.status,
        stdout: output.stdout,
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// One HTTP/1.1 request over a fresh connection: the status and the body.
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut raw).unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}
