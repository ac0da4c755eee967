//! Configuration: built-in defaults, then a TOML file (`--config`), then
//! `KEYWARDEN_*` environment variables, then command-line flags; each later
//! source overrides the earlier. An invalid value stops the start with a
//! message naming the setting (and never echoing a secret value).
//!
//! ```toml
//! data_dir = "./keywarden-data"
//! listen = ["127.0.0.1:7400", "unix:/run/keywarden/keywarden.sock"]
//! policy_interval_seconds = 60    # how often automatic rotation and retention run
//! worker_threads = 1              # runtime threads; 0: one per CPU (see docs/SCALING.md)
//!
//! [limits]
//! max_plaintext_bytes = 4194304   # per item
//! max_batch_items = 10000
//! max_request_bytes = 16777216    # a whole gRPC message, batches included
//!
//! [server]                        # what a connection or call may hold, and for how long
//! max_connections = 256           # served at once, over every listener
//! max_concurrent_streams = 128    # calls open at once on one connection
//! stream_window_bytes = 65536     # request bytes a call may send before they are read
//! handshake_timeout_seconds = 10  # TLS handshake and first call's headers
//! idle_timeout_seconds = 300      # a connection with no call open is closed
//! keepalive_interval_seconds = 30 # HTTP/2 PING after this much silence (0: never)
//! keepalive_timeout_seconds = 10  # an unanswered PING closes the connection
//! call_timeout_seconds = 60       # longest unary call (a shorter grpc-timeout wins)
//! stream_timeout_seconds = 3600   # longest streaming call
//! stream_message_timeout_seconds = 30   # wait for a stream's next message
//! decode_budget_bytes = 33554432  # request bytes received and decoded at once, all calls
//! decode_budget_per_caller_bytes = 16777216  # of which one caller may hold
//! request_min_bytes_per_second = 262144      # a message's bytes, after a 5 s grace
//! admin_max_request_bytes = 65536 # largest Admin request
//!
//! [cache]
//! ttl_seconds = 300               # an unwrapped key is re-fetched this often
//! tti_seconds = 60                # and dropped after this long unused
//! max_keys = 100000
//! stale_if_error_seconds = 0      # serve expired keys this long while KMS is down
//!
//! [kms]
//! provider = "aws"                # or "local" (the default: a root key file)
//! region = "eu-west-1"            # the default region
//! key_id = "alias/keywarden"      # the shared root key of the default region
//! # endpoint_url = "https://vpce-...kms.eu-west-1.vpce.amazonaws.com"
//! deletion_waiting_days = 30      # before KMS deletes a shredded tenant's dedicated key
//! attempt_timeout_ms = 2000
//! max_attempts = 3
//! [kms.regions.eu-central-1]
//! key_id = "alias/keywarden"      # the shared root key of another region
//!
//! [auth]
//! admin_token = true              # make data_dir/admin.token on first start and accept it
//! tokens_file = "/etc/keywarden/tokens.toml"   # static API tokens (hashes)
//! policy_file = "/etc/keywarden/policy.toml"   # who may do what; default: see auth::policy
//! [auth.jwt]
//! jwks_file = "/etc/keywarden/jwks.json"       # read again when it changes
//! issuer = "https://idp.example.com/"
//! audience = "keywarden"
//! tenants_claim = "tenants"       # the claim naming the tenants a bearer may act for
//! leeway_seconds = 30
//!
//! [tls]                           # for every TCP listener; required beyond loopback
//! cert_file = "/etc/keywarden/tls/server.crt"
//! key_file = "/etc/keywarden/tls/server.key"
//! client_ca_file = "/etc/keywarden/tls/clients-ca.crt"   # mutual TLS
//! client_auth = "required"        # the default with a client CA; or "optional":
//!                                 # clients may use a token instead. Only with
//!                                 # client_ca_file: without it, an error
//!
//! [audit]
//! sink = "file"                   # or "postgres": the keystore's database, one chain for all sidecars
//! data_plane = "counts"           # "off", "counts" (per interval, tenant and caller) or "every"
//! count_interval_seconds = 60
//!
//! [crypto]
//! provider = "rustcrypto"         # or "aws-lc": AES-256-GCM from AWS-LC (faster; FIPS builds)
//!
//! [admin]                         # /live, /ready, /metrics over HTTP; no authentication
//! listen = "127.0.0.1:7401"       # or "off" (or ""); KEYWARDEN_ADMIN_LISTEN
//! tenant_metrics = "off"          # "top": per-tenant series for the first tenant_metrics_max
//! tenant_metrics_max = 20         # tenants seen (1 to 1000); the rest count as tenant="other"
//!
//! [store]
//! backend = "postgres"            # or "sqlite" (the default: a file in data_dir)
//! url = "postgres://keywarden@db/keywarden"   # secret; or KEYWARDEN_DATABASE_URL
//! max_connections = 8
//! migrate = true                  # false: only check the schema, never change it
//! backup_retention_days = 30      # the longest any copy of the keystore is kept: backups,
//!                                 # WAL archives, replicas, snapshots (erasure receipts say so)
//!
//! [log]
//! format = "text"                 # or "json": one JSON object per line (observe::log)
//! ```
//!
//! Span export (OTLP over gRPC) is configured only by the standard `OTEL_*`
//! variables, never here: see [`crate::observe::trace`].
//!
//! Here: [`env`] (the variables' names and parsers), `types` (what one
//! setting may hold by itself), and a file per group of sections.
//! [`Config::validate`] checks each setting, then what needs several.

mod admin;
pub mod env;
mod kms;
mod listen;
mod sections;
mod server;
#[cfg(test)]
mod tests;
mod types;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use self::types::{AT_LEAST_ONE, WORKER_THREADS};
pub use self::{
    admin::{AdminConfig, AdminListen, DEFAULT_ADMIN_LISTEN, TenantMetrics},
    kms::{KmsConfig, KmsProvider, RegionKey},
    listen::ListenAddr,
    sections::{
        AuditConfig, AuditSink, AuthConfig, CacheConfig, ClientAuth, CryptoConfig, DataPlaneAudit,
        LogConfig, StoreBackend, StoreConfig, TlsConfig,
    },
    server::{RequestLimits, ServerConfig},
    types::{MAX_CACHE_SECONDS, MAX_WORKER_THREADS},
};
/// `[auth.jwt]`: auth's own settings, read here with the rest.
pub use crate::auth::jwt::JwtConfig;

pub const DEFAULT_DATA_DIR: &str = "./keywarden-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";

#[derive(Debug, Error)]
#[error("invalid configuration: {setting}: {reason}")]
pub struct ConfigError {
    /// The setting's name as the user wrote it (file key, variable or flag).
    pub setting: String,
    pub reason: String,
}

/// A file that `[auth]` names cannot be used: an invalid configuration.
impl From<crate::auth::SettingsError> for ConfigError {
    fn from(e: crate::auth::SettingsError) -> Self {
        Self::new(e.setting, e.reason)
    }
}

impl ConfigError {
    pub fn new(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Holds the root key file (local provider) and the SQLite keystore.
    pub data_dir: PathBuf,
    /// Listeners; at least one.
    pub listen: Vec<ListenAddr>,
    /// How often tenant policies (automatic rotation, retention) are applied.
    pub policy_interval_seconds: u64,
    /// Threads of the async runtime that serves calls; 0: one per CPU this
    /// process may use. One by default, as a sidecar usually has a fraction
    /// of a node's CPUs and shares them with its app (docs/SCALING.md).
    pub worker_threads: usize,
    /// `[limits]`: what one request may hold.
    pub limits: RequestLimits,
    /// Connections and calls: bounds and timeouts.
    pub server: ServerConfig,
    pub cache: CacheConfig,
    pub kms: KmsConfig,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    /// TLS for TCP listeners; required for any beyond loopback.
    pub tls: Option<TlsConfig>,
    pub audit: AuditConfig,
    pub crypto: CryptoConfig,
    /// `[admin]`: the admin listener and per-tenant metrics.
    pub admin: AdminConfig,
    /// `[log]`: how log lines are written.
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: vec![DEFAULT_LISTEN.parse().expect("default address parses")],
            policy_interval_seconds: 60,
            worker_threads: 1,
            limits: RequestLimits::default(),
            server: ServerConfig::default(),
            cache: CacheConfig::default(),
            kms: KmsConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            tls: None,
            audit: AuditConfig::default(),
            crypto: CryptoConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses a configuration file's text over the defaults; `source` (the
    /// file's name) names the place of an error.
    pub fn from_toml(text: &str, source: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's message quotes the offending line, which could hold a
            // secret in later versions of this file; name the place only.
            let setting = e
                .span()
                .map(|span| format!("{source} (byte {})", span.start))
                .unwrap_or_else(|| source.to_owned());
            ConfigError::new(setting, crate::secret::toml_reason_without_content(&e))
        })
    }

    /// Checks each setting by itself, then what no single setting can check
    /// alone; the first that fails is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::new("listen", "at least one address is needed"));
        }
        WORKER_THREADS.check("worker_threads", self.worker_threads)?;
        AT_LEAST_ONE.check_all([
            ("policy_interval_seconds", self.policy_interval_seconds),
            ("limits.max_batch_items", self.limits.max_batch_items as u64),
            ("store.max_connections", self.store.max_connections.into()),
            (
                "audit.count_interval_seconds",
                self.audit.count_interval_seconds,
            ),
        ])?;
        self.server.check()?;
        self.cache.check()?;
        self.kms.check()?;
        self.auth.check()?;
        self.admin.check()?;
        if !self.crypto.provider.allowed() {
            return Err(ConfigError::new(
                "crypto.provider",
                "this is a FIPS build: only \"aws-lc\" (the FIPS module) is allowed",
            ));
        }
        self.check_together()
    }

    /// What depends on more than one setting.
    fn check_together(&self) -> Result<(), ConfigError> {
        for addr in &self.listen {
            if let ListenAddr::Tcp(tcp) = addr
                && !tcp.ip().is_loopback()
                && self.tls.is_none()
            {
                return Err(ConfigError::new(
                    "listen",
                    format!(
                        "{tcp} is not a loopback address; a TCP listener beyond loopback needs TLS: \
                         set tls.cert_file and tls.key_file (and tls.client_ca_file for mutual TLS)"
                    ),
                ));
            }
        }
        let limits = &self.limits;
        // Checked: a value near usize::MAX (from KEYWARDEN_MAX_PLAINTEXT_BYTES)
        // must not wrap around into a small sum and pass.
        if limits
            .max_plaintext_bytes
            .checked_add(64 * 1024)
            .is_none_or(|needed| limits.max_request_bytes < needed)
        {
            return Err(ConfigError::new(
                "limits.max_request_bytes",
                "must exceed limits.max_plaintext_bytes by at least 64 KiB, or the largest plaintext cannot arrive",
            ));
        }
        let server = &self.server;
        if server.decode_budget_bytes < limits.max_request_bytes.saturating_add(5) {
            return Err(ConfigError::new(
                "server.decode_budget_bytes",
                "must be at least limits.max_request_bytes + 5 (one whole request and its frame header)",
            ));
        }
        if server.decode_budget_per_caller_bytes < 1024
            || server.decode_budget_per_caller_bytes > server.decode_budget_bytes
        {
            return Err(ConfigError::new(
                "server.decode_budget_per_caller_bytes",
                "must be at least 1024 and at most server.decode_budget_bytes",
            ));
        }
        if server.admin_max_request_bytes < 1024
            || server.admin_max_request_bytes.saturating_add(5) > server.decode_budget_bytes
        {
            return Err(ConfigError::new(
                "server.admin_max_request_bytes",
                "must be at least 1024 and fit in server.decode_budget_bytes",
            ));
        }
        match self.store.backend {
            StoreBackend::Postgres if self.store.url.is_none() => {
                return Err(ConfigError::new(
                    "store.url",
                    format!(
                        "is required with backend = \"postgres\" (or set {})",
                        env::ENV_DATABASE_URL
                    ),
                ));
            }
            StoreBackend::Sqlite if self.store.url.is_some() => {
                return Err(ConfigError::new(
                    "store.url",
                    "needs backend = \"postgres\"",
                ));
            }
            _ => {}
        }
        if self.audit.sink == AuditSink::Postgres && self.store.backend != StoreBackend::Postgres {
            return Err(ConfigError::new(
                "audit.sink",
                "\"postgres\" needs store.backend = \"postgres\" (the log lives in the keystore's database)",
            ));
        }
        if let Some(tls) = &self.tls
            && tls.client_ca_file.is_none()
        {
            let asked = match tls.client_auth {
                ClientAuth::Unset => None,
                ClientAuth::Required => Some("required"),
                ClientAuth::Optional => Some("optional"),
            };
            if let Some(asked) = asked {
                return Err(ConfigError::new(
                    "tls.client_auth",
                    format!(
                        "is \"{asked}\" but tls.client_ca_file is not set, so no client \
                         certificate could be checked: set tls.client_ca_file (or \
                         {}) to the CA that signs client certificates, \
                         or remove tls.client_auth for TLS without client certificates",
                        env::ENV_TLS_CLIENT_CA_FILE
                    ),
                ));
            }
        }
        self.kms.check_provider()
    }
}
