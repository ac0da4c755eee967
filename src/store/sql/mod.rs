//! The SQL keystore, written once for SQLite and PostgreSQL.
//!
//! Every [`Keystore`](super::Keystore) method is one script here
//! ([`scripts`]), over one schema and one SQL text: the two databases take
//! the same statements (`$1`-style parameters included), but for one byte
//! test. A [`Backend`] supplies exactly what differs between them:
//!
//! - how a write transaction starts and holds the tenant: PostgreSQL locks
//!   the tenant's row (`SELECT ... FOR UPDATE`, [`Backend::LOCK_TENANT`]);
//!   SQLite's write transactions take the database's write lock at once
//!   (`BEGIN IMMEDIATE`). Either way, every change of more than one row runs
//!   in one transaction that first reads (and so holds) the tenant, so
//!   rotations, shreds, policy changes, version destructions and subject-key
//!   creation and rewraps of one tenant are serialized;
//! - what a change does besides committing: PostgreSQL publishes an event
//!   inside the transaction ([`Backend::announce`], NOTIFY), SQLite
//!   checkpoints its WAL after a commit that destroyed key material
//!   ([`Backend::destroyed`]);
//! - running a statement, and sorting its errors into unavailable and
//!   corrupt ([`super::StoreError`]);
//! - the test of a subject key's suite byte in the legacy listing
//!   ([`Backend::LEGACY_WRAP`]): each database's own byte function, which
//!   differ on a corrupt, too short wrap.
//!
//! Opening, pragmas, connecting, migrations, listening for events and the
//! SQLite data plane's synchronous reads stay in the backends' own modules.

mod invariants;
pub mod rows;
mod scripts;

use async_trait::async_trait;
use sqlx::{Database, Encode, Executor, IntoArguments, Pool, Transaction, Type};

pub use invariants::INVARIANTS;
use rows::{KeystoreRow, TENANT_STATE_COLUMNS, tenant_state_from_row};

use super::{
    Event, StoreError, SubjectKeyRecord, SubjectLookup, TenantKeyRecord, TenantPolicy, TenantState,
    TenantWithPrimary, UnixMillis,
};
use crate::ids::{SubjectKeyId, TenantId};

/// One value bound to a statement's parameter. No `Debug`: its bytes are
/// wrapped keys, which never reach a log or a Debug string.
#[derive(Clone, Copy)]
pub enum Arg<'a> {
    Text(&'a str),
    MaybeText(Option<&'a str>),
    Int(i64),
    Bytes(&'a [u8]),
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(text: &'a str) -> Self {
        Arg::Text(text)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(text: &'a String) -> Self {
        Arg::Text(text)
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(text: Option<&'a str>) -> Self {
        Arg::MaybeText(text)
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(text: &'a Option<String>) -> Self {
        Arg::MaybeText(text.as_deref())
    }
}

impl<'a> From<&'a TenantId> for Arg<'a> {
    fn from(id: &'a TenantId) -> Self {
        Arg::Text(id.as_str())
    }
}

impl<'a> From<&'a SubjectKeyId> for Arg<'a> {
    fn from(id: &'a SubjectKeyId) -> Self {
        Arg::Bytes(&id.0)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Arg::Bytes(bytes)
    }
}

impl<'a> From<&'a Vec<u8>> for Arg<'a> {
    fn from(bytes: &'a Vec<u8>) -> Self {
        Arg::Bytes(bytes)
    }
}

impl From<i64> for Arg<'_> {
    fn from(int: i64) -> Self {
        Arg::Int(int)
    }
}

impl From<u32> for Arg<'_> {
    fn from(int: u32) -> Self {
        Arg::Int(int.into())
    }
}

impl From<UnixMillis> for Arg<'_> {
    fn from(at: UnixMillis) -> Self {
        Arg::Int(at.0)
    }
}

/// Where a statement runs: on the pool (a read, or a single-statement
/// write), or inside a transaction.
pub enum Via<'a, T> {
    Pool,
    Tx(&'a mut T),
}

/// What a SQL database supplies to the shared scripts (see the module docs).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs the statements: a [`SqlPool`].
    type Sql: Statements;

    /// Appended to the read of the tenant's state that opens every write
    /// transaction, to hold the tenant until the commit (`""` where the
    /// transaction holds the database already).
    const LOCK_TENANT: &'static str;

    /// The test that a subject key's wrap is in the legacy form: its second
    /// byte, the suite, is 0x01 (docs/FORMAT.md). Each database's own byte
    /// function: PostgreSQL's `get_byte` refuses a wrap shorter than two
    /// bytes (the listing fails as corrupt), SQLite's `substr` skips it.
    const LEGACY_WRAP: &'static str;

    fn sql(&self) -> &Self::Sql;

    /// Sorts a database error into "cannot reach or use the database now"
    /// (retryable) and "the database holds or answered something
    /// impossible".
    fn classify(e: sqlx::Error) -> StoreError;

    /// A write transaction.
    async fn begin_write(&self) -> Result<Tx<Self>, StoreError>;
    /// A read-only transaction: one snapshot for several reads.
    async fn begin_snapshot(&self) -> Result<Tx<Self>, StoreError>;

    /// Inside a changing transaction, before its commit: tells other
    /// sidecars what goes stale. Nothing by default.
    async fn announce(&self, _tx: &mut Tx<Self>, _event: Event) -> Result<(), StoreError> {
        Ok(())
    }

    /// After the commit of a transaction that destroyed key material.
    /// Nothing by default.
    async fn destroyed(&self) {}

    /// The data plane's read on a cache miss, by default the shared query
    /// ([`scripts::tenant_with_primary`]).
    async fn tenant_with_primary(
        &self,
        id: &TenantId,
    ) -> Result<Option<TenantWithPrimary>, StoreError> {
        scripts::tenant_with_primary(self, id).await
    }
}

/// A backend's transaction.
pub type Tx<B> = <<B as Backend>::Sql as Statements>::Tx;
/// A backend's row.
pub type BackendRow<B> = <<B as Backend>::Sql as Statements>::Row;

/// Running statements, with [`Arg`]s bound: what [`SqlPool`] does for every
/// sqlx database alike. Errors are sqlx's; the backend sorts them.
#[async_trait]
pub trait Statements: Send + Sync + 'static {
    type Row: KeystoreRow + Send + Sync;
    type Tx: Send;

    async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error>;

    /// Runs a statement; answers how many rows it changed.
    async fn execute(
        &self,
        via: Via<'_, Self::Tx>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<u64, sqlx::Error>;

    /// Runs a query; answers every row.
    async fn fetch_all(
        &self,
        via: Via<'_, Self::Tx>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<Self::Row>, sqlx::Error>;
}

/// The keystore over one [`Backend`].
pub struct SqlKeystore<B> {
    backend: B,
}

impl<B: Backend> SqlKeystore<B> {
    pub fn new(backend: B) -> Self {
        Self { backend }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    async fn execute(
        &self,
        via: Via<'_, Tx<B>>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<u64, StoreError> {
        let sql_pool = self.backend.sql();
        sql_pool.execute(via, sql, args).await.map_err(B::classify)
    }

    async fn fetch_all(
        &self,
        via: Via<'_, Tx<B>>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<BackendRow<B>>, StoreError> {
        let sql_pool = self.backend.sql();
        sql_pool
            .fetch_all(via, sql, args)
            .await
            .map_err(B::classify)
    }

    async fn fetch_optional(
        &self,
        via: Via<'_, Tx<B>>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<BackendRow<B>>, StoreError> {
        Ok(self.fetch_all(via, sql, args).await?.into_iter().next())
    }

    async fn commit(&self, tx: Tx<B>) -> Result<(), StoreError> {
        B::Sql::commit(tx).await.map_err(B::classify)
    }

    /// Commits a change that makes cached state stale, announcing it
    /// ([`Backend::announce`]) in the same transaction.
    async fn commit_change(&self, mut tx: Tx<B>, event: Event) -> Result<(), StoreError> {
        self.backend.announce(&mut tx, event).await?;
        self.commit(tx).await
    }

    /// Reads the tenant's state and holds the tenant for the rest of the
    /// transaction ([`Backend::LOCK_TENANT`]).
    async fn lock_tenant(
        &self,
        tx: &mut Tx<B>,
        id: &TenantId,
    ) -> Result<Option<TenantState>, StoreError> {
        let sql = format!(
            "SELECT {TENANT_STATE_COLUMNS} FROM tenants WHERE tenant_id = $1{}",
            B::LOCK_TENANT
        );
        self.fetch_optional(Via::Tx(tx), &sql, &[id.into()])
            .await?
            .map(|row| tenant_state_from_row(&row))
            .transpose()
    }

    /// Like [`Self::lock_tenant`], but the tenant must exist and be active;
    /// answers its primary version.
    async fn lock_active_tenant(&self, tx: &mut Tx<B>, id: &TenantId) -> Result<u32, StoreError> {
        match self.lock_tenant(tx, id).await? {
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

    /// Refuses a new subject key once the tenant holds `policy.max_subjects`
    /// of them (0: no quota), counting under the tenant's lock, so concurrent
    /// creations cannot pass the quota together. The policy is read here,
    /// not taken from a cache, and the count stops at the quota.
    async fn check_subject_quota(&self, tx: &mut Tx<B>, id: &TenantId) -> Result<(), StoreError> {
        let row = self
            .fetch_optional(
                Via::Tx(tx),
                "SELECT policy FROM tenants WHERE tenant_id = $1",
                &[id.into()],
            )
            .await?
            .ok_or_else(|| StoreError::TenantNotFound(id.clone()))?;
        let max = TenantPolicy::from_json(&row.text("policy")?)?.max_subjects;
        if max == 0 {
            return Ok(());
        }
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let held = self
            .fetch_optional(
                Via::Tx(tx),
                "SELECT COUNT(*) AS held FROM \
                 (SELECT 1 FROM subject_keys WHERE tenant_id = $1 LIMIT $2) AS s",
                &[id.into(), limit.into()],
            )
            .await?
            .map_or(Ok(0), |row| row.int("held"))?;
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
        &self,
        tx: &mut Tx<B>,
        id: &TenantId,
        version: u32,
    ) -> Result<bool, StoreError> {
        Ok(self
            .fetch_optional(
                Via::Tx(tx),
                "SELECT 1 AS live FROM tenant_keys WHERE tenant_id = $1 AND version = $2",
                &[id.into(), version.into()],
            )
            .await?
            .is_some())
    }

    /// The subject's tombstone, key, or nothing.
    async fn subject_in(
        &self,
        tx: &mut Tx<B>,
        id: &TenantId,
        subject: &SubjectKeyId,
    ) -> Result<SubjectLookup, StoreError> {
        if let Some(row) = self
            .fetch_optional(
                Via::Tx(tx),
                "SELECT shredded_at_ms FROM subject_tombstones \
                 WHERE tenant_id = $1 AND subject_key_id = $2",
                &[id.into(), subject.into()],
            )
            .await?
        {
            let at = UnixMillis(row.int("shredded_at_ms")?);
            return Ok(SubjectLookup::Shredded { at });
        }
        let row = self
            .fetch_optional(
                Via::Tx(tx),
                "SELECT wrapped, tenant_version FROM subject_keys \
                 WHERE tenant_id = $1 AND subject_key_id = $2",
                &[id.into(), subject.into()],
            )
            .await?;
        match row {
            None => Ok(SubjectLookup::Absent),
            Some(row) => Ok(SubjectLookup::Key(SubjectKeyRecord {
                wrapped: row.bytes("wrapped")?,
                tenant_version: rows::version(row.int("tenant_version")?)?,
            })),
        }
    }

    /// The newest blind-index key version of the tenant (0: none yet).
    async fn newest_blind_index_version(
        &self,
        tx: &mut Tx<B>,
        id: &TenantId,
    ) -> Result<u32, StoreError> {
        let row = self
            .fetch_optional(
                Via::Tx(tx),
                "SELECT coalesce(max(version), 0) AS newest FROM blind_index_keys \
                 WHERE tenant_id = $1",
                &[id.into()],
            )
            .await?;
        row.map_or(Ok(0), |row| rows::version(row.int("newest")?))
    }

    async fn insert_tenant_key(
        &self,
        tx: &mut Tx<B>,
        id: &TenantId,
        key: &TenantKeyRecord,
    ) -> Result<(), StoreError> {
        self.execute(
            Via::Tx(tx),
            "INSERT INTO tenant_keys (tenant_id, version, wrapped, root_key_id, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
            &[
                id.into(),
                key.version.into(),
                (&key.wrapped.ciphertext).into(),
                (&key.wrapped.root_key_id).into(),
                key.created_at.into(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn delete_where_tenant(
        &self,
        tx: &mut Tx<B>,
        table: &'static str,
        id: &TenantId,
    ) -> Result<u64, StoreError> {
        self.execute(
            Via::Tx(tx),
            &format!("DELETE FROM {table} WHERE tenant_id = $1"),
            &[id.into()],
        )
        .await
    }
}

/// The pool and transactions of one sqlx database: [`Statements`] written
/// once for both databases.
pub struct SqlPool<DB: Database> {
    pub pool: Pool<DB>,
}

/// A query with its arguments bound.
fn bound<'q, DB>(sql: &'q str, args: &[Arg<'q>]) -> sqlx::query::Query<'q, DB, DB::Arguments<'q>>
where
    DB: Database,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a str>: Encode<'a, DB> + Type<DB>,
    for<'a> &'a [u8]: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    args.iter().fold(sqlx::query(sql), |query, arg| match *arg {
        Arg::Text(text) => query.bind(text),
        Arg::MaybeText(text) => query.bind(text),
        Arg::Int(int) => query.bind(int),
        Arg::Bytes(bytes) => query.bind(bytes),
    })
}

#[async_trait]
impl<DB> Statements for SqlPool<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    DB::QueryResult: RowsAffected,
    DB::Row: KeystoreRow + Send + Sync,
{
    type Row = DB::Row;
    type Tx = Transaction<'static, DB>;

    async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.commit().await
    }

    async fn execute(
        &self,
        via: Via<'_, Self::Tx>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<u64, sqlx::Error> {
        let query = bound(sql, args);
        let done = match via {
            Via::Pool => query.execute(&self.pool).await?,
            Via::Tx(tx) => query.execute(&mut **tx).await?,
        };
        Ok(done.rows_affected())
    }

    async fn fetch_all(
        &self,
        via: Via<'_, Self::Tx>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<DB::Row>, sqlx::Error> {
        let query = bound(sql, args);
        match via {
            Via::Pool => query.fetch_all(&self.pool).await,
            Via::Tx(tx) => query.fetch_all(&mut **tx).await,
        }
    }
}

/// How many rows a statement changed: each sqlx database answers it with a
/// method of its own.
pub trait RowsAffected {
    fn rows_affected(&self) -> u64;
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows_affected(&self) -> u64 {
        sqlx::sqlite::SqliteQueryResult::rows_affected(self)
    }
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows_affected(&self) -> u64 {
        sqlx::postgres::PgQueryResult::rows_affected(self)
    }
}
