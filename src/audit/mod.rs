//! The audit log: append-only, hash-chained JSON lines.
//!
//! Every Admin call is recorded twice: when it is asked (before anything
//! changes; if that record cannot be written the call is refused: the log
//! fails closed) and when it is answered, with its outcome. Records never hold
//! plaintext, ciphertext, key bytes or tokens; a subject id appears only as a
//! keyed hash (HMAC-SHA256 under the sidecar's audit key), so the log can say
//! "the same subject" without saying who.
//!
//! Each record carries `prev`, the hash of the record before (64 zeros for
//! the first), and `hash`, the SHA-256 of its own bytes as written (the rule,
//! byte by byte, is in [`record`]). [`verify`] walks a log and names the first
//! line that was edited, deleted, inserted or moved, and tells the remains of
//! a failed write from an edit. A log cut at its end cannot be told from a
//! shorter log by itself: export the latest hash (`audit verify` and `audit
//! head` print it) to somewhere else, and give it back to
//! [`verify_anchored`].
//!
//! Calls refused by authentication or authorization, and data-plane calls,
//! are counted ([`counts`]), not recorded one by one.

pub mod counts;
mod file;
pub mod record;

use std::{
    fmt, fs, io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Mutex;

pub use record::{
    Anchor, Body, Broken, GENESIS, NotARecord, Partial, Problem, Record, Verified, verify,
    verify_anchored,
};

use crate::{
    secret::{Key256, load_or_create_key_file},
    time::UnixMillis,
};
use file::Chain;

/// File name of the audit log inside the data directory.
pub const AUDIT_LOG_FILE: &str = "audit.log";
/// File name of the key that hashes subject ids in audit records.
pub const AUDIT_KEY_FILE: &str = "audit.key";

/// Which moment of a call a record describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Before an admin call runs.
    #[default]
    Asked,
    /// After a call ran, with its outcome.
    Answered,
    /// A count of calls refused before they ran, by authentication or
    /// authorization, over an interval (`detail` says how many; see
    /// [`counts::Counts::refused`]).
    Refused,
    /// A count of data-plane calls over an interval (`detail` says how many).
    Counted,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Asked => "asked",
            Phase::Answered => "answered",
            Phase::Refused => "refused",
            Phase::Counted => "counted",
        }
    }
}

/// What to record about one call.
#[derive(Clone, Default)]
pub struct Entry {
    pub action: &'static str,
    pub phase: Phase,
    pub caller: String,
    pub tenant: Option<String>,
    /// The subject id as given; only its keyed hash is written.
    pub subject: Option<Vec<u8>>,
    pub outcome: Option<String>,
    pub detail: Option<String>,
    /// The W3C trace id of the call (32 lowercase hex digits), when the
    /// record is about one call.
    pub trace_id: Option<String>,
}

/// Shows the subject id's length only: it names a person.
impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("action", &self.action)
            .field("phase", &self.phase)
            .field("caller", &self.caller)
            .field("tenant", &self.tenant)
            .field("subject", &self.subject.as_ref().map(|id| Length(id.len())))
            .field("outcome", &self.outcome)
            .field("detail", &self.detail)
            .field("trace_id", &self.trace_id)
            .finish()
    }
}

/// Debug-prints as `<N bytes>`.
struct Length(usize);

impl fmt::Debug for Length {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: io::Error,
}

/// Where records go.
enum Sink {
    /// A file of this sidecar's, open for appending.
    File(Arc<Mutex<Chain>>),
    /// The keystore's PostgreSQL: one chain for every sidecar.
    Postgres(sqlx::PgPool),
}

/// The audit log: a file (the embedded default) or PostgreSQL.
pub struct AuditLog {
    path: PathBuf,
    subject_key: Key256,
    sink: Sink,
    /// Whether the last write succeeded (true until one fails): what
    /// readiness reports ([`AuditLog::writable`]).
    writable: AtomicBool,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log and its key in `dir`, and finds the
    /// chain's head from the last record.
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        let path = dir.join(AUDIT_LOG_FILE);
        let fail = |source| AuditError {
            path: path.clone(),
            source,
        };
        let subject_key = load_or_create_key_file(&dir.join(AUDIT_KEY_FILE))
            .map(|(key, _)| key)
            .map_err(fail)?;
        // Read too: the start reads the log's end, to find its head and
        // a torn last line.
        let file = fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(fail)?;
        // One writer per log: two sidecars appending to one file would each
        // continue their own chain and break it. (Each sidecar has its own
        // data directory; the lock makes a shared one an error at start.)
        file.try_lock().map_err(|e| {
            fail(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("another process writes this audit log ({e}): give every sidecar its own data directory"),
            ))
        })?;
        let chain = Chain::resume(file).map_err(fail)?;
        Ok(Self {
            path,
            subject_key,
            sink: Sink::File(Arc::new(Mutex::new(chain))),
            writable: AtomicBool::new(true),
        })
    }

    /// A log in the keystore's PostgreSQL (migrations/postgres/0003), shared
    /// by every sidecar of it, with this sidecar's subject-hash key from
    /// `dir` (give every sidecar the same `audit.key` for subject hashes to
    /// match across sidecars).
    pub fn postgres(dir: &Path, pool: sqlx::PgPool) -> Result<Self, AuditError> {
        let path = PathBuf::from("postgres:audit_log");
        let subject_key = load_or_create_key_file(&dir.join(AUDIT_KEY_FILE))
            .map(|(key, _)| key)
            .map_err(|source| AuditError {
                path: dir.join(AUDIT_KEY_FILE),
                source,
            })?;
        Ok(Self {
            path,
            subject_key,
            sink: Sink::Postgres(pool),
            writable: AtomicBool::new(true),
        })
    }

    /// A log whose records go to `file` (fault injection: e.g. /dev/full),
    /// starting a new chain, with its key in `dir`.
    #[doc(hidden)]
    pub fn with_file(dir: &Path, file: fs::File) -> Result<Self, AuditError> {
        let path = dir.join(AUDIT_LOG_FILE);
        let subject_key = load_or_create_key_file(&dir.join(AUDIT_KEY_FILE))
            .map(|(key, _)| key)
            .map_err(|source| AuditError {
                path: path.clone(),
                source,
            })?;
        let chain = Chain::new(file).map_err(|source| AuditError {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            subject_key,
            sink: Sink::File(Arc::new(Mutex::new(chain))),
            writable: AtomicBool::new(true),
        })
    }

    /// How many records the log holds, and the latest one's hash.
    pub async fn head(&self) -> Result<(u64, String), AuditError> {
        match &self.sink {
            Sink::File(chain) => {
                let chain = chain.lock().await;
                Ok((chain.seq, chain.head.clone()))
            }
            Sink::Postgres(pool) => {
                let (seq, hash): (i64, String) = sqlx::query_as("SELECT seq, hash FROM audit_head")
                    .fetch_one(pool)
                    .await
                    .map_err(|e| self.failed(e))?;
                Ok((u64::try_from(seq).unwrap_or(0), hash))
            }
        }
    }

    fn failed(&self, e: impl std::fmt::Display) -> AuditError {
        AuditError {
            path: self.path.clone(),
            source: io::Error::other(e.to_string()),
        }
    }

    /// The keyed hash a subject id appears as in records (and receipts).
    pub fn subject_hash(&self, id: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.subject_key.expose())
            .expect("HMAC takes any key length");
        mac.update(id);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Appends one record and syncs it to disk. An error means the record
    /// is not in the log: callers that must fail closed refuse their call.
    pub async fn record(&self, entry: Entry) -> Result<String, AuditError> {
        self.record_all(std::slice::from_ref(&entry)).await
    }

    /// Appends `entries` in order with one write and one sync (one
    /// transaction in PostgreSQL); answers the last one's hash. All or
    /// nothing, as far as the file system lets a single write be.
    pub async fn record_all(&self, entries: &[Entry]) -> Result<String, AuditError> {
        let written = self.write(entries).await;
        self.writable.store(written.is_ok(), Ordering::Relaxed);
        written
    }

    /// Whether the last write succeeded (true before the first): the file
    /// sink's file is open for appending from the start, so this is the one
    /// thing that can change. No I/O.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    async fn write(&self, entries: &[Entry]) -> Result<String, AuditError> {
        // Unchained: `sealed` gives each its place, time and predecessor.
        let body = |entry: &Entry| Body {
            seq: 0,
            time: String::new(),
            action: entry.action.to_owned(),
            phase: entry.phase.name().to_owned(),
            caller: entry.caller.clone(),
            tenant: entry.tenant.clone(),
            subject: entry.subject.as_ref().map(|id| self.subject_hash(id)),
            outcome: entry.outcome.clone(),
            detail: entry.detail.clone(),
            trace_id: entry.trace_id.clone(),
            prev: String::new(),
        };
        match &self.sink {
            Sink::File(chain) => {
                // Sealing (a JSON encoding and a SHA-256 per record: a flush of
                // counts can hold `counts::MAX_COUNTERS`), the write and its
                // sync (milliseconds on a disk) run on a blocking thread, not
                // on a runtime worker whose other calls would wait. That thread
                // holds the chain and advances it after the sync (or cuts a
                // failed write back), so a caller that goes away meanwhile
                // cannot leave the file ahead of the chain.
                let bodies: Vec<Body> = entries.iter().map(body).collect();
                let mut chain = Arc::clone(chain).lock_owned().await;
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || {
                    chain
                        .append(bodies)
                        .map_err(|source| AuditError { path, source })
                })
                .await
                .map_err(|e| AuditError {
                    path: self.path.clone(),
                    source: io::Error::other(format!("the audit writer stopped: {e}")),
                })?
            }
            Sink::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(|e| self.failed(e))?;
                // The head row's lock puts every sidecar's records in one order.
                let (seq, mut head): (i64, String) =
                    sqlx::query_as("SELECT seq, hash FROM audit_head FOR UPDATE")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|e| self.failed(e))?;
                let mut seq = u64::try_from(seq).unwrap_or(0);
                for entry in entries {
                    seq += 1;
                    let (hash, line) = sealed(body(entry), seq, head);
                    sqlx::query("INSERT INTO audit_log (seq, record) VALUES ($1, $2)")
                        .bind(i64::try_from(seq).map_err(|e| self.failed(e))?)
                        .bind(&line)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.failed(e))?;
                    head = hash;
                }
                sqlx::query("UPDATE audit_head SET seq = $1, hash = $2")
                    .bind(i64::try_from(seq).map_err(|e| self.failed(e))?)
                    .bind(&head)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.failed(e))?;
                tx.commit().await.map_err(|e| self.failed(e))?;
                Ok(head)
            }
        }
    }
}

/// Places `body` in the chain (its sequence number, its time, taken here
/// under the chain's lock so that times never go back, and the record
/// before); answers its hash and its JSON line (without a newline).
fn sealed(mut body: Body, seq: u64, prev: String) -> (String, String) {
    body.seq = seq;
    body.time = UnixMillis::now().to_string();
    body.prev = prev;
    record::seal(&body)
}

/// The PostgreSQL audit log as of one snapshot: every record, in order, as
/// JSON lines (for [`verify`]), and what `audit_head` says.
pub struct PostgresLog {
    pub lines: String,
    /// `audit_head`: the last record's sequence number and hash.
    pub head: (u64, String),
}

impl PostgresLog {
    /// Reads both in one read-only, repeatable-read transaction, so a
    /// sidecar appending meanwhile cannot make them disagree.
    pub async fn read(pool: &sqlx::PgPool) -> Result<Self, sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let rows: Vec<(String,)> = sqlx::query_as("SELECT record FROM audit_log ORDER BY seq")
            .fetch_all(&mut *tx)
            .await?;
        let (seq, hash): (i64, String) = sqlx::query_as("SELECT seq, hash FROM audit_head")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut lines = String::new();
        for (line,) in rows {
            lines.push_str(&line);
            lines.push('\n');
        }
        Ok(PostgresLog {
            lines,
            head: (u64::try_from(seq).unwrap_or(0), hash),
        })
    }

    /// Verifies the records against `anchors`, then checks that
    /// `audit_head` names the last of them.
    pub fn verify(&self, anchors: &[Anchor]) -> Result<Verified, Broken> {
        let verified = verify_anchored(self.lines.as_bytes(), anchors)?;
        if (verified.records, &verified.head) != (self.head.0, &self.head.1) {
            return Err(Broken::HeadDiffers {
                records: verified.records,
                head_seq: self.head.0,
                head_hash: self.head.1.clone(),
            });
        }
        Ok(verified)
    }
}

#[cfg(test)]
mod tests;
