//! Tenant lifecycle: creating a tenant where it asks to be placed, reading
//! and listing tenants, rotating a tenant's key, and shredding a tenant or
//! one of its data subjects.

use super::{
    CachedState, CachedTenant, KeyManager, PlacementRequest, RootKeyChoice, SealingKey,
    SealingKeyId, ShredReport, Slot, TenantInfo,
    errors::{kms_error, placement_error},
};
use crate::{
    envelope::EnvelopeKey,
    error::{Error, Result},
    ids::{SubjectId, SubjectIds, TenantId},
    kms::{Purpose, WrapContext},
    store::{
        NewTenant, Placement, StoreError, SubjectShred, TenantKeyRecord, TenantPolicy,
        TenantRecord, TenantState, Tier,
    },
};

/// How often a rotation that lost a race to another rotation is retried.
const ROTATION_ATTEMPTS: usize = 5;

impl KeyManager {
    /// Creates a tenant: key version 1 and its subject-index key, both made
    /// and wrapped by the tenant's root key. The new keys go straight into the
    /// cache.
    pub async fn create_tenant(
        &self,
        id: &TenantId,
        request: &PlacementRequest,
        policy: &TenantPolicy,
    ) -> Result<TenantInfo> {
        // Refuse a known id before anything costs a KMS key.
        match self.store.tenant(id).await? {
            Some(TenantRecord {
                state: TenantState::Shredded { at, .. },
                ..
            }) => {
                return Err(Error::TenantShredded {
                    tenant: id.clone(),
                    at,
                });
            }
            Some(_) => return Err(Error::TenantExists(id.clone())),
            None => {}
        }
        let region = request.region.as_deref();
        let placement = match &request.root_key {
            RootKeyChoice::Shared => {
                self.root
                    .shared_key(region)
                    .map_err(|e| placement_error("region", e))?;
                Placement {
                    tier: Tier::Shared,
                    region: request.region.clone(),
                    root_key: None,
                }
            }
            RootKeyChoice::Dedicated => Placement {
                tier: Tier::Dedicated,
                region: request.region.clone(),
                root_key: Some(
                    self.root
                        .create_dedicated_key(id, region)
                        .await
                        .map_err(|e| placement_error("root_key", e))?,
                ),
            },
            RootKeyChoice::Existing(key) => Placement {
                tier: Tier::Customer,
                region: request.region.clone(),
                root_key: Some(
                    self.root
                        .resolve_key(key, region)
                        .await
                        .map_err(|e| placement_error("root_key", e))?,
                ),
            },
        };
        let created = self.create_with(id, placement.clone(), policy).await;
        if created.is_err()
            && placement.tier == Tier::Dedicated
            && let Some(key) = &placement.root_key
        {
            // Do not leave an orphan KMS key behind a failed creation.
            let deletion = self
                .root
                .schedule_key_deletion(key, self.settings.key_deletion_waiting_days)
                .await;
            tracing::warn!(tenant = %id, root_key = %key, scheduled = deletion.is_ok(), "tenant creation failed; its dedicated root key is scheduled for deletion");
        }
        created
    }

    async fn create_with(
        &self,
        id: &TenantId,
        placement: Placement,
        policy: &TenantPolicy,
    ) -> Result<TenantInfo> {
        let root_key = self.root_key_of(id, &placement)?;
        let first = self
            .root
            .generate_data_key(
                &root_key,
                WrapContext {
                    tenant: id,
                    purpose: Purpose::TenantKey { version: 1 },
                },
            )
            .await
            .map_err(|e| kms_error(id, e))?;
        let index = self
            .root
            .generate_data_key(
                &root_key,
                WrapContext {
                    tenant: id,
                    purpose: Purpose::SubjectIndex,
                },
            )
            .await
            .map_err(|e| kms_error(id, e))?;
        self.store
            .create_tenant(NewTenant {
                id: id.clone(),
                created_at: self.now(),
                placement: placement.clone(),
                policy: policy.clone(),
                first_key: first.wrapped,
                index_key: index.wrapped,
            })
            .await?;
        self.tenants.insert(
            id.clone(),
            CachedTenant {
                policy: policy.into(),
                state: CachedState::Active(SealingKey {
                    key: EnvelopeKey::new(self.settings.provider, &first.key),
                    tenant_version: 1,
                }),
            },
        );
        self.index.insert(id.clone(), index.key);
        tracing::info!(tenant = %id, tier = placement.tier.as_str(), region = placement.region.as_deref().unwrap_or("default"), "tenant created");
        self.tenant_info(id).await
    }

    /// The root key that wraps a tenant's new keys: its own, or the shared
    /// key of its region as configured now.
    pub fn root_key_of(&self, id: &TenantId, placement: &Placement) -> Result<String> {
        match &placement.root_key {
            Some(key) => Ok(key.clone()),
            None => self
                .root
                .shared_key(placement.region.as_deref())
                .map_err(|e| kms_error(id, e)),
        }
    }

    /// The tenant and its key versions, read from the keystore (not cached).
    pub async fn tenant_info(&self, id: &TenantId) -> Result<TenantInfo> {
        let record = self
            .store
            .tenant(id)
            .await?
            .ok_or_else(|| Error::TenantNotFound(id.clone()))?;
        let versions = match record.state {
            TenantState::Active { .. } => self.store.tenant_keys(id).await?,
            TenantState::Shredded { .. } => Vec::new(),
        };
        let destroyed = self.store.destroyed_versions(id).await?;
        Ok(TenantInfo {
            record,
            versions,
            destroyed,
        })
    }

    /// A page of tenants in id order (without their versions).
    pub async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<TenantRecord>> {
        Ok(self.store.list_tenants(after, limit).await?)
    }

    /// Adds a tenant key version and makes it primary. Two rotations racing
    /// make two consecutive versions, never one version twice.
    pub async fn rotate(&self, id: &TenantId) -> Result<TenantInfo> {
        for _ in 0..ROTATION_ATTEMPTS {
            let record = self
                .store
                .tenant(id)
                .await?
                .ok_or_else(|| Error::TenantNotFound(id.clone()))?;
            let primary = match record.state {
                TenantState::Active {
                    primary_version, ..
                } => primary_version,
                TenantState::Shredded { at, .. } => {
                    return Err(Error::TenantShredded {
                        tenant: id.clone(),
                        at,
                    });
                }
            };
            let version = primary.checked_add(1).ok_or_else(|| {
                Error::internal(format!("tenant {id} has used up its key versions"))
            })?;
            let root_key = self.root_key_of(id, &record.placement)?;
            let generated = self
                .root
                .generate_data_key(
                    &root_key,
                    WrapContext {
                        tenant: id,
                        purpose: Purpose::TenantKey { version },
                    },
                )
                .await
                .map_err(|e| kms_error(id, e))?;
            let added = self
                .store
                .add_tenant_key(
                    id,
                    primary,
                    TenantKeyRecord {
                        version,
                        wrapped: generated.wrapped,
                        created_at: self.now(),
                    },
                )
                .await;
            match added {
                Ok(()) => {
                    // The new version is primary: the tenant's entry holds it.
                    self.tenants.invalidate(id);
                    self.tenants.insert(
                        id.clone(),
                        CachedTenant {
                            policy: (&record.policy).into(),
                            state: CachedState::Active(SealingKey {
                                key: EnvelopeKey::new(self.settings.provider, &generated.key),
                                tenant_version: version,
                            }),
                        },
                    );
                    tracing::info!(tenant = %id, version, "tenant key rotated");
                    return self.tenant_info(id).await;
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Aborted(id.clone()))
    }

    /// Destroys every key of the tenant, leaves a tombstone, and evicts the
    /// tenant's keys from this sidecar's cache. A dedicated root key is then
    /// scheduled for deletion in KMS; if KMS cannot be reached for that, the
    /// call answers UNAVAILABLE and calling again schedules it.
    pub async fn shred_tenant(&self, id: &TenantId) -> Result<ShredReport> {
        let record = self
            .store
            .tenant(id)
            .await?
            .ok_or_else(|| Error::TenantNotFound(id.clone()))?;
        let result = self.store.shred_tenant(id, self.now()).await;
        // Evict even on error: the transaction may have committed before the
        // error, and a cache miss costs only a reload.
        self.evict_tenant(id);
        let shred = result?;
        if shred.already_shredded {
            tracing::info!(tenant = %id, at = %shred.at, "tenant was already shredded");
        } else {
            tracing::info!(
                tenant = %id,
                versions = shred.destroyed_key_versions,
                subject_keys = shred.destroyed_subject_keys,
                "tenant shredded"
            );
        }
        let mut root_key_deletion = match record.state {
            TenantState::Shredded {
                root_key_deletion, ..
            } => root_key_deletion,
            TenantState::Active { .. } => None,
        };
        if record.placement.tier == Tier::Dedicated
            && root_key_deletion.is_none()
            && let Some(key) = &record.placement.root_key
        {
            let at = self
                .root
                .schedule_key_deletion(key, self.settings.key_deletion_waiting_days)
                .await
                .map_err(|e| kms_error(id, e))?;
            self.store.set_root_key_deletion(id, at).await?;
            tracing::info!(tenant = %id, root_key = %key, deletion = %at, "dedicated root key scheduled for deletion");
            root_key_deletion = Some(at);
        }
        Ok(ShredReport {
            shred,
            placement: record.placement,
            root_key_deletion,
        })
    }

    /// The tenant's subject id rule, from its stored policy (no key is
    /// unwrapped).
    pub async fn subject_id_rule(&self, id: &TenantId) -> Result<SubjectIds> {
        Ok(self
            .store
            .tenant(id)
            .await?
            .ok_or_else(|| Error::TenantNotFound(id.clone()))?
            .policy
            .subject_ids)
    }

    /// Destroys one data subject's key and leaves a tombstone. Answers the
    /// subject id rule the subject was found under.
    pub async fn shred_subject(
        &self,
        id: &TenantId,
        subject: &SubjectId,
    ) -> Result<(SubjectShred, SubjectIds)> {
        let tenant = self.active_tenant(id).await?;
        let subject_key_id = self.subject_key_id(&tenant, subject).await?;
        let result = self
            .store
            .shred_subject(id, subject_key_id, self.now())
            .await;
        self.sealing.invalidate(&SealingKeyId {
            tenant: id.clone(),
            slot: Slot::Subject(subject_key_id),
        });
        self.watchers.subject(id, subject_key_id);
        let shred = result?;
        tracing::info!(tenant = %id, key_destroyed = shred.key_destroyed, already = shred.already_shredded, "subject shredded");
        Ok((shred, tenant.policy().subject_ids))
    }
}
