//! Blind-index keys: per tenant, versioned 1.., each a random 256-bit key
//! wrapped by a tenant key version in its own key domain
//! ([`KeyDomain::BlindIndexKey`]), bound to its version. The newest version
//! is the primary; older ones stay live until retired, so queries can match
//! rows indexed under them while the app re-indexes.
//!
//! Version 1 is made on a tenant's first BlindIndex, not at CreateTenant:
//! tenants created before blind indexes existed need the lazy path anyway,
//! and a tenant that never indexes holds no such key. Two sidecars making it
//! at once race on the keystore's conditional insert; the loser reads the
//! winner's key.
//!
//! The cache holds one entry per tenant: every live version unwrapped
//! (newest first) and the retired versions' numbers. Every change (a new
//! version, a retirement, a shred, a destroyed tenant key version) evicts
//! it, here and, through the keystore's events, on other sidecars.

use super::{ActiveTenant, KeyManager, cache::Cached, resolve::check_min_version};
use crate::{
    envelope::{
        Context,
        blind::{self, Field},
        wrap::{self, KeyDomain},
    },
    error::{Error, Result},
    ids::TenantId,
    secret::Key256,
    store::{BlindIndexKeyRecord, BlindIndexKeyState, StoreError},
};

/// Most live blind-index key versions a tenant may hold: every one is
/// unwrapped into the cache and, with `all_versions`, hashed on each call,
/// so RotateIndexKey refuses a rotation past it (FAILED_PRECONDITION).
pub const MAX_LIVE_INDEX_KEYS: usize = 8;

/// How often a rotation that lost a race is retried.
const ROTATION_ATTEMPTS: usize = 5;

/// A tenant's blind-index keys, unwrapped. Its Debug shows versions only.
pub struct BlindIndexKeys {
    /// Live versions, newest (the primary) first: (version, the tenant key
    /// version that wraps it, the key).
    live: Vec<(u32, u32, Key256)>,
    /// Retired versions: they compute nothing.
    retired: Vec<u32>,
}

impl std::fmt::Debug for BlindIndexKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlindIndexKeys")
            .field(
                "live",
                &self.live.iter().map(|(v, _, _)| *v).collect::<Vec<_>>(),
            )
            .field("retired", &self.retired)
            .finish()
    }
}

/// Which index key versions a BlindIndex call computes tokens under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexVersions {
    /// The primary (newest) version.
    Primary,
    /// The primary, then every other live version, newest first.
    AllLive,
    /// One given version, which must be live.
    Exactly(u32),
}

/// What BlindIndex answers: one token per version asked, and the primary
/// version.
pub struct BlindIndexed {
    pub tokens: Vec<Vec<u8>>,
    pub primary_version: u32,
}

impl std::fmt::Debug for BlindIndexed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlindIndexed")
            .field("tokens", &self.tokens.len())
            .field("primary_version", &self.primary_version)
            .finish()
    }
}

/// A tenant's blind-index key versions, for the admin API.
#[derive(Clone, Debug)]
pub struct BlindIndexKeyInfo {
    /// Oldest first.
    pub versions: Vec<BlindIndexKeyRecord>,
}

impl BlindIndexKeyInfo {
    /// The newest version (0: none yet).
    pub fn primary_version(&self) -> u32 {
        self.versions.last().map_or(0, |r| r.version)
    }
}

impl KeyManager {
    /// The tokens of `fields` (transformed already) for the tenant and
    /// `context`, truncated to `bits`, under the versions asked. The caller
    /// checked the bounds ([`blind`]'s constants).
    pub async fn blind_index(
        &self,
        tenant: &ActiveTenant,
        versions: IndexVersions,
        bits: u32,
        context: &Context,
        fields: &[Field<'_>],
    ) -> Result<BlindIndexed> {
        let keys = self.blind_index_keys(tenant).await?;
        let primary = keys
            .live
            .first()
            .ok_or_else(|| Error::internal("a tenant's blind-index keys have no live version"))?;
        // The tenant version that wraps an index key protects it: the
        // tenant's minimum decryption version applies to it as to subject
        // keys (checked at each use: the policy can change while cached).
        let token = |(version, tenant_version, key): &(u32, u32, Key256)| {
            check_min_version(
                tenant,
                *tenant_version,
                "a blind-index key wrapped by key version",
            )?;
            Ok(blind::token(
                key,
                *version,
                bits,
                tenant.id.as_str(),
                context,
                fields,
            ))
        };
        let tokens = match versions {
            IndexVersions::Primary => vec![token(primary)?],
            IndexVersions::AllLive => keys.live.iter().map(token).collect::<Result<_>>()?,
            IndexVersions::Exactly(v) => match keys.live.iter().find(|(live, _, _)| *live == v) {
                Some(entry) => vec![token(entry)?],
                None if keys.retired.contains(&v) => {
                    return Err(Error::FailedPrecondition(format!(
                        "tenant {}'s blind-index key version {v} is retired",
                        tenant.id
                    )));
                }
                None => {
                    return Err(Error::invalid(
                        "key_version",
                        format!("tenant {} has no blind-index key version {v}", tenant.id),
                    ));
                }
            },
        };
        Ok(BlindIndexed {
            tokens,
            primary_version: primary.0,
        })
    }

    /// The tenant's blind-index keys, from the cache or the keystore;
    /// version 1 is made on first use.
    async fn blind_index_keys(&self, tenant: &ActiveTenant) -> Result<Cached<BlindIndexKeys>> {
        self.blind
            .get_or_load(&tenant.id, || async {
                let mut records = self.store.blind_index_keys(&tenant.id).await?;
                if records.is_empty() {
                    // Lost or won, the keystore now holds version 1.
                    self.add_blind_index_version(tenant, 1).await?;
                    records = self.store.blind_index_keys(&tenant.id).await?;
                }
                let mut live = Vec::new();
                let mut retired = Vec::new();
                for record in records.iter().rev() {
                    match &record.state {
                        BlindIndexKeyState::Live {
                            wrapped,
                            tenant_version,
                        } => live.push((
                            record.version,
                            *tenant_version,
                            self.unwrap_blind_index_key(
                                tenant,
                                record.version,
                                *tenant_version,
                                wrapped,
                            )
                            .await?,
                        )),
                        BlindIndexKeyState::Retired { .. } => retired.push(record.version),
                    }
                }
                Ok(BlindIndexKeys { live, retired })
            })
            .await
    }

    /// Makes blind-index key `version`, wrapped under the tenant's primary
    /// key version; `false` when another call made that version first.
    async fn add_blind_index_version(&self, tenant: &ActiveTenant, version: u32) -> Result<bool> {
        let key = Key256::generate().map_err(Error::internal)?;
        let wrapped = self.wrap_blind_index_key(tenant, version, &key)?;
        Ok(self
            .store
            .add_blind_index_key(
                &tenant.id,
                version,
                &wrapped,
                tenant.primary_version,
                self.now(),
            )
            .await?)
    }

    fn wrap_blind_index_key(
        &self,
        tenant: &ActiveTenant,
        version: u32,
        key: &Key256,
    ) -> Result<Vec<u8>> {
        wrap::wrap_key(
            &tenant.primary_key().get()?.key,
            KeyDomain::BlindIndexKey,
            tenant.primary_version,
            tenant.id.as_str(),
            &version.to_be_bytes(),
            key,
        )
        .map_err(Error::internal)
    }

    async fn unwrap_blind_index_key(
        &self,
        tenant: &ActiveTenant,
        version: u32,
        tenant_version: u32,
        wrapped: &[u8],
    ) -> Result<Key256> {
        let wrapping = self.tenant_key(tenant, tenant_version).await?;
        let corrupt = || {
            Error::internal(format!(
                "blind-index key version {version} of tenant {} does not unwrap",
                tenant.id
            ))
        };
        match wrap::parse_wrapped(wrapped) {
            Ok(header) if header.tenant_version == tenant_version => {}
            _ => return Err(corrupt()),
        }
        wrap::unwrap_key(
            &wrapping.get()?.key,
            KeyDomain::BlindIndexKey,
            wrapped,
            tenant.id.as_str(),
            &version.to_be_bytes(),
        )
        .map_err(|_| corrupt())
    }

    /// The tenant's blind-index key versions (not cached).
    pub async fn blind_index_key_info(&self, id: &TenantId) -> Result<BlindIndexKeyInfo> {
        self.active_tenant(id).await?;
        Ok(BlindIndexKeyInfo {
            versions: self.store.blind_index_keys(id).await?,
        })
    }

    /// Adds a blind-index key version and makes it the primary (version 1
    /// for a tenant that has none). Two rotations racing make two
    /// consecutive versions.
    pub async fn rotate_blind_index_key(&self, id: &TenantId) -> Result<BlindIndexKeyInfo> {
        for _ in 0..ROTATION_ATTEMPTS {
            let tenant = self.active_tenant(id).await?;
            let records = self.store.blind_index_keys(id).await?;
            let live = records
                .iter()
                .filter(|r| matches!(r.state, BlindIndexKeyState::Live { .. }))
                .count();
            if live >= MAX_LIVE_INDEX_KEYS {
                return Err(Error::FailedPrecondition(format!(
                    "tenant {id} has {live} live blind-index key versions, the most it may \
                     hold: retire an old one first"
                )));
            }
            // Only newest + 1 can be added, so concurrent rotations are
            // ordered by the version and the bound above holds exactly.
            let newest = records.last().map_or(0, |r| r.version);
            let version = newest.checked_add(1).ok_or_else(|| {
                Error::internal(format!(
                    "tenant {id} has used up its blind-index key versions"
                ))
            })?;
            let added = self.add_blind_index_version(&tenant, version).await;
            self.blind.invalidate(id);
            match added {
                Ok(true) => {
                    tracing::info!(tenant = %id, version, "blind-index key rotated");
                    return self.blind_index_key_info(id).await;
                }
                Ok(false) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Aborted(id.clone()))
    }

    /// Retires blind-index key `version`: its key is deleted, and tokens
    /// under it can no longer be computed. The primary cannot be retired.
    pub async fn retire_blind_index_key(
        &self,
        id: &TenantId,
        version: u32,
    ) -> Result<BlindIndexKeyInfo> {
        let info = self.blind_index_key_info(id).await?;
        if !info.versions.iter().any(|r| r.version == version) {
            return Err(Error::invalid(
                "version",
                format!("tenant {id} has no blind-index key version {version}"),
            ));
        }
        let retired = self
            .store
            .retire_blind_index_key(id, version, self.now())
            .await;
        self.blind.invalidate(id);
        match retired {
            Ok(fresh) => {
                if fresh {
                    tracing::info!(tenant = %id, version, "blind-index key version retired");
                }
                self.blind_index_key_info(id).await
            }
            Err(StoreError::Conflict) => Err(Error::FailedPrecondition(format!(
                "blind-index key version {version} is tenant {id}'s primary: rotate first"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves every blind-index key wrapped by tenant key `version` to the
    /// primary version (before `version` is destroyed). Returns how many
    /// moved.
    pub(super) async fn move_blind_index_keys(
        &self,
        tenant: &ActiveTenant,
        version: u32,
    ) -> Result<u64> {
        let mut moved = 0;
        for (index_version, wrapped) in self
            .store
            .blind_index_keys_wrapped_by(&tenant.id, version)
            .await?
        {
            let key = self
                .unwrap_blind_index_key(tenant, index_version, version, &wrapped)
                .await?;
            let rewrapped = self.wrap_blind_index_key(tenant, index_version, &key)?;
            if self
                .store
                .replace_blind_index_wrap(
                    &tenant.id,
                    index_version,
                    version,
                    &rewrapped,
                    tenant.primary_version,
                )
                .await?
            {
                moved += 1;
            }
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_versions_and_no_key_bytes() {
        let keys = BlindIndexKeys {
            live: vec![(2, 1, Key256::from_slice(&[0xAB; 32]).unwrap())],
            retired: vec![1],
        };
        let shown = format!("{keys:?}");
        assert_eq!(shown, "BlindIndexKeys { live: [2], retired: [1] }");
    }
}
