//! Keys the sidecar stores under a tenant key version ("stored keys"), each
//! sealed in a key domain of its own that no data-plane call can open or
//! mint.
//!
//! ```text
//! offset  size  field
//! 0       1     format version          0x01
//! 1       1     algorithm suite         0x03 = stored-key wrap: AES-256-GCM under a key
//!                                              derived by SP 800-108 (AES-256-CMAC) with
//!                                              the domain's own label
//! 2       1     key domain              0x01 = subject key, 0x02 = blind-index key
//! 3       4     tenant key version      u32 big-endian: the version that wraps
//! 7       16    salt
//! 23      12    nonce
//! 35      32    the stored key, encrypted
//! 67      16    tag
//! ```
//!
//! The associated data is `header || enc(tenant id) || enc(binding)`, where
//! the binding names the key inside its domain (for a subject key, its
//! 16-byte subject key id; for a blind-index key, its version as
//! `[version]_32`), so a wrapped key moved to another tenant, another
//! subject or another domain fails to authenticate.
//!
//! Why no data-plane call can reach these: the data plane's parsers
//! ([`super::parse`]: suites 0x01 and 0x04; the stream header parser: 0x02)
//! accept no other suite, so a wrapped key sent to Decrypt is refused
//! before any key is looked up; and even if its suite byte were rewritten,
//! the message key of a wrapped key is derived with the domain's label
//! (`kw1.skw`, `kw1.ikw`), which no data-plane seal or open ever uses (they
//! use `kw1.dek`, `kw1.stm` and `kw1.siv`), so the tag cannot verify. The
//! converse holds too: nothing Encrypt produces, randomized or
//! deterministic, is a valid wrapped key. docs/FORMAT.md, "How subject keys
//! are stored", is the specification, with test vectors.

use super::{
    EnvelopeKey, FORMAT_V1, NONCE_LEN, SALT_LEN, SealError, TAG_LEN, Undecryptable,
    associated_data_parts, provider,
};
use crate::secret::{KEY_LEN, Key256};

/// The suite byte of a stored-key wrap.
pub const SUITE_KEY_WRAP: u8 = 0x03;
/// Bytes before the encrypted key.
pub const WRAP_HEADER_LEN: usize = 3 + 4 + SALT_LEN + NONCE_LEN;
/// Bytes of a wrapped key.
pub const WRAPPED_LEN: usize = WRAP_HEADER_LEN + KEY_LEN + TAG_LEN;

/// A kind of key the sidecar stores under a tenant key version. Each has its
/// own domain byte and its own KDF label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyDomain {
    /// A data subject's key; bound to its subject key id.
    SubjectKey,
    /// A version of the tenant's blind-index key; bound to `[version]_32`.
    BlindIndexKey,
}

impl KeyDomain {
    fn byte(self) -> u8 {
        match self {
            KeyDomain::SubjectKey => 0x01,
            KeyDomain::BlindIndexKey => 0x02,
        }
    }

    fn of_byte(byte: u8) -> Option<Self> {
        match byte {
            0x01 => Some(KeyDomain::SubjectKey),
            0x02 => Some(KeyDomain::BlindIndexKey),
            _ => None,
        }
    }

    /// The KDF label of the domain: 7 ASCII bytes that no other use of a
    /// tenant key shares.
    fn label(self) -> &'static [u8; 7] {
        match self {
            KeyDomain::SubjectKey => b"kw1.skw",
            KeyDomain::BlindIndexKey => b"kw1.ikw",
        }
    }
}

/// What the header of a wrapped key says (unauthenticated until unwrapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrapHeader {
    pub domain: KeyDomain,
    /// The tenant key version that wraps it.
    pub tenant_version: u32,
}

/// Wraps `key` in `domain` under `wrapping` (tenant key `tenant_version` of
/// `tenant`), bound to `binding`.
pub fn wrap_key(
    wrapping: &EnvelopeKey,
    domain: KeyDomain,
    tenant_version: u32,
    tenant: &str,
    binding: &[u8],
    key: &Key256,
) -> Result<Vec<u8>, SealError> {
    let mut random = [0u8; SALT_LEN + NONCE_LEN];
    provider::fill_random(&mut random)?;
    let (salt, nonce) = random.split_at(SALT_LEN);
    wrap_key_with(
        wrapping,
        domain,
        tenant_version,
        tenant,
        binding,
        key,
        salt.try_into().expect("split at SALT_LEN"),
        nonce.try_into().expect("rest is NONCE_LEN"),
    )
}

/// [`wrap_key`] with a given salt and nonce: for test vectors only.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn wrap_key_with(
    wrapping: &EnvelopeKey,
    domain: KeyDomain,
    tenant_version: u32,
    tenant: &str,
    binding: &[u8],
    key: &Key256,
    salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, SealError> {
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.extend_from_slice(&[FORMAT_V1, SUITE_KEY_WRAP, domain.byte()]);
    out.extend_from_slice(&tenant_version.to_be_bytes());
    out.extend_from_slice(salt);
    out.extend_from_slice(nonce);
    let aad = associated_data(&out, tenant, binding).ok_or(SealError::TooLong)?;
    out.extend_from_slice(key.expose());
    let tag = wrapping.aead_for(domain.label(), salt).seal_in_place(
        nonce,
        &aad,
        &mut out[WRAP_HEADER_LEN..],
    )?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Reads a wrapped key's header: which domain, and which tenant key version
/// must unwrap it. Anything but a whole wrapped key is [`Undecryptable`].
pub fn parse_wrapped(wrapped: &[u8]) -> Result<WrapHeader, Undecryptable> {
    if wrapped.len() != WRAPPED_LEN || wrapped[0] != FORMAT_V1 || wrapped[1] != SUITE_KEY_WRAP {
        return Err(Undecryptable);
    }
    let domain = KeyDomain::of_byte(wrapped[2]).ok_or(Undecryptable)?;
    let version: [u8; 4] = wrapped[3..7].try_into().expect("length checked");
    Ok(WrapHeader {
        domain,
        tenant_version: u32::from_be_bytes(version),
    })
}

/// Unwraps a key of `domain` that `wrapping` (the tenant key version its
/// header names) sealed for `tenant` and `binding`.
pub fn unwrap_key(
    wrapping: &EnvelopeKey,
    domain: KeyDomain,
    wrapped: &[u8],
    tenant: &str,
    binding: &[u8],
) -> Result<Key256, Undecryptable> {
    let header = parse_wrapped(wrapped)?;
    if header.domain != domain {
        return Err(Undecryptable);
    }
    let (head, sealed) = wrapped.split_at(WRAP_HEADER_LEN);
    let (body, tag) = sealed.split_at(KEY_LEN);
    let salt: &[u8; SALT_LEN] = head[7..7 + SALT_LEN].try_into().expect("fixed layout");
    let nonce: &[u8; NONCE_LEN] = head[7 + SALT_LEN..].try_into().expect("fixed layout");
    let tag: &[u8; TAG_LEN] = tag.try_into().expect("fixed layout");
    let aad = associated_data(head, tenant, binding).ok_or(Undecryptable)?;
    let mut key = zeroize::Zeroizing::new(body.to_vec());
    wrapping
        .aead_for(domain.label(), salt)
        .open_in_place(nonce, &aad, &mut key, tag)?;
    Key256::from_slice(&key).ok_or(Undecryptable)
}

/// `header || enc(tenant) || enc(binding)`, with `enc(s) = [len(s)]_32 || s`.
fn associated_data(header: &[u8], tenant: &str, binding: &[u8]) -> Option<Vec<u8>> {
    associated_data_parts(header, &[tenant.as_bytes(), binding])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{self, Context, KeyRef, Provider};

    fn key(fill: u8) -> Key256 {
        Key256::from_slice(&[fill; 32]).unwrap()
    }

    const ID: [u8; 16] = [7; 16];

    #[test]
    fn a_wrapped_key_unwraps_only_for_its_tenant_binding_and_domain() {
        for provider in Provider::ALL {
            let tenant_key = EnvelopeKey::new(provider, &key(1));
            let subject = key(2);
            let wrapped =
                wrap_key(&tenant_key, KeyDomain::SubjectKey, 3, "acme", &ID, &subject).unwrap();
            assert_eq!(wrapped.len(), WRAPPED_LEN);
            assert_eq!(
                parse_wrapped(&wrapped),
                Ok(WrapHeader {
                    domain: KeyDomain::SubjectKey,
                    tenant_version: 3
                })
            );
            let back =
                unwrap_key(&tenant_key, KeyDomain::SubjectKey, &wrapped, "acme", &ID).unwrap();
            assert_eq!(back.expose(), subject.expose());
            // Another tenant, another subject, another wrapping key.
            assert!(
                unwrap_key(&tenant_key, KeyDomain::SubjectKey, &wrapped, "acme2", &ID).is_err()
            );
            assert!(
                unwrap_key(
                    &tenant_key,
                    KeyDomain::SubjectKey,
                    &wrapped,
                    "acme",
                    &[8; 16]
                )
                .is_err()
            );
            let other = EnvelopeKey::new(provider, &key(9));
            assert!(unwrap_key(&other, KeyDomain::SubjectKey, &wrapped, "acme", &ID).is_err());
            // Every single-byte change and every truncation fails.
            for i in 0..wrapped.len() {
                let mut bad = wrapped.clone();
                bad[i] ^= 0x01;
                assert!(
                    unwrap_key(&tenant_key, KeyDomain::SubjectKey, &bad, "acme", &ID).is_err(),
                    "byte {i}"
                );
                assert!(
                    unwrap_key(
                        &tenant_key,
                        KeyDomain::SubjectKey,
                        &wrapped[..i],
                        "acme",
                        &ID
                    )
                    .is_err()
                );
            }
        }
    }

    #[test]
    fn the_data_plane_cannot_open_a_wrapped_key_even_with_its_suite_byte_rewritten() {
        let tenant_key = EnvelopeKey::new(Provider::RustCrypto, &key(1));
        let wrapped =
            wrap_key(&tenant_key, KeyDomain::SubjectKey, 1, "acme", &ID, &key(2)).unwrap();
        // As it is: the data plane's parser refuses suite 0x03.
        assert!(envelope::parse(&wrapped).is_err());
        // Rewritten to suite 0x01 it parses as a tenant-key envelope of
        // version 1, but its message key was derived with another label:
        // whatever context the caller sends, the tag fails.
        let mut forged = wrapped.clone();
        forged[1] = envelope::SUITE_AES256GCM_CMAC_KDF;
        let parsed = envelope::parse(&forged).unwrap();
        assert_eq!(parsed.key_ref, KeyRef::Tenant { version: 1 });
        for context in [
            Context::new(),
            Context::from([("binding".to_owned(), hex::encode(ID))]),
        ] {
            assert!(envelope::open(&tenant_key, &parsed, "acme", &context).is_err());
        }
        // Rewritten to suite 0x04 (deterministic), its salt is read as a SIV
        // under the SIV key (label kw1.siv): it fails alike.
        forged[1] = envelope::SUITE_DETERMINISTIC;
        let parsed = envelope::parse(&forged).unwrap();
        assert_eq!(parsed.key_ref, KeyRef::Tenant { version: 1 });
        assert!(envelope::open(&tenant_key, &parsed, "acme", &Context::new()).is_err());
    }

    #[test]
    fn nothing_the_data_plane_seals_is_a_wrapped_key() {
        let tenant_key = EnvelopeKey::new(Provider::RustCrypto, &key(1));
        let sealed = envelope::seal(
            &tenant_key,
            KeyRef::Tenant { version: 1 },
            "acme",
            &Context::new(),
            key(2).expose(),
        )
        .unwrap();
        // 83 bytes, like a wrapped key, yet refused by suite; and with the
        // suite rewritten, by its tag.
        assert_eq!(sealed.len(), WRAPPED_LEN);
        assert!(unwrap_key(&tenant_key, KeyDomain::SubjectKey, &sealed, "acme", &ID).is_err());
        let mut forged = sealed;
        forged[1] = SUITE_KEY_WRAP;
        assert!(unwrap_key(&tenant_key, KeyDomain::SubjectKey, &forged, "acme", &ID).is_err());
        // Nor is a deterministic envelope of the same length (23 + 60).
        let deterministic = envelope::seal_deterministic(
            &tenant_key,
            KeyRef::Tenant { version: 1 },
            "acme",
            &Context::new(),
            &[2; WRAPPED_LEN - 23],
        )
        .unwrap();
        assert_eq!(deterministic.len(), WRAPPED_LEN);
        assert!(
            unwrap_key(
                &tenant_key,
                KeyDomain::SubjectKey,
                &deterministic,
                "acme",
                &ID
            )
            .is_err()
        );
        let mut forged = deterministic;
        forged[1] = SUITE_KEY_WRAP;
        assert!(unwrap_key(&tenant_key, KeyDomain::SubjectKey, &forged, "acme", &ID).is_err());
    }

    #[test]
    fn a_key_of_one_domain_does_not_unwrap_in_another() {
        let tenant_key = EnvelopeKey::new(Provider::RustCrypto, &key(1));
        let binding = 1u32.to_be_bytes();
        let wrapped = wrap_key(
            &tenant_key,
            KeyDomain::BlindIndexKey,
            1,
            "acme",
            &binding,
            &key(2),
        )
        .unwrap();
        assert_eq!(wrapped[2], 0x02);
        let back = unwrap_key(
            &tenant_key,
            KeyDomain::BlindIndexKey,
            &wrapped,
            "acme",
            &binding,
        )
        .unwrap();
        assert_eq!(back.expose(), key(2).expose());
        // Asked as a subject key: refused by its domain byte; with the byte
        // rewritten, by its tag (another label).
        assert!(
            unwrap_key(
                &tenant_key,
                KeyDomain::SubjectKey,
                &wrapped,
                "acme",
                &binding
            )
            .is_err()
        );
        let mut forged = wrapped.clone();
        forged[2] = 0x01;
        assert!(
            unwrap_key(
                &tenant_key,
                KeyDomain::SubjectKey,
                &forged,
                "acme",
                &binding
            )
            .is_err()
        );
        // Another version's binding.
        assert!(
            unwrap_key(
                &tenant_key,
                KeyDomain::BlindIndexKey,
                &wrapped,
                "acme",
                &2u32.to_be_bytes()
            )
            .is_err()
        );
    }
}
