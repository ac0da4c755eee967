//! A keystore that records every operation it passes to another:
//! `keywarden_keystore_queries_total{operation,outcome}` and
//! `keywarden_keystore_query_duration_seconds{operation}`, one per trait
//! method (the operation is the method's name, e.g. `tenant_with_primary`,
//! `subject_key`, `insert_subject_key`).
//!
//! The outcome is "error" when the keystore could not answer
//! ([`StoreError::Unavailable`]) or found itself inconsistent
//! ([`StoreError::Corrupt`]); an answer that refuses (a conflict, an unknown
//! or shredded tenant, a quota) is "ok": the keystore worked.

use std::sync::Arc;

use async_trait::async_trait;

use super::*;
use crate::observe::metrics::{KEYSTORE_QUERIES, KEYSTORE_QUERY_SECONDS, timed};

/// The operation's outcome label.
fn outcome<T>(result: &Result<T, StoreError>) -> &'static str {
    match result {
        Err(StoreError::Unavailable(_) | StoreError::Corrupt(_)) => "error",
        _ => "ok",
    }
}

/// Times one call of the inner keystore.
macro_rules! metered {
    ($self:ident, $op:literal, $method:ident($($arg:expr),*)) => {{
        let timer = timed(KEYSTORE_QUERIES, KEYSTORE_QUERY_SECONDS, $op);
        let result = $self.inner.$method($($arg),*).await;
        timer.finish_with(outcome(&result));
        result
    }};
}

/// [`Keystore`] around another, measured.
pub struct MeteredKeystore {
    inner: Arc<dyn Keystore>,
}

impl MeteredKeystore {
    pub fn new(inner: Arc<dyn Keystore>) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl Keystore for MeteredKeystore {
    async fn ping(&self) -> Result<(), StoreError> {
        metered!(self, "ping", ping())
    }

    async fn create_tenant(&self, tenant: NewTenant) -> Result<(), StoreError> {
        metered!(self, "create_tenant", create_tenant(tenant))
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        metered!(self, "tenant", tenant(id))
    }

    async fn tenant_with_primary(
        &self,
        id: &TenantId,
    ) -> Result<Option<TenantWithPrimary>, StoreError> {
        metered!(self, "tenant_with_primary", tenant_with_primary(id))
    }

    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        metered!(self, "list_tenants", list_tenants(after, limit))
    }

    async fn tenant_key(
        &self,
        id: &TenantId,
        version: u32,
    ) -> Result<Option<TenantKeyRecord>, StoreError> {
        metered!(self, "tenant_key", tenant_key(id, version))
    }

    async fn tenant_keys(&self, id: &TenantId) -> Result<Vec<TenantKeyRecord>, StoreError> {
        metered!(self, "tenant_keys", tenant_keys(id))
    }

    async fn add_tenant_key(
        &self,
        id: &TenantId,
        expected_primary: u32,
        key: TenantKeyRecord,
    ) -> Result<(), StoreError> {
        metered!(
            self,
            "add_tenant_key",
            add_tenant_key(id, expected_primary, key)
        )
    }

    async fn subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
    ) -> Result<SubjectLookup, StoreError> {
        metered!(self, "subject_key", subject_key(id, subject))
    }

    async fn insert_subject_key(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
        key: SubjectKeyRecord,
        created_at: UnixMillis,
    ) -> Result<SubjectLookup, StoreError> {
        metered!(
            self,
            "insert_subject_key",
            insert_subject_key(id, subject, key, created_at)
        )
    }

    async fn shred_tenant(&self, id: &TenantId, at: UnixMillis) -> Result<TenantShred, StoreError> {
        metered!(self, "shred_tenant", shred_tenant(id, at))
    }

    async fn shared_root_wrapped(
        &self,
        region: Option<&str>,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<RootWrapped>, StoreError> {
        metered!(
            self,
            "shared_root_wrapped",
            shared_root_wrapped(region, after, limit)
        )
    }

    async fn count_shared_root_wrapped(
        &self,
        region: Option<&str>,
        root_key_id: &str,
    ) -> Result<(u64, u64), StoreError> {
        metered!(
            self,
            "count_shared_root_wrapped",
            count_shared_root_wrapped(region, root_key_id)
        )
    }

    async fn replace_root_wrapped(
        &self,
        tenant: &TenantId,
        slot: RootWrappedSlot,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> Result<bool, StoreError> {
        metered!(
            self,
            "replace_root_wrapped",
            replace_root_wrapped(tenant, slot, old, new)
        )
    }

    async fn invariant_violations(&self) -> Result<Vec<String>, StoreError> {
        metered!(self, "invariant_violations", invariant_violations())
    }

    async fn set_root_key_deletion(&self, id: &TenantId, at: UnixMillis) -> Result<(), StoreError> {
        metered!(self, "set_root_key_deletion", set_root_key_deletion(id, at))
    }

    async fn shred_subject(
        &self,
        id: &TenantId,
        subject: SubjectKeyId,
        at: UnixMillis,
    ) -> Result<SubjectShred, StoreError> {
        metered!(self, "shred_subject", shred_subject(id, subject, at))
    }

    async fn set_policy(&self, id: &TenantId, policy: &TenantPolicy) -> Result<(), StoreError> {
        metered!(self, "set_policy", set_policy(id, policy))
    }

    async fn destroyed_versions(
        &self,
        id: &TenantId,
    ) -> Result<Vec<(u32, UnixMillis)>, StoreError> {
        metered!(self, "destroyed_versions", destroyed_versions(id))
    }

    async fn subject_keys_wrapped_by(
        &self,
        id: &TenantId,
        version: u32,
        limit: u32,
    ) -> Result<Vec<(SubjectKeyId, SubjectKeyRecord)>, StoreError> {
        metered!(
            self,
            "subject_keys_wrapped_by",
            subject_keys_wrapped_by(id, version, limit)
        )
    }

    async fn legacy_subject_keys(
        &self,
        after: Option<(&TenantId, &SubjectKeyId)>,
        limit: u32,
    ) -> Result<Vec<(TenantId, SubjectKeyId, SubjectKeyRecord)>, StoreError> {
        metered!(
            self,
            "legacy_subject_keys",
            legacy_subject_keys(after, limit)
        )
    }

    async fn replace_subject_wrap(
        &self,
        id: &TenantId,
        subject: &SubjectKeyId,
        expected_version: u32,
        new: SubjectKeyRecord,
    ) -> Result<bool, StoreError> {
        metered!(
            self,
            "replace_subject_wrap",
            replace_subject_wrap(id, subject, expected_version, new)
        )
    }

    async fn destroy_tenant_key(
        &self,
        id: &TenantId,
        version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError> {
        metered!(
            self,
            "destroy_tenant_key",
            destroy_tenant_key(id, version, at)
        )
    }

    async fn blind_index_keys(
        &self,
        id: &TenantId,
    ) -> Result<Vec<BlindIndexKeyRecord>, StoreError> {
        metered!(self, "blind_index_keys", blind_index_keys(id))
    }

    async fn add_blind_index_key(
        &self,
        id: &TenantId,
        version: u32,
        wrapped: &[u8],
        tenant_version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError> {
        metered!(
            self,
            "add_blind_index_key",
            add_blind_index_key(id, version, wrapped, tenant_version, at)
        )
    }

    async fn retire_blind_index_key(
        &self,
        id: &TenantId,
        version: u32,
        at: UnixMillis,
    ) -> Result<bool, StoreError> {
        metered!(
            self,
            "retire_blind_index_key",
            retire_blind_index_key(id, version, at)
        )
    }

    async fn blind_index_keys_wrapped_by(
        &self,
        id: &TenantId,
        tenant_version: u32,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        metered!(
            self,
            "blind_index_keys_wrapped_by",
            blind_index_keys_wrapped_by(id, tenant_version)
        )
    }

    async fn replace_blind_index_wrap(
        &self,
        id: &TenantId,
        version: u32,
        expected_version: u32,
        wrapped: &[u8],
        new_version: u32,
    ) -> Result<bool, StoreError> {
        metered!(
            self,
            "replace_blind_index_wrap",
            replace_blind_index_wrap(id, version, expected_version, wrapped, new_version)
        )
    }
}
