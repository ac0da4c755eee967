//! What the test-vector files share: tests/vectors.rs (one-shot envelopes)
//! and tests/stream_vectors.rs (streaming envelopes). Each includes this file
//! with `#[path]` rather than through tests/common/mod.rs, so that neither
//! builds the sidecar harness.
//!
//! Both follow one pattern: fixed cases are sealed and compared with a JSON
//! file under tests/data/, which `KEYWARDEN_REGENERATE_VECTORS=1` rewrites,
//! and an independent Python implementation under tests/reference/ must
//! check every vector.

// Each test file uses part of this module.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use keywarden::envelope::{Context, KeyRef};
use serde::Serialize;
use serde_json::Value;

/// Set to `1` to rewrite the vector files instead of comparing.
pub const REGENERATE_VAR: &str = "KEYWARDEN_REGENERATE_VECTORS";
/// The Python interpreter (with `cryptography`) for the reference checkers.
pub const PYTHON_VAR: &str = "KEYWARDEN_TEST_PYTHON";

/// The subject key id of the subject-key cases.
pub const SUBJECT_KEY_ID: [u8; 16] = [
    0x5e, 0x1f, 0x0c, 0x9a, 0x27, 0x43, 0xb8, 0x60, 0xd1, 0x7e, 0x02, 0xf4, 0x88, 0x3b, 0xa5, 0x19,
];
/// The subject key itself: the key of the subject-key case and the plaintext
/// of the case that wraps it under a tenant key.
pub const SUBJECT_KEY: [u8; 32] = [
    0x9c, 0x41, 0x07, 0xe2, 0x5b, 0xd8, 0x36, 0xaf, 0x10, 0x7d, 0xc4, 0x69, 0xf3, 0x2e, 0x85, 0x5a,
    0x01, 0xbe, 0x73, 0x4c, 0xe9, 0x92, 0x2d, 0x68, 0xb7, 0x0f, 0x54, 0xca, 0x3d, 0xa6, 0x18, 0xef,
];

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `N` bytes `start, start + step, start + 2 * step, ...` (mod 256).
pub fn pattern<const N: usize>(start: u8, step: u8) -> [u8; N] {
    std::array::from_fn(|i| start.wrapping_add((i as u8).wrapping_mul(step)))
}

pub fn pairs(entries: &[(&str, &str)]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A context map in the order a case writes it, which is deliberately not
/// byte order in some cases; it goes to the JSON file in that order, so an
/// implementation must sort it itself.
pub struct WrittenOrder<'a>(pub &'a [(String, String)]);

impl Serialize for WrittenOrder<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// A key reference as the vector files write it.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum KeyRefJson {
    Tenant {
        version: u32,
    },
    Subject {
        subject_key_id: String,
        version: u32,
    },
}

impl From<KeyRef> for KeyRefJson {
    fn from(key_ref: KeyRef) -> Self {
        match key_ref {
            KeyRef::Tenant { version } => Self::Tenant { version },
            KeyRef::Subject { id, version } => Self::Subject {
                subject_key_id: hex::encode(id),
                version,
            },
        }
    }
}

/// The context a case writes, as the implementation takes it.
pub fn context_of(entries: &[(String, String)]) -> Context {
    let context: Context = entries.iter().cloned().collect();
    assert_eq!(context.len(), entries.len(), "duplicate context key");
    context
}

/// The key reference's kind byte and fields, encoded here from the
/// specification rather than by calling the implementation.
pub fn spec_key_ref(key_ref: KeyRef) -> Vec<u8> {
    match key_ref {
        KeyRef::Tenant { version } => [&[0x01][..], &version.to_be_bytes()].concat(),
        KeyRef::Subject { id, version } => [&[0x02][..], &id, &version.to_be_bytes()].concat(),
    }
}

/// The associated data, encoded here from the specification rather than by
/// calling the implementation.
pub fn spec_associated_data(header: &[u8], tenant: &str, context: &[(String, String)]) -> Vec<u8> {
    fn enc(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut sorted: Vec<&(String, String)> = context.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut aad = header.to_vec();
    enc(&mut aad, tenant);
    aad.extend_from_slice(&u32::try_from(sorted.len()).unwrap().to_be_bytes());
    for (k, v) in sorted {
        enc(&mut aad, k);
        enc(&mut aad, v);
    }
    aad
}

fn regenerating() -> bool {
    std::env::var(REGENERATE_VAR).is_ok_and(|v| v == "1")
}

/// The vectors stored at `path` (a JSON array), read once per test process,
/// so that every test of the binary reads the same file: each test binary has
/// one vector file. When regenerating, the file is first rewritten with
/// `sealed()`, the vectors as JSON text (serialized from their structs, not
/// through [`Value`], whose maps would sort the fields and the contexts).
/// `test` names the test target, for the message that says how to
/// regenerate.
pub fn stored(path: &Path, test: &str, sealed: impl FnOnce() -> String) -> &'static [Value] {
    static STORED: OnceLock<Vec<Value>> = OnceLock::new();
    STORED.get_or_init(|| {
        if regenerating() {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, sealed()).unwrap();
            eprintln!("wrote {}", path.display());
        }
        let json = fs::read_to_string(path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}; generate it with {REGENERATE_VAR}=1 cargo test --test {test}",
                path.display()
            )
        });
        let value: Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        match value {
            Value::Array(vectors) => vectors,
            _ => panic!("{} is not a JSON array", path.display()),
        }
    })
}

/// Vectors as the text of a vector file.
pub fn to_json<T: Serialize>(vectors: &[T]) -> String {
    let mut json = serde_json::to_string_pretty(vectors).unwrap();
    json.push('\n');
    json
}

/// Asserts that freshly sealed vectors equal the stored ones, field by
/// field, in the same order and number.
pub fn assert_stored_equal<T: Serialize>(path: &Path, stored: &[Value], fresh: &[T]) {
    assert_eq!(
        stored.len(),
        fresh.len(),
        "{} holds {} vectors, the cases are {}; regenerate with {REGENERATE_VAR}=1",
        path.display(),
        stored.len(),
        fresh.len()
    );
    for (fresh, stored) in fresh.iter().zip(stored) {
        let fresh = serde_json::to_value(fresh).unwrap();
        let fresh = fresh.as_object().expect("each vector is an object");
        let stored = stored.as_object().expect("each vector is an object");
        let name = fresh["name"].as_str().expect("each vector has a name");
        assert_eq!(
            stored.keys().collect::<Vec<_>>(),
            fresh.keys().collect::<Vec<_>>(),
            "{name}: fields"
        );
        for (field, value) in fresh {
            assert_eq!(
                &stored[field],
                value,
                "{name}: field {field:?} differs from {}",
                path.display()
            );
        }
    }
}

/// Names are unique among the cases.
pub fn assert_unique_names<'a>(names: impl IntoIterator<Item = &'a str>) {
    let mut names: Vec<&str> = names.into_iter().collect();
    let count = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), count, "case names are unique");
}

pub fn field<'a>(vector: &'a Value, name: &str) -> &'a Value {
    vector
        .get(name)
        .unwrap_or_else(|| panic!("vector {vector} has no field {name:?}"))
}

pub fn str_field<'a>(vector: &'a Value, name: &str) -> &'a str {
    field(vector, name)
        .as_str()
        .unwrap_or_else(|| panic!("field {name:?} of {vector} is not a string"))
}

pub fn hex_field(vector: &Value, name: &str) -> Vec<u8> {
    hex::decode(str_field(vector, name))
        .unwrap_or_else(|e| panic!("field {name:?} of {vector} is not hex: {e}"))
}

pub fn u64_field(value: &Value, name: &str) -> u64 {
    field(value, name)
        .as_u64()
        .unwrap_or_else(|| panic!("field {name:?} of {value} is not an unsigned integer"))
}

pub fn u32_field(value: &Value, name: &str) -> u32 {
    u32::try_from(u64_field(value, name))
        .unwrap_or_else(|_| panic!("field {name:?} of {value} is not a u32"))
}

pub fn key_ref_of(vector: &Value) -> KeyRef {
    let key_ref = field(vector, "key_ref");
    let version = u32_field(key_ref, "version");
    match str_field(key_ref, "kind") {
        "tenant" => KeyRef::Tenant { version },
        "subject" => KeyRef::Subject {
            id: hex_field(key_ref, "subject_key_id")
                .try_into()
                .expect("16-byte subject key id"),
            version,
        },
        other => panic!("unknown key_ref kind {other:?}"),
    }
}

pub fn context_field(vector: &Value) -> Context {
    field(vector, "context")
        .as_object()
        .expect("context is an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string value").to_owned()))
        .collect::<BTreeMap<_, _>>()
}

/// The interpreter for the Python references: $KEYWARDEN_TEST_PYTHON, else
/// the repository's .venv. No interpreter is a failure, not a skip: the
/// vectors are only worth something if a second implementation reads them.
fn python(script: &str) -> PathBuf {
    if let Some(python) = std::env::var_os(PYTHON_VAR).filter(|p| !p.is_empty()) {
        return PathBuf::from(python);
    }
    let venv = repo().join(".venv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!(
        "no Python interpreter for {script}: {} does not exist and {PYTHON_VAR} is not set. \
         Run the README's test command, scripts/test, which creates .venv with the \
         `cryptography` package, or set {PYTHON_VAR} to a python that has it.",
        venv.display()
    );
}

/// Runs the Python reference `script` (relative to the repository) on the
/// vector file `vectors`; it must succeed and print `line`.
pub fn run_python_reference(script: &str, vectors: &Path, line: &str) {
    let python = python(script);
    let output = Command::new(&python)
        .arg(repo().join(script))
        .arg(vectors)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} {script} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
        python.display(),
        output.status
    );
    assert!(
        stdout.lines().any(|l| l.trim() == line),
        "expected the line {line:?} from {script}; it printed:\n{stdout}{stderr}"
    );
}
