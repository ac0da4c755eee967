//! The key cache: moka, bounded by entry count, time to live and time to idle,
//! with three guarantees on top.
//!
//! - One load per miss: concurrent misses for one key are serialized by
//!   moka's per-key compute, so a cold tenant costs one unwrap however many
//!   requests arrive at once.
//! - The time to live is also checked against tokio's clock when an entry is
//!   read, so expiry is exact and testable with paused time. moka's own
//!   expiry (on its wall clock) frees memory in the background.
//! - Stale if error: an entry past its time to live that fails to reload
//!   because a dependency is unavailable keeps serving for a configured
//!   grace period (`stale_if_error`), so a KMS or keystore outage does not
//!   take down tenants that were in use. Zero turns this off.
//! - A failure is shared: when a reload fails because a dependency is
//!   unavailable, the requests queued behind it for the same key (and any for
//!   [`FAILURE_BACKOFF`] after) answer at once, stale or UNAVAILABLE, instead
//!   of each waiting on a failing KMS call of its own. An outage costs one
//!   call per key per backoff, and queues do not build up.
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

use crate::error::{Dependency, Error, Result};

/// How long a reload that failed for an unavailable dependency stands for the
/// requests behind it before the next one tries the dependency again.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// How a cache is bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Most entries held.
    pub max_entries: u64,
    /// An entry is reloaded once this old.
    pub time_to_live: Duration,
    /// An entry unused this long is evicted (on the wall clock).
    pub time_to_idle: Duration,
    /// How long past its time to live an entry may still serve while its
    /// reload fails with [`Error::Unavailable`].
    pub stale_if_error: Duration,
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
    /// Keys whose last reload failed, with when and which dependency.
    failures: Cache<K, (Instant, Dependency)>,
    ttl: Duration,
    stale_if_error: Duration,
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
            // Kept through the stale-if-error grace; freshness is checked on read.
            .time_to_live(limits.time_to_live + limits.stale_if_error)
            .time_to_idle(limits.time_to_idle)
            .support_invalidation_closures()
            .build();
        let failures = Cache::builder()
            .max_capacity(limits.max_entries)
            .time_to_live(FAILURE_BACKOFF)
            .build();
        Self {
            inner,
            failures,
            ttl: limits.time_to_live,
            stale_if_error: limits.stale_if_error,
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
        let (ttl, grace, failures) = (self.ttl, self.stale_if_error, &self.failures);
        let computed = self
            .inner
            .entry(key.clone())
            .and_try_compute_with(|existing| async move {
                let age = existing.as_ref().map(|e| e.value().loaded_at.elapsed());
                if age.is_some_and(|age| age < ttl) {
                    return Ok::<_, Error>(Op::Nop);
                }
                let stale_usable = age.is_some_and(|age| age < ttl + grace);
                let recent_failure = failures
                    .get(key)
                    .await
                    .filter(|(at, _)| at.elapsed() < FAILURE_BACKOFF);
                let outcome = match recent_failure {
                    Some((_, dependency)) => Err(Error::Unavailable(dependency)),
                    None => load().await,
                };
                match outcome {
                    Ok(value) => {
                        failures.invalidate(key).await;
                        Ok(Op::Put(Entry {
                            value: Arc::new(value),
                            loaded_at: Instant::now(),
                        }))
                    }
                    Err(Error::Unavailable(dependency)) => {
                        if recent_failure.is_none() {
                            failures.insert(key.clone(), (Instant::now(), dependency)).await;
                        }
                        if stale_usable {
                            tracing::warn!(%dependency, "serving a cached key past its time to live while the reload fails");
                            Ok(Op::Nop)
                        } else {
                            Err(Error::Unavailable(dependency))
                        }
                    }
                    Err(e) => Err(e),
                }
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

    /// Drops every entry, and any load in flight now.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.invalidate_all();
    }

    /// Entries currently held (approximate, for metrics and tests).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const TTL: Duration = Duration::from_secs(60);
    const GRACE: Duration = Duration::from_secs(30);

    fn cache() -> TtlCache<u32, u32> {
        TtlCache::new(CacheLimits {
            max_entries: 100,
            time_to_live: TTL,
            time_to_idle: Duration::from_secs(3600),
            stale_if_error: GRACE,
        })
    }

    fn down() -> Error {
        Error::Unavailable(Dependency::RootKey)
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_entry_serves_through_the_grace_only_while_reloads_are_unavailable() {
        let cache = cache();
        assert_eq!(
            *cache.get_or_load(&1, || async { Ok(10) }).await.unwrap(),
            10
        );

        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        assert_eq!(
            *cache
                .get_or_load(&1, || async { Err(down()) })
                .await
                .unwrap(),
            10
        );
        // Within the failure backoff the stale entry answers without a reload.
        assert_eq!(
            *cache
                .get_or_load(&1, || async { panic!("no reload within the backoff") })
                .await
                .unwrap(),
            10
        );
        // After it, any error other than unavailability is not hidden.
        tokio::time::advance(FAILURE_BACKOFF).await;
        assert!(matches!(
            cache
                .get_or_load(&1, || async { Err(Error::Internal) })
                .await,
            Err(Error::Internal)
        ));

        tokio::time::advance(GRACE).await;
        assert!(matches!(
            cache.get_or_load(&1, || async { Err(down()) }).await,
            Err(Error::Unavailable(_))
        ));
        // Once the dependency answers, the entry is fresh again.
        tokio::time::advance(FAILURE_BACKOFF).await;
        assert_eq!(
            *cache.get_or_load(&1, || async { Ok(11) }).await.unwrap(),
            11
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_queued_behind_a_failed_reload_share_its_failure_instead_of_retrying() {
        let cache = Arc::new(cache());
        cache.get_or_load(&1, || async { Ok(10) }).await.unwrap();
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        let loads = Arc::new(AtomicUsize::new(0));
        let run = |key: u32| {
            let (cache, loads) = (cache.clone(), loads.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&key, || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // A KMS that takes its time to fail.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        Err(down())
                    })
                    .await
                    .map(|v| *v)
            })
        };
        // 20 requests for an expired key: one reload, every one served stale.
        let started = Instant::now();
        let warm: Vec<_> = (0..20).map(|_| run(1)).collect();
        for task in warm {
            assert_eq!(task.await.unwrap().unwrap(), 10);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );

        // 20 requests for a key never loaded: one load, every one UNAVAILABLE.
        let cold: Vec<_> = (0..20).map(|_| run(2)).collect();
        for task in cold {
            assert!(matches!(task.await.unwrap(), Err(Error::Unavailable(_))));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 2);

        // After the backoff the dependency is tried again.
        tokio::time::advance(FAILURE_BACKOFF).await;
        assert!(run(2).await.unwrap().is_err());
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        tokio::time::advance(FAILURE_BACKOFF).await;
        assert_eq!(
            *cache.get_or_load(&2, || async { Ok(20) }).await.unwrap(),
            20
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_make_one_load_and_a_failed_load_caches_nothing() {
        let cache = Arc::new(cache());
        let loads = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load(&7, || async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            Ok(70)
                        })
                        .await
                        .map(|v| *v)
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), 70);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);

        assert!(
            cache
                .get_or_load(&8, || async { Err(down()) })
                .await
                .is_err()
        );
        tokio::time::advance(FAILURE_BACKOFF).await;
        assert_eq!(
            *cache.get_or_load(&8, || async { Ok(80) }).await.unwrap(),
            80
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalidation_drops_a_load_that_was_in_flight() {
        let cache = Arc::new(cache());
        let started = Arc::new(tokio::sync::Notify::new());
        let loader = {
            let (cache, started) = (cache.clone(), started.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&1, || async move {
                        started.notify_one();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Ok(1)
                    })
                    .await
            })
        };
        started.notified().await;
        cache.invalidate(&2).await;
        // The caller of the racing load gets its value once...
        assert_eq!(*loader.await.unwrap().unwrap(), 1);
        // ...but it was not kept: the next read loads again.
        assert_eq!(*cache.get_or_load(&1, || async { Ok(2) }).await.unwrap(), 2);
    }
}
