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
//! [store]
//! backend = "postgres"            # or "sqlite" (the default: a file in data_dir)
//! url = "postgres://keywarden@db/keywarden"   # secret; or KEYWARDEN_DATABASE_URL
//! max_connections = 8
//! migrate = true                  # false: only check the schema, never change it
//! backup_retention_days = 30      # the longest any copy of the keystore is kept: backups,
//!                                 # WAL archives, replicas, snapshots (erasure receipts say so)
//! ```

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use secrecy::SecretString;
use serde::Deserialize;
use thiserror::Error;

use crate::{envelope::Provider, keys::cache::CacheLimits, kms::aws::AwsSettings};

pub const DEFAULT_DATA_DIR: &str = "./keywarden-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Most runtime threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 256;
/// Longest cache time to live, time to idle or grace, in seconds: a year.
pub const MAX_CACHE_SECONDS: u64 = 365 * 86_400;

#[derive(Debug, Error)]
#[error("invalid configuration: {setting}: {reason}")]
pub struct ConfigError {
    /// The setting's name as the user wrote it (file key, variable or flag).
    pub setting: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// Where the sidecar listens: TCP on loopback, or a unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    /// `host:port` (an IP address, or `localhost`) or `unix:/path`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/keywarden.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let replaced = s
            .strip_prefix("localhost:")
            .map(|port| format!("127.0.0.1:{port}"));
        SocketAddr::from_str(replaced.as_deref().unwrap_or(s))
            .map(ListenAddr::Tcp)
            .map_err(|_| {
                format!("{s:?} is neither host:port (an IP address or localhost) nor unix:/path")
            })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest plaintext of one Encrypt or batch item, in bytes.
    pub max_plaintext_bytes: usize,
    /// Most items in one EncryptBatch or DecryptBatch.
    pub max_batch_items: usize,
    /// Largest gRPC request message, in bytes (bounds a whole batch).
    pub max_request_bytes: usize,
    /// Items per second one tenant may encrypt, decrypt or rewrap on this
    /// sidecar (a batch counts its items), unless its policy says otherwise;
    /// 0: no limit.
    pub tenant_items_per_second: u32,
    /// How many items a tenant may use at once above its rate (the bucket's
    /// size); 0: one second's worth.
    pub tenant_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_plaintext_bytes: 4 << 20,
            max_batch_items: 10_000,
            max_request_bytes: 16 << 20,
            tenant_items_per_second: 0,
            tenant_burst: 0,
        }
    }
}

/// Bounds and timeouts of connections and calls: how much a stranger, or a
/// caller, can hold, and for how long (docs/SECURITY.md 12.2, 12.3).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Connections served at once, over every listener; the next waits in
    /// the kernel's accept queue until one closes.
    pub max_connections: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of a call: request bytes a client may
    /// send before the sidecar reads them. A connection's window is
    /// `max_concurrent_streams` times this. One call's upload is at most
    /// this much per round trip. 16 KiB to 16 MiB.
    pub stream_window_bytes: u32,
    /// A new connection must finish its TLS handshake and send its first
    /// call's headers within this, or it is closed.
    pub handshake_timeout_seconds: u64,
    /// A connection with no call open for this long is closed (GOAWAY).
    pub idle_timeout_seconds: u64,
    /// An HTTP/2 PING is sent after this long without a frame from the
    /// client; 0: no keepalive pings.
    pub keepalive_interval_seconds: u64,
    /// A PING not answered within this closes the connection.
    pub keepalive_timeout_seconds: u64,
    /// The longest a unary call may take (a shorter `grpc-timeout` from the
    /// client wins); then DEADLINE_EXCEEDED.
    pub call_timeout_seconds: u64,
    /// The longest a streaming call may take, likewise.
    pub stream_timeout_seconds: u64,
    /// A stream's first message, and each next one, must arrive within
    /// this; else the stream ends with DEADLINE_EXCEEDED.
    pub stream_message_timeout_seconds: u64,
    /// Bytes of request messages being received and decoded at once, over
    /// every call; a call over the budget waits (its sender is held back by
    /// HTTP/2 flow control) instead of taking memory. At least the largest
    /// request (`limits.max_request_bytes`) plus its 5-byte frame header.
    pub decode_budget_bytes: usize,
    /// Of the decode budget, the most one caller (an authenticated identity)
    /// may hold over all its calls; a message larger than this takes all of
    /// it. At least 1024, at most `decode_budget_bytes`.
    pub decode_budget_per_caller_bytes: usize,
    /// Once a message has its share of the budget, its bytes must arrive at
    /// least this fast, after a 5-second grace; else DEADLINE_EXCEEDED.
    pub request_min_bytes_per_second: u64,
    /// Largest Admin request message, in bytes (Crypto's is
    /// `limits.max_request_bytes`).
    pub admin_max_request_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_concurrent_streams: 128,
            stream_window_bytes: 64 << 10,
            handshake_timeout_seconds: 10,
            idle_timeout_seconds: 300,
            keepalive_interval_seconds: 30,
            keepalive_timeout_seconds: 10,
            call_timeout_seconds: 60,
            stream_timeout_seconds: 3600,
            stream_message_timeout_seconds: 30,
            decode_budget_bytes: 32 << 20,
            decode_budget_per_caller_bytes: 16 << 20,
            request_min_bytes_per_second: 256 << 10,
            admin_max_request_bytes: 64 << 10,
        }
    }
}

impl ServerConfig {
    /// Every setting, with its environment variable and a way to set it:
    /// one table for `apply_env` and the README.
    #[allow(clippy::type_complexity)]
    const ENV: [(&'static str, fn(&mut Self, u64) -> Result<(), &'static str>); 14] = [
        ("KEYWARDEN_SERVER_MAX_CONNECTIONS", |c, n| {
            c.max_connections = usize::try_from(n).map_err(|_| "is too large")?;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_MAX_CONCURRENT_STREAMS", |c, n| {
            c.max_concurrent_streams = u32::try_from(n).map_err(|_| "is too large")?;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_STREAM_WINDOW_BYTES", |c, n| {
            c.stream_window_bytes = u32::try_from(n).map_err(|_| "is too large")?;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_HANDSHAKE_TIMEOUT_SECONDS", |c, n| {
            c.handshake_timeout_seconds = n;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_IDLE_TIMEOUT_SECONDS", |c, n| {
            c.idle_timeout_seconds = n;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_KEEPALIVE_INTERVAL_SECONDS", |c, n| {
            c.keepalive_interval_seconds = n;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_KEEPALIVE_TIMEOUT_SECONDS", |c, n| {
            c.keepalive_timeout_seconds = n;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_CALL_TIMEOUT_SECONDS", |c, n| {
            c.call_timeout_seconds = n;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_STREAM_TIMEOUT_SECONDS", |c, n| {
            c.stream_timeout_seconds = n;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_STREAM_MESSAGE_TIMEOUT_SECONDS", |c, n| {
            c.stream_message_timeout_seconds = n;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_DECODE_BUDGET_BYTES", |c, n| {
            c.decode_budget_bytes = usize::try_from(n).map_err(|_| "is too large")?;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_DECODE_BUDGET_PER_CALLER_BYTES", |c, n| {
            c.decode_budget_per_caller_bytes = usize::try_from(n).map_err(|_| "is too large")?;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_REQUEST_MIN_BYTES_PER_SECOND", |c, n| {
            c.request_min_bytes_per_second = n;
            Ok(())
        }),
        ("KEYWARDEN_SERVER_ADMIN_MAX_REQUEST_BYTES", |c, n| {
            c.admin_max_request_bytes = usize::try_from(n).map_err(|_| "is too large")?;
            Ok(())
        }),
    ];

    fn validate(&self, limits: &Limits) -> Result<(), ConfigError> {
        let at_least_one = [
            ("server.max_connections", self.max_connections as u64),
            (
                "server.max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            (
                "server.handshake_timeout_seconds",
                self.handshake_timeout_seconds,
            ),
            ("server.idle_timeout_seconds", self.idle_timeout_seconds),
            (
                "server.keepalive_timeout_seconds",
                self.keepalive_timeout_seconds,
            ),
            ("server.call_timeout_seconds", self.call_timeout_seconds),
            ("server.stream_timeout_seconds", self.stream_timeout_seconds),
            (
                "server.stream_message_timeout_seconds",
                self.stream_message_timeout_seconds,
            ),
            (
                "server.request_min_bytes_per_second",
                self.request_min_bytes_per_second,
            ),
        ];
        for (setting, value) in at_least_one {
            if value == 0 {
                return Err(ConfigError::new(setting, "must be at least 1"));
            }
        }
        if self.decode_budget_bytes < limits.max_request_bytes.saturating_add(5) {
            return Err(ConfigError::new(
                "server.decode_budget_bytes",
                "must be at least limits.max_request_bytes + 5 (one whole request and its frame header)",
            ));
        }
        if !(16 << 10..=16 << 20).contains(&self.stream_window_bytes) {
            return Err(ConfigError::new(
                "server.stream_window_bytes",
                "must be from 16384 to 16777216",
            ));
        }
        if self.decode_budget_per_caller_bytes < 1024
            || self.decode_budget_per_caller_bytes > self.decode_budget_bytes
        {
            return Err(ConfigError::new(
                "server.decode_budget_per_caller_bytes",
                "must be at least 1024 and at most server.decode_budget_bytes",
            ));
        }
        if self.admin_max_request_bytes < 1024
            || self.admin_max_request_bytes.saturating_add(5) > self.decode_budget_bytes
        {
            return Err(ConfigError::new(
                "server.admin_max_request_bytes",
                "must be at least 1024 and fit in server.decode_budget_bytes",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub ttl_seconds: u64,
    pub tti_seconds: u64,
    pub max_keys: u64,
    /// Seconds past the TTL a cached key keeps serving while the KMS or the
    /// keystore is unavailable; 0 (the default) turns this off.
    pub stale_if_error_seconds: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl_seconds: 300,
            tti_seconds: 60,
            max_keys: 100_000,
            stale_if_error_seconds: 0,
        }
    }
}

impl CacheConfig {
    pub fn limits(&self) -> CacheLimits {
        CacheLimits {
            max_entries: self.max_keys,
            time_to_live: Duration::from_secs(self.ttl_seconds),
            time_to_idle: Duration::from_secs(self.tti_seconds),
            stale_if_error: Duration::from_secs(self.stale_if_error_seconds),
        }
    }
}

/// Which root-key provider holds the root key.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KmsProvider {
    /// A root key file in the data directory: development, single host.
    #[default]
    Local,
    /// AWS KMS (or any endpoint speaking its API).
    Aws,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionKey {
    /// The region's shared root key: key id, ARN or alias.
    pub key_id: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KmsConfig {
    pub provider: KmsProvider,
    /// AWS: the default region.
    pub region: Option<String>,
    /// AWS: the shared root key of the default region.
    pub key_id: Option<String>,
    /// AWS: another endpoint (VPC endpoint, local KMS API server).
    pub endpoint_url: Option<String>,
    /// AWS: shared root keys of further regions.
    pub regions: BTreeMap<String, RegionKey>,
    /// Days before KMS deletes a shredded tenant's dedicated key (7 to 30).
    pub deletion_waiting_days: u32,
    /// Longest wait for one attempt of one KMS call.
    pub attempt_timeout_ms: u64,
    /// Attempts per KMS call, the first included.
    pub max_attempts: u32,
}

impl Default for KmsConfig {
    fn default() -> Self {
        Self {
            provider: KmsProvider::Local,
            region: None,
            key_id: None,
            endpoint_url: None,
            regions: BTreeMap::new(),
            deletion_waiting_days: 30,
            attempt_timeout_ms: 2000,
            max_attempts: 3,
        }
    }
}

impl KmsConfig {
    /// The AWS provider's settings (after [`Config::validate`]).
    pub fn aws_settings(&self) -> Option<AwsSettings> {
        let region = self.region.clone()?;
        let mut shared_keys = vec![(region.clone(), self.key_id.clone()?)];
        shared_keys.extend(
            self.regions
                .iter()
                .map(|(r, k)| (r.clone(), k.key_id.clone())),
        );
        Some(AwsSettings {
            default_region: region,
            shared_keys,
            endpoint_url: self.endpoint_url.clone(),
            attempt_timeout: Duration::from_millis(self.attempt_timeout_ms),
            max_attempts: self.max_attempts,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match self.provider {
            KmsProvider::Aws => {
                if self.region.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::new(
                        "kms.region",
                        "is required with provider = \"aws\"",
                    ));
                }
                if self.key_id.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::new(
                        "kms.key_id",
                        "is required with provider = \"aws\"",
                    ));
                }
            }
            KmsProvider::Local => {
                if self.key_id.is_some() || self.region.is_some() || !self.regions.is_empty() {
                    return Err(ConfigError::new(
                        "kms.provider",
                        "kms.key_id, kms.region and kms.regions need provider = \"aws\"",
                    ));
                }
            }
        }
        if !(7..=30).contains(&self.deletion_waiting_days) {
            return Err(ConfigError::new(
                "kms.deletion_waiting_days",
                "must be 7 to 30 (the range KMS accepts)",
            ));
        }
        if self.max_attempts == 0 || self.attempt_timeout_ms == 0 {
            return Err(ConfigError::new(
                "kms.max_attempts / kms.attempt_timeout_ms",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Which keystore holds the wrapped keys.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One SQLite file in the data directory: one sidecar.
    #[default]
    Sqlite,
    /// PostgreSQL: many sidecars share one keystore.
    Postgres,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// postgres: the connection URL. A secret (it may hold a password): it
    /// never prints, and errors name the setting, not the value.
    pub url: Option<SecretString>,
    /// postgres: connections per sidecar.
    pub max_connections: u32,
    /// postgres: apply pending migrations at start (true), or only check
    /// that none is pending and refuse to start otherwise (false).
    pub migrate: bool,
    /// The longest time any copy of the keystore is kept (backups, base
    /// backups, WAL archives, delayed replicas, snapshots): a shredded key
    /// may survive in one until then, as erasure receipts state.
    pub backup_retention_days: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sqlite,
            url: None,
            max_connections: 8,
            migrate: true,
            backup_retention_days: 30,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Make an admin token in the data directory on first start (admin.token,
    /// mode 0600) and accept it as `token:admin`.
    pub admin_token: bool,
    /// Static API tokens (names and SHA-256 hashes).
    pub tokens_file: Option<PathBuf>,
    /// Who may do what; without one, the default policy (auth::policy).
    pub policy_file: Option<PathBuf>,
    pub jwt: Option<JwtConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            admin_token: true,
            tokens_file: None,
            policy_file: None,
            jwt: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub jwks_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    #[serde(default = "default_tenants_claim")]
    pub tenants_claim: String,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// How often the JWKS file is checked for changes.
    #[serde(default = "default_reload")]
    pub reload_seconds: u64,
}

fn default_tenants_claim() -> String {
    "tenants".into()
}
fn default_leeway() -> u64 {
    30
}
fn default_reload() -> u64 {
    5
}

/// Whether clients of a TLS listener must present a certificate.
///
/// The rule, exactly: with `tls.client_ca_file`, clients must present a
/// certificate it signed (`"required"`, also when `client_auth` is not set)
/// or may (`"optional"`). Without `tls.client_ca_file`, no client
/// certificate is asked for, and `tls.client_auth` must not be set: a
/// `"required"` that nothing could enforce stops the start (exit 78) instead
/// of serving without client certificates.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Not set: `Required` when a client CA is given, else no client
    /// certificates. Not a value a file or variable can name.
    #[default]
    #[serde(skip)]
    Unset,
    /// Mutual TLS: a certificate signed by the client CA, or no connection.
    Required,
    /// A certificate, when given, must verify; callers without one may
    /// present a bearer token.
    Optional,
}

impl FromStr for ClientAuth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(ClientAuth::Required),
            "optional" => Ok(ClientAuth::Optional),
            _ => Err("must be required or optional".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    /// A secret: its contents never print.
    pub key_file: PathBuf,
    /// CA certificates that sign client certificates: mutual TLS.
    pub client_ca_file: Option<PathBuf>,
    /// See [`ClientAuth`]: set only together with `client_ca_file`.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// Which data-plane calls the audit log records (admin calls and refused
/// calls are always recorded).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataPlaneAudit {
    Off,
    /// One record per minute per tenant, caller, call and outcome, with a count.
    #[default]
    Counts,
    /// One record per call.
    Every,
}

/// Where audit records go.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditSink {
    /// `audit.log` in the data directory: one chain per sidecar.
    #[default]
    File,
    /// The PostgreSQL keystore's `audit_log` table: one chain for all the
    /// sidecars sharing it.
    Postgres,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub sink: AuditSink,
    pub data_plane: DataPlaneAudit,
    /// How often counted data-plane calls are written (counts mode).
    pub count_interval_seconds: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            sink: AuditSink::File,
            data_plane: DataPlaneAudit::Counts,
            count_interval_seconds: 60,
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
    pub limits: Limits,
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
}

/// How envelopes are sealed.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CryptoConfig {
    /// The AES-256-GCM implementation (envelope::provider).
    pub provider: Provider,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: vec![DEFAULT_LISTEN.parse().expect("default address parses")],
            policy_interval_seconds: 60,
            worker_threads: 1,
            limits: Limits::default(),
            server: ServerConfig::default(),
            cache: CacheConfig::default(),
            kms: KmsConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            tls: None,
            audit: AuditConfig::default(),
            crypto: CryptoConfig::default(),
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
            ConfigError::new(setting, e.message().to_owned())
        })
    }

    /// Applies `KEYWARDEN_*` variables, read through `var` (the process
    /// environment in production, a map in tests).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = var("KEYWARDEN_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = var("KEYWARDEN_LISTEN") {
            self.listen = v
                .split(',')
                .map(|part| part.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|reason| ConfigError::new("KEYWARDEN_LISTEN", reason))?;
        }
        let number = |name: &str| -> Result<Option<u64>, ConfigError> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| ConfigError::new(name, "must be a whole number"))
                })
                .transpose()
        };
        let size = |name: &str| -> Result<Option<usize>, ConfigError> {
            number(name)?
                .map(|n| usize::try_from(n).map_err(|_| ConfigError::new(name, "is too large")))
                .transpose()
        };
        if let Some(n) = size("KEYWARDEN_WORKER_THREADS")? {
            self.worker_threads = n;
        }
        if let Some(n) = size("KEYWARDEN_MAX_PLAINTEXT_BYTES")? {
            self.limits.max_plaintext_bytes = n;
        }
        if let Some(n) = size("KEYWARDEN_MAX_BATCH_ITEMS")? {
            self.limits.max_batch_items = n;
        }
        if let Some(n) = size("KEYWARDEN_MAX_REQUEST_BYTES")? {
            self.limits.max_request_bytes = n;
        }
        for (name, set) in ServerConfig::ENV {
            if let Some(n) = number(name)? {
                set(&mut self.server, n).map_err(|reason| ConfigError::new(name, reason))?;
            }
        }
        if let Some(n) = number("KEYWARDEN_TENANT_ITEMS_PER_SECOND")? {
            self.limits.tenant_items_per_second = u32::try_from(n).map_err(|_| {
                ConfigError::new("KEYWARDEN_TENANT_ITEMS_PER_SECOND", "is too large")
            })?;
        }
        if let Some(n) = number("KEYWARDEN_TENANT_BURST")? {
            self.limits.tenant_burst = u32::try_from(n)
                .map_err(|_| ConfigError::new("KEYWARDEN_TENANT_BURST", "is too large"))?;
        }
        if let Some(n) = number("KEYWARDEN_CACHE_TTL_SECONDS")? {
            self.cache.ttl_seconds = n;
        }
        if let Some(n) = number("KEYWARDEN_CACHE_TTI_SECONDS")? {
            self.cache.tti_seconds = n;
        }
        if let Some(n) = number("KEYWARDEN_CACHE_MAX_KEYS")? {
            self.cache.max_keys = n;
        }
        if let Some(n) = number("KEYWARDEN_CACHE_STALE_IF_ERROR_SECONDS")? {
            self.cache.stale_if_error_seconds = n;
        }
        if let Some(v) = var("KEYWARDEN_STORE_BACKEND") {
            self.store.backend = match v.trim() {
                "sqlite" => StoreBackend::Sqlite,
                "postgres" => StoreBackend::Postgres,
                _ => {
                    return Err(ConfigError::new(
                        "KEYWARDEN_STORE_BACKEND",
                        "must be sqlite or postgres",
                    ));
                }
            };
        }
        if let Some(v) = var("KEYWARDEN_DATABASE_URL").filter(|v| !v.trim().is_empty()) {
            self.store.url = Some(SecretString::from(v.trim().to_owned()));
        }
        if let Some(n) = number("KEYWARDEN_STORE_MAX_CONNECTIONS")? {
            self.store.max_connections = u32::try_from(n)
                .map_err(|_| ConfigError::new("KEYWARDEN_STORE_MAX_CONNECTIONS", "is too large"))?;
        }
        if let Some(v) = var("KEYWARDEN_STORE_MIGRATE") {
            self.store.migrate = match v.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(ConfigError::new(
                        "KEYWARDEN_STORE_MIGRATE",
                        "must be true or false",
                    ));
                }
            };
        }
        if let Some(v) = var("KEYWARDEN_KMS_PROVIDER") {
            self.kms.provider = match v.trim() {
                "local" => KmsProvider::Local,
                "aws" => KmsProvider::Aws,
                _ => {
                    return Err(ConfigError::new(
                        "KEYWARDEN_KMS_PROVIDER",
                        "must be local or aws",
                    ));
                }
            };
        }
        let text = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if let Some(v) = text("KEYWARDEN_AUTH_POLICY_FILE") {
            self.auth.policy_file = Some(PathBuf::from(v));
        }
        if let Some(v) = text("KEYWARDEN_AUTH_TOKENS_FILE") {
            self.auth.tokens_file = Some(PathBuf::from(v));
        }
        if let Some(n) = number("KEYWARDEN_AUDIT_COUNT_INTERVAL_SECONDS")? {
            self.audit.count_interval_seconds = n;
        }
        if let Some(v) = var("KEYWARDEN_AUDIT_SINK") {
            self.audit.sink = match v.trim() {
                "file" => AuditSink::File,
                "postgres" => AuditSink::Postgres,
                _ => {
                    return Err(ConfigError::new(
                        "KEYWARDEN_AUDIT_SINK",
                        "must be file or postgres",
                    ));
                }
            };
        }
        if let Some(v) = var("KEYWARDEN_CRYPTO_PROVIDER") {
            self.crypto.provider = v
                .trim()
                .parse()
                .map_err(|reason| ConfigError::new("KEYWARDEN_CRYPTO_PROVIDER", reason))?;
        }
        if let Some(v) = var("KEYWARDEN_AUDIT_DATA_PLANE") {
            self.audit.data_plane = match v.trim() {
                "off" => DataPlaneAudit::Off,
                "counts" => DataPlaneAudit::Counts,
                "every" => DataPlaneAudit::Every,
                _ => {
                    return Err(ConfigError::new(
                        "KEYWARDEN_AUDIT_DATA_PLANE",
                        "must be off, counts or every",
                    ));
                }
            };
        }
        self.apply_tls_env(&text)?;
        if let Some(v) = text("KEYWARDEN_KMS_REGION") {
            self.kms.region = Some(v);
        }
        if let Some(v) = text("KEYWARDEN_KMS_KEY_ID") {
            self.kms.key_id = Some(v);
        }
        if let Some(v) = text("KEYWARDEN_KMS_ENDPOINT_URL") {
            self.kms.endpoint_url = Some(v);
        }
        if let Some(v) = text("KEYWARDEN_KMS_REGIONS") {
            // region=key,region=key
            for pair in v.split(',') {
                let (region, key) = pair.split_once('=').ok_or_else(|| {
                    ConfigError::new(
                        "KEYWARDEN_KMS_REGIONS",
                        "expected region=key_id[,region=key_id...]",
                    )
                })?;
                self.kms.regions.insert(
                    region.trim().to_owned(),
                    RegionKey {
                        key_id: key.trim().to_owned(),
                    },
                );
            }
        }
        if let Some(n) = number("KEYWARDEN_KMS_DELETION_WAITING_DAYS")? {
            self.kms.deletion_waiting_days = u32::try_from(n).map_err(|_| {
                ConfigError::new("KEYWARDEN_KMS_DELETION_WAITING_DAYS", "is too large")
            })?;
        }
        if let Some(n) = number("KEYWARDEN_KMS_ATTEMPT_TIMEOUT_MS")? {
            self.kms.attempt_timeout_ms = n;
        }
        if let Some(n) = number("KEYWARDEN_KMS_MAX_ATTEMPTS")? {
            self.kms.max_attempts = u32::try_from(n)
                .map_err(|_| ConfigError::new("KEYWARDEN_KMS_MAX_ATTEMPTS", "is too large"))?;
        }
        Ok(())
    }

    /// The `KEYWARDEN_TLS_*` variables, each over its own field of `[tls]`:
    /// a variable replaces that field and keeps the file's others (a new
    /// certificate from the environment keeps the file's client CA). Without
    /// a `[tls]` section, the certificate and key variables make one and
    /// must come together. Checks nothing else: [`Config::validate`] does.
    fn apply_tls_env(&mut self, text: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let cert_file = text("KEYWARDEN_TLS_CERT_FILE").map(PathBuf::from);
        let key_file = text("KEYWARDEN_TLS_KEY_FILE").map(PathBuf::from);
        let client_ca_file = text("KEYWARDEN_TLS_CLIENT_CA_FILE").map(PathBuf::from);
        let client_auth = text("KEYWARDEN_TLS_CLIENT_AUTH")
            .map(|v| v.parse::<ClientAuth>())
            .transpose()
            .map_err(|reason| ConfigError::new("KEYWARDEN_TLS_CLIENT_AUTH", reason))?;
        let tls = match self.tls.take() {
            Some(tls) => tls,
            None => match (cert_file.clone(), key_file.clone()) {
                (Some(cert_file), Some(key_file)) => TlsConfig {
                    cert_file,
                    key_file,
                    client_ca_file: None,
                    client_auth: ClientAuth::Unset,
                },
                (None, None) if client_ca_file.is_none() && client_auth.is_none() => {
                    return Ok(());
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        if client_ca_file.is_some() {
                            "KEYWARDEN_TLS_CLIENT_CA_FILE"
                        } else {
                            "KEYWARDEN_TLS_CLIENT_AUTH"
                        },
                        "needs a TLS certificate and key: set KEYWARDEN_TLS_CERT_FILE and \
                         KEYWARDEN_TLS_KEY_FILE, or tls.cert_file and tls.key_file",
                    ));
                }
                _ => {
                    return Err(ConfigError::new(
                        "KEYWARDEN_TLS_CERT_FILE / KEYWARDEN_TLS_KEY_FILE",
                        "set both or neither (the configuration file has no [tls] section to \
                         take the other from)",
                    ));
                }
            },
        };
        self.tls = Some(TlsConfig {
            cert_file: cert_file.unwrap_or(tls.cert_file),
            key_file: key_file.unwrap_or(tls.key_file),
            client_ca_file: client_ca_file.or(tls.client_ca_file),
            client_auth: client_auth.unwrap_or(tls.client_auth),
        });
        Ok(())
    }

    /// Checks what no single field can check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::new("listen", "at least one address is needed"));
        }
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
        if limits.max_batch_items == 0 {
            return Err(ConfigError::new(
                "limits.max_batch_items",
                "must be at least 1",
            ));
        }
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
        self.server.validate(limits)?;
        if self.cache.ttl_seconds == 0 || self.cache.tti_seconds == 0 {
            return Err(ConfigError::new(
                "cache.ttl_seconds / cache.tti_seconds",
                "must be at least 1 second",
            ));
        }
        // The cache adds these up (time to live plus grace): numbers near
        // u64::MAX would overflow there. Far beyond any sensible setting.
        for (setting, seconds) in [
            ("cache.ttl_seconds", self.cache.ttl_seconds),
            ("cache.tti_seconds", self.cache.tti_seconds),
            (
                "cache.stale_if_error_seconds",
                self.cache.stale_if_error_seconds,
            ),
        ] {
            if seconds > MAX_CACHE_SECONDS {
                return Err(ConfigError::new(
                    setting,
                    format!("must be at most {MAX_CACHE_SECONDS} (a year)"),
                ));
            }
        }
        if !self.crypto.provider.allowed() {
            return Err(ConfigError::new(
                "crypto.provider",
                "this is a FIPS build: only \"aws-lc\" (the FIPS module) is allowed",
            ));
        }
        if self.cache.max_keys == 0 {
            return Err(ConfigError::new("cache.max_keys", "must be at least 1"));
        }
        match self.store.backend {
            StoreBackend::Postgres if self.store.url.is_none() => {
                return Err(ConfigError::new(
                    "store.url",
                    "is required with backend = \"postgres\" (or set KEYWARDEN_DATABASE_URL)",
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
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::new(
                "worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0: one per CPU)"),
            ));
        }
        if self.policy_interval_seconds == 0 {
            return Err(ConfigError::new(
                "policy_interval_seconds",
                "must be at least 1",
            ));
        }
        if self.audit.sink == AuditSink::Postgres && self.store.backend != StoreBackend::Postgres {
            return Err(ConfigError::new(
                "audit.sink",
                "\"postgres\" needs store.backend = \"postgres\" (the log lives in the keystore's database)",
            ));
        }
        if self.audit.count_interval_seconds == 0 {
            return Err(ConfigError::new(
                "audit.count_interval_seconds",
                "must be at least 1",
            ));
        }
        if let Some(jwt) = &self.auth.jwt
            && (jwt.issuer.is_empty() || jwt.audience.is_empty() || jwt.reload_seconds == 0)
        {
            return Err(ConfigError::new(
                "auth.jwt",
                "issuer and audience must not be empty, and reload_seconds must be at least 1",
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
                         KEYWARDEN_TLS_CLIENT_CA_FILE) to the CA that signs client certificates, \
                         or remove tls.client_auth for TLS without client certificates"
                    ),
                ));
            }
        }
        if self.store.max_connections == 0 {
            return Err(ConfigError::new(
                "store.max_connections",
                "must be at least 1",
            ));
        }
        self.kms.validate()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_are_the_embedded_sidecar() {
        let config = Config::default();
        assert_eq!(config.data_dir, PathBuf::from("./keywarden-data"));
        assert_eq!(
            config.listen,
            vec![ListenAddr::Tcp("127.0.0.1:7400".parse().unwrap())]
        );
        assert_eq!(config.limits.max_plaintext_bytes, 4 * 1024 * 1024);
        assert_eq!(config.limits.max_batch_items, 10_000);
        config.validate().unwrap();
    }

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "listen = [\"unix:/tmp/k.sock\"]\n[limits]\nmax_batch_items = 5\n[cache]\nttl_seconds = 10\n",
        )
        .unwrap();
        let mut config = Config::from_file(&path).unwrap();
        assert_eq!(config.listen, vec![ListenAddr::Unix("/tmp/k.sock".into())]);
        assert_eq!(config.limits.max_batch_items, 5);
        assert_eq!(config.cache.ttl_seconds, 10);
        assert_eq!(config.cache.max_keys, 100_000);
        config
            .apply_env(env(&[
                ("KEYWARDEN_LISTEN", "127.0.0.1:1, unix:/x.sock"),
                ("KEYWARDEN_MAX_BATCH_ITEMS", "7"),
            ]))
            .unwrap();
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.limits.max_batch_items, 7);
    }

    #[test]
    fn worker_threads_default_to_one_and_are_bounded() {
        let mut config = Config::default();
        assert_eq!(config.worker_threads, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "worker_threads = 4\n").unwrap();
        assert_eq!(Config::from_file(&path).unwrap().worker_threads, 4);
        config
            .apply_env(env(&[("KEYWARDEN_WORKER_THREADS", "0")]))
            .unwrap();
        assert_eq!(config.worker_threads, 0);
        config.validate().unwrap();
        let err = config
            .apply_env(env(&[("KEYWARDEN_WORKER_THREADS", "two")]))
            .unwrap_err();
        assert_eq!(err.setting, "KEYWARDEN_WORKER_THREADS");
        assert_eq!(config.worker_threads, 0, "a refused value changes nothing");
        config.worker_threads = MAX_WORKER_THREADS + 1;
        assert_eq!(config.validate().unwrap_err().setting, "worker_threads");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let mut config = Config::default();
        let err = config
            .apply_env(env(&[("KEYWARDEN_CACHE_TTL_SECONDS", "five")]))
            .unwrap_err();
        assert_eq!(err.setting, "KEYWARDEN_CACHE_TTL_SECONDS");
        let err = config
            .apply_env(env(&[("KEYWARDEN_LISTEN", "nowhere")]))
            .unwrap_err();
        assert_eq!(err.setting, "KEYWARDEN_LISTEN");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "[limits]\nmax_batch_itemz = 5\n").unwrap();
        let err = Config::from_file(&path).unwrap_err();
        assert!(err.reason.contains("max_batch_itemz"), "{err}");
    }

    #[test]
    fn tcp_beyond_loopback_is_refused() {
        let config = Config {
            listen: vec!["0.0.0.0:7400".parse().unwrap()],
            ..Config::default()
        };
        let err = config.validate().unwrap_err();
        assert_eq!(err.setting, "listen");
        assert!(
            err.reason
                .contains("0.0.0.0:7400 is not a loopback address")
        );
        assert!(err.reason.contains("tls.cert_file"), "{err}");
        let with_tls = Config {
            tls: Some(TlsConfig {
                cert_file: "server.crt".into(),
                key_file: "server.key".into(),
                client_ca_file: None,
                client_auth: ClientAuth::Unset,
            }),
            ..config
        };
        with_tls.validate().unwrap();
        let ok = Config {
            listen: vec![
                "[::1]:7400".parse().unwrap(),
                "localhost:7400".parse().unwrap(),
            ],
            ..Config::default()
        };
        ok.validate().unwrap();
    }

    #[test]
    fn the_database_url_never_prints_and_postgres_needs_one() {
        let mut config = Config::default();
        config
            .apply_env(env(&[
                ("KEYWARDEN_STORE_BACKEND", "postgres"),
                (
                    "KEYWARDEN_DATABASE_URL",
                    "postgres://app:Sup3rS3cret@db/keys",
                ),
            ]))
            .unwrap();
        config.validate().unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("Sup3rS3cret"), "{printed}");
        assert!(printed.contains("[REDACTED"), "{printed}");

        let missing = Config {
            store: StoreConfig {
                backend: StoreBackend::Postgres,
                ..StoreConfig::default()
            },
            ..Config::default()
        };
        assert_eq!(missing.validate().unwrap_err().setting, "store.url");
        let err = Config::default()
            .apply_env(env(&[("KEYWARDEN_STORE_MIGRATE", "maybe")]))
            .unwrap_err();
        assert_eq!(err.setting, "KEYWARDEN_STORE_MIGRATE");
    }

    fn toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "k.toml")
    }

    const TLS_FILES: &str = "[tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n";

    #[test]
    fn client_auth_without_a_client_ca_is_a_configuration_error() {
        for value in ["required", "optional"] {
            let config = toml(&format!("{TLS_FILES}client_auth = \"{value}\"\n")).unwrap();
            let err = config.validate().unwrap_err();
            assert_eq!(err.setting, "tls.client_auth");
            assert_eq!(
                err.reason,
                format!(
                    "is \"{value}\" but tls.client_ca_file is not set, so no client certificate \
                     could be checked: set tls.client_ca_file (or KEYWARDEN_TLS_CLIENT_CA_FILE) to \
                     the CA that signs client certificates, or remove tls.client_auth for TLS \
                     without client certificates"
                )
            );
            // The environment can name the CA the file lacks.
            let mut fixed = config.clone();
            fixed
                .apply_env(env(&[("KEYWARDEN_TLS_CLIENT_CA_FILE", "ca.crt")]))
                .unwrap();
            fixed.validate().unwrap();
        }
        // Set through the environment alone, the same.
        let mut config = toml(TLS_FILES).unwrap();
        config
            .apply_env(env(&[("KEYWARDEN_TLS_CLIENT_AUTH", "required")]))
            .unwrap();
        assert_eq!(config.validate().unwrap_err().setting, "tls.client_auth");
        let err = toml(TLS_FILES)
            .unwrap()
            .apply_env(env(&[("KEYWARDEN_TLS_CLIENT_AUTH", "always")]))
            .unwrap_err();
        assert_eq!(err.setting, "KEYWARDEN_TLS_CLIENT_AUTH");
        // "unset" is not a value anyone can write.
        let err = toml(&format!("{TLS_FILES}client_auth = \"unset\"\n")).unwrap_err();
        assert!(err.reason.contains("unknown variant"), "{err}");
    }

    #[test]
    fn client_auth_left_unset_means_required_with_a_ca_and_none_without() {
        let server_only = toml(TLS_FILES).unwrap();
        server_only.validate().unwrap();
        let tls = server_only.tls.unwrap();
        assert_eq!(tls.client_auth, ClientAuth::Unset);
        assert_eq!(tls.client_ca_file, None);

        let mutual = toml(&format!("{TLS_FILES}client_ca_file = \"ca.crt\"\n")).unwrap();
        mutual.validate().unwrap();
        let tls = mutual.tls.unwrap();
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("ca.crt")));
        // The server reads anything but Optional as Required.
        assert_eq!(tls.client_auth, ClientAuth::Unset);
    }

    #[test]
    fn tls_environment_overrides_merge_per_field() {
        let file =
            format!("{TLS_FILES}client_ca_file = \"file-ca.crt\"\nclient_auth = \"required\"\n");
        let mut config = toml(&file).unwrap();
        config
            .apply_env(env(&[("KEYWARDEN_TLS_CERT_FILE", "env.crt")]))
            .unwrap();
        config.validate().unwrap();
        let tls = config.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("env.crt"));
        assert_eq!(tls.key_file, PathBuf::from("server.key"));
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("file-ca.crt")));
        assert_eq!(tls.client_auth, ClientAuth::Required);

        config
            .apply_env(env(&[
                ("KEYWARDEN_TLS_KEY_FILE", "env.key"),
                ("KEYWARDEN_TLS_CLIENT_CA_FILE", "env-ca.crt"),
                ("KEYWARDEN_TLS_CLIENT_AUTH", "optional"),
            ]))
            .unwrap();
        let tls = config.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("env.crt"));
        assert_eq!(tls.key_file, PathBuf::from("env.key"));
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("env-ca.crt")));
        assert_eq!(tls.client_auth, ClientAuth::Optional);

        // Without a [tls] section the environment makes one, with the
        // certificate and key together.
        let mut config = Config::default();
        config
            .apply_env(env(&[
                ("KEYWARDEN_TLS_CERT_FILE", "env.crt"),
                ("KEYWARDEN_TLS_KEY_FILE", "env.key"),
            ]))
            .unwrap();
        let tls = config.tls.as_ref().unwrap();
        assert_eq!(tls.client_ca_file, None);
        assert_eq!(tls.client_auth, ClientAuth::Unset);
        config.validate().unwrap();

        for alone in [
            "KEYWARDEN_TLS_CERT_FILE",
            "KEYWARDEN_TLS_KEY_FILE",
            "KEYWARDEN_TLS_CLIENT_CA_FILE",
            "KEYWARDEN_TLS_CLIENT_AUTH",
        ] {
            let mut config = Config::default();
            let err = config.apply_env(env(&[(alone, "required")])).unwrap_err();
            let expected = match alone {
                "KEYWARDEN_TLS_CERT_FILE" | "KEYWARDEN_TLS_KEY_FILE" => {
                    "KEYWARDEN_TLS_CERT_FILE / KEYWARDEN_TLS_KEY_FILE"
                }
                other => other,
            };
            assert_eq!(err.setting, expected);
            assert!(config.tls.is_none(), "a refused variable changes nothing");
        }
    }

    /// Found in review while writing the configuration's fuzz target: the largest
    /// plaintext plus 64 KiB overflowed (a panic in debug builds, and in
    /// release a sum that wrapped to under 64 KiB and let the check pass).
    #[test]
    fn a_plaintext_limit_near_the_largest_number_is_refused_not_wrapped() {
        for value in [u64::MAX.to_string(), (u64::MAX - 65_535).to_string()] {
            let mut config = Config::default();
            config
                .apply_env(env(&[("KEYWARDEN_MAX_PLAINTEXT_BYTES", &value)]))
                .unwrap();
            let err = config.validate().unwrap_err();
            assert_eq!(err.setting, "limits.max_request_bytes", "{value}");
        }
    }

    /// Found in review while writing the configuration's fuzz target (which
    /// now checks what a valid configuration must let the server build): a
    /// time to live and a grace near u64::MAX seconds validated, and their
    /// sum, which the key cache's sweeper computes, overflowed (a panic in
    /// that task, which then stopped sweeping).
    #[test]
    fn cache_durations_are_bounded_so_the_cache_can_add_them() {
        for name in [
            "KEYWARDEN_CACHE_TTL_SECONDS",
            "KEYWARDEN_CACHE_TTI_SECONDS",
            "KEYWARDEN_CACHE_STALE_IF_ERROR_SECONDS",
        ] {
            let mut config = Config::default();
            config
                .apply_env(env(&[(name, &u64::MAX.to_string())]))
                .unwrap();
            let err = config.validate().unwrap_err();
            let setting = name
                .strip_prefix("KEYWARDEN_CACHE_")
                .unwrap()
                .to_lowercase();
            assert_eq!(err.setting, format!("cache.{setting}"));
            assert_eq!(err.reason, "must be at most 31536000 (a year)");
        }
        let mut config = Config::default();
        config
            .apply_env(env(&[
                ("KEYWARDEN_CACHE_TTL_SECONDS", "31536000"),
                ("KEYWARDEN_CACHE_STALE_IF_ERROR_SECONDS", "31536000"),
            ]))
            .unwrap();
        config.validate().unwrap();
        let limits = config.cache.limits();
        assert!(
            limits
                .time_to_live
                .checked_add(limits.stale_if_error)
                .is_some()
        );
    }
}
