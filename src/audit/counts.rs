//! Calls counted rather than recorded one by one: one record per interval
//! for each tenant, caller, call and outcome, saying how many. Data-plane
//! calls (`audit.data_plane = "counts"`, and rate-limit refusals in every
//! mode) are `counted`; calls refused by authentication or authorization are
//! `refused`, so that a flood of bad credentials costs a counter, not a
//! record and a disk sync each.
//!
//! Counting runs on every call, under one lock, in constant time whatever
//! the number of callers (it was a linear search of the interval's callers
//! and of the tenant's counters, slow for a tenant with many JWT users:
//! BENCHMARKS.md, "Counting a call for the audit log"): one hash of the
//! tenant id, then a compare with the tenant's counter (almost always one),
//! or a search of up to [`counters::FEW`], or past that a hash of the
//! caller. A call whose counter exists allocates nothing.
//!
//! Memory is bounded: at most [`MAX_COUNTERS`] counters of calls that ran
//! and [`MAX_REFUSED_COUNTERS`] of refusals per interval, held apart so that
//! a flood of refusals (from many addresses) cannot push authenticated
//! callers out. Past a bound, a call that would need a new counter is added
//! to one for tenant none and caller [`OVERFLOW_CALLER`] (one per call,
//! phase and outcome), the first such call of an interval logs a warning,
//! and the flush logs how many. Nothing is lost: every call is in some
//! count.
//!
//! A tenant id in a refused or failed call is whatever the caller wrote, so
//! such calls name at most [`MAX_TENANTS_PER_CALLER`] distinct tenants per
//! caller and interval; past that, they are counted under tenant none. Else
//! one caller naming a new tenant per call would make one record per call
//! again (the attack review of issue 14, docs/SECURITY.md §12.15).
//! Calls that succeeded name a tenant that exists, and are not capped.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use super::{AuditError, AuditLog, Entry, Phase};
use crate::ids::TenantId;

mod counters;
#[cfg(test)]
mod tests;

use counters::{Counter, Counters, Kind, Names};

/// Records written per write-and-sync when counts are flushed.
const FLUSH_BATCH: usize = 1000;

/// Most counters of calls that ran held per interval: 200,000 tenant,
/// caller, call and outcome combinations (at worst, each a new tenant and a
/// new caller; the memory that takes is in BENCHMARKS.md, "Counting a call
/// for the audit log"), and as many records at the next flush.
pub const MAX_COUNTERS: usize = 200_000;

/// Most counters of refused calls held per interval.
pub const MAX_REFUSED_COUNTERS: usize = 50_000;

/// Distinct tenants a caller's refused or failed calls are counted under
/// per interval; past it, under tenant none.
pub const MAX_TENANTS_PER_CALLER: usize = 32;

/// The caller of the counters that hold calls past the bounds.
pub const OVERFLOW_CALLER: &str = "(other)";

/// Counts since the last flush. Compact, because it holds an entry for every
/// tenant that called in the interval: tenants by id ("" when none), each
/// with its counters inline; callers and (call, outcome) pairs, of which
/// there are few, once each. A tenant with one counter costs the map's
/// bucket and the id's copy (how many bytes: BENCHMARKS.md, "Counting a
/// call for the audit log").
struct Pending {
    /// Most counters (the overflow's aside).
    limit: usize,
    /// Counters held.
    held: usize,
    by_tenant: HashMap<Box<str>, Counters>,
    names: Names,
    /// Calls added to [`OVERFLOW_CALLER`]'s counters this interval.
    overflowed: u64,
    /// The tenants each caller's refused or failed calls named, up to
    /// [`MAX_TENANTS_PER_CALLER`].
    named: HashMap<Box<str>, Vec<Box<str>>>,
    /// Tenants in `named`, at most `limit`.
    named_total: usize,
}

/// One counter as flushed.
struct Count<'a> {
    tenant: &'a str,
    caller: &'a str,
    kind: Kind,
    calls: u64,
}

impl Pending {
    fn new(limit: usize) -> Self {
        Pending {
            limit,
            held: 0,
            by_tenant: HashMap::new(),
            names: Names::default(),
            overflowed: 0,
            named: HashMap::new(),
            named_total: 0,
        }
    }

    /// The tenant a refused or failed call of `caller` is counted under:
    /// `tenant` if the caller named it before in this interval, or has named
    /// fewer than [`MAX_TENANTS_PER_CALLER`] (and all callers fewer than
    /// the counters' bound), else none.
    fn capped<'t>(&mut self, caller: &str, tenant: &'t str) -> &'t str {
        if tenant.is_empty() {
            return tenant;
        }
        let tenants = self.named.get(caller);
        if tenants.is_some_and(|named| named.iter().any(|t| &**t == tenant)) {
            return tenant;
        }
        if tenants.is_some_and(|named| named.len() >= MAX_TENANTS_PER_CALLER)
            || self.named_total >= self.limit
        {
            return "";
        }
        self.named_total += 1;
        self.named
            .entry(caller.into())
            .or_default()
            .push(tenant.into());
        tenant
    }

    fn add(&mut self, tenant: &str, caller: &str, kind: Kind, calls: u64) {
        if let Some(counter) = self
            .by_tenant
            .get_mut(tenant)
            .and_then(|counters| counters.find(caller, kind, &self.names))
        {
            counter.calls += calls;
            return;
        }
        if self.held >= self.limit {
            if self.overflowed == 0 {
                tracing::warn!(
                    limit = self.limit,
                    "more distinct tenants and callers called in this audit interval than it counts apart; \
                     the rest are counted as caller (other), tenant none"
                );
            }
            self.overflowed += calls;
            let counter = Counter {
                caller: self.names.caller(OVERFLOW_CALLER),
                kind: self.names.kind(kind),
                calls,
            };
            return self.count("", counter);
        }
        let counter = Counter {
            caller: self.names.caller(caller),
            kind: self.names.kind(kind),
            calls,
        };
        self.count(tenant, counter);
    }

    /// Adds `counter`'s calls to the tenant's counter of its caller and
    /// kind, or holds it as a new one.
    fn count(&mut self, tenant: &str, counter: Counter) {
        match self.by_tenant.get_mut(tenant) {
            Some(counters) => match counters.find_key(counter.key()) {
                Some(held) => held.calls += counter.calls,
                None => {
                    counters.push(counter);
                    self.held += 1;
                }
            },
            None => {
                self.by_tenant.insert(tenant.into(), Counters::One(counter));
                self.held += 1;
            }
        }
    }

    /// Every counter, in the order of tenant, caller, phase, call and
    /// outcome.
    fn sorted(&self) -> Vec<Count<'_>> {
        let mut all: Vec<Count<'_>> = self
            .by_tenant
            .iter()
            .flat_map(|(tenant, counters)| {
                counters.as_slice().iter().map(|c| Count {
                    tenant,
                    caller: &self.names.callers[c.caller as usize],
                    kind: self.names.kinds[c.kind as usize],
                    calls: c.calls,
                })
            })
            .collect();
        all.sort_unstable_by_key(|c| {
            (
                c.tenant,
                c.caller,
                c.kind.phase.name(),
                c.kind.action,
                c.kind.outcome,
            )
        });
        all
    }
}

/// A caller named by its transport's peer (`tcp IP:PORT`) without its
/// port: one peer's calls from many ports are one caller.
pub fn without_port(caller: &str) -> &str {
    match caller.strip_prefix("tcp ") {
        Some(addr) if addr.parse::<std::net::SocketAddr>().is_ok() => {
            caller.rsplit_once(':').map_or(caller, |(peer, _)| peer)
        }
        _ => caller,
    }
}

/// Counts since the last flush.
pub struct Counts {
    /// Calls that ran, and rate-limit refusals.
    ran: Mutex<Pending>,
    /// Refusals by authentication and authorization.
    refused: Mutex<Pending>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            ran: Mutex::new(Pending::new(MAX_COUNTERS)),
            refused: Mutex::new(Pending::new(MAX_REFUSED_COUNTERS)),
        }
    }
}

impl Counts {
    /// Counts a data-plane call that ran (or was refused by a tenant's rate
    /// limit): phase `counted`, `outcome` "OK" or the gRPC code's name.
    pub fn add(
        &self,
        action: &'static str,
        tenant: Option<&str>,
        caller: &str,
        outcome: &'static str,
    ) {
        self.count(action, tenant, caller, Phase::Counted, outcome);
    }

    /// Counts a call refused by authentication or authorization: phase
    /// `refused`, `reason` the gRPC code's name (or a reason of the same
    /// kind: a constant, never request data). `tenant` is counted only if it
    /// is a valid tenant id (an invalid one could be anything the caller
    /// sent); `caller` is the authenticated identity, or for a caller that
    /// failed to authenticate its peer (`tcp IP:PORT`, counted without the
    /// port, or `unix socket`).
    pub fn refused(
        &self,
        action: &'static str,
        tenant: Option<&str>,
        caller: &str,
        reason: &'static str,
    ) {
        let tenant = tenant.filter(|t| TenantId::parse("tenant_id", t).is_ok());
        self.count(action, tenant, without_port(caller), Phase::Refused, reason);
    }

    fn count(
        &self,
        action: &'static str,
        tenant: Option<&str>,
        caller: &str,
        phase: Phase,
        outcome: &'static str,
    ) {
        let kind = Kind {
            phase,
            action,
            outcome,
        };
        let pending = match phase {
            Phase::Refused => &self.refused,
            _ => &self.ran,
        };
        let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
        let tenant = tenant.unwrap_or("");
        let tenant = if outcome == "OK" {
            tenant
        } else {
            pending.capped(caller, tenant)
        };
        pending.add(tenant, caller, kind, 1);
    }

    /// Writes one record per counter since the last flush (refusals last), a
    /// thousand per write and sync (a sync per record made a flush of many
    /// tenants take seconds). Counts that could not be written are kept for
    /// the next flush.
    pub async fn flush(&self, log: &AuditLog) -> Result<(), AuditError> {
        flush(&self.ran, log).await?;
        flush(&self.refused, log).await
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

/// [`Counts::flush`] of one set of counters.
async fn flush(pending: &Mutex<Pending>, log: &AuditLog) -> Result<(), AuditError> {
    let taken = {
        let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
        let limit = pending.limit;
        std::mem::replace(&mut *pending, Pending::new(limit))
    };
    if taken.overflowed > 0 {
        tracing::warn!(
            calls = taken.overflowed,
            limit = taken.limit,
            "audit counts: calls past the interval's distinct counters were counted as caller (other)"
        );
    }
    let counts = taken.sorted();
    for (i, batch) in counts.chunks(FLUSH_BATCH).enumerate() {
        let entries: Vec<Entry> = batch
            .iter()
            .map(|count| Entry {
                action: count.kind.action,
                phase: count.kind.phase,
                caller: count.caller.to_owned(),
                tenant: (!count.tenant.is_empty()).then(|| count.tenant.to_owned()),
                outcome: Some(count.kind.outcome.to_owned()),
                detail: Some(format!("{} calls", count.calls)),
                ..Entry::default()
            })
            .collect();
        if let Err(e) = log.record_all(&entries).await {
            // Keep what was not written for the next flush.
            let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
            for c in &counts[i * FLUSH_BATCH..] {
                pending.add(c.tenant, c.caller, c.kind, c.calls);
            }
            return Err(e);
        }
    }
    Ok(())
}
