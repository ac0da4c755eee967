//! Calls counted rather than recorded one by one: one record per interval
//! for each tenant, caller, call and outcome, saying how many. Data-plane
//! calls (`audit.data_plane = "counts"`, and rate-limit refusals in every
//! mode) are `counted`; calls refused by authentication or authorization are
//! `refused`, so that a flood of bad credentials costs a counter, not a
//! record and a disk sync each.
//!
//! Counting runs on every call, under one lock, in constant time whatever
//! the number of callers (it was a linear search of the interval's callers
//! and of the tenant's counters, which halved throughput with 40,000 JWT
//! users): one hash of the tenant id, then a compare with the tenant's
//! counter (almost always one), or a search of up to [`FEW`], or past that
//! a hash of the caller. A call whose counter exists allocates nothing.
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
//! again (the attack review of issue 14: 444 bytes of log per refused call).
//! Calls that succeeded name a tenant that exists, and are not capped.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use super::{AuditError, AuditLog, Entry, Phase};
use crate::ids::TenantId;

/// Records written per write-and-sync when counts are flushed.
const FLUSH_BATCH: usize = 1000;

/// Most counters of calls that ran held per interval: 200,000 tenant,
/// caller, call and outcome combinations (at worst, each a new tenant and a
/// new caller, about 31 MB: see BENCHMARKS.md), and as many records at the
/// next flush.
pub const MAX_COUNTERS: usize = 200_000;

/// Most counters of refused calls held per interval.
pub const MAX_REFUSED_COUNTERS: usize = 50_000;

/// Distinct tenants a caller's refused or failed calls are counted under
/// per interval; past it, under tenant none.
pub const MAX_TENANTS_PER_CALLER: usize = 32;

/// The caller of the counters that hold calls past the bounds.
pub const OVERFLOW_CALLER: &str = "(other)";

/// Counters a tenant holds in a list, searched in order; past that, they
/// are indexed by caller and kind.
const FEW: usize = 8;

/// A call and its outcome, as counted.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Kind {
    phase: Phase,
    action: &'static str,
    outcome: &'static str,
}

/// One counter: a caller and a kind (indexes into [`Names`]) and how many
/// calls. 16 bytes.
#[derive(Clone, Copy)]
struct Counter {
    caller: u32,
    kind: u32,
    calls: u64,
}

impl Counter {
    /// Its key in [`Indexed::by_key`].
    fn key(&self) -> u64 {
        u64::from(self.caller) << 32 | u64::from(self.kind)
    }
}

/// Callers and kinds, each once, by index.
#[derive(Default)]
struct Names {
    callers: Vec<Arc<str>>,
    caller_index: HashMap<Arc<str>, u32>,
    kinds: Vec<Kind>,
    kind_index: HashMap<Kind, u32>,
}

impl Names {
    /// Whether `counter` is the one of `caller` and `kind`.
    fn is(&self, counter: &Counter, caller: &str, kind: Kind) -> bool {
        self.kinds[counter.kind as usize] == kind
            && *self.callers[counter.caller as usize] == *caller
    }

    /// The key of `caller` and `kind` if both are known.
    fn key(&self, caller: &str, kind: Kind) -> Option<u64> {
        let caller = self.caller_index.get(caller)?;
        let kind = self.kind_index.get(&kind)?;
        Some(u64::from(*caller) << 32 | u64::from(*kind))
    }

    fn caller(&mut self, caller: &str) -> u32 {
        if let Some(&i) = self.caller_index.get(caller) {
            return i;
        }
        let i = u32::try_from(self.callers.len()).expect("bounded by the counters");
        let name: Arc<str> = caller.into();
        self.callers.push(name.clone());
        self.caller_index.insert(name, i);
        i
    }

    fn kind(&mut self, kind: Kind) -> u32 {
        let next = u32::try_from(self.kinds.len()).expect("bounded by the code's calls");
        let i = *self.kind_index.entry(kind).or_insert(next);
        if i == next {
            self.kinds.push(kind);
        }
        i
    }
}

/// A tenant's counters: almost always one (one caller, one call, one
/// outcome), held without an allocation of its own; up to [`FEW`] in a
/// list; more indexed by caller and kind.
enum Counters {
    One(Counter),
    Few(Vec<Counter>),
    Many(Box<Indexed>),
}

/// Many counters of one tenant (say, one per JWT user).
struct Indexed {
    all: Vec<Counter>,
    /// [`Counter::key`] to its place in `all`.
    by_key: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
}

impl Counters {
    /// The counter of `caller` and `kind`, if the tenant has one.
    fn find(&mut self, caller: &str, kind: Kind, names: &Names) -> Option<&mut Counter> {
        match self {
            Counters::One(c) => names.is(c, caller, kind).then_some(c),
            Counters::Few(all) => all.iter_mut().find(|c| names.is(c, caller, kind)),
            Counters::Many(many) => {
                let at = *many.by_key.get(&names.key(caller, kind)?)?;
                Some(&mut many.all[at as usize])
            }
        }
    }

    /// The counter with `key`, if the tenant has one.
    fn find_key(&mut self, key: u64) -> Option<&mut Counter> {
        match self {
            Counters::One(c) => (c.key() == key).then_some(c),
            Counters::Few(all) => all.iter_mut().find(|c| c.key() == key),
            Counters::Many(many) => {
                let at = *many.by_key.get(&key)?;
                Some(&mut many.all[at as usize])
            }
        }
    }

    /// Adds a counter the tenant does not have.
    fn push(&mut self, counter: Counter) {
        match self {
            Counters::One(first) => *self = Counters::Few(vec![*first, counter]),
            Counters::Few(all) if all.len() < FEW => all.push(counter),
            Counters::Few(all) => {
                let mut all = std::mem::take(all);
                all.push(counter);
                let by_key = all.iter().zip(0..).map(|(c, at)| (c.key(), at)).collect();
                *self = Counters::Many(Box::new(Indexed { all, by_key }));
            }
            Counters::Many(many) => {
                let at = u32::try_from(many.all.len()).expect("bounded by the counters");
                many.by_key.insert(counter.key(), at);
                many.all.push(counter);
            }
        }
    }

    fn as_slice(&self) -> &[Counter] {
        match self {
            Counters::One(c) => std::slice::from_ref(c),
            Counters::Few(all) => all,
            Counters::Many(many) => &many.all,
        }
    }
}

/// Hashes a [`Counter::key`] with one multiply (SipHash, for the names a
/// caller sends, costs ~20 ns): it is made of indexes this module hands
/// out, not of values a caller chooses, so there is nothing to collide on
/// purpose.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, _: &[u8]) {
        unreachable!("a key hashes as one u64")
    }

    fn write_u64(&mut self, key: u64) {
        // Folds the caller bits down, then mixes: the map takes its bucket
        // from the low bits and a tag from the top seven.
        let mixed = (key ^ (key >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = mixed ^ (mixed >> 32);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Counts since the last flush. Compact, because it holds an entry for every
/// tenant that called in the interval: tenants by id ("" when none), each
/// with its counters inline; callers and (call, outcome) pairs, of which
/// there are few, once each. About 90 bytes per tenant with one counter
/// (the map's bucket, the id's copy; see BENCHMARKS.md).
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
    /// thousand per write and sync (one sync per record took 20 s for
    /// 100,000 tenants). Counts that could not be written are kept for the
    /// next flush.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(action: &'static str, outcome: &'static str) -> Kind {
        Kind {
            phase: Phase::Counted,
            action,
            outcome,
        }
    }

    fn rows(pending: &Pending) -> Vec<(&str, &str, &str, &str, &str, u64)> {
        pending
            .sorted()
            .into_iter()
            .map(|c| {
                (
                    c.tenant,
                    c.caller,
                    c.kind.phase.name(),
                    c.kind.action,
                    c.kind.outcome,
                    c.calls,
                )
            })
            .collect()
    }

    #[test]
    fn counters_add_up_per_tenant_caller_call_and_outcome_and_flush_in_order() {
        let mut pending = Pending::new(MAX_COUNTERS);
        for _ in 0..3 {
            pending.add("acme", "token:app", counted("Encrypt", "OK"), 1);
        }
        pending.add(
            "acme",
            "token:app",
            counted("Encrypt", "INVALID_ARGUMENT"),
            1,
        );
        pending.add("acme", "token:batch", counted("Encrypt", "OK"), 1000);
        pending.add("acme", "token:app", counted("Decrypt", "OK"), 2);
        pending.add("acme", "token:app", counted("Encrypt", "OK"), 4);
        let refused = Kind {
            phase: Phase::Refused,
            action: "Encrypt",
            outcome: "UNAUTHENTICATED",
        };
        pending.add("", "tcp 10.0.0.7", refused, 1);
        pending.add("zeta", "token:app", counted("Decrypt", "OK"), 1);
        assert_eq!(
            rows(&pending),
            [
                (
                    "",
                    "tcp 10.0.0.7",
                    "refused",
                    "Encrypt",
                    "UNAUTHENTICATED",
                    1
                ),
                ("acme", "token:app", "counted", "Decrypt", "OK", 2),
                (
                    "acme",
                    "token:app",
                    "counted",
                    "Encrypt",
                    "INVALID_ARGUMENT",
                    1
                ),
                ("acme", "token:app", "counted", "Encrypt", "OK", 7),
                ("acme", "token:batch", "counted", "Encrypt", "OK", 1000),
                ("zeta", "token:app", "counted", "Decrypt", "OK", 1),
            ]
        );
        assert_eq!(pending.overflowed, 0);
    }

    #[test]
    fn past_the_bound_new_counters_fold_into_other_and_known_ones_still_count() {
        let mut pending = Pending::new(3);
        for tenant in ["a", "b", "c"] {
            pending.add(tenant, "jwt:ada", counted("Encrypt", "OK"), 1);
        }
        // New tenants, a new caller, a known pair with a new outcome: all
        // past the bound.
        pending.add("d", "jwt:ada", counted("Encrypt", "OK"), 1);
        pending.add("e", "jwt:eve", counted("Encrypt", "OK"), 5);
        pending.add("a", "jwt:ada", counted("Encrypt", "NOT_FOUND"), 1);
        // A known counter still counts as itself.
        pending.add("b", "jwt:ada", counted("Encrypt", "OK"), 10);
        assert_eq!(
            rows(&pending),
            [
                ("", "(other)", "counted", "Encrypt", "NOT_FOUND", 1),
                ("", "(other)", "counted", "Encrypt", "OK", 6),
                ("a", "jwt:ada", "counted", "Encrypt", "OK", 1),
                ("b", "jwt:ada", "counted", "Encrypt", "OK", 11),
                ("c", "jwt:ada", "counted", "Encrypt", "OK", 1),
            ]
        );
        assert_eq!(pending.overflowed, 7);
        // Neither the folded tenants nor the folded caller were kept.
        assert_eq!(pending.by_tenant.len(), 4, "a, b, c and none");
        assert_eq!(
            pending.names.callers,
            ["jwt:ada".into(), "(other)".into()] as [Arc<str>; 2]
        );
    }

    #[test]
    fn a_tenant_with_many_callers_counts_each_apart_through_its_index() {
        let mut pending = Pending::new(MAX_COUNTERS);
        let callers: Vec<String> = (0..3 * FEW).map(|i| format!("jwt:user-{i:02}")).collect();
        for round in 1..=3 {
            for caller in &callers {
                pending.add("acme", caller, counted("Encrypt", "OK"), round);
                pending.add("acme", caller, counted("Decrypt", "OK"), 1);
            }
        }
        assert!(matches!(pending.by_tenant["acme"], Counters::Many(_)));
        let mut expected = Vec::new();
        for caller in &callers {
            expected.push(("acme", caller.as_str(), "counted", "Decrypt", "OK", 3));
            expected.push(("acme", caller.as_str(), "counted", "Encrypt", "OK", 6));
        }
        assert_eq!(rows(&pending), expected);
        assert_eq!(pending.held, 2 * callers.len());
    }

    #[test]
    fn a_refusal_flood_from_many_peers_cannot_crowd_out_calls_that_ran() {
        let counts = Counts::default();
        for i in 0..MAX_REFUSED_COUNTERS + 10 {
            let peer = format!("tcp 10.{}.{}.{}:40000", i >> 16, (i >> 8) & 255, i & 255);
            counts.refused("Encrypt", None, &peer, "UNAUTHENTICATED");
        }
        counts.add("Encrypt", Some("acme"), "token:app", "OK");
        let refused = counts.refused.lock().unwrap();
        assert_eq!(refused.held, MAX_REFUSED_COUNTERS + 1);
        assert_eq!(refused.overflowed, 10);
        let ran = counts.ran.lock().unwrap();
        assert_eq!(
            rows(&ran),
            [("acme", "token:app", "counted", "Encrypt", "OK", 1)]
        );
    }

    #[test]
    fn refusals_count_a_peer_without_its_port_and_only_valid_tenants() {
        let counts = Counts::default();
        for port in [40001, 40002, 40003] {
            counts.refused(
                "Decrypt",
                Some("acme"),
                &format!("tcp 192.0.2.1:{port}"),
                "UNAUTHENTICATED",
            );
        }
        counts.refused(
            "Decrypt",
            Some("acme"),
            "tcp [2001:db8::1]:443",
            "UNAUTHENTICATED",
        );
        counts.refused(
            "Decrypt",
            Some("bad\ntenant"),
            "unix socket",
            "UNAUTHENTICATED",
        );
        counts.refused("GetTenant", Some("acme"), "jwt:bob", "PERMISSION_DENIED");
        assert_eq!(
            rows(&counts.refused.lock().unwrap()),
            [
                (
                    "",
                    "unix socket",
                    "refused",
                    "Decrypt",
                    "UNAUTHENTICATED",
                    1
                ),
                (
                    "acme",
                    "jwt:bob",
                    "refused",
                    "GetTenant",
                    "PERMISSION_DENIED",
                    1
                ),
                (
                    "acme",
                    "tcp 192.0.2.1",
                    "refused",
                    "Decrypt",
                    "UNAUTHENTICATED",
                    3
                ),
                (
                    "acme",
                    "tcp [2001:db8::1]",
                    "refused",
                    "Decrypt",
                    "UNAUTHENTICATED",
                    1
                ),
            ]
        );
        assert_eq!(without_port("tcp not-an-address:1"), "tcp not-an-address:1");
        assert_eq!(without_port("token:a:b"), "token:a:b");
    }

    /// Issue 14's attack review: a caller with `encrypt` on one tenant named
    /// a new valid tenant id in each call, and each refusal became a record
    /// of its own (444 bytes of log per call).
    #[test]
    fn refused_and_failed_calls_name_at_most_a_few_tenants_per_caller() {
        let counts = Counts::default();
        for n in 0..1000 {
            let tenant = format!("t{n:05}");
            counts.refused("Encrypt", Some(&tenant), "token:enc1", "PERMISSION_DENIED");
            counts.add("Encrypt", Some(&tenant), "token:star", "NOT_FOUND");
            counts.add("Encrypt", Some(&tenant), "token:star", "OK");
        }
        counts.refused("Encrypt", Some("t00003"), "token:enc1", "PERMISSION_DENIED");
        counts.refused(
            "Encrypt",
            Some("t00003"),
            "token:other",
            "PERMISSION_DENIED",
        );
        let refused = counts.refused.lock().unwrap();
        let refused = rows(&refused);
        assert_eq!(refused.len(), MAX_TENANTS_PER_CALLER + 1 + 1, "{refused:?}");
        let ran = counts.ran.lock().unwrap();
        let ran = rows(&ran);
        // 1000 OK counters (the tenants exist), 32 + 1 NOT_FOUND ones.
        assert_eq!(ran.len(), 1000 + MAX_TENANTS_PER_CALLER + 1);
        let tenantless: Vec<_> = refused.iter().filter(|r| r.0.is_empty()).collect();
        assert_eq!(tenantless.len(), 1, "{refused:?}");
        assert!(format!("{tenantless:?}").contains(&format!("{}", 1000 - MAX_TENANTS_PER_CALLER)));
    }
}
