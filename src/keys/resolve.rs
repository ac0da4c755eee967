//! Key resolution: the tenant a call names, and the key a ciphertext names,
//! cache first; subject keys: their ids, made on first use, wrapped under a
//! tenant key version.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{
    ActiveTenant, CachedState, CachedTenant, HeldKey, KeyHandle, KeyManager, SUBJECT_KEY_VERSION,
    SealingKey, SealingKeyId, Slot, errors::kms_error, legacy,
};
use crate::{
    envelope::{
        self, EnvelopeKey, KeyRef,
        wrap::{self, KeyDomain},
    },
    error::{Error, Result},
    ids::{SubjectId, SubjectKeyId, TenantId},
    kms::{Purpose, WrapContext, WrappedKey},
    secret::Key256,
    store::{SubjectKeyRecord, SubjectLookup, TenantState, TenantWithPrimary},
};

/// HMAC input prefix for subject key ids: names purpose and version.
const SUBJECT_ID_LABEL: &[u8] = b"keywarden.subject-key-id.v1\x00";

impl KeyManager {
    /// Resolves a tenant for a data-plane call: it must exist and be active.
    /// A miss costs one keystore read and one unwrap of its primary key.
    pub async fn active_tenant(&self, id: &TenantId) -> Result<ActiveTenant> {
        let cached = self
            .tenants
            .get_or_load(id, || async {
                let TenantWithPrimary { record, primary } = self
                    .store
                    .tenant_with_primary(id)
                    .await?
                    .ok_or_else(|| Error::TenantNotFound(id.clone()))?;
                let state = match (record.state, primary) {
                    (TenantState::Shredded { at, .. }, _) => CachedState::Shredded { at },
                    (
                        TenantState::Active {
                            primary_version, ..
                        },
                        Some(wrapped),
                    ) => CachedState::Active(
                        self.unwrap_tenant_key(id, primary_version, &wrapped)
                            .await?,
                    ),
                    (TenantState::Active { .. }, None) => {
                        return Err(Error::internal(format!(
                            "the keystore has no row for tenant {id}'s primary key version"
                        )));
                    }
                };
                Ok(CachedTenant {
                    policy: (&record.policy).into(),
                    state,
                })
            })
            .await?;
        match &cached.state {
            CachedState::Active(key) => Ok(ActiveTenant {
                id: id.clone(),
                primary_version: key.tenant_version,
                cached: cached.clone(),
            }),
            CachedState::Shredded { at } => Err(Error::TenantShredded {
                tenant: id.clone(),
                at: *at,
            }),
        }
    }

    pub(super) async fn key_for(
        &self,
        tenant: &ActiveTenant,
        key_ref: KeyRef,
    ) -> Result<KeyHandle> {
        match key_ref {
            KeyRef::Tenant { version: 0 } => Err(Error::Undecryptable),
            KeyRef::Tenant { version } => {
                check_min_version(tenant, version, "data of key version")?;
                self.tenant_key(tenant, version).await
            }
            KeyRef::Subject { id, version } if version == SUBJECT_KEY_VERSION => {
                self.subject_key(tenant, SubjectKeyId(id), false).await
            }
            KeyRef::Subject { .. } => Err(Error::Undecryptable),
        }
    }

    /// A tenant key version to seal new data under (EncryptRequest
    /// .key_version): not above the primary, at or above the policy's
    /// min_decrypt_version, and not destroyed; FAILED_PRECONDITION otherwise.
    pub(super) async fn sealing_version(
        &self,
        tenant: &ActiveTenant,
        version: u32,
    ) -> Result<KeyHandle> {
        if version > tenant.primary_version {
            return Err(Error::FailedPrecondition(format!(
                "tenant {}'s primary key version is {}: key version {version} is above it \
                 (not made yet, or this sidecar has not seen the rotation; retry)",
                tenant.id, tenant.primary_version
            )));
        }
        check_min_version(tenant, version, "sealing under key version")?;
        self.tenant_key(tenant, version).await
    }

    /// A tenant key version: the primary from the tenant's entry; another
    /// from the key cache or unwrapped by the root key.
    pub(super) async fn tenant_key(
        &self,
        tenant: &ActiveTenant,
        version: u32,
    ) -> Result<KeyHandle> {
        if version == tenant.primary_version {
            return Ok(tenant.primary_key());
        }
        let cache_key = SealingKeyId {
            tenant: tenant.id.clone(),
            slot: Slot::TenantVersion(version),
        };
        let key = self
            .sealing
            .get_or_load(&cache_key, || async {
                let Some(record) = self.store.tenant_key(&tenant.id, version).await? else {
                    // A version above the primary never existed: a forged or
                    // altered reference. One below it did, and is gone.
                    return Err(if version > tenant.primary_version {
                        Error::Undecryptable
                    } else {
                        Error::KeyVersionGone {
                            tenant: tenant.id.clone(),
                            version,
                        }
                    });
                };
                self.unwrap_tenant_key(&tenant.id, version, &record.wrapped)
                    .await
            })
            .await?;
        Ok(KeyHandle(HeldKey::Other(key)))
    }

    /// Unwraps a tenant key version with the root key.
    async fn unwrap_tenant_key(
        &self,
        id: &TenantId,
        version: u32,
        wrapped: &WrappedKey,
    ) -> Result<SealingKey> {
        let key = self
            .root
            .decrypt(
                WrapContext {
                    tenant: id,
                    purpose: Purpose::TenantKey { version },
                },
                wrapped,
            )
            .await
            .map_err(|e| kms_error(id, e))?;
        Ok(SealingKey {
            key: EnvelopeKey::new(self.settings.provider, &key),
            tenant_version: version,
        })
    }

    /// The subject's key id: HMAC-SHA256 under the tenant's subject-index key,
    /// truncated to 128 bits, of the id as the tenant's subject id rule
    /// ([`SubjectIds`]) makes it.
    pub(super) async fn subject_key_id(
        &self,
        tenant: &ActiveTenant,
        subject: &SubjectId,
    ) -> Result<SubjectKeyId> {
        let index_key = self
            .index
            .get_or_load(&tenant.id, || async {
                let record = self
                    .store
                    .tenant(&tenant.id)
                    .await?
                    .ok_or_else(|| Error::TenantNotFound(tenant.id.clone()))?;
                let wrapped = match record.state {
                    TenantState::Active { index_key, .. } => index_key,
                    TenantState::Shredded { at, .. } => {
                        return Err(Error::TenantShredded {
                            tenant: tenant.id.clone(),
                            at,
                        });
                    }
                };
                self.root
                    .decrypt(
                        WrapContext {
                            tenant: &tenant.id,
                            purpose: Purpose::SubjectIndex,
                        },
                        &wrapped,
                    )
                    .await
                    .map_err(|e| kms_error(&tenant.id, e))
            })
            .await?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(index_key.expose())
            .expect("HMAC takes any key length");
        mac.update(SUBJECT_ID_LABEL);
        mac.update(&tenant.policy().subject_ids.apply(subject));
        let digest = mac.finalize().into_bytes();
        let mut id = [0u8; envelope::SUBJECT_KEY_ID_LEN];
        id.copy_from_slice(&digest[..envelope::SUBJECT_KEY_ID_LEN]);
        Ok(SubjectKeyId(id))
    }

    /// A subject key, from the cache or the keystore; made on first use when
    /// `create` is set (encrypt), never when it is not (decrypt).
    pub(super) async fn subject_key(
        &self,
        tenant: &ActiveTenant,
        id: SubjectKeyId,
        create: bool,
    ) -> Result<KeyHandle> {
        let cache_key = SealingKeyId {
            tenant: tenant.id.clone(),
            slot: Slot::Subject(id),
        };
        if !create && self.absent.contains_fresh(&cache_key) {
            return Err(Error::Undecryptable);
        }
        let key = self
            .sealing
            .get_or_load(&cache_key, || async {
                let lookup = match self.store.subject_key(&tenant.id, id).await? {
                    SubjectLookup::Absent if create => {
                        let made = self.create_subject_key(tenant, id).await?;
                        self.absent.invalidate(&cache_key);
                        made
                    }
                    SubjectLookup::Absent => {
                        self.absent.insert(cache_key.clone(), ());
                        SubjectLookup::Absent
                    }
                    other => other,
                };
                match lookup {
                    SubjectLookup::Key(record) => {
                        self.unwrap_subject_key(tenant, id, &record).await
                    }
                    SubjectLookup::Shredded { at } => Err(Error::SubjectShredded {
                        tenant: tenant.id.clone(),
                        at,
                    }),
                    // No key and no tombstone: an altered or forged reference.
                    SubjectLookup::Absent => Err(Error::Undecryptable),
                }
            })
            .await?;
        // The tenant version that wraps the subject key protects its data:
        // the tenant's minimum decryption version applies to it as to
        // tenant-key data, on every path (encrypt, decrypt, rewrap, streams).
        check_min_version(
            tenant,
            key.tenant_version,
            "a subject key wrapped by key version",
        )?;
        Ok(KeyHandle(HeldKey::Other(key)))
    }

    async fn create_subject_key(
        &self,
        tenant: &ActiveTenant,
        id: SubjectKeyId,
    ) -> Result<SubjectLookup> {
        let key = Key256::generate().map_err(Error::internal)?;
        let record = self.wrap_subject_key(tenant, id, &key).await?;
        // The keystore answers with whatever won a race for this subject.
        Ok(self
            .store
            .insert_subject_key(&tenant.id, id, record, self.now())
            .await?)
    }

    /// Wraps a subject key under the tenant's primary key version, in the
    /// subject-key domain (see [`envelope::wrap`]): no data-plane call can
    /// open or mint it.
    pub(super) async fn wrap_subject_key(
        &self,
        tenant: &ActiveTenant,
        id: SubjectKeyId,
        key: &Key256,
    ) -> Result<SubjectKeyRecord> {
        let wrapping = tenant.primary_key();
        let wrapped = wrap::wrap_key(
            &wrapping.get()?.key,
            KeyDomain::SubjectKey,
            tenant.primary_version,
            tenant.id.as_str(),
            &id.0,
            key,
        )
        .map_err(Error::internal)?;
        Ok(SubjectKeyRecord {
            wrapped,
            tenant_version: tenant.primary_version,
        })
    }

    async fn unwrap_subject_key(
        &self,
        tenant: &ActiveTenant,
        id: SubjectKeyId,
        record: &SubjectKeyRecord,
    ) -> Result<SealingKey> {
        let key = self.subject_key_bytes(tenant, id, record).await?;
        Ok(SealingKey {
            key: EnvelopeKey::new(self.settings.provider, &key),
            tenant_version: record.tenant_version,
        })
    }

    /// Opens a subject key's keystore row with the tenant key version that
    /// sealed it: a subject-key-domain wrap, or (until the upgrade has
    /// rewrapped it, see [`KeyManager::upgrade_subject_keys`]) a row in the
    /// legacy form, a tenant-key envelope with a reserved context. The
    /// legacy form is read here only, from the keystore; the data plane
    /// refuses that context (and the row is never data-plane input).
    pub(super) async fn subject_key_bytes(
        &self,
        tenant: &ActiveTenant,
        id: SubjectKeyId,
        record: &SubjectKeyRecord,
    ) -> Result<Key256> {
        let wrapping = self.tenant_key(tenant, record.tenant_version).await?;
        let wrapping = wrapping.get()?;
        let corrupt = || {
            Error::internal(format!(
                "subject key of tenant {} does not unwrap",
                tenant.id
            ))
        };
        if legacy::is_legacy(&record.wrapped) {
            return legacy::unwrap_subject_key(&wrapping.key, tenant, id, record)
                .ok_or_else(corrupt);
        }
        match wrap::parse_wrapped(&record.wrapped) {
            Ok(header) if header.tenant_version == record.tenant_version => {}
            _ => return Err(corrupt()),
        }
        wrap::unwrap_key(
            &wrapping.key,
            KeyDomain::SubjectKey,
            &record.wrapped,
            tenant.id.as_str(),
            &id.0,
        )
        .map_err(|_| corrupt())
    }
}

/// Refuses what tenant key `version` protects when the tenant's policy sets
/// a higher minimum decryption version.
pub(super) fn check_min_version(tenant: &ActiveTenant, version: u32, what: &str) -> Result<()> {
    let min = tenant.policy().min_decrypt_version;
    if version < min {
        return Err(Error::FailedPrecondition(format!(
            "tenant {}'s policy refuses {what} {version}: its minimum decryption version is {min}",
            tenant.id
        )));
    }
    Ok(())
}
