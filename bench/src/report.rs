//! `bench run`'s results: a table for people, or one JSON document.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{CacheMode, Distribution, Op, RunArgs, baseline::Baseline, load::Outcome};

/// What was run.
#[derive(Debug, Serialize)]
pub struct Workload {
    pub op: Op,
    /// Deterministic encryption (`--deterministic`).
    pub deterministic: bool,
    /// "Encrypt", "EncryptBatch", "Decrypt" or "DecryptBatch".
    pub rpc: &'static str,
    pub payload_bytes: usize,
    pub batch: u32,
    pub concurrency: u32,
    pub connections: u32,
    pub tenants: u32,
    pub distribution: Distribution,
    /// Only with the Zipf distribution.
    pub zipf_exponent: Option<f64>,
    pub cache: CacheMode,
    /// "closed" (full speed) or "open" (a fixed arrival rate).
    pub loop_kind: &'static str,
    /// Calls per second offered, in the open loop.
    pub rate: Option<f64>,
    pub duration_seconds: Option<f64>,
    pub count: Option<u64>,
    pub warmup_seconds: f64,
}

/// Percentiles of the successful calls' latency, in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
    pub mean: f64,
}

#[derive(Debug, Serialize)]
pub struct Errors {
    pub total: u64,
    /// By gRPC code name; BAD_RESPONSE for an answer of the wrong shape.
    pub by_code: BTreeMap<&'static str, u64>,
}

/// One target's measurement.
#[derive(Debug, Serialize)]
pub struct TargetResult {
    /// "sidecar" or "echo".
    pub target: &'static str,
    /// Successful calls measured.
    pub calls: u64,
    pub items: u64,
    pub elapsed_seconds: f64,
    pub calls_per_second: f64,
    pub items_per_second: f64,
    /// Plaintext, in 10^6 bytes per second.
    pub plaintext_mb_per_second: f64,
    pub latency_us: Latency,
    pub errors: Errors,
}

impl TargetResult {
    pub fn new(target: &'static str, outcome: &Outcome, args: &RunArgs) -> Self {
        let seconds = outcome.elapsed.as_secs_f64();
        let per_second = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        let h = &outcome.latency;
        let at = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        TargetResult {
            target,
            calls: outcome.calls,
            items: outcome.items,
            elapsed_seconds: seconds,
            calls_per_second: per_second(outcome.calls),
            items_per_second: per_second(outcome.items),
            plaintext_mb_per_second: per_second(outcome.items) * args.payload as f64 / 1e6,
            latency_us: Latency {
                p50: at(0.50),
                p90: at(0.90),
                p99: at(0.99),
                p99_9: at(0.999),
                max: h.max(),
                mean: if h.is_empty() { 0.0 } else { h.mean() },
            },
            errors: Errors {
                total: outcome.error_total(),
                by_code: outcome.errors.clone(),
            },
        }
    }
}

/// Everything `bench run` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub results: Vec<TargetResult>,
    /// Sidecar throughput over the echo service's, with `--echo` in the
    /// closed loop.
    pub sidecar_to_echo_throughput: Option<f64>,
    /// With `--baseline`: the crypto limits for the same items, in-process.
    pub baselines: Vec<Baseline>,
    /// The sidecar's item throughput over the envelope's in-process seal
    /// loop with the faster provider.
    pub sidecar_to_seal_loop: Option<f64>,
    /// `--op blind-index`: the sidecar's item throughput over the
    /// in-process token loop.
    pub sidecar_to_token_loop: Option<f64>,
    /// The sidecar's plaintext throughput over the fastest raw AES-256-GCM.
    pub sidecar_to_fastest_aes_gcm: Option<f64>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(args: &RunArgs, results: Vec<TargetResult>, mut notes: Vec<String>) -> Self {
        let rpc = match (args.op, args.batch) {
            (Op::Encrypt, 1) => "Encrypt",
            (Op::Encrypt, _) => "EncryptBatch",
            (Op::Decrypt, 1) => "Decrypt",
            (Op::Decrypt, _) => "DecryptBatch",
            (Op::GenerateDataKey, _) => "GenerateDataKey",
            (Op::BlindIndex, 1) => "BlindIndex",
            (Op::BlindIndex, _) => "BlindIndexBatch",
        };
        let find = |target| results.iter().find(|r| r.target == target);
        // In the open loop both answer the offered rate: no ratio to tell.
        let ratio = match (find("sidecar"), find("echo")) {
            (Some(s), Some(e)) if e.calls_per_second > 0.0 && args.rate.is_none() => {
                Some(s.calls_per_second / e.calls_per_second)
            }
            _ => None,
        };
        if let Some(rate) = args.rate {
            for r in &results {
                if r.calls_per_second < 0.95 * rate {
                    notes.push(format!(
                        "{}: answered {:.0} calls/s of the {rate:.0} offered: it did not keep up",
                        r.target, r.calls_per_second
                    ));
                }
            }
        }
        for r in &results {
            if r.errors.total > 0 {
                notes.push(format!(
                    "{}: {} call(s) or item(s) FAILED; the figures count only successes",
                    r.target, r.errors.total
                ));
            }
        }
        Report {
            workload: Workload {
                op: args.op,
                deterministic: args.deterministic,
                rpc,
                payload_bytes: args.payload,
                batch: args.batch,
                concurrency: args.concurrency,
                connections: args.connections,
                tenants: args.tenants,
                distribution: args.distribution,
                zipf_exponent: (args.distribution == Distribution::Zipf && args.tenants > 1)
                    .then_some(args.zipf_exponent),
                cache: args.cache,
                loop_kind: if args.rate.is_some() {
                    "open"
                } else {
                    "closed"
                },
                rate: args.rate,
                duration_seconds: args.count.is_none().then_some(args.duration.as_secs_f64()),
                count: args.count,
                warmup_seconds: args.warmup.as_secs_f64(),
            },
            results,
            sidecar_to_echo_throughput: ratio,
            baselines: Vec::new(),
            sidecar_to_seal_loop: None,
            sidecar_to_token_loop: None,
            sidecar_to_fastest_aes_gcm: None,
            notes,
        }
    }

    /// Adds the in-process baselines and the sidecar's ratios to them.
    pub fn set_baselines(&mut self, baselines: Vec<Baseline>) {
        let best = |prefix: &str, of: fn(&Baseline) -> f64| {
            baselines
                .iter()
                .filter(|b| b.name.starts_with(prefix))
                .map(of)
                .fold(0.0, f64::max)
        };
        let seal = best("envelope seal", |b| b.items_per_second);
        let raw = best("raw AES-256-GCM", |b| b.plaintext_mb_per_second);
        let token = best("blind-index token", |b| b.items_per_second);
        if let Some(sidecar) = self.results.iter().find(|r| r.target == "sidecar") {
            self.sidecar_to_seal_loop = (seal > 0.0).then(|| sidecar.items_per_second / seal);
            self.sidecar_to_token_loop = (token > 0.0).then(|| sidecar.items_per_second / token);
            self.sidecar_to_fastest_aes_gcm =
                (raw > 0.0).then(|| sidecar.plaintext_mb_per_second / raw);
        }
        self.baselines = baselines;
    }

    /// No target answered with an error.
    pub fn clean(&self) -> bool {
        self.results.iter().all(|r| r.errors.total == 0)
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    pub fn table(&self) -> String {
        let w = &self.workload;
        let mut out = String::new();
        let tenants = match (w.tenants, w.distribution) {
            (1, _) => "1 tenant".to_owned(),
            (t, Distribution::Uniform) => format!("{t} tenants, uniform"),
            (t, Distribution::Zipf) => format!(
                "{t} tenants, Zipf (s = {})",
                w.zipf_exponent.unwrap_or_default()
            ),
        };
        let pace = match w.rate {
            Some(rate) => format!("open loop at {rate:.0} calls/s"),
            None => "closed loop".to_owned(),
        };
        let length = match (w.count, w.duration_seconds) {
            (Some(count), _) => format!("{count} calls"),
            (None, Some(seconds)) => format!("{seconds}s"),
            (None, None) => String::new(),
        };
        let cache = match w.cache {
            CacheMode::Warm => "warm",
            CacheMode::Cold => "cold",
        };
        let _ = writeln!(
            out,
            "{} of {} B x {}, {} in flight on {} connection(s), {tenants}, cache {cache}, {pace}, \
             {length} after {}s warm-up",
            w.rpc, w.payload_bytes, w.batch, w.concurrency, w.connections, w.warmup_seconds
        );
        let _ = writeln!(
            out,
            "{:<8} {:>10} {:>11} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8}  errors",
            "target",
            "calls/s",
            "items/s",
            "MB/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs"
        );
        for r in &self.results {
            let l = &r.latency_us;
            let errors = if r.errors.total == 0 {
                "0".to_owned()
            } else {
                let codes: Vec<String> = r
                    .errors
                    .by_code
                    .iter()
                    .map(|(code, n)| format!("{code}: {n}"))
                    .collect();
                format!("{} ({})", r.errors.total, codes.join(", "))
            };
            let _ = writeln!(
                out,
                "{:<8} {:>10.0} {:>11.0} {:>9.2} {:>8} {:>8} {:>8} {:>9} {:>8}  {errors}",
                r.target,
                r.calls_per_second,
                r.items_per_second,
                r.plaintext_mb_per_second,
                l.p50,
                l.p90,
                l.p99,
                l.p99_9,
                l.max
            );
        }
        if let Some(ratio) = self.sidecar_to_echo_throughput {
            let _ = writeln!(out, "throughput sidecar/echo: {ratio:.2}");
        }
        for b in &self.baselines {
            let _ = writeln!(
                out,
                "in-process, one thread: {:<30} {:>11.0} items/s {:>9.1} MB/s",
                b.name, b.items_per_second, b.plaintext_mb_per_second
            );
        }
        if let Some(ratio) = self.sidecar_to_seal_loop {
            let _ = writeln!(
                out,
                "items/s sidecar / fastest envelope seal loop: {ratio:.2}"
            );
        }
        if let Some(ratio) = self.sidecar_to_token_loop {
            let _ = writeln!(out, "items/s sidecar / blind-index token loop: {ratio:.2}");
        }
        if let Some(ratio) = self.sidecar_to_fastest_aes_gcm {
            let _ = writeln!(out, "MB/s sidecar / fastest raw AES-256-GCM: {ratio:.3}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    /// Prints the table or the JSON; tells whether the run was clean.
    pub fn print(&self, json: bool) -> bool {
        if json {
            println!("{}", self.json());
        } else {
            print!("{}", self.table());
        }
        self.clean()
    }
}
