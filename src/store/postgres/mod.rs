//! The shared keystore: PostgreSQL, for the many sidecars of a deployment.
//!
//! The transaction scripts are the shared ones of [`super::sql`]; this module
//! supplies what is PostgreSQL's own.
//!
//! Concurrency. Every change of more than one row runs in one transaction that
//! first locks the tenant's row (`SELECT ... FOR UPDATE`): rotations, shreds,
//! policy changes, version destructions and subject-key creation and rewraps
//! of one tenant are serialized across sidecars, so two rotations make two
//! consecutive versions, a shred racing a new subject key never leaves that
//! key behind, and no subject key is made or moved under a version being
//! destroyed. Rotation is also a conditional update (`WHERE primary_version =
//! expected`).
//!
//! Events. Changes that make other sidecars' caches stale are published with
//! `pg_notify` inside the same transaction ([`events`]), and every sidecar
//! listens ([`events::listen`]).
//!
//! Migrations are applied at start, or only checked (`migrate: false`), for
//! deployments where a separate job with more privileges migrates.

use std::time::Duration;

pub mod events;

use async_trait::async_trait;
use sqlx::{
    PgPool, Postgres, Row,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{
    Event, StoreError,
    sql::{Backend, SqlKeystore, SqlPool, Tx, rows::corrupt},
};
use events::{CHANNEL, TIMING_CHANNEL};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Connections per sidecar.
    pub max_connections: u32,
    /// Apply pending migrations (true), or only check that none is pending.
    pub migrate: bool,
    /// Longest wait for a connection from the pool.
    pub acquire_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            migrate: true,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// The PostgreSQL keystore: the shared SQL keystore over [`PostgresBackend`].
pub type PostgresKeystore = SqlKeystore<PostgresBackend>;

/// What PostgreSQL supplies to the shared keystore.
pub struct PostgresBackend {
    sql: SqlPool<Postgres>,
}

impl SqlKeystore<PostgresBackend> {
    /// Connects to `url` and applies (or checks) the migrations.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let connect: PgConnectOptions = url
            .parse()
            .map_err(|_| StoreError::Corrupt("the keystore URL is not a PostgreSQL URL".into()))?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(classify)?;
        if options.migrate {
            MIGRATIONS
                .run(&pool)
                .await
                .map_err(|e| StoreError::Corrupt(format!("migrations failed: {e}")))?;
        } else {
            check_migrations(&pool).await?;
        }
        Ok(Self::new(PostgresBackend {
            sql: SqlPool { pool },
        }))
    }

    /// The connection pool, shared with the PostgreSQL audit sink.
    pub fn pool(&self) -> PgPool {
        self.backend().sql.pool.clone()
    }
}

/// Fails unless every embedded migration has been applied.
async fn check_migrations(pool: &PgPool) -> Result<(), StoreError> {
    let applied: Vec<i64> = sqlx::query(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| {
        StoreError::Corrupt(format!(
            "the keystore schema is not migrated ({e}); run a sidecar with migrations applied first"
        ))
    })?
    .iter()
    .map(|row| row.try_get::<i64, _>(0))
    .collect::<Result<_, _>>()
    .map_err(corrupt)?;
    let missing: Vec<i64> = MIGRATIONS
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "the keystore schema lacks migrations {missing:?}; apply them (store.migrate = true) first"
        )))
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    type Sql = SqlPool<Postgres>;

    const LOCK_TENANT: &'static str = " FOR UPDATE";

    const LEGACY_WRAP: &'static str = "get_byte(wrapped, 1) = 1";

    fn sql(&self) -> &Self::Sql {
        &self.sql
    }

    fn classify(e: sqlx::Error) -> StoreError {
        classify(e)
    }

    async fn begin_write(&self) -> Result<Tx<Self>, StoreError> {
        self.sql.pool.begin().await.map_err(classify)
    }

    async fn begin_snapshot(&self) -> Result<Tx<Self>, StoreError> {
        let mut tx = self.sql.pool.begin().await.map_err(classify)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        Ok(tx)
    }

    /// NOTIFY inside the transaction: sent if and only if the change commits.
    async fn announce(&self, tx: &mut Tx<Self>, event: Event) -> Result<(), StoreError> {
        // The event, in the form every sidecar version reads, then its
        // time on a channel of its own (events::TIMING_CHANNEL).
        sqlx::query("SELECT pg_notify($1, $2), pg_notify($3, $4)")
            .bind(CHANNEL)
            .bind(event.encode())
            .bind(TIMING_CHANNEL)
            .bind(event.encode_at(crate::time::UnixMillis::now()))
            .execute(&mut **tx)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

/// Sorts a database error into "cannot reach or use the database now"
/// (retryable) and "the database holds or answered something impossible".
fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        // SQLSTATE classes 08 (connection), 53 (resources), 57 (operator
        // intervention: shutdown, cannot connect now), 40 (serialization,
        // deadlock: retry) and 25006 (read-only: a failover in progress).
        sqlx::Error::Database(db)
            if db.code().is_some_and(|code| {
                ["08", "53", "57", "40"]
                    .iter()
                    .any(|class| code.starts_with(class))
                    || code == "25006"
            }) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => corrupt(e),
    }
}
