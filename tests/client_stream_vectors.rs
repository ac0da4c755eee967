//! Test vectors for client streams, suite 0x06 (docs/FORMAT.md, "Client
//! streams under a data key").
//!
//! A fixed list of cases (data key, its wrapped form, tenant, context,
//! plaintext, salt, nonce prefix) is sealed with
//! `client_stream::seal_start_with`, by every crypto provider and in several
//! chunkings that must all give the same envelope, and compared with
//! tests/data/client_stream_vectors.json, which records the key commitment,
//! the stream key, the header, the associated data and every segment's nonce
//! and tag. The wrapped data keys are those of
//! tests/data/data_key_vectors.json. tests/reference/client_stream_vectors.py,
//! written from FORMAT.md alone, must reproduce and open every vector, refuse
//! another data key at the commitment, and refuse changed headers and
//! rearranged segments.
//!
//! To rewrite the file after a deliberate change to the cases:
//!
//! ```text
//! KEYWARDEN_REGENERATE_VECTORS=1 cargo test --test client_stream_vectors
//! ```

use std::path::PathBuf;

use aes_gcm::{Aes256Gcm, KeyInit, Nonce, aead::Aead, aead::Payload};
use hmac::{Hmac, Mac};
use keywarden::envelope::{
    self, EnvelopeKey, KeyRef, MessageKeyDeriver, Provider, client_stream, datakey, stream,
};
use keywarden::secret::Key256;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

#[path = "common/vectors.rs"]
mod vector_files;

use vector_files::{
    SUBJECT_KEY, SUBJECT_KEY_ID, WrittenOrder, assert_stored_equal, assert_unique_names,
    context_field, context_of, hex_field, pairs, pattern, repo, run_python_reference,
    spec_associated_data, str_field, to_json,
};

/// The specification's numbers, written out here.
const SEGMENT_LEN: usize = 65_536;
const TAG_LEN: usize = 16;
const SEGMENT_PLAINTEXT_LEN: usize = SEGMENT_LEN - TAG_LEN;
const WHOLE_ENVELOPE_MAX: usize = 4096;

fn vectors_path() -> PathBuf {
    repo().join("tests/data/client_stream_vectors.json")
}

/// `length` bytes, byte `i` being `(31 i + 7) mod 256`.
#[derive(Clone, Copy, Serialize)]
struct Pattern {
    length: usize,
    multiplier: u8,
    increment: u8,
}

fn formula(length: usize) -> Pattern {
    Pattern {
        length,
        multiplier: 31,
        increment: 7,
    }
}

enum Plaintext {
    Bytes(&'static [u8]),
    Pattern(Pattern),
}

impl Plaintext {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Plaintext::Bytes(b) => b.to_vec(),
            Plaintext::Pattern(p) => (0..p.length as u64)
                .map(|i| ((u64::from(p.multiplier) * i + u64::from(p.increment)) % 256) as u8)
                .collect(),
        }
    }
}

/// A data key and its wrapped form: the inputs of a vector of
/// tests/data/data_key_vectors.json, wrapped again here.
struct DataKey {
    data_key: [u8; 32],
    wrapped: Vec<u8>,
}

fn data_key_under_tenant_key() -> DataKey {
    // data-key-under-tenant-key-version-1
    let data_key = pattern(0x40, 0x03);
    let wrapped = datakey::wrap_with(
        &EnvelopeKey::new(
            Provider::RustCrypto,
            &Key256::from_slice(&pattern::<32>(0x00, 1)).unwrap(),
        ),
        KeyRef::Tenant { version: 1 },
        "acme",
        &context_of(&pairs(&[("object", "export-7")])),
        &Key256::from_slice(&data_key).unwrap(),
        &pattern(0x10, 0x11),
        &pattern(0x20, 0x03),
    )
    .unwrap();
    DataKey { data_key, wrapped }
}

fn data_key_under_subject_key() -> DataKey {
    // data-key-under-subject-key
    let data_key = pattern(0x07, 0x0b);
    let wrapped = datakey::wrap_with(
        &EnvelopeKey::new(
            Provider::RustCrypto,
            &Key256::from_slice(&SUBJECT_KEY).unwrap(),
        ),
        KeyRef::Subject {
            id: SUBJECT_KEY_ID,
            version: 1,
        },
        "acme",
        &context_of(&pairs(&[
            ("zone", "eu"),
            ("ＡＢＣ", ""),
            ("bucket", "exports"),
        ])),
        &Key256::from_slice(&data_key).unwrap(),
        &pattern(0x6d, 0x29),
        &pattern(0x0f, 0x31),
    )
    .unwrap();
    DataKey { data_key, wrapped }
}

struct Case {
    name: &'static str,
    key: DataKey,
    tenant: &'static str,
    context: Vec<(String, String)>,
    plaintext: Plaintext,
    salt: [u8; 16],
    nonce_prefix: [u8; 7],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "tenant-data-key-empty-plaintext-empty-context",
            key: data_key_under_tenant_key(),
            tenant: "acme",
            context: vec![],
            plaintext: Plaintext::Bytes(b""),
            salt: pattern(0xa0, 1),
            nonce_prefix: pattern(0xc0, 1),
        },
        Case {
            name: "tenant-data-key-short-text",
            key: data_key_under_tenant_key(),
            tenant: "acme",
            context: pairs(&[("object", "export-7")]),
            plaintext: Plaintext::Bytes(b"a large object, in short"),
            salt: pattern(0x10, 0x11),
            nonce_prefix: pattern(0x20, 0x03),
        },
        Case {
            // Two full segments and a 5-byte last one.
            name: "tenant-data-key-131045-bytes",
            key: data_key_under_tenant_key(),
            tenant: "acme",
            context: pairs(&[("object", "export-8")]),
            plaintext: Plaintext::Pattern(formula(2 * SEGMENT_PLAINTEXT_LEN + 5)),
            salt: pattern(0x33, 0x07),
            nonce_prefix: pattern(0x44, 0x1d),
        },
        Case {
            // Exactly one full segment, the last; a context out of byte order.
            name: "subject-data-key-65520-bytes",
            key: data_key_under_subject_key(),
            tenant: "acme",
            context: pairs(&[("zone", "eu"), ("bucket", "exports")]),
            plaintext: Plaintext::Pattern(formula(SEGMENT_PLAINTEXT_LEN)),
            salt: pattern(0x6d, 0x29),
            nonce_prefix: pattern(0x0f, 0x31),
        },
    ]
}

#[derive(Serialize)]
struct SegmentJson {
    nonce: String,
    plaintext_length: usize,
    tag: String,
}

/// One entry of tests/data/client_stream_vectors.json. Byte strings are
/// lowercase hex; exactly one of `plaintext` and `plaintext_pattern`.
#[derive(Serialize)]
struct Vector<'a> {
    name: &'a str,
    data_key: String,
    wrapped_data_key: String,
    tenant: &'a str,
    context: WrittenOrder<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext_pattern: Option<Pattern>,
    salt: String,
    nonce_prefix: String,
    /// HMAC-SHA256(data key, "kw1.cmt" || 0x00 || salt).
    commitment: String,
    /// KDF(data key, "kw1.cst", salt).
    stream_key: String,
    header: String,
    associated_data: String,
    segments: Vec<SegmentJson>,
    envelope_length: usize,
    envelope_sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    envelope: Option<String>,
}

fn seal_in_chunks(provider: Provider, case: &Case, plaintext: &[u8], chunk: usize) -> Vec<u8> {
    let salt_and_prefix: [u8; 23] = [&case.salt[..], &case.nonce_prefix]
        .concat()
        .try_into()
        .unwrap();
    let (mut sealer, mut envelope) = client_stream::seal_start_with(
        provider,
        &Key256::from_slice(&case.key.data_key).unwrap(),
        &case.key.wrapped,
        case.tenant,
        &context_of(&case.context),
        &salt_and_prefix,
    )
    .unwrap();
    for part in plaintext.chunks(chunk) {
        sealer.push(part, &mut envelope).unwrap();
    }
    sealer.finish(&mut envelope).unwrap();
    envelope
}

fn seal(case: &Case) -> Vector<'_> {
    let name = case.name;
    let plaintext = case.plaintext.bytes();
    let mut sealed = Vec::new();
    for provider in Provider::ALL {
        for chunk in [usize::MAX, 1000, SEGMENT_PLAINTEXT_LEN + 1] {
            sealed.push(seal_in_chunks(provider, case, &plaintext, chunk));
        }
    }
    let envelope = sealed[0].clone();
    assert!(
        sealed.iter().all(|e| *e == envelope),
        "{name}: sealers differ"
    );

    // The header, from the specification.
    let data_key = Key256::from_slice(&case.key.data_key).unwrap();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&case.key.data_key).unwrap();
    mac.update(&[&b"kw1.cmt"[..], &[0x00], &case.salt].concat());
    let commitment: [u8; 32] = mac.finalize().into_bytes().into();
    let stream_key = MessageKeyDeriver::new(&data_key).derive_for(b"kw1.cst", &case.salt);
    let header = [
        &[0x01, 0x06][..],
        &u32::try_from(case.key.wrapped.len()).unwrap().to_be_bytes(),
        &case.key.wrapped,
        &case.salt,
        &case.nonce_prefix,
        &commitment[..],
    ]
    .concat();
    assert_eq!(
        hex::encode(&envelope[..header.len()]),
        hex::encode(&header),
        "{name}: header"
    );
    let count = plaintext.len().div_ceil(SEGMENT_PLAINTEXT_LEN).max(1);
    assert_eq!(
        envelope.len(),
        header.len() + plaintext.len() + TAG_LEN * count
    );
    let aad = spec_associated_data(&header, case.tenant, &case.context);
    let aead = Aes256Gcm::new_from_slice(&*stream_key).unwrap();
    let body = &envelope[header.len()..];
    let segments = (0..count)
        .map(|i| {
            let last = i + 1 == count;
            let start = i * SEGMENT_LEN;
            let end = if last {
                body.len()
            } else {
                start + SEGMENT_LEN
            };
            let segment = &body[start..end];
            let nonce: [u8; 12] = [
                &case.nonce_prefix[..],
                &u32::try_from(i).unwrap().to_be_bytes(),
                &[u8::from(last)],
            ]
            .concat()
            .try_into()
            .unwrap();
            let opened = aead
                .decrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: segment,
                        aad: &aad,
                    },
                )
                .unwrap_or_else(|_| panic!("{name}: segment {i} does not open as specified"));
            let from = i * SEGMENT_PLAINTEXT_LEN;
            assert!(
                opened == plaintext[from..from + opened.len()],
                "{name}: segment {i}"
            );
            SegmentJson {
                nonce: hex::encode(nonce),
                plaintext_length: opened.len(),
                tag: hex::encode(&segment[segment.len() - TAG_LEN..]),
            }
        })
        .collect::<Vec<_>>();
    let (plaintext_hex, plaintext_pattern) = match case.plaintext {
        Plaintext::Bytes(bytes) => (Some(hex::encode(bytes)), None),
        Plaintext::Pattern(pattern) => (None, Some(pattern)),
    };
    Vector {
        name,
        data_key: hex::encode(case.key.data_key),
        wrapped_data_key: hex::encode(&case.key.wrapped),
        tenant: case.tenant,
        context: WrittenOrder(&case.context),
        plaintext: plaintext_hex,
        plaintext_pattern,
        salt: hex::encode(case.salt),
        nonce_prefix: hex::encode(case.nonce_prefix),
        commitment: hex::encode(commitment),
        stream_key: hex::encode(*stream_key),
        header: hex::encode(&header),
        associated_data: hex::encode(&aad),
        segments,
        envelope_length: envelope.len(),
        envelope_sha256: hex::encode(Sha256::digest(&envelope)),
        envelope: (envelope.len() <= WHOLE_ENVELOPE_MAX).then(|| hex::encode(&envelope)),
    }
}

fn stored() -> &'static [Value] {
    vector_files::stored(&vectors_path(), "client_stream_vectors", || {
        to_json(&cases().iter().map(seal).collect::<Vec<_>>())
    })
}

#[test]
fn sealing_reproduces_the_stored_vectors() {
    let cases = cases();
    assert_unique_names(cases.iter().map(|c| c.name));
    let fresh: Vec<_> = cases.iter().map(seal).collect();
    assert_stored_equal(&vectors_path(), stored(), &fresh);
}

#[test]
fn every_stored_vector_opens_with_its_data_key_only_and_no_sidecar_reader_takes_it() {
    let cases = cases();
    for (vector, case) in stored().iter().zip(&cases) {
        let name = str_field(vector, "name");
        let data_key = Key256::from_slice(&hex_field(vector, "data_key")).unwrap();
        let tenant = str_field(vector, "tenant");
        let context = context_field(vector);
        let envelope = seal_in_chunks(Provider::RustCrypto, case, &case.plaintext.bytes(), 4096);
        assert_eq!(
            hex::encode(Sha256::digest(&envelope)),
            str_field(vector, "envelope_sha256")
        );
        let header = client_stream::parse_header(&envelope).unwrap().unwrap();
        assert_eq!(
            header.wrapped_data_key,
            &hex_field(vector, "wrapped_data_key")[..]
        );
        for provider in Provider::ALL {
            let opened = client_stream::open(provider, &data_key, &envelope, tenant, &context)
                .unwrap_or_else(|_| panic!("{name}: does not open with {provider}"));
            assert!(*opened == case.plaintext.bytes(), "{name}");
            let other = Key256::from_slice(&[0x55; 32]).unwrap();
            assert!(
                client_stream::open_start(
                    provider,
                    &other,
                    &envelope[..header.len],
                    tenant,
                    &context
                )
                .is_err(),
                "{name}: another key passes the commitment"
            );
        }
        assert!(envelope::parse(&envelope).is_err(), "{name}");
        assert!(stream::parse_header(&envelope).is_err(), "{name}");
        assert!(datakey::parse(&envelope[..header.len]).is_err(), "{name}");
    }
}

#[test]
fn python_reference_checks_every_vector() {
    run_python_reference(
        "tests/reference/client_stream_vectors.py",
        &vectors_path(),
        &format!(
            "python reference: {} client streams checked",
            stored().len()
        ),
    );
}
