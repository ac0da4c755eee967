//! Traces end to end: a real `keywarden serve` exporting its spans over
//! OTLP/gRPC to a receiver built here from the OTLP protobuf definitions
//! (`opentelemetry-proto`'s TraceServiceServer; no collector binary is
//! installable on this machine), with `log.format = "json"`.

mod common;

use std::{
    collections::HashMap,
    fs,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use keywarden::api::pb;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};

use common::process::Sidecar;

/// What the receiver was sent.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Received {
    /// Starts an OTLP/gRPC receiver on a loopback port; answers its
    /// endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// Every span received so far, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut spans = Vec::new();
        for request in self.0.lock().unwrap().iter() {
            for resource in &request.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|r| attributes(&r.attributes).get("service.name").cloned())
                    .unwrap_or_default();
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }

    /// Waits for the span of trace `trace_id` (32 hex digits).
    async fn span_of(&self, trace_id: &str) -> (String, Span) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(found) = self
                .spans()
                .into_iter()
                .find(|(_, span)| hex::encode(&span.trace_id) == trace_id)
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no span of trace {trace_id} arrived; received: {:?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Attributes as text (ints in decimal).
fn attributes(
    list: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), shown(kv.value.as_ref())))
        .collect()
}

fn shown(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn with_traceparent<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

/// The audit records (as JSON) of `action` in the sidecar's log.
fn audit_records(data: &Path, action: &str) -> Vec<serde_json::Value> {
    fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|record| record["action"] == action)
        .collect()
}

/// The JSON log lines whose message is `message`.
fn log_lines(log: &str, message: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .filter(|line| line["message"] == message)
        .collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const PLAINTEXT: &str = "the plaintext nobody may see";
const SUBJECT: &str = "alice@example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_trace_reaches_its_span_its_audit_records_and_its_log_lines() {
    let received = Received::default();
    let endpoint = received.start().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // A long batch delay: the spans leave only when the sidecar stops, so
    // this also shows that the queue is flushed at shutdown.
    let sidecar = Sidecar::start_with_env(
        &data,
        &tmp.path().join("kw.sock"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("KEYWARDEN_LOG_FORMAT", "json"),
            ("KEYWARDEN_AUDIT_DATA_PLANE", "every"),
        ],
    );
    let client = sidecar.client().await;
    let token = fs::read_to_string(data.join("admin.token")).unwrap();

    // An admin call with a traceparent: both its audit records carry the id.
    let create_trace = "0af7651916cd43dd8448eb211c80319c";
    client
        .admin()
        .create_tenant(with_traceparent(
            pb::CreateTenantRequest {
                tenant_id: "acme".into(),
                ..Default::default()
            },
            &format!("00-{create_trace}-b7ad6b7169203331-01"),
        ))
        .await
        .unwrap();
    let records = audit_records(&data, "CreateTenant");
    assert_eq!(records.len(), 2, "{records:?}");
    for record in &records {
        assert_eq!(record["trace_id"], create_trace, "{record}");
    }
    // And the log line the call wrote, in JSON, carries it too.
    let created = log_lines(&sidecar.log(), "tenant created");
    assert_eq!(created.len(), 1, "{}", sidecar.log());
    assert_eq!(created[0]["trace_id"], create_trace);
    assert_eq!(created[0]["level"], "INFO");
    assert_eq!(created[0]["target"], "keywarden::keys::tenants");
    assert_eq!(created[0]["fields"]["tenant"], "acme");
    // The log verifies with the new field in it.
    let verified = sidecar.cli(&["audit", "verify", data.join("audit.log").to_str().unwrap()]);
    verified.assert_success(&["audit", "verify"]);

    // A data-plane call with a sampled traceparent.
    client
        .crypto()
        .encrypt(with_traceparent(
            pb::EncryptRequest {
                tenant_id: "acme".into(),
                subject_id: SUBJECT.into(),
                context: Default::default(),
                plaintext: PLAINTEXT.as_bytes().to_vec(),
                deterministic: false,
                key_version: 0,
            },
            &format!("00-{TRACE}-{PARENT}-01"),
        ))
        .await
        .unwrap();
    // In "every" mode its audit record carries the caller's trace id.
    let records = audit_records(&data, "Encrypt");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["trace_id"], TRACE);

    // A stream: its record is written as its response body ends, inside
    // the call's trace too.
    let stream_trace = "1bf92f3577b34da6a3ce929d0e0e4737";
    let requests = vec![
        pb::EncryptStreamRequest {
            part: Some(pb::encrypt_stream_request::Part::Start(
                pb::EncryptStreamStart {
                    tenant_id: "acme".into(),
                    subject_id: SUBJECT.into(),
                    context: Default::default(),
                },
            )),
        },
        pb::EncryptStreamRequest {
            part: Some(pb::encrypt_stream_request::Part::Chunk(
                PLAINTEXT.as_bytes().to_vec(),
            )),
        },
    ];
    let mut responses = client
        .crypto()
        .encrypt_stream(with_traceparent(
            futures::stream::iter(requests),
            &format!("00-{stream_trace}-{PARENT}-01"),
        ))
        .await
        .unwrap()
        .into_inner();
    while responses.message().await.unwrap().is_some() {}
    let records = audit_records(&data, "EncryptStream");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["trace_id"], stream_trace);

    // An invalid traceparent (uppercase) is ignored: the call succeeds in a
    // trace of its own, and the header is not echoed into the log.
    let invalid_trace = "0AF7651916CD43DD8448EB211C80319D";
    client
        .admin()
        .create_tenant(with_traceparent(
            pb::CreateTenantRequest {
                tenant_id: "globex".into(),
                ..Default::default()
            },
            &format!("00-{invalid_trace}-B7AD6B7169203331-01"),
        ))
        .await
        .unwrap();
    let created = log_lines(&sidecar.log(), "tenant created");
    assert_eq!(created.len(), 2, "{}", sidecar.log());
    let new_trace = created[1]["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(new_trace.len(), 32);
    assert!(
        new_trace
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_ne!(new_trace, invalid_trace.to_ascii_lowercase());
    let records = audit_records(&data, "CreateTenant");
    assert_eq!(records[2]["trace_id"], new_trace.as_str());
    assert_eq!(records[3]["trace_id"], new_trace.as_str());

    let (status, log) = tokio::task::spawn_blocking(move || sidecar.terminate())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    for secret in [
        PLAINTEXT,
        SUBJECT,
        token.trim(),
        "B7AD6B7169203331",
        invalid_trace,
    ] {
        assert!(!log.contains(secret), "{secret:?} is in the log:\n{log}");
    }

    // The Encrypt span: the caller's trace and parent, server kind, the RPC
    // attributes.
    let (service, span) = received.span_of(TRACE).await;
    assert_eq!(service, "keywarden");
    assert_eq!(span.name, "keywarden.v1.Crypto/Encrypt");
    assert_eq!(hex::encode(&span.parent_span_id), PARENT);
    assert_eq!(span.kind, SpanKind::Server as i32);
    let attrs = attributes(&span.attributes);
    assert_eq!(attrs["rpc.system"], "grpc");
    assert_eq!(attrs["rpc.service"], "keywarden.v1.Crypto");
    assert_eq!(attrs["rpc.method"], "Encrypt");
    assert_eq!(attrs["rpc.grpc.status_code"], "0");
    assert_eq!(attrs["keywarden.tenant"], "acme");
    assert!(span.events.is_empty(), "{:?}", span.events);

    let (_, stream) = received.span_of(stream_trace).await;
    assert_eq!(stream.name, "keywarden.v1.Crypto/EncryptStream");
    assert_eq!(attributes(&stream.attributes)["rpc.grpc.status_code"], "0");

    // The admin calls' spans; the one with the invalid header is a root.
    let (_, create) = received.span_of(create_trace).await;
    assert_eq!(create.name, "keywarden.v1.Admin/CreateTenant");
    assert_eq!(hex::encode(&create.parent_span_id), "b7ad6b7169203331");
    let (_, fresh) = received.span_of(&new_trace).await;
    assert!(fresh.parent_span_id.is_empty(), "{fresh:?}");
    assert_eq!(attributes(&fresh.attributes)["keywarden.tenant"], "globex");

    // No span says anything secret.
    for (_, span) in received.spans() {
        let shown = format!("{span:?}");
        for secret in [PLAINTEXT, SUBJECT, token.trim()] {
            assert!(!shown.contains(secret), "{secret:?} in {shown}");
        }
        for (key, value) in attributes(&span.attributes) {
            assert!(
                key.starts_with("rpc.") || key.starts_with("server.") || key == "keywarden.tenant",
                "unexpected attribute {key}={value}"
            );
        }
    }
}

#[test]
fn an_exporter_other_than_otlp_stops_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mut command = common::process::keywarden();
    command
        .env("OTEL_TRACES_EXPORTER", "zipkin")
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--listen")
        .arg(format!("unix:{}", tmp.path().join("kw.sock").display()));
    let (code, stderr) = common::process::exit_and_stderr(command);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("OTEL_TRACES_EXPORTER"), "{stderr}");
}

#[test]
fn a_text_log_line_of_a_call_names_its_trace_id_before_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sidecar = Sidecar::start(&data, &tmp.path().join("kw.sock"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        sidecar
            .client()
            .await
            .admin()
            .create_tenant(with_traceparent(
                pb::CreateTenantRequest {
                    tenant_id: "acme".into(),
                    ..Default::default()
                },
                &format!("00-{TRACE}-{PARENT}-00"),
            ))
            .await
            .unwrap();
    });
    let log = sidecar.log();
    let line = log
        .lines()
        .find(|line| line.contains("tenant created"))
        .unwrap_or_else(|| panic!("no \"tenant created\" line:\n{log}"));
    assert!(
        line.contains(&format!(
            "call{{trace_id={TRACE}}}: keywarden::keys::tenants: tenant created"
        )),
        "{line}"
    );
    // Lines outside a call have no call span.
    let serving = log
        .lines()
        .find(|l| l.contains("keywarden serving"))
        .unwrap();
    assert!(!serving.contains("trace_id"), "{serving}");
}

#[test]
fn a_failed_span_export_is_an_error_in_the_log() {
    // A port nothing listens on: every export fails at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sidecar = Sidecar::start_with_env(
        &data,
        &tmp.path().join("kw.sock"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
        ],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        sidecar
            .client()
            .await
            .admin()
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: "acme".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let log = sidecar.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("BatchSpanProcessor.ExportError"))
        {
            assert!(line.contains("ERROR"), "{line}");
            assert!(line.contains("opentelemetry_sdk"), "{line}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no export error in the log:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
