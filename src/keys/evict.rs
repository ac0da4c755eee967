//! Keeping the caches true: the evictions that drop what a change made
//! stale, here or (through keystore events) on another sidecar, and the
//! sweeper that drops what expired.

use std::{sync::Arc, time::Duration};

use super::{KeyManager, SealingKeyId, Slot};
use crate::{ids::TenantId, store::Event};

impl KeyManager {
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
        self.blind.invalidate_all();
        self.absent.invalidate_all();
        self.watchers.all();
    }

    pub(super) fn evict_tenant(&self, id: &TenantId) {
        self.tenants.invalidate(id);
        self.index.invalidate(id);
        self.blind.invalidate(id);
        self.sealing.invalidate_if(|k| &k.tenant == id);
        self.absent.invalidate_if(|k| &k.tenant == id);
        self.watchers.tenant(id);
    }

    /// Drops cached keys past their time to live or unused for their time
    /// to idle (see [`cache`](super::cache)); run in the background by
    /// [`KeyManager::spawn_cache_sweeper`].
    pub fn sweep_caches(&self) {
        self.tenants.sweep();
        self.sealing.sweep();
        self.index.sweep();
        self.blind.sweep();
        self.absent.sweep();
    }

    /// Sweeps the caches every `every` while the manager lives.
    pub fn spawn_cache_sweeper(self: &Arc<Self>, every: Duration) {
        self.spawn_every(every, |keys| async move { keys.sweep_caches() });
    }
}
