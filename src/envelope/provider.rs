//! The crypto provider seam: which implementation of AES-256-GCM seals and
//! opens envelopes. The format does not depend on it: every provider produces
//! and accepts the same envelopes (tests/vectors.rs runs one set of vectors
//! against each, and the envelope tests open with each what the other sealed).
//!
//! - [`Provider::RustCrypto`], the portable default: the `aes-gcm` crate.
//! - [`Provider::AwsLc`]: AWS-LC through `aws-lc-rs`. Its AES-GCM uses VAES and
//!   VPCLMULQDQ where the CPU has them: about six times RustCrypto's speed on
//!   large messages here (BENCHMARKS.md). Built with the `fips` cargo feature
//!   it is AWS-LC's FIPS 140-3 module, and the only provider allowed.
//!
//! Why a run-time setting (`crypto.provider`) instead of a cargo feature per
//! provider: aws-lc-rs is linked into every build already (rustls, JWT
//! signatures, erasure receipts), so a feature would not make a build any
//! more portable; a setting lets one binary be measured with both and
//! switched without a rebuild.
//!
//! Salts and nonces come from [`fill_random`]: `rand`'s thread-local ChaCha12
//! generator, seeded and periodically reseeded from the operating system
//! (a fraction of the cost of a `getrandom` system call per message, or of
//! AWS-LC's `RAND_bytes`, which makes one: BENCHMARKS.md, "The envelope,
//! in-process"), except in a FIPS build, where they come from the module's
//! DRBG.
//!
//! The per-message key derivation (AES-256-CMAC, [`super::kdf`]) is not part of
//! the seam: it runs on RustCrypto's `aes` whichever provider seals.

use std::{fmt, str::FromStr};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce, Tag,
    aead::{AeadInPlace, generic_array::GenericArray},
};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, UnboundKey};
use rand::RngCore;

use super::{NONCE_LEN, SealError, TAG_LEN, Undecryptable};

/// An implementation of AES-256-GCM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
pub enum Provider {
    /// RustCrypto `aes-gcm`.
    #[serde(rename = "rustcrypto")]
    RustCrypto,
    /// AWS-LC (`aws-lc-rs`).
    #[serde(rename = "aws-lc")]
    AwsLc,
}

impl Provider {
    /// Every provider this build has, for tests that must hold for each.
    pub const ALL: [Provider; 2] = [Provider::RustCrypto, Provider::AwsLc];

    /// The setting's value for this provider.
    pub fn name(self) -> &'static str {
        match self {
            Provider::RustCrypto => "rustcrypto",
            Provider::AwsLc => "aws-lc",
        }
    }

    /// The default: RustCrypto, except in a FIPS build.
    pub const fn default_for_build() -> Self {
        if cfg!(feature = "fips") {
            Provider::AwsLc
        } else {
            Provider::RustCrypto
        }
    }

    /// Whether this build may use the provider: a FIPS build allows only
    /// the validated module.
    pub fn allowed(self) -> bool {
        !cfg!(feature = "fips") || self == Provider::AwsLc
    }

    /// Prepares AES-256-GCM with `key` (the key schedule and the GHASH key).
    pub fn aead(self, key: &[u8; 32]) -> AeadKey {
        match self {
            Provider::RustCrypto => {
                AeadKey::RustCrypto(Box::new(Aes256Gcm::new(GenericArray::from_slice(key))))
            }
            Provider::AwsLc => AeadKey::AwsLc(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key).expect("AES-256-GCM takes a 32-byte key"),
            )),
        }
    }
}

/// Fills `out` with cryptographically secure random bytes for salts and
/// nonces (see the module's documentation for which generator).
pub fn fill_random(out: &mut [u8]) -> Result<(), SealError> {
    if cfg!(feature = "fips") {
        aws_lc_rs::rand::fill(out).map_err(|_| SealError::Random)
    } else {
        rand::thread_rng()
            .try_fill_bytes(out)
            .map_err(|_| SealError::Random)
    }
}

impl Default for Provider {
    fn default() -> Self {
        Self::default_for_build()
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rustcrypto" => Ok(Provider::RustCrypto),
            "aws-lc" => Ok(Provider::AwsLc),
            other => Err(format!(
                "unknown crypto provider {other:?}; expected \"rustcrypto\" or \"aws-lc\""
            )),
        }
    }
}

/// AES-256-GCM ready to seal and open under one key. Both implementations
/// erase their key schedules when dropped (`aes-gcm`'s `zeroize` feature;
/// AWS-LC cleanses its context).
pub enum AeadKey {
    // Boxed: the RustCrypto key schedule is about a kilobyte, and this value
    // moves through the sealing code.
    RustCrypto(Box<Aes256Gcm>),
    AwsLc(LessSafeKey),
}

impl AeadKey {
    /// Encrypts `in_out` in place; answers the tag.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], SealError> {
        match self {
            AeadKey::RustCrypto(cipher) => cipher
                .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, in_out)
                .map(Into::into)
                .map_err(|_| SealError::TooLong),
            AeadKey::AwsLc(key) => {
                let tag = key
                    .seal_in_place_separate_tag(
                        aws_lc_rs::aead::Nonce::assume_unique_for_key(*nonce),
                        Aad::from(aad),
                        in_out,
                    )
                    .map_err(|_| SealError::TooLong)?;
                let mut out = [0u8; TAG_LEN];
                out.copy_from_slice(tag.as_ref());
                Ok(out)
            }
        }
    }

    /// Authenticates and decrypts `in_out` in place. On failure `in_out`
    /// holds no plaintext: RustCrypto decrypts only after the tag checks,
    /// and AWS-LC's output is overwritten here.
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Undecryptable> {
        match self {
            AeadKey::RustCrypto(cipher) => cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(nonce),
                    aad,
                    in_out,
                    Tag::from_slice(tag),
                )
                .map_err(|_| Undecryptable),
            AeadKey::AwsLc(key) => {
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(*nonce);
                key.open_in_place_separate_tag(nonce, Aad::from(aad), tag, in_out)
                    .map(|_| ())
                    .map_err(|_| {
                        in_out.fill(0);
                        Undecryptable
                    })
            }
        }
    }
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AeadKey([REDACTED])")
    }
}
