//! Erasure receipts: signed statements of what a shred destroyed.
//!
//! `ShredTenant` and `ShredSubject` answer with a [`Receipt`] signed by the
//! sidecar's Ed25519 key; `keywarden receipt verify` checks one against the
//! sidecar's public key. The key's 32-byte seed lives in [`RECEIPT_KEY_FILE`]
//! (mode 0600) in the data directory; its public key is written to
//! [`RECEIPT_PUBLIC_KEY_FILE`] on every start so operators can hand it to
//! auditors. Keep old public keys: a receipt stays checkable only against the
//! key that signed it, and a lost seed means a new key for new receipts.
//!
//! # Format
//!
//! A receipt's text form is exactly two lines:
//!
//! ```text
//! {"version":1,"kind":"subject","tenant":"acme",...,"signer":"ed25519:<base64url>"}
//! ed25519:<base64url of the 64-byte signature>
//! ```
//!
//! The first line is the receipt as compact JSON, fields in the order
//! [`Receipt`] declares them. The second is an Ed25519 signature over the
//! first line's exact bytes (without its newline). Public keys and signatures
//! are unpadded URL-safe base64, decoded strictly. The trailing newline is
//! optional; nothing else may differ.
//!
//! Why two lines: the signature covers bytes, not a JSON value, so neither
//! side needs a JSON canonicalization (key order, whitespace, number and
//! escape forms); a verifier checks the signature over the bytes it was given
//! *before* it parses or trusts any of the JSON. The price is that a receipt
//! must be kept byte for byte: pretty-printing it breaks the signature (read
//! it with `head -1 receipt | jq`, keep the original).
//!
//! # What a receipt proves, and what it does not
//!
//! It proves that the holder of this sidecar's receipt key signed the
//! statement: that at `issued_at` keywarden had destroyed its copies of the
//! named tenant's keys (or of one subject's key), at `shredded_at`, at the
//! request of `by`, recorded in the audit log as `audit_record`. The subject
//! appears only as the audit log's keyed hash of its id, so a receipt can be
//! matched to the audit log without naming the person. Anyone who holds
//! `receipt.key` can sign receipts: guard it like the other keys.
//!
//! It does not prove that copies outside keywarden's control are gone:
//! plaintext an application decrypted and kept, exports, logs, replicas of
//! the application's own data. Nor does it prove that every copy of the
//! keystore is gone. A shred deletes rows; copies of those rows live on in
//! keystore backups and base backups, PostgreSQL WAL archives, streaming and
//! logical replicas (delayed ones, and WAL a replication slot retains),
//! volume, file-system and VM snapshots, and, until an operator reclaims
//! them, in the live database's own files: dead tuples and free space in
//! PostgreSQL's heap, its WAL segments (README, "Erasure on PostgreSQL"),
//! and freed disk blocks. `backups_may_hold_copies_until` is the horizon for
//! all of these, not for backups alone: the shred time plus
//! `store.backup_retention_days`, which the operator must set to the
//! longest time any of these copies is kept. keywarden neither measures nor
//! enforces it; a wrong setting makes a wrong receipt.
//!
//! Wrapped keys are useless without the root key that wraps them: when the
//! tenant's tier is dedicated and its KMS key is deleted (`root_key_id`,
//! `root_key_deletion_date`), every copy of them, wherever it is, can no
//! longer be unwrapped by anyone after that date: the one way to erase from
//! every copy at once. Under a shared or customer root key, and for
//! subjects, someone holding any such copy and access to the root key could
//! still unwrap the keys until the horizon.

use std::{
    fmt, fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::secret::load_or_create_key_file;

/// File name of the receipt signing key's seed inside the data directory.
pub const RECEIPT_KEY_FILE: &str = "receipt.key";
/// File name of the receipt public key (its text form) inside the data
/// directory, written on open for operators and auditors.
pub const RECEIPT_PUBLIC_KEY_FILE: &str = "receipt.pub";
/// The receipt format this module writes and reads.
pub const RECEIPT_VERSION: u32 = 1;

/// Prefix of the text form of public keys and signatures.
const ED25519_PREFIX: &str = "ed25519:";
const PUBLIC_KEY_LEN: usize = 32;
const SIGNATURE_LEN: usize = 64;

/// What a shred destroyed.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptKind {
    /// `ShredTenant`: every key of a tenant.
    #[default]
    Tenant,
    /// `ShredSubject`: one subject's key.
    Subject,
}

/// What was destroyed. Serialized as JSON, fields in declaration order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// [`RECEIPT_VERSION`].
    pub version: u32,
    /// "tenant" or "subject".
    pub kind: ReceiptKind,
    pub tenant: String,
    /// Keyed hash (hex) of the subject id, never the id: of the id as the
    /// tenant's subject id rule makes it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// For a subject: the tenant's subject id rule ("exact", "nfc",
    /// "nfc-casefold"), which decides which spellings of an id this erasure
    /// covers.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject_ids: Option<String>,
    /// RFC 3339: when the keys were destroyed.
    pub shredded_at: String,
    /// RFC 3339: when this receipt was made.
    pub issued_at: String,
    /// The keys were already gone when this shred was asked for.
    pub already_shredded: bool,
    pub destroyed_key_versions: u32,
    pub destroyed_subject_keys: u64,
    /// The caller's identity.
    pub by: String,
    /// Hash (hex) of the audit record of the shred.
    pub audit_record: String,
    /// RFC 3339: until when copies of the keystore taken before the shred
    /// may still hold the destroyed keys (backups, WAL archives, replicas,
    /// snapshots, the database's own unreclaimed files): `shredded_at` plus
    /// `store.backup_retention_days`, as configured, not measured. The name
    /// says backups; the statement covers every copy (see the module docs).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backups_may_hold_copies_until: Option<String>,
    /// The tenant's dedicated KMS key.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub root_key_id: Option<String>,
    /// RFC 3339: when KMS deletes the dedicated key.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub root_key_deletion_date: Option<String>,
    /// The signing public key, text form "ed25519:<base64url>".
    pub signer: String,
}

/// Why a receipt does not check out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("the receipt is malformed: {0}")]
    Malformed(String),
    #[error("the public key is not of the form ed25519:<unpadded base64url of 32 bytes>")]
    BadPublicKey,
    #[error("the signature does not verify: the receipt was altered or was not signed by this key")]
    BadSignature,
    #[error("the receipt names a different signer than the given public key")]
    SignerMismatch,
    #[error("the receipt has version {0}; this keywarden reads version {RECEIPT_VERSION}")]
    UnsupportedVersion(u32),
}

/// The sidecar's receipt signing key.
pub struct ReceiptSigner {
    key_pair: Ed25519KeyPair,
    public_key: String,
}

impl ReceiptSigner {
    /// Loads or creates [`RECEIPT_KEY_FILE`] in `dir` (32 random bytes, mode
    /// 0600) and writes [`RECEIPT_PUBLIC_KEY_FILE`] (mode 0644).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let key_path = dir.join(RECEIPT_KEY_FILE);
        let (seed, _created) = load_or_create_key_file(&key_path)?;
        // The seed is exactly 32 bytes and every 32-byte string is a valid
        // Ed25519 seed, so this fails only if aws-lc itself fails.
        let key_pair = Ed25519KeyPair::from_seed_unchecked(seed.expose()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not an Ed25519 seed: {e}", key_path.display()),
            )
        })?;
        // `seed` (a Key256) zeroizes its bytes when dropped here.
        drop(seed);
        let public_key = public_key_text(key_pair.public_key().as_ref());
        write_public_key_file(dir, &public_key)?;
        Ok(Self {
            key_pair,
            public_key,
        })
    }

    /// "ed25519:<base64url of the 32 public key bytes>"
    pub fn public_key(&self) -> String {
        self.public_key.clone()
    }

    /// Sets `receipt.signer` to [`Self::public_key`], serializes the receipt
    /// as one line of compact JSON, signs those exact bytes and answers the
    /// text form: `"<receipt JSON>\ned25519:<base64url signature>\n"`.
    pub fn sign(&self, mut receipt: Receipt) -> String {
        receipt.signer = self.public_key.clone();
        // A Receipt is strings, integers, booleans and a unit enum: it always
        // serializes. serde_json escapes control characters inside strings,
        // so the compact form never contains a raw newline.
        let json = serde_json::to_string(&receipt).expect("a receipt serializes");
        let signature = self.key_pair.sign(json.as_bytes());
        format!(
            "{json}\n{ED25519_PREFIX}{}\n",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }
}

impl fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiptSigner")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// Checks a receipt's text form against `public_key` (the "ed25519:..."
/// text form; surrounding whitespace, such as the newline that ends
/// [`RECEIPT_PUBLIC_KEY_FILE`], is ignored) and answers the receipt.
///
/// The text must be exactly two lines (the trailing newline optional); the
/// signature on the second must verify over the first line's exact bytes
/// before the first is parsed; the first must be a receipt whose `signer` is
/// `public_key` and whose version this module reads.
pub fn verify(text: &str, public_key: &str) -> Result<Receipt, ReceiptError> {
    let public_key = public_key.trim();
    let key_bytes =
        decode_prefixed(public_key, PUBLIC_KEY_LEN).ok_or(ReceiptError::BadPublicKey)?;

    let body = text.strip_suffix('\n').unwrap_or(text);
    let (json, signature_line) = body.split_once('\n').ok_or_else(|| {
        ReceiptError::Malformed("expected two lines: the receipt and its signature".into())
    })?;
    if signature_line.contains('\n') {
        return Err(ReceiptError::Malformed(
            "expected two lines: the receipt and its signature, nothing after".into(),
        ));
    }
    let signature = decode_prefixed(signature_line, SIGNATURE_LEN).ok_or_else(|| {
        ReceiptError::Malformed(
            "the second line is not ed25519:<unpadded base64url of a 64-byte signature>".into(),
        )
    })?;

    UnparsedPublicKey::new(&ED25519, &key_bytes)
        .verify(json.as_bytes(), &signature)
        .map_err(|_| ReceiptError::BadSignature)?;

    // Only now, with the bytes signed by this key, is the JSON read.
    let receipt: Receipt = serde_json::from_str(json)
        .map_err(|e| ReceiptError::Malformed(format!("the first line is not a receipt: {e}")))?;
    if receipt.signer != public_key {
        return Err(ReceiptError::SignerMismatch);
    }
    if receipt.version != RECEIPT_VERSION {
        return Err(ReceiptError::UnsupportedVersion(receipt.version));
    }
    Ok(receipt)
}

fn public_key_text(bytes: &[u8]) -> String {
    format!("{ED25519_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Decodes "ed25519:<unpadded base64url>" of exactly `len` bytes. The decoder
/// is strict: no padding, no characters outside the URL-safe alphabet, and
/// no nonzero trailing bits, so each byte string has exactly one text form.
fn decode_prefixed(text: &str, len: usize) -> Option<Vec<u8>> {
    let encoded = text.strip_prefix(ED25519_PREFIX)?;
    let bytes = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    (bytes.len() == len).then_some(bytes)
}

/// Writes the public key file (mode 0644) through a temporary file and a
/// rename, so a reader never sees half a key.
fn write_public_key_file(dir: &Path, public_key: &str) -> io::Result<()> {
    let path = dir.join(RECEIPT_PUBLIC_KEY_FILE);
    let temporary = dir.join(format!("{RECEIPT_PUBLIC_KEY_FILE}.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temporary)?;
    file.write_all(format!("{public_key}\n").as_bytes())?;
    file.sync_all()?;
    fs::rename(&temporary, &path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};

    use super::*;
    use crate::time::UnixMillis;

    fn sample(kind: ReceiptKind) -> Receipt {
        let shredded_at = UnixMillis(1_790_000_000_123);
        Receipt {
            version: RECEIPT_VERSION,
            kind,
            tenant: "acme".into(),
            subject: (kind == ReceiptKind::Subject).then(|| "ab".repeat(32)),
            subject_ids: (kind == ReceiptKind::Subject).then(|| "nfc-casefold".into()),
            shredded_at: shredded_at.to_string(),
            issued_at: UnixMillis(1_790_000_000_456).to_string(),
            already_shredded: false,
            destroyed_key_versions: 3,
            destroyed_subject_keys: 42,
            by: "spiffe://example.org/ns/prod/sa/erasure".into(),
            audit_record: "cd".repeat(32),
            backups_may_hold_copies_until: Some(UnixMillis(1_792_592_000_123).to_string()),
            root_key_id: Some("arn:aws:kms:eu-west-1:111122223333:key/1234abcd".into()),
            root_key_deletion_date: Some(UnixMillis(1_790_604_800_123).to_string()),
            signer: String::new(),
        }
    }

    fn signer() -> (tempfile::TempDir, ReceiptSigner) {
        let dir = tempfile::tempdir().unwrap();
        let signer = ReceiptSigner::open(dir.path()).unwrap();
        (dir, signer)
    }

    #[test]
    fn round_trip_answers_the_same_receipt() {
        let (_dir, signer) = signer();
        for kind in [ReceiptKind::Tenant, ReceiptKind::Subject] {
            let receipt = sample(kind);
            let text = signer.sign(receipt.clone());
            let verified = verify(&text, &signer.public_key()).unwrap();
            assert_eq!(
                verified,
                Receipt {
                    signer: signer.public_key(),
                    ..receipt
                }
            );
        }
    }

    #[test]
    fn text_form_is_two_lines_of_json_and_signature() {
        let (_dir, signer) = signer();
        let mut receipt = sample(ReceiptKind::Tenant);
        receipt.backups_may_hold_copies_until = None;
        receipt.root_key_id = None;
        receipt.root_key_deletion_date = None;
        let text = signer.sign(receipt);
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with(r#"{"version":1,"kind":"tenant","tenant":"acme","shredded_at":"#)
        );
        assert!(lines[0].ends_with(&format!(r#""signer":"{}"}}"#, signer.public_key())));
        for absent in [
            "subject",
            "backups_may_hold_copies_until",
            "root_key_id",
            "root_key_deletion_date",
        ] {
            let key = format!(r#""{absent}":"#);
            assert!(!lines[0].contains(&key), "{absent} should be omitted");
        }
        assert!(lines[1].starts_with("ed25519:"));
        assert_eq!(lines[1].len(), "ed25519:".len() + 86);
    }

    #[test]
    fn trailing_newline_is_optional_but_nothing_else_is() {
        let (_dir, signer) = signer();
        let text = signer.sign(sample(ReceiptKind::Subject));
        let key = signer.public_key();
        assert!(verify(text.trim_end_matches('\n'), &key).is_ok());
        assert!(matches!(
            verify(&format!("{text}\n"), &key),
            Err(ReceiptError::Malformed(_))
        ));
        assert!(matches!(
            verify(&format!("{text}extra\n"), &key),
            Err(ReceiptError::Malformed(_))
        ));
        let crlf = text.replace('\n', "\r\n");
        assert!(verify(&crlf, &key).is_err());
        let first_line_only = text.lines().next().unwrap();
        assert!(matches!(
            verify(first_line_only, &key),
            Err(ReceiptError::Malformed(_))
        ));
        assert!(matches!(verify("", &key), Err(ReceiptError::Malformed(_))));
    }

    #[test]
    fn every_single_byte_change_fails() {
        let (_dir, signer) = signer();
        let key = signer.public_key();
        for kind in [ReceiptKind::Tenant, ReceiptKind::Subject] {
            let text = signer.sign(sample(kind));
            assert!(verify(&text, &key).is_ok());
            // ASCII only, so every flip below of a bit under 0x80 stays
            // valid UTF-8 and reaches verify.
            assert!(text.is_ascii());
            let bytes = text.as_bytes();
            for position in 0..bytes.len() {
                for flip in [0x01u8, 0x02, 0x20, 0x40] {
                    let mut changed = bytes.to_vec();
                    changed[position] ^= flip;
                    let changed = String::from_utf8(changed).unwrap();
                    assert!(
                        verify(&changed, &key).is_err(),
                        "flipping {flip:#04x} at byte {position} of {text:?} still verifies"
                    );
                }
            }
        }
    }

    #[test]
    fn receipt_signed_by_another_key_fails() {
        let (_dir_a, a) = signer();
        let (_dir_b, b) = signer();
        assert_ne!(a.public_key(), b.public_key());
        let text = b.sign(sample(ReceiptKind::Tenant));
        assert_eq!(
            verify(&text, &a.public_key()),
            Err(ReceiptError::BadSignature)
        );
        assert!(verify(&text, &b.public_key()).is_ok());
    }

    #[test]
    fn wrong_public_key_text_fails() {
        let (_dir, signer) = signer();
        let text = signer.sign(sample(ReceiptKind::Tenant));
        let key = signer.public_key();
        let encoded = key.strip_prefix("ed25519:").unwrap();
        let raw = URL_SAFE_NO_PAD.decode(encoded).unwrap();
        let bad = [
            String::new(),
            "ed25519:".into(),
            "ed25519:xyz".into(),
            encoded.to_owned(),
            format!("ED25519:{encoded}"),
            format!("ed448:{encoded}"),
            format!("ed25519:{}", URL_SAFE.encode(&raw)),
            format!("ed25519:{}", STANDARD.encode(&raw)),
            format!("ed25519:{}", URL_SAFE_NO_PAD.encode(&raw[..31])),
            format!("ed25519:{encoded}A"),
        ];
        for public_key in bad {
            assert_eq!(
                verify(&text, &public_key),
                Err(ReceiptError::BadPublicKey),
                "{public_key:?}"
            );
        }
        // Surrounding whitespace (the public key file's newline) is fine.
        assert!(verify(&text, &format!("{key}\n")).is_ok());
    }

    #[test]
    fn signer_field_must_name_the_key() {
        let (_dir, signer) = signer();
        let receipt = Receipt {
            signer: "ed25519:someone-else".into(),
            ..sample(ReceiptKind::Tenant)
        };
        let json = serde_json::to_string(&receipt).unwrap();
        let signature = signer.key_pair.sign(json.as_bytes());
        let text = format!(
            "{json}\ned25519:{}\n",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        );
        assert_eq!(
            verify(&text, &signer.public_key()),
            Err(ReceiptError::SignerMismatch)
        );
    }

    #[test]
    fn unknown_versions_and_fields_are_refused() {
        let (_dir, signer) = signer();
        let text = signer.sign(Receipt {
            version: 2,
            ..sample(ReceiptKind::Tenant)
        });
        assert_eq!(
            verify(&text, &signer.public_key()),
            Err(ReceiptError::UnsupportedVersion(2))
        );

        let mut value = serde_json::to_value(Receipt {
            signer: signer.public_key(),
            ..sample(ReceiptKind::Tenant)
        })
        .unwrap();
        value["surprise"] = serde_json::Value::Bool(true);
        let json = value.to_string();
        let signature = signer.key_pair.sign(json.as_bytes());
        let text = format!(
            "{json}\ned25519:{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        );
        assert!(matches!(
            verify(&text, &signer.public_key()),
            Err(ReceiptError::Malformed(_))
        ));
    }

    #[test]
    fn key_file_is_private_and_reopening_keeps_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let first = ReceiptSigner::open(dir.path()).unwrap();
        let key_path = dir.path().join(RECEIPT_KEY_FILE);
        let mode = fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read(&key_path).unwrap().len(), 32);

        let public_path = dir.path().join(RECEIPT_PUBLIC_KEY_FILE);
        assert_eq!(
            fs::read_to_string(&public_path).unwrap(),
            format!("{}\n", first.public_key())
        );
        let public_mode = fs::metadata(&public_path).unwrap().permissions().mode();
        assert_eq!(public_mode & 0o022, 0, "receipt.pub is writable by others");

        let text = first.sign(sample(ReceiptKind::Subject));
        drop(first);
        fs::remove_file(&public_path).unwrap();
        let second = ReceiptSigner::open(dir.path()).unwrap();
        assert!(second.public_key().starts_with("ed25519:"));
        assert_eq!(
            fs::read_to_string(&public_path).unwrap(),
            format!("{}\n", second.public_key())
        );
        assert!(verify(&text, &second.public_key()).is_ok());
        assert!(!dir.path().join("receipt.pub.tmp").exists());
    }

    #[test]
    fn open_refuses_a_key_file_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        drop(ReceiptSigner::open(dir.path()).unwrap());
        let key_path = dir.path().join(RECEIPT_KEY_FILE);
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(ReceiptSigner::open(dir.path()).is_err());
    }

    #[test]
    fn debug_shows_the_public_key_and_no_seed() {
        let (dir, signer) = signer();
        let seed = fs::read(dir.path().join(RECEIPT_KEY_FILE)).unwrap();
        let printed = format!("{signer:?} {signer:#?}");
        assert!(printed.contains(&signer.public_key()));
        let seed_forms = [
            hex::encode(&seed),
            hex::encode_upper(&seed),
            STANDARD.encode(&seed),
            STANDARD_NO_PAD.encode(&seed),
            URL_SAFE.encode(&seed),
            URL_SAFE_NO_PAD.encode(&seed),
            format!("{seed:?}"),
        ];
        for form in seed_forms {
            assert!(!printed.contains(&form), "Debug shows the seed as {form}");
        }
    }

    #[test]
    fn errors_read_as_plain_english() {
        assert_eq!(
            ReceiptError::BadSignature.to_string(),
            "the signature does not verify: the receipt was altered or was not signed by this key"
        );
        assert_eq!(
            ReceiptError::UnsupportedVersion(2).to_string(),
            "the receipt has version 2; this keywarden reads version 1"
        );
    }
}
