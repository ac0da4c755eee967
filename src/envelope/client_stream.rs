//! Client streams (suite 0x06): the format in which a client encrypts a
//! large object itself, under a data key from GenerateDataKey, so that a
//! reader needs only the envelope and DecryptDataKey. docs/FORMAT.md,
//! "Client streams under a data key", is the specification.
//!
//! ```text
//! header   version 0x01 | suite 0x06 | [w]_32 | wrapped data key (w bytes, suite 0x05)
//!          | salt (16) | nonce prefix (7) | key commitment (32)
//! segments exactly as suite 0x02: 64 KiB, nonce_i = prefix || [i]_32 || last
//! ```
//!
//! Unlike the sidecar's suites, the key here is in a caller's hands, so the
//! format commits to it (FORMAT.md, "Key commitment: not in suites 0x01 and
//! 0x02, and why", demands it): the header carries
//! `HMAC-SHA256(data key, "kw1.cmt" || 0x00 || salt)`, which a reader
//! recomputes and compares in constant time before it opens any segment (a
//! hash-based value, collision resistant as SHA-256 is; FORMAT.md, "Why this
//! suite commits to its key"); the segments are sealed under
//! `KDF(data key, "kw1.cst", salt)`. The associated data of every segment is
//! the whole header, the tenant and the context, as in suite 0x02.
//!
//! The API is sans-I/O, for the sidecar's CLI and for client libraries:
//! [`seal_start`] answers the header and a [`StreamSealer`], [`parse_header`]
//! finds the wrapped data key in an envelope's first bytes, and
//! [`open_start`] (with the key DecryptDataKey answered) a [`StreamOpener`];
//! both then work exactly as for suite 0x02. [`seal`] and [`open`] do it
//! whole, for objects that fit in memory.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{
    Context, FORMAT_V1, MessageKeyDeriver, Provider, SALT_LEN, SealError, Undecryptable,
    associated_data, datakey, provider,
    stream::{NONCE_PREFIX_LEN, Segments, StreamOpener, StreamSealer},
};
use crate::secret::Key256;

/// Suite byte of client streams.
pub const SUITE_CLIENT_STREAM: u8 = 0x06;
/// The KDF label of a client stream's stream key.
pub const STREAM_LABEL: &[u8; 7] = b"kw1.cst";
/// The label of a client stream's key commitment, the start of the HMAC
/// message `label || 0x00 || salt`.
pub const COMMIT_LABEL: &[u8; 7] = b"kw1.cmt";
/// Bytes of the key commitment.
pub const COMMITMENT_LEN: usize = 32;
/// Header bytes besides the wrapped data key: version, suite, its length,
/// salt, nonce prefix, commitment.
pub const FIXED_HEADER_LEN: usize = 2 + 4 + SALT_LEN + NONCE_PREFIX_LEN + COMMITMENT_LEN;
/// Header bytes of a stream whose data key is wrapped under a tenant key.
pub const TENANT_HEADER_LEN: usize = FIXED_HEADER_LEN + datakey::TENANT_WRAPPED_LEN;
/// Header bytes of a stream whose data key is wrapped under a subject key.
pub const SUBJECT_HEADER_LEN: usize = FIXED_HEADER_LEN + datakey::SUBJECT_WRAPPED_LEN;

/// What the header of a client stream says (nothing is authenticated yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientStreamHeader<'a> {
    /// The wrapped data key, for DecryptDataKey.
    pub wrapped_data_key: &'a [u8],
    /// The header's length: the segments start here.
    pub len: usize,
}

/// The key commitment for `salt`:
/// `HMAC-SHA256(data key, "kw1.cmt" || 0x00 || salt)`. A hash-based value,
/// so two data keys with one commitment are a SHA-256 collision (FORMAT.md,
/// "Why this suite commits to its key"). It is public (it is in the header);
/// the HMAC state is not zeroized, and yields commitments, not the data key
/// or the stream key.
fn commitment(data_key: &Key256, salt: &[u8; SALT_LEN]) -> [u8; COMMITMENT_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(data_key.expose())
        .expect("HMAC takes any key length");
    mac.update(COMMIT_LABEL);
    mac.update(&[0x00]);
    mac.update(salt);
    mac.finalize().into_bytes().into()
}

/// The data key's two values for `salt`: the key commitment and the stream
/// key, `KDF(data key, "kw1.cst", salt)`.
fn derive(data_key: &Key256, salt: &[u8; SALT_LEN]) -> ([u8; COMMITMENT_LEN], Zeroizing<[u8; 32]>) {
    (
        commitment(data_key, salt),
        MessageKeyDeriver::new(data_key).derive_for(STREAM_LABEL, salt),
    )
}

/// Starts a client stream under `data_key`, whose wrapped form (from
/// GenerateDataKey) goes into the header, for `tenant` and `context`.
/// Answers the sealer and the header, the first bytes of the envelope.
pub fn seal_start(
    provider: Provider,
    data_key: &Key256,
    wrapped_data_key: &[u8],
    tenant: &str,
    context: &Context,
) -> Result<(StreamSealer, Vec<u8>), SealError> {
    let mut random = Zeroizing::new([0u8; SALT_LEN + NONCE_PREFIX_LEN]);
    provider::fill_random(&mut random[..])?;
    seal_start_with(
        provider,
        data_key,
        wrapped_data_key,
        tenant,
        context,
        &random,
    )
}

/// [`seal_start`] with a given salt and nonce prefix: for test vectors only.
#[doc(hidden)]
pub fn seal_start_with(
    provider: Provider,
    data_key: &Key256,
    wrapped_data_key: &[u8],
    tenant: &str,
    context: &Context,
    salt_and_prefix: &[u8; SALT_LEN + NONCE_PREFIX_LEN],
) -> Result<(StreamSealer, Vec<u8>), SealError> {
    datakey::parse(wrapped_data_key).map_err(|_| SealError::NotAWrappedDataKey)?;
    let (salt, prefix) = salt_and_prefix.split_at(SALT_LEN);
    let salt: &[u8; SALT_LEN] = salt.try_into().expect("split at SALT_LEN");
    let prefix: [u8; NONCE_PREFIX_LEN] = prefix.try_into().expect("rest is the prefix");
    let (commitment, stream_key) = derive(data_key, salt);
    let mut header = Vec::with_capacity(FIXED_HEADER_LEN + wrapped_data_key.len());
    header.extend_from_slice(&[FORMAT_V1, SUITE_CLIENT_STREAM]);
    let w = u32::try_from(wrapped_data_key.len()).map_err(|_| SealError::NotAWrappedDataKey)?;
    header.extend_from_slice(&w.to_be_bytes());
    header.extend_from_slice(wrapped_data_key);
    header.extend_from_slice(salt_and_prefix);
    header.extend_from_slice(&commitment[..]);
    let aad = associated_data(&header, tenant, context).ok_or(SealError::TooLong)?;
    let segments = Segments::with_key(provider.aead(&stream_key), prefix, aad);
    Ok((StreamSealer::over(segments), header))
}

/// Reads the header at the start of a client stream: `Ok(None)` while
/// `bytes` is too short to tell. Nothing is authenticated yet: the wrapped
/// data key is for DecryptDataKey, which authenticates it.
pub fn parse_header(bytes: &[u8]) -> Result<Option<ClientStreamHeader<'_>>, Undecryptable> {
    if bytes.first().is_some_and(|&v| v != FORMAT_V1)
        || bytes.get(1).is_some_and(|&s| s != SUITE_CLIENT_STREAM)
    {
        return Err(Undecryptable);
    }
    let Some(w) = bytes.get(2..6) else {
        return Ok(None);
    };
    let w = u32::from_be_bytes(w.try_into().expect("4 bytes")) as usize;
    if w != datakey::TENANT_WRAPPED_LEN && w != datakey::SUBJECT_WRAPPED_LEN {
        return Err(Undecryptable);
    }
    let len = FIXED_HEADER_LEN + w;
    if bytes.len() < len {
        // The wrapped key's own header can be checked as soon as it is here.
        if bytes.len() >= 6 + 3 {
            let kind_fits = match bytes[6 + 2] {
                0x01 => w == datakey::TENANT_WRAPPED_LEN,
                0x02 => w == datakey::SUBJECT_WRAPPED_LEN,
                _ => false,
            };
            if bytes[6] != FORMAT_V1 || bytes[7] != datakey::SUITE_DATA_KEY || !kind_fits {
                return Err(Undecryptable);
            }
        }
        return Ok(None);
    }
    let wrapped_data_key = &bytes[6..6 + w];
    datakey::parse(wrapped_data_key)?;
    Ok(Some(ClientStreamHeader {
        wrapped_data_key,
        len,
    }))
}

/// Starts opening the client stream whose whole header is `header` with
/// `data_key`, which DecryptDataKey answered for its wrapped data key. The
/// key commitment is checked here, in constant time, before any segment: a
/// key other than the one the stream was sealed under is refused now.
pub fn open_start(
    provider: Provider,
    data_key: &Key256,
    header: &[u8],
    tenant: &str,
    context: &Context,
) -> Result<StreamOpener, Undecryptable> {
    match parse_header(header)? {
        Some(parsed) if parsed.len == header.len() => {}
        _ => return Err(Undecryptable),
    }
    let at = header.len() - SALT_LEN - NONCE_PREFIX_LEN - COMMITMENT_LEN;
    let salt: &[u8; SALT_LEN] = header[at..at + SALT_LEN].try_into().expect("fixed layout");
    let prefix: [u8; NONCE_PREFIX_LEN] = header[at + SALT_LEN..at + SALT_LEN + NONCE_PREFIX_LEN]
        .try_into()
        .expect("fixed layout");
    let commitment = &header[header.len() - COMMITMENT_LEN..];
    let (expected, stream_key) = derive(data_key, salt);
    if !bool::from(expected[..].ct_eq(commitment)) {
        return Err(Undecryptable);
    }
    let aad = associated_data(header, tenant, context).ok_or(Undecryptable)?;
    Ok(StreamOpener::over(Segments::with_key(
        provider.aead(&stream_key),
        prefix,
        aad,
    )))
}

/// Seals a whole object as a client stream (for objects that fit in
/// memory; larger ones go through [`seal_start`]).
pub fn seal(
    provider: Provider,
    data_key: &Key256,
    wrapped_data_key: &[u8],
    tenant: &str,
    context: &Context,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let (mut sealer, mut out) = seal_start(provider, data_key, wrapped_data_key, tenant, context)?;
    sealer.push(plaintext, &mut out)?;
    sealer.finish(&mut out)?;
    Ok(out)
}

/// Opens a whole client stream (see [`seal`]). The data key is the one
/// DecryptDataKey answers for [`parse_header`]'s wrapped data key.
pub fn open(
    provider: Provider,
    data_key: &Key256,
    envelope: &[u8],
    tenant: &str,
    context: &Context,
) -> Result<Zeroizing<Vec<u8>>, Undecryptable> {
    let header = parse_header(envelope)?.ok_or(Undecryptable)?;
    let (header, body) = envelope.split_at(header.len);
    let mut opener = open_start(provider, data_key, header, tenant, context)?;
    let mut out = Zeroizing::new(Vec::new());
    opener.push(body, &mut out)?;
    opener.finish(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{self, EnvelopeKey, KeyRef, stream};

    fn key(fill: u8) -> Key256 {
        Key256::from_slice(&[fill; 32]).unwrap()
    }

    fn context() -> Context {
        Context::from([("object".to_owned(), "export-7".to_owned())])
    }

    /// A data key and its wrapped form under a tenant key (or a subject key).
    fn data_key(subject: bool) -> (Key256, Vec<u8>) {
        let tenant_key = EnvelopeKey::new(Provider::RustCrypto, &key(1));
        let key_ref = if subject {
            KeyRef::Subject {
                id: [4; 16],
                version: 1,
            }
        } else {
            KeyRef::Tenant { version: 2 }
        };
        let dk = key(0x33);
        let wrapped = datakey::wrap(&tenant_key, key_ref, "acme", &context(), &dk).unwrap();
        (dk, wrapped)
    }

    const P: usize = stream::SEGMENT_PLAINTEXT_LEN;

    #[test]
    fn round_trips_for_both_providers_and_both_key_kinds_at_segment_boundaries() {
        for subject in [false, true] {
            let (dk, wrapped) = data_key(subject);
            for provider in Provider::ALL {
                for len in [0, 1, P - 1, P, P + 1, 2 * P + 7] {
                    let plaintext: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                    let sealed =
                        seal(provider, &dk, &wrapped, "acme", &context(), &plaintext).unwrap();
                    let header = parse_header(&sealed).unwrap().unwrap();
                    assert_eq!(header.wrapped_data_key, &wrapped[..]);
                    let expected_len = if subject {
                        SUBJECT_HEADER_LEN
                    } else {
                        TENANT_HEADER_LEN
                    };
                    assert_eq!(header.len, expected_len);
                    let segments = len.div_ceil(P).max(1);
                    assert_eq!(sealed.len(), expected_len + len + 16 * segments);
                    for other in Provider::ALL {
                        let opened = open(other, &dk, &sealed, "acme", &context()).unwrap();
                        assert!(*opened == plaintext, "{provider} -> {other}, {len} bytes");
                    }
                }
            }
        }
    }

    #[test]
    fn another_data_key_is_refused_by_the_commitment_before_any_segment() {
        let (dk, wrapped) = data_key(false);
        let sealed = seal(Provider::AwsLc, &dk, &wrapped, "acme", &context(), b"x").unwrap();
        let header = &sealed[..TENANT_HEADER_LEN];
        assert!(open_start(Provider::AwsLc, &key(0x34), header, "acme", &context()).is_err());
        assert!(open_start(Provider::AwsLc, &dk, header, "acme", &context()).is_ok());
        // The commitment is HMAC-SHA256 of the label, a zero byte and the
        // salt under the data key; the stream key is another value.
        let salt: [u8; 16] = header[6 + 83..6 + 83 + 16].try_into().unwrap();
        let (commitment, stream_key) = derive(&dk, &salt);
        assert_eq!(&header[header.len() - 32..], &commitment[..]);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[0x33; 32]).unwrap();
        mac.update(&[b"kw1.cmt".as_slice(), &[0], &salt].concat());
        assert_eq!(commitment[..], mac.finalize().into_bytes()[..]);
        assert_ne!(commitment, *stream_key);
        // Nor is it the CMAC KDF's value under that label.
        let kdf = MessageKeyDeriver::new(&dk).derive_for(COMMIT_LABEL, &salt);
        assert_ne!(commitment, *kdf);
    }

    #[test]
    fn a_changed_header_tenant_or_context_fails() {
        let (dk, wrapped) = data_key(true);
        let sealed = seal(
            Provider::RustCrypto,
            &dk,
            &wrapped,
            "acme",
            &context(),
            b"obj",
        )
        .unwrap();
        assert!(open(Provider::RustCrypto, &dk, &sealed, "acme2", &context()).is_err());
        assert!(open(Provider::RustCrypto, &dk, &sealed, "acme", &Context::new()).is_err());
        for bit in 0..SUBJECT_HEADER_LEN * 8 {
            let mut bad = sealed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                open(Provider::RustCrypto, &dk, &bad, "acme", &context()).is_err(),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn headers_parse_only_when_whole_and_other_readers_refuse_them() {
        let (dk, wrapped) = data_key(false);
        let (_, header) =
            seal_start(Provider::RustCrypto, &dk, &wrapped, "acme", &context()).unwrap();
        for len in 0..header.len() {
            assert_eq!(parse_header(&header[..len]), Ok(None), "{len} bytes");
        }
        assert!(parse_header(&header).unwrap().is_some());
        let body = [&header[..], &[0u8; 40]].concat();
        assert!(envelope::parse(&body).is_err());
        assert!(stream::parse_header(&body).is_err());
        assert!(datakey::parse(&body).is_err());
        // A sidecar stream is not a client stream, nor is a bare wrapped key.
        let tenant_key = EnvelopeKey::new(Provider::RustCrypto, &key(1));
        let (_, sidecar) = stream::StreamSealer::start(
            &tenant_key,
            KeyRef::Tenant { version: 1 },
            "acme",
            &context(),
        )
        .unwrap();
        assert!(parse_header(&sidecar).is_err());
        assert!(parse_header(&wrapped).is_err());
        // Only a wrapped data key goes into a header, of a length the kind
        // byte agrees with.
        assert!(matches!(
            seal_start(Provider::RustCrypto, &dk, &[1; 83], "acme", &context()),
            Err(SealError::NotAWrappedDataKey)
        ));
        let mut lying = header.clone();
        lying[2..6].copy_from_slice(&99u32.to_be_bytes());
        assert_eq!(parse_header(&lying[..20]), Err(Undecryptable));
    }
}
