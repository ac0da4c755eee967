//! The smaller sections: `[cache]`, `[store]`, `[auth]`, `[tls]`, `[audit]`
//! and `[crypto]`.

use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;
use serde::Deserialize;

use super::{
    ConfigError,
    types::{AT_LEAST_ONE, AT_LEAST_ONE_SECOND, CACHE_SECONDS},
};
use crate::{auth::jwt::JwtConfig, envelope::Provider, keys::cache::CacheLimits};

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
    /// The key cache's own settings type, from this section.
    pub fn limits(&self) -> CacheLimits {
        CacheLimits {
            max_entries: self.max_keys,
            time_to_live: Duration::from_secs(self.ttl_seconds),
            time_to_idle: Duration::from_secs(self.tti_seconds),
            stale_if_error: Duration::from_secs(self.stale_if_error_seconds),
        }
    }

    /// Each setting by itself.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        AT_LEAST_ONE_SECOND.check_all([
            ("cache.ttl_seconds / cache.tti_seconds", self.ttl_seconds),
            ("cache.ttl_seconds / cache.tti_seconds", self.tti_seconds),
        ])?;
        CACHE_SECONDS.check_all([
            ("cache.ttl_seconds", self.ttl_seconds),
            ("cache.tti_seconds", self.tti_seconds),
            ("cache.stale_if_error_seconds", self.stale_if_error_seconds),
        ])?;
        AT_LEAST_ONE.check("cache.max_keys", self.max_keys)
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

impl AuthConfig {
    /// Each setting by itself; the files it names are read by
    /// `server::guard`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        match &self.jwt {
            Some(jwt)
                if jwt.issuer.is_empty() || jwt.audience.is_empty() || jwt.reload_seconds == 0 =>
            {
                Err(ConfigError::new(
                    "auth.jwt",
                    "issuer and audience must not be empty, and reload_seconds must be at least 1",
                ))
            }
            _ => Ok(()),
        }
    }
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

/// `[log]`: how log lines are written (on standard error).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// "text" (the default) or "json" (`observe::log` lists the fields).
    pub format: crate::observe::log::LogFormat,
}

/// How envelopes are sealed.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CryptoConfig {
    /// The AES-256-GCM implementation (envelope::provider).
    pub provider: Provider,
}
