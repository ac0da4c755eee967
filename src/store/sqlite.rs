//! The embedded keystore: one SQLite file, nothing to install.
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
//! channels, two thread wake-ups per read. On a 2-core sidecar those cost
//! about ten times the read itself (`perf`: 31 % of the sidecar's time on the
//! worker threads and 35 % in task switches and futex wake-ups, with 100,000
//! tenants behind a 10,000-key cache; BENCHMARKS.md). That read runs instead
//! on the calling thread, on one of a few read-only rusqlite connections: an
//! indexed point read of a page in memory, tens of microseconds at most.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    str::FromStr,
    sync::{Mutex, OnceLock, TryLockError},
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    Row, Sqlite, SqlitePool, Transaction,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{
    Keystore, NewTenant, RootWrapped, RootWrappedSlot, StoreError, SubjectKeyRecord, SubjectLookup,
    SubjectShred, TenantKeyRecord, TenantPolicy, TenantRecord, TenantShred, TenantState,
    TenantWithPrimary, UnixMillis,
    rows::{
        self, KeystoreRow, SUBJECT_KEY_COLUMNS, TENANT_COLUMNS, TENANT_KEY_COLUMNS,
        TENANT_STATE_COLUMNS, TENANT_WITH_PRIMARY_FROM, corrupt, destroyed_version_from_row,
        subject_key_from_row, tenant_from_row, tenant_key_from_row, tenant_state_from_row,
        tenant_with_primary_from_row,
    },
};
use crate::{
    ids::{SubjectKeyId, TenantId},
    kms::WrappedKey,
};

/// File name of the keystore inside the data directory.
pub const KEYSTORE_FILE: &str = "keystore.sqlite3";

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteKeystore {
    pool: SqlitePool,
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

impl SqliteKeystore {
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
        let store = Self {
            pool,
            readers: Readers::new(path),
        };
        // Nothing else reads yet, so this one completes: the WAL a crash left
        // (with the frames of keys destroyed just before it) is emptied.
        store.checkpoint("at start").await;
        Ok(store)
    }

    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)
    }

    /// Moves the WAL into the database file and truncates it, so deleted key
    /// material (shreds, destroyed versions) leaves the log. Best effort: a
    /// busy reader can hold it off (SQLite answers busy), and then the next
    /// one (the next destruction, or the next start) finishes the work.
    async fn checkpoint(&self, when: &'static str) {
        match sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.pool)
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

/// Reads the tenant's state inside a write transaction.
async fn tenant_in(
    tx: &mut Transaction<'static, Sqlite>,
    id: &TenantId,
) -> Result<Option<TenantState>, StoreError> {
    sqlx::query(&format!(
        "SELECT {TENANT_STATE_COLUMNS} FROM tenants WHERE tenant_id = ?"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut **tx)
    .await
    .map_err(classify)?
    .map(|row| tenant_state_from_row(&row))
    .transpose()
}

/// Like [`tenant_in`], but the tenant must exist and be active; answers its
/// primary version.
async fn active_tenant_in(
    tx: &mut Transaction<'static, Sqlite>,
    id: &TenantId,
) -> Result<u32, StoreError> {
    match tenant_in(tx, id).await? {
        None => Err(StoreError::TenantNotFound(id.clone())),
        Some(TenantState::Shredded { at, .. }) => Err(StoreError::TenantShredded {
            tenant: id.clone(),
            at,
        }),
        Some(TenantState::Active {
            primary_version, ..
        }) => Ok(primary_version),
    }
}

/// Refuses a new subject key once the tenant holds `policy.max_subjects` of
/// them (0: no quota), counting under the write lock this transaction holds,
/// so concurrent creations cannot pass the quota together. The policy is read
/// here, not taken from a cache, and the count stops at the quota.
async fn check_subject_quota(
    tx: &mut Transaction<'static, Sqlite>,
    id: &TenantId,
) -> Result<(), StoreError> {
    let json: String = sqlx::query_scalar("SELECT policy FROM tenants WHERE tenant_id = ?")
        .bind(id.as_str())
        .fetch_one(&mut **tx)
        .await
        .map_err(classify)?;
    let max = TenantPolicy::from_json(&json)?.max_subjects;
    if max == 0 {
        return Ok(());
    }
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let held: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM subject_keys WHERE tenant_id = ? LIMIT ?) AS s",
    )
    .bind(id.as_str())
    .bind(limit)
    .fetch_one(&mut **tx)
    .await
    .map_err(classify)?;
    if held >= limit {
        return Err(StoreError::SubjectQuota {
            tenant: id.clone(),
            max,
        });
    }
    Ok(())
}

/// Whether tenant key `version` is live (not destroyed, not unknown).
async fn version_is_live(
    tx: &mut Transaction<'static, Sqlite>,
    id: &TenantId,
    version: u32,
) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("SELECT 1 FROM tenant_keys WHERE tenant_id = ? AND version = ?")
            .bind(id.as_str())
            .bind(i64::from(version))
            .fetch_optional(&mut **tx)
            .await
            .map_err(classify)?
            .is_some(),
    )
}

async fn subject_in(
    tx: &mut Transaction<'static, Sqlite>,
    id: &TenantId,
    subject: SubjectKeyId,
) -> Result<SubjectLookup, StoreError> {
    if let Some(row) = sqlx::query(
        "SELECT shredded_at_ms FROM subject_tombstones WHERE tenant_id = ? AND subject_key_id = ?",
    )
    .bind(id.as_str())
    .bind(&subject.0[..])
    .fetch_optional(&mut **tx)
    .await
    .map_err(classify)?
    {
        let at = UnixMillis(row.try_get("shredded_at_ms").map_err(corrupt)?);
        return Ok(SubjectLookup::Shredded { at });
    }
    let row = sqlx::query(
        "SELECT wrapped, tenant_version FROM subject_keys WHERE tenant_id = ? AND subject_key_id = ?",
    )
    .bind(id.as_str())
    .bind(&subject.0[..])
    .fetch_optional(&mut **tx)
    .await
    .map_err(classify)?;
    match row {
        None => Ok(SubjectLookup::Absent),
        Some(row) => Ok(SubjectLookup::Key(SubjectKeyRecord {
            wrapped: row.try_get("wrapped").map_err(corrupt)?,
            tenant_version: rows::version(row.try_get("tenant_version").map_err(corrupt)?)?,
        })),
    }
}

#[async_trait]
impl Keystore for SqliteKeystore {
    async fn create_tenant(&self, tenant: NewTenant) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        match tenant_in(&mut tx, &tenant.id).await? {
            Some(TenantState::Shredded { at, .. }) => {
                return Err(StoreError::TenantShredded {
                    tenant: tenant.id,
                    at,
                });
            }
            Some(_) => return Err(StoreError::TenantExists(tenant.id)),
            None => {}
        }
        sqlx::query(
            "INSERT INTO tenants (tenant_id, created_at_ms, primary_version, index_key_wrapped, \
             index_key_root, tier, region, root_key, policy) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)",
        )
        .bind(tenant.id.as_str())
        .bind(tenant.created_at.0)
        .bind(&tenant.index_key.ciphertext)
        .bind(&tenant.index_key.root_key_id)
        .bind(tenant.placement.tier.as_str())
        .bind(&tenant.placement.region)
        .bind(&tenant.placement.root_key)
        .bind(tenant.policy.to_json()?)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        insert_tenant_key(
            &mut tx,
            &tenant.id,
            &TenantKeyRecord {
                version: 1,
                wrapped: tenant.first_key,
                created_at: tenant.created_at,
            },
        )
        .await?;
        tx.commit().await.map_err(classify)
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = ?"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .map(|row| tenant_from_row(&row))
        .transpose()
    }

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

    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        let sql = format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id > ? ORDER BY tenant_id LIMIT ?"
        );
        sqlx::query(&sql)
            .bind(after.map_or("", TenantId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?
            .iter()
            .map(tenant_from_row)
            .collect()
    }

    async fn tenant_key(
        &self,
        id: &TenantId,
        version: u32,
    ) -> Result<Option<TenantKeyRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE tenant_id = ? AND version = ?"
        ))
        .bind(id.as_str())
        .bind(i64::from(version))
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .map(|row| tenant_key_from_row(&row))
        .transpose()
    }

    async fn tenant_keys(&self, id: &TenantId) -> Result<Vec<TenantKeyRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE tenant_id = ? ORDER BY version"
        ))
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(tenant_key_from_row)
        .collect()
    }

    async fn add_tenant_key(
        &self,
        id: &TenantId,
        expected_primary: u32,
        key: TenantKeyRecord,
    ) -> Result<(), StoreError> {
        if expected_primary.checked_add(1) != Some(key.version) {
            return Err(StoreError::Corrupt(format!(
                "new version {} does not follow primary {expected_primary}",
                key.version
            )));
        }
        let mut tx = self.write().await?;
        let updated = sqlx::query(
            "UPDATE tenants SET primary_version = ? \
             WHERE tenant_id = ? AND primary_version = ? AND shredded_at_ms IS NULL",
        )
        .bind(i64::from(key.version))
        .bind(id.as_str())
        .bind(i64::from(expected_primary))
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if updated == 0 {
            active_tenant_in(&mut tx, id).await?;
            return Err(StoreError::Conflict);
        }
        insert_tenant_key(&mut tx, id, &key).await?;
        tx.commit().await.map_err(classify)
    }

    async fn subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
    ) -> Result<SubjectLookup, StoreError> {
        // A read transaction gives the two lookups one snapshot.
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let lookup = subject_in(&mut tx, id, subject).await?;
        tx.commit().await.map_err(classify)?;
        Ok(lookup)
    }

    async fn insert_subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
        key: SubjectKeyRecord,
        created_at: UnixMillis,
    ) -> Result<SubjectLookup, StoreError> {
        let mut tx = self.write().await?;
        active_tenant_in(&mut tx, id).await?;
        if !version_is_live(&mut tx, id, key.tenant_version).await? {
            return Err(StoreError::Corrupt(format!(
                "a subject key of tenant {id} names wrapping version {}, which does not exist",
                key.tenant_version
            )));
        }
        if let SubjectLookup::Absent = subject_in(&mut tx, id, subject).await? {
            check_subject_quota(&mut tx, id).await?;
            sqlx::query(
                "INSERT INTO subject_keys (tenant_id, subject_key_id, wrapped, tenant_version, \
                 created_at_ms) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id.as_str())
            .bind(&subject.0[..])
            .bind(&key.wrapped)
            .bind(i64::from(key.tenant_version))
            .bind(created_at.0)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        let lookup = subject_in(&mut tx, id, subject).await?;
        tx.commit().await.map_err(classify)?;
        Ok(lookup)
    }

    async fn shred_tenant(&self, id: &TenantId, at: UnixMillis) -> Result<TenantShred, StoreError> {
        let mut tx = self.write().await?;
        match tenant_in(&mut tx, id).await? {
            None => return Err(StoreError::TenantNotFound(id.clone())),
            Some(TenantState::Shredded { at: first, .. }) => {
                return Ok(TenantShred {
                    at: first,
                    already_shredded: true,
                    destroyed_key_versions: 0,
                    destroyed_subject_keys: 0,
                });
            }
            Some(_) => {}
        }
        let subjects = delete_where_tenant(&mut tx, "subject_keys", id).await?;
        delete_where_tenant(&mut tx, "subject_tombstones", id).await?;
        let versions = delete_where_tenant(&mut tx, "tenant_keys", id).await?;
        sqlx::query(
            "UPDATE tenants SET shredded_at_ms = ?, primary_version = 0, \
             index_key_wrapped = NULL, index_key_root = NULL WHERE tenant_id = ?",
        )
        .bind(at.0)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        self.checkpoint("after a key's destruction").await;
        Ok(TenantShred {
            at,
            already_shredded: false,
            destroyed_key_versions: u32::try_from(versions).unwrap_or(u32::MAX),
            destroyed_subject_keys: subjects,
        })
    }

    async fn shared_root_wrapped(
        &self,
        region: Option<&str>,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<RootWrapped>, StoreError> {
        let rows = sqlx::query(
            "WITH page AS ( \
               SELECT tenant_id, index_key_wrapped, index_key_root FROM tenants \
               WHERE tenant_id > ? AND shredded_at_ms IS NULL AND tier = 'shared' AND region IS ? \
               ORDER BY tenant_id LIMIT ?) \
             SELECT tenant_id, 0 AS slot, index_key_wrapped AS wrapped, index_key_root AS root FROM page \
             UNION ALL \
             SELECT k.tenant_id, k.version, k.wrapped, k.root_key_id \
               FROM tenant_keys k JOIN page p ON p.tenant_id = k.tenant_id \
             ORDER BY tenant_id, slot",
        )
        .bind(after.map_or("", TenantId::as_str))
        .bind(region)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(rows::root_wrapped_from_row).collect()
    }

    async fn count_shared_root_wrapped(
        &self,
        region: Option<&str>,
        root_key_id: &str,
    ) -> Result<(u64, u64), StoreError> {
        let row = sqlx::query(
            "SELECT count(*) AS total, coalesce(sum(root = ?), 0) AS done FROM ( \
               SELECT index_key_root AS root FROM tenants \
                 WHERE shredded_at_ms IS NULL AND tier = 'shared' AND region IS ? \
               UNION ALL \
               SELECT k.root_key_id FROM tenant_keys k JOIN tenants t ON t.tenant_id = k.tenant_id \
                 WHERE t.shredded_at_ms IS NULL AND t.tier = 'shared' AND t.region IS ? )",
        )
        .bind(root_key_id)
        .bind(region)
        .bind(region)
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        let count = |name| -> Result<u64, StoreError> {
            u64::try_from(row.try_get::<i64, _>(name).map_err(corrupt)?)
                .map_err(|_| StoreError::Corrupt("negative count".into()))
        };
        Ok((count("total")?, count("done")?))
    }

    async fn replace_root_wrapped(
        &self,
        tenant: &TenantId,
        slot: RootWrappedSlot,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> Result<bool, StoreError> {
        let executed = match slot {
            RootWrappedSlot::Index => {
                sqlx::query(
                    "UPDATE tenants SET index_key_wrapped = ?, index_key_root = ? \
                     WHERE tenant_id = ? AND index_key_wrapped = ? AND index_key_root = ?",
                )
                .bind(&new.ciphertext)
                .bind(&new.root_key_id)
                .bind(tenant.as_str())
                .bind(&old.ciphertext)
                .bind(&old.root_key_id)
                .execute(&self.pool)
                .await
            }
            RootWrappedSlot::Version(version) => {
                sqlx::query(
                    "UPDATE tenant_keys SET wrapped = ?, root_key_id = ? \
                     WHERE tenant_id = ? AND version = ? AND wrapped = ? AND root_key_id = ?",
                )
                .bind(&new.ciphertext)
                .bind(&new.root_key_id)
                .bind(tenant.as_str())
                .bind(i64::from(version))
                .bind(&old.ciphertext)
                .bind(&old.root_key_id)
                .execute(&self.pool)
                .await
            }
        };
        let updated = executed.map_err(classify)?.rows_affected();
        Ok(updated == 1)
    }

    async fn invariant_violations(&self) -> Result<Vec<String>, StoreError> {
        let mut violations = Vec::new();
        for (rule, sql) in super::INVARIANTS {
            for row in sqlx::query(sql)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?
            {
                let tenant: String = row.try_get(0).map_err(corrupt)?;
                violations.push(format!("{rule}: tenant {tenant}"));
            }
        }
        Ok(violations)
    }

    async fn set_root_key_deletion(&self, id: &TenantId, at: UnixMillis) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE tenants SET root_key_deletion_at_ms = ? WHERE tenant_id = ? AND shredded_at_ms IS NOT NULL",
        )
        .bind(at.0)
        .bind(id.as_str())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn shred_subject(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
        at: UnixMillis,
    ) -> Result<SubjectShred, StoreError> {
        let mut tx = self.write().await?;
        active_tenant_in(&mut tx, id).await?;
        if let SubjectLookup::Shredded { at: first } = subject_in(&mut tx, id, subject).await? {
            return Ok(SubjectShred {
                at: first,
                already_shredded: true,
                key_destroyed: false,
            });
        }
        let deleted =
            sqlx::query("DELETE FROM subject_keys WHERE tenant_id = ? AND subject_key_id = ?")
                .bind(id.as_str())
                .bind(&subject.0[..])
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
        sqlx::query(
            "INSERT INTO subject_tombstones (tenant_id, subject_key_id, shredded_at_ms) VALUES (?, ?, ?)",
        )
        .bind(id.as_str())
        .bind(&subject.0[..])
        .bind(at.0)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        self.checkpoint("after a key's destruction").await;
        Ok(SubjectShred {
            at,
            already_shredded: false,
            key_destroyed: deleted > 0,
        })
    }

    async fn set_policy(&self, id: &TenantId, policy: &TenantPolicy) -> Result<(), StoreError> {
        let json = policy.to_json()?;
        let mut tx = self.write().await?;
        active_tenant_in(&mut tx, id).await?;
        sqlx::query("UPDATE tenants SET policy = ? WHERE tenant_id = ?")
            .bind(json)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn destroyed_versions(
        &self,
        id: &TenantId,
    ) -> Result<Vec<(u32, UnixMillis)>, StoreError> {
        sqlx::query(
            "SELECT version, destroyed_at_ms FROM destroyed_versions WHERE tenant_id = ? \
             ORDER BY version",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(destroyed_version_from_row)
        .collect()
    }

    async fn subject_keys_wrapped_by(
        &self,
        id: &TenantId,
        version: u32,
        limit: u32,
    ) -> Result<Vec<(SubjectKeyId, SubjectKeyRecord)>, StoreError> {
        sqlx::query(&format!(
            "SELECT {SUBJECT_KEY_COLUMNS} FROM subject_keys \
             WHERE tenant_id = ? AND tenant_version = ? ORDER BY subject_key_id LIMIT ?"
        ))
        .bind(id.as_str())
        .bind(i64::from(version))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(subject_key_from_row)
        .collect()
    }

    async fn legacy_subject_keys(
        &self,
        after: Option<(&TenantId, &SubjectKeyId)>,
        limit: u32,
    ) -> Result<Vec<(TenantId, SubjectKeyId, SubjectKeyRecord)>, StoreError> {
        // ("", no bytes) sorts before every real row.
        let (tenant, subject) = after.map_or(("", &[][..]), |(t, s)| (t.as_str(), &s.0[..]));
        sqlx::query(&format!(
            "SELECT tenant_id, {SUBJECT_KEY_COLUMNS} FROM subject_keys \
             WHERE (tenant_id, subject_key_id) > (?, ?) AND substr(wrapped, 2, 1) = X'01' \
             ORDER BY tenant_id, subject_key_id LIMIT ?"
        ))
        .bind(tenant)
        .bind(subject)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(|row| {
            let (id, record) = subject_key_from_row(row)?;
            Ok((
                rows::tenant_id(&rows::KeystoreRow::text(row, "tenant_id")?)?,
                id,
                record,
            ))
        })
        .collect()
    }

    async fn replace_subject_wrap(
        &self,
        id: &TenantId,
        subject: &SubjectKeyId,
        expected_version: u32,
        new: SubjectKeyRecord,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        // A shredded subject or tenant has no key row: the swap finds nothing.
        let current = sqlx::query(
            "SELECT 1 FROM subject_keys \
             WHERE tenant_id = ? AND subject_key_id = ? AND tenant_version = ?",
        )
        .bind(id.as_str())
        .bind(&subject.0[..])
        .bind(i64::from(expected_version))
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        if current.is_none() {
            return Ok(false);
        }
        if !version_is_live(&mut tx, id, new.tenant_version).await? {
            return Err(StoreError::Corrupt(format!(
                "a subject key of tenant {id} would be wrapped by version {}, which does not exist",
                new.tenant_version
            )));
        }
        sqlx::query(
            "UPDATE subject_keys SET wrapped = ?, tenant_version = ? \
             WHERE tenant_id = ? AND subject_key_id = ?",
        )
        .bind(&new.wrapped)
        .bind(i64::from(new.tenant_version))
        .bind(id.as_str())
        .bind(&subject.0[..])
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    async fn destroy_tenant_key(
        &self,
        id: &TenantId,
        version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let primary = active_tenant_in(&mut tx, id).await?;
        if version == 0 || version > primary {
            return Err(StoreError::Corrupt(format!(
                "tenant {id} has no key version {version} to destroy (primary {primary})"
            )));
        }
        if version == primary {
            return Err(StoreError::Conflict);
        }
        let destroyed =
            sqlx::query("SELECT 1 FROM destroyed_versions WHERE tenant_id = ? AND version = ?")
                .bind(id.as_str())
                .bind(i64::from(version))
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
        if destroyed.is_some() {
            return Ok(false);
        }
        let wrapping = sqlx::query(
            "SELECT 1 FROM subject_keys WHERE tenant_id = ? AND tenant_version = ? LIMIT 1",
        )
        .bind(id.as_str())
        .bind(i64::from(version))
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        if wrapping.is_some() {
            return Err(StoreError::Conflict);
        }
        let deleted = sqlx::query("DELETE FROM tenant_keys WHERE tenant_id = ? AND version = ?")
            .bind(id.as_str())
            .bind(i64::from(version))
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        if deleted != 1 {
            return Err(StoreError::Corrupt(format!(
                "tenant {id}'s key version {version} is neither live nor destroyed"
            )));
        }
        sqlx::query(
            "INSERT INTO destroyed_versions (tenant_id, version, destroyed_at_ms) VALUES (?, ?, ?)",
        )
        .bind(id.as_str())
        .bind(i64::from(version))
        .bind(at.0)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        self.checkpoint("after a key's destruction").await;
        Ok(true)
    }
}

async fn insert_tenant_key(
    tx: &mut Transaction<'static, Sqlite>,
    id: &TenantId,
    key: &TenantKeyRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tenant_keys (tenant_id, version, wrapped, root_key_id, created_at_ms) \
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(id.as_str())
    .bind(i64::from(key.version))
    .bind(&key.wrapped.ciphertext)
    .bind(&key.wrapped.root_key_id)
    .bind(key.created_at.0)
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    Ok(())
}

async fn delete_where_tenant(
    tx: &mut Transaction<'static, Sqlite>,
    table: &'static str,
    id: &TenantId,
) -> Result<u64, StoreError> {
    Ok(
        sqlx::query(&format!("DELETE FROM {table} WHERE tenant_id = ?"))
            .bind(id.as_str())
            .execute(&mut **tx)
            .await
            .map_err(classify)?
            .rows_affected(),
    )
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
    use crate::store::{Placement, TenantPolicy};

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
