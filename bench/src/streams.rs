//! `keywarden-bench stream`: one large object through EncryptStream and back
//! through DecryptStream, for throughput and the sidecar's peak memory.
//!
//! The object is generated as it is sent and hashed as it comes back; the
//! envelope in between is kept in the load generator's memory, as the
//! response chunks it arrived in, which are then sent back as they are. The
//! decrypted object's SHA-256 must equal the original's, or the run fails.
//! With `--pid` the sidecar's VmHWM (peak resident memory) is read before
//! and after, from /proc.

use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{SidecarAddr, bench_context, startup};
use keywarden::{
    api::pb::{self, decrypt_stream_request, encrypt_stream_request},
    client,
};

#[derive(Args, Debug, Clone)]
pub struct StreamArgs {
    /// Object size in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    pub size: u64,
    /// Bytes per request message.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk: usize,
    /// The tenant (created if missing).
    #[arg(long, default_value = "bench-stream")]
    pub tenant: String,
    /// The sidecar's process id, to read its peak resident memory.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub object_bytes: u64,
    pub envelope_bytes: u64,
    pub chunk_bytes: usize,
    pub encrypt_seconds: f64,
    pub encrypt_mb_per_second: f64,
    pub decrypt_seconds: f64,
    pub decrypt_mb_per_second: f64,
    /// The sidecar's memory before the run and after it (VmHWM: its peak).
    pub sidecar_before: Option<startup::Memory>,
    pub sidecar_after: Option<startup::Memory>,
}

/// The object's bytes from `offset`: a fixed pattern, cheap to make.
fn fill(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let n = offset + i as u64;
        *b = (n ^ (n >> 11)) as u8;
    }
}

fn memory(pid: Option<u32>) -> Result<Option<startup::Memory>, String> {
    pid.map(|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("cannot read the memory of process {pid}: {e}"))?;
        startup::parse_status(&status).ok_or_else(|| format!("no VmRSS/VmHWM for process {pid}"))
    })
    .transpose()
}

fn mb_per_second(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

pub async fn run(args: StreamArgs, sidecar: SidecarAddr) -> Result<StreamReport, String> {
    if args.chunk == 0 {
        return Err("--chunk must be at least 1 byte".into());
    }
    let channel = client::connect(&sidecar.addr, sidecar.tls.as_ref()).await?;
    let admin = client::admin(channel.clone(), sidecar.bearer.clone());
    crate::setup_tenants(admin, std::slice::from_ref(&args.tenant), 1).await?;
    let mut crypto = client::crypto(channel, sidecar.bearer.clone());
    let before = memory(args.pid)?;
    let failed = |what: &str, status: tonic::Status| {
        format!("{what}: {}: {}", status.code(), status.message())
    };

    // Encrypt: the object generated chunk by chunk.
    let (size, chunk) = (args.size, args.chunk as u64);
    let start = pb::EncryptStreamRequest {
        part: Some(encrypt_stream_request::Part::Start(
            pb::EncryptStreamStart {
                tenant_id: args.tenant.clone(),
                subject_id: String::new(),
                context: bench_context(),
            },
        )),
    };
    let requests = futures::stream::iter(std::iter::once(start).chain(
        (0..size.div_ceil(chunk)).map(move |i| {
            let mut buf = vec![0u8; chunk.min(size - i * chunk) as usize];
            fill(&mut buf, i * chunk);
            pb::EncryptStreamRequest {
                part: Some(encrypt_stream_request::Part::Chunk(buf)),
            }
        }),
    ));
    let started = Instant::now();
    let mut responses = crypto
        .encrypt_stream(requests)
        .await
        .map_err(|s| failed("EncryptStream", s))?
        .into_inner();
    let mut envelope = Vec::new();
    while let Some(response) = responses.next().await {
        envelope.push(response.map_err(|s| failed("EncryptStream", s))?.chunk);
    }
    let encrypt_elapsed = started.elapsed();
    let envelope_bytes = envelope.iter().map(|c| c.len() as u64).sum();

    // Decrypt: the envelope in the chunks it came in, the plaintext hashed.
    let start = pb::DecryptStreamRequest {
        part: Some(decrypt_stream_request::Part::Start(
            pb::DecryptStreamStart {
                tenant_id: args.tenant.clone(),
                context: bench_context(),
            },
        )),
    };
    let requests = futures::stream::iter(std::iter::once(start).chain(envelope.into_iter().map(
        |chunk| pb::DecryptStreamRequest {
            part: Some(decrypt_stream_request::Part::Chunk(chunk)),
        },
    )));
    let started = Instant::now();
    let mut responses = crypto
        .decrypt_stream(requests)
        .await
        .map_err(|s| failed("DecryptStream", s))?
        .into_inner();
    let mut decrypted = Sha256::new();
    let mut decrypted_bytes = 0u64;
    while let Some(response) = responses.next().await {
        let response = response.map_err(|s| failed("DecryptStream", s))?;
        decrypted_bytes += response.chunk.len() as u64;
        decrypted.update(&response.chunk);
    }
    let decrypt_elapsed = started.elapsed();
    let mut original = Sha256::new();
    let mut buf = vec![0u8; args.chunk];
    for offset in (0..size).step_by(args.chunk) {
        let len = chunk.min(size - offset) as usize;
        fill(&mut buf[..len], offset);
        original.update(&buf[..len]);
    }
    if decrypted_bytes != size || decrypted.finalize() != original.finalize() {
        return Err(format!(
            "the object did not come back: {decrypted_bytes} of {size} bytes, or other bytes"
        ));
    }
    Ok(StreamReport {
        object_bytes: size,
        envelope_bytes,
        chunk_bytes: args.chunk,
        encrypt_seconds: encrypt_elapsed.as_secs_f64(),
        encrypt_mb_per_second: mb_per_second(size, encrypt_elapsed),
        decrypt_seconds: decrypt_elapsed.as_secs_f64(),
        decrypt_mb_per_second: mb_per_second(size, decrypt_elapsed),
        sidecar_before: before,
        sidecar_after: memory(args.pid)?,
    })
}

impl StreamReport {
    pub fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(self).expect("a report serializes")
            );
            return;
        }
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "object {} bytes in chunks of {}; envelope {} bytes",
            self.object_bytes, self.chunk_bytes, self.envelope_bytes
        );
        println!(
            "EncryptStream {:.1} MB/s ({:.2} s); DecryptStream {:.1} MB/s ({:.2} s)",
            self.encrypt_mb_per_second,
            self.encrypt_seconds,
            self.decrypt_mb_per_second,
            self.decrypt_seconds
        );
        if let (Some(before), Some(after)) = (self.sidecar_before, self.sidecar_after) {
            println!(
                "sidecar VmRSS {:.1} MiB before, {:.1} MiB after; peak (VmHWM) {:.1} MiB before, {:.1} MiB after",
                mib(before.rss_kib),
                mib(after.rss_kib),
                mib(before.hwm_kib),
                mib(after.hwm_kib)
            );
        }
    }
}
