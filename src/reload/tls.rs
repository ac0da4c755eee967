//! The TLS that TCP listeners serve, replaceable while they serve: a rustls
//! server configuration with AWS-LC as its crypto provider, HTTP/2 by ALPN,
//! and client certificates verified against `tls.client_ca_file` when it is
//! set (required or optional, as `tls.client_auth` says).
//!
//! Every new handshake takes the certificate and the client CA current at
//! its start ([`LiveTls`]); connections already open keep what their
//! handshake used. [`certified_key`] and [`client_verifier`] are the checks
//! a file must pass, at start (`server::tls_config`) and at each reload.

use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};
use tokio_rustls::TlsAcceptor;

use crate::config::ClientAuth;

/// Why a TLS file cannot be used: the setting that names it, and why (never
/// the file's content).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFileError {
    pub setting: &'static str,
    pub reason: String,
}

impl fmt::Display for TlsFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.reason)
    }
}

/// Why a file with a broken PEM section is refused.
const MALFORMED_PEM: &str = "a PEM section in it is malformed";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The served certificate chain and its private key, from the PEM bytes of
/// `tls.cert_file` and `tls.key_file`: at least one certificate, a key
/// rustls can use, and the key must be the one the leaf certificate
/// certifies (rustls compares their SubjectPublicKeyInfo).
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, TlsFileError> {
    let cert_error = |reason: String| TlsFileError {
        setting: "tls.cert_file",
        reason,
    };
    let key_error = |reason: &str| TlsFileError {
        setting: "tls.key_file",
        reason: reason.to_owned(),
    };
    // The PEM parser's messages can quote a line of the file: not used.
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| cert_error(MALFORMED_PEM.into()))?;
    let Some(leaf) = certs.first() else {
        return Err(cert_error("no PEM certificate in it".into()));
    };
    x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| cert_error("its first certificate cannot be parsed".into()))?;
    // rustls's messages could quote the key file; name the rule only.
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| key_error("no PEM private key in it"))?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|_| key_error("the private key cannot be used (unsupported or malformed)"))?;
    let certified = CertifiedKey::new(certs, key);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(_) => Err(key_error(
            "the private key does not match the certificate in tls.cert_file",
        )),
    }
}

/// The client-certificate verifier of `tls.client_ca_file`'s PEM bytes: at
/// least one CA certificate; `client_auth` says whether a certificate is
/// required ([`ClientAuth`]).
pub fn client_verifier(
    ca_pem: &[u8],
    client_auth: ClientAuth,
) -> Result<Arc<dyn ClientCertVerifier>, TlsFileError> {
    let error = |reason: String| TlsFileError {
        setting: "tls.client_ca_file",
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|_| error(MALFORMED_PEM.into()))?;
        roots.add(cert).map_err(|e| error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(error("no PEM certificate in it".into()));
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    // Unset with a client CA means required (config::ClientAuth).
    match client_auth {
        ClientAuth::Required | ClientAuth::Unset => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| error(e.to_string()))
}

/// The TLS configuration of TCP listeners as it is now: a certificate and a
/// client CA that can be replaced while the sidecar serves. Cheap to clone
/// (the clones share the state).
///
/// A new certificate goes into the resolver every handshake asks, so the
/// session cache stays. A new client CA builds a new `ServerConfig` (with a
/// fresh session cache, so that no session resumes with a client
/// certificate the old CA verified).
#[derive(Clone)]
pub struct LiveTls {
    cert: Arc<LiveCert>,
    config: Arc<ArcSwap<ServerConfig>>,
}

impl fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveTls").finish_non_exhaustive()
    }
}

impl LiveTls {
    pub fn new(key: Arc<CertifiedKey>, verifier: Option<Arc<dyn ClientCertVerifier>>) -> Self {
        let cert = Arc::new(LiveCert(ArcSwap::new(key)));
        let config = Arc::new(ArcSwap::new(server_config(&cert, verifier)));
        Self { cert, config }
    }

    /// An acceptor for one new connection, with the configuration current now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// The configuration current now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Serves `key` to every handshake from now on.
    pub fn set_certified_key(&self, key: Arc<CertifiedKey>) {
        self.cert.0.store(key);
    }

    /// Verifies client certificates with `verifier` in every handshake from
    /// now on.
    pub fn set_client_verifier(&self, verifier: Option<Arc<dyn ClientCertVerifier>>) {
        self.config.store(server_config(&self.cert, verifier));
    }

    /// The leaf certificate served now (`certified_key` refuses an empty
    /// chain, so there is one).
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.cert.0.load().cert.first().cloned()
    }
}

fn server_config(
    cert: &Arc<LiveCert>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("AWS-LC's provider supports the default protocol versions");
    let builder = match verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut config = builder.with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The certificate and key every handshake gets: the current one.
struct LiveCert(ArcSwap<CertifiedKey>);

impl fmt::Debug for LiveCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveCert").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}
