//! Test vectors for streaming envelopes (docs/FORMAT.md, "Streaming
//! envelopes").
//!
//! A fixed list of cases (key, key reference, tenant, context, plaintext,
//! salt, nonce prefix) is sealed with `StreamSealer::start_with`, by every
//! crypto provider and in several chunkings that must all give the same
//! envelope, and compared with tests/data/stream_vectors.json. The file
//! records each stream key, header, associated data, and every segment's
//! nonce and tag, so that other implementations can debug theirs. Large
//! plaintexts are written as a formula (byte `i` is `(multiplier * i +
//! increment) mod 256`) and their envelopes by length and SHA-256; small
//! envelopes are also stored whole. tests/reference/decrypt_stream_vectors.py,
//! an independent implementation written from docs/FORMAT.md, must reproduce
//! and decrypt every vector and refuse rearranged segments.
//!
//! To rewrite the file after a deliberate change to the cases (never to the
//! format: a format change needs a new version or suite byte):
//!
//! ```text
//! KEYWARDEN_REGENERATE_VECTORS=1 cargo test --test stream_vectors
//! ```

use std::path::PathBuf;

use aes_gcm::{Aes256Gcm, KeyInit, Nonce, aead::Aead, aead::Payload};
use keywarden::envelope::{
    self, EnvelopeKey, KeyRef, MessageKeyDeriver, Provider,
    stream::{self, StreamOpener, StreamSealer},
};
use keywarden::secret::Key256;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

#[path = "common/vectors.rs"]
mod vector_files;

use vector_files::{
    KeyRefJson, WrittenOrder, assert_stored_equal, assert_unique_names, context_field, context_of,
    field, hex_field, key_ref_of, pairs, pattern, repo, run_python_reference, spec_associated_data,
    spec_key_ref, str_field, to_json, u64_field,
};

/// The specification's numbers, written out here rather than taken from the
/// implementation.
const SEGMENT_LEN: usize = 65_536;
const TAG_LEN: usize = 16;
const SEGMENT_PLAINTEXT_LEN: usize = SEGMENT_LEN - TAG_LEN;
const STREAM_LABEL: &[u8; 7] = b"kw1.stm";
const SUITE_STREAM: u8 = 0x02;
/// Envelopes up to this many bytes are also stored whole, in hex.
const WHOLE_ENVELOPE_MAX: usize = 4096;

fn vectors_path() -> PathBuf {
    repo().join("tests/data/stream_vectors.json")
}

/// A case's plaintext: given bytes, or a [`Pattern`].
enum Plaintext {
    Bytes(&'static [u8]),
    Pattern(Pattern),
}

/// `length` bytes, byte `i` being `(multiplier * i + increment) mod 256`;
/// written to the vector file as it is.
#[derive(Clone, Copy, Serialize)]
struct Pattern {
    length: usize,
    multiplier: u8,
    increment: u8,
}

/// The pattern of the large cases: byte `i` is `(31 * i + 7) mod 256`.
fn formula(length: usize) -> Plaintext {
    Plaintext::Pattern(Pattern {
        length,
        multiplier: 31,
        increment: 7,
    })
}

impl Plaintext {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Plaintext::Bytes(bytes) => bytes.to_vec(),
            Plaintext::Pattern(p) => {
                pattern_bytes(p.length, u64::from(p.multiplier), u64::from(p.increment))
            }
        }
    }
}

fn pattern_bytes(length: usize, multiplier: u64, increment: u64) -> Vec<u8> {
    (0..length as u64)
        .map(|i| ((multiplier * i + increment) % 256) as u8)
        .collect()
}

/// One vector's inputs. The context is kept in the order it is written here,
/// which is deliberately not byte order in some cases.
struct Case {
    name: &'static str,
    key: [u8; 32],
    key_ref: KeyRef,
    tenant: &'static str,
    context: Vec<(String, String)>,
    plaintext: Plaintext,
    salt: [u8; 16],
    nonce_prefix: [u8; 7],
}

fn cases() -> Vec<Case> {
    let tenant_key_1 = pattern::<32>(0x00, 1);
    let object = |name: &str| pairs(&[("object", name)]);
    let p = SEGMENT_PLAINTEXT_LEN;
    vec![
        Case {
            // One segment, the last, holding no plaintext: 16 bytes of tag.
            name: "tenant-key-empty-plaintext-empty-context",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: vec![],
            plaintext: Plaintext::Bytes(b""),
            salt: pattern(0xa0, 1),
            nonce_prefix: pattern(0xb0, 1),
        },
        Case {
            name: "tenant-key-1-byte-plaintext",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: object("backup-7"),
            plaintext: Plaintext::Bytes(b"*"),
            salt: pattern(0x10, 0x11),
            nonce_prefix: pattern(0x20, 0x03),
        },
        Case {
            // Written order is not byte order ("bucket" < "object").
            name: "tenant-key-version-7-short-text-2-entry-context",
            key: pattern(0xff, 0xf9),
            key_ref: KeyRef::Tenant { version: 7 },
            tenant: "tenant-0042.eu",
            context: pairs(&[("object", "scans/2024/0042.pdf"), ("bucket", "eu-archive")]),
            plaintext: Plaintext::Bytes(b"A short object, sealed as a stream of one segment."),
            salt: pattern(0x01, 0x25),
            nonce_prefix: pattern(0xee, 0x13),
        },
        Case {
            // Exactly one full segment, which is the last: 65,536 bytes.
            name: "tenant-key-one-full-segment",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: object("one-segment"),
            plaintext: formula(p),
            salt: pattern(0x3c, 0x4b),
            nonce_prefix: pattern(0x71, 0x0d),
        },
        Case {
            // A full segment, then a last segment of 1 byte.
            name: "tenant-key-one-segment-plus-1-byte",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: object("one-segment-plus-one"),
            plaintext: formula(p + 1),
            salt: pattern(0x99, 0x35),
            nonce_prefix: pattern(0x5a, 0x07),
        },
        Case {
            // Two full segments, the second the last; the largest key version.
            name: "tenant-key-max-version-two-full-segments",
            key: pattern(0xd2, 0x17),
            key_ref: KeyRef::Tenant { version: u32::MAX },
            tenant: "acme-corp.eu_1",
            context: object("two-segments"),
            plaintext: formula(2 * p),
            salt: [0u8; 16],
            nonce_prefix: [0xff; 7],
        },
        Case {
            // Three full segments and a last one of 5 bytes; version 0x102
            // checks big-endian order.
            name: "tenant-key-version-258-three-segments-plus-5-bytes",
            key: pattern(0x80, 0x05),
            key_ref: KeyRef::Tenant { version: 0x0102 },
            tenant: "acme",
            context: pairs(&[("object", "backup-2024-06.tar"), ("bucket", "eu-archive")]),
            plaintext: formula(3 * p + 5),
            salt: pattern(0x6d, 0x29),
            nonce_prefix: pattern(0x0f, 0x31),
        },
        Case {
            name: "subject-key-version-2-short-text",
            key: pattern(0x9c, 0x3b),
            key_ref: KeyRef::Subject {
                id: pattern(0x5e, 0x1f),
                version: 2,
            },
            tenant: "acme",
            context: pairs(&[("table", "users"), ("column", "avatar")]),
            plaintext: Plaintext::Bytes(b"alice's avatar, streamed"),
            salt: pattern(0x33, 0x0b),
            nonce_prefix: pattern(0x44, 0x1d),
        },
    ]
}

#[derive(Serialize)]
struct SegmentJson {
    /// The AES-GCM nonce: prefix || [i]_32 || last flag.
    nonce: String,
    /// Plaintext bytes of the segment; the segment is 16 bytes more.
    plaintext_length: usize,
    /// The segment's last 16 bytes.
    tag: String,
}

/// One entry of tests/data/stream_vectors.json. Byte strings are lowercase
/// hex. Exactly one of `plaintext` and `plaintext_pattern` is present.
#[derive(Serialize)]
struct Vector<'a> {
    name: &'a str,
    key: String,
    key_ref: KeyRefJson,
    tenant: &'a str,
    context: WrittenOrder<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext_pattern: Option<Pattern>,
    salt: String,
    nonce_prefix: String,
    /// The KDF output for `key` and `salt` with the label `kw1.stm`.
    stream_key: String,
    /// The envelope's first bytes, up to the first segment.
    header: String,
    /// Header, tenant and context as every segment's associated data.
    associated_data: String,
    segments: Vec<SegmentJson>,
    envelope_length: usize,
    envelope_sha256: String,
    /// The whole envelope, when it has at most [`WHOLE_ENVELOPE_MAX`] bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    envelope: Option<String>,
}

/// The inputs of a stream: a case's, or a stored vector's.
struct Inputs<'a> {
    key_ref: KeyRef,
    tenant: &'a str,
    context: envelope::Context,
    salt: &'a [u8],
    nonce_prefix: &'a [u8],
}

impl Case {
    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            key_ref: self.key_ref,
            tenant: self.tenant,
            context: context_of(&self.context),
            salt: &self.salt,
            nonce_prefix: &self.nonce_prefix,
        }
    }
}

/// Seals `plaintext` fed in chunks of `chunk` bytes.
fn seal_stream(
    key: &EnvelopeKey,
    inputs: &Inputs<'_>,
    plaintext: &[u8],
    chunk: usize,
) -> Result<Vec<u8>, envelope::SealError> {
    let salt_and_prefix = [inputs.salt, inputs.nonce_prefix].concat();
    let (mut sealer, mut envelope) = StreamSealer::start_with(
        key,
        inputs.key_ref,
        inputs.tenant,
        &inputs.context,
        salt_and_prefix[..]
            .try_into()
            .expect("16-byte salt, 7-byte nonce prefix"),
    )?;
    for part in plaintext.chunks(chunk) {
        sealer.push(part, &mut envelope)?;
    }
    sealer.finish(&mut envelope)?;
    Ok(envelope)
}

/// The header, from the specification.
fn spec_header(case: &Case) -> Vec<u8> {
    [
        &[0x01, SUITE_STREAM][..],
        &spec_key_ref(case.key_ref),
        &case.salt,
        &case.nonce_prefix,
    ]
    .concat()
}

/// Segment `i`'s nonce, from the specification.
fn spec_nonce(prefix: &[u8], i: usize, last: bool) -> [u8; 12] {
    [
        prefix,
        &u32::try_from(i).unwrap().to_be_bytes(),
        &[u8::from(last)],
    ]
    .concat()
    .try_into()
    .unwrap()
}

/// How many segments a plaintext of `n` bytes takes, by the specification.
fn spec_segment_count(n: usize) -> usize {
    n.div_ceil(SEGMENT_PLAINTEXT_LEN).max(1)
}

/// Seals a case with every provider and in several chunkings; they must
/// agree byte for byte. Each segment is then opened on its own with plain
/// AES-256-GCM under the recorded stream key, where the specification says
/// it lies.
fn seal(case: &Case) -> Vector<'_> {
    let name = case.name;
    let key = Key256::from_slice(&case.key).unwrap();
    let plaintext = case.plaintext.bytes();
    let mut sealed = Vec::new();
    for provider in Provider::ALL {
        let envelope_key = EnvelopeKey::new(provider, &key);
        for chunk in [
            usize::MAX,
            1000,
            SEGMENT_PLAINTEXT_LEN,
            SEGMENT_PLAINTEXT_LEN + 1,
        ] {
            let envelope = seal_stream(&envelope_key, &case.inputs(), &plaintext, chunk)
                .unwrap_or_else(|e| panic!("{name}: {provider} seal failed: {e}"));
            sealed.push((provider, chunk, envelope));
        }
    }
    let envelope = sealed[0].2.clone();
    for (provider, chunk, other) in &sealed {
        assert!(
            *other == envelope,
            "{name}: {provider} in chunks of {chunk} seals differently"
        );
    }

    let header = spec_header(case);
    assert_eq!(
        hex::encode(&envelope[..header.len()]),
        hex::encode(&header),
        "{name}: header"
    );
    let count = spec_segment_count(plaintext.len());
    assert_eq!(
        envelope.len(),
        header.len() + plaintext.len() + TAG_LEN * count,
        "{name}: overhead"
    );
    let aad = spec_associated_data(&header, case.tenant, &case.context);
    assert_eq!(
        aad,
        envelope::associated_data(&header, case.tenant, &context_of(&case.context))
            .expect("short fields encode"),
        "{name}: the implementation's associated data differs from the specification's"
    );
    let stream_key = MessageKeyDeriver::new(&key).derive_for(STREAM_LABEL, &case.salt);
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
            let nonce = spec_nonce(&case.nonce_prefix, i, last);
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
                "{name}: segment {i}'s plaintext"
            );
            SegmentJson {
                nonce: hex::encode(nonce),
                plaintext_length: opened.len(),
                tag: hex::encode(&segment[segment.len() - TAG_LEN..]),
            }
        })
        .collect::<Vec<_>>();
    assert_eq!(
        segments.iter().map(|s| s.plaintext_length).sum::<usize>(),
        plaintext.len(),
        "{name}: segments hold the whole plaintext"
    );

    let (plaintext_hex, plaintext_pattern) = match case.plaintext {
        Plaintext::Bytes(bytes) => (Some(hex::encode(bytes)), None),
        Plaintext::Pattern(pattern) => (None, Some(pattern)),
    };
    Vector {
        name,
        key: hex::encode(case.key),
        key_ref: case.key_ref.into(),
        tenant: case.tenant,
        context: WrittenOrder(&case.context),
        plaintext: plaintext_hex,
        plaintext_pattern,
        salt: hex::encode(case.salt),
        nonce_prefix: hex::encode(case.nonce_prefix),
        stream_key: hex::encode(*stream_key),
        header: hex::encode(&header),
        associated_data: hex::encode(&aad),
        segments,
        envelope_length: envelope.len(),
        envelope_sha256: hex::encode(Sha256::digest(&envelope)),
        envelope: (envelope.len() <= WHOLE_ENVELOPE_MAX).then(|| hex::encode(&envelope)),
    }
}

/// The stored vectors (rewritten first when regenerating).
fn stored() -> &'static [Value] {
    vector_files::stored(&vectors_path(), "stream_vectors", || {
        to_json(&cases().iter().map(seal).collect::<Vec<_>>())
    })
}

#[test]
fn sealing_reproduces_the_stored_vectors() {
    let cases = cases();
    let fresh: Vec<_> = cases.iter().map(seal).collect();
    assert_stored_equal(&vectors_path(), stored(), &fresh);
}

#[test]
fn the_cases_cover_what_the_format_needs() {
    let cases = cases();
    assert_unique_names(cases.iter().map(|c| c.name));
    let p = SEGMENT_PLAINTEXT_LEN;
    let lengths: Vec<usize> = cases.iter().map(|c| c.plaintext.bytes().len()).collect();
    for needed in [0, 1, p, p + 1, 2 * p] {
        assert!(lengths.contains(&needed), "a case of {needed} bytes");
    }
    assert!(
        lengths.iter().any(|&n| n > 3 * p && n < 4 * p),
        "a case of three segments and a few bytes"
    );
    assert!(
        cases
            .iter()
            .any(|c| matches!(c.key_ref, KeyRef::Subject { .. }))
    );
    assert!(
        cases
            .iter()
            .any(|c| c.context.len() == 2 && !c.context.is_sorted())
    );
    assert!(
        cases
            .iter()
            .any(|c| c.plaintext.bytes().is_empty() && c.context.is_empty())
    );
}

/// A stored vector's plaintext, from its hex or its pattern.
fn plaintext_of(vector: &Value) -> Vec<u8> {
    match vector.get("plaintext_pattern") {
        Some(pattern) => pattern_bytes(
            u64_field(pattern, "length") as usize,
            u64_field(pattern, "multiplier"),
            u64_field(pattern, "increment"),
        ),
        None => hex_field(vector, "plaintext"),
    }
}

/// Opens `envelope` fed in chunks of `chunk` bytes: the plaintext released,
/// and whether the stream ended cleanly.
fn open_stream(
    key: &EnvelopeKey,
    envelope: &[u8],
    tenant: &str,
    context: &envelope::Context,
    chunk: usize,
) -> (Vec<u8>, Result<KeyRef, envelope::Undecryptable>) {
    let mut released = Vec::new();
    let result = (|| {
        let header = stream::parse_header(envelope)?.ok_or(envelope::Undecryptable)?;
        let (head, body) = envelope.split_at(header.len);
        let mut opener = StreamOpener::start(key, head, tenant, context)?;
        for part in body.chunks(chunk) {
            opener.push(part, &mut released)?;
        }
        opener.finish(&mut released)?;
        Ok(header.key_ref)
    })();
    (released, result)
}

/// Every stored vector, rebuilt from its inputs, matches its recorded hash
/// and opens with every provider in any chunking; for another tenant or
/// context, or cut by a byte, it does not, and releases only authentic
/// plaintext.
#[test]
fn every_stored_vector_opens_with_every_provider() {
    for vector in stored() {
        let name = str_field(vector, "name");
        let key = Key256::from_slice(&hex_field(vector, "key")).expect("32-byte key");
        let tenant = str_field(vector, "tenant");
        let context = context_field(vector);
        let plaintext = plaintext_of(vector);
        let salt: [u8; 16] = hex_field(vector, "salt").try_into().expect("16-byte salt");
        assert_eq!(
            hex::encode(*MessageKeyDeriver::new(&key).derive_for(STREAM_LABEL, &salt)),
            str_field(vector, "stream_key"),
            "{name}: stream key"
        );

        // The envelope: stored whole, or rebuilt by sealing the stored
        // inputs and checked against the stored hash.
        let envelope = match vector.get("envelope") {
            Some(_) => hex_field(vector, "envelope"),
            None => {
                let inputs = Inputs {
                    key_ref: key_ref_of(vector),
                    tenant,
                    context: context.clone(),
                    salt: &salt,
                    nonce_prefix: &hex_field(vector, "nonce_prefix"),
                };
                let key = EnvelopeKey::new(Provider::default(), &key);
                seal_stream(&key, &inputs, &plaintext, usize::MAX).unwrap()
            }
        };
        assert_eq!(
            envelope.len() as u64,
            u64_field(vector, "envelope_length"),
            "{name}: length"
        );
        assert_eq!(
            hex::encode(Sha256::digest(&envelope)),
            str_field(vector, "envelope_sha256"),
            "{name}: SHA-256"
        );
        assert_eq!(
            field(vector, "segments").as_array().unwrap().len(),
            spec_segment_count(plaintext.len()),
            "{name}: segments"
        );

        let other_tenant = format!("{tenant}x");
        let mut other_context = context.clone();
        other_context.insert("extra".into(), String::new());
        for provider in Provider::ALL {
            let key = EnvelopeKey::new(provider, &key);
            for chunk in [1, 4096, SEGMENT_LEN, SEGMENT_LEN + 1, usize::MAX] {
                if chunk == 1 && envelope.len() > WHOLE_ENVELOPE_MAX {
                    continue;
                }
                let (released, end) = open_stream(&key, &envelope, tenant, &context, chunk);
                assert_eq!(end, Ok(key_ref_of(vector)), "{name}: {provider}/{chunk}");
                assert!(
                    released == plaintext,
                    "{name}: {provider}/{chunk}: plaintext"
                );
            }
            let failures = [
                (
                    "another tenant",
                    &envelope[..],
                    other_tenant.as_str(),
                    &context,
                ),
                ("another context", &envelope[..], tenant, &other_context),
                (
                    "cut by a byte",
                    &envelope[..envelope.len() - 1],
                    tenant,
                    &context,
                ),
            ];
            for (what, envelope, tenant, context) in failures {
                let (released, end) = open_stream(&key, envelope, tenant, context, usize::MAX);
                assert!(end.is_err(), "{name}: {provider}: {what} opens");
                assert!(
                    released.len() % SEGMENT_PLAINTEXT_LEN == 0
                        && released == plaintext[..released.len()],
                    "{name}: {provider}: {what}: only whole authentic segments are released"
                );
            }
        }
    }
}

#[test]
fn python_reference_checks_every_vector() {
    run_python_reference(
        "tests/reference/decrypt_stream_vectors.py",
        &vectors_path(),
        &format!(
            "python reference: {} stream vectors checked",
            stored().len()
        ),
    );
}
