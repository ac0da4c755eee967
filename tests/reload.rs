//! Reload without restart, against the real binary (`keywarden serve` with a
//! configuration file), over real gRPC and TLS:
//!
//! - a certificate rewritten in place, or swapped the Kubernetes way (a new
//!   `..data` symlink), is served to the next handshake while a connection
//!   opened before keeps working;
//! - a broken replacement (not PEM, a key that does not match) is refused,
//!   the old certificate keeps serving, the log says so; a good one is
//!   accepted again;
//! - SIGHUP reloads every file (and does not stop the sidecar);
//! - the tokens file (a new token works, a removed one stops, the embedded
//!   admin token stays, a broken file keeps the old tokens), the policy file
//!   and the client CA likewise;
//! - at start, a key that does not match its certificate stops the start;
//! - a refused file is a note in the readiness body (`/ready`'s) until a
//!   good one replaces it (in-process, wired as `keywarden serve` wires it).
//!
//! Every wait polls with a deadline.

mod common;

use std::{
    collections::BTreeMap,
    future::Future,
    net::Ipv4Addr,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    pki::Pki,
    process::{self, Sidecar},
};
use keywarden::{
    api::pb,
    auth::tokens,
    client::{self, Bearer, ClientTls},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;

/// How long a change on disk may take to be served.
const PATIENCE: Duration = Duration::from_secs(10);

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Writes `text` to `path` by a rename (as editors and `kubectl cp` do), so
/// that no reader sees half a file.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A directory as the kubelet writes a mounted Secret or ConfigMap: the files
/// in a hidden directory of their own, `..data` a symlink to it, and each
/// file name a symlink into `..data`. An update writes a new hidden
/// directory and renames a new symlink over `..data` (one atomic swap).
struct Projected {
    dir: PathBuf,
    generation: u32,
}

impl Projected {
    fn new(dir: PathBuf, files: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let mut projected = Self { dir, generation: 0 };
        projected.update(files);
        for (name, _) in files {
            symlink(format!("..data/{name}"), projected.dir.join(name)).unwrap();
        }
        projected
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let old = format!("..gen_{}", self.generation - 1);
        let new = format!("..gen_{}", self.generation);
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        for (name, text) in files {
            std::fs::write(self.dir.join(&new).join(name), text).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.dir.join(old));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `keywarden serve` process with a configuration file: a unix socket, and
/// a TLS listener on loopback when `tls` is given (its TOML lines).
struct Rig {
    sidecar: Sidecar,
    /// `127.0.0.1:PORT` of the TLS listener.
    tcp: String,
    files: tempfile::TempDir,
}

impl Rig {
    fn start(files: tempfile::TempDir, tls: Option<String>, auth: &str) -> Self {
        let port = free_port();
        let socket = files.path().join("kw.sock");
        let data = files.path().join("data");
        let listen = match &tls {
            Some(_) => format!("[\"127.0.0.1:{port}\", \"unix:{}\"]", socket.display()),
            None => format!("[\"unix:{}\"]", socket.display()),
        };
        let config = files.path().join("keywarden.toml");
        std::fs::write(
            &config,
            format!(
                "listen = {listen}\n{}\n[auth]\n{auth}\n",
                tls.map(|t| format!("[tls]\n{t}")).unwrap_or_default()
            ),
        )
        .unwrap();
        let mut command = process::keywarden();
        command
            .args(["serve", "--data-dir"])
            .arg(&data)
            .arg("--config")
            .arg(&config);
        let sidecar = Sidecar::spawn(command, &data, &socket, files.path().join("serve.log"));
        Self {
            sidecar,
            tcp: format!("127.0.0.1:{port}"),
            files,
        }
    }

    fn log(&self) -> String {
        self.sidecar.log()
    }

    /// Log lines saying a reload of `file` was refused.
    fn refusals(&self, file: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("refused a changed file") && l.contains(&format!("file=\"{file}\""))
            })
            .count()
    }

    /// Log lines saying `file` was reloaded.
    fn reloads(&self, file: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(" reloaded") && l.contains(&format!("file=\"{file}\"")))
            .count()
    }

    /// Waits until the log has more than `before` refusals of `file`.
    async fn refused(&self, file: &str, before: usize) {
        eventually(&format!("a refused reload of {file}"), || async {
            self.refusals(file) > before
        })
        .await;
    }

    async fn unix_channel(&self) -> tonic::transport::Channel {
        client::connect(&self.sidecar.addr(), None).await.unwrap()
    }

    async fn create_tenants(&self, ids: &[&str]) {
        let mut admin = client::admin(self.unix_channel().await, self.sidecar.bearer());
        for id in ids {
            admin
                .create_tenant(pb::CreateTenantRequest {
                    tenant_id: (*id).into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
}

/// Polls `check` every 50 ms until it holds, for at most [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {PATIENCE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leaf certificate (DER) a new TLS handshake with `addr` gets, trusting
/// `ca_pem`. A fresh client configuration every time: no session resumes.
async fn served_leaf(addr: &str, ca_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn client_tls(ca_pem: &str, identity: Option<&(String, String)>) -> ClientTls {
    ClientTls {
        ca: ca_pem.as_bytes().to_vec(),
        identity: identity.map(|(c, k)| (c.as_bytes().to_vec(), SecretString::from(k.clone()))),
        domain: None,
    }
}

async fn encrypt(
    channel: tonic::transport::Channel,
    bearer: Bearer,
    tenant: &str,
) -> Result<Vec<u8>, tonic::Status> {
    client::crypto(channel, bearer)
        .encrypt(pb::EncryptRequest {
            tenant_id: tenant.into(),
            subject_id: String::new(),
            context: BTreeMap::new(),
            plaintext: b"hello".to_vec(),
            deterministic: false,
            key_version: 0,
        })
        .await
        .map(|r| r.into_inner().ciphertext)
}

fn tls_lines(cert: &Path, key: &Path, extra: &str) -> String {
    format!("cert_file = {cert:?}\nkey_file = {key:?}\n{extra}")
}

#[tokio::test]
async fn a_certificate_rewritten_in_place_is_served_to_the_next_handshake_while_open_connections_keep_working()
 {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (first_cert, first_key) = pki.issue(&["127.0.0.1"]);
    let cert = files.path().join("server.pem");
    let key = files.path().join("server.key");
    std::fs::write(&cert, &first_cert).unwrap();
    std::fs::write(&key, &first_key).unwrap();
    let rig = Rig::start(files, Some(tls_lines(&cert, &key, "")), "");
    rig.create_tenants(&["acme"]).await;
    assert_eq!(served_leaf(&rig.tcp, &pki.ca_pem).await, der(&first_cert));
    let tls = client_tls(&pki.ca_pem, None);
    let before = client::connect(&rig.tcp, Some(&tls)).await.unwrap();
    encrypt(before.clone(), rig.sidecar.bearer(), "acme")
        .await
        .unwrap();

    // The certificate and then its key, each written over the old file.
    let (second_cert, second_key) = pki.issue(&["127.0.0.1"]);
    std::fs::write(&cert, &second_cert).unwrap();
    std::fs::write(&key, &second_key).unwrap();
    eventually("the new certificate is served", || async {
        served_leaf(&rig.tcp, &pki.ca_pem).await == der(&second_cert)
    })
    .await;
    // The connection opened before keeps working, and new ones work too.
    for _ in 0..3 {
        encrypt(before.clone(), rig.sidecar.bearer(), "acme")
            .await
            .unwrap();
    }
    let after = client::connect(&rig.tcp, Some(&tls)).await.unwrap();
    encrypt(after, rig.sidecar.bearer(), "acme").await.unwrap();
    assert!(rig.reloads("tls") >= 1, "{}", rig.log());
    assert!(!rig.log().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn a_kubernetes_secret_swap_is_served_and_broken_replacements_are_refused() {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (first_cert, first_key) = pki.issue(&["127.0.0.1"]);
    let mut secret = Projected::new(
        files.path().join("tls"),
        &[("tls.crt", &first_cert), ("tls.key", &first_key)],
    );
    let tls = tls_lines(&secret.path("tls.crt"), &secret.path("tls.key"), "");
    let rig = Rig::start(files, Some(tls), "");
    rig.create_tenants(&["acme"]).await;
    assert_eq!(served_leaf(&rig.tcp, &pki.ca_pem).await, der(&first_cert));
    let channel = client::connect(&rig.tcp, Some(&client_tls(&pki.ca_pem, None)))
        .await
        .unwrap();

    let (second_cert, second_key) = pki.issue(&["127.0.0.1"]);
    secret.update(&[("tls.crt", &second_cert), ("tls.key", &second_key)]);
    eventually("the swapped certificate is served", || async {
        served_leaf(&rig.tcp, &pki.ca_pem).await == der(&second_cert)
    })
    .await;
    encrypt(channel.clone(), rig.sidecar.bearer(), "acme")
        .await
        .unwrap();

    // Not a certificate at all: refused, the second one keeps serving.
    let garbage = "GARBAGE-NOT-A-CERTIFICATE-7f3a";
    let refused = rig.refusals("tls");
    secret.update(&[("tls.crt", garbage), ("tls.key", &second_key)]);
    rig.refused("tls", refused).await;
    assert_eq!(served_leaf(&rig.tcp, &pki.ca_pem).await, der(&second_cert));
    assert!(!rig.log().contains(garbage), "{}", rig.log());

    // A key that is not the certificate's: refused too.
    let (third_cert, _) = pki.issue(&["127.0.0.1"]);
    let (_, other_key) = pki.issue(&["127.0.0.1"]);
    let refused = rig.refusals("tls");
    secret.update(&[("tls.crt", &third_cert), ("tls.key", &other_key)]);
    rig.refused("tls", refused).await;
    let log = rig.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("refused a changed file"))
        .unwrap();
    assert!(
        line.contains("the private key does not match the certificate"),
        "{line}"
    );
    assert!(!log.contains("PRIVATE KEY"), "{log}");
    assert_eq!(served_leaf(&rig.tcp, &pki.ca_pem).await, der(&second_cert));
    encrypt(channel.clone(), rig.sidecar.bearer(), "acme")
        .await
        .unwrap();

    // A good pair again: accepted.
    let (fourth_cert, fourth_key) = pki.issue(&["127.0.0.1"]);
    secret.update(&[("tls.crt", &fourth_cert), ("tls.key", &fourth_key)]);
    eventually(
        "the good certificate after the broken ones is served",
        || async { served_leaf(&rig.tcp, &pki.ca_pem).await == der(&fourth_cert) },
    )
    .await;
    encrypt(channel, rig.sidecar.bearer(), "acme")
        .await
        .unwrap();
}

#[tokio::test]
async fn sighup_reloads_every_file_and_the_sidecar_keeps_serving() {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (cert_pem, key_pem) = pki.issue(&["127.0.0.1"]);
    let cert = files.path().join("server.pem");
    let key = files.path().join("server.key");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    let ca = files.path().join("clients.pem");
    std::fs::write(&ca, Pki::new().ca_pem).unwrap();
    let tokens_file = files.path().join("tokens.toml");
    std::fs::write(&tokens_file, "").unwrap();
    let policy_file = files.path().join("policy.toml");
    std::fs::write(&policy_file, keywarden::auth::policy::DEFAULT_POLICY).unwrap();
    let rig = Rig::start(
        files,
        Some(tls_lines(
            &cert,
            &key,
            &format!("client_ca_file = {ca:?}\nclient_auth = \"optional\"\n"),
        )),
        &format!("tokens_file = {tokens_file:?}\npolicy_file = {policy_file:?}"),
    );
    for file in ["tls", "client_ca", "tokens", "policy"] {
        assert_eq!(rig.reloads(file), 0, "{}", rig.log());
    }
    let status = std::process::Command::new("kill")
        .args(["-HUP", &rig.sidecar.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("every file reloaded on SIGHUP", || async {
        ["tls", "client_ca", "tokens", "policy"]
            .iter()
            .all(|file| rig.reloads(file) == 1)
    })
    .await;
    assert!(rig.log().contains("SIGHUP received"), "{}", rig.log());
    let mut sidecar = rig.sidecar;
    assert!(sidecar.is_running(), "SIGHUP stopped the sidecar");
    // Still serving.
    let channel = client::connect(&sidecar.addr(), None).await.unwrap();
    client::admin(channel, sidecar.bearer())
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap();
    // `terminate` blocks: off this thread, so that the client's connection
    // task can answer the server's GOAWAY meanwhile.
    let (status, log) = tokio::task::spawn_blocking(move || sidecar.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{log}");
}

fn tokens_toml(tokens: &[(&str, &SecretString)]) -> String {
    tokens
        .iter()
        .map(|(name, token)| {
            format!(
                "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\n",
                hex::encode(tokens::hash(token.expose_secret()))
            )
        })
        .collect()
}

const DATA_POLICY: &str = r#"
[[grant]]
identity = "token:admin"
allow = ["admin", "data"]
tenants = ["*"]

[[grant]]
identity = "token:*"
allow = ["data"]
tenants = ["acme"]
"#;

#[tokio::test]
async fn the_tokens_file_reloads_and_a_broken_one_keeps_the_tokens_in_use() {
    let files = tempfile::tempdir().unwrap();
    let policy = files.path().join("policy.toml");
    std::fs::write(&policy, DATA_POLICY).unwrap();
    let tokens_file = files.path().join("tokens.toml");
    let (billing, search) = (tokens::generate(), tokens::generate());
    std::fs::write(&tokens_file, tokens_toml(&[("billing", &billing)])).unwrap();
    let rig = Rig::start(
        files,
        None,
        &format!("tokens_file = {tokens_file:?}\npolicy_file = {policy:?}"),
    );
    rig.create_tenants(&["acme"]).await;
    let call = |token: &SecretString| {
        let bearer = Bearer::new(Some(token)).unwrap();
        let rig = &rig;
        async move { encrypt(rig.unix_channel().await, bearer, "acme").await }
    };
    call(&billing).await.unwrap();
    let refused = call(&search).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // search is added, billing removed.
    replace(&tokens_file, &tokens_toml(&[("search", &search)]));
    eventually("the new token works", || async {
        call(&search).await.is_ok()
    })
    .await;
    let removed = call(&billing).await.unwrap_err();
    assert_eq!(removed.code(), Code::Unauthenticated, "{removed:?}");
    // The embedded admin token is not in the file, and still works.
    rig.create_tenants(&["globex"]).await;

    // A file that does not parse: refused, search keeps working.
    let refused = rig.refusals("tokens");
    replace(
        &tokens_file,
        "[[token]]\nname = \"x\"\nsha256 = \"not hex\"\n",
    );
    rig.refused("tokens", refused).await;
    call(&search).await.unwrap();
    assert_eq!(
        call(&billing).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let log = rig.log();
    assert!(log.contains("sha256 must be 64 hex digits"), "{log}");
    assert!(!log.contains(search.expose_secret()), "{log}");

    // Fixed: both tokens.
    replace(
        &tokens_file,
        &tokens_toml(&[("search", &search), ("billing", &billing)]),
    );
    eventually("the fixed file is loaded", || async {
        call(&billing).await.is_ok()
    })
    .await;
    call(&search).await.unwrap();

    // A token written as a value where its hash belongs: refused, and the
    // refusal (log line, readiness note) quotes nothing of the file.
    let refused = rig.refusals("tokens");
    replace(
        &tokens_file,
        &format!("token = \"{}\"\n", search.expose_secret()),
    );
    rig.refused("tokens", refused).await;
    let log = rig.log();
    assert!(
        log.contains("line 1, column 9: invalid type: string \"…\""),
        "{log}"
    );
    assert!(!log.contains(search.expose_secret()), "{log}");
    call(&search).await.unwrap();

    // A FIFO where the file was: refused before it is opened (an open would
    // block the reloader for good), and the reloader still follows changes.
    let refused = rig.refusals("tokens");
    std::fs::remove_file(&tokens_file).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&tokens_file)
        .status()
        .unwrap();
    assert!(made.success());
    rig.refused("tokens", refused).await;
    eventually("the FIFO refused", || async {
        rig.log().contains("is not a regular file")
    })
    .await;
    call(&search).await.unwrap();
    std::fs::remove_file(&tokens_file).unwrap();
    replace(&tokens_file, &tokens_toml(&[("billing", &billing)]));
    eventually("a good file after the FIFO is loaded", || async {
        call(&search).await.is_err()
    })
    .await;
    call(&billing).await.unwrap();
}

#[tokio::test]
async fn the_policy_file_reloads_and_a_broken_one_keeps_the_policy_in_use() {
    let files = tempfile::tempdir().unwrap();
    let tokens_file = files.path().join("tokens.toml");
    let billing = tokens::generate();
    std::fs::write(&tokens_file, tokens_toml(&[("billing", &billing)])).unwrap();
    let config_map = Projected::new(files.path().join("policy"), &[("policy.toml", DATA_POLICY)]);
    let policy = config_map.path("policy.toml");
    let mut config_map = config_map;
    let rig = Rig::start(
        files,
        None,
        &format!("tokens_file = {tokens_file:?}\npolicy_file = {policy:?}"),
    );
    rig.create_tenants(&["acme", "globex"]).await;
    let bearer = Bearer::new(Some(&billing)).unwrap();
    let call = |tenant: &'static str| {
        let (bearer, rig) = (bearer.clone(), &rig);
        async move { encrypt(rig.unix_channel().await, bearer, tenant).await }
    };
    call("acme").await.unwrap();
    assert_eq!(
        call("globex").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // The ConfigMap now grants globex instead of acme.
    let moved = DATA_POLICY.replace("tenants = [\"acme\"]", "tenants = [\"globex\"]");
    config_map.update(&[("policy.toml", &moved)]);
    eventually("the new policy allows globex", || async {
        call("globex").await.is_ok()
    })
    .await;
    assert_eq!(
        call("acme").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // An unknown permission: refused, the policy in use stays.
    let refused = rig.refusals("policy");
    config_map.update(&[(
        "policy.toml",
        &moved.replace("allow = [\"data\"]", "allow = [\"everything\"]"),
    )]);
    rig.refused("policy", refused).await;
    call("globex").await.unwrap();
    assert_eq!(
        call("acme").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert!(
        rig.log()
            .contains("\\\"everything\\\" is neither a role nor a permission")
            || rig
                .log()
                .contains("\"everything\" is neither a role nor a permission"),
        "{}",
        rig.log()
    );

    // Back to the first policy: accepted.
    config_map.update(&[("policy.toml", DATA_POLICY)]);
    eventually("the first policy is back", || async {
        call("acme").await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_new_client_ca_is_trusted_by_the_next_handshake_and_a_broken_one_is_refused() {
    let files = tempfile::tempdir().unwrap();
    let server_pki = Pki::new();
    let (cert_pem, key_pem) = server_pki.issue(&["127.0.0.1"]);
    let cert = files.path().join("server.pem");
    let key = files.path().join("server.key");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    let (old_ca, new_ca) = (Pki::new(), Pki::new());
    let ca = files.path().join("clients.pem");
    std::fs::write(&ca, &old_ca.ca_pem).unwrap();
    let rig = Rig::start(
        files,
        Some(tls_lines(
            &cert,
            &key,
            &format!("client_ca_file = {ca:?}\n"),
        )),
        "",
    );
    rig.create_tenants(&["acme"]).await;
    let old_client = old_ca.issue(&["spiffe://test.example/old"]);
    let new_client = new_ca.issue(&["spiffe://test.example/new"]);
    // A call with a certificate from `pki` on a new connection: the admin
    // token authorizes it; the handshake decides whether it gets that far.
    let connect = |identity: &(String, String)| {
        let tls = client_tls(&server_pki.ca_pem, Some(identity));
        let addr = rig.tcp.clone();
        async move { client::connect(&addr, Some(&tls)).await.ok() }
    };
    let accepted = |identity: &(String, String)| {
        let (connect, bearer) = (connect(identity), rig.sidecar.bearer());
        async move {
            match connect.await {
                Some(channel) => encrypt(channel, bearer, "acme").await.is_ok(),
                None => false,
            }
        }
    };
    assert!(accepted(&old_client).await);
    assert!(!accepted(&new_client).await);
    let opened_before = connect(&old_client).await.unwrap();
    encrypt(opened_before.clone(), rig.sidecar.bearer(), "acme")
        .await
        .unwrap();

    // The client CA file now holds the new CA only.
    replace(&ca, &new_ca.ca_pem);
    eventually("a client of the new CA is accepted", || {
        accepted(&new_client)
    })
    .await;
    assert!(!accepted(&old_client).await, "the old CA is still trusted");
    // The connection the old CA's client opened before keeps working.
    encrypt(opened_before.clone(), rig.sidecar.bearer(), "acme")
        .await
        .unwrap();

    // A file with no certificate: refused; the new CA stays.
    let refused = rig.refusals("client_ca");
    replace(&ca, "# rotated by hand, nothing here yet\n");
    rig.refused("client_ca", refused).await;
    assert!(accepted(&new_client).await);
    assert!(!accepted(&old_client).await);
    assert!(
        rig.log()
            .contains("tls.client_ca_file: no PEM certificate in it"),
        "{}",
        rig.log()
    );

    // Both CAs: both accepted.
    replace(&ca, &format!("{}{}", old_ca.ca_pem, new_ca.ca_pem));
    eventually("a client of the old CA is accepted again", || {
        accepted(&old_client)
    })
    .await;
    assert!(accepted(&new_client).await);
    let _ = rig.files.path();
}

#[test]
fn a_key_that_does_not_match_its_certificate_stops_the_start() {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (cert_pem, _) = pki.issue(&["127.0.0.1"]);
    let (_, other_key) = pki.issue(&["127.0.0.1"]);
    let cert = files.path().join("server.pem");
    let key = files.path().join("server.key");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &other_key).unwrap();
    let config = files.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"127.0.0.1:{}\"]\n[tls]\n{}",
            free_port(),
            tls_lines(&cert, &key, "")
        ),
    )
    .unwrap();
    let mut command = process::keywarden();
    command
        .args(["serve", "--data-dir"])
        .arg(files.path().join("data"))
        .arg("--config")
        .arg(&config);
    let (code, stderr) = process::exit_and_stderr(command);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.ends_with(&format!(
            "keywarden: tls.key_file {}: the private key does not match the certificate in tls.cert_file\n",
            key.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}

#[tokio::test]
async fn a_refused_file_is_a_readiness_note_until_a_good_one_replaces_it() {
    use keywarden::{
        audit::AuditLog,
        config::{AuthConfig, Config, TlsConfig},
        kms::{local::LocalRootKey, metered::Metered},
        server,
        server::ready::{Readiness, ReadyParts, ReadySettings},
        store::sqlite::{KEYSTORE_FILE, SqliteKeystore},
    };
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (cert_pem, key_pem) = pki.issue(&["127.0.0.1"]);
    let (_, other_key) = pki.issue(&["127.0.0.1"]);
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    std::fs::write(&policy, DATA_POLICY).unwrap();
    let store = SqliteKeystore::open(&dir.path().join(KEYSTORE_FILE))
        .await
        .unwrap();
    let root = LocalRootKey::load_or_create(&dir.path().join("root.key"))
        .unwrap()
        .0;
    let readiness = Readiness::start(
        ReadyParts {
            store: Arc::new(store),
            root: Arc::new(Metered::new(Arc::new(root))),
            audit: Arc::new(AuditLog::open(dir.path()).unwrap()),
        },
        ReadySettings::new(Duration::ZERO),
    );
    let config = Config {
        data_dir: dir.path().to_owned(),
        tls: Some(TlsConfig {
            cert_file: cert.clone(),
            key_file: key.clone(),
            client_ca_file: None,
            client_auth: Default::default(),
        }),
        auth: AuthConfig {
            policy_file: Some(policy.clone()),
            ..AuthConfig::default()
        },
        ..Config::default()
    };
    let guard = Arc::new(server::guard(&config.auth, None).unwrap());
    let tls = server::tls_config(config.tls.as_ref().unwrap()).unwrap();
    let _reloads = server::start_reloads(&config, guard, Some(tls), &readiness, false);
    let notes = || {
        serde_json::from_str::<serde_json::Value>(&readiness.report().body).unwrap()["notes"]
            .clone()
    };
    assert_eq!(notes(), json!({}));

    replace(&key, &other_key);
    replace(&policy, "[[grant]]\nidentity = \"unix\"\n");
    eventually("both refusals are notes", || async {
        notes().as_object().unwrap().len() == 2
    })
    .await;
    let noted = notes();
    assert_eq!(
        noted["reload_tls"],
        "tls.key_file: the private key does not match the certificate in tls.cert_file"
    );
    let policy_note = noted["reload_policy"].as_str().unwrap();
    assert!(
        policy_note.starts_with("auth.policy_file: ") && policy_note.contains("missing field"),
        "{policy_note}"
    );

    replace(&key, &key_pem);
    replace(&policy, DATA_POLICY);
    eventually("the notes are gone", || async { notes() == json!({}) }).await;
}
