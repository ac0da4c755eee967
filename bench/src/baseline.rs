//! The crypto limits, measured in the load generator's own process in the
//! same run as the sidecar: on one thread, for the run's payload size,
//!
//! - the envelope's seal loop (`envelope::seal` of the same plaintext, tenant
//!   and context as the run's items, one fresh salt and nonce per item), with
//!   each crypto provider; for a `--deterministic` run,
//!   `envelope::seal_deterministic` instead (AES-256-SIV, the same code for
//!   both providers, its SIV key derived per item as the sidecar does);
//! - the raw AES-256-GCM seal of the same plaintext with a fixed key and a
//!   counter nonce, no key derivation and no associated data, with each
//!   provider: the fastest of these is "the fastest AES-256-GCM here";
//! - for `--op blind-index`, the token loop instead: `envelope::blind::token`
//!   of the payload as one value, 32 bits, the run's tenant and context.

use std::time::{Duration, Instant};

use serde::Serialize;

use keywarden::{
    envelope::{self, Context, EnvelopeKey, KeyRef, Mode, NONCE_LEN, Provider, blind},
    secret::Key256,
};

/// One in-process measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// e.g. `envelope seal (aws-lc)`, `raw AES-256-GCM (rustcrypto)`.
    pub name: String,
    pub items_per_second: f64,
    pub plaintext_mb_per_second: f64,
}

/// Runs `op` repeatedly for about `length`; answers how many runs per second.
fn rate(length: Duration, mut op: impl FnMut()) -> f64 {
    // Warm caches and branch predictors first.
    let warm = Instant::now();
    while warm.elapsed() < length / 10 {
        op();
    }
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < length {
        for _ in 0..16 {
            op();
        }
        runs += 16;
    }
    runs as f64 / started.elapsed().as_secs_f64()
}

/// Measures every baseline for `plaintext`, each for about `length`.
pub fn measure(
    plaintext: &[u8],
    tenant: &str,
    context: &Context,
    deterministic: bool,
    length: Duration,
) -> Vec<Baseline> {
    let key = Key256::generate().expect("the OS random number generator works");
    let mut baselines = Vec::new();
    let mut push = |name: String, per_second: f64| {
        baselines.push(Baseline {
            name,
            items_per_second: per_second,
            plaintext_mb_per_second: per_second * plaintext.len() as f64 / 1e6,
        });
    };
    for provider in Provider::ALL {
        let sealing = EnvelopeKey::new(provider, &key);
        let mode = if deterministic {
            Mode::Deterministic
        } else {
            Mode::Randomized
        };
        let per_second = rate(length, || {
            let sealed = envelope::seal_mode(
                mode,
                &sealing,
                KeyRef::Tenant { version: 1 },
                tenant,
                context,
                std::hint::black_box(plaintext),
            )
            .expect("sealing a benchmark item works");
            std::hint::black_box(sealed);
        });
        let kind = if deterministic { " deterministic" } else { "" };
        push(format!("envelope seal{kind} ({provider})"), per_second);
    }
    for provider in Provider::ALL {
        let aead = provider.aead(key.expose());
        let mut counter = 0u64;
        let per_second = rate(length, || {
            counter += 1;
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..8].copy_from_slice(&counter.to_be_bytes());
            let mut buffer = Vec::with_capacity(plaintext.len() + envelope::TAG_LEN);
            buffer.extend_from_slice(std::hint::black_box(plaintext));
            let tag = aead
                .seal_in_place(&nonce, b"", &mut buffer)
                .expect("sealing a benchmark item works");
            buffer.extend_from_slice(&tag);
            std::hint::black_box(buffer);
        });
        push(format!("raw AES-256-GCM ({provider})"), per_second);
    }
    baselines
}

/// The blind-index token loop for `value`, for about `length`.
pub fn measure_blind_index(
    value: &[u8],
    tenant: &str,
    context: &Context,
    length: Duration,
) -> Vec<Baseline> {
    let key = Key256::generate().expect("the OS random number generator works");
    let per_second = rate(length, || {
        let fields = [blind::Field {
            value: std::hint::black_box(value),
            transformations: &[],
        }];
        let token = blind::token(&key, 1, crate::load::INDEX_BITS, tenant, context, &fields);
        std::hint::black_box(token);
    });
    vec![Baseline {
        name: "blind-index token loop".into(),
        items_per_second: per_second,
        plaintext_mb_per_second: per_second * value.len() as f64 / 1e6,
    }]
}
