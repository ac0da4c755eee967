//! Wrapped data keys (suite 0x05): a 256-bit key handed to a caller in the
//! clear for client-side encryption (GenerateDataKey), together with this
//! form of it sealed under a tenant or subject key, which only
//! DecryptDataKey and RewrapDataKey open.
//!
//! ```text
//! offset  size  field
//! 0       1     format version          0x01
//! 1       1     algorithm suite         0x05 = wrapped data key: AES-256-GCM under a key
//!                                              derived by SP 800-108 (AES-256-CMAC) with
//!                                              the label `kw1.dky`
//! 2       1     key reference kind      0x01 = tenant key, 0x02 = subject key
//! 3       4     tenant key version      (kind 0x01), u32 big-endian
//!   or    16+4  subject key id, subject key version (kind 0x02)
//! ..      16    salt
//! ..      12    nonce
//! ..      32    the data key, encrypted
//! ..      16    tag
//! ```
//!
//! 83 bytes (tenant key) or 99 (subject key). The associated data is the
//! one-shot envelope's ([`super::associated_data`]: header, tenant, context).
//!
//! Its own key domain, twice over, as the stored-key wrap ([`super::wrap`]):
//! the one-shot and stream readers refuse suite 0x05 before any key is
//! looked up, and this reader refuses every other suite; and the wrapping
//! key is derived with a label (`kw1.dky`) no other use of a tenant or
//! subject key derives with, so even a rewritten suite byte cannot make a
//! wrapped data key open as data, or data open as a data key.
//! docs/FORMAT.md, "Wrapped data keys", is the specification.

use super::{
    EnvelopeKey, FORMAT_V1, KeyRef, NONCE_LEN, SALT_LEN, SUBJECT_KEY_ID_LEN, SealError, TAG_LEN,
    Undecryptable, associated_data, parse_key_ref, provider, push_key_ref,
};
use crate::secret::{KEY_LEN, Key256};

/// The suite byte of a wrapped data key.
pub const SUITE_DATA_KEY: u8 = 0x05;
/// The KDF label of the key that wraps a data key.
pub const LABEL: &[u8; 7] = b"kw1.dky";
/// Bytes of a data key wrapped under a tenant key version.
pub const TENANT_WRAPPED_LEN: usize = 3 + 4 + SALT_LEN + NONCE_LEN + KEY_LEN + TAG_LEN;
/// Bytes of a data key wrapped under a subject key.
pub const SUBJECT_WRAPPED_LEN: usize =
    3 + SUBJECT_KEY_ID_LEN + 4 + SALT_LEN + NONCE_LEN + KEY_LEN + TAG_LEN;

/// Seals `data_key` for `tenant` and `context` under `key`, which `key_ref`
/// names. Salt and nonce are random.
pub fn wrap(
    key: &EnvelopeKey,
    key_ref: KeyRef,
    tenant: &str,
    context: &super::Context,
    data_key: &Key256,
) -> Result<Vec<u8>, SealError> {
    let mut random = zeroize::Zeroizing::new([0u8; SALT_LEN + NONCE_LEN]);
    provider::fill_random(&mut random[..])?;
    let (salt, nonce) = random.split_at(SALT_LEN);
    wrap_with(
        key,
        key_ref,
        tenant,
        context,
        data_key,
        salt.try_into().expect("split at SALT_LEN"),
        nonce.try_into().expect("rest is NONCE_LEN"),
    )
}

/// [`wrap`] with a given salt and nonce: for test vectors only.
#[doc(hidden)]
pub fn wrap_with(
    key: &EnvelopeKey,
    key_ref: KeyRef,
    tenant: &str,
    context: &super::Context,
    data_key: &Key256,
    salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, SealError> {
    let mut out = Vec::with_capacity(SUBJECT_WRAPPED_LEN);
    out.extend_from_slice(&[FORMAT_V1, SUITE_DATA_KEY]);
    push_key_ref(&mut out, key_ref);
    out.extend_from_slice(salt);
    out.extend_from_slice(nonce);
    let header_len = out.len();
    let aad = associated_data(&out, tenant, context).ok_or(SealError::TooLong)?;
    out.extend_from_slice(data_key.expose());
    let tag = key
        .aead_for(LABEL, salt)
        .seal_in_place(nonce, &aad, &mut out[header_len..])?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Which key a wrapped data key names. Nothing is authenticated yet: use it
/// to look the key up and for nothing else. Anything but a whole wrapped
/// data key (another suite, another length) is [`Undecryptable`].
pub fn parse(wrapped: &[u8]) -> Result<KeyRef, Undecryptable> {
    let [version, suite, kind, rest @ ..] = wrapped else {
        return Err(Undecryptable);
    };
    if *version != FORMAT_V1 || *suite != SUITE_DATA_KEY {
        return Err(Undecryptable);
    }
    let (key_ref, rest) = parse_key_ref(*kind, rest)?;
    if rest.len() != SALT_LEN + NONCE_LEN + KEY_LEN + TAG_LEN {
        return Err(Undecryptable);
    }
    Ok(key_ref)
}

/// Opens a wrapped data key with the key its reference names ([`parse`]),
/// for `tenant` and `context`.
pub fn unwrap(
    key: &EnvelopeKey,
    wrapped: &[u8],
    tenant: &str,
    context: &super::Context,
) -> Result<Key256, Undecryptable> {
    parse(wrapped)?;
    let header_len = wrapped.len() - KEY_LEN - TAG_LEN;
    let (header, sealed) = wrapped.split_at(header_len);
    let (body, tag) = sealed.split_at(KEY_LEN);
    let salt: &[u8; SALT_LEN] = header[header_len - SALT_LEN - NONCE_LEN..header_len - NONCE_LEN]
        .try_into()
        .expect("the header ends with salt and nonce");
    let nonce: &[u8; NONCE_LEN] = header[header_len - NONCE_LEN..]
        .try_into()
        .expect("the header ends with the nonce");
    let tag: &[u8; TAG_LEN] = tag.try_into().expect("fixed layout");
    let aad = associated_data(header, tenant, context).ok_or(Undecryptable)?;
    let mut data_key = zeroize::Zeroizing::new([0u8; KEY_LEN]);
    data_key.copy_from_slice(body);
    key.aead_for(LABEL, salt)
        .open_in_place(nonce, &aad, &mut data_key[..], tag)?;
    Key256::from_slice(&data_key[..]).ok_or(Undecryptable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{self, Context, Provider, stream, wrap as stored};

    fn key(fill: u8) -> Key256 {
        Key256::from_slice(&[fill; 32]).unwrap()
    }

    fn context() -> Context {
        Context::from([("object".to_owned(), "export-7".to_owned())])
    }

    const TENANT: KeyRef = KeyRef::Tenant { version: 3 };
    const SUBJECT: KeyRef = KeyRef::Subject {
        id: [9; 16],
        version: 1,
    };

    #[test]
    fn a_wrapped_data_key_unwraps_only_for_its_tenant_context_and_key() {
        for provider in Provider::ALL {
            let k = EnvelopeKey::new(provider, &key(1));
            for (key_ref, len) in [(TENANT, TENANT_WRAPPED_LEN), (SUBJECT, SUBJECT_WRAPPED_LEN)] {
                let data_key = key(2);
                let wrapped = wrap(&k, key_ref, "acme", &context(), &data_key).unwrap();
                assert_eq!(wrapped.len(), len);
                assert_eq!(parse(&wrapped), Ok(key_ref));
                let back = unwrap(&k, &wrapped, "acme", &context()).unwrap();
                assert_eq!(back.expose(), data_key.expose());
                assert!(unwrap(&k, &wrapped, "acme2", &context()).is_err());
                assert!(unwrap(&k, &wrapped, "acme", &Context::new()).is_err());
                let other = EnvelopeKey::new(provider, &key(9));
                assert!(unwrap(&other, &wrapped, "acme", &context()).is_err());
                for i in 0..wrapped.len() {
                    let mut bad = wrapped.clone();
                    bad[i] ^= 0x01;
                    assert!(unwrap(&k, &bad, "acme", &context()).is_err(), "byte {i}");
                    assert!(unwrap(&k, &wrapped[..i], "acme", &context()).is_err());
                }
                let long = [&wrapped[..], &[0]].concat();
                assert!(unwrap(&k, &long, "acme", &context()).is_err());
            }
        }
    }

    #[test]
    fn no_other_reader_opens_a_wrapped_data_key_even_with_its_suite_rewritten() {
        let k = EnvelopeKey::new(Provider::RustCrypto, &key(1));
        let wrapped = wrap(&k, TENANT, "acme", &context(), &key(2)).unwrap();
        assert!(envelope::parse(&wrapped).is_err());
        assert!(stream::parse_header(&wrapped).is_err());
        assert!(stored::parse_wrapped(&wrapped).is_err());
        // As a one-shot envelope it parses, but its key was derived with
        // another label: the tag fails.
        let mut forged = wrapped.clone();
        forged[1] = envelope::SUITE_AES256GCM_CMAC_KDF;
        let parsed = envelope::parse(&forged).unwrap();
        assert!(envelope::open(&k, &parsed, "acme", &context()).is_err());
        // As a stored-key wrap (domain 0x01, version 3) it parses, and fails
        // its tag for the same reason.
        let mut forged = wrapped.clone();
        forged[1] = stored::SUITE_KEY_WRAP;
        assert!(stored::parse_wrapped(&forged).is_ok());
        assert!(
            stored::unwrap_key(&k, stored::KeyDomain::SubjectKey, &forged, "acme", &[0; 16])
                .is_err()
        );
    }

    #[test]
    fn no_ciphertext_of_another_suite_opens_as_a_data_key() {
        let k = EnvelopeKey::new(Provider::RustCrypto, &key(1));
        // 83 bytes, like a wrapped data key: a one-shot envelope of a 32-byte
        // plaintext, and a stored-key wrap.
        let sealed = envelope::seal(&k, TENANT, "acme", &context(), key(2).expose()).unwrap();
        let stored = stored::wrap_key(
            &k,
            stored::KeyDomain::SubjectKey,
            3,
            "acme",
            &[7; 16],
            &key(2),
        )
        .unwrap();
        for other in [sealed, stored] {
            assert_eq!(other.len(), TENANT_WRAPPED_LEN);
            assert!(unwrap(&k, &other, "acme", &context()).is_err());
            let mut forged = other;
            forged[1] = SUITE_DATA_KEY;
            forged[2] = 0x01;
            assert!(unwrap(&k, &forged, "acme", &context()).is_err());
        }
    }
}
