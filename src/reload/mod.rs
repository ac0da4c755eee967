//! Reload without restart: the TLS certificate and key, the client CA, the
//! tokens file and the policy file are read again when they change on disk
//! and on SIGHUP, and what they hold replaces what is served.
//!
//! - **Watching.** The directories holding the files are watched (`notify`:
//!   inotify on Linux), not the files: Kubernetes updates a mounted Secret
//!   or ConfigMap by swapping a `..data` symlink in the directory, which no
//!   watch on the file itself sees. When a file is itself a symlink, the
//!   directory of its target is watched too. Events are debounced
//!   ([`DEBOUNCE`]); then every file is read and its content compared (by
//!   SHA-256) with what was last read: only a file whose content changed is
//!   loaded again. A burst of writes (a certificate, then its key) is one
//!   reload when it lands within the debounce.
//! - **SIGHUP** reads and loads every file again, changed or not, and checks
//!   the JWKS file for a change at once (its own reloader checks it every
//!   `auth.jwt.reload_seconds`).
//! - **Checks.** A new file must pass the checks of a start: a certificate
//!   file with at least one certificate and a private key that matches its
//!   leaf; a client CA file with at least one CA certificate; a tokens file
//!   and a policy file as `auth` loads them. One that fails is refused: what
//!   was served before keeps being served, the refusal is logged (the
//!   setting and the reason, never the file's content), counted, and listed
//!   by [`ReloadStatus::failures`] until a good file replaces it.
//! - **What changes.** New TLS handshakes use the new certificate or client
//!   CA; connections already open keep theirs ([`tls::LiveTls`]). Each call
//!   is checked against the tokens and the policy current when it arrives
//!   (`auth::Guard`); the embedded admin token is kept across reloads of the
//!   tokens file.
//!
//! Metrics (the `metrics` facade; file is `tls`, `client_ca`, `tokens` or
//! `policy`):
//! - `keywarden_reloads_total{file,outcome}`: each load after a change or
//!   on SIGHUP (not the one at start); outcome `ok` or `error`;
//! - `keywarden_reload_failing{file}`: 1 while the file on disk is refused,
//!   else 0;
//! - `keywarden_tls_cert_expiry_timestamp_seconds`: the served leaf
//!   certificate's notAfter, unix seconds.
//!
//! They are set from [`Reloader::start`] on, so the metrics recorder must be
//! installed before it.

pub mod tls;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use notify::{EventKind, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::{
    auth::{Guard, Policy, StaticTokens},
    config::{ClientAuth, Config},
};
use tls::{LiveTls, certified_key, client_verifier};

/// How long the directories must be quiet after an event before the files
/// are read: a certificate and its key written one after the other land in
/// one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// A directory that never quiets down is read at least this often.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// A file (or pair of files) that is reloaded, as metrics and notes name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reloaded {
    /// `tls.cert_file` and `tls.key_file`, together.
    Tls,
    /// `tls.client_ca_file`.
    ClientCa,
    /// `auth.tokens_file`.
    Tokens,
    /// `auth.policy_file`.
    Policy,
}

impl Reloaded {
    /// The `file` label.
    pub fn name(self) -> &'static str {
        match self {
            Reloaded::Tls => "tls",
            Reloaded::ClientCa => "client_ca",
            Reloaded::Tokens => "tokens",
            Reloaded::Policy => "policy",
        }
    }
}

/// Which reloads fail now, and how many succeeded and failed so far.
#[derive(Default)]
pub struct ReloadStatus {
    state: Mutex<StatusState>,
    observer: Mutex<Option<Observer>>,
}

type Observer = Box<dyn Fn(&'static str, Option<String>) + Send + Sync>;

#[derive(Default)]
struct StatusState {
    failing: BTreeMap<Reloaded, String>,
    outcomes: BTreeMap<Reloaded, (u64, u64)>,
}

impl std::fmt::Debug for ReloadStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadStatus")
            .field("failures", &self.failures())
            .finish()
    }
}

impl ReloadStatus {
    /// The files whose current content on disk is refused, and why (the
    /// setting and the reason, never content): (file, reason), by file.
    pub fn failures(&self) -> Vec<(&'static str, String)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .failing
            .iter()
            .map(|(file, reason)| (file.name(), reason.clone()))
            .collect()
    }

    /// Reloads of `file` so far: (succeeded, refused).
    pub fn outcomes(&self, file: Reloaded) -> (u64, u64) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.outcomes.get(&file).copied().unwrap_or_default()
    }

    /// Calls `observer(file, Some(reason))` when a reload of `file` is
    /// refused and `observer(file, None)` when one succeeds (for /ready's
    /// notes).
    pub fn set_observer(
        &self,
        observer: impl Fn(&'static str, Option<String>) + Send + Sync + 'static,
    ) {
        *self.observer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(observer));
    }

    fn record(&self, file: Reloaded, outcome: Result<(), String>) {
        let note = outcome.err();
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let counts = state.outcomes.entry(file).or_default();
            match &note {
                None => counts.0 += 1,
                Some(_) => counts.1 += 1,
            }
            match &note {
                None => state.failing.remove(&file),
                Some(reason) => state.failing.insert(file, reason.clone()),
            };
        }
        let label = file.name();
        let (result, failing) = match note {
            None => ("ok", 0.0),
            Some(_) => ("error", 1.0),
        };
        metrics::counter!("keywarden_reloads_total", "file" => label, "outcome" => result)
            .increment(1);
        metrics::gauge!("keywarden_reload_failing", "file" => label).set(failing);
        if let Some(observer) = &*self.observer.lock().unwrap_or_else(|p| p.into_inner()) {
            observer(label, note);
        }
    }
}

/// The files the configuration names, and where their content goes.
struct Targets {
    tls: Option<(LiveTls, TlsFiles)>,
    guard: Arc<Guard>,
    tokens: Option<PathBuf>,
    policy: Option<PathBuf>,
}

struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_auth: ClientAuth,
}

impl Targets {
    fn watched(&self) -> Vec<(Reloaded, Vec<&Path>)> {
        let mut files = Vec::new();
        if let Some((_, tls)) = &self.tls {
            files.push((Reloaded::Tls, vec![tls.cert.as_path(), tls.key.as_path()]));
            if let Some(ca) = &tls.client_ca {
                files.push((Reloaded::ClientCa, vec![ca.as_path()]));
            }
        }
        if let Some(path) = &self.tokens {
            files.push((Reloaded::Tokens, vec![path.as_path()]));
        }
        if let Some(path) = &self.policy {
            files.push((Reloaded::Policy, vec![path.as_path()]));
        }
        files
    }

    /// Loads `contents` (the files of `file`, in [`Targets::watched`]'s
    /// order) and swaps them in, or says why not.
    fn apply(&self, file: Reloaded, contents: &[Vec<u8>]) -> Result<(), String> {
        let text = |i: usize| {
            std::str::from_utf8(&contents[i]).map_err(|_| "the file is not UTF-8 text".to_owned())
        };
        match file {
            Reloaded::Tls => {
                let (live, _) = self.tls.as_ref().ok_or("no TLS is configured")?;
                let key = certified_key(&contents[0], &contents[1]).map_err(|e| e.to_string())?;
                live.set_certified_key(key);
                record_expiry(live);
            }
            Reloaded::ClientCa => {
                let (live, files) = self.tls.as_ref().ok_or("no TLS is configured")?;
                let verifier =
                    client_verifier(&contents[0], files.client_auth).map_err(|e| e.to_string())?;
                live.set_client_verifier(Some(verifier));
            }
            Reloaded::Tokens => {
                let source = self.tokens.as_ref().map(|p| p.display().to_string());
                let tokens = StaticTokens::parse(text(0)?, source.as_deref().unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                self.guard.replace_tokens(tokens);
            }
            Reloaded::Policy => {
                let source = self.policy.as_ref().map(|p| p.display().to_string());
                let policy = Policy::parse(text(0)?, source.as_deref().unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                self.guard.replace_policy(policy);
            }
        }
        Ok(())
    }
}

/// Sets `keywarden_tls_cert_expiry_timestamp_seconds` to the served leaf's
/// notAfter.
fn record_expiry(live: &LiveTls) {
    let not_after = live.leaf().and_then(|leaf| {
        x509_parser::parse_x509_certificate(leaf.as_ref())
            .ok()
            .map(|(_, cert)| cert.validity().not_after.timestamp())
    });
    if let Some(seconds) = not_after {
        metrics::gauge!("keywarden_tls_cert_expiry_timestamp_seconds").set(seconds as f64);
    }
}

/// What a file's content was when last read: its SHA-256 (the key file's
/// bytes are not kept), or why it could not be read.
type Seen = Result<[u8; 32], String>;

/// Watches the files of a configuration and reloads them. Dropping it stops
/// the watching.
pub struct Reloader {
    inner: Arc<Inner>,
    _watcher: Option<notify::RecommendedWatcher>,
    task: tokio::task::JoinHandle<()>,
}

struct Inner {
    targets: Targets,
    seen: Mutex<BTreeMap<Reloaded, Seen>>,
    /// One check at a time (the watcher's and SIGHUP's, or
    /// [`Reloader::reload_all`]'s), so that an older read is never applied
    /// after a newer one.
    checking: Mutex<()>,
    status: Arc<ReloadStatus>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reloader {
    /// Starts watching the files `config` names: the TLS files (served
    /// through `tls`), and the tokens and policy files (swapped into
    /// `guard`). With `hangup`, SIGHUP reloads every file. Must run inside a
    /// tokio runtime. A directory that cannot be watched is logged; SIGHUP
    /// still reloads its files.
    pub fn start(config: &Config, guard: Arc<Guard>, tls: Option<LiveTls>, hangup: bool) -> Self {
        Self::build(config, guard, tls, true, hangup)
    }

    fn build(
        config: &Config,
        guard: Arc<Guard>,
        tls: Option<LiveTls>,
        watching: bool,
        hangup: bool,
    ) -> Self {
        let tls = match (tls, &config.tls) {
            (Some(live), Some(files)) => Some((
                live,
                TlsFiles {
                    cert: files.cert_file.clone(),
                    key: files.key_file.clone(),
                    client_ca: files.client_ca_file.clone(),
                    client_auth: files.client_auth,
                },
            )),
            _ => None,
        };
        let targets = Targets {
            tls,
            guard,
            tokens: config.auth.tokens_file.clone(),
            policy: config.auth.policy_file.clone(),
        };
        let status = Arc::new(ReloadStatus::default());
        for (file, _) in targets.watched() {
            metrics::gauge!("keywarden_reload_failing", "file" => file.name()).set(0.0);
        }
        if let Some((live, _)) = &targets.tls {
            record_expiry(live);
        }
        let (events, received) = mpsc::unbounded_channel();
        // The watch starts before the files are first read, so that a change
        // after that read is seen.
        let watcher = if watching {
            watch(&targets, events)
        } else {
            None
        };
        let seen = targets
            .watched()
            .into_iter()
            .map(|(file, paths)| (file, read(&paths).map(|(digest, _)| digest)))
            .collect();
        let inner = Arc::new(Inner {
            targets,
            seen: Mutex::new(seen),
            checking: Mutex::new(()),
            status,
        });
        // Listening for SIGHUP starts before `start` returns: from then on a
        // SIGHUP reloads instead of ending the process (its default action).
        let hangups = if hangup {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(signal) => Some(signal),
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGHUP");
                    None
                }
            }
        } else {
            None
        };
        let task = tokio::spawn(follow(inner.clone(), received, hangups));
        Self {
            inner,
            _watcher: watcher,
            task,
        }
    }

    /// The reloads' outcomes, for /ready's notes.
    pub fn status(&self) -> Arc<ReloadStatus> {
        self.inner.status.clone()
    }

    /// What SIGHUP does: reads and loads every file again, changed or not.
    pub async fn reload_all(&self) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.check(true)).await;
    }
}

impl Inner {
    /// Reads every file; loads those whose content changed since last read
    /// (every one, with `force`).
    fn check(&self, force: bool) {
        let _one_at_a_time = self.checking.lock().unwrap_or_else(|p| p.into_inner());
        for (file, paths) in self.targets.watched() {
            let (seen, contents) = match read(&paths) {
                Ok((digest, contents)) => (Ok(digest), Some(contents)),
                Err(reason) => (Err(reason), None),
            };
            {
                let mut known = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if !force && known.get(&file) == Some(&seen) {
                    continue;
                }
                known.insert(file, seen.clone());
            }
            let outcome = match (seen, contents) {
                (Ok(_), Some(contents)) => self.targets.apply(file, &contents),
                (Err(reason), _) => Err(reason),
                (Ok(_), None) => Err("the file could not be read".into()),
            };
            match &outcome {
                Ok(()) => tracing::info!(file = file.name(), "reloaded"),
                Err(reason) => tracing::error!(
                    file = file.name(),
                    %reason,
                    "refused a changed file; still serving the previous one"
                ),
            }
            self.status.record(file, outcome);
        }
        if force && let Some(jwt) = &self.targets.guard.jwt {
            jwt.reload_if_changed();
        }
    }
}

/// The largest file a reload reads (a Kubernetes Secret or ConfigMap holds
/// at most 1 MiB); a larger one is refused unread.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads one watched file: a regular file (after symlinks) of at most
/// [`MAX_FILE_BYTES`]. Anything else (a FIFO, whose open would block the
/// reloader for good; a device such as /dev/zero; a directory) is refused
/// before it is opened, and a file that grows past the bound while read is
/// refused too.
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let meta = fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} is {} bytes; the limit is {MAX_FILE_BYTES}",
            path.display(),
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "{} grew past the limit of {MAX_FILE_BYTES} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Reads `paths`: the SHA-256 of their contents together, and the contents.
fn read(paths: &[&Path]) -> Result<([u8; 32], Vec<Vec<u8>>), String> {
    let mut digest = Sha256::new();
    let mut contents = Vec::new();
    for path in paths {
        let bytes = read_file(path)?;
        digest.update((bytes.len() as u64).to_be_bytes());
        digest.update(&bytes);
        contents.push(bytes);
    }
    Ok((digest.finalize().into(), contents))
}

/// Watches the directories of `targets`' files (and of their symlinks'
/// targets), sending on `events` when something that may be one of them
/// changes.
fn watch(
    targets: &Targets,
    events: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    let mut dirs = BTreeSet::new();
    let mut names: BTreeSet<OsString> = BTreeSet::new();
    for (_, paths) in targets.watched() {
        for path in paths {
            let resolved = fs::canonicalize(path).ok();
            for path in std::iter::once(path).chain(resolved.as_deref()) {
                let dir = match path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                    _ => PathBuf::from("."),
                };
                dirs.insert(dir);
                if let Some(name) = path.file_name() {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    if dirs.is_empty() {
        return None;
    }
    let handler = move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            // Reads (ours included) change nothing.
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => false,
            // One of the files, or Kubernetes' `..data` and its kin.
            Ok(event) => {
                event.paths.is_empty()
                    || event.paths.iter().any(|path| {
                        path.file_name().is_some_and(|name| {
                            names.contains(name) || name.to_string_lossy().starts_with("..")
                        })
                    })
            }
            // An overflowed queue may have lost one: look.
            Err(_) => true,
        };
        if relevant {
            let _ = events.send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the TLS, tokens and policy files; they reload on SIGHUP only");
            return None;
        }
    };
    for dir in dirs {
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a directory; its files reload on SIGHUP only");
        }
    }
    Some(watcher)
}

/// Reloads on events (debounced) and on SIGHUP (`hangups`).
async fn follow(
    inner: Arc<Inner>,
    mut events: mpsc::UnboundedReceiver<()>,
    mut hangups: Option<tokio::signal::unix::Signal>,
) {
    let mut watching = true;
    loop {
        let force = tokio::select! {
            event = events.recv(), if watching => {
                if event.is_none() {
                    watching = false;
                    continue;
                }
                false
            }
            Some(()) = async {
                match &mut hangups {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!("SIGHUP received: reloading the TLS, tokens and policy files");
                true
            }
            else => return,
        };
        if !force {
            let until = tokio::time::Instant::now() + MAX_DEBOUNCE;
            while let Ok(Some(())) = tokio::time::timeout_at(
                until.min(tokio::time::Instant::now() + DEBOUNCE),
                events.recv(),
            )
            .await
            {}
        }
        let inner = inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.check(force)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        auth::{Caller, Permission, Transport},
        config::TlsConfig,
    };

    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn caller(identity: &str) -> Caller {
        Caller {
            identity: identity.into(),
            transport: Transport::Unix,
            token_tenants: None,
        }
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let (cert, key) = pair();
        let (_, other) = pair();
        assert!(certified_key(cert.as_bytes(), key.as_bytes()).is_ok());
        let e = certified_key(cert.as_bytes(), other.as_bytes()).unwrap_err();
        assert_eq!(e.setting, "tls.key_file");
        assert!(e.reason.contains("does not match"), "{e}");
        let e = certified_key(b"garbage", key.as_bytes()).unwrap_err();
        assert_eq!(e.setting, "tls.cert_file");
        // A broken PEM section is refused without quoting the file.
        for broken in [
            "-----BEGIN CERTIFICATE-----\nLINE-7f3a\n",
            "-----BEGIN CERTIFICATE-----\nLINE-7f3a\n-----END PRIVATE KEY-----\n",
        ] {
            let e = certified_key(broken.as_bytes(), key.as_bytes()).unwrap_err();
            assert!(!e.to_string().contains("LINE-7f3a"), "{e}");
            let e = client_verifier(broken.as_bytes(), ClientAuth::Required)
                .err()
                .unwrap();
            assert!(!e.to_string().contains("LINE-7f3a"), "{e}");
        }
        let e = certified_key(cert.as_bytes(), b"garbage").unwrap_err();
        assert_eq!(e.setting, "tls.key_file");
        // The key's text appears in no error.
        assert!(!e.to_string().contains("PRIVATE"));
        let e = client_verifier(b"# nothing\n", ClientAuth::Required)
            .err()
            .unwrap();
        assert_eq!(e.setting, "tls.client_ca_file");
    }

    #[test]
    fn outcomes_and_the_served_certificates_expiry_are_metrics() {
        use metrics_util::{
            MetricKind,
            debugging::{DebugValue, DebuggingRecorder},
        };
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (cert, key) = pair();
        let live = LiveTls::new(
            certified_key(cert.as_bytes(), key.as_bytes()).unwrap(),
            None,
        );
        let status = ReloadStatus::default();
        metrics::with_local_recorder(&recorder, || {
            status.record(Reloaded::Tls, Err("tls.key_file: no".into()));
            status.record(Reloaded::Tls, Err("tls.key_file: no".into()));
            status.record(Reloaded::Policy, Ok(()));
            record_expiry(&live);
        });
        let values: BTreeMap<String, DebugValue> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let kind = match key.kind() {
                    MetricKind::Counter => "counter",
                    MetricKind::Gauge => "gauge",
                    MetricKind::Histogram => "histogram",
                };
                let key = key.key();
                let mut labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                labels.sort();
                (
                    format!("{kind} {}{{{}}}", key.name(), labels.join(",")),
                    value,
                )
            })
            .collect();
        let expected_expiry = x509_parser::parse_x509_certificate(&der(&cert))
            .unwrap()
            .1
            .validity()
            .not_after
            .timestamp() as f64;
        let expected: BTreeMap<String, DebugValue> = [
            (
                "counter keywarden_reloads_total{file=tls,outcome=error}",
                DebugValue::Counter(2),
            ),
            (
                "counter keywarden_reloads_total{file=policy,outcome=ok}",
                DebugValue::Counter(1),
            ),
            (
                "gauge keywarden_reload_failing{file=tls}",
                DebugValue::Gauge(1.0.into()),
            ),
            (
                "gauge keywarden_reload_failing{file=policy}",
                DebugValue::Gauge(0.0.into()),
            ),
            (
                "gauge keywarden_tls_cert_expiry_timestamp_seconds{}",
                DebugValue::Gauge(expected_expiry.into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(values, expected);
        assert_eq!(status.failures(), [("tls", "tls.key_file: no".to_owned())]);
    }

    fn der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn refused_files_keep_what_is_served_and_are_listed_until_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            fs::write(&path, text).unwrap();
            path
        };
        let mut config = Config {
            tls: Some(TlsConfig {
                cert_file: write("tls.crt", &cert),
                key_file: write("tls.key", &key),
                client_ca_file: None,
                client_auth: ClientAuth::Unset,
            }),
            ..Config::default()
        };
        config.auth.tokens_file = Some(write("tokens.toml", ""));
        config.auth.policy_file = Some(write(
            "policy.toml",
            "[[grant]]\nidentity = \"unix\"\nallow = [\"data\"]\ntenants = [\"*\"]\n",
        ));
        let live = LiveTls::new(
            certified_key(cert.as_bytes(), key.as_bytes()).unwrap(),
            None,
        );
        let admin = crate::auth::tokens::generate();
        let mut embedded = StaticTokens::default();
        embedded.add("admin", &admin);
        let guard = Arc::new(Guard::new(
            StaticTokens::default(),
            embedded,
            None,
            Policy::load(config.auth.policy_file.as_ref().unwrap()).unwrap(),
        ));
        // Reloads on `reload_all` only, so that the counts are exact.
        let reloader = Reloader::build(&config, guard.clone(), Some(live.clone()), false, false);
        let status = reloader.status();
        let notes = Arc::new(Mutex::new(Vec::new()));
        let seen = notes.clone();
        status.set_observer(move |file, note| seen.lock().unwrap().push((file, note)));
        let served = live.leaf().unwrap();

        // Broken replacements of all four... three files.
        write("tls.key", &pair().1);
        write("policy.toml", "[[grant]]\nidentity = \"unix\"\n");
        write(
            "tokens.toml",
            "[[token]]\nname = \"a b\"\nsha256 = \"00\"\n",
        );
        reloader.reload_all().await;
        let failures = status.failures();
        let files: Vec<_> = failures.iter().map(|(file, _)| *file).collect();
        assert_eq!(files, ["tls", "tokens", "policy"], "{failures:?}");
        assert!(failures[0].1.contains("does not match"), "{failures:?}");
        assert_eq!(live.leaf().unwrap(), served);
        let unix = caller("unix");
        assert!(guard.policy().allows(&unix, Permission::Encrypt, Some("t")));
        assert_eq!(status.outcomes(Reloaded::Tls), (0, 1));

        // Fixed: served, and no failure listed.
        let (cert, key) = pair();
        write("tls.crt", &cert);
        write("tls.key", &key);
        write("policy.toml", "");
        let token = crate::auth::tokens::generate();
        write(
            "tokens.toml",
            &format!(
                "[[token]]\nname = \"billing\"\nsha256 = \"{}\"\n",
                hex::encode(crate::auth::tokens::hash(
                    secrecy::ExposeSecret::expose_secret(&token)
                ))
            ),
        );
        reloader.reload_all().await;
        assert_eq!(status.failures(), []);
        assert_ne!(live.leaf().unwrap(), served);
        assert!(!guard.policy().allows(&unix, Permission::Encrypt, Some("t")));
        let bearer = |t: &secrecy::SecretString| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {}", secrecy::ExposeSecret::expose_secret(t))
                    .parse()
                    .unwrap(),
            );
            headers
        };
        let peer = crate::auth::Peer {
            transport: Transport::Unix,
            addr: None,
            certs: None,
        };
        let who = |t| guard.authenticate(&bearer(t), &peer).map(|c| c.identity);
        assert_eq!(who(&token).unwrap(), "token:billing");
        // The embedded admin token survives the tokens file's reload.
        assert_eq!(who(&admin).unwrap(), "token:admin");
        assert_eq!(status.outcomes(Reloaded::Tls), (1, 1));
        let notes = notes.lock().unwrap().clone();
        assert_eq!(notes.len(), 6, "{notes:?}");
        assert!(notes[..3].iter().all(|(_, note)| note.is_some()));
        assert!(notes[3..].iter().all(|(_, note)| note.is_none()));
    }
}
