//! The keystore: wrapped keys, tenants and tombstones, behind one trait.
//!
//! Backends: [`sqlite`] (embedded, the default) and [`postgres`], for many
//! sidecars sharing one keystore, both the one SQL keystore of [`sql`]
//! behind the same trait. Every method that changes more than one row does
//! so in one transaction; conditional writes make concurrent rotations and
//! shreds safe. This module is the backend-neutral seam: the trait and its
//! records, no SQL.

mod event;
pub mod metered;
pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::fmt;

use async_trait::async_trait;
use thiserror::Error;

use crate::{
    ids::{SubjectKeyId, TenantId},
    kms::WrappedKey,
};

/// Kept here too: the keystore's records carry it.
pub use crate::time::UnixMillis;
pub use event::Event;

/// Which root key wraps a tenant's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The configured shared root key of the tenant's region.
    Shared,
    /// A KMS key keywarden created for this tenant alone; shredding the
    /// tenant schedules its deletion.
    Dedicated,
    /// A KMS key the tenant supplied (bring your own key).
    Customer,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Shared => "shared",
            Tier::Dedicated => "dedicated",
            Tier::Customer => "customer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "shared" => Some(Tier::Shared),
            "dedicated" => Some(Tier::Dedicated),
            "customer" => Some(Tier::Customer),
            _ => None,
        }
    }
}

/// Where a tenant's keys are wrapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub tier: Tier,
    /// `None`: the default region.
    pub region: Option<String>,
    /// The root key of a dedicated or customer tenant; `None` for shared
    /// tenants, whose root key is the configured one of their region.
    pub root_key: Option<String>,
}

impl Placement {
    pub fn shared() -> Self {
        Self {
            tier: Tier::Shared,
            region: None,
            root_key: None,
        }
    }
}

/// What a tenant's operators chose for it; stored as JSON (`{}`: every field
/// at its default, 0). The keystore only stores it: the key manager applies
/// it. A stored policy that does not parse, an unknown field included (so a
/// policy is never silently narrowed), makes the reads that answer it
/// ([`Keystore::tenant`], [`Keystore::list_tenants`]) fail with
/// [`StoreError::Corrupt`]; writes never read it, so a shred or
/// [`Keystore::set_policy`] still works on that tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantPolicy {
    pub rotation_period_seconds: u64,
    pub retention_seconds: u64,
    pub min_decrypt_version: u32,
    pub max_items_per_second: u32,
    pub burst: u32,
    pub max_plaintext_bytes: u64,
    /// How subject ids are told apart; fixed at creation.
    pub subject_ids: crate::ids::SubjectIds,
    /// Most subject keys the tenant may hold at once (0: no quota). Checked
    /// by the keystore when it creates one ([`Keystore::insert_subject_key`]).
    pub max_subjects: u64,
}

impl TenantPolicy {
    /// The policy as the keystore stores it.
    pub fn to_json(&self) -> Result<String, StoreError> {
        serde_json::to_string(self)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode a tenant policy: {e}")))
    }

    /// A stored policy: a JSON object. Anything else is
    /// [`StoreError::Corrupt`] (serde alone would also take an array, by
    /// field position).
    pub fn from_json(json: &str) -> Result<Self, StoreError> {
        let corrupt = |e: serde_json::Error| {
            StoreError::Corrupt(format!("invalid tenant policy in keystore: {e}"))
        };
        if !json.trim_start().starts_with('{') {
            return Err(StoreError::Corrupt(
                "invalid tenant policy in keystore: not a JSON object".into(),
            ));
        }
        serde_json::from_str(json).map_err(corrupt)
    }
}

/// A tenant as the keystore holds it.
#[derive(Clone, Debug)]
pub struct TenantRecord {
    pub id: TenantId,
    pub created_at: UnixMillis,
    pub placement: Placement,
    /// Kept (not cleared) when the tenant is shredded.
    pub policy: TenantPolicy,
    pub state: TenantState,
}

/// A tenant and, while it is active, its primary key version wrapped by the
/// root key: what a data-plane call needs of the keystore, in one read.
#[derive(Clone, Debug)]
pub struct TenantWithPrimary {
    pub record: TenantRecord,
    /// `None` once shredded (or, in a corrupt keystore, if the primary
    /// version's row is missing).
    pub primary: Option<WrappedKey>,
}

#[derive(Clone, Debug)]
pub enum TenantState {
    Active {
        /// The version new ciphertexts are made under.
        primary_version: u32,
        /// The subject-index key, wrapped by the root key.
        index_key: WrappedKey,
    },
    Shredded {
        at: UnixMillis,
        /// When KMS deletes a dedicated root key, once that is scheduled.
        root_key_deletion: Option<UnixMillis>,
    },
}

/// One tenant key version, wrapped by the root key.
#[derive(Clone, Debug)]
pub struct TenantKeyRecord {
    pub version: u32,
    pub wrapped: WrappedKey,
    pub created_at: UnixMillis,
}

/// What CreateTenant writes.
#[derive(Debug)]
pub struct NewTenant {
    pub id: TenantId,
    pub created_at: UnixMillis,
    pub placement: Placement,
    pub policy: TenantPolicy,
    /// Version 1 of the tenant key.
    pub first_key: WrappedKey,
    pub index_key: WrappedKey,
}

/// A subject key, wrapped by a tenant key version (in the subject-key
/// domain: [`crate::envelope::wrap`]).
#[derive(Clone)]
pub struct SubjectKeyRecord {
    pub wrapped: Vec<u8>,
    pub tenant_version: u32,
}

impl fmt::Debug for SubjectKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubjectKeyRecord")
            .field("wrapped_len", &self.wrapped.len())
            .field("tenant_version", &self.tenant_version)
            .finish()
    }
}

/// One version of a tenant's blind-index key.
#[derive(Clone)]
pub struct BlindIndexKeyRecord {
    pub version: u32,
    pub created_at: UnixMillis,
    pub state: BlindIndexKeyState,
}

/// A blind-index key version: live, wrapped by a tenant key version in the
/// blind-index-key domain ([`crate::envelope::wrap`]), or retired (no key
/// material left; the version is never made again).
#[derive(Clone)]
pub enum BlindIndexKeyState {
    Live {
        wrapped: Vec<u8>,
        tenant_version: u32,
    },
    Retired {
        at: UnixMillis,
    },
}

impl fmt::Debug for BlindIndexKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("BlindIndexKeyRecord");
        d.field("version", &self.version)
            .field("created_at", &self.created_at);
        match &self.state {
            BlindIndexKeyState::Live {
                wrapped,
                tenant_version,
            } => d
                .field("wrapped_len", &wrapped.len())
                .field("tenant_version", tenant_version),
            BlindIndexKeyState::Retired { at } => d.field("retired_at", at),
        };
        d.finish()
    }
}

/// What the keystore knows of one subject.
#[derive(Clone, Debug)]
pub enum SubjectLookup {
    Key(SubjectKeyRecord),
    Shredded { at: UnixMillis },
    Absent,
}

/// Which of a tenant's keys the root key wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RootWrappedSlot {
    /// The subject-index key (sorts first).
    Index,
    /// A tenant key version.
    Version(u32),
}

/// One key wrapped directly by a root key.
#[derive(Clone, Debug)]
pub struct RootWrapped {
    pub tenant: TenantId,
    pub slot: RootWrappedSlot,
    pub wrapped: WrappedKey,
}

/// What a tenant shred did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantShred {
    /// When it was shredded: now, or the first time.
    pub at: UnixMillis,
    pub already_shredded: bool,
    pub destroyed_key_versions: u32,
    pub destroyed_subject_keys: u64,
}

/// What a subject shred did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectShred {
    pub at: UnixMillis,
    pub already_shredded: bool,
    pub key_destroyed: bool,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("tenant {0} does not exist")]
    TenantNotFound(TenantId),
    #[error("tenant {0} already exists")]
    TenantExists(TenantId),
    #[error("tenant {tenant} was shredded at {at}")]
    TenantShredded { tenant: TenantId, at: UnixMillis },
    /// A conditional write lost a race (e.g. two rotations at once), or a
    /// destruction was refused because the version is the primary or still
    /// wraps subject keys (see [`Keystore::destroy_tenant_key`]): the state
    /// the caller expected does not hold (now).
    #[error("the tenant changed concurrently, or is not in the state the change requires")]
    Conflict,
    /// A new subject key would pass the tenant's `max_subjects`.
    #[error("tenant {tenant} holds its quota of {max} subject keys")]
    SubjectQuota { tenant: TenantId, max: u64 },
    /// The database could not be reached. For the log.
    #[error("keystore unavailable: {0}")]
    Unavailable(String),
    /// The database answered something impossible. For the log.
    #[error("keystore inconsistent: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait Keystore: Send + Sync + 'static {
    /// Answers whether the keystore can be queried now: one trivial query
    /// (`SELECT 1`) on the pool. Readiness ([`crate::server::ready`]) calls
    /// it every few seconds; it reads no table and holds no lock.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Creates a tenant with key version 1. Refused when the id exists or was
    /// shredded.
    async fn create_tenant(&self, tenant: NewTenant) -> Result<(), StoreError>;

    /// The tenant, active or tombstoned; `None` if it never existed.
    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError>;

    /// The tenant with its primary key version, in one read; `None` if it
    /// never existed.
    async fn tenant_with_primary(
        &self,
        id: &TenantId,
    ) -> Result<Option<TenantWithPrimary>, StoreError>;

    /// Tenants in id order, after `after` (exclusive), at most `limit`.
    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<TenantRecord>, StoreError>;

    /// One tenant key version; `None` if it does not exist (never made, or
    /// destroyed).
    async fn tenant_key(
        &self,
        id: &TenantId,
        version: u32,
    ) -> Result<Option<TenantKeyRecord>, StoreError>;

    /// Every existing tenant key version, oldest first.
    async fn tenant_keys(&self, id: &TenantId) -> Result<Vec<TenantKeyRecord>, StoreError>;

    /// Adds `key` as version `expected_primary + 1` and makes it primary, if
    /// and only if the primary is still `expected_primary`; else
    /// [`StoreError::Conflict`].
    async fn add_tenant_key(
        &self,
        id: &TenantId,
        expected_primary: u32,
        key: TenantKeyRecord,
    ) -> Result<(), StoreError>;

    /// The subject's key, tombstone, or nothing.
    async fn subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
    ) -> Result<SubjectLookup, StoreError>;

    /// Stores a new subject key unless one exists or the subject was shredded;
    /// answers what the keystore holds afterwards (so the loser of a race for
    /// a new subject uses the winner's key). A new key is refused with
    /// [`StoreError::SubjectQuota`] when the tenant already holds its stored
    /// policy's `max_subjects` keys, counted in the same transaction.
    async fn insert_subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
        key: SubjectKeyRecord,
        created_at: UnixMillis,
    ) -> Result<SubjectLookup, StoreError>;

    /// Deletes every key of the tenant and leaves its tombstone, in one
    /// transaction. Shredding a shredded tenant changes nothing and says when
    /// the first shred was.
    async fn shred_tenant(&self, id: &TenantId, at: UnixMillis) -> Result<TenantShred, StoreError>;

    /// The keys wrapped directly by a root key (the subject-index key, then
    /// the versions) of the next `limit` active shared-tier tenants in
    /// `region` after `after` (exclusive), in (tenant, slot) order. Pages by
    /// tenant, through the primary key's index.
    async fn shared_root_wrapped(
        &self,
        region: Option<&str>,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<RootWrapped>, StoreError>;

    /// How many keys [`Keystore::shared_root_wrapped`] would list, and how
    /// many of them `root_key_id` wraps already.
    async fn count_shared_root_wrapped(
        &self,
        region: Option<&str>,
        root_key_id: &str,
    ) -> Result<(u64, u64), StoreError>;

    /// Replaces one wrapped key if it is still `old` (compare and swap);
    /// answers whether it did. The key is never absent: the old wrapping
    /// stays until the new one is written, in one statement.
    async fn replace_root_wrapped(
        &self,
        tenant: &TenantId,
        slot: RootWrappedSlot,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> Result<bool, StoreError>;

    /// Checks the keystore's invariants and answers every violation found, in
    /// words (empty when consistent): an active tenant has its primary version
    /// and its subject-index key; its versions, live and destroyed together,
    /// run 1..=primary without gaps or duplicates, none both live and
    /// destroyed, and the primary is live; a shredded tenant has no key left;
    /// a subject key belongs to an active tenant, is wrapped by a live
    /// version, and has no tombstone. Tests call it after every fault;
    /// operators may too.
    async fn invariant_violations(&self) -> Result<Vec<String>, StoreError>;

    /// Records when KMS deletes a shredded tenant's dedicated root key.
    async fn set_root_key_deletion(&self, id: &TenantId, at: UnixMillis) -> Result<(), StoreError>;

    /// Deletes the subject's key (if any) and leaves a tombstone.
    async fn shred_subject(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
        at: UnixMillis,
    ) -> Result<SubjectShred, StoreError>;

    /// Replaces the tenant's policy, also one that did not parse.
    /// [`StoreError::TenantNotFound`] / [`StoreError::TenantShredded`],
    /// changing nothing.
    async fn set_policy(&self, id: &TenantId, policy: &TenantPolicy) -> Result<(), StoreError>;

    /// Key versions destroyed by retention, with when, oldest (lowest
    /// version) first. Empty for an unknown tenant. A shredded tenant keeps
    /// the list it had (it holds no key material).
    async fn destroyed_versions(&self, id: &TenantId)
    -> Result<Vec<(u32, UnixMillis)>, StoreError>;

    /// Up to `limit` subject keys still wrapped by tenant key `version`, in
    /// subject key id order. Empty for an unknown or shredded tenant. Meant
    /// to be drained: each key moved by [`Keystore::replace_subject_wrap`]
    /// leaves the answer.
    async fn subject_keys_wrapped_by(
        &self,
        id: &TenantId,
        version: u32,
        limit: u32,
    ) -> Result<Vec<(SubjectKeyId, SubjectKeyRecord)>, StoreError>;

    /// Up to `limit` subject keys of any tenant still in the legacy wrapped
    /// form (a tenant-key envelope, whose second byte, the suite, is 0x01;
    /// the current form's is 0x03: see docs/FORMAT.md), in (tenant id,
    /// subject key id) order, after `after` when given. Drives the upgrade
    /// that rewraps them ([`crate::keys::KeyManager::upgrade_subject_keys`]).
    async fn legacy_subject_keys(
        &self,
        after: Option<(&TenantId, &SubjectKeyId)>,
        limit: u32,
    ) -> Result<Vec<(TenantId, SubjectKeyId, SubjectKeyRecord)>, StoreError>;

    /// Compare and swap: replaces a subject key's wrap with `new` only if it
    /// is still wrapped by `expected_version`; `Ok(false)` when it changed or
    /// is gone (the subject or the tenant shredded, or an unknown tenant).
    /// `new` must be wrapped by a live version of the tenant, else
    /// [`StoreError::Corrupt`] and nothing changes (as for
    /// [`Keystore::insert_subject_key`]). The subject key itself is the same
    /// before and after, so no event is sent: caches stay valid.
    async fn replace_subject_wrap(
        &self,
        id: &TenantId,
        subject: &SubjectKeyId,
        expected_version: u32,
        new: SubjectKeyRecord,
    ) -> Result<bool, StoreError>;

    /// Destroys tenant key `version` for retention: deletes its key row and
    /// records it in [`Keystore::destroyed_versions`], in one transaction.
    /// `Ok(true)` when destroyed now, `Ok(false)` when it already was.
    /// Refused with [`StoreError::Conflict`], changing nothing, when `version`
    /// is the primary or any subject key or blind-index key is still wrapped
    /// by it. A version
    /// that never existed (0, or above the primary) is [`StoreError::Corrupt`],
    /// as for [`Keystore::add_tenant_key`]. [`StoreError::TenantNotFound`] /
    /// [`StoreError::TenantShredded`] as usual.
    async fn destroy_tenant_key(
        &self,
        id: &TenantId,
        version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// Every version of the tenant's blind-index key, live and retired,
    /// oldest first. Empty for an unknown or shredded tenant, and for a
    /// tenant that never used one.
    async fn blind_index_keys(&self, id: &TenantId)
    -> Result<Vec<BlindIndexKeyRecord>, StoreError>;

    /// Adds blind-index key `version`, wrapped by tenant key
    /// `tenant_version`, if and only if it follows the newest version (1 for
    /// the first): `Ok(true)` when added, `Ok(false)` when that version
    /// exists already (another call won the race: read it). A version past
    /// the next one is [`StoreError::Corrupt`], as is a wrapping version that
    /// is not live. [`StoreError::TenantNotFound`] /
    /// [`StoreError::TenantShredded`] as usual.
    async fn add_blind_index_key(
        &self,
        id: &TenantId,
        version: u32,
        wrapped: &[u8],
        tenant_version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// Retires blind-index key `version`: deletes its key material, keeps its
    /// number. `Ok(true)` when retired now, `Ok(false)` when it already was.
    /// Refused with [`StoreError::Conflict`] when it is the newest version
    /// (the primary); a version that does not exist is
    /// [`StoreError::Corrupt`].
    async fn retire_blind_index_key(
        &self,
        id: &TenantId,
        version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// The live blind-index keys wrapped by tenant key `tenant_version`, as
    /// (index key version, wrapped), in version order.
    async fn blind_index_keys_wrapped_by(
        &self,
        id: &TenantId,
        tenant_version: u32,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError>;

    /// Compare and swap, as [`Keystore::replace_subject_wrap`]: replaces a
    /// live blind-index key's wrap only if it is still wrapped by
    /// `expected_version`; `new_version` must be live, else
    /// [`StoreError::Corrupt`].
    async fn replace_blind_index_wrap(
        &self,
        id: &TenantId,
        version: u32,
        expected_version: u32,
        wrapped: &[u8],
        new_version: u32,
    ) -> Result<bool, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_through_json_and_refuse_what_they_do_not_know() {
        assert_eq!(
            TenantPolicy::from_json("{}").unwrap(),
            TenantPolicy::default()
        );
        let policy = TenantPolicy {
            rotation_period_seconds: 86_400,
            retention_seconds: u64::MAX,
            min_decrypt_version: 3,
            max_items_per_second: u32::MAX,
            burst: 10,
            max_plaintext_bytes: 1 << 20,
            subject_ids: crate::ids::SubjectIds::NfcCasefold,
            max_subjects: u64::MAX,
        };
        assert_eq!(
            TenantPolicy::from_json(&policy.to_json().unwrap()).unwrap(),
            policy
        );
        assert!(
            policy
                .to_json()
                .unwrap()
                .contains(r#""subject_ids":"nfc-casefold""#)
        );
        // Policies stored before the rule existed are exact.
        assert_eq!(
            TenantPolicy::from_json(r#"{"burst": 1}"#)
                .unwrap()
                .subject_ids,
            crate::ids::SubjectIds::Exact
        );
        // Missing fields are 0.
        assert_eq!(
            TenantPolicy::from_json(r#"{"burst": 5}"#).unwrap(),
            TenantPolicy {
                burst: 5,
                ..TenantPolicy::default()
            }
        );
        for bad in [
            "",
            "null",
            "[]",
            "[0, 0, 0, 0, 5, 0]",
            "not json",
            r#"{"burst": -1}"#,
            r#"{"burst": 4294967296}"#,
            r#"{"burst": "5"}"#,
            r#"{"unknown_setting": 1}"#,
            r#"{"burst": 1} trailing"#,
            r#"{"subject_ids": "lowercase"}"#,
        ] {
            assert!(
                matches!(TenantPolicy::from_json(bad), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }
}
