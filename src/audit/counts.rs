//! Data-plane calls counted rather than recorded one by one: one record per
//! interval for each tenant, caller, call and outcome, saying how many.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use super::{AuditError, AuditLog, Entry, Phase};

/// Records written per write-and-sync when counts are flushed.
const FLUSH_BATCH: usize = 1000;

/// One counter: a caller (an index into [`Pending::callers`]), a call and an
/// outcome.
struct Count {
    caller: u32,
    action: &'static str,
    outcome: &'static str,
    calls: u64,
}

/// Counts since the last flush. Compact, because it holds an entry for every
/// tenant that called in the interval (100,000 tenants' worth is about 15
/// MiB this way; nested maps took 110): tenants by id ("" when none), each
/// with a short list of counters, and callers, of which there are few,
/// interned. Counting a call whose tenant and caller are known allocates
/// nothing: this runs on every data-plane call.
#[derive(Default)]
struct Pending {
    callers: Vec<String>,
    by_tenant: HashMap<Box<str>, Vec<Count>>,
}

impl Pending {
    fn add(
        &mut self,
        tenant: &str,
        caller: &str,
        action: &'static str,
        outcome: &'static str,
        calls: u64,
    ) {
        let caller = match self.callers.iter().position(|c| c == caller) {
            Some(i) => i,
            None => {
                self.callers.push(caller.to_owned());
                self.callers.len() - 1
            }
        } as u32;
        let counts = match self.by_tenant.get_mut(tenant) {
            Some(counts) => counts,
            None => self.by_tenant.entry(tenant.into()).or_default(),
        };
        match counts
            .iter_mut()
            .find(|c| c.caller == caller && c.action == action && c.outcome == outcome)
        {
            Some(count) => count.calls += calls,
            None => counts.push(Count {
                caller,
                action,
                outcome,
                calls,
            }),
        }
    }

    /// Every counter with its tenant, in the order of tenant, caller, call
    /// and outcome; and the callers they index.
    fn sorted(self) -> (Vec<String>, Vec<(Box<str>, Count)>) {
        let callers = self.callers;
        let mut flat: Vec<(Box<str>, Count)> = self
            .by_tenant
            .into_iter()
            .flat_map(|(tenant, counts)| counts.into_iter().map(move |c| (tenant.clone(), c)))
            .collect();
        let key = |(tenant, c): &(Box<str>, Count)| {
            (
                tenant.clone(),
                callers[c.caller as usize].clone(),
                c.action,
                c.outcome,
            )
        };
        flat.sort_by_cached_key(key);
        (callers, flat)
    }
}

/// Counts since the last flush.
#[derive(Default)]
pub struct Counts {
    pending: Mutex<Pending>,
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
        pending.add(tenant.unwrap_or(""), caller, action, outcome, 1);
    }

    /// Writes one record per counter since the last flush, a thousand per
    /// write and sync (one sync per record took 20 s for 100,000 tenants).
    /// Counts that could not be written are kept for the next flush.
    pub async fn flush(&self, log: &AuditLog) -> Result<(), AuditError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let (callers, counts) = taken.sorted();
        for (i, batch) in counts.chunks(FLUSH_BATCH).enumerate() {
            let entries: Vec<Entry> = batch
                .iter()
                .map(|(tenant, count)| Entry {
                    action: count.action,
                    phase: Phase::Counted,
                    caller: callers[count.caller as usize].clone(),
                    tenant: (!tenant.is_empty()).then(|| tenant.to_string()),
                    outcome: Some(count.outcome.to_owned()),
                    detail: Some(format!("{} calls", count.calls)),
                    ..Entry::default()
                })
                .collect();
            if let Err(e) = log.record_all(&entries).await {
                // Keep what was not written for the next flush.
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                for (tenant, c) in &counts[i * FLUSH_BATCH..] {
                    let caller = &callers[c.caller as usize];
                    pending.add(tenant, caller, c.action, c.outcome, c.calls);
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
