//! Test vectors for deterministic envelopes, suite 0x04 (docs/FORMAT.md,
//! "Deterministic envelopes").
//!
//! A fixed list of cases (key, key reference, tenant, context, plaintext) is
//! sealed with `envelope::seal_deterministic` and compared with
//! tests/data/deterministic_vectors.json, which also records each SIV key
//! and the associated data so that other implementations can debug their
//! KDF and S2V input. tests/reference/decrypt_deterministic_vectors.py, an
//! independent implementation written from docs/FORMAT.md, must decrypt
//! every vector and reseal it to the same bytes.
//!
//! To rewrite the file after a deliberate change to the cases (never to the
//! format: a format change needs a new suite byte):
//!
//! ```text
//! KEYWARDEN_REGENERATE_VECTORS=1 cargo test --test deterministic_vectors
//! ```

use std::path::PathBuf;

use keywarden::envelope::{self, EnvelopeKey, KeyRef, MessageKeyDeriver, Mode, Provider};
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

/// The KDF label of the SIV key, and its fixed context.
const SIV_LABEL: &[u8; 7] = b"kw1.siv";
const SIV_KEY_CONTEXT: [u8; 16] = [0; 16];
const SIV_LEN: usize = 16;

fn vectors_path() -> PathBuf {
    repo().join("tests/data/deterministic_vectors.json")
}

/// One vector's inputs; the context is kept in the order written here.
struct Case {
    name: &'static str,
    key: [u8; 32],
    key_ref: KeyRef,
    tenant: &'static str,
    context: Vec<(String, String)>,
    plaintext: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let tenant_key_1 = pattern::<32>(0x00, 1);
    vec![
        Case {
            name: "tenant-key-empty-plaintext-empty-context",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: vec![],
            plaintext: vec![],
        },
        Case {
            name: "tenant-key-1-byte-plaintext",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: pairs(&[("column", "ssn")]),
            plaintext: b"*".to_vec(),
        },
        Case {
            // Exactly one block: S2V's other branch (xorend, not dbl and pad).
            name: "tenant-key-16-byte-plaintext",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: pairs(&[("column", "email")]),
            plaintext: b"ada@example.com!".to_vec(),
        },
        Case {
            // The same plaintext as above for another tenant: another
            // envelope, though key and context are the same.
            name: "tenant-key-16-byte-plaintext-other-tenant",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme2",
            context: pairs(&[("column", "email")]),
            plaintext: b"ada@example.com!".to_vec(),
        },
        Case {
            name: "tenant-key-3-entry-context-unordered-utf8",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: pairs(&[
                ("🔑", "Schlüssel"),
                ("zone", "eu-west-1"),
                ("ＡＢＣ", "größe ✓"),
            ]),
            plaintext: "field value ✓".as_bytes().to_vec(),
        },
        Case {
            name: "tenant-key-version-258-100-byte-plaintext",
            key: pattern(0xff, 0xf9),
            key_ref: KeyRef::Tenant { version: 0x0102 },
            tenant: "tenant-0042.eu",
            context: pairs(&[("table", "patients"), ("column", "diagnosis")]),
            plaintext: b"Diagnosis: seasonal allergic rhinitis; prescribed cetirizine 10 mg once daily for 14 days; GP review"
                .to_vec(),
        },
        Case {
            name: "tenant-key-max-version",
            key: pattern(0xd2, 0x17),
            key_ref: KeyRef::Tenant { version: u32::MAX },
            tenant: "acme-corp.eu_1",
            context: pairs(&[("k", "v")]),
            plaintext: b"17 bytes of text!".to_vec(),
        },
        Case {
            name: "subject-key-version-1",
            key: SUBJECT_KEY,
            key_ref: KeyRef::Subject {
                id: SUBJECT_KEY_ID,
                version: 1,
            },
            tenant: "acme",
            context: pairs(&[("table", "users"), ("column", "email")]),
            plaintext: b"alice@example.com".to_vec(),
        },
        Case {
            name: "tenant-key-1-kib-plaintext",
            key: pattern(0x3c, 0x4b),
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "t",
            context: pairs(&[("empty", ""), ("", "empty key")]),
            plaintext: (0..1024u32).map(|i| (i * 7 + 3) as u8).collect(),
        },
    ]
}

/// One entry of tests/data/deterministic_vectors.json; byte strings in
/// lowercase hex.
#[derive(Serialize)]
struct Vector<'a> {
    name: &'a str,
    key: String,
    key_ref: KeyRefJson,
    tenant: &'a str,
    context: WrittenOrder<'a>,
    plaintext: String,
    /// The KDF output: the 64-byte AES-256-SIV key (S2V half, then CTR half).
    siv_key: String,
    /// The header: what precedes the SIV.
    header: String,
    /// Header, tenant and context: the one S2V associated-data component.
    associated_data: String,
    /// The synthetic IV.
    siv: String,
    /// The binary envelope.
    ciphertext: String,
    /// The envelope's text form.
    text: String,
}

fn seal(case: &Case) -> Vector<'_> {
    let key = Key256::from_slice(&case.key).unwrap();
    let context = context_of(&case.context);
    let sealed: Vec<Vec<u8>> = Provider::ALL
        .iter()
        .map(|&provider| {
            envelope::seal_deterministic(
                &EnvelopeKey::new(provider, &key),
                case.key_ref,
                case.tenant,
                &context,
                &case.plaintext,
            )
            .unwrap_or_else(|e| panic!("{}: {provider} seal failed: {e}", case.name))
        })
        .collect();
    let ciphertext = sealed[0].clone();
    assert!(
        sealed.iter().all(|s| *s == ciphertext),
        "{}: providers seal differently",
        case.name
    );
    // The header from the specification: version, suite, key reference.
    let header = [&[0x01, 0x04][..], &spec_key_ref(case.key_ref)].concat();
    assert_eq!(ciphertext[..header.len()], header, "{}: header", case.name);
    assert_eq!(
        ciphertext.len(),
        header.len() + SIV_LEN + case.plaintext.len(),
        "{}: overhead",
        case.name
    );
    let aad = spec_associated_data(&header, case.tenant, &case.context);
    Vector {
        name: case.name,
        key: hex::encode(case.key),
        key_ref: case.key_ref.into(),
        tenant: case.tenant,
        context: WrittenOrder(&case.context),
        plaintext: hex::encode(&case.plaintext),
        siv_key: hex::encode(*MessageKeyDeriver::new(&key).derive_512(SIV_LABEL, &SIV_KEY_CONTEXT)),
        header: hex::encode(&header),
        associated_data: hex::encode(&aad),
        siv: hex::encode(&ciphertext[header.len()..header.len() + SIV_LEN]),
        text: envelope::text::encode(&ciphertext),
        ciphertext: hex::encode(&ciphertext),
    }
}

fn stored() -> &'static [Value] {
    vector_files::stored(&vectors_path(), "deterministic_vectors", || {
        to_json(&cases().iter().map(seal).collect::<Vec<_>>())
    })
}

#[test]
fn sealing_reproduces_the_stored_vectors() {
    let cases = cases();
    let fresh: Vec<_> = cases.iter().map(seal).collect();
    // Sealing is deterministic: twice gives the same file.
    let again: Vec<_> = cases.iter().map(seal).collect();
    assert_eq!(to_json(&fresh), to_json(&again));
    assert_stored_equal(&vectors_path(), stored(), &fresh);
}

#[test]
fn the_cases_cover_what_the_format_needs() {
    let cases = cases();
    assert_unique_names(cases.iter().map(|c| c.name));
    assert!(
        cases
            .iter()
            .any(|c| c.plaintext.is_empty() && c.context.is_empty())
    );
    for len in [1, 16, 17, 1024] {
        assert!(cases.iter().any(|c| c.plaintext.len() == len), "{len} B");
    }
    assert!(
        cases
            .iter()
            .any(|c| matches!(c.key_ref, KeyRef::Subject { .. }))
    );
    assert!(
        cases
            .iter()
            .any(|c| matches!(c.key_ref, KeyRef::Tenant { version: u32::MAX }))
    );
}

#[test]
fn every_stored_vector_parses_and_opens_and_nothing_else_does() {
    for vector in stored() {
        let name = str_field(vector, "name");
        let key = Key256::from_slice(&hex_field(vector, "key")).expect("32-byte key");
        let ciphertext = hex_field(vector, "ciphertext");
        let tenant = str_field(vector, "tenant");
        let context = context_field(vector);
        let parsed = envelope::parse(&ciphertext).unwrap_or_else(|_| panic!("{name}: parse"));
        assert_eq!(parsed.key_ref, key_ref_of(vector), "{name}: key reference");
        assert_eq!(parsed.mode, Mode::Deterministic, "{name}: suite");
        for provider in Provider::ALL {
            let key = EnvelopeKey::new(provider, &key);
            let plaintext = envelope::open(&key, &parsed, tenant, &context)
                .unwrap_or_else(|_| panic!("{name}: {provider} open"));
            assert_eq!(plaintext, hex_field(vector, "plaintext"), "{name}");
            let other_tenant = format!("{tenant}x");
            assert!(envelope::open(&key, &parsed, &other_tenant, &context).is_err());
            let mut other_context = context.clone();
            other_context.insert("extra".into(), String::new());
            assert!(envelope::open(&key, &parsed, tenant, &other_context).is_err());
        }
        assert_eq!(
            envelope::text::decode(str_field(vector, "text")).unwrap(),
            ciphertext,
            "{name}: text form"
        );
    }
}

#[test]
fn python_reference_decrypts_every_vector() {
    run_python_reference(
        "tests/reference/decrypt_deterministic_vectors.py",
        &vectors_path(),
        &format!(
            "python reference: {} deterministic vectors decrypted",
            stored().len()
        ),
    );
}
