//! Deterministic envelopes (suite 0x04): AES-256-SIV (RFC 5297), so equal
//! plaintexts under one key, tenant and context give equal envelopes, for
//! unique constraints, equality lookups and joins on encrypted columns.
//!
//! ```text
//! offset  size  field
//! 0       1     format version          0x01
//! 1       1     algorithm suite         0x04 = AES-256-SIV, key by SP 800-108
//!                                              (AES-256-CMAC), label kw1.siv, L = 512
//! 2       1     key reference kind      0x01 = tenant key, 0x02 = subject key
//! 3       4     tenant key version      (kind 0x01), u32 big-endian
//!   or    16+4  subject key id, subject key version (kind 0x02)
//! ..      16    SIV                     the synthetic IV: tag and CTR IV
//! ..      n     ciphertext
//! ```
//!
//! There is no salt and no nonce: the one SIV key per tenant or subject key
//! is `KDF(K_IN, "kw1.siv", 16 zero bytes, L = 512)`, and the SIV is a MAC
//! (S2V) of the associated data and the plaintext, which is what makes the
//! envelope a function of its inputs. The associated data is one S2V
//! component, built exactly as the one-shot envelope's
//! ([`super::associated_data`]: header, tenant, context), so a deterministic
//! envelope moved to another tenant, context or key does not open, as any
//! other. AES-SIV is misuse-resistant: what it gives up against a
//! randomized AEAD is only that equal inputs are visibly equal.
//!
//! The key is derived on every call (one AES-256 key schedule and eight
//! blocks, as the one-shot envelope's message key costs four), not kept in
//! the key cache: a cached AES-SIV state is two key schedules per entry.
//!
//! docs/FORMAT.md, "Deterministic envelopes", is the specification, with
//! test vectors that tests/reference/decrypt_deterministic_vectors.py
//! decrypts from the document alone.

use aes_siv::{KeyInit, Tag, aead::generic_array::GenericArray, siv::Aes256Siv};

use super::{
    Context, EnvelopeKey, KeyRef, Parsed, SealError, Undecryptable, associated_data,
    kdf::SIV_LABEL, start_envelope,
};

/// The suite byte of a deterministic envelope.
pub const SUITE_DETERMINISTIC: u8 = 0x04;
/// Bytes of the synthetic IV.
pub const SIV_LEN: usize = 16;
/// The KDF context of the SIV key: fixed, since the key is one per key.
const SIV_KEY_CONTEXT: [u8; 16] = [0; 16];
/// Overhead of a tenant-key deterministic envelope over its plaintext.
pub const DETERMINISTIC_TENANT_OVERHEAD: usize = 3 + 4 + SIV_LEN;
/// Overhead of a subject-key deterministic envelope over its plaintext.
pub const DETERMINISTIC_SUBJECT_OVERHEAD: usize = 3 + super::SUBJECT_KEY_ID_LEN + 4 + SIV_LEN;

/// AES-256-SIV under the SIV key of `key`.
fn siv(key: &EnvelopeKey) -> Aes256Siv {
    let bytes = key.kdf.derive_512(SIV_LABEL, &SIV_KEY_CONTEXT);
    Aes256Siv::new(GenericArray::from_slice(&*bytes))
}

/// Seals `plaintext` for `tenant` and `context` under `key`, which `key_ref`
/// names, deterministically: the same inputs always give the same envelope.
pub fn seal_deterministic(
    key: &EnvelopeKey,
    key_ref: KeyRef,
    tenant: &str,
    context: &Context,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut out = start_envelope(SUITE_DETERMINISTIC, key_ref, SIV_LEN + plaintext.len());
    let aad = associated_data(&out, tenant, context).ok_or(SealError::TooLong)?;
    let header_len = out.len();
    out.resize(header_len + SIV_LEN, 0);
    out.extend_from_slice(plaintext);
    let tag = siv(key)
        .encrypt_in_place_detached([&aad], &mut out[header_len + SIV_LEN..])
        .map_err(|_| SealError::TooLong)?;
    out[header_len..header_len + SIV_LEN].copy_from_slice(&tag);
    Ok(out)
}

/// Opens a parsed deterministic envelope: the SIV is checked (in constant
/// time, by the crate) before any plaintext is returned.
pub(super) fn open(
    key: &EnvelopeKey,
    parsed: &Parsed<'_>,
    tenant: &str,
    context: &Context,
) -> Result<Vec<u8>, Undecryptable> {
    let aad = associated_data(parsed.header, tenant, context).ok_or(Undecryptable)?;
    let mut plaintext = parsed.body.to_vec();
    siv(key)
        .decrypt_in_place_detached([&aad], &mut plaintext, Tag::from_slice(parsed.tag))
        .map_err(|_| Undecryptable)?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests;
