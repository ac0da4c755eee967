//! Test vectors for stored-key wraps (docs/FORMAT.md, "How subject keys are
//! stored"): a fixed list of cases is wrapped with
//! `envelope::wrap::wrap_key_with` and compared with
//! tests/data/wrap_vectors.json, which also records the derived key and the
//! associated data. tests/reference/unwrap_key_vectors.py, written from
//! FORMAT.md alone, must unwrap every vector, and must fail to open each one
//! with the data plane's KDF label.
//!
//! To rewrite the file after a deliberate change to the cases:
//!
//! ```text
//! KEYWARDEN_REGENERATE_VECTORS=1 cargo test --test wrap_vectors
//! ```

use std::path::PathBuf;

use keywarden::envelope::{
    self, EnvelopeKey, MessageKeyDeriver, Provider,
    wrap::{self, KeyDomain, WrapHeader},
};
use keywarden::secret::Key256;
use serde::Serialize;
use serde_json::Value;

#[path = "common/vectors.rs"]
mod vector_files;

use vector_files::{
    SUBJECT_KEY, SUBJECT_KEY_ID, assert_stored_equal, assert_unique_names, hex_field, pattern,
    repo, run_python_reference, str_field, to_json, u32_field,
};

fn vectors_path() -> PathBuf {
    repo().join("tests/data/wrap_vectors.json")
}

struct Case {
    name: &'static str,
    wrapping_key: [u8; 32],
    tenant_version: u32,
    tenant: &'static str,
    domain: KeyDomain,
    /// What names the key in its domain: a subject key id, or an index
    /// key's `[version]_32`.
    binding: Vec<u8>,
    key: [u8; 32],
    salt: [u8; 16],
    nonce: [u8; 12],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            // The subject key of tests/vectors.rs, as it is stored today;
            // version 0x00000102 checks big-endian order.
            name: "subject-key-wrapped-by-tenant-key-version-258",
            wrapping_key: pattern(0x80, 0x05),
            tenant_version: 0x0102,
            tenant: "acme",
            domain: KeyDomain::SubjectKey,
            binding: SUBJECT_KEY_ID.to_vec(),
            key: SUBJECT_KEY,
            salt: pattern(0x6d, 0x29),
            nonce: pattern(0x0f, 0x31),
        },
        Case {
            name: "subject-key-wrapped-by-tenant-key-version-1",
            wrapping_key: pattern(0x00, 0x01),
            tenant_version: 1,
            tenant: "acme-corp.eu_1",
            domain: KeyDomain::SubjectKey,
            binding: pattern::<16>(0xf0, 0x03).to_vec(),
            key: pattern(0x11, 0x07),
            salt: [0u8; 16],
            nonce: [0xff; 12],
        },
        Case {
            // Issue 17: blind-index key version 2 (binding [2]_32), domain
            // 0x02, wrapped by tenant key version 3.
            name: "blind-index-key-version-2-wrapped-by-tenant-key-version-3",
            wrapping_key: pattern(0x80, 0x05),
            tenant_version: 3,
            tenant: "acme",
            domain: KeyDomain::BlindIndexKey,
            binding: 2u32.to_be_bytes().to_vec(),
            key: pattern(0xf0, 0x03),
            salt: pattern(0x21, 0x13),
            nonce: pattern(0x5a, 0x01),
        },
    ]
}

/// One entry of tests/data/wrap_vectors.json. Byte strings are lowercase hex.
#[derive(Serialize)]
struct Vector<'a> {
    name: &'a str,
    domain: &'static str,
    wrapping_key: String,
    tenant_version: u32,
    tenant: &'a str,
    /// The binding: for a subject key, its subject key id.
    binding: String,
    /// The stored key itself.
    key: String,
    salt: String,
    nonce: String,
    /// The KDF output for the wrapping key, the domain's label and the salt.
    wrap_key: String,
    associated_data: String,
    /// The stored form.
    wrapped: String,
}

/// The associated data as FORMAT.md spells it.
fn spec_associated_data(header: &[u8], tenant: &str, binding: &[u8]) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(&u32::try_from(tenant.len()).unwrap().to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&u32::try_from(binding.len()).unwrap().to_be_bytes());
    aad.extend_from_slice(binding);
    aad
}

/// The domain's name in the vector file.
fn domain_name(domain: KeyDomain) -> &'static str {
    match domain {
        KeyDomain::SubjectKey => "subject-key",
        KeyDomain::BlindIndexKey => "blind-index-key",
    }
}

/// The domain's KDF label, from the specification.
fn label(domain: KeyDomain) -> &'static [u8; 7] {
    match domain {
        KeyDomain::SubjectKey => b"kw1.skw",
        KeyDomain::BlindIndexKey => b"kw1.ikw",
    }
}

fn domain_of(name: &str) -> KeyDomain {
    match name {
        "subject-key" => KeyDomain::SubjectKey,
        "blind-index-key" => KeyDomain::BlindIndexKey,
        other => panic!("unknown domain {other:?}"),
    }
}

fn seal(case: &Case) -> Vector<'_> {
    let wrapping = Key256::from_slice(&case.wrapping_key).unwrap();
    let key = Key256::from_slice(&case.key).unwrap();
    let sealed: Vec<Vec<u8>> = Provider::ALL
        .iter()
        .map(|&provider| {
            wrap::wrap_key_with(
                &EnvelopeKey::new(provider, &wrapping),
                case.domain,
                case.tenant_version,
                case.tenant,
                &case.binding,
                &key,
                &case.salt,
                &case.nonce,
            )
            .unwrap()
        })
        .collect();
    let wrapped = sealed[0].clone();
    assert!(
        sealed.iter().all(|s| *s == wrapped),
        "{}: providers differ",
        case.name
    );
    assert_eq!(wrapped.len(), 83);
    let header = &wrapped[..wrap::WRAP_HEADER_LEN];
    Vector {
        name: case.name,
        domain: domain_name(case.domain),
        wrapping_key: hex::encode(case.wrapping_key),
        tenant_version: case.tenant_version,
        tenant: case.tenant,
        binding: hex::encode(&case.binding),
        key: hex::encode(case.key),
        salt: hex::encode(case.salt),
        nonce: hex::encode(case.nonce),
        wrap_key: hex::encode(
            *MessageKeyDeriver::new(&wrapping).derive_for(label(case.domain), &case.salt),
        ),
        associated_data: hex::encode(spec_associated_data(header, case.tenant, &case.binding)),
        wrapped: hex::encode(&wrapped),
    }
}

fn stored() -> &'static [Value] {
    vector_files::stored(&vectors_path(), "wrap_vectors", || {
        to_json(&cases().iter().map(seal).collect::<Vec<_>>())
    })
}

#[test]
fn wrapping_reproduces_the_stored_vectors() {
    let cases = cases();
    assert_unique_names(cases.iter().map(|c| c.name));
    let fresh: Vec<_> = cases.iter().map(seal).collect();
    assert_stored_equal(&vectors_path(), stored(), &fresh);
}

#[test]
fn every_stored_vector_unwraps_for_its_binding_only_and_never_on_the_data_plane() {
    for vector in stored() {
        let name = str_field(vector, "name");
        let wrapping = Key256::from_slice(&hex_field(vector, "wrapping_key")).unwrap();
        let wrapped = hex_field(vector, "wrapped");
        let tenant = str_field(vector, "tenant");
        let binding = hex_field(vector, "binding");
        let domain = domain_of(str_field(vector, "domain"));
        let other_domain = match domain {
            KeyDomain::SubjectKey => KeyDomain::BlindIndexKey,
            KeyDomain::BlindIndexKey => KeyDomain::SubjectKey,
        };
        assert_eq!(
            wrap::parse_wrapped(&wrapped),
            Ok(WrapHeader {
                domain,
                tenant_version: u32_field(vector, "tenant_version"),
            }),
            "{name}"
        );
        for provider in Provider::ALL {
            let key = EnvelopeKey::new(provider, &wrapping);
            let opened = wrap::unwrap_key(&key, domain, &wrapped, tenant, &binding).unwrap();
            assert_eq!(
                hex::encode(opened.expose()),
                str_field(vector, "key"),
                "{name}"
            );
            let mut other = binding.clone();
            other[0] ^= 1;
            assert!(wrap::unwrap_key(&key, domain, &wrapped, tenant, &other).is_err());
            // Not in another domain, even with the domain byte rewritten.
            assert!(wrap::unwrap_key(&key, other_domain, &wrapped, tenant, &binding).is_err());
            let mut moved = wrapped.clone();
            moved[2] ^= 0x03;
            assert!(wrap::unwrap_key(&key, other_domain, &moved, tenant, &binding).is_err());
            // The data plane refuses it outright.
            assert!(envelope::parse(&wrapped).is_err(), "{name}");
        }
    }
}

#[test]
fn python_reference_unwraps_every_vector() {
    run_python_reference(
        "tests/reference/unwrap_key_vectors.py",
        &vectors_path(),
        &format!(
            "python reference: {} wrapped keys unwrapped",
            stored().len()
        ),
    );
}
