//! Test vectors for blind-index tokens (docs/FORMAT.md, "Blind indexes"): a
//! fixed list of cases is hashed with `envelope::blind` and compared with
//! tests/data/blind_index_vectors.json, which also records each value after
//! its transformations and the whole HMAC input, encoded here from the
//! specification. tests/reference/blind_index_vectors.py, written from
//! FORMAT.md alone, must reproduce every token.
//!
//! To rewrite the file after a deliberate change to the cases:
//!
//! ```text
//! KEYWARDEN_REGENERATE_VECTORS=1 cargo test --test blind_index_vectors
//! ```

use std::path::PathBuf;

use hmac::{Hmac, Mac};
use keywarden::{
    envelope::blind::{self, Field, Transformation},
    secret::Key256,
};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;

#[path = "common/vectors.rs"]
mod vector_files;

use vector_files::{
    WrittenOrder, assert_stored_equal, assert_unique_names, context_of, hex_field, pairs, pattern,
    repo, run_python_reference, str_field,
};

fn vectors_path() -> PathBuf {
    repo().join("tests/data/blind_index_vectors.json")
}

struct Case {
    name: &'static str,
    key: [u8; 32],
    key_version: u32,
    bits: u32,
    tenant: &'static str,
    /// In the order the case writes it (not always byte order).
    context: Vec<(String, String)>,
    values: Vec<(Vec<u8>, Vec<Transformation>)>,
}

fn text(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn cases() -> Vec<Case> {
    use Transformation::*;
    vec![
        Case {
            name: "email-trimmed-and-case-folded-32-bits",
            key: pattern(0x00, 0x01),
            key_version: 1,
            bits: 32,
            tenant: "acme",
            context: pairs(&[("table", "users"), ("column", "email")]),
            values: vec![(text("  Ada.Lovelace@Example.COM\n"), vec![Trim, CaseFold])],
        },
        Case {
            // Full case folding (ß -> ss) after NFKC (ﬁ -> fi); 12 bits:
            // the low 4 bits of the last byte are zero; version 0x0102
            // checks big-endian order.
            name: "nfkc-then-case-fold-12-bits-version-258",
            key: pattern(0x80, 0x05),
            key_version: 0x0102,
            bits: 12,
            tenant: "acme",
            context: pairs(&[("column", "name")]),
            values: vec![(text("Stra\u{df}e \u{fb01}le"), vec![Nfkc, CaseFold])],
        },
        Case {
            name: "nfc-composes-8-bits",
            key: pattern(0x11, 0x07),
            key_version: 7,
            bits: 8,
            tenant: "acme",
            context: vec![],
            values: vec![(text("e\u{301}cole"), vec![Nfc])],
        },
        Case {
            // A compound index: the last 4 characters of a card number, a
            // case-folded name, and raw bytes (no transformation, not UTF-8).
            name: "compound-of-three-values-256-bits",
            key: pattern(0xf0, 0x03),
            key_version: 2,
            bits: 256,
            tenant: "acme-corp.eu_1",
            context: pairs(&[("index", "card+name")]),
            values: vec![
                (text("4111 1111 1111 1234"), vec![LastChars(4)]),
                (text("LOVELACE"), vec![CaseFold]),
                (vec![0x00, 0xff, 0x10], vec![]),
            ],
        },
        Case {
            // The last 2 Unicode scalar values (not bytes); a context whose
            // keys' byte order differs from UTF-16 order, with an empty key.
            name: "last-chars-of-astral-text-63-bits",
            key: pattern(0x42, 0x0b),
            key_version: 1,
            bits: 63,
            tenant: "acme",
            context: pairs(&[("\u{1f511}", "x"), ("\u{ff21}\u{ff22}", "y"), ("", "empty")]),
            values: vec![(text("h\u{e9}llo\u{1f511}"), vec![LastChars(2)])],
        },
        Case {
            // Trim removes White_Space (U+3000, U+0085, U+2028) but not
            // U+001F, which Python's str.strip() would remove.
            name: "trim-stops-at-a-character-without-white-space-128-bits",
            key: pattern(0x99, 0x01),
            key_version: 3,
            bits: 128,
            tenant: "acme",
            context: pairs(&[("column", "code")]),
            values: vec![(
                text("\u{3000}\t ada \u{85}\u{2028}\u{1f}\u{2028}"),
                vec![Trim],
            )],
        },
    ]
}

/// One transformation as the vector file writes it.
#[derive(Serialize)]
struct TransformationJson {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u32>,
}

fn transformation_json(t: Transformation) -> TransformationJson {
    let (kind, count) = match t {
        Transformation::Nfc => ("nfc", None),
        Transformation::Nfkc => ("nfkc", None),
        Transformation::CaseFold => ("case-fold", None),
        Transformation::Trim => ("trim", None),
        Transformation::LastChars(n) => ("last-chars", Some(n)),
    };
    TransformationJson { kind, count }
}

#[derive(Serialize)]
struct ValueJson {
    /// The value as given.
    value: String,
    transformations: Vec<TransformationJson>,
    /// The value after its transformations.
    transformed: String,
}

/// One entry of tests/data/blind_index_vectors.json. Byte strings are
/// lowercase hex.
#[derive(Serialize)]
struct Vector<'a> {
    name: &'a str,
    /// The blind-index key.
    key: String,
    key_version: u32,
    bits: u32,
    tenant: &'a str,
    context: WrittenOrder<'a>,
    values: Vec<ValueJson>,
    /// M, the HMAC-SHA256 input.
    hmac_input: String,
    token: String,
}

/// The code of a transformation in M, from the specification.
fn spec_code(t: Transformation) -> Vec<u8> {
    match t {
        Transformation::Nfc => vec![0x01],
        Transformation::Nfkc => vec![0x02],
        Transformation::CaseFold => vec![0x03],
        Transformation::Trim => vec![0x04],
        Transformation::LastChars(n) => [&[0x05][..], &n.to_be_bytes()].concat(),
    }
}

/// M as FORMAT.md spells it, from the transformed values.
fn spec_hmac_input(case: &Case, transformed: &[Vec<u8>]) -> Vec<u8> {
    fn enc(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&u32::try_from(b.len()).unwrap().to_be_bytes());
        out.extend_from_slice(b);
    }
    let mut m = b"kw1.bix".to_vec();
    m.extend_from_slice(&case.key_version.to_be_bytes());
    m.extend_from_slice(&u16::try_from(case.bits).unwrap().to_be_bytes());
    enc(&mut m, case.tenant.as_bytes());
    let mut sorted: Vec<&(String, String)> = case.context.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    m.extend_from_slice(&u32::try_from(sorted.len()).unwrap().to_be_bytes());
    for (k, v) in sorted {
        enc(&mut m, k.as_bytes());
        enc(&mut m, v.as_bytes());
    }
    m.extend_from_slice(&u32::try_from(case.values.len()).unwrap().to_be_bytes());
    for ((_, steps), value) in case.values.iter().zip(transformed) {
        m.push(u8::try_from(steps.len()).unwrap());
        for step in steps {
            m.extend_from_slice(&spec_code(*step));
        }
        enc(&mut m, value);
    }
    m
}

/// The token as FORMAT.md spells it, from M.
fn spec_token(key: &[u8], version: u32, bits: u32, m: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(m);
    let digest = mac.finalize().into_bytes();
    let n = bits.div_ceil(8) as usize;
    let mut token = version.to_be_bytes().to_vec();
    token.extend_from_slice(&digest[..n]);
    let unused = (n as u32) * 8 - bits;
    if unused > 0 {
        let last = token.len() - 1;
        token[last] &= 0xffu8 << unused;
    }
    token
}

fn hash(case: &Case) -> Vector<'_> {
    let key = Key256::from_slice(&case.key).unwrap();
    let transformed: Vec<Vec<u8>> = case
        .values
        .iter()
        .map(|(value, steps)| {
            blind::transform(value, steps, &blind::TransformBudget::of(usize::MAX))
                .unwrap()
                .into_owned()
        })
        .collect();
    let fields: Vec<Field<'_>> = case
        .values
        .iter()
        .zip(&transformed)
        .map(|((_, steps), value)| Field {
            value,
            transformations: steps,
        })
        .collect();
    let token = blind::token(
        &key,
        case.key_version,
        case.bits,
        case.tenant,
        &context_of(&case.context),
        &fields,
    );
    let m = spec_hmac_input(case, &transformed);
    assert_eq!(
        token,
        spec_token(&case.key, case.key_version, case.bits, &m),
        "{}: the implementation's token is not the specification's",
        case.name
    );
    assert_eq!(token.len(), blind::token_len(case.bits));
    Vector {
        name: case.name,
        key: hex::encode(case.key),
        key_version: case.key_version,
        bits: case.bits,
        tenant: case.tenant,
        context: WrittenOrder(&case.context),
        values: case
            .values
            .iter()
            .zip(&transformed)
            .map(|((value, steps), t)| ValueJson {
                value: hex::encode(value),
                transformations: steps.iter().map(|s| transformation_json(*s)).collect(),
                transformed: hex::encode(t),
            })
            .collect(),
        hmac_input: hex::encode(&m),
        token: hex::encode(&token),
    }
}

fn stored() -> &'static [Value] {
    vector_files::stored(&vectors_path(), "blind_index_vectors", || {
        vector_files::to_json(&cases().iter().map(hash).collect::<Vec<_>>())
    })
}

#[test]
fn hashing_reproduces_the_stored_vectors() {
    let cases = cases();
    assert_unique_names(cases.iter().map(|c| c.name));
    let fresh: Vec<_> = cases.iter().map(hash).collect();
    assert_stored_equal(&vectors_path(), stored(), &fresh);
}

#[test]
fn every_stored_token_is_the_hmac_of_its_input_truncated() {
    for vector in stored() {
        let name = str_field(vector, "name");
        let key = hex_field(vector, "key");
        let version = u32::try_from(vector["key_version"].as_u64().unwrap()).unwrap();
        let bits = u32::try_from(vector["bits"].as_u64().unwrap()).unwrap();
        assert_eq!(
            spec_token(&key, version, bits, &hex_field(vector, "hmac_input")),
            hex_field(vector, "token"),
            "{name}"
        );
    }
}

#[test]
fn python_reference_computes_every_token() {
    run_python_reference(
        "tests/reference/blind_index_vectors.py",
        &vectors_path(),
        &format!(
            "python reference: {} blind-index tokens computed",
            stored().len()
        ),
    );
}
