//! The ciphertext format: seal and open, with a per-message key.
//!
//! Pure functions: no I/O, no async, no knowledge of where keys come from.
//! docs/FORMAT.md is the specification; this module is one implementation of
//! it and tests/reference/ holds another.
//!
//! ```text
//! offset  size  field
//! 0       1     format version          0x01
//! 1       1     algorithm suite         0x01 = AES-256-GCM, per-message key by
//!                                              SP 800-108 counter-mode KDF with AES-256-CMAC
//! 2       1     key reference kind      0x01 = tenant key, 0x02 = subject key
//! 3       4     tenant key version      (kind 0x01), u32 big-endian
//!   or    16+4  subject key id, subject key version (kind 0x02)
//! ..      16    salt                    random; input to the KDF
//! ..      12    nonce                   random; AES-GCM nonce
//! ..      n     ciphertext
//! ..      16    tag
//! ```
//!
//! The header is everything before the ciphertext. The associated data is the
//! header, then the tenant id and the caller's context, encoded canonically
//! (see [`associated_data`]), so a ciphertext moved to another tenant, field or
//! record fails to authenticate.
//!
//! The one-shot reader ([`parse`], [`open`]) also reads suite 0x04, the
//! deterministic envelope ([`deterministic`]): the same key references and
//! associated data, AES-256-SIV instead of a random salt and nonce.

pub mod blind;
pub mod client_stream;
pub mod datakey;
pub mod deterministic;
mod kdf;
pub mod provider;
pub mod stream;
pub mod text;
pub mod wrap;

use std::collections::BTreeMap;

use thiserror::Error;

pub use deterministic::{SUITE_DETERMINISTIC, seal_deterministic};
pub use kdf::MessageKeyDeriver;
pub use provider::Provider;

use crate::secret::Key256;

/// The caller's context map. A `BTreeMap` iterates in byte order of the keys,
/// which is the canonical order of the associated-data encoding.
pub type Context = BTreeMap<String, String>;

/// Format version byte of this layout.
pub const FORMAT_V1: u8 = 0x01;
/// AES-256-GCM with a per-message key from SP 800-108 counter mode, AES-256-CMAC.
pub const SUITE_AES256GCM_CMAC_KDF: u8 = 0x01;
const KIND_TENANT: u8 = 0x01;
const KIND_SUBJECT: u8 = 0x02;

/// Bytes of random salt per message (the KDF's context input).
pub const SALT_LEN: usize = 16;
/// Bytes of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes of a subject key id.
pub const SUBJECT_KEY_ID_LEN: usize = 16;
/// Overhead of a tenant-key ciphertext over its plaintext.
pub const TENANT_OVERHEAD: usize = 3 + 4 + SALT_LEN + NONCE_LEN + TAG_LEN;
/// Overhead of a subject-key ciphertext over its plaintext.
pub const SUBJECT_OVERHEAD: usize = 3 + SUBJECT_KEY_ID_LEN + 4 + SALT_LEN + NONCE_LEN + TAG_LEN;

/// Which key a ciphertext was sealed under. Never a tenant id or subject id:
/// a subject key id is a keyed hash that only the tenant's index key can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyRef {
    /// A version of the tenant key.
    Tenant { version: u32 },
    /// A data subject's key.
    Subject {
        id: [u8; SUBJECT_KEY_ID_LEN],
        version: u32,
    },
}

/// A ciphertext that fails to parse or to authenticate, for any reason. It
/// carries nothing, so every such failure reads the same to the caller.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("ciphertext does not authenticate")]
pub struct Undecryptable;

/// Sealing failed before any ciphertext existed.
#[derive(Debug, Error)]
pub enum SealError {
    /// The operating system's random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// The plaintext is longer than AES-GCM can seal in one message.
    #[error("plaintext too long for one message")]
    TooLong,
    /// A client stream's header must carry a wrapped data key (suite 0x05).
    #[error("not a wrapped data key")]
    NotAWrappedDataKey,
}

/// How a one-shot envelope is sealed: its suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Suite 0x01: a random salt and nonce, so two seals of one plaintext
    /// differ.
    Randomized,
    /// Suite 0x04: AES-256-SIV, so equal inputs give equal envelopes.
    Deterministic,
}

impl Mode {
    fn of_suite(suite: u8) -> Option<Self> {
        match suite {
            SUITE_AES256GCM_CMAC_KDF => Some(Mode::Randomized),
            SUITE_DETERMINISTIC => Some(Mode::Deterministic),
            _ => None,
        }
    }
}

/// The parsed, not yet authenticated, parts of a ciphertext.
#[derive(Clone, Copy)]
pub struct Parsed<'a> {
    /// The key the ciphertext claims to be sealed under.
    pub key_ref: KeyRef,
    /// The suite the ciphertext claims.
    pub mode: Mode,
    header: &'a [u8],
    body: &'a [u8],
    /// The AES-GCM tag, or the SIV of a deterministic envelope.
    tag: &'a [u8],
}

impl std::fmt::Debug for Parsed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("key_ref", &self.key_ref)
            .field("mode", &self.mode)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// A tenant key version or a subject key, ready to seal and open envelopes:
/// its per-message key derivation, prepared once, and the provider that runs
/// AES-256-GCM. This is what the key cache holds.
pub struct EnvelopeKey {
    provider: Provider,
    kdf: MessageKeyDeriver,
}

impl EnvelopeKey {
    pub fn new(provider: Provider, key: &Key256) -> Self {
        Self {
            provider,
            kdf: MessageKeyDeriver::new(key),
        }
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// AES-256-GCM under the message key for `salt`.
    fn message_aead(&self, salt: &[u8; SALT_LEN]) -> provider::AeadKey {
        self.provider.aead(&self.kdf.derive(salt))
    }

    /// AES-256-GCM under the key derived for another purpose (`label`), e.g.
    /// a stored-key domain ([`wrap`]).
    fn aead_for(&self, label: &[u8; 7], salt: &[u8; SALT_LEN]) -> provider::AeadKey {
        self.provider.aead(&self.kdf.derive_for(label, salt))
    }
}

impl std::fmt::Debug for EnvelopeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeKey")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Seals `plaintext` in `mode`: [`seal`] or [`seal_deterministic`].
pub fn seal_mode(
    mode: Mode,
    key: &EnvelopeKey,
    key_ref: KeyRef,
    tenant: &str,
    context: &Context,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    match mode {
        Mode::Randomized => seal(key, key_ref, tenant, context, plaintext),
        Mode::Deterministic => seal_deterministic(key, key_ref, tenant, context, plaintext),
    }
}

/// Seals `plaintext` for `tenant` and `context` under `key`, which `key_ref`
/// names. Salt and nonce are random ([`provider::fill_random`]).
pub fn seal(
    key: &EnvelopeKey,
    key_ref: KeyRef,
    tenant: &str,
    context: &Context,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut random = [0u8; SALT_LEN + NONCE_LEN];
    provider::fill_random(&mut random)?;
    let (salt, nonce) = random.split_at(SALT_LEN);
    seal_with(
        key,
        key_ref,
        tenant,
        context,
        plaintext,
        salt.try_into().expect("split at SALT_LEN"),
        nonce.try_into().expect("rest is NONCE_LEN"),
    )
}

/// [`seal`] with a given salt and nonce: for test vectors only. Reusing a
/// salt and nonce pair under one key breaks AES-GCM; production code calls
/// [`seal`].
#[doc(hidden)]
pub fn seal_with(
    key: &EnvelopeKey,
    key_ref: KeyRef,
    tenant: &str,
    context: &Context,
    plaintext: &[u8],
    salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, SealError> {
    let mut out = start_envelope(
        SUITE_AES256GCM_CMAC_KDF,
        key_ref,
        SALT_LEN + NONCE_LEN + plaintext.len() + TAG_LEN,
    );
    out.extend_from_slice(salt);
    out.extend_from_slice(nonce);
    let header_len = out.len();
    let aad = associated_data(&out, tenant, context).ok_or(SealError::TooLong)?;
    out.extend_from_slice(plaintext);

    let tag = key
        .message_aead(salt)
        .seal_in_place(nonce, &aad, &mut out[header_len..])?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Reads the header of a ciphertext (suite 0x01 or 0x04), to learn which
/// key it needs. Nothing is authenticated yet: a caller must not act on the
/// key reference beyond looking the key up.
pub fn parse(ciphertext: &[u8]) -> Result<Parsed<'_>, Undecryptable> {
    let [version, suite, kind, rest @ ..] = ciphertext else {
        return Err(Undecryptable);
    };
    if *version != FORMAT_V1 {
        return Err(Undecryptable);
    }
    let mode = Mode::of_suite(*suite).ok_or(Undecryptable)?;
    let (key_ref, rest) = parse_key_ref(*kind, rest)?;
    let key_ref_end = ciphertext.len() - rest.len();
    let (header, body, tag) = match mode {
        // header (salt and nonce included) || C || T
        Mode::Randomized => {
            if rest.len() < SALT_LEN + NONCE_LEN + TAG_LEN {
                return Err(Undecryptable);
            }
            let (header, sealed) = ciphertext.split_at(key_ref_end + SALT_LEN + NONCE_LEN);
            let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
            (header, body, tag)
        }
        // header || SIV || C
        Mode::Deterministic => {
            if rest.len() < deterministic::SIV_LEN {
                return Err(Undecryptable);
            }
            let (header, sealed) = ciphertext.split_at(key_ref_end);
            let (tag, body) = sealed.split_at(deterministic::SIV_LEN);
            (header, body, tag)
        }
    };
    Ok(Parsed {
        key_ref,
        mode,
        header,
        body,
        tag,
    })
}

/// Authenticates and decrypts a parsed ciphertext with the key its
/// [`Parsed::key_ref`] names.
pub fn open(
    key: &EnvelopeKey,
    parsed: &Parsed<'_>,
    tenant: &str,
    context: &Context,
) -> Result<Vec<u8>, Undecryptable> {
    if parsed.mode == Mode::Deterministic {
        return deterministic::open(key, parsed, tenant, context);
    }
    let salt_at = parsed.header.len() - SALT_LEN - NONCE_LEN;
    let (salt, nonce) = parsed.header[salt_at..].split_at(SALT_LEN);
    let salt: &[u8; SALT_LEN] = salt.try_into().expect("header ends with salt and nonce");
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().expect("header ends with salt and nonce");
    let tag: &[u8; TAG_LEN] = parsed.tag.try_into().expect("parse splits TAG_LEN bytes");
    let aad = associated_data(parsed.header, tenant, context).ok_or(Undecryptable)?;
    let mut plaintext = parsed.body.to_vec();
    key.message_aead(salt)
        .open_in_place(nonce, &aad, &mut plaintext, tag)?;
    Ok(plaintext)
}

/// The associated data: `header || enc(tenant) || u32(count) || enc(k1) ||
/// enc(v1) || ...` with the context's entries in byte order of their keys and
/// `enc(s) = u32 big-endian byte length || bytes`. Lengths make the encoding
/// injective: no two (tenant, context) pairs encode alike. `None` when a
/// length does not fit in 32 bits (far beyond any request limit), rather than
/// an encoding that could collide.
pub fn associated_data(header: &[u8], tenant: &str, context: &Context) -> Option<Vec<u8>> {
    let len = header.len()
        + 8
        + tenant.len()
        + context
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>();
    let mut aad = Vec::with_capacity(len);
    aad.extend_from_slice(header);
    push_str(&mut aad, tenant)?;
    aad.extend_from_slice(&length(context.len())?);
    for (key, value) in context {
        push_str(&mut aad, key)?;
        push_str(&mut aad, value)?;
    }
    Some(aad)
}

/// `header || enc(p_1) || ... || enc(p_n)` with `enc(p) = [len(p)]_32 || p`:
/// the associated data of the stored-key wraps ([`wrap`]).
fn associated_data_parts(header: &[u8], parts: &[&[u8]]) -> Option<Vec<u8>> {
    let mut aad =
        Vec::with_capacity(header.len() + parts.iter().map(|p| 4 + p.len()).sum::<usize>());
    aad.extend_from_slice(header);
    for part in parts {
        aad.extend_from_slice(&length(part.len())?);
        aad.extend_from_slice(part);
    }
    Some(aad)
}

fn push_str(out: &mut Vec<u8>, s: &str) -> Option<()> {
    out.extend_from_slice(&length(s.len())?);
    out.extend_from_slice(s.as_bytes());
    Some(())
}

fn length(n: usize) -> Option<[u8; 4]> {
    u32::try_from(n).ok().map(u32::to_be_bytes)
}

/// Reads the key reference of `kind` at the start of `bytes`; answers it and
/// the bytes after it.
fn parse_key_ref(kind: u8, bytes: &[u8]) -> Result<(KeyRef, &[u8]), Undecryptable> {
    match kind {
        KIND_TENANT => {
            let (version, rest) = split_u32(bytes)?;
            Ok((KeyRef::Tenant { version }, rest))
        }
        KIND_SUBJECT => {
            let (id, rest) = bytes
                .split_first_chunk::<SUBJECT_KEY_ID_LEN>()
                .ok_or(Undecryptable)?;
            let (version, rest) = split_u32(rest)?;
            Ok((KeyRef::Subject { id: *id, version }, rest))
        }
        _ => Err(Undecryptable),
    }
}

/// The first bytes of a one-shot envelope of `suite`: the format version,
/// the suite and the key reference, in a buffer with room for `rest` more.
fn start_envelope(suite: u8, key_ref: KeyRef, rest: usize) -> Vec<u8> {
    let key_ref_len = match key_ref {
        KeyRef::Tenant { .. } => 4,
        KeyRef::Subject { .. } => SUBJECT_KEY_ID_LEN + 4,
    };
    let mut out = Vec::with_capacity(3 + key_ref_len + rest);
    out.extend_from_slice(&[FORMAT_V1, suite]);
    push_key_ref(&mut out, key_ref);
    out
}

/// Appends the key reference's kind byte and fields.
fn push_key_ref(out: &mut Vec<u8>, key_ref: KeyRef) {
    match key_ref {
        KeyRef::Tenant { version } => {
            out.push(KIND_TENANT);
            out.extend_from_slice(&version.to_be_bytes());
        }
        KeyRef::Subject { id, version } => {
            out.push(KIND_SUBJECT);
            out.extend_from_slice(&id);
            out.extend_from_slice(&version.to_be_bytes());
        }
    }
}

fn split_u32(bytes: &[u8]) -> Result<(u32, &[u8]), Undecryptable> {
    let (head, rest) = bytes.split_first_chunk::<4>().ok_or(Undecryptable)?;
    Ok((u32::from_be_bytes(*head), rest))
}

#[cfg(test)]
mod tests;
