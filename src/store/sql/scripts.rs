//! The keystore's transaction scripts, one per [`Keystore`] method, for
//! every [`Backend`] alike.

use async_trait::async_trait;

use super::{
    Arg, Backend, INVARIANTS, SqlKeystore, Statements, Via,
    rows::{
        self, KeystoreRow, SUBJECT_KEY_COLUMNS, TENANT_COLUMNS, TENANT_KEY_COLUMNS,
        TENANT_WITH_PRIMARY_FROM, destroyed_version_from_row, root_wrapped_from_row,
        subject_key_from_row, tenant_from_row, tenant_key_from_row, tenant_with_primary_from_row,
    },
};
use crate::{
    ids::{SubjectKeyId, TenantId},
    kms::WrappedKey,
    store::{
        BlindIndexKeyRecord, BlindIndexKeyState, Event, Keystore, NewTenant, RootWrapped,
        RootWrappedSlot, StoreError, SubjectKeyRecord, SubjectLookup, SubjectShred,
        TenantKeyRecord, TenantPolicy, TenantRecord, TenantShred, TenantState, TenantWithPrimary,
        UnixMillis,
    },
};

/// The tenant with its primary key version, through the shared query: the
/// default of [`Backend::tenant_with_primary`].
pub async fn tenant_with_primary<B: Backend + ?Sized>(
    backend: &B,
    id: &TenantId,
) -> Result<Option<TenantWithPrimary>, StoreError> {
    let sql = format!("SELECT {TENANT_WITH_PRIMARY_FROM} WHERE t.tenant_id = $1");
    backend
        .sql()
        .fetch_all(Via::Pool, &sql, &[id.into()])
        .await
        .map_err(B::classify)?
        .first()
        .map(tenant_with_primary_from_row)
        .transpose()
}

/// A count column as a `u64`.
fn count(row: &impl KeystoreRow, column: &str) -> Result<u64, StoreError> {
    u64::try_from(row.int(column)?).map_err(|_| StoreError::Corrupt("negative count".into()))
}

#[async_trait]
impl<B: Backend> Keystore for SqlKeystore<B> {
    async fn ping(&self) -> Result<(), StoreError> {
        self.fetch_all(Via::Pool, "SELECT 1 AS one", &[]).await?;
        Ok(())
    }

    async fn create_tenant(&self, tenant: NewTenant) -> Result<(), StoreError> {
        let mut tx = self.backend.begin_write().await?;
        let inserted = self.execute(
                Via::Tx(&mut tx),
                "INSERT INTO tenants (tenant_id, created_at_ms, primary_version, index_key_wrapped, \
                 index_key_root, tier, region, root_key, policy) \
                 VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant_id) DO NOTHING",
                &[
                    (&tenant.id).into(),
                    tenant.created_at.into(),
                    (&tenant.index_key.ciphertext).into(),
                    (&tenant.index_key.root_key_id).into(),
                    tenant.placement.tier.as_str().into(),
                    (&tenant.placement.region).into(),
                    (&tenant.placement.root_key).into(),
                    (&tenant.policy.to_json()?).into(),
                ],
            )
            .await?;
        if inserted == 0 {
            return match self.lock_tenant(&mut tx, &tenant.id).await? {
                Some(TenantState::Shredded { at, .. }) => Err(StoreError::TenantShredded {
                    tenant: tenant.id,
                    at,
                }),
                _ => Err(StoreError::TenantExists(tenant.id)),
            };
        }
        self.insert_tenant_key(
            &mut tx,
            &tenant.id,
            &TenantKeyRecord {
                version: 1,
                wrapped: tenant.first_key,
                created_at: tenant.created_at,
            },
        )
        .await?;
        self.commit(tx).await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = $1");
        self.fetch_optional(Via::Pool, &sql, &[id.into()])
            .await?
            .map(|row| tenant_from_row(&row))
            .transpose()
    }

    async fn tenant_with_primary(
        &self,
        id: &TenantId,
    ) -> Result<Option<TenantWithPrimary>, StoreError> {
        self.backend.tenant_with_primary(id).await
    }

    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        // PostgreSQL's tenant_id is COLLATE "C": bytewise order, as SQLite's.
        let sql = format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2"
        );
        let after = after.map_or("", TenantId::as_str);
        self.fetch_all(Via::Pool, &sql, &[after.into(), limit.into()])
            .await?
            .iter()
            .map(tenant_from_row)
            .collect()
    }

    async fn tenant_key(
        &self,
        id: &TenantId,
        version: u32,
    ) -> Result<Option<TenantKeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE tenant_id = $1 AND version = $2"
        );
        self.fetch_optional(Via::Pool, &sql, &[id.into(), version.into()])
            .await?
            .map(|row| tenant_key_from_row(&row))
            .transpose()
    }

    async fn tenant_keys(&self, id: &TenantId) -> Result<Vec<TenantKeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {TENANT_KEY_COLUMNS} FROM tenant_keys WHERE tenant_id = $1 ORDER BY version"
        );
        self.fetch_all(Via::Pool, &sql, &[id.into()])
            .await?
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
        let mut tx = self.backend.begin_write().await?;
        self.lock_active_tenant(&mut tx, id).await?;
        let updated = self
            .execute(
                Via::Tx(&mut tx),
                "UPDATE tenants SET primary_version = $1 \
                 WHERE tenant_id = $2 AND primary_version = $3 AND shredded_at_ms IS NULL",
                &[key.version.into(), id.into(), expected_primary.into()],
            )
            .await?;
        if updated == 0 {
            return Err(StoreError::Conflict);
        }
        self.insert_tenant_key(&mut tx, id, &key).await?;
        self.commit_change(tx, Event::Tenant(id.clone())).await
    }

    async fn subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
    ) -> Result<SubjectLookup, StoreError> {
        // One snapshot for the two lookups.
        let mut tx = self.backend.begin_snapshot().await?;
        let lookup = self.subject_in(&mut tx, id, &subject).await?;
        self.commit(tx).await?;
        Ok(lookup)
    }

    async fn insert_subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
        key: SubjectKeyRecord,
        created_at: UnixMillis,
    ) -> Result<SubjectLookup, StoreError> {
        let mut tx = self.backend.begin_write().await?;
        self.lock_active_tenant(&mut tx, id).await?;
        if !self
            .version_is_live(&mut tx, id, key.tenant_version)
            .await?
        {
            return Err(StoreError::Corrupt(format!(
                "a subject key of tenant {id} names wrapping version {}, which does not exist",
                key.tenant_version
            )));
        }
        if let SubjectLookup::Absent = self.subject_in(&mut tx, id, &subject).await? {
            self.check_subject_quota(&mut tx, id).await?;
            self.execute(
                Via::Tx(&mut tx),
                "INSERT INTO subject_keys (tenant_id, subject_key_id, wrapped, tenant_version, \
                     created_at_ms) VALUES ($1, $2, $3, $4, $5)",
                &[
                    id.into(),
                    (&subject).into(),
                    (&key.wrapped).into(),
                    key.tenant_version.into(),
                    created_at.into(),
                ],
            )
            .await?;
        }
        let lookup = self.subject_in(&mut tx, id, &subject).await?;
        self.commit(tx).await?;
        Ok(lookup)
    }

    async fn shred_tenant(&self, id: &TenantId, at: UnixMillis) -> Result<TenantShred, StoreError> {
        let mut tx = self.backend.begin_write().await?;
        match self.lock_tenant(&mut tx, id).await? {
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
        let subjects = self
            .delete_where_tenant(&mut tx, "subject_keys", id)
            .await?;
        self.delete_where_tenant(&mut tx, "blind_index_keys", id)
            .await?;
        self.delete_where_tenant(&mut tx, "subject_tombstones", id)
            .await?;
        let versions = self.delete_where_tenant(&mut tx, "tenant_keys", id).await?;
        self.execute(
            Via::Tx(&mut tx),
            "UPDATE tenants SET shredded_at_ms = $1, primary_version = 0, \
                 index_key_wrapped = NULL, index_key_root = NULL WHERE tenant_id = $2",
            &[at.into(), id.into()],
        )
        .await?;
        self.commit_change(tx, Event::Tenant(id.clone())).await?;
        self.backend.destroyed().await;
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
        let mut tx = self.backend.begin_write().await?;
        self.lock_active_tenant(&mut tx, id).await?;
        if let SubjectLookup::Shredded { at: first } =
            self.subject_in(&mut tx, id, &subject).await?
        {
            return Ok(SubjectShred {
                at: first,
                already_shredded: true,
                key_destroyed: false,
            });
        }
        let deleted = self
            .execute(
                Via::Tx(&mut tx),
                "DELETE FROM subject_keys WHERE tenant_id = $1 AND subject_key_id = $2",
                &[id.into(), (&subject).into()],
            )
            .await?;
        self.execute(
            Via::Tx(&mut tx),
            "INSERT INTO subject_tombstones (tenant_id, subject_key_id, shredded_at_ms) \
                 VALUES ($1, $2, $3)",
            &[id.into(), (&subject).into(), at.into()],
        )
        .await?;
        self.commit_change(tx, Event::Subject(id.clone(), subject))
            .await?;
        self.backend.destroyed().await;
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
        let after = after.map_or("", TenantId::as_str);
        self.fetch_all(
            Via::Pool,
            "WITH page AS ( \
                   SELECT tenant_id, index_key_wrapped, index_key_root FROM tenants \
                   WHERE tenant_id > $1 AND shredded_at_ms IS NULL AND tier = 'shared' \
                     AND region IS NOT DISTINCT FROM $2 \
                   ORDER BY tenant_id LIMIT $3) \
                 SELECT tenant_id, CAST(0 AS BIGINT) AS slot, index_key_wrapped AS wrapped, \
                   index_key_root AS root FROM page \
                 UNION ALL \
                 SELECT k.tenant_id, k.version, k.wrapped, k.root_key_id \
                   FROM tenant_keys k JOIN page p ON p.tenant_id = k.tenant_id \
                 ORDER BY tenant_id, slot",
            &[after.into(), region.into(), limit.into()],
        )
        .await?
        .iter()
        .map(root_wrapped_from_row)
        .collect()
    }

    async fn count_shared_root_wrapped(
        &self,
        region: Option<&str>,
        root_key_id: &str,
    ) -> Result<(u64, u64), StoreError> {
        let row = self
            .fetch_optional(
                Via::Pool,
                "SELECT count(*) AS total, \
                   coalesce(sum(CASE WHEN root = $1 THEN 1 ELSE 0 END), 0) AS done FROM ( \
                   SELECT index_key_root AS root FROM tenants \
                     WHERE shredded_at_ms IS NULL AND tier = 'shared' \
                     AND region IS NOT DISTINCT FROM $2 \
                   UNION ALL \
                   SELECT k.root_key_id FROM tenant_keys k JOIN tenants t ON t.tenant_id = k.tenant_id \
                     WHERE t.shredded_at_ms IS NULL AND t.tier = 'shared' \
                     AND t.region IS NOT DISTINCT FROM $2 ) AS keys",
                &[root_key_id.into(), region.into()],
            )
            .await?
            .ok_or_else(|| StoreError::Corrupt("a count answered no row".into()))?;
        Ok((count(&row, "total")?, count(&row, "done")?))
    }

    async fn replace_root_wrapped(
        &self,
        tenant: &TenantId,
        slot: RootWrappedSlot,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> Result<bool, StoreError> {
        let (new_wrapped, new_root): (Arg, Arg) =
            ((&new.ciphertext).into(), (&new.root_key_id).into());
        let (old_wrapped, old_root): (Arg, Arg) =
            ((&old.ciphertext).into(), (&old.root_key_id).into());
        let updated = match slot {
            RootWrappedSlot::Index => {
                self.execute(
                    Via::Pool,
                    "UPDATE tenants SET index_key_wrapped = $1, index_key_root = $2 \
                         WHERE tenant_id = $3 AND index_key_wrapped = $4 AND index_key_root = $5",
                    &[new_wrapped, new_root, tenant.into(), old_wrapped, old_root],
                )
                .await?
            }
            RootWrappedSlot::Version(version) => {
                self.execute(
                    Via::Pool,
                    "UPDATE tenant_keys SET wrapped = $1, root_key_id = $2 WHERE tenant_id = $3 \
                         AND version = $4 AND wrapped = $5 AND root_key_id = $6",
                    &[
                        new_wrapped,
                        new_root,
                        tenant.into(),
                        version.into(),
                        old_wrapped,
                        old_root,
                    ],
                )
                .await?
            }
        };
        Ok(updated == 1)
    }

    async fn invariant_violations(&self) -> Result<Vec<String>, StoreError> {
        let mut violations = Vec::new();
        for (rule, sql) in INVARIANTS {
            for row in self.fetch_all(Via::Pool, sql, &[]).await? {
                let tenant = row.text("tenant_id")?;
                violations.push(format!("{rule}: tenant {tenant}"));
            }
        }
        Ok(violations)
    }

    async fn set_root_key_deletion(&self, id: &TenantId, at: UnixMillis) -> Result<(), StoreError> {
        self.execute(
            Via::Pool,
            "UPDATE tenants SET root_key_deletion_at_ms = $1 \
                 WHERE tenant_id = $2 AND shredded_at_ms IS NOT NULL",
            &[at.into(), id.into()],
        )
        .await?;
        Ok(())
    }

    async fn set_policy(&self, id: &TenantId, policy: &TenantPolicy) -> Result<(), StoreError> {
        let json = policy.to_json()?;
        let mut tx = self.backend.begin_write().await?;
        self.lock_active_tenant(&mut tx, id).await?;
        self.execute(
            Via::Tx(&mut tx),
            "UPDATE tenants SET policy = $1 WHERE tenant_id = $2",
            &[(&json).into(), id.into()],
        )
        .await?;
        self.commit_change(tx, Event::Tenant(id.clone())).await
    }

    async fn destroyed_versions(
        &self,
        id: &TenantId,
    ) -> Result<Vec<(u32, UnixMillis)>, StoreError> {
        self.fetch_all(
            Via::Pool,
            "SELECT version, destroyed_at_ms FROM destroyed_versions WHERE tenant_id = $1 \
                 ORDER BY version",
            &[id.into()],
        )
        .await?
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
        let sql = format!(
            "SELECT {SUBJECT_KEY_COLUMNS} FROM subject_keys \
             WHERE tenant_id = $1 AND tenant_version = $2 ORDER BY subject_key_id LIMIT $3"
        );
        self.fetch_all(Via::Pool, &sql, &[id.into(), version.into(), limit.into()])
            .await?
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
        let sql = format!(
            "SELECT tenant_id, {SUBJECT_KEY_COLUMNS} FROM subject_keys \
             WHERE (tenant_id, subject_key_id) > ($1, $2) AND {} \
             ORDER BY tenant_id, subject_key_id LIMIT $3",
            B::LEGACY_WRAP
        );
        self.fetch_all(
            Via::Pool,
            &sql,
            &[tenant.into(), subject.into(), limit.into()],
        )
        .await?
        .iter()
        .map(|row| {
            let (id, record) = subject_key_from_row(row)?;
            Ok((rows::tenant_id(&row.text("tenant_id")?)?, id, record))
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
        let mut tx = self.backend.begin_write().await?;
        // The tenant's lock serializes this with destroy_tenant_key: the
        // version checked live below stays live until the commit.
        if self
            .lock_tenant(&mut tx, id)
            .await?
            .is_none_or(|state| matches!(state, TenantState::Shredded { .. }))
        {
            return Ok(false);
        }
        // A shredded subject has no key row: the swap finds nothing.
        let current = self
            .fetch_optional(
                Via::Tx(&mut tx),
                "SELECT 1 AS present FROM subject_keys \
                 WHERE tenant_id = $1 AND subject_key_id = $2 AND tenant_version = $3",
                &[id.into(), subject.into(), expected_version.into()],
            )
            .await?;
        if current.is_none() {
            return Ok(false);
        }
        if !self
            .version_is_live(&mut tx, id, new.tenant_version)
            .await?
        {
            return Err(StoreError::Corrupt(format!(
                "a subject key of tenant {id} would be wrapped by version {}, which does not exist",
                new.tenant_version
            )));
        }
        self.execute(
            Via::Tx(&mut tx),
            "UPDATE subject_keys SET wrapped = $1, tenant_version = $2 \
                 WHERE tenant_id = $3 AND subject_key_id = $4",
            &[
                (&new.wrapped).into(),
                new.tenant_version.into(),
                id.into(),
                subject.into(),
            ],
        )
        .await?;
        self.commit(tx).await?;
        Ok(true)
    }

    async fn destroy_tenant_key(
        &self,
        id: &TenantId,
        version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut tx = self.backend.begin_write().await?;
        let primary = self.lock_active_tenant(&mut tx, id).await?;
        if version == 0 || version > primary {
            return Err(StoreError::Corrupt(format!(
                "tenant {id} has no key version {version} to destroy (primary {primary})"
            )));
        }
        if version == primary {
            return Err(StoreError::Conflict);
        }
        let this_version = [Arg::from(id), version.into()];
        let destroyed = self
            .fetch_optional(
                Via::Tx(&mut tx),
                "SELECT 1 AS destroyed FROM destroyed_versions WHERE tenant_id = $1 AND version = $2",
                &this_version,
            )
            .await?;
        if destroyed.is_some() {
            return Ok(false);
        }
        // Every writer of the tenant's subject keys and blind-index keys
        // holds its lock: none is added or moved to this version until the
        // commit.
        for table in ["subject_keys", "blind_index_keys"] {
            let wrapping = self
                .fetch_optional(
                    Via::Tx(&mut tx),
                    &format!(
                        "SELECT 1 AS wrapping FROM {table} \
                         WHERE tenant_id = $1 AND tenant_version = $2 LIMIT 1"
                    ),
                    &this_version,
                )
                .await?;
            if wrapping.is_some() {
                return Err(StoreError::Conflict);
            }
        }
        let deleted = self
            .execute(
                Via::Tx(&mut tx),
                "DELETE FROM tenant_keys WHERE tenant_id = $1 AND version = $2",
                &this_version,
            )
            .await?;
        if deleted != 1 {
            return Err(StoreError::Corrupt(format!(
                "tenant {id}'s key version {version} is neither live nor destroyed"
            )));
        }
        self.execute(
            Via::Tx(&mut tx),
            "INSERT INTO destroyed_versions (tenant_id, version, destroyed_at_ms) \
                 VALUES ($1, $2, $3)",
            &[id.into(), version.into(), at.into()],
        )
        .await?;
        self.commit_change(tx, Event::Tenant(id.clone())).await?;
        self.backend.destroyed().await;
        Ok(true)
    }

    async fn blind_index_keys(
        &self,
        id: &TenantId,
    ) -> Result<Vec<BlindIndexKeyRecord>, StoreError> {
        self.fetch_all(
            Via::Pool,
            "SELECT version, wrapped, tenant_version, created_at_ms, retired_at_ms \
             FROM blind_index_keys WHERE tenant_id = $1 ORDER BY version",
            &[id.into()],
        )
        .await?
        .iter()
        .map(blind_index_key_from_row)
        .collect()
    }

    async fn add_blind_index_key(
        &self,
        id: &TenantId,
        version: u32,
        wrapped: &[u8],
        tenant_version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut tx = self.backend.begin_write().await?;
        self.lock_active_tenant(&mut tx, id).await?;
        let newest = self.newest_blind_index_version(&mut tx, id).await?;
        if version <= newest {
            return Ok(false);
        }
        if newest.checked_add(1) != Some(version) {
            return Err(StoreError::Corrupt(format!(
                "blind-index key version {version} of tenant {id} does not follow {newest}"
            )));
        }
        if !self.version_is_live(&mut tx, id, tenant_version).await? {
            return Err(StoreError::Corrupt(format!(
                "a blind-index key of tenant {id} names wrapping version {tenant_version}, \
                 which does not exist"
            )));
        }
        self.execute(
            Via::Tx(&mut tx),
            "INSERT INTO blind_index_keys (tenant_id, version, wrapped, tenant_version, \
             created_at_ms) VALUES ($1, $2, $3, $4, $5)",
            &[
                id.into(),
                version.into(),
                wrapped.into(),
                tenant_version.into(),
                at.into(),
            ],
        )
        .await?;
        self.commit_change(tx, Event::Tenant(id.clone())).await?;
        Ok(true)
    }

    async fn retire_blind_index_key(
        &self,
        id: &TenantId,
        version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut tx = self.backend.begin_write().await?;
        self.lock_active_tenant(&mut tx, id).await?;
        let newest = self.newest_blind_index_version(&mut tx, id).await?;
        if version == 0 || version > newest {
            return Err(StoreError::Corrupt(format!(
                "tenant {id} has no blind-index key version {version} to retire"
            )));
        }
        if version == newest {
            return Err(StoreError::Conflict);
        }
        let retired = self
            .execute(
                Via::Tx(&mut tx),
                "UPDATE blind_index_keys SET wrapped = NULL, tenant_version = NULL, \
                 retired_at_ms = $1 WHERE tenant_id = $2 AND version = $3 \
                 AND retired_at_ms IS NULL",
                &[at.into(), id.into(), version.into()],
            )
            .await?;
        if retired == 0 {
            return Ok(false);
        }
        self.commit_change(tx, Event::Tenant(id.clone())).await?;
        self.backend.destroyed().await;
        Ok(true)
    }

    async fn blind_index_keys_wrapped_by(
        &self,
        id: &TenantId,
        tenant_version: u32,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        self.fetch_all(
            Via::Pool,
            "SELECT version, wrapped FROM blind_index_keys \
             WHERE tenant_id = $1 AND tenant_version = $2 ORDER BY version",
            &[id.into(), tenant_version.into()],
        )
        .await?
        .iter()
        .map(|row| Ok((rows::version(row.int("version")?)?, row.bytes("wrapped")?)))
        .collect()
    }

    async fn replace_blind_index_wrap(
        &self,
        id: &TenantId,
        version: u32,
        expected_version: u32,
        wrapped: &[u8],
        new_version: u32,
    ) -> Result<bool, StoreError> {
        let mut tx = self.backend.begin_write().await?;
        if self
            .lock_tenant(&mut tx, id)
            .await?
            .is_none_or(|state| matches!(state, TenantState::Shredded { .. }))
        {
            return Ok(false);
        }
        if !self.version_is_live(&mut tx, id, new_version).await? {
            return Err(StoreError::Corrupt(format!(
                "a blind-index key of tenant {id} would be wrapped by version {new_version}, \
                 which does not exist"
            )));
        }
        let updated = self
            .execute(
                Via::Tx(&mut tx),
                "UPDATE blind_index_keys SET wrapped = $1, tenant_version = $2 \
                 WHERE tenant_id = $3 AND version = $4 AND tenant_version = $5",
                &[
                    wrapped.into(),
                    new_version.into(),
                    id.into(),
                    version.into(),
                    expected_version.into(),
                ],
            )
            .await?;
        self.commit(tx).await?;
        Ok(updated == 1)
    }
}

/// A row of `blind_index_keys`.
fn blind_index_key_from_row(row: &impl KeystoreRow) -> Result<BlindIndexKeyRecord, StoreError> {
    let state = match (
        row.maybe_bytes("wrapped")?,
        row.maybe_int("tenant_version")?,
        row.maybe_int("retired_at_ms")?,
    ) {
        (Some(wrapped), Some(tenant_version), None) => BlindIndexKeyState::Live {
            wrapped,
            tenant_version: rows::version(tenant_version)?,
        },
        (None, None, Some(at)) => BlindIndexKeyState::Retired { at: UnixMillis(at) },
        _ => {
            return Err(StoreError::Corrupt(
                "a blind-index key row is neither live nor retired".into(),
            ));
        }
    };
    Ok(BlindIndexKeyRecord {
        version: rows::version(row.int("version")?)?,
        created_at: UnixMillis(row.int("created_at_ms")?),
        state,
    })
}
