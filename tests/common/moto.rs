//! A KMS API server for the tests: moto's server mode, from the virtualenv
//! that scripts/test creates (`pip install 'moto[server]'`). One server per
//! test binary, on a free loopback port, started on first use. It lives as
//! long as the test process: a small Python parent holds moto and stops it
//! when its standard input (a pipe from this process) closes, which happens
//! however the test process ends.

use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use aws_config::{BehaviorVersion, Region};
use aws_credential_types::{Credentials, provider::SharedCredentialsProvider};

/// The region the tests' KMS keys live in.
pub const REGION: &str = "eu-west-1";

pub struct Moto {
    pub endpoint: String,
    /// Kept open: closing it stops moto.
    _stdin: Mutex<ChildStdin>,
    _child: Mutex<Child>,
}

static MOTO: OnceLock<Moto> = OnceLock::new();

/// The shared KMS API server, started on first use.
pub fn moto() -> &'static Moto {
    MOTO.get_or_init(start)
}

fn python() -> PathBuf {
    if let Ok(python) = std::env::var("KEYWARDEN_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with moto: run ./scripts/test (it creates .venv), or set KEYWARDEN_TEST_PYTHON"
    );
    venv
}

fn start() -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = "import subprocess, sys\n\
                  moto = subprocess.Popen([sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', sys.argv[1]],\n\
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
                  sys.stdin.read()\n\
                  moto.terminate()\n\
                  moto.wait(10)\n";
    let mut child = Command::new(python())
        .args(["-c", script, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moto's KMS API server");
    let stdin = child.stdin.take().unwrap();
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!(
                "moto exited with {status}: {err}\n(is moto[server] installed? run ./scripts/test)"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "moto did not start in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Moto {
        endpoint: format!("http://127.0.0.1:{port}"),
        _stdin: Mutex::new(stdin),
        _child: Mutex::new(child),
    }
}

/// Static test credentials; moto accepts any.
pub fn credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new(
        "keywarden-test",
        "keywarden-test",
        None,
        None,
        "tests",
    ))
}

/// A KMS client on `endpoint` (moto, or a proxy in front of it).
pub async fn client(endpoint: &str) -> aws_sdk_kms::Client {
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(credentials())
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_kms::Client::new(&sdk)
}

/// Creates a symmetric KMS key and answers its ARN.
pub async fn create_key(description: &str) -> String {
    client(&moto().endpoint)
        .await
        .create_key()
        .description(description)
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .arn()
        .unwrap()
        .to_owned()
}

/// A key's state as KMS reports it, e.g. "Enabled" or "PendingDeletion".
pub async fn key_state(arn: &str) -> String {
    client(&moto().endpoint)
        .await
        .describe_key()
        .key_id(arn)
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_state()
        .unwrap()
        .as_str()
        .to_owned()
}
