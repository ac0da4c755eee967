//! The embedded keystore: one SQLite file, nothing to install.
//!
//! The transaction scripts are the shared ones of [`super::sql`]; this module
//! supplies what is SQLite's own.
//!
//! Durability matters more than speed here (writes are rare: tenant creation,
//! rotation, a subject's first key, shreds), so the database runs in WAL mode
//! with `synchronous = FULL`: a key is on disk before any ciphertext made with
//! it is returned. `secure_delete` overwrites deleted rows, and every shred
//! (and every version destroyed by retention) checkpoints the WAL, so a
//! destroyed wrapped key does not linger in free pages or in the log. That
//! checkpoint is best effort (a reader can hold it off, a crash can come
//! first), so opening the keystore checkpoints too, before anything is
//! served: frames a crash left behind go at the next start. Write
//! transactions start with `BEGIN IMMEDIATE`, which takes the write lock at
//! once and makes each check-then-write atomic.
//!
//! The data plane's read on a cache miss (a tenant with its primary key) does
//! not go through sqlx: sqlx runs every SQLite statement on a worker thread
//! of its connection, and hands the query over and the rows back through
//! channels, two thread wake-ups per read, which on a 2-core sidecar cost
//! far more than the read itself (the `perf` profile with 100,000 tenants
//! behind a 10,000-key cache is in BENCHMARKS.md). That read runs instead on
//! the calling thread, on one of a few read-only rusqlite connections: an
//! indexed point read of a page in memory.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    str::FromStr,
    sync::{Mutex, OnceLock, TryLockError},
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    Row, Sqlite,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{
    StoreError, TenantWithPrimary,
    sql::{
        Backend, SqlKeystore, SqlPool, Tx,
        rows::{KeystoreRow, TENANT_WITH_PRIMARY_FROM, corrupt, tenant_with_primary_from_row},
    },
};
use crate::ids::TenantId;

/// File name of the keystore inside the data directory.
pub const KEYSTORE_FILE: &str = "keystore.sqlite3";

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite keystore: the shared SQL keystore over [`SqliteBackend`].
pub type SqliteKeystore = SqlKeystore<SqliteBackend>;

/// What SQLite supplies to the shared keystore.
pub struct SqliteBackend {
    sql: SqlPool<Sqlite>,
    readers: Readers,
}

/// Read-only connections for reads on the calling thread (see the module
/// docs), opened on first use.
struct Readers {
    path: std::path::PathBuf,
    connections: Vec<OnceLock<Mutex<rusqlite::Connection>>>,
}

impl Readers {
    fn new(path: &Path) -> Self {
        // One per thread that may read at once: the runtime's workers
        // (`worker_threads`), or one per CPU outside a runtime. Opened on
        // first use, so a slot never needed costs nothing.
        let n = tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.metrics().num_workers())
            .or_else(|_| std::thread::available_parallelism().map(usize::from))
            .map_or(2, |n| n.clamp(1, 8));
        Self {
            path: path.to_owned(),
            connections: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    fn open(&self) -> rusqlite::Result<Mutex<rusqlite::Connection>> {
        use rusqlite::OpenFlags;
        // Not SQLITE_OPEN_READ_ONLY: a reader of a WAL database needs to
        // write its shared-memory index; `query_only` refuses any write.
        let connection = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(Duration::from_secs(5))?;
        connection.pragma_update(None, "query_only", true)?;
        Ok(Mutex::new(connection))
    }

    /// Runs `read` on a free connection (or waits for the first).
    fn read<T>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut chosen = None;
        for slot in &self.connections {
            let connection = match slot.get() {
                Some(connection) => connection,
                None => {
                    let opened = self.open().map_err(classify_sync)?;
                    slot.get_or_init(|| opened)
                }
            };
            match connection.try_lock() {
                Ok(guard) => {
                    chosen = Some(guard);
                    break;
                }
                // A read that panicked left no state behind: reuse it.
                Err(TryLockError::Poisoned(poisoned)) => {
                    chosen = Some(poisoned.into_inner());
                    break;
                }
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let guard = match chosen {
            Some(guard) => guard,
            None => self.connections[0]
                .get()
                .ok_or_else(|| StoreError::Unavailable("no keystore reader".into()))?
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        };
        read(&guard)
    }
}

/// A row of a [`Readers`] connection, with its statement's column names
/// (rusqlite's lookup by name asks SQLite for every name on every lookup).
struct SyncRow<'a> {
    row: &'a rusqlite::Row<'a>,
    columns: &'a [&'a str],
}

impl SyncRow<'_> {
    fn get<T: rusqlite::types::FromSql>(&self, column: &str) -> Result<T, StoreError> {
        let index = self
            .columns
            .iter()
            .position(|c| *c == column)
            .ok_or_else(|| StoreError::Corrupt(format!("no column {column}")))?;
        self.row.get(index).map_err(corrupt)
    }
}

impl KeystoreRow for SyncRow<'_> {
    fn text(&self, column: &str) -> Result<String, StoreError> {
        self.get(column)
    }
    fn maybe_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.get(column)
    }
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        self.get(column)
    }
    fn maybe_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        self.get(column)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>, StoreError> {
        self.get(column)
    }
    fn maybe_bytes(&self, column: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(column)
    }
}

impl SqlKeystore<SqliteBackend> {
    /// Opens (creating if needed) the keystore at `path` and applies pending
    /// migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(unavailable)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .pragma("secure_delete", "ON");
        // Connections to a local file never go stale: no idle or lifetime
        // reaper (which would also be a background timer in every test).
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        // Wrapped keys are useless without the root key, but the keystore is
        // still nobody else's business; SQLite creates files by the umask.
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            if let Err(e) = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(StoreError::Unavailable(format!(
                    "cannot restrict {}: {e}",
                    path.display()
                )));
            }
        }
        MIGRATIONS
            .run(&pool)
            .await
            .map_err(|e| StoreError::Corrupt(format!("migrations failed: {e}")))?;
        let backend = SqliteBackend {
            sql: SqlPool { pool },
            readers: Readers::new(path),
        };
        // Nothing else reads yet, so this one completes: the WAL a crash left
        // (with the frames of keys destroyed just before it) is emptied.
        backend.checkpoint("at start").await;
        Ok(Self::new(backend))
    }
}

impl SqliteBackend {
    /// Moves the WAL into the database file and truncates it, so deleted key
    /// material (shreds, destroyed versions) leaves the log. Best effort: a
    /// busy reader can hold it off (SQLite answers busy), and then the next
    /// one (the next destruction, or the next start) finishes the work.
    async fn checkpoint(&self, when: &'static str) {
        match sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.sql.pool)
            .await
        {
            // The first column is 1 when a reader or writer kept the
            // checkpoint from completing.
            Ok(row) if row.try_get::<i64, _>(0).is_ok_and(|busy| busy == 0) => {}
            Ok(_) => tracing::warn!(
                when,
                "the WAL checkpoint could not complete (a reader was busy); the next one will"
            ),
            Err(e) => tracing::warn!(when, error = %e, "the WAL checkpoint failed"),
        }
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    type Sql = SqlPool<Sqlite>;

    /// `BEGIN IMMEDIATE` holds the database's write lock already.
    const LOCK_TENANT: &'static str = "";

    const LEGACY_WRAP: &'static str = "substr(wrapped, 2, 1) = X'01'";

    fn sql(&self) -> &Self::Sql {
        &self.sql
    }

    fn classify(e: sqlx::Error) -> StoreError {
        classify(e)
    }

    async fn begin_write(&self) -> Result<Tx<Self>, StoreError> {
        self.sql
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)
    }

    async fn begin_snapshot(&self) -> Result<Tx<Self>, StoreError> {
        // A read transaction gives its reads one snapshot.
        self.sql.pool.begin().await.map_err(classify)
    }

    /// Deleted key material leaves the WAL (see the module docs).
    async fn destroyed(&self) {
        self.checkpoint("after a key's destruction").await;
    }

    /// On the calling thread, through a rusqlite reader (see the module
    /// docs).
    async fn tenant_with_primary(
        &self,
        id: &TenantId,
    ) -> Result<Option<TenantWithPrimary>, StoreError> {
        self.readers.read(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {TENANT_WITH_PRIMARY_FROM} WHERE t.tenant_id = ?1"
                ))
                .map_err(classify_sync)?;
            let columns: Vec<String> = statement
                .column_names()
                .into_iter()
                .map(str::to_owned)
                .collect();
            let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
            let mut rows = statement.query([id.as_str()]).map_err(classify_sync)?;
            match rows.next().map_err(classify_sync)? {
                Some(row) => tenant_with_primary_from_row(&SyncRow {
                    row,
                    columns: &columns,
                })
                .map(Some),
                None => Ok(None),
            }
        })
    }
}

/// Sorts a database error into "cannot reach or use the database now"
/// (retryable) and "the database holds or answered something impossible".
fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => unavailable(e),
        sqlx::Error::Database(db)
            // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN,
            // and their extended codes (the primary code is the low byte).
            if db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14)) =>
        {
            unavailable(e)
        }
        _ => corrupt(e),
    }
}

/// [`classify`] for the synchronous readers.
fn classify_sync(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{
        CannotOpen, DatabaseBusy, DatabaseLocked, DiskFull, SystemIoFailure,
    };
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | CannotOpen) => {
            unavailable(e)
        }
        _ => corrupt(e),
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kms::WrappedKey,
        store::{Keystore, NewTenant, Placement, TenantPolicy, TenantState, UnixMillis},
    };

    /// The files of the keystore at `path` (database, WAL, shared memory)
    /// that hold `needle`.
    fn files_holding(path: &Path, needle: &[u8]) -> Vec<String> {
        ["", "-wal", "-shm"]
            .into_iter()
            .filter(|suffix| {
                let mut file = path.as_os_str().to_owned();
                file.push(suffix);
                std::fs::read(&file)
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            })
            .map(|suffix| format!("keystore{suffix}"))
            .collect()
    }

    fn wrapped(marker: u8) -> WrappedKey {
        WrappedKey {
            root_key_id: "local:test".into(),
            // Distinct, and unlike anything else SQLite writes.
            ciphertext: (0..60u8).map(|i| marker ^ i.wrapping_mul(37)).collect(),
        }
    }

    /// A crash between a shred's commit and its checkpoint leaves the shred
    /// tenant's wrapped keys in the WAL (here the checkpoint is held off by a
    /// reader, and the files are copied as a crash would leave them); the
    /// next start removes them before the keystore is used.
    #[tokio::test]
    async fn opening_checkpoints_what_a_crash_left_in_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEYSTORE_FILE);
        let store = SqliteKeystore::open(&path).await.unwrap();
        let (first_key, index_key) = (wrapped(0xA5), wrapped(0x5A));
        let (first, index) = (first_key.ciphertext.clone(), index_key.ciphertext.clone());
        let acme = TenantId::parse("tenant_id", "acme").unwrap();
        store
            .create_tenant(NewTenant {
                id: acme.clone(),
                created_at: UnixMillis(1_000),
                placement: Placement::shared(),
                policy: TenantPolicy::default(),
                first_key,
                index_key,
            })
            .await
            .unwrap();

        // A reader in a read transaction: the shred's checkpoint cannot
        // complete while it lasts.
        let reader = rusqlite::Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let tenants: i64 = reader
            .query_row("SELECT count(*) FROM tenants", [], |row| row.get(0))
            .unwrap();
        assert_eq!(tenants, 1);
        let shred = store.shred_tenant(&acme, UnixMillis(2_000)).await.unwrap();
        assert_eq!(shred.destroyed_key_versions, 1);

        // The files as a crash now would leave them.
        let crashed = tempfile::tempdir().unwrap();
        let copy = crashed.path().join(KEYSTORE_FILE);
        for suffix in ["", "-wal"] {
            let (mut from, mut to) = (path.as_os_str().to_owned(), copy.as_os_str().to_owned());
            from.push(suffix);
            to.push(suffix);
            std::fs::copy(&from, &to).unwrap();
        }
        assert_eq!(files_holding(&copy, &first), ["keystore-wal"]);
        assert_eq!(files_holding(&copy, &index), ["keystore-wal"]);
        drop(reader);
        drop(store);

        let restarted = SqliteKeystore::open(&copy).await.unwrap();
        assert_eq!(files_holding(&copy, &first), Vec::<String>::new());
        assert_eq!(files_holding(&copy, &index), Vec::<String>::new());
        let mut wal = copy.as_os_str().to_owned();
        wal.push("-wal");
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        // The shred survived the crash.
        let record = restarted.tenant(&acme).await.unwrap().unwrap();
        assert!(
            matches!(record.state, TenantState::Shredded { at, .. } if at == UnixMillis(2_000)),
            "{:?}",
            record.state
        );
    }
}
