//! Every metric keywarden exports: the names, the labels and what each
//! means (README, "Metrics", lists them for operators), the Prometheus
//! recorder behind the `metrics` facade, and small helpers the parts call.
//!
//! Recording goes through the `metrics` crate's macros. Until a recorder is
//! installed ([`install`], at start when the admin listener is on) they do
//! nothing and cost an atomic load, so with `[admin] listen = "off"` the hot
//! path carries no metrics at all. The recorder is
//! `metrics-exporter-prometheus` without its own HTTP listener: the admin
//! listener ([`super::http`]) renders it on `/metrics`.
//!
//! **No label carries a secret, a subject id, a token or request content.**
//! Every label value is one of a fixed set written here (operations,
//! outcomes, reasons, gRPC codes, method names from the sidecar's own
//! table), except `tenant` on the opt-in per-tenant series, which is a
//! tenant id (not a secret) under a hard bound ([`TenantLabels`]).
//!
//! This file imports nothing from the rest of the crate, so every floor may
//! record.

use std::{
    collections::HashSet,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use metrics::{describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// gRPC, as go-grpc-prometheus and grpc-ecosystem name them.
pub const GRPC_STARTED: &str = "grpc_server_started_total";
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";

pub const KMS_CALLS: &str = "keywarden_kms_calls_total";
pub const KMS_CALL_SECONDS: &str = "keywarden_kms_call_duration_seconds";
pub const KEYSTORE_QUERIES: &str = "keywarden_keystore_queries_total";
pub const KEYSTORE_QUERY_SECONDS: &str = "keywarden_keystore_query_duration_seconds";
pub const CACHE_HITS: &str = "keywarden_cache_hits_total";
pub const CACHE_MISSES: &str = "keywarden_cache_misses_total";
pub const CACHE_LOADS: &str = "keywarden_cache_loads_total";
pub const CACHE_EVICTIONS: &str = "keywarden_cache_evictions_total";
pub const CACHE_ENTRIES: &str = "keywarden_cache_entries";
pub const INVALIDATION_EVENTS: &str = "keywarden_invalidation_events_total";
pub const INVALIDATION_LAG_SECONDS: &str = "keywarden_invalidation_lag_seconds";
pub const AUDIT_WRITES: &str = "keywarden_audit_writes_total";
pub const AUDIT_WRITE_SECONDS: &str = "keywarden_audit_write_duration_seconds";
pub const REFUSALS: &str = "keywarden_refusals_total";
pub const POLICY_ACTIONS: &str = "keywarden_policy_actions_total";
pub const SHREDS: &str = "keywarden_shreds_total";
pub const STREAMS_OPEN: &str = "keywarden_streams_open";
pub const CONNECTIONS_OPEN: &str = "keywarden_connections_open";
pub const BUILD_INFO: &str = "keywarden_build_info";
pub const TENANT_CALLS: &str = "keywarden_tenant_calls_total";

/// Data-plane latencies: a cached Encrypt takes tens of microseconds, a
/// KMS round trip milliseconds, a stream up to `server.stream_timeout_seconds`.
const GRPC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// A KMS call: a few milliseconds in region, seconds when retried.
const KMS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// A keystore query: tens of microseconds (SQLite) to milliseconds
/// (PostgreSQL); seconds mean trouble.
const KEYSTORE_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
/// Commit in one sidecar to eviction in another: milliseconds normally,
/// seconds after a reconnection.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// An audit record: a write and an fsync (file) or an insert (PostgreSQL).
const AUDIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The installed recorder's handle; set once per process.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process; later calls return
/// the same handle), describes every metric and sets `keywarden_build_info`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in [
                (GRPC_HANDLING_SECONDS, GRPC_BUCKETS),
                (KMS_CALL_SECONDS, KMS_BUCKETS),
                (KEYSTORE_QUERY_SECONDS, KEYSTORE_BUCKETS),
                (INVALIDATION_LAG_SECONDS, LAG_BUCKETS),
                (AUDIT_WRITE_SECONDS, AUDIT_BUCKETS),
            ] {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
                    .expect("the bucket lists are not empty");
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                // Another recorder was installed first (a test harness's):
                // this handle renders nothing then.
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            describe();
            process_collector().describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The Prometheus text exposition of every metric, process metrics
/// refreshed first.
pub fn render(handle: &PrometheusHandle) -> String {
    process_collector().collect();
    handle.render()
}

/// Upkeep the recorder needs (it drains histogram samples into buckets);
/// the admin listener runs it every few seconds.
pub fn upkeep(handle: &PrometheusHandle) {
    handle.run_upkeep();
}

fn describe() {
    describe_counter!(
        GRPC_STARTED,
        "gRPC calls started, including those refused at the edge"
    );
    describe_counter!(
        GRPC_HANDLED,
        "gRPC calls completed, by the status code they ended with"
    );
    describe_histogram!(
        GRPC_HANDLING_SECONDS,
        metrics::Unit::Seconds,
        "gRPC call duration, from its headers to its last frame"
    );
    describe_counter!(
        KMS_CALLS,
        "root-key provider (KMS) calls, by operation and outcome"
    );
    describe_histogram!(
        KMS_CALL_SECONDS,
        metrics::Unit::Seconds,
        "root-key provider (KMS) call duration"
    );
    describe_counter!(
        KEYSTORE_QUERIES,
        "keystore operations, by operation and outcome"
    );
    describe_histogram!(
        KEYSTORE_QUERY_SECONDS,
        metrics::Unit::Seconds,
        "keystore operation duration"
    );
    describe_counter!(CACHE_HITS, "key cache lookups answered from the cache");
    describe_counter!(CACHE_MISSES, "key cache lookups not in the cache");
    describe_counter!(
        CACHE_LOADS,
        "keys loaded into the cache (unwrapped or read)"
    );
    describe_counter!(CACHE_EVICTIONS, "keys removed from the cache");
    describe_gauge!(CACHE_ENTRIES, "keys in the cache");
    describe_counter!(
        INVALIDATION_EVENTS,
        "keystore change events received from other sidecars"
    );
    describe_histogram!(
        INVALIDATION_LAG_SECONDS,
        metrics::Unit::Seconds,
        "from a change's commit to its eviction here"
    );
    describe_counter!(AUDIT_WRITES, "audit log writes, by outcome");
    describe_histogram!(
        AUDIT_WRITE_SECONDS,
        metrics::Unit::Seconds,
        "audit log write duration"
    );
    describe_counter!(REFUSALS, "calls refused, by reason");
    describe_counter!(POLICY_ACTIONS, "changes made by the policy pass, by action");
    describe_counter!(SHREDS, "shreds done, by kind");
    describe_gauge!(STREAMS_OPEN, "streaming gRPC calls open");
    describe_gauge!(CONNECTIONS_OPEN, "client connections open");
    describe_gauge!(BUILD_INFO, "always 1; the version as a label");
    describe_counter!(
        TENANT_CALLS,
        "data-plane calls per tenant (opt-in, bounded: [admin] tenant_metrics)"
    );
}

/// "ok" or "error", the `outcome` label.
pub fn outcome<T, E>(result: &Result<T, E>) -> &'static str {
    if result.is_ok() { "ok" } else { "error" }
}

/// Why a call was refused: the `reason` label of `keywarden_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No valid credential (UNAUTHENTICATED).
    Authentication,
    /// A credential without the permission (PERMISSION_DENIED).
    Authorization,
    /// The tenant's rate limit (RESOURCE_EXHAUSTED).
    RateLimit,
    /// A request message over its method's size limit, a batch over
    /// `limits.max_batch_items`, a plaintext over `limits.max_plaintext_bytes`
    /// (INVALID_ARGUMENT) or over its tenant policy's `max_plaintext_bytes`
    /// (RESOURCE_EXHAUSTED; a stream's total too).
    Size,
    /// A request message's bytes arrived slower than
    /// `server.request_min_bytes_per_second` while holding decode budget.
    Budget,
    /// The call's deadline passed (DEADLINE_EXCEEDED at the edge).
    Deadline,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::Authentication => "authentication",
            Self::Authorization => "authorization",
            Self::RateLimit => "rate_limit",
            Self::Size => "size",
            Self::Budget => "budget",
            Self::Deadline => "deadline",
        }
    }
}

/// Counts one refusal.
pub fn refused(reason: Refusal) {
    metrics::counter!(REFUSALS, "reason" => reason.label()).increment(1);
}

/// Times an operation and records it as `counter{operation,outcome}` and
/// `histogram{operation}`.
pub fn timed(counter: &'static str, histogram: &'static str, operation: &'static str) -> Timer {
    Timer {
        counter,
        histogram,
        operation,
        started: Instant::now(),
    }
}

/// A started operation ([`timed`]).
#[must_use]
pub struct Timer {
    counter: &'static str,
    histogram: &'static str,
    operation: &'static str,
    started: Instant,
}

impl Timer {
    /// Records the operation's outcome and duration.
    pub fn finish<T, E>(self, result: &Result<T, E>) {
        self.finish_with(outcome(result));
    }

    pub fn finish_with(self, outcome: &'static str) {
        metrics::counter!(self.counter, "operation" => self.operation, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(self.histogram, "operation" => self.operation)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// `keywarden_tenant_calls_total`'s label for a tenant, under a hard bound:
/// the first `max` distinct tenants this process records get a series of
/// their own, every later one is counted under `tenant="other"`. Off by
/// default: then nothing is recorded.
pub struct TenantLabels {
    max: usize,
    known: Mutex<HashSet<String>>,
}

/// The label tenants beyond the bound fold into.
pub const OTHER_TENANT: &str = "other";

impl TenantLabels {
    /// `None`: per-tenant series off.
    pub fn new(max: Option<usize>) -> Option<Self> {
        max.map(|max| Self {
            max,
            known: Mutex::new(HashSet::with_capacity(max)),
        })
    }

    /// The label for `tenant`: itself if it has a series or there is room
    /// for one more, else [`OTHER_TENANT`].
    pub fn label(&self, tenant: &str) -> String {
        self.label_for(tenant, true)
    }

    /// `tenant`'s label; a tenant not yet known takes a place only when
    /// `may_claim` (a call that succeeded: the tenant exists and the caller
    /// may use it), so that callers cannot fill the places with names of
    /// tenants that do not exist (found by the review of issue 16).
    fn label_for(&self, tenant: &str, may_claim: bool) -> String {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(tenant) {
            return tenant.to_owned();
        }
        if !may_claim {
            return OTHER_TENANT.to_owned();
        }
        // "other" is never a tenant's own label: a tenant named "other"
        // folds in with the rest.
        if known.len() < self.max && tenant != OTHER_TENANT {
            known.insert(tenant.to_owned());
            return tenant.to_owned();
        }
        OTHER_TENANT.to_owned()
    }

    /// Counts one data-plane call of `tenant`.
    pub fn record(&self, tenant: &str, method: &'static str, code: &'static str) {
        let tenant = self.label_for(tenant, code == "OK");
        metrics::counter!(TENANT_CALLS, "tenant" => tenant, "grpc_method" => method, "grpc_code" => code)
            .increment(1);
    }
}

/// A gauge raised while the guard lives (`keywarden_connections_open`,
/// `keywarden_streams_open`).
pub struct GaugeGuard(&'static str);

impl GaugeGuard {
    pub fn new(name: &'static str) -> Self {
        gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        gauge!(self.0).decrement(1.0);
    }
}

/// Seconds as a histogram takes them.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_beyond_the_bound_fold_into_other() {
        let labels = TenantLabels::new(Some(2)).unwrap();
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), "other");
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("other"), "other");
        assert!(TenantLabels::new(None).is_none());
    }

    #[test]
    fn only_a_call_answered_ok_takes_a_place() {
        let labels = TenantLabels::new(Some(1)).unwrap();
        for code in ["NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED"] {
            assert_eq!(labels.label_for("ghost", code == "OK"), "other");
        }
        assert_eq!(labels.label_for("acme", true), "acme");
        // Known: its failed calls keep its label.
        assert_eq!(labels.label_for("acme", false), "acme");
        assert_eq!(labels.label_for("ghost", true), "other");
    }
}

/// The memory a per-tenant series costs, measured (README, "Metrics"):
/// `cargo test --lib observe::metrics::cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use super::*;

    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split(' ').nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[test]
    #[ignore = "a measurement, not a check"]
    fn per_tenant_series_memory() {
        const METHODS: [&str; 7] = [
            "Encrypt",
            "Decrypt",
            "EncryptBatch",
            "DecryptBatch",
            "Rewrap",
            "EncryptStream",
            "DecryptStream",
        ];
        const CODES: [&str; 6] = [
            "OK",
            "INVALID_ARGUMENT",
            "NOT_FOUND",
            "FAILED_PRECONDITION",
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
        ];
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let tenants = 1000;
        let labels = TenantLabels::new(Some(tenants)).unwrap();
        let before = rss_bytes();
        metrics::with_local_recorder(&recorder, || {
            for t in 0..tenants {
                let tenant = format!("tenant-{t:06}-of-a-typical-length");
                for method in METHODS {
                    for code in CODES {
                        labels.record(&tenant, method, code);
                    }
                }
            }
        });
        let after = rss_bytes();
        let series = (tenants * METHODS.len() * CODES.len()) as u64;
        let text = handle.render();
        println!(
            "{series} series: {} bytes of RSS each, {} bytes of /metrics text each",
            (after - before) / series,
            text.len() as u64 / series
        );
    }
}
