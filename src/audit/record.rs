//! The record format, byte by byte, and [`verify`].
//!
//! A log is a sequence of records, each one line: the record's bytes and a
//! newline (0x0A). A record is UTF-8 JSON, written as
//!
//! ```text
//! {"seq":N,"time":"…","action":"…","phase":"…","caller":"…",["tenant":"…",]["subject":"…",]["outcome":"…",]["detail":"…",]["trace_id":"<32 hex>",]"prev":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! - The fields come in that order; the bracketed ones only when present
//!   (never as `null`); no other field; no whitespace outside strings.
//!   `seq` is a decimal integer without leading zeros. In strings, `"` and
//!   `\` are written `\"` and `\\`; U+0008, U+0009, U+000A, U+000C, U+000D
//!   as `\b`, `\t`, `\n`, `\f`, `\r`; every other character below U+0020 as
//!   `\u00XX` with lowercase hex digits; every other character as its UTF-8
//!   bytes, unescaped (`/`, U+007F and non-ASCII included). This is
//!   `serde_json`'s compact form of [`Body`].
//! - **The hashed bytes** are the record's bytes with its last 75 bytes,
//!   `,"hash":"` + 64 hex digits + `"}`, replaced by the single byte `}`:
//!   exactly the body as written, up to and including `"prev":"…"` and a
//!   closing brace. `hash` is the SHA-256 of those bytes in lowercase hex.
//! - **The chain.** The first record has `seq` 1 and `prev` 64 zeros (`0`);
//!   each next record has `seq` one more and `prev` equal to the `hash` of
//!   the record before it.
//!
//! So any change to a record's bytes (a field added, removed, reordered, a
//! character re-encoded as `\u0041`, a space) changes the hashed bytes or
//! the 75-byte suffix and fails. [`verify`] also refuses a record whose hash
//! matches but that is not in the form above (a writer other than keywarden,
//! or a rewrite with recomputed hashes), and unknown fields.
//!
//! `trace_id` came later (issue 16): it is hashed like every other field,
//! as the bytes `,"trace_id":"<32 lowercase hex>"` written between
//! `detail` (or whatever comes before it) and `,"prev":`. A record without
//! it, old or new, is the same bytes as before it existed, so old logs
//! verify unchanged; a verifier that predates it refuses records that carry
//! it (an unknown field).
//!
//! Records written before this rule was stated (keywarden up to `5404065`,
//! which hashed `serde_json` of the parsed body) are byte for byte the same:
//! that writer's line was the body's compact JSON with `,"hash":"…"` spliced
//! before its closing brace. Old logs verify unchanged; there is no version.

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `,"hash":"`: the bytes before a record's hash.
const HASH_FIELD: &[u8] = br#","hash":""#;
/// The length of a record's suffix `,"hash":"<64 hex>"}`.
const SUFFIX_LEN: usize = HASH_FIELD.len() + 64 + 2;
/// The first bytes of every record: where [`verify`] finds a whole record
/// after the remains of a failed write on the same line.
const RECORD_START: &[u8] = br#"{"seq":"#;

/// What a record says, in the order it is serialized and hashed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// 1 for the first record, one more for each.
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The gRPC method, e.g. "ShredTenant".
    pub action: String,
    /// "asked", "answered", "refused" or "counted".
    pub phase: String,
    /// Who called: the authenticated identity (`token:NAME`, `jwt:SUB`, a
    /// certificate's URI SAN, `unix`, `anonymous`), for a caller that
    /// failed to authenticate the transport's peer (`tcp IP`, `unix
    /// socket`), or the sidecar itself (`scheduler`, `keywarden`).
    pub caller: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tenant: Option<String>,
    /// Keyed hash of the subject id (hex), never the id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// For "answered", "refused" and "counted": "OK" or the gRPC code's
    /// name.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outcome: Option<String>,
    /// What changed, in words without secrets (e.g. "version 3"), or for
    /// counts how many calls ("12 calls").
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// The W3C trace id of the call the record is about (32 lowercase hex
    /// digits): its `traceparent`'s, or the one the sidecar started.
    /// Records written before it existed have none, and verify unchanged.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub trace_id: Option<String>,
    /// Hash of the record before.
    pub prev: String,
}

/// A record as read from a log: checked against its hash and its form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub body: Body,
    /// SHA-256 of the hashed bytes, lowercase hex.
    pub hash: String,
}

/// Why some bytes are not a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotARecord {
    #[error("is not a record: it does not end in ,\"hash\":\"<64 lowercase hex digits>\"}}")]
    NoHash,
    #[error("its content does not match its hash: the record was edited")]
    Edited,
    #[error("is not a record: {0}")]
    Unreadable(String),
    #[error(
        "matches its hash but is not written as keywarden writes records (a field reordered, \
         re-encoded or spaced differently): it was rewritten"
    )]
    NotCanonical,
}

/// The hex SHA-256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `id` is a trace id as keywarden writes it: 32 lowercase hex
/// digits, not all zeros.
fn is_trace_id(id: &str) -> bool {
    id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id.bytes().any(|b| b != b'0')
}

/// Seals `body`: answers its hash and its line (without the newline).
pub fn seal(body: &Body) -> (String, String) {
    let json = serde_json::to_string(body).expect("a record serializes");
    let hash = sha256_hex(json.as_bytes());
    // `json` ends in `}`: splice the hash in before it.
    let mut line = String::with_capacity(json.len() + SUFFIX_LEN - 1);
    line.push_str(&json[..json.len() - 1]);
    line.push_str(r#","hash":""#);
    line.push_str(&hash);
    line.push_str("\"}");
    (hash, line)
}

impl Record {
    /// Parses one record (without its newline) and checks it against its
    /// hash and the form keywarden writes.
    pub fn parse(line: &[u8]) -> Result<Record, NotARecord> {
        let split = line
            .len()
            .checked_sub(SUFFIX_LEN)
            .ok_or(NotARecord::NoHash)?;
        let (head, suffix) = line.split_at(split);
        let hash = &suffix[HASH_FIELD.len()..HASH_FIELD.len() + 64];
        if !suffix.starts_with(HASH_FIELD)
            || !suffix.ends_with(b"\"}")
            || !hash.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(NotARecord::NoHash);
        }
        let mut hashed = Vec::with_capacity(head.len() + 1);
        hashed.extend_from_slice(head);
        hashed.push(b'}');
        let hash = String::from_utf8(hash.to_vec()).expect("checked: ASCII hex digits");
        if sha256_hex(&hashed) != hash {
            return Err(NotARecord::Edited);
        }
        let body: Body =
            serde_json::from_slice(&hashed).map_err(|e| NotARecord::Unreadable(e.to_string()))?;
        if serde_json::to_vec(&body).expect("a record serializes") != hashed
            || body.trace_id.as_deref().is_some_and(|id| !is_trace_id(id))
        {
            return Err(NotARecord::NotCanonical);
        }
        Ok(Record { body, hash })
    }

    /// [`Record::parse`], or failing that, the remains of a failed write
    /// followed on the same line by a whole record (what keywarden up to
    /// `5404065` left after a write that failed part-way: it did not cut the
    /// file back, and its next record went on the same line). Answers the
    /// record and how many bytes came before it.
    pub fn parse_after_remains(line: &[u8]) -> Result<(usize, Record), NotARecord> {
        match Record::parse(line) {
            Ok(record) => Ok((0, record)),
            Err(e) => {
                let start = line
                    .windows(RECORD_START.len())
                    .rposition(|w| w == RECORD_START)
                    .filter(|&at| at > 0)
                    .ok_or(e.clone())?;
                Record::parse(&line[start..])
                    .map(|record| (start, record))
                    .map_err(|_| e)
            }
        }
    }
}

/// A record that must be in the log: `SEQ:HASH`, as `keywarden audit head`
/// prints it, kept somewhere the log's writer cannot reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let expected = "expected SEQ:HASH, a record's sequence number (from 1) and its hash \
                        (64 lowercase hex digits), as `keywarden audit head` prints them";
        let (seq, hash) = raw.split_once(':').ok_or(expected)?;
        let seq: u64 = seq.parse().ok().filter(|&seq| seq >= 1).ok_or(expected)?;
        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(expected.to_owned());
        }
        Ok(Anchor {
            seq,
            hash: hash.to_owned(),
        })
    }
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// A verified log: how many records, the hash of the last one, and the
/// remains of failed writes found among them.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub head: String,
    /// Bytes that are not records but break no record: a write that failed
    /// part-way. The sidecar cuts one at the end of its log when it starts.
    pub partial: Vec<Partial>,
}

/// The remains of a failed write: `bytes` bytes on line `line`, after
/// record `after`. At the end of the log (`at_end`) they have no newline;
/// elsewhere (left by keywarden up to `5404065`) a whole record follows
/// them on the same line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partial {
    pub line: usize,
    pub bytes: u64,
    pub after: u64,
    pub at_end: bool,
}

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.at_end {
            write!(
                f,
                "the log ends in a partial record: {} bytes after record {} (a write that failed \
                 or was cut short; the sidecar cuts them off, and records that it did, when it \
                 next starts)",
                self.bytes, self.after
            )
        } else {
            write!(
                f,
                "line {}: {} bytes of a partial record before record {} (a write that failed; \
                 the records around it are intact)",
                self.line,
                self.bytes,
                self.after + 1
            )
        }
    }
}

/// What is wrong with a log, first thing first.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// A line that is not a record, or breaks the chain.
    #[error("at line {line}: {problem}")]
    Record { line: usize, problem: Problem },
    /// An anchored record is not in the log as anchored.
    #[error(
        "at line {line}: record {seq} has hash {found}, but the anchor says {anchored}: the log \
         was rewritten at or before record {seq}"
    )]
    AnchorDiffers {
        line: usize,
        seq: u64,
        found: String,
        anchored: String,
    },
    /// The log ends before an anchored record.
    #[error(
        "at its end: it holds {records} records, but the anchor names record {seq}: records \
         were removed from its end, or the log was replaced"
    )]
    ShorterThanAnchor { records: u64, seq: u64 },
    /// PostgreSQL's `audit_head` does not name the log's last record.
    #[error(
        "at its end: it holds {records} records, but audit_head names record {head_seq} (hash \
         {head_hash}): the log or its head was changed behind the sidecars"
    )]
    HeadDiffers {
        records: u64,
        head_seq: u64,
        head_hash: String,
    },
}

/// What is wrong with one line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("cannot be read: {0}")]
    Unreadable(String),
    #[error("{0}")]
    NotARecord(NotARecord),
    #[error(
        "is record {found} where record {expected} belongs: records were deleted, inserted or moved"
    )]
    Sequence { found: u64, expected: u64 },
    #[error("does not name the hash of the record before it: the chain is broken here")]
    Chain,
}

/// Checks a whole log: [`verify_anchored`] without anchors.
pub fn verify(reader: impl BufRead) -> Result<Verified, Broken> {
    verify_anchored(reader, &[])
}

/// Checks a whole log: every line is a record (see the module's rule), its
/// sequence number follows, it names the hash of the record before, and
/// every anchored record is there with the anchored hash. Names the first
/// problem. Bytes without a newline at the end, and the remains of a failed
/// write before a record, are not problems: [`Verified::partial`] lists
/// them.
pub fn verify_anchored(mut reader: impl BufRead, anchors: &[Anchor]) -> Result<Verified, Broken> {
    let mut head = GENESIS.to_owned();
    let mut seq = 0;
    let mut partial = Vec::new();
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        number += 1;
        let broken = |problem| Broken::Record {
            line: number,
            problem,
        };
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| broken(Problem::Unreadable(e.to_string())))?;
        if read == 0 {
            break;
        }
        let Some(line) = buf.strip_suffix(b"\n") else {
            partial.push(Partial {
                line: number,
                bytes: buf.len() as u64,
                after: seq,
                at_end: true,
            });
            break;
        };
        let (remains, record) =
            Record::parse_after_remains(line).map_err(|e| broken(Problem::NotARecord(e)))?;
        if remains > 0 {
            partial.push(Partial {
                line: number,
                bytes: remains as u64,
                after: seq,
                at_end: false,
            });
        }
        if record.body.seq != seq + 1 {
            return Err(broken(Problem::Sequence {
                found: record.body.seq,
                expected: seq + 1,
            }));
        }
        if record.body.prev != head {
            return Err(broken(Problem::Chain));
        }
        seq = record.body.seq;
        head = record.hash;
        if let Some(anchor) = anchors.iter().find(|a| a.seq == seq && a.hash != head) {
            return Err(Broken::AnchorDiffers {
                line: number,
                seq,
                found: head,
                anchored: anchor.hash.clone(),
            });
        }
    }
    if let Some(anchor) = anchors.iter().filter(|a| a.seq > seq).min_by_key(|a| a.seq) {
        return Err(Broken::ShorterThanAnchor {
            records: seq,
            seq: anchor.seq,
        });
    }
    Ok(Verified {
        records: seq,
        head,
        partial,
    })
}
