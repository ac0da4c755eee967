//! Tenant policies in action: changing them, and the scheduler that rotates
//! tenant keys and destroys old versions as the policies say.
//!
//! Every sidecar runs the scheduler; they may run it at the same moment.
//! Rotation is conditional on the primary version (two sidecars make one new
//! version, the loser sees ABORTED and moves on), and destroying a version is
//! idempotent, so doing the work twice changes nothing.

use std::{sync::Arc, time::Duration};

use super::{ActiveTenant, KeyManager, TenantInfo};
use crate::{
    error::{Error, Result},
    ids::TenantId,
    store::{StoreError, TenantPolicy, TenantRecord, TenantState, UnixMillis},
};

/// Tenants read per keystore query by the scheduler.
const PAGE: u32 = 500;
/// Subject keys moved per keystore query before a version is destroyed.
const SUBJECT_PAGE: u32 = 200;

/// What one scheduler pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyPass {
    pub tenants_checked: u64,
    pub rotated: u64,
    pub destroyed_versions: u64,
    pub moved_subject_keys: u64,
    /// Tenants whose policy could not be applied now (logged; retried on the
    /// next pass).
    pub failed: u64,
    /// What changed, for the audit log: (tenant, action, detail).
    pub changes: Vec<(TenantId, &'static str, String)>,
}

fn seconds_after(at: UnixMillis, seconds: u64) -> UnixMillis {
    let millis = i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    UnixMillis(at.0.saturating_add(millis))
}

impl KeyManager {
    /// Replaces a tenant's policy; other sidecars learn of it through the
    /// keystore's change events, this one at once.
    pub async fn update_policy(&self, id: &TenantId, policy: &TenantPolicy) -> Result<TenantInfo> {
        let result = self.store.set_policy(id, policy).await;
        self.tenants.invalidate(id);
        // Open streams check their key against the new policy.
        self.watchers.tenant(id);
        result?;
        tracing::info!(tenant = %id, ?policy, "tenant policy updated");
        self.tenant_info(id).await
    }

    /// One pass over every tenant with a rotation period or a retention.
    pub async fn apply_policies(&self) -> Result<PolicyPass> {
        let mut pass = PolicyPass::default();
        let mut after: Option<TenantId> = None;
        loop {
            let page = self.store.list_tenants(after.as_ref(), PAGE).await?;
            for record in &page {
                let policy = &record.policy;
                if !matches!(record.state, TenantState::Active { .. })
                    || (policy.rotation_period_seconds == 0 && policy.retention_seconds == 0)
                {
                    continue;
                }
                pass.tenants_checked += 1;
                if let Err(e) = self.apply_policy(record, &mut pass).await {
                    pass.failed += 1;
                    tracing::warn!(tenant = %record.id, error = %e, "tenant policy not applied this pass");
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => after = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok(pass)
    }

    async fn apply_policy(&self, record: &TenantRecord, pass: &mut PolicyPass) -> Result<()> {
        let id = &record.id;
        let policy = &record.policy;
        let now = self.now();
        let mut info = self.tenant_info(id).await?;
        let primary = |info: &TenantInfo| match info.record.state {
            TenantState::Active {
                primary_version, ..
            } => Some(primary_version),
            TenantState::Shredded { .. } => None,
        };
        let Some(mut current) = primary(&info) else {
            return Ok(());
        };
        if policy.rotation_period_seconds > 0 {
            let due = info
                .versions
                .iter()
                .find(|v| v.version == current)
                .is_some_and(|v| {
                    seconds_after(v.created_at, policy.rotation_period_seconds) <= now
                });
            if due {
                match self.rotate(id).await {
                    Ok(rotated) => {
                        info = rotated;
                        pass.rotated += 1;
                        if let Some(version) = primary(&info) {
                            pass.changes.push((
                                id.clone(),
                                "AutomaticRotation",
                                format!("version {version} is primary (rotation period)"),
                            ));
                        }
                        tracing::info!(tenant = %id, "rotated by the tenant's rotation period");
                    }
                    // Another sidecar rotated it first.
                    Err(Error::Aborted(_)) => info = self.tenant_info(id).await?,
                    Err(e) => return Err(e),
                }
                current = primary(&info).unwrap_or(current);
            }
        }
        if policy.retention_seconds > 0 {
            let expired: Vec<u32> = info
                .versions
                .iter()
                .filter(|v| {
                    v.version != current
                        && seconds_after(v.created_at, policy.retention_seconds) <= now
                })
                .map(|v| v.version)
                .collect();
            for version in expired {
                let moved = self.retire_version(id, version).await?;
                pass.moved_subject_keys += moved;
                pass.destroyed_versions += 1;
                pass.changes.push((
                    id.clone(),
                    "RetentionDestroy",
                    format!(
                        "version {version} destroyed; {moved} subject keys moved to the primary"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Moves every subject key and blind-index key sealed by `version` to
    /// the primary version, then destroys `version`. Returns how many subject keys moved.
    async fn retire_version(&self, id: &TenantId, version: u32) -> Result<u64> {
        // A fresh view: the primary may have just changed.
        self.tenants.invalidate(id);
        let tenant = self.active_tenant(id).await?;
        let mut moved = 0;
        let mut stalled = 0;
        loop {
            let batch = self
                .store
                .subject_keys_wrapped_by(id, version, SUBJECT_PAGE)
                .await?;
            if batch.is_empty() {
                break;
            }
            let mut progress = false;
            for (subject, record) in batch {
                if self
                    .move_subject_key(&tenant, subject, version, &record)
                    .await?
                {
                    moved += 1;
                    progress = true;
                }
            }
            if !progress {
                stalled += 1;
                if stalled >= 3 {
                    return Err(Error::Aborted(id.clone()));
                }
            }
        }
        let moved_index_keys = self.move_blind_index_keys(&tenant, version).await?;
        let destroyed = self.store.destroy_tenant_key(id, version, self.now()).await;
        // Drop the destroyed version's key (and moved subject keys' stale
        // versions) from this sidecar's cache.
        self.evict_tenant(id);
        match destroyed {
            Ok(fresh) => {
                if fresh {
                    tracing::info!(tenant = %id, version, moved_subject_keys = moved, moved_index_keys, "key version destroyed by the tenant's retention");
                }
                Ok(moved)
            }
            // A subject key was sealed under it meanwhile (by a sidecar that
            // had not yet seen a rotation): the next pass moves it.
            Err(StoreError::Conflict) => Err(Error::Aborted(id.clone())),
            Err(e) => Err(e.into()),
        }
    }

    async fn move_subject_key(
        &self,
        tenant: &ActiveTenant,
        subject: crate::ids::SubjectKeyId,
        version: u32,
        record: &crate::store::SubjectKeyRecord,
    ) -> Result<bool> {
        let key = self.subject_key_bytes(tenant, subject, record).await?;
        let rewrapped = self.wrap_subject_key(tenant, subject, &key).await?;
        Ok(self
            .store
            .replace_subject_wrap(&tenant.id, &subject, version, rewrapped)
            .await?)
    }

    /// Runs [`KeyManager::apply_policies`] every `every`, for as long as the
    /// manager lives, handing each pass's [`PolicyPass::changes`] to `record`
    /// (the server writes them to the audit log) before the next pass.
    pub fn spawn_policy_scheduler<R, Fut>(self: &Arc<Self>, every: Duration, record: R)
    where
        R: Fn(Vec<(TenantId, &'static str, String)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let record = Arc::new(record);
        self.spawn_every(every, move |keys| {
            let record = record.clone();
            async move {
                match keys.apply_policies().await {
                    Ok(pass) if pass != PolicyPass::default() => {
                        tracing::info!(
                            rotated = pass.rotated,
                            destroyed_versions = pass.destroyed_versions,
                            moved_subject_keys = pass.moved_subject_keys,
                            failed = pass.failed,
                            "tenant policies applied"
                        );
                        record(pass.changes).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "tenant policies could not be applied this pass")
                    }
                }
            }
        });
    }

    /// Runs `work` every `every` (the first time at once), for as long as
    /// the manager lives.
    pub(super) fn spawn_every<F, Fut>(self: &Arc<Self>, every: Duration, work: F)
    where
        F: Fn(Arc<Self>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let keys = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(keys) = keys.upgrade() else { break };
                work(keys).await;
            }
        });
    }
}
