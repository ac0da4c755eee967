//! `keywarden-bench flood`: the memory attack of the review at df0a846,
//! measured. N senders each send 16 MiB `EncryptBatch` requests over their
//! own connection, as fast as they are answered, anonymously or with the
//! token of the global options, while one legitimate caller (that token)
//! makes 128-byte Encrypt calls; the sidecar's resident memory is sampled
//! from /proc every 20 ms. docs/SECURITY.md 12.2 has the figures.
//!
//! The requests are built on the wire, not as messages: a batch of 8
//! million empty items is 16 MiB encoded but about 1 GB as prost structs,
//! in the load generator as it would be in a server that decoded it.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, Bytes};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

use crate::{SidecarAddr, startup};
use keywarden::{
    api::{pb, status::code_name},
    client::{self, Bearer},
};

#[derive(Args, Debug, Clone)]
pub struct FloodArgs {
    /// The sidecar's process id: its memory is sampled.
    #[arg(long)]
    pub pid: u32,
    /// Senders, each on its own HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    pub senders: u32,
    /// Bytes of each request message.
    #[arg(long, default_value_t = 16 << 20)]
    pub size: usize,
    /// Who the senders are: no credential, or the token of the global
    /// options.
    #[arg(long, value_enum, default_value_t = Sender::Anonymous)]
    pub sender: Sender,
    /// What a request holds: empty items (2 bytes each on the wire), or
    /// 10,000 items sharing the size (what a batch limit lets through).
    #[arg(long, value_enum, default_value_t = Items::Empty)]
    pub items: Items,
    /// The tenant of every call (created if missing).
    #[arg(long, default_value = "bench-flood")]
    pub tenant: String,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sender {
    Anonymous,
    Token,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Items {
    Empty,
    Full,
}

#[derive(Debug, Serialize)]
pub struct FloodReport {
    pub senders: u32,
    pub sender: Sender,
    pub items: Items,
    pub request_bytes: usize,
    pub seconds: f64,
    /// The sidecar's resident memory before the flood, and the most seen
    /// while it ran (sampled every 20 ms), in MiB.
    pub idle_rss_mib: f64,
    pub peak_rss_mib: f64,
    pub peak_above_idle_mib: f64,
    /// Flood calls answered, by gRPC code.
    pub flood_outcomes: Vec<(String, u64)>,
    /// The legitimate caller's 128-byte Encrypts meanwhile.
    pub caller_calls: u64,
    pub caller_errors: u64,
    pub caller_p50_ms: f64,
    pub caller_p99_ms: f64,
    pub caller_max_ms: f64,
}

/// A codec that sends bytes as they are and keeps the answer's bytes.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// An EncryptBatchRequest of about `size` bytes, encoded.
fn request(tenant: &str, size: usize, items: Items) -> Bytes {
    match items {
        Items::Empty => {
            let mut wire = Vec::with_capacity(size + 256);
            prost::Message::encode(
                &pb::EncryptBatchRequest {
                    tenant_id: tenant.into(),
                    items: Vec::new(),
                },
                &mut wire,
            )
            .expect("a Vec grows");
            while wire.len() + 2 <= size {
                // Field 2 (items), length-delimited, length 0.
                wire.extend_from_slice(&[0x12, 0x00]);
            }
            wire.into()
        }
        Items::Full => {
            let per_item = (size / 10_000).saturating_sub(16).max(1);
            prost::Message::encode_to_vec(&pb::EncryptBatchRequest {
                tenant_id: tenant.into(),
                items: (0..10_000)
                    .map(|_| pb::EncryptItem {
                        plaintext: vec![0x5a; per_item],
                        ..Default::default()
                    })
                    .collect(),
            })
            .into()
        }
    }
}

fn rss_mib(pid: u32) -> Result<f64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the memory of process {pid}: {e}"))?;
    let memory = startup::parse_status(&status).ok_or("no VmRSS in /proc/PID/status")?;
    Ok(memory.rss_kib as f64 / 1024.0)
}

pub async fn run(args: FloodArgs, sidecar: SidecarAddr) -> Result<FloodReport, String> {
    let connect = || client::connect(&sidecar.addr, sidecar.tls.as_ref());
    let caller = connect().await?;
    crate::setup_tenants(
        client::admin(caller.clone(), sidecar.bearer.clone()),
        std::slice::from_ref(&args.tenant),
        1,
    )
    .await?;
    let idle = rss_mib(args.pid)?;
    let body = request(&args.tenant, args.size, args.items);
    let request_bytes = body.len();
    let deadline = Instant::now() + args.duration;
    let peak = Arc::new(Mutex::new(idle));
    let sampler = {
        let (peak, pid) = (peak.clone(), args.pid);
        tokio::spawn(async move {
            while Instant::now() < deadline {
                if let Ok(now) = rss_mib(pid) {
                    let mut peak = peak.lock().unwrap_or_else(|p| p.into_inner());
                    *peak = peak.max(now);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let outcomes = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..args.senders {
        let channel = connect().await?;
        let bearer = match args.sender {
            Sender::Anonymous => Bearer::default(),
            Sender::Token => sidecar.bearer.clone(),
        };
        let (body, outcomes) = (body.clone(), outcomes.clone());
        senders.spawn(async move {
            while Instant::now() < deadline {
                let code = match send(channel.clone(), &bearer, body.clone()).await {
                    Ok(()) => Code::Ok,
                    Err(status) => status.code(),
                };
                *outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(code_name(code).to_owned())
                    .or_default() += 1;
            }
        });
    }
    let mut crypto = client::crypto(caller, sidecar.bearer.clone());
    let mut latencies = Vec::new();
    let mut errors = 0;
    let started = Instant::now();
    while Instant::now() < deadline {
        let call = Instant::now();
        let answer = crypto
            .encrypt(pb::EncryptRequest {
                tenant_id: args.tenant.clone(),
                plaintext: vec![0x5a; 128],
                ..Default::default()
            })
            .await;
        latencies.push(call.elapsed());
        if answer.is_err() {
            errors += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    while senders.join_next().await.is_some() {}
    let _ = sampler.await;
    latencies.sort();
    let at = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let peak = *peak.lock().unwrap_or_else(|p| p.into_inner());
    Ok(FloodReport {
        senders: args.senders,
        sender: args.sender,
        items: args.items,
        request_bytes,
        seconds,
        idle_rss_mib: idle,
        peak_rss_mib: peak,
        peak_above_idle_mib: peak - idle,
        flood_outcomes: outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        caller_calls: latencies.len() as u64,
        caller_errors: errors,
        caller_p50_ms: at(0.50),
        caller_p99_ms: at(0.99),
        caller_max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    })
}

/// One flood call: the encoded request through the raw codec.
async fn send(channel: Channel, bearer: &Bearer, body: Bytes) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(body);
    let head = tonic::service::Interceptor::call(&mut bearer.clone(), tonic::Request::new(()))?;
    *request.metadata_mut() = head.metadata().clone();
    let path = http::uri::PathAndQuery::from_static("/keywarden.v1.Crypto/EncryptBatch");
    grpc.unary(request, path, Raw).await.map(drop)
}

impl FloodReport {
    pub fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(self).expect("a report serializes")
            );
            return;
        }
        println!(
            "flood: {} {:?} senders, {:?} items, {} B per request, {:.1} s",
            self.senders, self.sender, self.items, self.request_bytes, self.seconds
        );
        println!(
            "sidecar RSS: idle {:.1} MiB, peak {:.1} MiB (+{:.1} MiB)",
            self.idle_rss_mib, self.peak_rss_mib, self.peak_above_idle_mib
        );
        println!("flood outcomes: {:?}", self.flood_outcomes);
        println!(
            "legitimate caller: {} calls, {} errors, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.caller_calls,
            self.caller_errors,
            self.caller_p50_ms,
            self.caller_p99_ms,
            self.caller_max_ms
        );
    }
}
