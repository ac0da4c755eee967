//! The counters of one interval, stored so that finding a call's counter
//! takes constant time: callers and kinds once each, by index; a tenant's
//! counters inline when one, in a list when few, indexed when many.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::Arc,
};

use crate::audit::Phase;

/// Counters a tenant holds in a list, searched in order; past that, they
/// are indexed by caller and kind.
pub(super) const FEW: usize = 8;

/// A call and its outcome, as counted.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Kind {
    pub(super) phase: Phase,
    pub(super) action: &'static str,
    pub(super) outcome: &'static str,
}

/// One counter: a caller and a kind (indexes into [`Names`]) and how many
/// calls. 16 bytes.
#[derive(Clone, Copy)]
pub(super) struct Counter {
    pub(super) caller: u32,
    pub(super) kind: u32,
    pub(super) calls: u64,
}

impl Counter {
    /// Its key in [`Indexed::by_key`].
    pub(super) fn key(&self) -> u64 {
        u64::from(self.caller) << 32 | u64::from(self.kind)
    }
}

/// Callers and kinds, each once, by index.
#[derive(Default)]
pub(super) struct Names {
    pub(super) callers: Vec<Arc<str>>,
    caller_index: HashMap<Arc<str>, u32>,
    pub(super) kinds: Vec<Kind>,
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

    pub(super) fn caller(&mut self, caller: &str) -> u32 {
        if let Some(&i) = self.caller_index.get(caller) {
            return i;
        }
        let i = u32::try_from(self.callers.len()).expect("bounded by the counters");
        let name: Arc<str> = caller.into();
        self.callers.push(name.clone());
        self.caller_index.insert(name, i);
        i
    }

    pub(super) fn kind(&mut self, kind: Kind) -> u32 {
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
pub(super) enum Counters {
    One(Counter),
    Few(Vec<Counter>),
    Many(Box<Indexed>),
}

/// Many counters of one tenant (say, one per JWT user).
pub(super) struct Indexed {
    all: Vec<Counter>,
    /// [`Counter::key`] to its place in `all`.
    by_key: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
}

impl Counters {
    /// The counter of `caller` and `kind`, if the tenant has one.
    pub(super) fn find(&mut self, caller: &str, kind: Kind, names: &Names) -> Option<&mut Counter> {
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
    pub(super) fn find_key(&mut self, key: u64) -> Option<&mut Counter> {
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
    pub(super) fn push(&mut self, counter: Counter) {
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

    pub(super) fn as_slice(&self) -> &[Counter] {
        match self {
            Counters::One(c) => std::slice::from_ref(c),
            Counters::Few(all) => all,
            Counters::Many(many) => &many.all,
        }
    }
}

/// Hashes a [`Counter::key`] with one multiply, not SipHash (kept for the
/// names a caller sends, and many times slower): the key is made of indexes
/// this module hands out, not of values a caller chooses, so there is
/// nothing to collide on purpose.
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
