//! The key cache: moka, bounded by entry count, time to live and time to idle,
//! with three guarantees on top.
//!
//! - One load per miss: concurrent misses for one key are serialized by
//!   moka's per-key compute, so a cold tenant costs one unwrap however many
//!   requests arrive at once.
//! - The time to live is also checked against tokio's clock when an entry is
//!   read, so expiry is exact and testable with paused time. moka's own
//!   expiry (on its wall clock) frees memory in the background.
//! - An invalidation wins over a load that was in flight when it happened: a
//!   generation counter tells a loader that the keystore may have changed
//!   under it, and the loader drops what it inserted.
//!
//! Values are `Arc`s: a key evicted while a request still uses it is zeroized
//! when that request drops the last reference.

use std::{
    future::Future,
    hash::Hash,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use moka::{future::Cache, ops::compute::CompResult, ops::compute::Op};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// How a cache is bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Most entries held.
    pub max_entries: u64,
    /// An entry is reloaded once this old.
    pub time_to_live: Duration,
    /// An entry unused this long is evicted (on the wall clock).
    pub time_to_idle: Duration,
}

struct Entry<V> {
    value: Arc<V>,
    loaded_at: Instant,
}

// Not derived: that would demand `V: Clone`, and keys must not be cloneable.
impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Self {
            value: Arc::clone(&self.value),
            loaded_at: self.loaded_at,
        }
    }
}

pub struct TtlCache<K, V> {
    inner: Cache<K, Entry<V>>,
    ttl: Duration,
    generation: AtomicU64,
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    pub fn new(limits: CacheLimits) -> Self {
        let inner = Cache::builder()
            .max_capacity(limits.max_entries)
            .time_to_live(limits.time_to_live)
            .time_to_idle(limits.time_to_idle)
            .support_invalidation_closures()
            .build();
        Self {
            inner,
            ttl: limits.time_to_live,
            generation: AtomicU64::new(0),
        }
    }

    /// The cached value, or the result of `load` (called at most once at a
    /// time per key; a failed load caches nothing).
    pub async fn get_or_load<F, Fut>(&self, key: &K, load: F) -> Result<Arc<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        if let Some(entry) = self.inner.get(key).await
            && entry.loaded_at.elapsed() < self.ttl
        {
            return Ok(entry.value);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let ttl = self.ttl;
        let computed = self
            .inner
            .entry(key.clone())
            .and_try_compute_with(|existing| async move {
                if let Some(entry) = existing
                    && entry.value().loaded_at.elapsed() < ttl
                {
                    return Ok::<_, Error>(Op::Nop);
                }
                let value = load().await?;
                Ok(Op::Put(Entry {
                    value: Arc::new(value),
                    loaded_at: Instant::now(),
                }))
            })
            .await?;
        let value = match computed {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                e.into_value().value
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => {
                return Err(Error::internal("key cache compute left no entry"));
            }
        };
        if self.generation.load(Ordering::Acquire) != generation {
            self.inner.invalidate(key).await;
        }
        Ok(value)
    }

    /// Caches a value made elsewhere (e.g. a key just generated).
    pub async fn insert(&self, key: K, value: V) {
        self.inner
            .insert(
                key,
                Entry {
                    value: Arc::new(value),
                    loaded_at: Instant::now(),
                },
            )
            .await;
    }

    /// Drops one entry, and any load of any key in flight now.
    pub async fn invalidate(&self, key: &K) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.invalidate(key).await;
    }

    /// Drops every entry whose key matches, and any load in flight now.
    pub fn invalidate_if(&self, predicate: impl Fn(&K) -> bool + Send + Sync + 'static) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.inner.invalidate_entries_if(move |k, _| predicate(k)) {
            // Only possible if the builder above lost support_invalidation_closures.
            tracing::error!(error = %e, "cache invalidation failed; clearing the whole cache");
            self.inner.invalidate_all();
        }
    }

    /// Entries currently held (approximate, for metrics and tests).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }
}
