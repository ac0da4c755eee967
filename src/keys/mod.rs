//! The key hierarchy: the one place that knows how keys relate.
//!
//! ```text
//! root key (kms)                      never leaves the provider
//!  +- tenant key vN                   wrapped by the root key; seals the tenant's data
//!  |   +- subject keys                wrapped by a tenant key version; one per data subject
//!  |   +- blind-index keys vN         wrapped by a tenant key version; key the tenant's
//!  |                                  blind-index tokens
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
//!
//! Where each part lives:
//!
//! | file          | what                                                                  |
//! |---------------|-----------------------------------------------------------------------|
//! | `mod.rs`      | the types, [`KeyManager`] and its caches                              |
//! | `tenants.rs`  | creating, reading, rotating and shredding tenants; shredding subjects |
//! | `resolve.rs`  | the tenant and the key a call needs, cache first; subject keys        |
//! | `blind.rs`    | blind-index keys: made on first use, rotated, retired; tokens         |
//! | `data.rs`     | the data plane: encrypt, decrypt, rewrap, streams                     |
//! | `datakeys.rs` | data keys for client-side encryption: generate, decrypt, rewrap       |
//! | `root.rs`     | moving keys onto a new shared root key                                |
//! | `schedule.rs` | tenant policies and the scheduler that applies them                   |
//! | `legacy.rs`   | subject keys in the legacy form, and their upgrade                    |
//! | `evict.rs`    | evictions on changes and events; the cache sweeper                    |
//! | `watch.rs`    | open streams' watches on their keys                                   |
//! | `cache.rs`    | the cache they are built on: bounds, expiry, one load per miss        |
//! | `errors.rs`   | keystore and KMS errors as the crate's [`Error`]                      |

mod blind;
pub mod cache;
mod data;
mod datakeys;
mod errors;
mod evict;
mod legacy;
mod resolve;
mod root;
mod schedule;
mod tenants;
mod watch;

use std::{sync::Arc, time::Duration};

use zeroize::Zeroizing;

use crate::{
    envelope::{EnvelopeKey, Provider},
    error::{Error, Result},
    ids::{SubjectIds, SubjectKeyId, TenantId},
    kms::RootKeyProvider,
    secret::Key256,
    store::{
        Keystore, Placement, TenantKeyRecord, TenantPolicy, TenantRecord, TenantShred, UnixMillis,
    },
};
pub use blind::{BlindIndexKeyInfo, BlindIndexKeys, BlindIndexed, IndexVersions};
use cache::{CacheLimits, Cached, TtlCache};
pub use data::check_key_version;
pub use datakeys::{GeneratedDataKey, OpenedDataKey, RewrappedDataKey};
pub use legacy::{SubjectKeyUpgrade, legacy_wrap};
pub use watch::KeyWatch;

/// Subject keys have one version today; the format has room for more.
pub const SUBJECT_KEY_VERSION: u32 = 1;

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

/// A decrypted ciphertext: its plaintext, and the tenant key version that
/// protected it.
pub struct Decrypted {
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

impl std::fmt::Debug for Decrypted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decrypted")
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
    /// Unwrapped blind-index keys, every live version of a tenant in one
    /// entry (`blind.rs`).
    blind: TtlCache<TenantId, BlindIndexKeys>,
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
            tenants: TtlCache::new("tenant", limits),
            sealing: TtlCache::new("sealing", limits),
            index: TtlCache::new("subject_index", limits),
            blind: TtlCache::new("blind_index", limits),
            absent: TtlCache::new("absent", limits),
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
}

#[cfg(test)]
mod tests;
