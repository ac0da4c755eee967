//! Test vectors for wrapped data keys, suite 0x05 (docs/FORMAT.md, "Wrapped
//! data keys"): a fixed list of cases is wrapped with
//! `envelope::datakey::wrap_with` and compared with
//! tests/data/data_key_vectors.json, which also records the wrapping key (the
//! KDF output) and the associated data. tests/reference/data_key_vectors.py,
//! written from FORMAT.md alone, must unwrap every vector, and must fail to
//! open each one with any other label, tenant, context or bit.
//!
//! To rewrite the file after a deliberate change to the cases:
//!
//! ```text
//! KEYWARDEN_REGENERATE_VECTORS=1 cargo test --test data_key_vectors
//! ```

use std::path::PathBuf;

use keywarden::envelope::{
    self, EnvelopeKey, KeyRef, MessageKeyDeriver, Provider, datakey, stream, wrap,
};
use keywarden::secret::Key256;
use serde::Serialize;
use serde_json::Value;

#[path = "common/vectors.rs"]
mod vector_files;

use vector_files::{
    KeyRefJson, SUBJECT_KEY, SUBJECT_KEY_ID, WrittenOrder, assert_stored_equal,
    assert_unique_names, context_field, context_of, hex_field, key_ref_of, pairs, pattern, repo,
    run_python_reference, spec_associated_data, spec_key_ref, str_field, to_json,
};

fn vectors_path() -> PathBuf {
    repo().join("tests/data/data_key_vectors.json")
}

struct Case {
    name: &'static str,
    key: [u8; 32],
    key_ref: KeyRef,
    tenant: &'static str,
    context: Vec<(String, String)>,
    data_key: [u8; 32],
    salt: [u8; 16],
    nonce: [u8; 12],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "data-key-under-tenant-key-version-1",
            key: pattern(0x00, 1),
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: pairs(&[("object", "export-7")]),
            data_key: pattern(0x40, 0x03),
            salt: pattern(0x10, 0x11),
            nonce: pattern(0x20, 0x03),
        },
        Case {
            // Version 0x00000102 checks big-endian order; no context.
            name: "data-key-under-tenant-key-version-258-empty-context",
            key: pattern(0x80, 0x05),
            key_ref: KeyRef::Tenant { version: 0x0102 },
            tenant: "acme-corp.eu_1",
            context: vec![],
            data_key: [0xff; 32],
            salt: [0; 16],
            nonce: [0xff; 12],
        },
        Case {
            // A subject key; the context written out of byte order, with a
            // non-ASCII key and an empty value.
            name: "data-key-under-subject-key",
            key: SUBJECT_KEY,
            key_ref: KeyRef::Subject {
                id: SUBJECT_KEY_ID,
                version: 1,
            },
            tenant: "acme",
            context: pairs(&[("zone", "eu"), ("ＡＢＣ", ""), ("bucket", "exports")]),
            data_key: pattern(0x07, 0x0b),
            salt: pattern(0x6d, 0x29),
            nonce: pattern(0x0f, 0x31),
        },
        Case {
            name: "data-key-under-tenant-key-version-4294967295",
            key: pattern(0xe0, 0x07),
            key_ref: KeyRef::Tenant { version: u32::MAX },
            tenant: "t",
            context: pairs(&[("k", "v")]),
            data_key: [0; 32],
            salt: pattern(0x01, 0x02),
            nonce: pattern(0x03, 0x04),
        },
    ]
}

/// One entry of tests/data/data_key_vectors.json. Byte strings are hex.
#[derive(Serialize)]
struct Vector<'a> {
    name: &'a str,
    /// The tenant or subject key that wraps.
    key: String,
    key_ref: KeyRefJson,
    tenant: &'a str,
    context: WrittenOrder<'a>,
    data_key: String,
    salt: String,
    nonce: String,
    /// KDF(key, "kw1.dky", salt): the AES-256-GCM key of the wrap.
    wrap_key: String,
    associated_data: String,
    wrapped: String,
}

fn seal(case: &Case) -> Vector<'_> {
    let key = Key256::from_slice(&case.key).unwrap();
    let data_key = Key256::from_slice(&case.data_key).unwrap();
    let context = context_of(&case.context);
    let sealed: Vec<Vec<u8>> = Provider::ALL
        .iter()
        .map(|&provider| {
            datakey::wrap_with(
                &EnvelopeKey::new(provider, &key),
                case.key_ref,
                case.tenant,
                &context,
                &data_key,
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
    // The header as FORMAT.md spells it, built here, not by the implementation.
    let header = [
        &[0x01, 0x05][..],
        &spec_key_ref(case.key_ref),
        &case.salt,
        &case.nonce,
    ]
    .concat();
    assert_eq!(wrapped[..header.len()], header[..], "{}", case.name);
    assert_eq!(wrapped.len(), header.len() + 32 + 16, "{}", case.name);
    Vector {
        name: case.name,
        key: hex::encode(case.key),
        key_ref: case.key_ref.into(),
        tenant: case.tenant,
        context: WrittenOrder(&case.context),
        data_key: hex::encode(case.data_key),
        salt: hex::encode(case.salt),
        nonce: hex::encode(case.nonce),
        wrap_key: hex::encode(*MessageKeyDeriver::new(&key).derive_for(b"kw1.dky", &case.salt)),
        associated_data: hex::encode(spec_associated_data(&header, case.tenant, &case.context)),
        wrapped: hex::encode(&wrapped),
    }
}

fn stored() -> &'static [Value] {
    vector_files::stored(&vectors_path(), "data_key_vectors", || {
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
fn every_stored_vector_unwraps_for_its_tenant_and_context_only_and_no_other_reader_takes_it() {
    for vector in stored() {
        let name = str_field(vector, "name");
        let key = Key256::from_slice(&hex_field(vector, "key")).unwrap();
        let wrapped = hex_field(vector, "wrapped");
        let tenant = str_field(vector, "tenant");
        let context = context_field(vector);
        assert_eq!(datakey::parse(&wrapped), Ok(key_ref_of(vector)), "{name}");
        for provider in Provider::ALL {
            let k = EnvelopeKey::new(provider, &key);
            let opened = datakey::unwrap(&k, &wrapped, tenant, &context).unwrap();
            assert_eq!(hex::encode(opened.expose()), str_field(vector, "data_key"));
            assert!(datakey::unwrap(&k, &wrapped, &format!("{tenant}x"), &context).is_err());
            let mut other = context.clone();
            other.insert("extra".into(), String::new());
            assert!(datakey::unwrap(&k, &wrapped, tenant, &other).is_err());
        }
        assert!(envelope::parse(&wrapped).is_err(), "{name}");
        assert!(stream::parse_header(&wrapped).is_err(), "{name}");
        assert!(wrap::parse_wrapped(&wrapped).is_err(), "{name}");
    }
}

#[test]
fn python_reference_unwraps_every_vector() {
    run_python_reference(
        "tests/reference/data_key_vectors.py",
        &vectors_path(),
        &format!(
            "python reference: {} wrapped data keys unwrapped",
            stored().len()
        ),
    );
}
