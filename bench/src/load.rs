//! The driver: C client tasks, each with one call in flight at a time.
//!
//! - Closed loop (no rate): a client calls again as soon as it has its
//!   answer. Latency is from send to answer.
//! - Open loop (`--rate R`): ticket k is due at `start + k/R`, whether or not
//!   a client is free then. A pacer thread releases tickets as they fall due;
//!   a free client takes the oldest, and its latency counts from the ticket's
//!   due time, so time spent waiting for a free client (the target falling
//!   behind) is charged to the target: no coordinated omission.
//!
//! Calls made during the warm-up are not recorded. Only successful calls go
//! into the latency histogram and the throughput; every failure is counted
//! by its gRPC code (a failed batch item by the item's code), and a response
//! of the wrong shape or size as `BAD_RESPONSE`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use rand::{SeedableRng, rngs::StdRng};
use tokio::{sync::Semaphore, task::JoinSet};
use tonic::{Code, Status};

use crate::{Op, tenants::TenantPicker};

/// Bytes of a data key.
const DATA_KEY_LEN: usize = 32;
use keywarden::{
    api::{pb, status::code_name},
    client::Authed,
    envelope::{
        Context, TENANT_OVERHEAD, blind, datakey::TENANT_WRAPPED_LEN as WRAPPED_DATA_KEY_LEN,
        deterministic::DETERMINISTIC_TENANT_OVERHEAD,
    },
};

type CryptoClient = pb::crypto_client::CryptoClient<Authed>;

/// A response of the wrong shape: a wrong item count, a ciphertext of the
/// wrong size, a plaintext that is not the one encrypted.
pub const BAD_RESPONSE: &str = "BAD_RESPONSE";

/// Highest latency the histogram holds, in microseconds (one hour); longer
/// ones are recorded as this.
const MAX_MICROS: u64 = 3_600_000_000;

/// What each call sends.
#[derive(Clone, Debug)]
pub struct Workload {
    pub op: Op,
    /// Encrypt deterministically (suite 0x04).
    pub deterministic: bool,
    /// One item's plaintext.
    pub plaintext: Vec<u8>,
    /// Items per call; 1 = the unary call.
    pub batch: usize,
    pub context: Context,
    pub tenant_ids: Vec<String>,
    pub picker: TenantPicker,
    /// Decrypt: ciphertexts of `plaintext` per tenant, made by the target.
    pub pool: Vec<Vec<Vec<u8>>>,
}

/// Closed or open loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    Closed,
    Open { rate: f64 },
}

/// How much to measure after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    Duration(Duration),
    Count(u64),
}

/// What a measurement gave, merged over the clients.
#[derive(Debug)]
pub struct Outcome {
    /// Successful calls recorded.
    pub calls: u64,
    /// Items of those calls.
    pub items: u64,
    /// From the end of the warm-up to the last recorded answer.
    pub elapsed: Duration,
    /// Microseconds per successful call.
    pub latency: Histogram<u64>,
    /// Failures by gRPC code name (or [`BAD_RESPONSE`]).
    pub errors: BTreeMap<&'static str, u64>,
    last_done: Option<Instant>,
}

impl Outcome {
    fn new() -> Self {
        Self {
            calls: 0,
            items: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::new_with_bounds(1, MAX_MICROS, 3)
                .expect("the histogram bounds are valid"),
            errors: BTreeMap::new(),
            last_done: None,
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.calls += other.calls;
        self.items += other.items;
        self.latency
            .add(&other.latency)
            .expect("histograms of the same bounds merge");
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.last_done = self.last_done.max(other.last_done);
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One call to make: when it was due, and whether it is measured.
struct Slot {
    due: Instant,
    record: bool,
}

enum Kind {
    ClosedUntil {
        end: Instant,
    },
    ClosedCount {
        taken: AtomicU64,
        count: u64,
    },
    Open {
        rate: f64,
        warm: u64,
        total: u64,
        /// One permit per ticket fallen due, plus one per client at the end.
        due: Semaphore,
        next: AtomicU64,
    },
}

/// When calls are made and which are recorded.
struct Schedule {
    start: Instant,
    /// The end of the warm-up.
    measure_from: Instant,
    kind: Kind,
}

impl Schedule {
    fn new(pace: Pace, length: Length, warmup: Duration) -> Self {
        let start = Instant::now();
        match pace {
            Pace::Closed => {
                let measure_from = start + warmup;
                let kind = match length {
                    Length::Duration(d) => Kind::ClosedUntil {
                        end: measure_from + d,
                    },
                    Length::Count(count) => Kind::ClosedCount {
                        taken: AtomicU64::new(0),
                        count,
                    },
                };
                Schedule {
                    start,
                    measure_from,
                    kind,
                }
            }
            Pace::Open { rate } => {
                let warm = (warmup.as_secs_f64() * rate).ceil() as u64;
                let measured = match length {
                    Length::Duration(d) => ((d.as_secs_f64() * rate).ceil() as u64).max(1),
                    Length::Count(count) => count,
                };
                Schedule {
                    start,
                    measure_from: start + Duration::from_secs_f64(warm as f64 / rate),
                    kind: Kind::Open {
                        rate,
                        warm,
                        total: warm + measured,
                        due: Semaphore::new(0),
                        next: AtomicU64::new(0),
                    },
                }
            }
        }
    }

    /// The next call for a client, or `None` when the run is over.
    async fn next(&self) -> Option<Slot> {
        match &self.kind {
            Kind::ClosedUntil { end } => {
                let now = Instant::now();
                (now < *end).then_some(Slot {
                    due: now,
                    record: now >= self.measure_from,
                })
            }
            Kind::ClosedCount { taken, count } => {
                let now = Instant::now();
                if now < self.measure_from {
                    return Some(Slot {
                        due: now,
                        record: false,
                    });
                }
                (taken.fetch_add(1, Ordering::Relaxed) < *count).then_some(Slot {
                    due: now,
                    record: true,
                })
            }
            Kind::Open {
                rate,
                warm,
                total,
                due,
                next,
            } => {
                due.acquire().await.ok()?.forget();
                let ticket = next.fetch_add(1, Ordering::Relaxed);
                (ticket < *total).then(|| Slot {
                    due: self.start + Duration::from_secs_f64(ticket as f64 / rate),
                    record: ticket >= *warm,
                })
            }
        }
    }

    /// Open loop: releases the tickets as they fall due, on a thread of its
    /// own (std's sleep is precise to tens of microseconds, tokio's timer to
    /// a millisecond), then one end-of-run ticket per client.
    fn pace(self: &Arc<Self>, clients: usize) -> Option<std::thread::JoinHandle<()>> {
        let Kind::Open { rate, total, .. } = self.kind else {
            return None;
        };
        let schedule = Arc::clone(self);
        Some(std::thread::spawn(move || {
            let Kind::Open { due, .. } = &schedule.kind else {
                unreachable!("checked above")
            };
            let mut released = 0u64;
            while released < total {
                let elapsed = schedule.start.elapsed().as_secs_f64();
                // Ticket k is due at k / rate: tickets 0..=floor(elapsed * rate).
                let now_due = ((elapsed * rate).floor() as u64 + 1).min(total);
                if now_due > released {
                    due.add_permits((now_due - released) as usize);
                    released = now_due;
                }
                if released < total {
                    let at = schedule.start + Duration::from_secs_f64(released as f64 / rate);
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                }
            }
            due.add_permits(clients);
        }))
    }
}

/// Drives `clients` (one call in flight each) through `workload`.
pub async fn drive(
    clients: &[CryptoClient],
    workload: Arc<Workload>,
    pace: Pace,
    length: Length,
    warmup: Duration,
) -> Outcome {
    let schedule = Arc::new(Schedule::new(pace, length, warmup));
    let pacer = schedule.pace(clients.len());
    let mut tasks = JoinSet::new();
    for (index, client) in clients.iter().enumerate() {
        tasks.spawn(client_loop(
            index,
            client.clone(),
            Arc::clone(&workload),
            Arc::clone(&schedule),
        ));
    }
    let mut outcome = Outcome::new();
    while let Some(joined) = tasks.join_next().await {
        outcome.merge(joined.expect("a bench client task panicked"));
    }
    if let Some(pacer) = pacer {
        pacer.join().expect("the pacer thread panicked");
    }
    outcome.elapsed = outcome
        .last_done
        .map_or(Duration::ZERO, |done| done - schedule.measure_from);
    outcome
}

async fn client_loop(
    index: usize,
    mut client: CryptoClient,
    workload: Arc<Workload>,
    schedule: Arc<Schedule>,
) -> Outcome {
    // Seeded per client: the same tenant sequence for every target.
    let mut rng = StdRng::seed_from_u64(index as u64 + 1);
    let mut cursor = index;
    let mut outcome = Outcome::new();
    while let Some(slot) = schedule.next().await {
        let tenant = workload.picker.pick(&mut rng);
        let result = call(&mut client, &workload, tenant, &mut cursor).await;
        if !slot.record {
            continue;
        }
        let done = Instant::now();
        outcome.last_done = outcome.last_done.max(Some(done));
        match result {
            Ok(()) => {
                outcome.calls += 1;
                outcome.items += workload.batch as u64;
                let micros = u64::try_from((done - slot.due).as_micros()).unwrap_or(u64::MAX);
                outcome.latency.saturating_record(micros.max(1));
            }
            Err(failures) => {
                for code in failures {
                    *outcome.errors.entry(code).or_default() += 1;
                }
            }
        }
    }
    outcome
}

/// Why a call failed: one code per failure (a whole call, or each item).
type Failures = Vec<&'static str>;

fn rpc_failed(status: Status) -> Failures {
    vec![code_name(status.code())]
}

fn item_failed(code: i32) -> &'static str {
    code_name(Code::from_i32(code))
}

fn bad_unless(ok: bool) -> Result<(), Failures> {
    if ok { Ok(()) } else { Err(vec![BAD_RESPONSE]) }
}

/// Collects per-item failures; `ok` says whether an item's answer is right.
fn items_ok<T>(
    answers: Vec<T>,
    expected: usize,
    item: impl Fn(T) -> Result<bool, i32>,
) -> Result<(), Failures> {
    bad_unless(answers.len() == expected)?;
    let failures: Failures = answers
        .into_iter()
        .filter_map(|answer| match item(answer) {
            Ok(true) => None,
            Ok(false) => Some(BAD_RESPONSE),
            Err(code) => Some(item_failed(code)),
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

/// Bits of the tokens `--op blind-index` asks for.
pub const INDEX_BITS: u32 = 32;

/// The one value of a blind-index call: the payload.
fn index_values(w: &Workload) -> Vec<pb::IndexValue> {
    vec![pb::IndexValue {
        value: w.plaintext.clone(),
        transformations: vec![],
    }]
}

/// One call of the workload for `tenant`.
async fn call(
    client: &mut CryptoClient,
    w: &Workload,
    tenant: usize,
    cursor: &mut usize,
) -> Result<(), Failures> {
    let tenant_id = w.tenant_ids[tenant].clone();
    let sealed_len = w.plaintext.len()
        + if w.deterministic {
            DETERMINISTIC_TENANT_OVERHEAD
        } else {
            TENANT_OVERHEAD
        };
    let token_len = blind::token_len(INDEX_BITS);
    let mut next_ciphertext = || {
        let pool = &w.pool[tenant];
        *cursor = cursor.wrapping_add(1);
        pool[*cursor % pool.len()].clone()
    };
    match (w.op, w.batch) {
        (Op::Encrypt, 1) => {
            let request = pb::EncryptRequest {
                tenant_id,
                subject_id: String::new(),
                context: w.context.clone(),
                plaintext: w.plaintext.clone(),
                deterministic: w.deterministic,
                key_version: 0,
            };
            let answer = client.encrypt(request).await.map_err(rpc_failed)?;
            bad_unless(answer.get_ref().ciphertext.len() == sealed_len)
        }
        (Op::Encrypt, n) => {
            let items = (0..n)
                .map(|_| pb::EncryptItem {
                    subject_id: String::new(),
                    context: w.context.clone(),
                    plaintext: w.plaintext.clone(),
                    deterministic: w.deterministic,
                    key_version: 0,
                })
                .collect();
            let answer = client
                .encrypt_batch(pb::EncryptBatchRequest { tenant_id, items })
                .await
                .map_err(rpc_failed)?;
            items_ok(answer.into_inner().results, n, |r| match r.result {
                Some(pb::encrypt_result::Result::Ok(ok)) => Ok(ok.ciphertext.len() == sealed_len),
                Some(pb::encrypt_result::Result::Error(e)) => Err(e.code),
                None => Ok(false),
            })
        }
        (Op::BlindIndex, 1) => {
            let request = pb::BlindIndexRequest {
                tenant_id,
                context: w.context.clone(),
                values: index_values(w),
                bits: INDEX_BITS,
                key_version: 0,
                all_versions: false,
            };
            let answer = client.blind_index(request).await.map_err(rpc_failed)?;
            bad_unless(answer.get_ref().tokens.first().map(Vec::len) == Some(token_len))
        }
        (Op::BlindIndex, n) => {
            let items = (0..n)
                .map(|_| pb::BlindIndexItem {
                    context: w.context.clone(),
                    values: index_values(w),
                    bits: INDEX_BITS,
                    key_version: 0,
                    all_versions: false,
                })
                .collect();
            let answer = client
                .blind_index_batch(pb::BlindIndexBatchRequest { tenant_id, items })
                .await
                .map_err(rpc_failed)?;
            items_ok(answer.into_inner().results, n, |r| match r.result {
                Some(pb::blind_index_result::Result::Ok(ok)) => {
                    Ok(ok.tokens.first().map(Vec::len) == Some(token_len))
                }
                Some(pb::blind_index_result::Result::Error(e)) => Err(e.code),
                None => Ok(false),
            })
        }
        (Op::Decrypt, 1) => {
            let request = pb::DecryptRequest {
                tenant_id,
                context: w.context.clone(),
                ciphertext: next_ciphertext(),
            };
            let answer = client.decrypt(request).await.map_err(rpc_failed)?;
            bad_unless(answer.get_ref().plaintext == w.plaintext)
        }
        (Op::GenerateDataKey, _) => {
            let request = pb::GenerateDataKeyRequest {
                tenant_id,
                subject_id: String::new(),
                context: w.context.clone(),
            };
            let answer = client
                .generate_data_key(request)
                .await
                .map_err(rpc_failed)?;
            let answer = answer.get_ref();
            bad_unless(
                answer.data_key.len() == DATA_KEY_LEN
                    && answer.wrapped_data_key.len() == WRAPPED_DATA_KEY_LEN,
            )
        }
        (Op::Decrypt, n) => {
            let items = (0..n)
                .map(|_| pb::DecryptItem {
                    context: w.context.clone(),
                    ciphertext: next_ciphertext(),
                })
                .collect();
            let answer = client
                .decrypt_batch(pb::DecryptBatchRequest { tenant_id, items })
                .await
                .map_err(rpc_failed)?;
            items_ok(answer.into_inner().results, n, |r| match r.result {
                Some(pb::decrypt_result::Result::Ok(ok)) => Ok(ok.plaintext == w.plaintext),
                Some(pb::decrypt_result::Result::Error(e)) => Err(e.code),
                None => Ok(false),
            })
        }
    }
}
