//! The `KEYWARDEN_*` environment variables: their names, the one helper
//! that reads a variable through a parser and names the variable in an
//! error, and the parsers (as linkerd2-proxy's `app/src/env.rs` does).
//!
//! A variable set to a value its parser refuses stops the start; the
//! variables before it are applied, the rest are not.

use std::{fmt, path::PathBuf};

use secrecy::SecretString;
use serde::de::{DeserializeOwned, IntoDeserializer, value::StrDeserializer};

use super::{ClientAuth, Config, ConfigError, ListenAddr, RegionKey, TlsConfig};

pub const ENV_DATA_DIR: &str = "KEYWARDEN_DATA_DIR";
pub const ENV_LISTEN: &str = "KEYWARDEN_LISTEN";
pub const ENV_WORKER_THREADS: &str = "KEYWARDEN_WORKER_THREADS";

pub const ENV_MAX_PLAINTEXT_BYTES: &str = "KEYWARDEN_MAX_PLAINTEXT_BYTES";
pub const ENV_MAX_BATCH_ITEMS: &str = "KEYWARDEN_MAX_BATCH_ITEMS";
pub const ENV_MAX_REQUEST_BYTES: &str = "KEYWARDEN_MAX_REQUEST_BYTES";
pub const ENV_TENANT_ITEMS_PER_SECOND: &str = "KEYWARDEN_TENANT_ITEMS_PER_SECOND";
pub const ENV_TENANT_BURST: &str = "KEYWARDEN_TENANT_BURST";

pub const ENV_SERVER_MAX_CONNECTIONS: &str = "KEYWARDEN_SERVER_MAX_CONNECTIONS";
pub const ENV_SERVER_MAX_CONCURRENT_STREAMS: &str = "KEYWARDEN_SERVER_MAX_CONCURRENT_STREAMS";
pub const ENV_SERVER_STREAM_WINDOW_BYTES: &str = "KEYWARDEN_SERVER_STREAM_WINDOW_BYTES";
pub const ENV_SERVER_HANDSHAKE_TIMEOUT_SECONDS: &str = "KEYWARDEN_SERVER_HANDSHAKE_TIMEOUT_SECONDS";
pub const ENV_SERVER_IDLE_TIMEOUT_SECONDS: &str = "KEYWARDEN_SERVER_IDLE_TIMEOUT_SECONDS";
pub const ENV_SERVER_KEEPALIVE_INTERVAL_SECONDS: &str =
    "KEYWARDEN_SERVER_KEEPALIVE_INTERVAL_SECONDS";
pub const ENV_SERVER_KEEPALIVE_TIMEOUT_SECONDS: &str = "KEYWARDEN_SERVER_KEEPALIVE_TIMEOUT_SECONDS";
pub const ENV_SERVER_CALL_TIMEOUT_SECONDS: &str = "KEYWARDEN_SERVER_CALL_TIMEOUT_SECONDS";
pub const ENV_SERVER_STREAM_TIMEOUT_SECONDS: &str = "KEYWARDEN_SERVER_STREAM_TIMEOUT_SECONDS";
pub const ENV_SERVER_STREAM_MESSAGE_TIMEOUT_SECONDS: &str =
    "KEYWARDEN_SERVER_STREAM_MESSAGE_TIMEOUT_SECONDS";
pub const ENV_SERVER_DECODE_BUDGET_BYTES: &str = "KEYWARDEN_SERVER_DECODE_BUDGET_BYTES";
pub const ENV_SERVER_DECODE_BUDGET_PER_CALLER_BYTES: &str =
    "KEYWARDEN_SERVER_DECODE_BUDGET_PER_CALLER_BYTES";
pub const ENV_SERVER_REQUEST_MIN_BYTES_PER_SECOND: &str =
    "KEYWARDEN_SERVER_REQUEST_MIN_BYTES_PER_SECOND";
pub const ENV_SERVER_ADMIN_MAX_REQUEST_BYTES: &str = "KEYWARDEN_SERVER_ADMIN_MAX_REQUEST_BYTES";

pub const ENV_CACHE_TTL_SECONDS: &str = "KEYWARDEN_CACHE_TTL_SECONDS";
pub const ENV_CACHE_TTI_SECONDS: &str = "KEYWARDEN_CACHE_TTI_SECONDS";
pub const ENV_CACHE_MAX_KEYS: &str = "KEYWARDEN_CACHE_MAX_KEYS";
pub const ENV_CACHE_STALE_IF_ERROR_SECONDS: &str = "KEYWARDEN_CACHE_STALE_IF_ERROR_SECONDS";

pub const ENV_STORE_BACKEND: &str = "KEYWARDEN_STORE_BACKEND";
/// `store.url`: a secret, never printed.
pub const ENV_DATABASE_URL: &str = "KEYWARDEN_DATABASE_URL";
pub const ENV_STORE_MAX_CONNECTIONS: &str = "KEYWARDEN_STORE_MAX_CONNECTIONS";
pub const ENV_STORE_MIGRATE: &str = "KEYWARDEN_STORE_MIGRATE";

pub const ENV_KMS_PROVIDER: &str = "KEYWARDEN_KMS_PROVIDER";
pub const ENV_KMS_REGION: &str = "KEYWARDEN_KMS_REGION";
pub const ENV_KMS_KEY_ID: &str = "KEYWARDEN_KMS_KEY_ID";
pub const ENV_KMS_ENDPOINT_URL: &str = "KEYWARDEN_KMS_ENDPOINT_URL";
/// `region=key_id[,region=key_id...]`, added to `kms.regions`.
pub const ENV_KMS_REGIONS: &str = "KEYWARDEN_KMS_REGIONS";
pub const ENV_KMS_DELETION_WAITING_DAYS: &str = "KEYWARDEN_KMS_DELETION_WAITING_DAYS";
pub const ENV_KMS_ATTEMPT_TIMEOUT_MS: &str = "KEYWARDEN_KMS_ATTEMPT_TIMEOUT_MS";
pub const ENV_KMS_MAX_ATTEMPTS: &str = "KEYWARDEN_KMS_MAX_ATTEMPTS";

pub const ENV_AUTH_POLICY_FILE: &str = "KEYWARDEN_AUTH_POLICY_FILE";
pub const ENV_AUTH_TOKENS_FILE: &str = "KEYWARDEN_AUTH_TOKENS_FILE";

pub const ENV_TLS_CERT_FILE: &str = "KEYWARDEN_TLS_CERT_FILE";
pub const ENV_TLS_KEY_FILE: &str = "KEYWARDEN_TLS_KEY_FILE";
pub const ENV_TLS_CLIENT_CA_FILE: &str = "KEYWARDEN_TLS_CLIENT_CA_FILE";
pub const ENV_TLS_CLIENT_AUTH: &str = "KEYWARDEN_TLS_CLIENT_AUTH";

pub const ENV_AUDIT_SINK: &str = "KEYWARDEN_AUDIT_SINK";
pub const ENV_AUDIT_DATA_PLANE: &str = "KEYWARDEN_AUDIT_DATA_PLANE";
pub const ENV_AUDIT_COUNT_INTERVAL_SECONDS: &str = "KEYWARDEN_AUDIT_COUNT_INTERVAL_SECONDS";

pub const ENV_CRYPTO_PROVIDER: &str = "KEYWARDEN_CRYPTO_PROVIDER";

pub const ENV_LOG_FORMAT: &str = "KEYWARDEN_LOG_FORMAT";

/// The environment, read through a function (the process environment in
/// production, a map in tests).
struct Env<F>(F);

impl<F: Fn(&str) -> Option<String>> Env<F> {
    /// The one parse helper: variable `name` through `parse`, `None` if
    /// unset; an error names the variable.
    fn parse<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        (self.0)(name)
            .map(|value| parse(&value).map_err(|reason| ConfigError::new(name, reason)))
            .transpose()
    }

    /// Replaces `field` with variable `name` through `parse`, if set.
    fn set<T>(
        &self,
        field: &mut T,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<(), ConfigError> {
        set(field, self.parse(name, parse)?);
        Ok(())
    }

    /// A path, name or URL: trimmed, and unset when empty.
    fn text(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }
}

/// A whole number that fits `T`.
fn number<T: TryFrom<u64>>(value: &str) -> Result<T, String> {
    let n: u64 = value.trim().parse().map_err(|_| "must be a whole number")?;
    T::try_from(n).map_err(|_| "is too large".into())
}

/// `true` or `1`, `false` or `0`.
fn boolean(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("must be true or false".into()),
    }
}

/// One of an enum's names as the configuration file writes them: serde's
/// names are the only list, and an error lists them.
fn choice<T: DeserializeOwned>(value: &str) -> Result<T, String> {
    let names: StrDeserializer<'_, Choice> = value.trim().into_deserializer();
    T::deserialize(names).map_err(|Choice(reason)| reason)
}

/// [`choice`]'s error: serde's list of names, as "must be a, b or c".
#[derive(Debug)]
struct Choice(String);

impl serde::de::Error for Choice {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Choice(message.to_string())
    }

    fn unknown_variant(_: &str, expected: &'static [&'static str]) -> Self {
        let reason = match expected.split_last() {
            Some((last, [])) => format!("must be {last}"),
            Some((last, rest)) => format!("must be {} or {last}", rest.join(", ")),
            None => "must not be set".to_owned(),
        };
        Choice(reason)
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Choice {}

/// Comma-separated listen addresses.
fn listen(value: &str) -> Result<Vec<ListenAddr>, String> {
    value.split(',').map(|part| part.trim().parse()).collect()
}

/// `region=key_id[,region=key_id...]`.
fn regions(value: &str) -> Result<Vec<(String, RegionKey)>, String> {
    value
        .split(',')
        .map(|pair| {
            let (region, key) = pair
                .split_once('=')
                .ok_or("expected region=key_id[,region=key_id...]")?;
            let key_id = key.trim().to_owned();
            Ok((region.trim().to_owned(), RegionKey { key_id }))
        })
        .collect()
}

/// Replaces `field` with `value` if there is one.
fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

impl Config {
    /// Applies `KEYWARDEN_*` variables, read through `var` (the process
    /// environment in production, a map in tests).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let env = Env(var);
        set(&mut self.data_dir, (env.0)(ENV_DATA_DIR).map(PathBuf::from));
        env.set(&mut self.listen, ENV_LISTEN, listen)?;
        env.set(&mut self.worker_threads, ENV_WORKER_THREADS, number)?;

        let limits = &mut self.limits;
        env.set(
            &mut limits.max_plaintext_bytes,
            ENV_MAX_PLAINTEXT_BYTES,
            number,
        )?;
        env.set(&mut limits.max_batch_items, ENV_MAX_BATCH_ITEMS, number)?;
        env.set(&mut limits.max_request_bytes, ENV_MAX_REQUEST_BYTES, number)?;

        let server = &mut self.server;
        env.set(
            &mut server.max_connections,
            ENV_SERVER_MAX_CONNECTIONS,
            number,
        )?;
        env.set(
            &mut server.max_concurrent_streams,
            ENV_SERVER_MAX_CONCURRENT_STREAMS,
            number,
        )?;
        env.set(
            &mut server.stream_window_bytes,
            ENV_SERVER_STREAM_WINDOW_BYTES,
            number,
        )?;
        env.set(
            &mut server.handshake_timeout_seconds,
            ENV_SERVER_HANDSHAKE_TIMEOUT_SECONDS,
            number,
        )?;
        env.set(
            &mut server.idle_timeout_seconds,
            ENV_SERVER_IDLE_TIMEOUT_SECONDS,
            number,
        )?;
        env.set(
            &mut server.keepalive_interval_seconds,
            ENV_SERVER_KEEPALIVE_INTERVAL_SECONDS,
            number,
        )?;
        env.set(
            &mut server.keepalive_timeout_seconds,
            ENV_SERVER_KEEPALIVE_TIMEOUT_SECONDS,
            number,
        )?;
        env.set(
            &mut server.call_timeout_seconds,
            ENV_SERVER_CALL_TIMEOUT_SECONDS,
            number,
        )?;
        env.set(
            &mut server.stream_timeout_seconds,
            ENV_SERVER_STREAM_TIMEOUT_SECONDS,
            number,
        )?;
        env.set(
            &mut server.stream_message_timeout_seconds,
            ENV_SERVER_STREAM_MESSAGE_TIMEOUT_SECONDS,
            number,
        )?;
        env.set(
            &mut server.decode_budget_bytes,
            ENV_SERVER_DECODE_BUDGET_BYTES,
            number,
        )?;
        env.set(
            &mut server.decode_budget_per_caller_bytes,
            ENV_SERVER_DECODE_BUDGET_PER_CALLER_BYTES,
            number,
        )?;
        env.set(
            &mut server.request_min_bytes_per_second,
            ENV_SERVER_REQUEST_MIN_BYTES_PER_SECOND,
            number,
        )?;
        env.set(
            &mut server.admin_max_request_bytes,
            ENV_SERVER_ADMIN_MAX_REQUEST_BYTES,
            number,
        )?;

        let limits = &mut self.limits;
        env.set(
            &mut limits.tenant_items_per_second,
            ENV_TENANT_ITEMS_PER_SECOND,
            number,
        )?;
        env.set(&mut limits.tenant_burst, ENV_TENANT_BURST, number)?;

        let cache = &mut self.cache;
        env.set(&mut cache.ttl_seconds, ENV_CACHE_TTL_SECONDS, number)?;
        env.set(&mut cache.tti_seconds, ENV_CACHE_TTI_SECONDS, number)?;
        env.set(&mut cache.max_keys, ENV_CACHE_MAX_KEYS, number)?;
        env.set(
            &mut cache.stale_if_error_seconds,
            ENV_CACHE_STALE_IF_ERROR_SECONDS,
            number,
        )?;

        let store = &mut self.store;
        env.set(&mut store.backend, ENV_STORE_BACKEND, choice)?;
        set(
            &mut store.url,
            env.text(ENV_DATABASE_URL)
                .map(|url| Some(SecretString::from(url))),
        );
        env.set(
            &mut store.max_connections,
            ENV_STORE_MAX_CONNECTIONS,
            number,
        )?;
        env.set(&mut store.migrate, ENV_STORE_MIGRATE, boolean)?;

        env.set(&mut self.kms.provider, ENV_KMS_PROVIDER, choice)?;
        set(
            &mut self.auth.policy_file,
            env.text(ENV_AUTH_POLICY_FILE).map(|p| Some(p.into())),
        );
        set(
            &mut self.auth.tokens_file,
            env.text(ENV_AUTH_TOKENS_FILE).map(|p| Some(p.into())),
        );

        let audit = &mut self.audit;
        env.set(
            &mut audit.count_interval_seconds,
            ENV_AUDIT_COUNT_INTERVAL_SECONDS,
            number,
        )?;
        env.set(&mut audit.sink, ENV_AUDIT_SINK, choice)?;
        env.set(&mut self.crypto.provider, ENV_CRYPTO_PROVIDER, |v| {
            v.trim().parse()
        })?;
        env.set(&mut self.audit.data_plane, ENV_AUDIT_DATA_PLANE, choice)?;
        env.set(&mut self.log.format, ENV_LOG_FORMAT, choice)?;

        self.apply_tls_env(&env)?;

        let kms = &mut self.kms;
        set(&mut kms.region, env.text(ENV_KMS_REGION).map(Some));
        set(&mut kms.key_id, env.text(ENV_KMS_KEY_ID).map(Some));
        set(
            &mut kms.endpoint_url,
            env.text(ENV_KMS_ENDPOINT_URL).map(Some),
        );
        if let Some(value) = env.text(ENV_KMS_REGIONS) {
            let pairs =
                regions(&value).map_err(|reason| ConfigError::new(ENV_KMS_REGIONS, reason))?;
            kms.regions.extend(pairs);
        }
        env.set(
            &mut kms.deletion_waiting_days,
            ENV_KMS_DELETION_WAITING_DAYS,
            number,
        )?;
        env.set(
            &mut kms.attempt_timeout_ms,
            ENV_KMS_ATTEMPT_TIMEOUT_MS,
            number,
        )?;
        env.set(&mut kms.max_attempts, ENV_KMS_MAX_ATTEMPTS, number)?;
        Ok(())
    }

    /// The `KEYWARDEN_TLS_*` variables, each over its own field of `[tls]`:
    /// a variable replaces that field and keeps the file's others (a new
    /// certificate from the environment keeps the file's client CA). Without
    /// a `[tls]` section, the certificate and key variables make one and
    /// must come together. Checks nothing else: [`Config::validate`] does.
    fn apply_tls_env(
        &mut self,
        env: &Env<impl Fn(&str) -> Option<String>>,
    ) -> Result<(), ConfigError> {
        let cert_file = env.text(ENV_TLS_CERT_FILE).map(PathBuf::from);
        let key_file = env.text(ENV_TLS_KEY_FILE).map(PathBuf::from);
        let client_ca_file = env.text(ENV_TLS_CLIENT_CA_FILE).map(PathBuf::from);
        let client_auth = env
            .text(ENV_TLS_CLIENT_AUTH)
            .map(|v| choice::<ClientAuth>(&v))
            .transpose()
            .map_err(|reason| ConfigError::new(ENV_TLS_CLIENT_AUTH, reason))?;
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
                            ENV_TLS_CLIENT_CA_FILE
                        } else {
                            ENV_TLS_CLIENT_AUTH
                        },
                        format!(
                            "needs a TLS certificate and key: set {ENV_TLS_CERT_FILE} and \
                             {ENV_TLS_KEY_FILE}, or tls.cert_file and tls.key_file"
                        ),
                    ));
                }
                _ => {
                    return Err(ConfigError::new(
                        format!("{ENV_TLS_CERT_FILE} / {ENV_TLS_KEY_FILE}"),
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
}
