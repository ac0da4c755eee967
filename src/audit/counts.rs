//! Data-plane calls counted rather than recorded one by one: one record per
//! interval for each tenant, caller, call and outcome, saying how many.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use super::{AuditError, AuditLog, Entry, Phase};

/// tenant ("" when none) → caller → (action, outcome) → count. Nested so
/// that counting a call whose tenant and caller are already known
/// allocates nothing: this runs on every data-plane call.
type Pending = BTreeMap<String, BTreeMap<String, BTreeMap<(&'static str, &'static str), u64>>>;

/// Counts since the last flush.
#[derive(Default)]
pub struct Counts {
    pending: Mutex<Pending>,
}

/// Finds `key`'s entry, allocating the owned key only when it is new.
fn slot<'a, V: Default>(map: &'a mut BTreeMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

impl Counts {
    pub fn add(
        &self,
        action: &'static str,
        tenant: Option<&str>,
        caller: &str,
        outcome: &'static str,
    ) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let by_caller = slot(&mut pending, tenant.unwrap_or(""));
        *slot(by_caller, caller)
            .entry((action, outcome))
            .or_default() += 1;
    }

    /// Writes one record per key counted since the last flush. Counts that
    /// could not be written are kept for the next flush.
    pub async fn flush(&self, log: &AuditLog) -> Result<(), AuditError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut flat = Vec::new();
        for (tenant, by_caller) in taken {
            for (caller, counts) in by_caller {
                for ((action, outcome), count) in counts {
                    flat.push((tenant.clone(), caller.clone(), action, outcome, count));
                }
            }
        }
        let mut entries = flat.into_iter();
        while let Some((tenant, caller, action, outcome, count)) = entries.next() {
            let entry = Entry {
                action,
                phase: Phase::Counted,
                caller: caller.clone(),
                tenant: (!tenant.is_empty()).then(|| tenant.clone()),
                outcome: Some(outcome.to_owned()),
                detail: Some(format!("{count} calls")),
                ..Entry::default()
            };
            if let Err(e) = log.record(entry).await {
                // Keep what was not written for the next flush.
                let unwritten =
                    std::iter::once((tenant, caller, action, outcome, count)).chain(entries);
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                for (tenant, caller, action, outcome, count) in unwritten {
                    *slot(slot(&mut pending, &tenant), &caller)
                        .entry((action, outcome))
                        .or_default() += count;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Flushes every `every` for as long as the log is open (the flusher
    /// does not keep it open: the server's shutdown closes it).
    pub fn spawn_flusher(self: Arc<Self>, log: Weak<AuditLog>, every: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(log) = log.upgrade() else { break };
                if let Err(e) = self.flush(&log).await {
                    tracing::error!(error = %e, "the audit log could not record data-plane counts; keeping them");
                }
            }
        });
    }
}
