//! The configuration's load order, environment variables and checks.

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
    let file = format!("{TLS_FILES}client_ca_file = \"file-ca.crt\"\nclient_auth = \"required\"\n");
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

/// The refusals of the environment's parsers, word for word: the enums'
/// names come from their serde names, the numbers from their types.
#[test]
fn each_refused_variable_says_what_it_accepts() {
    let refused = [
        (
            "KEYWARDEN_STORE_BACKEND",
            "mysql",
            "must be sqlite or postgres",
        ),
        ("KEYWARDEN_KMS_PROVIDER", "gcp", "must be local or aws"),
        ("KEYWARDEN_AUDIT_SINK", "", "must be file or postgres"),
        (
            "KEYWARDEN_AUDIT_DATA_PLANE",
            "all",
            "must be off, counts or every",
        ),
        ("KEYWARDEN_STORE_MIGRATE", "yes", "must be true or false"),
        ("KEYWARDEN_WORKER_THREADS", "-1", "must be a whole number"),
        ("KEYWARDEN_TENANT_BURST", "4294967296", "is too large"),
        (
            "KEYWARDEN_KMS_REGIONS",
            "eu-west-1",
            "expected region=key_id[,region=key_id...]",
        ),
    ];
    for (name, value, reason) in refused {
        let err = Config::default()
            .apply_env(env(&[(name, value)]))
            .unwrap_err();
        assert_eq!((err.setting.as_str(), err.reason.as_str()), (name, reason));
    }
    let err = toml(TLS_FILES)
        .unwrap()
        .apply_env(env(&[("KEYWARDEN_TLS_CLIENT_AUTH", "unset")]))
        .unwrap_err();
    assert_eq!(err.reason, "must be required or optional");

    let mut config = Config::default();
    config
        .apply_env(env(&[
            ("KEYWARDEN_STORE_BACKEND", " postgres "),
            ("KEYWARDEN_DATABASE_URL", " postgres://db/keys "),
            ("KEYWARDEN_AUDIT_DATA_PLANE", "every"),
            ("KEYWARDEN_KMS_REGIONS", "eu-west-1=a, us-east-1 = b"),
        ]))
        .unwrap();
    assert_eq!(config.store.backend, StoreBackend::Postgres);
    assert_eq!(config.audit.data_plane, DataPlaneAudit::Every);
    assert_eq!(config.kms.regions["us-east-1"].key_id, "b");
}

/// Each setting is checked once the sources are merged: a value in the
/// file that the environment replaces is not checked.
#[test]
fn only_the_merged_value_is_checked() {
    let mut config = toml("[server]\nidle_timeout_seconds = 0\n").unwrap();
    assert_eq!(
        config.validate().unwrap_err().setting,
        "server.idle_timeout_seconds"
    );
    config
        .apply_env(env(&[("KEYWARDEN_SERVER_IDLE_TIMEOUT_SECONDS", "5")]))
        .unwrap();
    config.validate().unwrap();
}

#[test]
fn the_log_format_is_text_unless_the_file_or_the_environment_says_json() {
    use crate::observe::log::LogFormat;
    assert_eq!(Config::default().log.format, LogFormat::Text);
    let mut config = toml("[log]\nformat = \"json\"\n").unwrap();
    assert_eq!(config.log.format, LogFormat::Json);
    config
        .apply_env(env(&[("KEYWARDEN_LOG_FORMAT", " text ")]))
        .unwrap();
    assert_eq!(config.log.format, LogFormat::Text);
    let err = Config::default()
        .apply_env(env(&[("KEYWARDEN_LOG_FORMAT", "logfmt")]))
        .unwrap_err();
    assert_eq!(
        (err.setting.as_str(), err.reason.as_str()),
        ("KEYWARDEN_LOG_FORMAT", "must be text or json")
    );
    assert!(toml("[log]\nformat = \"logfmt\"\n").is_err());
    assert!(toml("[log]\nlevel = \"debug\"\n").is_err());
}
