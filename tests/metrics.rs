//! The admin listener and the metrics, against the real binary and a real
//! Prometheus server (Debian's `prometheus`; scripts/test installs it).
//!
//! One `keywarden serve` process with AWS KMS (moto behind the fault proxy),
//! a Prometheus scraping its admin listener every second, a known workload,
//! then every figure checked through Prometheus' query API.

mod common;

use std::{
    collections::BTreeMap,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use keywarden::{
    api::pb,
    client::{self, Bearer},
};
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;

use common::{
    moto,
    process::{Sidecar, http},
    proxy::Proxy,
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: keywarden\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run prometheus (Debian's `prometheus` package; scripts/test installs it)");
        let prometheus = Prometheus { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(&prometheus.addr).is_ok()
                && http(&prometheus.addr, "GET", "/-/ready").0 == 200
            {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not start in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An instant query's samples: labels (as `k=v,...`) to value.
    fn query(&self, query: &str) -> BTreeMap<String, f64> {
        let (status, body) = http(
            &self.addr,
            "GET",
            &format!("/api/v1/query?query={}", percent_encode(query)),
        );
        assert_eq!(status, 200, "{query}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["status"], "success", "{query}: {body}");
        json["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|sample| {
                let labels = sample["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "instance" | "job"))
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                    .collect::<Vec<_>>()
                    .join(",");
                let value = sample["value"][1].as_str().unwrap().parse().unwrap();
                (labels, value)
            })
            .collect()
    }

    /// The value of a query that answers one sample (0 when it answers none).
    fn value(&self, query: &str) -> f64 {
        let samples = self.query(query);
        assert!(samples.len() <= 1, "{query}: {samples:?}");
        samples.values().next().copied().unwrap_or(0.0)
    }

    /// Waits until a scrape that started after `after` (Unix seconds) is in.
    fn wait_for_scrape_after(&self, after: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let at = self.value("timestamp(up{job=\"keywarden\"} == 1)");
            if at > after {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no scrape after the workload in 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn encrypt(tenant: &str, subject: &str, plaintext: &[u8]) -> pb::EncryptRequest {
    pb::EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        plaintext: plaintext.to_vec(),
        ..Default::default()
    }
}

const PLAINTEXT: &[u8] = b"plaintext-sentinel-7c1d9a";
const SUBJECT: &str = "subject-sentinel-4b2e11";
const ENCRYPTS: usize = 20;
const DECRYPTS: usize = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_exactly_what_happened() {
    let tmp = tempfile::tempdir().unwrap();
    let root_key = moto::create_key("keywarden metrics test").await;
    let upstream = moto::moto()
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = Proxy::start(upstream).await;

    let billing = keywarden::auth::tokens::generate();
    let tokens = tmp.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"billing\"\nsha256 = \"{}\"\n",
            hex::encode(keywarden::auth::tokens::hash(billing.expose_secret()))
        ),
    )
    .unwrap();
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[grant]]\nidentity = \"unix\"\nallow = [\"data\"]\ntenants = [\"*\"]\n\
         [[grant]]\nidentity = \"token:admin\"\nallow = [\"admin\"]\ntenants = [\"*\"]\n\
         [[grant]]\nidentity = \"token:billing\"\nallow = [\"data\"]\ntenants = [\"acme\"]\n",
    )
    .unwrap();
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let endpoint = proxy.endpoint();
    let sidecar = Sidecar::start_with_env(
        &tmp.path().join("data"),
        &tmp.path().join("kw.sock"),
        &[
            ("KEYWARDEN_ADMIN_LISTEN", &admin_addr),
            ("KEYWARDEN_ADMIN_TENANT_METRICS", "top"),
            ("KEYWARDEN_ADMIN_TENANT_METRICS_MAX", "1"),
            ("KEYWARDEN_KMS_PROVIDER", "aws"),
            ("KEYWARDEN_KMS_REGION", moto::REGION),
            ("KEYWARDEN_KMS_KEY_ID", &root_key),
            ("KEYWARDEN_KMS_ENDPOINT_URL", &endpoint),
            ("KEYWARDEN_KMS_MAX_ATTEMPTS", "1"),
            ("AWS_ACCESS_KEY_ID", "keywarden-test"),
            ("AWS_SECRET_ACCESS_KEY", "keywarden-test"),
            ("KEYWARDEN_AUTH_TOKENS_FILE", tokens.to_str().unwrap()),
            ("KEYWARDEN_AUTH_POLICY_FILE", policy.to_str().unwrap()),
            ("KEYWARDEN_MAX_PLAINTEXT_BYTES", "1024"),
            ("KEYWARDEN_MAX_REQUEST_BYTES", "70000"),
            ("KEYWARDEN_TENANT_ITEMS_PER_SECOND", "1000"),
            ("KEYWARDEN_TENANT_BURST", "50"),
        ],
    );
    let prometheus = Prometheus::start(tmp.path(), &admin_addr);

    // The workload.
    let operator = sidecar.client().await;
    let mut admin = operator.admin();
    let channel = operator.channel.clone();
    let mut app = client::crypto(channel.clone(), Bearer::default());
    for tenant in ["acme", "initech"] {
        admin
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: tenant.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut ciphertexts = Vec::new();
    for i in 0..ENCRYPTS {
        let subject = if i == 0 { SUBJECT } else { "" };
        let response = app
            .encrypt(encrypt("acme", subject, PLAINTEXT))
            .await
            .unwrap();
        ciphertexts.push(response.into_inner().ciphertext);
    }
    for ciphertext in ciphertexts.iter().skip(1).take(DECRYPTS) {
        app.decrypt(pb::DecryptRequest {
            tenant_id: "acme".into(),
            ciphertext: ciphertext.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for _ in 0..2 {
        app.encrypt(encrypt("initech", "", PLAINTEXT))
            .await
            .unwrap();
    }
    // One stream: its status is known only from its trailers.
    let requests = vec![
        pb::EncryptStreamRequest {
            part: Some(pb::encrypt_stream_request::Part::Start(
                pb::EncryptStreamStart {
                    tenant_id: "acme".into(),
                    ..Default::default()
                },
            )),
        },
        pb::EncryptStreamRequest {
            part: Some(pb::encrypt_stream_request::Part::Chunk(PLAINTEXT.to_vec())),
        },
    ];
    let mut responses = app
        .encrypt_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut envelope = 0;
    while let Some(response) = responses.message().await.unwrap() {
        envelope += response.chunk.len();
    }
    assert!(envelope > PLAINTEXT.len());
    // Refusals: a token nobody issued, a token for another tenant, a
    // message over the size limit, a plaintext over its limit, a batch over
    // the tenant's burst.
    let bogus = SecretString::from("kwt_not-a-token-sentinel-9f3e".to_owned());
    let mut stranger = client::crypto(channel.clone(), Bearer::new(Some(&bogus)).unwrap());
    let status = stranger
        .encrypt(encrypt("acme", "", PLAINTEXT))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut billing_app = client::crypto(channel.clone(), Bearer::new(Some(&billing)).unwrap());
    let status = billing_app
        .encrypt(encrypt("initech", "", PLAINTEXT))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = app
        .encrypt(encrypt("acme", "", &vec![b'x'; 100_000]))
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok, "{status:?}");
    // A plaintext over limits.max_plaintext_bytes (1024) in a message
    // under the size limit: INVALID_ARGUMENT, and a size refusal too.
    let status = app
        .encrypt(encrypt("acme", "", &vec![b'x'; 2000]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = app
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: (0..60)
                .map(|_| pb::EncryptItem {
                    plaintext: PLAINTEXT.to_vec(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // A rotation, a shred.
    admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap();
    admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: "acme".into(),
            subject_id: SUBJECT.into(),
        })
        .await
        .unwrap();
    // A KMS outage: a new tenant needs a key the KMS cannot make.
    proxy.set_down(true);
    let status = admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "globex".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    proxy.set_down(false);
    drop((app, stranger, billing_app, admin, operator, channel));
    let done = now_seconds();

    prometheus.wait_for_scrape_after(done);
    let handled = |method: &str, code: &str| {
        prometheus.value(&format!(
            "grpc_server_handled_total{{grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
        ))
    };
    let started = |method: &str| {
        prometheus.value(&format!(
            "sum(grpc_server_started_total{{grpc_method=\"{method}\"}})"
        ))
    };
    let timed = |method: &str| {
        prometheus.value(&format!(
            "sum(grpc_server_handling_seconds_count{{grpc_method=\"{method}\"}})"
        ))
    };
    let encrypts = (ENCRYPTS + 2) as f64;
    assert_eq!(handled("Encrypt", "OK"), encrypts);
    assert_eq!(handled("Encrypt", "UNAUTHENTICATED"), 1.0);
    assert_eq!(handled("Encrypt", "PERMISSION_DENIED"), 1.0);
    assert_eq!(handled("Encrypt", "OUT_OF_RANGE"), 1.0);
    assert_eq!(handled("Encrypt", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(started("Encrypt"), encrypts + 4.0);
    assert_eq!(timed("Encrypt"), encrypts + 4.0);
    assert_eq!(handled("Decrypt", "OK"), DECRYPTS as f64);
    assert_eq!(started("Decrypt"), DECRYPTS as f64);
    assert_eq!(handled("EncryptBatch", "RESOURCE_EXHAUSTED"), 1.0);
    assert_eq!(
        prometheus.query("grpc_server_handled_total{grpc_method=\"EncryptStream\"}"),
        BTreeMap::from([(
            "__name__=grpc_server_handled_total,grpc_code=OK,grpc_method=EncryptStream,\
             grpc_service=keywarden.v1.Crypto,grpc_type=bidi_stream"
                .to_owned(),
            1.0
        )])
    );
    assert_eq!(handled("CreateTenant", "OK"), 2.0);
    assert_eq!(handled("CreateTenant", "UNAVAILABLE"), 1.0);
    assert_eq!(handled("RotateTenantKey", "OK"), 1.0);
    assert_eq!(handled("ShredSubject", "OK"), 1.0);
    assert_eq!(
        prometheus.query("grpc_server_started_total{grpc_method=\"Decrypt\"}"),
        BTreeMap::from([(
            "__name__=grpc_server_started_total,grpc_method=Decrypt,grpc_service=keywarden.v1.Crypto,grpc_type=unary"
                .to_owned(),
            DECRYPTS as f64
        )])
    );
    // Every call: started = handled = timed.
    assert_eq!(
        prometheus.value("sum(grpc_server_started_total)"),
        prometheus.value("sum(grpc_server_handled_total)")
    );
    assert_eq!(
        prometheus.value("sum(grpc_server_started_total)"),
        prometheus.value("sum(grpc_server_handling_seconds_count)")
    );

    assert_eq!(
        prometheus.query("keywarden_refusals_total"),
        BTreeMap::from(
            [
                ("authentication", 1.0),
                ("authorization", 1.0),
                ("rate_limit", 1.0),
                ("size", 2.0)
            ]
            .map(|(r, n)| (format!("__name__=keywarden_refusals_total,reason={r}"), n))
        )
    );
    assert_eq!(
        prometheus.value("keywarden_shreds_total{kind=\"subject\"}"),
        1.0
    );
    assert_eq!(prometheus.value("keywarden_streams_open"), 0.0);

    // KMS: the calls per operation and outcome, each timed once.
    let kms = prometheus.query("keywarden_kms_calls_total");
    // `describe`: the shared root key resolved at start, then readiness's
    // health checks of the root key, on their own clock (README,
    // "Readiness and gRPC health"): at least the first.
    assert!(
        prometheus.value("keywarden_kms_calls_total{operation=\"describe\",outcome=\"ok\"}") >= 1.0
    );
    for (operation, ok, errors) in [
        // Two tenants (a tenant key and a subject index key each), one
        // rotation; the first key of the tenant made during the outage.
        ("generate_data_key", 5.0, 1.0),
        // Every tenant key stays cached from its creation.
        ("decrypt", 0.0, 0.0),
    ] {
        assert_eq!(
            prometheus.value(&format!(
                "keywarden_kms_calls_total{{operation=\"{operation}\",outcome=\"ok\"}}"
            )),
            ok,
            "{operation}"
        );
        assert_eq!(
            prometheus.value(&format!(
                "keywarden_kms_calls_total{{operation=\"{operation}\",outcome=\"error\"}}"
            )),
            errors,
            "{operation}"
        );
    }
    for (operation, calls) in &kms {
        let op = operation
            .split(',')
            .find_map(|l| l.strip_prefix("operation="))
            .unwrap();
        let total = prometheus.value(&format!(
            "sum(keywarden_kms_calls_total{{operation=\"{op}\"}})"
        ));
        assert!(*calls <= total);
        assert_eq!(
            prometheus.value(&format!(
                "keywarden_kms_call_duration_seconds_count{{operation=\"{op}\"}}"
            )),
            total,
            "{op}"
        );
    }

    // The keystore: the writes of the workload, no error, each timed once
    // (reads also come from the policy pass, which runs on its own clock).
    for (operation, n) in [
        ("create_tenant", 2.0),
        ("add_tenant_key", 1.0),
        ("insert_subject_key", 1.0),
        ("shred_subject", 1.0),
    ] {
        assert_eq!(
            prometheus.value(&format!(
                "keywarden_keystore_queries_total{{operation=\"{operation}\",outcome=\"ok\"}}"
            )),
            n,
            "{operation}"
        );
    }
    assert_eq!(
        prometheus.value("count(keywarden_keystore_queries_total{outcome=\"error\"})"),
        0.0
    );
    assert_eq!(
        prometheus.value("sum(keywarden_keystore_queries_total)"),
        prometheus.value("sum(keywarden_keystore_query_duration_seconds_count)")
    );

    // The caches. Tenant state is cached from its creation: every call
    // that named a tenant after it is a hit (the encrypts, the stream, the decrypts,
    // the plaintext over its limit, the batch refused for its rate, and
    // ShredSubject's look at the
    // tenant's subject id rule, the stream). The one subject key is a miss and a load,
    // then shredded (an eviction); the rotation evicts acme's state.
    let cache = |family: &str, cache: &str| {
        prometheus.value(&format!("keywarden_cache_{family}{{cache=\"{cache}\"}}"))
    };
    assert_eq!(
        cache("hits_total", "tenant"),
        (ENCRYPTS + 2 + 1 + DECRYPTS + 1 + 1 + 1) as f64
    );
    assert_eq!(cache("misses_total", "tenant"), 0.0);
    assert_eq!(cache("misses_total", "sealing"), 1.0);
    assert_eq!(cache("loads_total", "sealing"), 1.0);
    assert_eq!(cache("evictions_total", "sealing"), 1.0);
    assert_eq!(cache("evictions_total", "tenant"), 1.0);
    assert_eq!(cache("entries", "tenant"), 2.0);
    assert_eq!(cache("entries", "sealing"), 0.0);

    // The audit log: five Admin calls, each recorded when asked and when
    // answered; the data-plane counts are flushed later (every minute).
    assert_eq!(
        prometheus.value("keywarden_audit_writes_total{outcome=\"ok\"}"),
        10.0
    );
    assert_eq!(
        prometheus.value("keywarden_audit_writes_total{outcome=\"error\"}"),
        0.0
    );
    assert_eq!(
        prometheus.value("keywarden_audit_write_duration_seconds_count"),
        10.0
    );

    // Per tenant, bounded to one: acme has its series, initech is "other".
    assert_eq!(
        prometheus.value(
            "keywarden_tenant_calls_total{tenant=\"acme\",grpc_method=\"Encrypt\",grpc_code=\"OK\"}"
        ),
        ENCRYPTS as f64
    );
    assert_eq!(
        prometheus.value(
            "keywarden_tenant_calls_total{tenant=\"other\",grpc_method=\"Encrypt\",grpc_code=\"OK\"}"
        ),
        2.0
    );
    assert_eq!(
        prometheus.value("count(keywarden_tenant_calls_total{tenant=\"initech\"})"),
        0.0
    );

    assert_eq!(prometheus.value("keywarden_build_info"), 1.0);
    assert!(prometheus.value("process_resident_memory_bytes") > 0.0);
    assert!(prometheus.value("process_open_fds") > 0.0);

    // Nothing secret in the text: not the tokens, the subject id or the
    // plaintext of the workload.
    let (status, text) = http(&admin_addr, "GET", "/metrics");
    assert_eq!(status, 200);
    let admin_token = std::fs::read_to_string(tmp.path().join("data/admin.token")).unwrap();
    for secret in [
        billing.expose_secret(),
        bogus.expose_secret(),
        admin_token.trim(),
        SUBJECT,
        std::str::from_utf8(PLAINTEXT).unwrap(),
        "sentinel",
    ] {
        assert!(!text.contains(secret), "/metrics holds {secret:?}");
    }
}

#[test]
fn the_admin_listener_answers_its_paths_and_refuses_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let sidecar = Sidecar::start_with_env(
        &tmp.path().join("data"),
        &tmp.path().join("kw.sock"),
        &[("KEYWARDEN_ADMIN_LISTEN", &admin_addr)],
    );
    assert!(
        sidecar.log().contains("admin listener"),
        "{}",
        sidecar.log()
    );
    assert_eq!(http(&admin_addr, "GET", "/live"), (200, "ok\n".to_owned()));
    // Ready once the first checks have run.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(&admin_addr, "GET", "/ready").0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http(&admin_addr, "GET", "/ready"),
        (
            200,
            r#"{"ready":true,"checks":{"keystore":"ok","root_key":"ok","audit":"ok","draining":false},"notes":{}}"#
                .to_owned()
        )
    );
    let (status, text) = http(&admin_addr, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(text.contains("keywarden_build_info{version=\""), "{text}");
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    assert_eq!(http(&admin_addr, "GET", "/nope").0, 404);
    assert_eq!(http(&admin_addr, "GET", "/metrics/extra").0, 404);
    for method in ["POST", "PUT", "DELETE", "HEAD"] {
        assert_eq!(http(&admin_addr, method, "/metrics").0, 405, "{method}");
    }
    // It stops with the sidecar.
    let (status, log) = sidecar.terminate();
    assert!(status.success(), "{status}: {log}");
    assert!(TcpStream::connect(&admin_addr).is_err());
}

/// Found by the review of issue 16: 16 silent connections, reopened as the
/// listener closed them, failed every probe. Now a new connection beyond
/// the cap closes the oldest, each connection serves one request, and
/// probes get through while 200 silent connections are held.
#[test]
fn silent_connections_do_not_keep_the_probes_out() {
    let tmp = tempfile::tempdir().unwrap();
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let sidecar = Sidecar::start_with_env(
        &tmp.path().join("data"),
        &tmp.path().join("kw.sock"),
        &[("KEYWARDEN_ADMIN_LISTEN", &admin_addr)],
    );
    let held: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&admin_addr).unwrap())
        .collect();
    for _ in 0..10 {
        assert_eq!(http(&admin_addr, "GET", "/live"), (200, "ok\n".to_owned()));
    }
    // One request per connection: a second one pipelined behind the first
    // gets no answer, and the connection closes.
    let mut pipelined = TcpStream::connect(&admin_addr).unwrap();
    pipelined
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(
        &mut pipelined,
        b"GET /live HTTP/1.1\r\nHost: a\r\n\r\nGET /live HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut pipelined, &mut answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 1, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    drop(held);
    let (status, log) = sidecar.terminate();
    assert!(status.success(), "{status}: {log}");
}

#[test]
fn off_means_no_admin_listener() {
    let tmp = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start_with_env(
        &tmp.path().join("data"),
        &tmp.path().join("kw.sock"),
        &[("KEYWARDEN_ADMIN_LISTEN", "off")],
    );
    assert!(
        !sidecar.log().contains("admin listener"),
        "{}",
        sidecar.log()
    );
}

/// A sidecar's /metrics text: the value of the one sample named `name`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.split(' ').next() == Some(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn an_event_from_another_sidecar_is_counted_with_its_lag() {
    let url = common::postgres::fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (a_admin, b_admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    // Both sidecars share the keystore and (through the database) a root
    // key they cannot share as files: the tenant is made and shredded on A,
    // and B only hears of it.
    let start = |name: &str, admin: &str| {
        Sidecar::start_with_env(
            &tmp.path().join(name),
            &tmp.path().join(format!("{name}.sock")),
            &[
                ("KEYWARDEN_ADMIN_LISTEN", admin),
                ("KEYWARDEN_STORE_BACKEND", "postgres"),
                ("KEYWARDEN_DATABASE_URL", &url),
            ],
        )
    };
    let a = start("a", &a_admin);
    let _b = start("b", &b_admin);
    a.ok(&["tenant", "create", "acme"]);
    let (_, before) = http(&b_admin, "GET", "/metrics");
    assert_eq!(sample(&before, "keywarden_invalidation_events_total"), None);
    a.ok(&["tenant", "shred", "acme", "--confirm", "acme"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http(&b_admin, "GET", "/metrics");
        if sample(&text, "keywarden_invalidation_events_total") == Some(1.0) {
            assert_eq!(
                sample(&text, "keywarden_invalidation_lag_seconds_count"),
                Some(1.0),
                "{text}"
            );
            let lag = sample(&text, "keywarden_invalidation_lag_seconds_sum").unwrap();
            assert!((0.0..10.0).contains(&lag), "{lag}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never counted the event:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A made the change.
    let (_, text) = http(&a_admin, "GET", "/metrics");
    assert_eq!(
        sample(&text, "keywarden_shreds_total{kind=\"tenant\"}"),
        Some(1.0)
    );
}

/// In this test process (not the sidecar processes above): the recorder,
/// rendered as the admin listener would.
fn rendered_sample(name: &str) -> Option<f64> {
    sample(
        &keywarden::observe::metrics::render(&keywarden::observe::metrics::install()),
        name,
    )
}

#[tokio::test]
async fn a_call_past_its_deadline_is_a_deadline_refusal() {
    use common::{Options, TestSidecar, faults::Hooked};
    keywarden::observe::metrics::install();
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let real = common::provider(common::Kms::Local, dir.path(), None).await;
    // Every KMS Decrypt (a tenant key reloaded) waits 5 s.
    let slow = std::sync::Arc::new(Hooked {
        inner: real,
        before_decrypt: Box::new(|_| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            })
        }),
    });
    let options = Options {
        server: keywarden::config::ServerConfig {
            call_timeout_seconds: 1,
            ..Default::default()
        },
        cache: keywarden::config::CacheConfig {
            ttl_seconds: 1,
            tti_seconds: 1,
            ..Default::default()
        },
        ..Options::default()
    };
    let sidecar = TestSidecar::start_with_root(dir, options, slow).await;
    sidecar
        .admin()
        .await
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = rendered_sample("keywarden_refusals_total{reason=\"deadline\"}").unwrap_or(0.0);
    // The tenant's key expires from the cache; its reload waits on KMS
    // past the call's 1 s ceiling.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status = sidecar
        .crypto()
        .await
        .encrypt(encrypt("acme", "", PLAINTEXT))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        rendered_sample("keywarden_refusals_total{reason=\"deadline\"}"),
        Some(before + 1.0)
    );
    assert_eq!(
        rendered_sample(
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"keywarden.v1.Crypto\",grpc_method=\"Encrypt\",grpc_code=\"DEADLINE_EXCEEDED\"}"
        ),
        Some(1.0)
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn a_message_slower_than_the_minimum_rate_is_a_budget_refusal() {
    use common::TestSidecar;
    keywarden::observe::metrics::install();
    let sidecar = TestSidecar::start().await;
    let token = sidecar
        .admin_token
        .as_ref()
        .unwrap()
        .expose_secret()
        .to_owned();
    let before = rendered_sample("keywarden_refusals_total{reason=\"budget\"}").unwrap_or(0.0);
    let tcp = tokio::net::TcpStream::connect(sidecar.addr.as_str())
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri("http://localhost/keywarden.v1.Crypto/Encrypt")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    // A 1000-byte message announced, none of its bytes sent: after the 5 s
    // grace the call ends.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0x03, 0xE8]), false)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(15), response)
        .await
        .expect("the stalled call ends")
        .unwrap();
    let status = match response.headers().get("grpc-status") {
        Some(status) => status.clone(),
        None => {
            let mut data = response.into_body();
            while data.data().await.is_some() {}
            data.trailers().await.unwrap().unwrap()["grpc-status"].clone()
        }
    };
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    assert_eq!(
        rendered_sample("keywarden_refusals_total{reason=\"budget\"}"),
        Some(before + 1.0)
    );
    drop(body);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_and_streams_are_gauged() {
    let tmp = tempfile::tempdir().unwrap();
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let sidecar = Sidecar::start_with_env(
        &tmp.path().join("data"),
        &tmp.path().join("kw.sock"),
        &[("KEYWARDEN_ADMIN_LISTEN", &admin_addr)],
    );
    let gauges = || {
        let (_, text) = http(&admin_addr, "GET", "/metrics");
        (
            sample(&text, "keywarden_connections_open"),
            sample(&text, "keywarden_streams_open"),
        )
    };
    let wait_for = |want: (Option<f64>, Option<f64>)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = gauges();
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{got:?}, not {want:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let operator = sidecar.client().await;
    operator
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut app = client::crypto(operator.channel.clone(), Bearer::default());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Start(
            pb::EncryptStreamStart {
                tenant_id: "acme".into(),
                ..Default::default()
            },
        )),
    })
    .unwrap();
    let mut responses = app
        .encrypt_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // One connection, one stream open.
    wait_for((Some(1.0), Some(1.0)));
    drop(tx);
    while responses.message().await.unwrap().is_some() {}
    wait_for((Some(1.0), Some(0.0)));
    drop((responses, app, operator));
    wait_for((Some(0.0), Some(0.0)));
}

#[tokio::test]
async fn the_policy_pass_counts_its_rotations_and_destroyed_versions() {
    use common::{Options, TestSidecar, tokio_clock};
    const DAY: u64 = 86_400;
    keywarden::observe::metrics::install();
    let action = |a: &str| {
        rendered_sample(&format!("keywarden_policy_actions_total{{action=\"{a}\"}}")).unwrap_or(0.0)
    };
    let sidecar = TestSidecar::start_with(Options {
        clock: Some(tokio_clock()),
        policy_interval: Some(Duration::from_secs(60)),
        ..Options::default()
    })
    .await;
    sidecar
        .admin()
        .await
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            policy: Some(pb::TenantPolicy {
                rotation_period_seconds: DAY,
                retention_seconds: DAY,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (action("rotation"), action("version_destroyed")),
        (0.0, 0.0)
    );
    // A day later the pass rotates; version 1, a day old and no longer
    // primary, is past its retention and destroyed.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(DAY + 120)).await;
    tokio::time::resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (action("rotation"), action("version_destroyed")) != (1.0, 1.0) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            (action("rotation"), action("version_destroyed"))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sidecar.stop().await;
}
