//! Test vectors for ciphertext format v1 (docs/FORMAT.md).
//!
//! A fixed list of cases (key, key reference, tenant, context, plaintext,
//! salt, nonce) is sealed with `envelope::seal_with` and compared with
//! tests/data/vectors.json, which also records each message key and the
//! associated data so that other implementations can debug their KDF and AAD
//! encoding. tests/reference/decrypt_vectors.py, an independent
//! implementation written from docs/FORMAT.md, must decrypt every vector.
//!
//! To rewrite the file after a deliberate change to the cases (never to the
//! format: a format change needs a new version byte):
//!
//! ```text
//! KEYWARDEN_REGENERATE_VECTORS=1 cargo test --test vectors
//! ```

use std::path::PathBuf;

use base64::Engine as _;
use keywarden::envelope::{self, EnvelopeKey, KeyRef, MessageKeyDeriver, Provider};
use keywarden::secret::Key256;
use serde::Serialize;
use serde_json::Value;

#[path = "common/vectors.rs"]
mod vector_files;

use vector_files::{
    KeyRefJson, SUBJECT_KEY, SUBJECT_KEY_ID, WrittenOrder, assert_stored_equal,
    assert_unique_names, context_field, context_of, hex_field, key_ref_of, pairs, pattern, repo,
    run_python_reference, spec_associated_data, str_field, to_json,
};

const TENANT_OVERHEAD: usize = 1 + 1 + 1 + 4 + 16 + 12 + 16;
const SUBJECT_OVERHEAD: usize = 1 + 1 + 1 + 16 + 4 + 16 + 12 + 16;

fn vectors_path() -> PathBuf {
    repo().join("tests/data/vectors.json")
}

/// One vector's inputs. The context is kept in the order it is written here,
/// which is deliberately not byte order in some cases, and is written to the
/// JSON file in that order: an implementation must sort it itself.
struct Case {
    name: &'static str,
    key: [u8; 32],
    key_ref: KeyRef,
    tenant: &'static str,
    context: Vec<(String, String)>,
    plaintext: Vec<u8>,
    salt: [u8; 16],
    nonce: [u8; 12],
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
            salt: pattern(0xa0, 1),
            nonce: pattern(0xc0, 1),
        },
        Case {
            name: "tenant-key-1-byte-plaintext",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: pairs(&[("column", "ssn")]),
            plaintext: b"*".to_vec(),
            salt: pattern(0x10, 0x11),
            nonce: pattern(0x20, 0x03),
        },
        Case {
            // Written order is not byte order, and differs from UTF-16 order
            // too: byte order is "zone" < "ＡＢＣ" (EF BC A1 ..) < "🔑" (F0 9F ..),
            // whereas UTF-16 code units would put "🔑" (D83D ..) before "ＡＢＣ"
            // (FF21 ..).
            name: "tenant-key-3-entry-context-unordered-utf8",
            key: tenant_key_1,
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "acme",
            context: pairs(&[
                ("🔑", "Schlüssel"),
                ("zone", "eu-west-1"),
                ("ＡＢＣ", "größe ✓"),
            ]),
            plaintext: b"field value".to_vec(),
            salt: pattern(0xf0, 0xfd),
            nonce: pattern(0x5a, 0x07),
        },
        Case {
            name: "tenant-key-version-7-100-byte-plaintext",
            key: pattern(0xff, 0xf9),
            key_ref: KeyRef::Tenant { version: 7 },
            tenant: "tenant-0042.eu",
            context: pairs(&[
                ("table", "patients"),
                ("column", "diagnosis"),
                ("row", "8812"),
            ]),
            plaintext: b"Diagnosis: seasonal allergic rhinitis; prescribed cetirizine 10 mg once daily for 14 days; GP review"
                .to_vec(),
            salt: pattern(0x01, 0x25),
            nonce: pattern(0xee, 0x13),
        },
        Case {
            name: "subject-key-version-2",
            key: SUBJECT_KEY,
            key_ref: KeyRef::Subject {
                id: SUBJECT_KEY_ID,
                version: 2,
            },
            tenant: "acme",
            context: pairs(&[("table", "users"), ("column", "email")]),
            plaintext: b"alice@example.com".to_vec(),
            salt: pattern(0x33, 0x0b),
            nonce: pattern(0x44, 0x1d),
        },
        Case {
            // How the subject key above was stored in the legacy form
            // (FORMAT.md, "The legacy form"): a tenant-key envelope of its 32
            // bytes under a context the data plane now refuses. Kept so that
            // the upgrade's reader of that form stays checked. Version
            // 0x00000102 checks big-endian order.
            name: "subject-key-wrapped-by-tenant-key-version-258",
            key: pattern(0x80, 0x05),
            key_ref: KeyRef::Tenant { version: 0x0102 },
            tenant: "acme",
            context: vec![
                ("keywarden.subject".to_string(), hex::encode(SUBJECT_KEY_ID)),
                ("keywarden.purpose".to_string(), "subject-key".to_string()),
            ],
            plaintext: SUBJECT_KEY.to_vec(),
            salt: pattern(0x6d, 0x29),
            nonce: pattern(0x0f, 0x31),
        },
        Case {
            name: "tenant-key-1-kib-plaintext",
            key: pattern(0x3c, 0x4b),
            key_ref: KeyRef::Tenant { version: 1 },
            tenant: "t",
            context: pairs(&[("empty", ""), ("", "empty key")]),
            plaintext: (0..1024u32).map(|i| (i * 7 + 3) as u8).collect(),
            salt: pattern(0x99, 0x35),
            nonce: pattern(0x71, 0x0d),
        },
        Case {
            name: "tenant-key-max-version-16-byte-plaintext",
            key: pattern(0xd2, 0x17),
            key_ref: KeyRef::Tenant { version: u32::MAX },
            tenant: "acme-corp.eu_1",
            context: pairs(&[("k", "v")]),
            plaintext: b"exactly16 bytes!".to_vec(),
            salt: [0u8; 16],
            nonce: [0xff; 12],
        },
    ]
}

/// One entry of tests/data/vectors.json. Byte strings are lowercase hex.
#[derive(Serialize)]
struct Vector<'a> {
    name: &'a str,
    key: String,
    key_ref: KeyRefJson,
    tenant: &'a str,
    context: WrittenOrder<'a>,
    plaintext: String,
    salt: String,
    nonce: String,
    /// The KDF output for `key` and `salt`: the AES-256-GCM key.
    message_key: String,
    /// Header, tenant and context as the AEAD's associated data.
    associated_data: String,
    /// The binary envelope.
    ciphertext: String,
    /// The envelope's text form: `kw1:` and unpadded base64url.
    text: String,
}

fn header_len(key_ref: KeyRef) -> usize {
    match key_ref {
        KeyRef::Tenant { .. } => 3 + 4 + 16 + 12,
        KeyRef::Subject { .. } => 3 + 16 + 4 + 16 + 12,
    }
}

fn text_form(ciphertext: &[u8]) -> String {
    format!(
        "kw1:{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ciphertext)
    )
}

/// Seals a case with every provider; they must agree byte for byte.
fn seal(case: &Case) -> Vector<'_> {
    let key = Key256::from_slice(&case.key).unwrap();
    let deriver = MessageKeyDeriver::new(&key);
    let context = context_of(&case.context);
    let sealed: Vec<Vec<u8>> = Provider::ALL
        .iter()
        .map(|&provider| {
            envelope::seal_with(
                &EnvelopeKey::new(provider, &key),
                case.key_ref,
                case.tenant,
                &context,
                &case.plaintext,
                &case.salt,
                &case.nonce,
            )
            .unwrap_or_else(|e| panic!("{}: {provider} seal failed: {e}", case.name))
        })
        .collect();
    let ciphertext = sealed[0].clone();
    for (provider, other) in Provider::ALL.iter().zip(&sealed) {
        assert_eq!(
            hex::encode(other),
            hex::encode(&ciphertext),
            "{}: {provider} seals differently",
            case.name
        );
    }
    let overhead = match case.key_ref {
        KeyRef::Tenant { .. } => TENANT_OVERHEAD,
        KeyRef::Subject { .. } => SUBJECT_OVERHEAD,
    };
    assert_eq!(
        ciphertext.len(),
        case.plaintext.len() + overhead,
        "{}: overhead",
        case.name
    );
    let header = &ciphertext[..header_len(case.key_ref)];
    let aad = spec_associated_data(header, case.tenant, &case.context);
    assert_eq!(
        aad,
        envelope::associated_data(header, case.tenant, &context).expect("short fields encode"),
        "{}: the implementation's associated data differs from the specification's",
        case.name
    );
    Vector {
        name: case.name,
        key: hex::encode(case.key),
        key_ref: case.key_ref.into(),
        tenant: case.tenant,
        context: WrittenOrder(&case.context),
        plaintext: hex::encode(&case.plaintext),
        salt: hex::encode(case.salt),
        nonce: hex::encode(case.nonce),
        message_key: hex::encode(*deriver.derive(&case.salt)),
        associated_data: hex::encode(&aad),
        text: text_form(&ciphertext),
        ciphertext: hex::encode(&ciphertext),
    }
}

/// The stored vectors (rewritten first when regenerating).
fn stored() -> &'static [Value] {
    vector_files::stored(&vectors_path(), "vectors", || {
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
    assert!(
        cases
            .iter()
            .any(|c| c.plaintext.is_empty() && c.context.is_empty())
    );
    assert!(cases.iter().any(|c| c.plaintext.len() == 1));
    assert!(cases.iter().any(|c| c.plaintext.len() >= 1024));
    assert!(
        cases
            .iter()
            .any(|c| matches!(c.key_ref, KeyRef::Subject { .. }))
    );
    assert!(cases.iter().any(
        |c| matches!(c.key_ref, KeyRef::Tenant { version: 7 }) && c.plaintext.len() == 100
    ));
    assert!(cases.iter().any(|c| {
        let keys: Vec<&[u8]> = c.context.iter().map(|(k, _)| k.as_bytes()).collect();
        keys.len() == 3 && !keys.is_sorted() && c.context.iter().any(|(k, _)| !k.is_ascii())
    }));
}

#[test]
fn every_stored_vector_parses_and_opens() {
    for vector in stored() {
        let name = str_field(vector, "name");
        let key = Key256::from_slice(&hex_field(vector, "key")).expect("32-byte key");
        let deriver = MessageKeyDeriver::new(&key);
        let ciphertext = hex_field(vector, "ciphertext");
        let tenant = str_field(vector, "tenant");
        let context = context_field(vector);

        let parsed = envelope::parse(&ciphertext).unwrap_or_else(|_| panic!("{name}: parse"));
        assert_eq!(parsed.key_ref, key_ref_of(vector), "{name}: key reference");
        for provider in Provider::ALL {
            let plaintext =
                envelope::open(&EnvelopeKey::new(provider, &key), &parsed, tenant, &context)
                    .unwrap_or_else(|_| panic!("{name}: {provider} open"));
            assert_eq!(
                plaintext,
                hex_field(vector, "plaintext"),
                "{name}: {provider} plaintext"
            );
        }
        assert_eq!(
            hex::encode(*deriver.derive(&hex_field(vector, "salt").try_into().unwrap())),
            str_field(vector, "message_key"),
            "{name}: message key"
        );
        assert_eq!(
            str_field(vector, "text"),
            text_form(&ciphertext),
            "{name}: text form"
        );

        // The same ciphertext for another tenant or context does not open.
        let other_tenant = format!("{tenant}x");
        let mut other_context = context.clone();
        other_context.insert("extra".into(), String::new());
        for provider in Provider::ALL {
            let key = EnvelopeKey::new(provider, &key);
            assert!(envelope::open(&key, &parsed, &other_tenant, &context).is_err());
            assert!(envelope::open(&key, &parsed, tenant, &other_context).is_err());
        }
    }
}

#[test]
fn python_reference_decrypts_every_vector() {
    run_python_reference(
        "tests/reference/decrypt_vectors.py",
        &vectors_path(),
        &format!("python reference: {} vectors decrypted", stored().len()),
    );
}
