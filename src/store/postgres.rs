//! The shared keystore: PostgreSQL, for the many sidecars of a deployment.
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
//! `pg_notify` inside the same transaction (see [`crate::events`]).
//!
//! Migrations are applied at start, or only checked (`migrate: false`), for
//! deployments where a separate job with more privileges migrates.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{
    PgPool, Postgres, Row, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{
    INVARIANTS, Keystore, NewTenant, RootWrapped, RootWrappedSlot, StoreError, SubjectKeyRecord,
    SubjectLookup, SubjectShred, TenantKeyRecord, TenantPolicy, TenantRecord, TenantShred,
    TenantState, TenantWithPrimary, UnixMillis,
    rows::{
        self, SUBJECT_KEY_COLUMNS, TENANT_COLUMNS, TENANT_KEY_COLUMNS, TENANT_STATE_COLUMNS,
        TENANT_WITH_PRIMARY_FROM, corrupt, destroyed_version_from_row, subject_key_from_row,
        tenant_from_row, tenant_key_from_row, tenant_state_from_row, tenant_with_primary_from_row,
    },
};
use crate::{
    events::{CHANNEL, Event},
    ids::{SubjectKeyId, TenantId},
    kms::WrappedKey,
};

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

pub struct PostgresKeystore {
    pool: PgPool,
}

impl PostgresKeystore {
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
        Ok(Self { pool })
    }

    /// The connection pool, shared with the PostgreSQL audit sink.
    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    async fn write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(classify)
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

/// Locks the tenant's row for the rest of the transaction and reads its state.
async fn lock_tenant(
    tx: &mut Transaction<'static, Postgres>,
    id: &TenantId,
) -> Result<Option<TenantState>, StoreError> {
    sqlx::query(&format!(
        "SELECT {TENANT_STATE_COLUMNS} FROM tenants WHERE tenant_id = $1 FOR UPDATE"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut **tx)
    .await
    .map_err(classify)?
    .map(|row| tenant_state_from_row(&row))
    .transpose()
}

/// Locks the tenant's row; it must exist and be active. Answers its primary
/// version.
async fn lock_active_tenant(
    tx: &mut Transaction<'static, Postgres>,
    id: &TenantId,
) -> Result<u32, StoreError> {
    match lock_tenant(tx, id).await? {
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
    tx: &mut Transaction<'static, Postgres>,
    id: &TenantId,
) -> Result<(), StoreError> {
    let json: String = sqlx::query_scalar("SELECT policy FROM tenants WHERE tenant_id = $1")
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
        "SELECT COUNT(*) FROM (SELECT 1 FROM subject_keys WHERE tenant_id = $1 LIMIT $2) AS s",
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
    tx: &mut Transaction<'static, Postgres>,
    id: &TenantId,
    version: u32,
) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("SELECT 1 FROM tenant_keys WHERE tenant_id = $1 AND version = $2")
            .bind(id.as_str())
            .bind(i64::from(version))
            .fetch_optional(&mut **tx)
            .await
            .map_err(classify)?
            .is_some(),
    )
}

async fn notify(tx: &mut Transaction<'static, Postgres>, event: &Event) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(event.encode())
        .execute(&mut **tx)
        .await
        .map_err(classify)?;
    Ok(())
}

async fn subject_in(
    executor: &mut sqlx::PgConnection,
    id: &TenantId,
    subject: SubjectKeyId,
) -> Result<SubjectLookup, StoreError> {
    if let Some(row) = sqlx::query(
        "SELECT shredded_at_ms FROM subject_tombstones WHERE tenant_id = $1 AND subject_key_id = $2",
    )
    .bind(id.as_str())
    .bind(&subject.0[..])
    .fetch_optional(&mut *executor)
    .await
    .map_err(classify)?
    {
        let at = UnixMillis(row.try_get("shredded_at_ms").map_err(corrupt)?);
        return Ok(SubjectLookup::Shredded { at });
    }
    let row = sqlx::query(
        "SELECT wrapped, tenant_version FROM subject_keys WHERE tenant_id = $1 AND subject_key_id = $2",
    )
    .bind(id.as_str())
    .bind(&subject.0[..])
    .fetch_optional(&mut *executor)
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

async fn insert_tenant_key(
    tx: &mut Transaction<'static, Postgres>,
    id: &TenantId,
    key: &TenantKeyRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tenant_keys (tenant_id, version, wrapped, root_key_id, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5)",
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
    tx: &mut Transaction<'static, Postgres>,
    table: &'static str,
    id: &TenantId,
) -> Result<u64, StoreError> {
    Ok(
        sqlx::query(&format!("DELETE FROM {table} WHERE tenant_id = $1"))
            .bind(id.as_str())
            .execute(&mut **tx)
            .await
            .map_err(classify)?
            .rows_affected(),
    )
}

#[async_trait]
impl Keystore for PostgresKeystore {
    async fn create_tenant(&self, tenant: NewTenant) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let inserted = sqlx::query(
            "INSERT INTO tenants (tenant_id, created_at_ms, primary_version, index_key_wrapped, \
             index_key_root, tier, region, root_key, policy) \
             VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant_id) DO NOTHING",
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
        .map_err(classify)?
        .rows_affected();
        if inserted == 0 {
            return match lock_tenant(&mut tx, &tenant.id).await? {
                Some(TenantState::Shredded { at, .. }) => Err(StoreError::TenantShredded {
                    tenant: tenant.id,
                    at,
                }),
                _ => Err(StoreError::TenantExists(tenant.id)),
            };
        }
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
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = $1"
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
        sqlx::query(&format!(
            "SELECT {TENANT_WITH_PRIMARY_FROM} WHERE t.tenant_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .map(|row| tenant_with_primary_from_row(&row))
        .transpose()
    }

    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        sqlx::query(&format!(
            // tenant_id is COLLATE "C": bytewise order, as SQLite's.
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2"
        ))
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
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE tenant_id = $1 AND version = $2"
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
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE tenant_id = $1 ORDER BY version"
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
        lock_active_tenant(&mut tx, id).await?;
        let updated = sqlx::query(
            "UPDATE tenants SET primary_version = $1 \
             WHERE tenant_id = $2 AND primary_version = $3 AND shredded_at_ms IS NULL",
        )
        .bind(i64::from(key.version))
        .bind(id.as_str())
        .bind(i64::from(expected_primary))
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if updated == 0 {
            return Err(StoreError::Conflict);
        }
        insert_tenant_key(&mut tx, id, &key).await?;
        notify(&mut tx, &Event::Tenant(id.clone())).await?;
        tx.commit().await.map_err(classify)
    }

    async fn subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
    ) -> Result<SubjectLookup, StoreError> {
        // One snapshot for the two lookups.
        let mut tx = self.pool.begin().await.map_err(classify)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
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
        lock_active_tenant(&mut tx, id).await?;
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
                 created_at_ms) VALUES ($1, $2, $3, $4, $5)",
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
        match lock_tenant(&mut tx, id).await? {
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
            "UPDATE tenants SET shredded_at_ms = $1, primary_version = 0, \
             index_key_wrapped = NULL, index_key_root = NULL WHERE tenant_id = $2",
        )
        .bind(at.0)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        notify(&mut tx, &Event::Tenant(id.clone())).await?;
        tx.commit().await.map_err(classify)?;
        Ok(TenantShred {
            at,
            already_shredded: false,
            destroyed_key_versions: u32::try_from(versions).unwrap_or(u32::MAX),
            destroyed_subject_keys: subjects,
        })
    }

    async fn shred_subject(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
        at: UnixMillis,
    ) -> Result<SubjectShred, StoreError> {
        let mut tx = self.write().await?;
        lock_active_tenant(&mut tx, id).await?;
        if let SubjectLookup::Shredded { at: first } = subject_in(&mut tx, id, subject).await? {
            return Ok(SubjectShred {
                at: first,
                already_shredded: true,
                key_destroyed: false,
            });
        }
        let deleted =
            sqlx::query("DELETE FROM subject_keys WHERE tenant_id = $1 AND subject_key_id = $2")
                .bind(id.as_str())
                .bind(&subject.0[..])
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
        sqlx::query(
            "INSERT INTO subject_tombstones (tenant_id, subject_key_id, shredded_at_ms) VALUES ($1, $2, $3)",
        )
        .bind(id.as_str())
        .bind(&subject.0[..])
        .bind(at.0)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        notify(&mut tx, &Event::Subject(id.clone(), subject)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(SubjectShred {
            at,
            already_shredded: false,
            key_destroyed: deleted > 0,
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
               WHERE tenant_id > $1 AND shredded_at_ms IS NULL AND tier = 'shared' \
                 AND region IS NOT DISTINCT FROM $2 \
               ORDER BY tenant_id LIMIT $3) \
             SELECT tenant_id, 0::BIGINT AS slot, index_key_wrapped AS wrapped, index_key_root AS root FROM page \
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
            "SELECT count(*) AS total, count(*) FILTER (WHERE root = $1) AS done FROM ( \
               SELECT index_key_root AS root FROM tenants \
                 WHERE shredded_at_ms IS NULL AND tier = 'shared' AND region IS NOT DISTINCT FROM $2 \
               UNION ALL \
               SELECT k.root_key_id FROM tenant_keys k JOIN tenants t ON t.tenant_id = k.tenant_id \
                 WHERE t.shredded_at_ms IS NULL AND t.tier = 'shared' \
                 AND t.region IS NOT DISTINCT FROM $2 ) keys",
        )
        .bind(root_key_id)
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
                    "UPDATE tenants SET index_key_wrapped = $1, index_key_root = $2 \
                     WHERE tenant_id = $3 AND index_key_wrapped = $4 AND index_key_root = $5",
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
                    "UPDATE tenant_keys SET wrapped = $1, root_key_id = $2 \
                     WHERE tenant_id = $3 AND version = $4 AND wrapped = $5 AND root_key_id = $6",
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
        Ok(executed.map_err(classify)?.rows_affected() == 1)
    }

    async fn invariant_violations(&self) -> Result<Vec<String>, StoreError> {
        let mut violations = Vec::new();
        for (rule, sql) in INVARIANTS {
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
            "UPDATE tenants SET root_key_deletion_at_ms = $1 WHERE tenant_id = $2 AND shredded_at_ms IS NOT NULL",
        )
        .bind(at.0)
        .bind(id.as_str())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn set_policy(&self, id: &TenantId, policy: &TenantPolicy) -> Result<(), StoreError> {
        let json = policy.to_json()?;
        let mut tx = self.write().await?;
        lock_active_tenant(&mut tx, id).await?;
        sqlx::query("UPDATE tenants SET policy = $1 WHERE tenant_id = $2")
            .bind(json)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        notify(&mut tx, &Event::Tenant(id.clone())).await?;
        tx.commit().await.map_err(classify)
    }

    async fn destroyed_versions(
        &self,
        id: &TenantId,
    ) -> Result<Vec<(u32, UnixMillis)>, StoreError> {
        sqlx::query(
            "SELECT version, destroyed_at_ms FROM destroyed_versions WHERE tenant_id = $1 \
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
             WHERE tenant_id = $1 AND tenant_version = $2 ORDER BY subject_key_id LIMIT $3"
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
             WHERE (tenant_id, subject_key_id) > ($1, $2) AND get_byte(wrapped, 1) = 1 \
             ORDER BY tenant_id, subject_key_id LIMIT $3"
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
        // The tenant's lock serializes this with destroy_tenant_key: the
        // version checked live below stays live until the commit.
        if lock_tenant(&mut tx, id)
            .await?
            .is_none_or(|state| matches!(state, TenantState::Shredded { .. }))
        {
            return Ok(false);
        }
        // A shredded subject has no key row: the swap finds nothing.
        let current = sqlx::query(
            "SELECT 1 FROM subject_keys \
             WHERE tenant_id = $1 AND subject_key_id = $2 AND tenant_version = $3",
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
            "UPDATE subject_keys SET wrapped = $1, tenant_version = $2 \
             WHERE tenant_id = $3 AND subject_key_id = $4",
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
        let primary = lock_active_tenant(&mut tx, id).await?;
        if version == 0 || version > primary {
            return Err(StoreError::Corrupt(format!(
                "tenant {id} has no key version {version} to destroy (primary {primary})"
            )));
        }
        if version == primary {
            return Err(StoreError::Conflict);
        }
        let destroyed =
            sqlx::query("SELECT 1 FROM destroyed_versions WHERE tenant_id = $1 AND version = $2")
                .bind(id.as_str())
                .bind(i64::from(version))
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
        if destroyed.is_some() {
            return Ok(false);
        }
        // Every writer of the tenant's subject keys holds its lock: none is
        // added or moved to this version until the commit.
        let wrapping = sqlx::query(
            "SELECT 1 FROM subject_keys WHERE tenant_id = $1 AND tenant_version = $2 LIMIT 1",
        )
        .bind(id.as_str())
        .bind(i64::from(version))
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        if wrapping.is_some() {
            return Err(StoreError::Conflict);
        }
        let deleted = sqlx::query("DELETE FROM tenant_keys WHERE tenant_id = $1 AND version = $2")
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
            "INSERT INTO destroyed_versions (tenant_id, version, destroyed_at_ms) \
             VALUES ($1, $2, $3)",
        )
        .bind(id.as_str())
        .bind(i64::from(version))
        .bind(at.0)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        notify(&mut tx, &Event::Tenant(id.clone())).await?;
        tx.commit().await.map_err(classify)?;
        Ok(true)
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
