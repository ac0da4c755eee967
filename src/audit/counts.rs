//! Data-plane calls counted rather than recorded one by one: one record per
//! interval for each tenant, caller, call and outcome, saying how many.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use super::{AuditError, AuditLog, Entry, Phase};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    tenant: Option<String>,
    caller: String,
    action: &'static str,
    outcome: &'static str,
}

/// Counts since the last flush.
#[derive(Default)]
pub struct Counts {
    pending: Mutex<BTreeMap<Key, u64>>,
}

impl Counts {
    pub fn add(
        &self,
        action: &'static str,
        tenant: Option<&str>,
        caller: &str,
        outcome: &'static str,
    ) {
        let key = Key {
            tenant: tenant.map(str::to_owned),
            caller: caller.to_owned(),
            action,
            outcome,
        };
        *self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    /// Writes one record per key counted since the last flush. Counts that
    /// could not be written are kept for the next flush.
    pub async fn flush(&self, log: &AuditLog) -> Result<(), AuditError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut entries = taken.into_iter();
        while let Some((key, count)) = entries.next() {
            let entry = Entry {
                action: key.action,
                phase: Phase::Counted,
                caller: key.caller.clone(),
                tenant: key.tenant.clone(),
                outcome: Some(key.outcome.to_owned()),
                detail: Some(format!("{count} calls")),
                ..Entry::default()
            };
            if let Err(e) = log.record(entry).await {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                for (key, count) in std::iter::once((key, count)).chain(entries) {
                    *pending.entry(key).or_default() += count;
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
