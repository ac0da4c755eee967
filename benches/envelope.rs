//! The envelope's own cost beside the crypto limit: sealing and opening
//! kw1 envelopes of 16 B to 1 MiB, and the raw AES-256-GCM seal of the same
//! sizes with a fixed key and a counter nonce (no key derivation, no random
//! salt and nonce, no associated data) — what the envelope cannot beat.
//!
//! `cargo bench --bench envelope`; throughput is reported per size.

use std::hint::black_box;

use aes_gcm::{Aes256Gcm, KeyInit, Nonce, aead::AeadInPlace};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keywarden::{
    envelope::{self, Context, KeyRef, MessageKeyDeriver},
    secret::Key256,
};

const SIZES: [usize; 5] = [16, 128, 1024, 64 * 1024, 1024 * 1024];

fn context() -> Context {
    Context::from([
        ("table".to_owned(), "users".to_owned()),
        ("column".to_owned(), "email".to_owned()),
    ])
}

fn seal(c: &mut Criterion) {
    let key = Key256::generate().unwrap();
    let deriver = MessageKeyDeriver::new(&key);
    let raw = Aes256Gcm::new_from_slice(key.expose()).unwrap();
    let context = context();
    let mut group = c.benchmark_group("seal");
    for size in SIZES {
        let plaintext = vec![0x5a; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("envelope", size), &plaintext, |b, p| {
            b.iter(|| {
                envelope::seal(
                    &deriver,
                    KeyRef::Tenant { version: 1 },
                    "acme",
                    &context,
                    black_box(p),
                )
                .unwrap()
            });
        });
        let mut counter = 0u64;
        group.bench_with_input(BenchmarkId::new("raw_aes_gcm", size), &plaintext, |b, p| {
            b.iter(|| {
                counter += 1;
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&counter.to_le_bytes());
                let mut buffer = Vec::with_capacity(p.len() + 16);
                buffer.extend_from_slice(black_box(p));
                raw.encrypt_in_place(Nonce::from_slice(&nonce), b"", &mut buffer)
                    .unwrap();
                debug_assert_eq!(buffer.len(), p.len() + 16);
                buffer
            });
        });
    }
    group.finish();
}

fn open(c: &mut Criterion) {
    let key = Key256::generate().unwrap();
    let deriver = MessageKeyDeriver::new(&key);
    let context = context();
    let mut group = c.benchmark_group("open");
    for size in SIZES {
        let sealed = envelope::seal(
            &deriver,
            KeyRef::Tenant { version: 1 },
            "acme",
            &context,
            &vec![0x5a; size],
        )
        .unwrap();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("envelope", size), &sealed, |b, s| {
            b.iter(|| {
                let parsed = envelope::parse(black_box(s)).unwrap();
                envelope::open(&deriver, &parsed, "acme", &context).unwrap()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, seal, open);
criterion_main!(benches);
