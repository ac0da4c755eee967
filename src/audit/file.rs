//! The file sink: one sidecar's log, appended all or nothing.
//!
//! - A write that fails (ENOSPC, EFBIG, EIO, or its sync) is cut back: the
//!   file is truncated to the end of its last complete record and synced,
//!   and the chain in memory stays where it was. If cutting back fails too,
//!   every later append tries it again first, and fails until it succeeds:
//!   nothing is ever written after a partial record.
//! - At start, bytes after the last newline (a write cut short by a crash,
//!   or by keywarden up to `5404065`, which did not cut back) are cut off,
//!   and so is a last line that does not have the shape of a record. The
//!   cut is itself recorded (action `AuditRepair`, caller `keywarden`), with
//!   how many bytes, after which record, and their SHA-256, never their
//!   content; that record waits in memory until a write succeeds, so a
//!   sidecar on a full disk still starts.
//! - A last record that has the shape of one but does not match its hash
//!   was edited: the sidecar refuses to start rather than continue a chain
//!   from it (`keywarden audit verify` names it).

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::FileExt,
};

use sha2::{Digest, Sha256};

use super::{
    Body,
    record::{GENESIS, NotARecord, Record},
    sealed,
};

/// The chain of a log file, behind the log's lock.
pub(super) struct Chain {
    file: fs::File,
    /// The last record's sequence number (0: none yet).
    pub(super) seq: u64,
    /// The last record's hash (GENESIS: none yet).
    pub(super) head: String,
    /// The file's length up to the end of its last complete record: where a
    /// failed write is cut back to.
    len: u64,
    /// A write failed and so did cutting it back: bytes past `len` may be in
    /// the file, and must go before anything else is written.
    dirty: bool,
    /// Records to write before the next ones (the start-up repair's), kept
    /// until a write succeeds.
    pending: Vec<Body>,
}

/// The end of a log file.
pub(super) struct Tail {
    pub(super) len: u64,
    /// The length up to and including the last newline.
    pub(super) complete: u64,
    /// Where the last complete line starts, and its bytes (no newline).
    pub(super) last: Option<(u64, Vec<u8>)>,
}

/// Reads the end of `file`, from its end: start-up must not read a log of
/// millions of records.
pub(super) fn tail(file: &fs::File) -> io::Result<Tail> {
    let len = file.metadata()?.len();
    let mut window = 64 * 1024u64;
    loop {
        let from = len.saturating_sub(window);
        let mut buf = vec![0; usize::try_from(len - from).map_err(io::Error::other)?];
        file.read_exact_at(&mut buf, from)?;
        let newline = buf.iter().rposition(|&b| b == b'\n');
        // The last line is whole once the newline before it, or the file's
        // start, is in the window.
        let before = newline.map(|end| buf[..end].iter().rposition(|&b| b == b'\n'));
        match (newline, before) {
            (None, _) if from == 0 => {
                return Ok(Tail {
                    len,
                    complete: 0,
                    last: None,
                });
            }
            (Some(end), Some(Some(start))) => {
                return Ok(Tail {
                    len,
                    complete: from + end as u64 + 1,
                    last: Some((from + start as u64 + 1, buf[start + 1..end].to_vec())),
                });
            }
            (Some(end), _) if from == 0 => {
                return Ok(Tail {
                    len,
                    complete: end as u64 + 1,
                    last: Some((0, buf[..end].to_vec())),
                });
            }
            _ => window *= 4,
        }
    }
}

/// The SHA-256 of `file`'s bytes from `from` to `to`, in hex.
fn hash_range(file: &fs::File, from: u64, to: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = usize::try_from((to - at).min(buf.len() as u64)).map_err(io::Error::other)?;
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl Chain {
    /// A chain appending to `file` (a fresh log, or a fault injector such as
    /// /dev/full), from the start.
    pub(super) fn new(file: fs::File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Chain {
            file,
            seq: 0,
            head: GENESIS.to_owned(),
            len,
            dirty: false,
            pending: Vec::new(),
        })
    }

    /// The chain of an existing log `file`, open for appending and locked:
    /// finds its last record, after cutting off a torn last line (see the
    /// module's doc), and writes the record of that cut if it can.
    pub(super) fn resume(file: fs::File) -> io::Result<Self> {
        let mut chain = Chain::new(file)?;
        let found = tail(&chain.file)?;
        let torn = found.len > found.complete;
        let cut = match &found.last {
            _ if torn => Some((found.complete, "a partial record (no newline)")),
            Some((start, line)) => match Record::parse_after_remains(line) {
                Err(NotARecord::NoHash | NotARecord::Unreadable(_)) => {
                    Some((*start, "a last line that is not a record"))
                }
                _ => None,
            },
            None => None,
        };
        let found = match cut {
            None => found,
            Some((at, what)) => {
                let bytes = found.len - at;
                let hash = hash_range(&chain.file, at, found.len)?;
                chain.file.set_len(at)?;
                chain.file.sync_data()?;
                let found = tail(&chain.file)?;
                let after = match &found.last {
                    Some((_, line)) => {
                        Record::parse_after_remains(line).map_or(0, |r| r.1.body.seq)
                    }
                    None => 0,
                };
                let detail = format!(
                    "cut {bytes} bytes after record {after} at start: {what} (SHA-256 of the cut bytes: {hash})"
                );
                tracing::warn!(bytes, after_record = after, sha256 = %hash, "the audit log ended in {what}: cut it off; recording the cut");
                chain.pending.push(Body {
                    seq: 0,
                    time: String::new(),
                    action: "AuditRepair".into(),
                    phase: super::Phase::Answered.name().into(),
                    caller: "keywarden".into(),
                    tenant: None,
                    subject: None,
                    outcome: Some("OK".into()),
                    detail: Some(detail),
                    trace_id: None,
                    prev: String::new(),
                });
                found
            }
        };
        chain.len = found.complete;
        if let Some((start, line)) = &found.last {
            let (_, record) = Record::parse_after_remains(line).map_err(|e| {
                invalid(format!(
                    "the last record (at byte {start}) {e}; keywarden repairs only a torn last \
                     line: check the log with `keywarden audit verify`, keep it as evidence, \
                     and move it away to start a new chain"
                ))
            })?;
            chain.seq = record.body.seq;
            chain.head = record.hash;
        }
        if !chain.pending.is_empty()
            && let Err(e) = chain.append(Vec::new())
        {
            tracing::error!(error = %e, "the audit log cannot record its repair yet; it goes before the next record written");
        }
        Ok(chain)
    }

    /// Appends `bodies` (after any pending ones) with one write and one
    /// sync, all or nothing; answers the new head.
    pub(super) fn append(&mut self, bodies: Vec<Body>) -> io::Result<String> {
        if self.dirty {
            self.cut_back()?;
        }
        let (mut seq, mut head) = (self.seq, self.head.clone());
        let mut text = String::new();
        for body in self.pending.iter().cloned().chain(bodies) {
            seq += 1;
            let (hash, line) = sealed(body, seq, head);
            text.push_str(&line);
            text.push('\n');
            head = hash;
        }
        let written = (&self.file)
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.dirty = true;
            if let Err(cut) = self.cut_back() {
                tracing::error!(error = %cut, "the audit log could not be cut back to its last complete record after a failed write; it is tried again before the next write");
            }
            return Err(e);
        }
        self.pending.clear();
        self.len += text.len() as u64;
        self.seq = seq;
        self.head = head.clone();
        Ok(head)
    }

    /// Truncates the file to its last complete record, and syncs that.
    fn cut_back(&mut self) -> io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_data()?;
        self.dirty = false;
        Ok(())
    }
}
