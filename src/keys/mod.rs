//! The key hierarchy: the one place that knows how keys relate.
//!
//! ```text
//! root key (kms)                      never leaves the provider
//!  +- tenant key vN                   wrapped by the root key; seals the tenant's data
//!  |   +- subject keys                wrapped by a tenant key version; one per data subject
//!  +- subject-index key               wrapped by the root key; hashes subject ids into
//!                                     subject key ids, so the keystore never holds an id
//! ```
//!
//! [`KeyManager`] creates tenants, resolves the key for a request (cache
//! first), rotates, and shreds tenants and subjects. Unwrapped keys live only
//! in its caches, as `Arc`s that zeroize when the last reference drops.
//!
//! A tenant's cache entry holds its policy and its primary key version
//! unwrapped, loaded by one keystore read and one unwrap: one entry per
//! tenant serves every Encrypt, and every Decrypt of data sealed under the
//! primary version. Older versions and subject keys have a cache of their
//! own.

pub mod cache;
mod legacy;
mod schedule;
mod watch;

use std::{sync::Arc, time::Duration};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{
    envelope::{
        self, Context, EnvelopeKey, KeyRef, Provider,
        stream::{self, StreamOpener, StreamSealer},
        wrap::{self, KeyDomain},
    },
    error::{Dependency, Error, Result},
    events::Event,
    ids::{SubjectId, SubjectIds, SubjectKeyId, TenantId},
    kms::{KmsError, Purpose, RootKeyProvider, WrapContext, WrappedKey},
    secret::Key256,
    store::{
        Keystore, NewTenant, Placement, RootWrappedSlot, StoreError, SubjectKeyRecord,
        SubjectLookup, SubjectShred, TenantKeyRecord, TenantPolicy, TenantRecord, TenantShred,
        TenantState, TenantWithPrimary, Tier, UnixMillis,
    },
};
use cache::{CacheLimits, Cached, TtlCache};
pub use legacy::{SubjectKeyUpgrade, legacy_wrap};
pub use watch::KeyWatch;

/// Subject keys have one version today; the format has room for more.
pub const SUBJECT_KEY_VERSION: u32 = 1;
/// HMAC input prefix for subject key ids: names purpose and version.
const SUBJECT_ID_LABEL: &[u8] = b"keywarden.subject-key-id.v1\x00";
/// How often a rotation that lost a race to another rotation is retried.
const ROTATION_ATTEMPTS: usize = 5;

/// A key that seals and opens envelopes: a tenant key version or a subject key.
/// Its Debug shows no key bytes (see [`EnvelopeKey`]).
#[derive(Debug)]
pub struct SealingKey {
    key: EnvelopeKey,
    /// The tenant key version: this one, or the one wrapping the subject key.
    tenant_version: u32,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Slot {
    TenantVersion(u32),
    Subject(SubjectKeyId),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct SealingKeyId {
    tenant: TenantId,
    slot: Slot,
}

/// An active tenant, resolved once per request (or per batch).
#[derive(Clone, Debug)]
pub struct ActiveTenant {
    pub id: TenantId,
    pub primary_version: u32,
    /// The cached entry it was resolved from (shared, not copied: this is
    /// made on every request).
    cached: Cached<CachedTenant>,
}

/// What the tenant cache holds of a tenant.
#[derive(Debug)]
struct CachedTenant {
    policy: CallPolicy,
    state: CachedState,
}

/// What a data-plane call checks of a tenant's policy (the rest is the
/// scheduler's, which reads the keystore). Kept apart to keep the tenant's
/// cache entry small: there is one per cached tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallPolicy {
    pub max_plaintext_bytes: u64,
    pub min_decrypt_version: u32,
    pub max_items_per_second: u32,
    pub burst: u32,
    pub subject_ids: SubjectIds,
}

impl From<&TenantPolicy> for CallPolicy {
    fn from(p: &TenantPolicy) -> Self {
        Self {
            max_plaintext_bytes: p.max_plaintext_bytes,
            min_decrypt_version: p.min_decrypt_version,
            max_items_per_second: p.max_items_per_second,
            burst: p.burst,
            subject_ids: p.subject_ids,
        }
    }
}

#[derive(Debug)]
enum CachedState {
    /// Its primary key version, unwrapped.
    Active(SealingKey),
    Shredded {
        at: UnixMillis,
    },
}

impl CachedTenant {
    fn primary_key(&self) -> Result<&SealingKey> {
        match &self.state {
            CachedState::Active(key) => Ok(key),
            CachedState::Shredded { .. } => {
                Err(Error::internal("an active tenant holds a shredded state"))
            }
        }
    }
}

/// A key resolved for a call: the tenant's primary key, held in the
/// tenant's cache entry, or another version or a subject key from the key
/// cache.
pub struct KeyHandle(HeldKey);

enum HeldKey {
    Primary(Cached<CachedTenant>),
    Other(Cached<SealingKey>),
}

impl KeyHandle {
    fn get(&self) -> Result<&SealingKey> {
        match &self.0 {
            HeldKey::Primary(tenant) => tenant.primary_key(),
            HeldKey::Other(key) => Ok(key),
        }
    }
}

impl ActiveTenant {
    pub fn policy(&self) -> &CallPolicy {
        &self.cached.policy
    }

    fn primary_key(&self) -> KeyHandle {
        KeyHandle(HeldKey::Primary(self.cached.clone()))
    }

    /// The tenant's own rate limit, if its policy sets one.
    pub fn rate(&self) -> Option<crate::rate::Rate> {
        let policy = self.policy();
        (policy.max_items_per_second > 0).then_some(crate::rate::Rate {
            per_second: policy.max_items_per_second,
            burst: policy.burst,
        })
    }
}

/// What CreateTenant asks for the tenant's root key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RootKeyChoice {
    /// The configured shared root key of the tenant's region.
    #[default]
    Shared,
    /// A new KMS key for this tenant alone.
    Dedicated,
    /// An existing KMS key (id, ARN or alias) the tenant supplies.
    Existing(String),
}

/// Where CreateTenant places a tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlacementRequest {
    pub root_key: RootKeyChoice,
    /// `None`: the default region.
    pub region: Option<String>,
}

/// What a tenant shred did, keystore and KMS.
#[derive(Clone, Debug)]
pub struct ShredReport {
    pub shred: TenantShred,
    pub placement: Placement,
    /// When KMS deletes the tenant's dedicated root key.
    pub root_key_deletion: Option<UnixMillis>,
}

/// How far a root key rotation has come.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootRotationProgress {
    /// The root key everything moves to.
    pub to: String,
    /// Keys in scope when the rotation started.
    pub total: u64,
    /// Of those, already wrapped by `to` (e.g. by an earlier, interrupted run).
    pub already_on_target: u64,
    /// Moved to `to` by this run so far.
    pub rewrapped: u64,
    /// Shredded or changed by someone else while this run was at them.
    pub changed_concurrently: u64,
    /// The whole keystore was walked.
    pub done: bool,
}

/// Settings of the hierarchy beyond the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySettings {
    /// Days KMS waits before deleting a shredded tenant's dedicated key (7 to 30).
    pub key_deletion_waiting_days: u32,
    /// Which AES-256-GCM implementation seals and opens envelopes.
    pub provider: Provider,
}

impl Default for KeySettings {
    fn default() -> Self {
        Self {
            key_deletion_waiting_days: 30,
            provider: Provider::default(),
        }
    }
}

/// A tenant and its key versions, for the admin API.
#[derive(Clone, Debug)]
pub struct TenantInfo {
    pub record: TenantRecord,
    /// Oldest first; empty once shredded.
    pub versions: Vec<TenantKeyRecord>,
    /// Versions destroyed by the retention policy, oldest first, and when.
    pub destroyed: Vec<(u32, UnixMillis)>,
}

pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub key_version: u32,
}

pub struct Opened {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub key_version: u32,
}

pub struct Rewrapped {
    pub ciphertext: Vec<u8>,
    pub key_version: u32,
    pub previous_key_version: u32,
}

// Results print their sizes and versions, never their bytes.
impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("ciphertext_len", &self.ciphertext.len())
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("plaintext_len", &self.plaintext.len())
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl std::fmt::Debug for Rewrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewrapped")
            .field("ciphertext_len", &self.ciphertext.len())
            .field("key_version", &self.key_version)
            .field("previous_key_version", &self.previous_key_version)
            .finish()
    }
}

pub struct KeyManager {
    root: Arc<dyn RootKeyProvider>,
    store: Arc<dyn Keystore>,
    /// Tenants: policy, and primary key unwrapped or tombstone.
    tenants: TtlCache<TenantId, CachedTenant>,
    /// Unwrapped tenant key versions other than the primary, and subject
    /// keys.
    sealing: TtlCache<SealingKeyId, SealingKey>,
    /// Unwrapped subject-index keys.
    index: TtlCache<TenantId, Key256>,
    /// Subject key ids the keystore did not know when a ciphertext named
    /// them (forged or altered references): answered without another
    /// keystore read for a cache lifetime. A subject key id is a keyed hash
    /// only this sidecar can compute, so a real subject's id is here only
    /// if its first ciphertext was guessed before it existed.
    absent: TtlCache<SealingKeyId, ()>,
    /// Keys in use by open streams, woken by the evictions below.
    watchers: Arc<watch::Watchers>,
    /// How often an open stream checks its key again even without an
    /// eviction: the cache's time to live, the bound when an event is lost.
    recheck_every: Duration,
    settings: KeySettings,
    /// The time, for records and policies.
    clock: Arc<dyn Fn() -> UnixMillis + Send + Sync>,
}

impl KeyManager {
    pub fn new(
        root: Arc<dyn RootKeyProvider>,
        store: Arc<dyn Keystore>,
        limits: CacheLimits,
        settings: KeySettings,
    ) -> Self {
        Self {
            root,
            store,
            tenants: TtlCache::new(limits),
            sealing: TtlCache::new(limits),
            index: TtlCache::new(limits),
            absent: TtlCache::new(limits),
            watchers: Arc::default(),
            recheck_every: limits.time_to_live,
            settings,
            clock: Arc::new(UnixMillis::now),
        }
    }

    /// Uses `clock` for the time instead of the system's (tests: a clock
    /// that follows tokio's paused time).
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> UnixMillis + Send + Sync>) -> Self {
        self.clock = clock;
        self
    }

    /// Now, by this manager's clock.
    pub fn now(&self) -> UnixMillis {
        (self.clock)()
    }

    /// The root-key provider in use.
    pub fn root(&self) -> &dyn RootKeyProvider {
        &*self.root
    }

    // ---- tenants ---------------------------------------------------------

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

    /// Moves every key wrapped directly by an old shared root key of `region`
    /// (tenant key versions and subject-index keys of shared-tier tenants)
    /// onto the shared root key configured now, with KMS ReEncrypt: the key
    /// material never leaves KMS. Page by page, one key at a time, each swap
    /// a compare-and-swap on the old wrapping: at every moment every key is
    /// wrapped by the old or the new root key, never by nothing. Killed at any
    /// point, it is resumed by running it again; run twice, the second run
    /// finds nothing to do. Progress goes to `progress` after every page;
    /// when nobody listens any more, it stops (and can be resumed).
    ///
    /// `to`, when given, must name the configured key: rotating to a key the
    /// sidecars do not use for new keys would leave new versions behind.
    pub async fn rotate_root(
        &self,
        region: Option<&str>,
        to: Option<&str>,
        page_size: u32,
        progress: &tokio::sync::mpsc::Sender<RootRotationProgress>,
    ) -> Result<RootRotationProgress> {
        let target = self
            .root
            .shared_key(region)
            .map_err(|e| placement_error("region", e))?;
        if let Some(to) = to {
            let named = self
                .root
                .resolve_key(to, region)
                .await
                .map_err(|e| placement_error("to", e))?;
            if named != target {
                return Err(Error::FailedPrecondition(format!(
                    "the shared root key configured for this region is {target}, not {named}: \
                     configure kms.key_id = {named} on every sidecar first, so that new keys are \
                     wrapped by it too, then rotate"
                )));
            }
        }
        let (total, already) = self
            .store
            .count_shared_root_wrapped(region, &target)
            .await?;
        let mut state = RootRotationProgress {
            to: target.clone(),
            total,
            already_on_target: already,
            rewrapped: 0,
            changed_concurrently: 0,
            done: false,
        };
        tracing::info!(to = %target, total, already, "root key rotation started");
        if progress.send(state.clone()).await.is_err() {
            return Ok(state);
        }
        let mut after: Option<TenantId> = None;
        loop {
            // A page holds the keys of up to `page_size` tenants.
            let page = self
                .store
                .shared_root_wrapped(region, after.as_ref(), page_size)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.tenant.clone());
            for row in page.iter().filter(|row| row.wrapped.root_key_id != target) {
                let purpose = match row.slot {
                    RootWrappedSlot::Index => Purpose::SubjectIndex,
                    RootWrappedSlot::Version(version) => Purpose::TenantKey { version },
                };
                let ctx = WrapContext {
                    tenant: &row.tenant,
                    purpose,
                };
                let rewrapped = self
                    .root
                    .re_encrypt(ctx, &row.wrapped, &target)
                    .await
                    .map_err(|e| kms_error(&row.tenant, e))?;
                if self
                    .store
                    .replace_root_wrapped(&row.tenant, row.slot, &row.wrapped, &rewrapped)
                    .await?
                {
                    // Nothing cached changes: the caches hold the keys
                    // unwrapped, and the rewrapped ones are the same keys.
                    state.rewrapped += 1;
                } else {
                    // Shredded or rewrapped by someone else meanwhile.
                    state.changed_concurrently += 1;
                }
            }
            if progress.send(state.clone()).await.is_err() {
                tracing::warn!(
                    rewrapped = state.rewrapped,
                    "root key rotation stopped: nobody follows it; run it again to resume"
                );
                return Ok(state);
            }
        }
        state.done = true;
        tracing::info!(to = %target, rewrapped = state.rewrapped, already = state.already_on_target, "root key rotation done");
        let _ = progress.send(state.clone()).await;
        Ok(state)
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

    /// Applies a keystore event from another sidecar: evicts what it made
    /// stale.
    pub async fn apply_event(&self, event: &Event) {
        match event {
            Event::Tenant(id) => self.evict_tenant(id),
            Event::Subject(id, subject) => {
                self.sealing.invalidate(&SealingKeyId {
                    tenant: id.clone(),
                    slot: Slot::Subject(*subject),
                });
                self.watchers.subject(id, *subject);
            }
        }
    }

    /// Drops every cached tenant state and key, e.g. after missing events;
    /// they reload on demand.
    pub fn evict_all(&self) {
        self.tenants.invalidate_all();
        self.sealing.invalidate_all();
        self.index.invalidate_all();
        self.absent.invalidate_all();
        self.watchers.all();
    }

    fn evict_tenant(&self, id: &TenantId) {
        self.tenants.invalidate(id);
        self.index.invalidate(id);
        self.sealing.invalidate_if(|k| &k.tenant == id);
        self.absent.invalidate_if(|k| &k.tenant == id);
        self.watchers.tenant(id);
    }

    /// Watches the key `key_ref` names for an open stream of `tenant`: the
    /// watch wakes when an eviction may have destroyed it.
    pub fn watch(&self, tenant: &TenantId, key_ref: KeyRef) -> KeyWatch {
        let subject = match key_ref {
            KeyRef::Tenant { .. } => None,
            KeyRef::Subject { id, .. } => Some(SubjectKeyId(id)),
        };
        self.watchers.watch(tenant, subject)
    }

    /// How often an open stream checks its key again without being woken.
    pub fn recheck_every(&self) -> Duration {
        self.recheck_every
    }

    /// Resolves an open stream's key again, as a new call would (the
    /// eviction that woke it made this a keystore read): an error when the
    /// tenant or subject was shredded, the version destroyed, or the
    /// tenant's policy now refuses it.
    pub async fn recheck(&self, tenant: &TenantId, key_ref: KeyRef) -> Result<()> {
        let tenant = self.active_tenant(tenant).await?;
        self.key_for(&tenant, key_ref).await.map(drop)
    }

    /// Drops cached keys past their time to live or unused for their time
    /// to idle (see [`cache`]); run in the background by
    /// [`KeyManager::spawn_cache_sweeper`].
    pub fn sweep_caches(&self) {
        self.tenants.sweep();
        self.sealing.sweep();
        self.index.sweep();
        self.absent.sweep();
    }

    /// Sweeps the caches every `every` while the manager lives.
    pub fn spawn_cache_sweeper(self: &Arc<Self>, every: Duration) {
        self.spawn_every(every, |keys| async move { keys.sweep_caches() });
    }

    // ---- data plane ------------------------------------------------------

    /// Seals under the tenant's primary key, or the subject's key.
    pub async fn encrypt(
        &self,
        tenant: &ActiveTenant,
        subject: Option<&SubjectId>,
        context: &Context,
        plaintext: &[u8],
    ) -> Result<Sealed> {
        let (handle, key_ref) = self.encryption_key(tenant, subject).await?;
        let key = handle.get()?;
        let ciphertext = envelope::seal(&key.key, key_ref, tenant.id.as_str(), context, plaintext)
            .map_err(Error::internal)?;
        Ok(Sealed {
            ciphertext,
            key_version: key.tenant_version,
        })
    }

    /// The key new data is sealed under: the tenant's primary version, or
    /// the subject's key (made on first use). Public for benches/keys.rs.
    #[doc(hidden)]
    pub async fn encryption_key(
        &self,
        tenant: &ActiveTenant,
        subject: Option<&SubjectId>,
    ) -> Result<(KeyHandle, KeyRef)> {
        Ok(match subject {
            None => (
                tenant.primary_key(),
                KeyRef::Tenant {
                    version: tenant.primary_version,
                },
            ),
            Some(subject) => {
                let id = self.subject_key_id(tenant, subject).await?;
                (
                    self.subject_key(tenant, id, true).await?,
                    KeyRef::Subject {
                        id: id.0,
                        version: SUBJECT_KEY_VERSION,
                    },
                )
            }
        })
    }

    /// Starts a streaming envelope (EncryptStream) under the key [`encrypt`]
    /// would use: the sealer, the envelope's header, and the tenant key
    /// version.
    ///
    /// [`encrypt`]: KeyManager::encrypt
    pub async fn encrypt_stream(
        &self,
        tenant: &ActiveTenant,
        subject: Option<&SubjectId>,
        context: &Context,
    ) -> Result<(StreamSealer, Vec<u8>, u32)> {
        let (handle, key_ref) = self.encryption_key(tenant, subject).await?;
        let key = handle.get()?;
        let (sealer, header) = StreamSealer::start(&key.key, key_ref, tenant.id.as_str(), context)
            .map_err(Error::internal)?;
        Ok((sealer, header, key.tenant_version))
    }

    /// Starts opening a streaming envelope (DecryptStream) whose whole
    /// header is `header`: the opener and the tenant key version. A header
    /// that does not parse is [`Error::Undecryptable`].
    pub async fn decrypt_stream(
        &self,
        tenant: &ActiveTenant,
        header: &[u8],
        context: &Context,
    ) -> Result<(StreamOpener, u32)> {
        let parsed = stream::parse_header(header)
            .ok()
            .flatten()
            .filter(|h| h.len == header.len())
            .ok_or(Error::Undecryptable)?;
        let handle = self.key_for(tenant, parsed.key_ref).await?;
        let key = handle.get()?;
        let opener = StreamOpener::start(&key.key, header, tenant.id.as_str(), context)
            .map_err(|_| Error::Undecryptable)?;
        Ok((opener, key.tenant_version))
    }

    /// Opens a ciphertext. Every failure that tampering could cause is
    /// [`Error::Undecryptable`].
    pub async fn decrypt(
        &self,
        tenant: &ActiveTenant,
        context: &Context,
        ciphertext: &[u8],
    ) -> Result<Opened> {
        let parsed = envelope::parse(ciphertext).map_err(|_| Error::Undecryptable)?;
        let handle = self.key_for(tenant, parsed.key_ref).await?;
        let key = handle.get()?;
        let plaintext = envelope::open(&key.key, &parsed, tenant.id.as_str(), context)
            .map_err(|_| Error::Undecryptable)?;
        Ok(Opened {
            plaintext: Zeroizing::new(plaintext),
            key_version: key.tenant_version,
        })
    }

    /// Re-seals a ciphertext with a fresh salt and nonce: a tenant-key
    /// ciphertext under the primary version; a subject-key ciphertext under
    /// its subject key (so shredding the subject still erases it).
    pub async fn rewrap(
        &self,
        tenant: &ActiveTenant,
        context: &Context,
        ciphertext: &[u8],
    ) -> Result<Rewrapped> {
        let parsed = envelope::parse(ciphertext).map_err(|_| Error::Undecryptable)?;
        let old_handle = self.key_for(tenant, parsed.key_ref).await?;
        let old_key = old_handle.get()?;
        let plaintext = Zeroizing::new(
            envelope::open(&old_key.key, &parsed, tenant.id.as_str(), context)
                .map_err(|_| Error::Undecryptable)?,
        );
        let primary = tenant.primary_key();
        let (new_key, new_ref) = match parsed.key_ref {
            KeyRef::Tenant { .. } => (
                primary.get()?,
                KeyRef::Tenant {
                    version: tenant.primary_version,
                },
            ),
            subject @ KeyRef::Subject { .. } => (old_key, subject),
        };
        let ciphertext = envelope::seal(
            &new_key.key,
            new_ref,
            tenant.id.as_str(),
            context,
            &plaintext,
        )
        .map_err(Error::internal)?;
        Ok(Rewrapped {
            ciphertext,
            key_version: new_key.tenant_version,
            previous_key_version: old_key.tenant_version,
        })
    }

    // ---- key resolution --------------------------------------------------

    async fn key_for(&self, tenant: &ActiveTenant, key_ref: KeyRef) -> Result<KeyHandle> {
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

    /// A tenant key version: the primary from the tenant's entry; another
    /// from the key cache or unwrapped by the root key.
    async fn tenant_key(&self, tenant: &ActiveTenant, version: u32) -> Result<KeyHandle> {
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
    async fn subject_key_id(
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
    async fn subject_key(
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
    async fn wrap_subject_key(
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
    async fn subject_key_bytes(
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
fn check_min_version(tenant: &ActiveTenant, version: u32, what: &str) -> Result<()> {
    let min = tenant.policy().min_decrypt_version;
    if version < min {
        return Err(Error::FailedPrecondition(format!(
            "tenant {}'s policy refuses {what} {version}: its minimum decryption version is {min}",
            tenant.id
        )));
    }
    Ok(())
}

fn kms_error(tenant: &TenantId, e: KmsError) -> Error {
    match e {
        KmsError::Unavailable(detail) => Error::unavailable(Dependency::RootKey, detail),
        KmsError::Refused => Error::internal(format!(
            "the root key refused to unwrap a key of tenant {tenant}: the keystore row is corrupt or was moved"
        )),
        KmsError::Unsupported(message) => Error::FailedPrecondition(message),
        KmsError::KeyNotUsable(detail) => Error::RootKeyUnusable {
            tenant: tenant.clone(),
            detail,
        },
        KmsError::Failed(detail) => Error::internal(detail),
    }
}

/// A KMS error while placing a new tenant: a key or region the caller named
/// is the caller's to fix.
fn placement_error(field: &'static str, e: KmsError) -> Error {
    match e {
        KmsError::KeyNotUsable(reason) => Error::invalid(field, reason),
        KmsError::Unsupported(message) => Error::FailedPrecondition(message),
        KmsError::Unavailable(detail) => Error::unavailable(Dependency::RootKey, detail),
        KmsError::Refused | KmsError::Failed(_) => Error::internal(e),
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TenantNotFound(id) => Error::TenantNotFound(id),
            StoreError::TenantExists(id) => Error::TenantExists(id),
            StoreError::TenantShredded { tenant, at } => Error::TenantShredded { tenant, at },
            StoreError::Conflict => Error::internal("unexpected keystore conflict"),
            StoreError::SubjectQuota { tenant, max } => Error::ResourceExhausted {
                reason: format!(
                    "tenant {tenant} holds its quota of {max} subject keys (policy.max_subjects): \
                     a new subject needs a shred of another or a larger quota"
                ),
                retry_after: None,
            },
            StoreError::Unavailable(detail) => Error::unavailable(Dependency::Keystore, detail),
            StoreError::Corrupt(detail) => Error::internal(detail),
        }
    }
}

#[cfg(test)]
mod tests;
