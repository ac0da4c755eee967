//! Connecting to a sidecar, over TCP (optionally TLS) or a unix socket, with
//! a bearer token when there is one. Used by the CLI, the load generator
//! (`keywarden-bench`) and the tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::UnixStream;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    api::pb::{admin_client::AdminClient, crypto_client::CryptoClient},
    auth::tokens::ADMIN_TOKEN_FILE,
    config::{DEFAULT_DATA_DIR, DEFAULT_LISTEN, ListenAddr},
};

/// Largest response a client accepts: a full batch of the largest items.
pub const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// TLS towards a sidecar's TCP listener.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM: the CA that signed the sidecar's certificate.
    pub ca: Vec<u8>,
    /// PEM certificate and key, for mutual TLS.
    pub identity: Option<(Vec<u8>, SecretString)>,
    /// The name the sidecar's certificate must carry; default: the host.
    pub domain: Option<String>,
}

/// How a client reaches the sidecar: the global options of the `keywarden`
/// CLI and of `keywarden-bench`.
#[derive(clap::Args)]
pub struct Connection {
    /// The sidecar to talk to: host:port or unix:/path (client commands).
    #[arg(long, global = true, env = "KEYWARDEN_ADDR", default_value = DEFAULT_LISTEN)]
    pub addr: String,

    /// A file holding the bearer token to send. Without it: KEYWARDEN_TOKEN,
    /// else the embedded admin token (admin.token in KEYWARDEN_DATA_DIR or
    /// ./keywarden-data), else no token.
    #[arg(long, global = true, env = "KEYWARDEN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// TLS: the CA certificate (PEM) that signed the sidecar's certificate.
    #[arg(long, global = true, env = "KEYWARDEN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate (PEM).
    #[arg(long, global = true, env = "KEYWARDEN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: this client's private key (PEM).
    #[arg(long, global = true, env = "KEYWARDEN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the name the sidecar's certificate carries [default: the address's host].
    #[arg(long, global = true, env = "KEYWARDEN_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl Connection {
    /// The TLS settings and the token to send, as the options and the
    /// environment say; refuses to send a token in clear beyond loopback.
    pub fn credentials(&self) -> Result<(Option<ClientTls>, Bearer), String> {
        let tls = self.tls()?;
        let token = find_token(&self.addr, self.token_file.as_deref(), |name| {
            std::env::var(name).ok()
        })?;
        if token.is_some()
            && tls.is_none()
            && matches!(self.addr.parse::<ListenAddr>(), Ok(ListenAddr::Tcp(tcp)) if !tcp.ip().is_loopback())
        {
            return Err(format!(
                "refusing to send a token to {} without TLS: set --tls-ca",
                self.addr
            ));
        }
        Ok((tls, Bearer::new(token.as_ref())?))
    }

    /// TLS settings from the options, reading the files they name.
    fn tls(&self) -> Result<Option<ClientTls>, String> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((
                read(cert)?,
                SecretString::from(String::from_utf8_lossy(&read(key)?).into_owned()),
            )),
            _ => None,
        };
        Ok(Some(ClientTls {
            ca: read(ca)?,
            identity,
            domain: self.tls_domain.clone(),
        }))
    }
}

/// Connects to `addr` (`host:port` or `unix:/path`), with TLS when given.
pub async fn connect(addr: &str, tls: Option<&ClientTls>) -> Result<Channel, String> {
    let parsed: ListenAddr = addr.parse()?;
    let failed =
        |e: tonic::transport::Error| format!("cannot connect to {addr}: {}", source_chain(&e));
    match parsed {
        ListenAddr::Tcp(tcp) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{tcp}"))
                .map_err(failed)?
                .tcp_nodelay(true);
            if let Some(tls) = tls {
                let mut config = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca))
                    .domain_name(tls.domain.clone().unwrap_or_else(|| tcp.ip().to_string()));
                if let Some((cert, key)) = &tls.identity {
                    config = config.identity(Identity::from_pem(cert, key.expose_secret()));
                }
                endpoint = endpoint.tls_config(config).map_err(failed)?;
            }
            endpoint.connect().await.map_err(failed)
        }
        ListenAddr::Unix(path) => {
            // The URI is required by the API but unused: the connector decides.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(failed)
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
/// The header value is marked sensitive, so it never prints.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&SecretString>) -> Result<Self, String> {
        token
            .map(|t| {
                let mut value: MetadataValue<Ascii> = format!("Bearer {}", t.expose_secret())
                    .parse()
                    .map_err(|_| "the token is not valid header text".to_owned())?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()
            .map(Bearer)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that sends the caller's token.
pub type Authed = InterceptedService<Channel, Bearer>;

pub fn crypto(channel: Channel, bearer: Bearer) -> CryptoClient<Authed> {
    CryptoClient::with_interceptor(channel, bearer).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

pub fn admin(channel: Channel, bearer: Bearer) -> AdminClient<Authed> {
    AdminClient::with_interceptor(channel, bearer).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// Where the CLI finds its token, first match wins: `--token-file` (or
/// KEYWARDEN_TOKEN_FILE), KEYWARDEN_TOKEN, then, only towards a sidecar on
/// this host (`addr` on loopback or a unix socket), the embedded admin token:
/// `admin.token` in KEYWARDEN_DATA_DIR or else `./keywarden-data`. With none
/// of these the call carries no token.
pub fn find_token(
    addr: &str,
    token_file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<SecretString>, String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|text| SecretString::from(text.trim().to_owned()))
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))
    };
    if let Some(path) = token_file {
        return read(path).map(Some);
    }
    if let Some(token) = env("KEYWARDEN_TOKEN").filter(|t| !t.trim().is_empty()) {
        return Ok(Some(SecretString::from(token.trim().to_owned())));
    }
    let local = match addr.parse::<ListenAddr>() {
        Ok(ListenAddr::Tcp(tcp)) => tcp.ip().is_loopback(),
        Ok(ListenAddr::Unix(_)) => true,
        Err(_) => false,
    };
    if !local {
        return Ok(None);
    }
    let dir = env("KEYWARDEN_DATA_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from);
    let embedded = dir.join(ADMIN_TOKEN_FILE);
    if embedded.exists() {
        return read(&embedded).map(Some);
    }
    Ok(None)
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
