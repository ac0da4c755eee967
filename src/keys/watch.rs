//! Watches on keys in use by open streams: a shred, a retention destroy or
//! another sidecar's change event that touches a stream's key wakes the
//! stream, which then resolves its key again from the keystore and ends
//! with FAILED_PRECONDITION if it is gone (docs/SECURITY.md 12.5).
//!
//! A watch is woken by the same evictions that drop a key from the cache
//! (this sidecar's shreds and retention, and other sidecars' events), so an
//! open stream outlives a shred by no longer than a cached key does. The
//! streams also check again every cache TTL, the bound when an event is
//! lost.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use super::KeyManager;
use crate::{
    envelope::KeyRef,
    error::Result,
    ids::{SubjectKeyId, TenantId},
};

/// Every open watch, by id.
#[derive(Default)]
pub(super) struct Watchers {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Watched>>,
}

struct Watched {
    tenant: TenantId,
    /// The subject key a stream uses; `None` for a tenant key version.
    subject: Option<SubjectKeyId>,
    notify: Arc<Notify>,
}

impl Watchers {
    pub(super) fn watch(
        self: &Arc<Self>,
        tenant: &TenantId,
        subject: Option<SubjectKeyId>,
    ) -> KeyWatch {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.lock().insert(
            id,
            Watched {
                tenant: tenant.clone(),
                subject,
                notify: notify.clone(),
            },
        );
        KeyWatch {
            id,
            notify,
            watchers: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Watched>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self, matches: impl Fn(&Watched) -> bool) {
        for watched in self.lock().values().filter(|w| matches(w)) {
            watched.notify.notify_one();
        }
    }

    /// Everything of `tenant` changed (shred, retention, an event).
    pub(super) fn tenant(&self, tenant: &TenantId) {
        self.wake(|w| &w.tenant == tenant);
    }

    /// One subject's key changed.
    pub(super) fn subject(&self, tenant: &TenantId, subject: SubjectKeyId) {
        self.wake(|w| &w.tenant == tenant && w.subject == Some(subject));
    }

    /// Anything may have changed (events were missed).
    pub(super) fn all(&self) {
        self.wake(|_| true);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A watch on the key an open stream uses; dropped with the stream.
pub struct KeyWatch {
    id: u64,
    notify: Arc<Notify>,
    watchers: Arc<Watchers>,
}

impl KeyWatch {
    /// Resolves when the key may have changed: check it again.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        self.watchers.lock().remove(&self.id);
    }
}

impl std::fmt::Debug for KeyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyWatch").field("id", &self.id).finish()
    }
}

impl KeyManager {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn tid(s: &str) -> TenantId {
        TenantId::parse("t", s).unwrap()
    }

    async fn woken(watch: &KeyWatch) -> bool {
        tokio::time::timeout(Duration::from_millis(50), watch.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_watch_wakes_for_its_tenant_or_its_subject_only_and_leaves_when_dropped() {
        let watchers = Arc::new(Watchers::default());
        let acme = watchers.watch(&tid("acme"), None);
        let ada = watchers.watch(&tid("acme"), Some(SubjectKeyId([1; 16])));
        let other = watchers.watch(&tid("globex"), None);
        watchers.subject(&tid("acme"), SubjectKeyId([1; 16]));
        assert!(woken(&ada).await);
        assert!(!woken(&acme).await);
        watchers.tenant(&tid("acme"));
        assert!(woken(&acme).await && woken(&ada).await);
        assert!(!woken(&other).await);
        watchers.all();
        assert!(woken(&other).await);
        assert_eq!(watchers.len(), 3);
        drop((acme, ada, other));
        assert_eq!(watchers.len(), 0);
    }
}
