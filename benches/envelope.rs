//! The envelope's own cost beside the crypto limit: sealing and opening
//! kw1 envelopes of 16 B to 1 MiB, and the raw AES-256-GCM seal of the same
//! sizes with a fixed key and a counter nonce (no key derivation, no random
//! salt and nonce, no associated data) — what the envelope cannot beat.
//!
//! The `deterministic` group does the same for the deterministic envelope
//! (suite 0x04, AES-256-SIV, its key derived per call as the sidecar does).
//!
//! `cargo bench --bench envelope`; throughput is reported per size.

use std::hint::black_box;

use aes_gcm::{Aes256Gcm, KeyInit, Nonce, aead::AeadInPlace};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keywarden::{
    envelope::{self, Context, EnvelopeKey, KeyRef, MessageKeyDeriver, Provider},
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
    let raw = Aes256Gcm::new_from_slice(key.expose()).unwrap();
    let context = context();
    let mut group = c.benchmark_group("seal");
    for size in SIZES {
        let plaintext = vec![0x5a; size];
        group.throughput(Throughput::Bytes(size as u64));
        for provider in Provider::ALL {
            let key = EnvelopeKey::new(provider, &key);
            let name = format!("envelope_{provider}");
            group.bench_with_input(BenchmarkId::new(name, size), &plaintext, |b, p| {
                b.iter(|| {
                    envelope::seal(
                        &key,
                        KeyRef::Tenant { version: 1 },
                        "acme",
                        &context,
                        black_box(p),
                    )
                    .unwrap()
                });
            });
        }
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
    let deriver = EnvelopeKey::new(Provider::RustCrypto, &key);
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

/// The deterministic envelope: seal and open (one implementation for both
/// providers), and its key derivation alone.
fn deterministic(c: &mut Criterion) {
    let key = Key256::generate().unwrap();
    let sealing = EnvelopeKey::new(Provider::RustCrypto, &key);
    let context = context();
    let mut group = c.benchmark_group("deterministic");
    for size in &SIZES[..4] {
        let plaintext = vec![0x5a; *size];
        group.throughput(Throughput::Bytes(*size as u64));
        group.bench_with_input(BenchmarkId::new("seal", size), &plaintext, |b, p| {
            b.iter(|| {
                envelope::seal_deterministic(
                    &sealing,
                    KeyRef::Tenant { version: 1 },
                    "acme",
                    &context,
                    black_box(p),
                )
                .unwrap()
            });
        });
        let sealed = envelope::seal_deterministic(
            &sealing,
            KeyRef::Tenant { version: 1 },
            "acme",
            &context,
            &plaintext,
        )
        .unwrap();
        group.bench_with_input(BenchmarkId::new("open", size), &sealed, |b, s| {
            b.iter(|| {
                let parsed = envelope::parse(black_box(s)).unwrap();
                envelope::open(&sealing, &parsed, "acme", &context).unwrap()
            });
        });
    }
    let deriver = MessageKeyDeriver::new(&key);
    group.bench_function("siv_key_derive", |b| {
        b.iter(|| deriver.derive_512(b"kw1.siv", black_box(&[0; 16])))
    });
    group.finish();
}

criterion_group!(benches, seal, open, parts, deterministic);
criterion_main!(benches);

fn parts(c: &mut Criterion) {
    use rand::RngCore;
    let key = Key256::generate().unwrap();
    let deriver = MessageKeyDeriver::new(&key);
    let mut group = c.benchmark_group("parts");
    group.bench_function("getrandom_28", |b| {
        b.iter(|| {
            let mut r = [0u8; 28];
            getrandom::fill(&mut r).unwrap();
            r
        })
    });
    group.bench_function("thread_rng_28", |b| {
        b.iter(|| {
            let mut r = [0u8; 28];
            rand::thread_rng().fill_bytes(&mut r);
            r
        })
    });
    group.bench_function("awslc_rand_28", |b| {
        b.iter(|| {
            let mut r = [0u8; 28];
            aws_lc_rs::rand::fill(&mut r).unwrap();
            r
        })
    });
    let salt = [7u8; 16];
    group.bench_function("kdf_derive", |b| {
        b.iter(|| deriver.derive(black_box(&salt)))
    });
    group.bench_function("rustcrypto_gcm_new", |b| {
        b.iter(|| Aes256Gcm::new_from_slice(black_box(key.expose())).unwrap())
    });
    group.bench_function("aes256enc_new", |b| {
        b.iter(|| {
            <aes::Aes256Enc as aes_gcm::KeyInit>::new_from_slice(black_box(key.expose())).unwrap()
        })
    });
    group.bench_function("aesgcm_enc_only_new", |b| {
        b.iter(|| {
            <aes_gcm::AesGcm<aes::Aes256Enc, aes_gcm::aead::consts::U12> as KeyInit>::new_from_slice(
                black_box(key.expose()),
            )
            .unwrap()
        })
    });
    group.bench_function("awslc_gcm_new", |b| {
        b.iter(|| {
            aws_lc_rs::aead::LessSafeKey::new(
                aws_lc_rs::aead::UnboundKey::new(
                    &aws_lc_rs::aead::AES_256_GCM,
                    black_box(key.expose()),
                )
                .unwrap(),
            )
        })
    });
    let ctx = context();
    group.bench_function("aad", |b| {
        b.iter(|| envelope::associated_data(black_box(&[1u8; 35]), "acme", &ctx))
    });
    let awslc = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key.expose()).unwrap(),
    );
    for size in SIZES {
        let plaintext = vec![0x5a; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(
            BenchmarkId::new("awslc_raw_seal", size),
            &plaintext,
            |b, p| {
                b.iter(|| {
                    let mut buffer = Vec::with_capacity(p.len() + 16);
                    buffer.extend_from_slice(black_box(p));
                    let tag = awslc
                        .seal_in_place_separate_tag(
                            aws_lc_rs::aead::Nonce::assume_unique_for_key([1; 12]),
                            aws_lc_rs::aead::Aad::empty(),
                            &mut buffer,
                        )
                        .unwrap();
                    buffer.extend_from_slice(tag.as_ref());
                    buffer
                })
            },
        );
    }
    group.finish();
}
