//! The key cache: bounded by entry count (quick_cache, whose eviction keeps
//! frequently used entries), with a time to live and a time to idle, and
//! these guarantees on top.
//!
//! - One load per miss: concurrent misses for one key wait on one load
//!   (quick_cache's placeholder), so a cold tenant costs one unwrap however
//!   many requests arrive at once.
//! - The time to live is checked against tokio's clock when an entry is
//!   read, so expiry is exact and testable with paused time. Expired and idle
//!   entries are also dropped by [`TtlCache::sweep`], which the sidecar runs
//!   in the background, so unused key material does not stay in memory.
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
//!   under it, and the loader takes out what it inserted.
//!
//! Why quick_cache and not moka: an entry costs several times less cache
//! state in quick_cache than in moka (measured with 100,000 entries; the
//! figures are in BENCHMARKS.md), and a hit takes a shard's read lock with
//! no bookkeeping queue behind it. moka's timers are replaced by the check on
//! read and the sweep.
//!
//! Values are `Arc`s: a key evicted while a request still uses it is zeroized
//! when that request drops the last reference.

use std::{
    future::Future,
    hash::Hash,
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter, sync::Cache};
use tokio::time::Instant;

use crate::{
    error::{Dependency, Error, Result},
    observe::metrics::{CACHE_ENTRIES, CACHE_EVICTIONS, CACHE_HITS, CACHE_LOADS, CACHE_MISSES},
};

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
    /// An entry unused this long is dropped by the next sweep.
    pub time_to_idle: Duration,
    /// How long past its time to live an entry may still serve while its
    /// reload fails with [`Error::Unavailable`].
    pub stale_if_error: Duration,
}

impl CacheLimits {
    /// How often [`TtlCache::sweep`] should run: a quarter of the shorter of
    /// the two lifetimes, between 1 and 60 seconds, so an entry outlives its
    /// time to idle (or its time to live and grace) by at most that much.
    pub fn sweep_interval(&self) -> Duration {
        (self.time_to_idle.min(self.time_to_live) / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// A cached value, with when it was loaded and last used (12 bytes: there
/// is one per cached tenant).
pub struct Held<V> {
    value: V,
    /// Milliseconds since the cache's epoch at the load.
    loaded_ms: u64,
    /// Seconds since the cache's epoch at the last read.
    last_used: AtomicU32,
}

/// What a cache hands out: shared, zeroized with the last reference.
pub type Cached<V> = Arc<Held<V>>;

impl<V> Deref for Held<V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.value
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for Held<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

/// Counts the entries quick_cache drops to stay within `max_entries` in
/// `keywarden_cache_evictions_total` (the removals this module makes itself
/// are counted where it makes them). A lookup in the recorder per eviction:
/// evictions happen only on inserts into a full cache, after a load.
#[derive(Clone)]
struct CountEvictions(&'static str);

impl<K, V> Lifecycle<K, V> for CountEvictions {
    type RequestState = ();

    fn begin_request(&self) {}

    fn on_evict(&self, _: &mut (), _: K, _: V) {
        metrics::counter!(CACHE_EVICTIONS, "cache" => self.0).increment(1);
    }
}

pub struct TtlCache<K, V> {
    /// The `cache` label of its metrics.
    name: &'static str,
    /// Its hit counter, looked up in the recorder on the first hit (a
    /// lookup per hit cost more than the hit: BENCHMARKS.md, "Metrics on
    /// the hot path").
    hits: std::sync::OnceLock<metrics::Counter>,
    inner: Cache<K, Cached<V>, UnitWeighter, DefaultHashBuilder, CountEvictions>,
    /// Placeholders of the loads in flight: waiting on one is how concurrent
    /// misses share a load. Nothing is ever stored here.
    loading: Cache<K, ()>,
    /// Keys whose last reload failed, with when and which dependency.
    failures: Cache<K, (Instant, Dependency)>,
    ttl: Duration,
    tti: Duration,
    stale_if_error: Duration,
    /// The zero of `Held::last_used`.
    epoch: Instant,
    generation: AtomicU64,
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// A cache whose metrics carry `cache="name"`.
    pub fn new(name: &'static str, limits: CacheLimits) -> Self {
        // quick_cache allocates as entries arrive, not for its capacity.
        let capacity = usize::try_from(limits.max_entries).unwrap_or(usize::MAX);
        Self {
            name,
            hits: std::sync::OnceLock::new(),
            inner: Cache::with(
                capacity,
                limits.max_entries,
                UnitWeighter,
                DefaultHashBuilder::default(),
                CountEvictions(name),
            ),
            loading: Cache::new(capacity),
            failures: Cache::new(capacity),
            ttl: limits.time_to_live,
            tti: limits.time_to_idle,
            stale_if_error: limits.stale_if_error,
            epoch: Instant::now(),
            generation: AtomicU64::new(0),
        }
    }

    fn seconds_since_epoch(&self, now: Instant) -> u32 {
        u32::try_from(now.duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    /// How old `held` is at `now` (to the millisecond).
    fn age(&self, held: &Held<V>, now: Instant) -> Duration {
        let now_ms = u64::try_from(now.duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(now_ms.saturating_sub(held.loaded_ms))
    }

    /// `value`, loaded (and used) at `now`.
    fn hold(&self, value: V, now: Instant) -> Cached<V> {
        Arc::new(Held {
            value,
            loaded_ms: u64::try_from(now.duration_since(self.epoch).as_millis())
                .unwrap_or(u64::MAX),
            last_used: AtomicU32::new(self.seconds_since_epoch(now)),
        })
    }

    /// The answer the cache holds for `key` now, if any: its fresh value;
    /// or, while the last reload failed within [`FAILURE_BACKOFF`], the
    /// stale value within its grace, else that failure.
    fn answer(&self, key: &K) -> Option<Result<Cached<V>>> {
        let held = self.inner.get(key);
        let now = Instant::now();
        if let Some(held) = &held {
            let age = self.age(held, now);
            if age < self.ttl {
                // Written at most once a second per entry, to keep the
                // cache line shared between cores on the hot path.
                let seconds = self.seconds_since_epoch(now);
                if held.last_used.load(Ordering::Relaxed) != seconds {
                    held.last_used.store(seconds, Ordering::Relaxed);
                }
                return Some(Ok(held.clone()));
            }
        }
        let (at, dependency) = self.failures.get(key)?;
        if now.duration_since(at) >= FAILURE_BACKOFF {
            return None;
        }
        Some(match held {
            Some(held) if self.age(&held, now) < self.ttl + self.stale_if_error => Ok(held),
            _ => Err(Error::Unavailable(dependency)),
        })
    }

    /// The cached value, or the result of `load` (called at most once at a
    /// time per key; a failed load caches nothing).
    pub async fn get_or_load<F, Fut>(&self, key: &K, load: F) -> Result<Cached<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        if let Some(answer) = self.answer(key) {
            if answer.is_ok() {
                self.hits
                    .get_or_init(|| metrics::counter!(CACHE_HITS, "cache" => self.name))
                    .increment(1);
            }
            return answer;
        }
        metrics::counter!(CACHE_MISSES, "cache" => self.name).increment(1);
        // Wait for a load in flight, or become the loader. Nothing is put in
        // `loading`, so this ends with the guard; a loader that finishes (or
        // is cancelled) hands it to the next waiter, which looks again first.
        let guard = loop {
            if let Err(guard) = self.loading.get_value_or_guard_async(key).await {
                break guard;
            }
        };
        if let Some(answer) = self.answer(key) {
            return answer;
        }
        let generation = self.generation.load(Ordering::Acquire);
        metrics::counter!(CACHE_LOADS, "cache" => self.name).increment(1);
        let outcome = load().await;
        let now = Instant::now();
        let result = match outcome {
            Ok(value) => {
                self.failures.remove(key);
                let held = self.hold(value, now);
                // After an invalidation the keystore may have changed under
                // this load: its caller gets the value, the cache does not.
                // Inserted first and checked after, so that an invalidation
                // between the check and the insert cannot be missed: one
                // before the check is seen by it, one after removes the entry.
                self.inner.insert(key.clone(), held.clone());
                if self.generation.load(Ordering::Acquire) != generation {
                    self.inner.remove_if(key, |v| Arc::ptr_eq(v, &held));
                }
                self.count_entries();
                Ok(held)
            }
            Err(Error::Unavailable(dependency)) => {
                self.failures.insert(key.clone(), (now, dependency));
                let answer = self
                    .answer(key)
                    .unwrap_or(Err(Error::Unavailable(dependency)));
                if answer.is_ok() {
                    tracing::warn!(%dependency, "serving a cached key past its time to live while the reload fails");
                }
                answer
            }
            Err(e) => Err(e),
        };
        drop(guard);
        result
    }

    /// Whether a fresh value is cached for `key` (no load).
    pub fn contains_fresh(&self, key: &K) -> bool {
        matches!(self.answer(key), Some(Ok(_)))
    }

    /// Caches a value made elsewhere (e.g. a key just generated).
    pub fn insert(&self, key: K, value: V) {
        self.inner.insert(key, self.hold(value, Instant::now()));
        self.count_entries();
    }

    /// Drops one entry, and any load of any key in flight now.
    pub fn invalidate(&self, key: &K) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if self.inner.remove(key).is_some() {
            self.evicted(1);
        }
    }

    /// Drops every entry whose key matches, and any load in flight now.
    pub fn invalidate_if(&self, predicate: impl Fn(&K) -> bool) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let dropped = AtomicU64::new(0);
        self.inner.retain(|k, _| {
            let keep = !predicate(k);
            dropped.fetch_add(u64::from(!keep), Ordering::Relaxed);
            keep
        });
        self.evicted(dropped.into_inner());
    }

    /// Drops every entry, and any load in flight now.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let held = self.entry_count();
        self.inner.clear();
        self.evicted(held);
    }

    /// Counts `n` entries dropped (invalidated or swept; the entries
    /// quick_cache drops to stay within `max_entries` are counted by
    /// [`CountEvictions`]) and the entries left.
    fn evicted(&self, n: u64) {
        if n > 0 {
            metrics::counter!(CACHE_EVICTIONS, "cache" => self.name).increment(n);
        }
        self.count_entries();
    }

    fn count_entries(&self) {
        metrics::gauge!(CACHE_ENTRIES, "cache" => self.name).set(self.entry_count() as f64);
    }

    /// Drops the entries past their time to live and grace, or unused for
    /// their time to idle, and failures past their backoff.
    pub fn sweep(&self) {
        let now = Instant::now();
        let lifetime = self.ttl + self.stale_if_error;
        let seconds = self.seconds_since_epoch(now);
        let dropped = AtomicU64::new(0);
        self.inner.retain(|_, held| {
            let unused = seconds.saturating_sub(held.last_used.load(Ordering::Relaxed));
            let keep = self.age(held, now) < lifetime
                && Duration::from_secs(u64::from(unused)) <= self.tti;
            dropped.fetch_add(u64::from(!keep), Ordering::Relaxed);
            keep
        });
        self.evicted(dropped.into_inner());
        self.failures
            .retain(|_, (at, _)| now.duration_since(*at) < FAILURE_BACKOFF);
    }

    /// Entries currently held (for metrics and tests).
    pub fn entry_count(&self) -> u64 {
        self.inner.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const TTL: Duration = Duration::from_secs(60);
    const GRACE: Duration = Duration::from_secs(30);

    fn cache() -> TtlCache<u32, u32> {
        TtlCache::new(
            "test",
            CacheLimits {
                max_entries: 100,
                time_to_live: TTL,
                time_to_idle: Duration::from_secs(3600),
                stale_if_error: GRACE,
            },
        )
    }

    fn down() -> Error {
        Error::Unavailable(Dependency::RootKey)
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_entry_serves_through_the_grace_only_while_reloads_are_unavailable() {
        let cache = cache();
        assert_eq!(
            **cache.get_or_load(&1, || async { Ok(10) }).await.unwrap(),
            10
        );

        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        assert_eq!(
            **cache
                .get_or_load(&1, || async { Err(down()) })
                .await
                .unwrap(),
            10
        );
        // Within the failure backoff the stale entry answers without a reload.
        assert_eq!(
            **cache
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
            **cache.get_or_load(&1, || async { Ok(11) }).await.unwrap(),
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
                    .map(|v| **v)
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
            **cache.get_or_load(&2, || async { Ok(20) }).await.unwrap(),
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
                        .map(|v| **v)
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
            **cache.get_or_load(&8, || async { Ok(80) }).await.unwrap(),
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
        cache.invalidate(&2);
        // The caller of the racing load gets its value once...
        assert_eq!(**loader.await.unwrap().unwrap(), 1);
        // ...but it was not kept: the next read loads again.
        assert_eq!(
            **cache.get_or_load(&1, || async { Ok(2) }).await.unwrap(),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_drops_entries_past_their_lifetime_or_idle_and_keeps_the_rest() {
        let cache = TtlCache::new(
            "test",
            CacheLimits {
                max_entries: 100,
                time_to_live: Duration::from_secs(300),
                time_to_idle: Duration::from_secs(60),
                stale_if_error: Duration::from_secs(30),
            },
        );
        for key in 0..3u32 {
            cache.get_or_load(&key, || async { Ok(key) }).await.unwrap();
        }
        // Key 0 is used every 30 s, key 1 once after 40 s, key 2 never again.
        for second in [30, 60, 90] {
            tokio::time::advance(Duration::from_secs(30)).await;
            cache
                .get_or_load(&0, || async { panic!("cached") })
                .await
                .unwrap();
            if second == 30 {
                tokio::time::advance(Duration::from_secs(10)).await;
                cache
                    .get_or_load(&1, || async { panic!("cached") })
                    .await
                    .unwrap();
                tokio::time::advance(Duration::from_secs(1)).await;
                cache.sweep();
                assert_eq!(cache.entry_count(), 3, "nothing idle for 60 s yet");
                tokio::time::advance(Duration::from_secs(20)).await;
                cache.sweep();
                assert_eq!(cache.entry_count(), 2, "key 2, unused for 61 s, is gone");
            }
        }
        tokio::time::advance(Duration::from_secs(20)).await;
        cache.sweep();
        assert_eq!(cache.entry_count(), 1, "key 1, unused for 81 s, is gone");
        assert!(cache.inner.get(&0).is_some());

        // Past its time to live and grace, even a key in use is dropped.
        for _ in 0..8 {
            tokio::time::advance(Duration::from_secs(30)).await;
            cache.get_or_load(&0, || async { Ok(0) }).await.unwrap();
        }
        let age = cache.age(&cache.inner.get(&0).unwrap(), Instant::now());
        tokio::time::advance(Duration::from_secs(330) - age).await;
        cache.sweep();
        assert_eq!(cache.entry_count(), 0);
        assert_eq!(
            CacheLimits {
                max_entries: 1,
                time_to_live: Duration::from_secs(300),
                time_to_idle: Duration::from_secs(60),
                stale_if_error: Duration::ZERO,
            }
            .sweep_interval(),
            Duration::from_secs(15)
        );
    }

    #[tokio::test]
    async fn entries_dropped_for_capacity_count_as_evictions() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let cache: TtlCache<u32, u32> = TtlCache::new(
            "small",
            CacheLimits {
                max_entries: 4,
                time_to_live: TTL,
                time_to_idle: TTL,
                stale_if_error: GRACE,
            },
        );
        metrics::with_local_recorder(&recorder, || {
            for k in 0..100 {
                cache.insert(k, k);
            }
        });
        let held = cache.entry_count();
        assert!(held <= 4, "{held}");
        assert_eq!(
            cache_evictions(&snapshotter.snapshot().into_vec()),
            100 - held
        );
        metrics::with_local_recorder(&recorder, || cache.invalidate_all());
        // (A snapshot drains the counts: these are the clear's.)
        assert_eq!(cache_evictions(&snapshotter.snapshot().into_vec()), held);

        fn cache_evictions(
            snapshot: &[(
                metrics_util::CompositeKey,
                Option<metrics::Unit>,
                Option<metrics::SharedString>,
                DebugValue,
            )],
        ) -> u64 {
            snapshot
                .iter()
                .filter(|(key, ..)| key.key().name() == CACHE_EVICTIONS)
                .map(|(.., value)| match value {
                    DebugValue::Counter(n) => *n,
                    _ => 0,
                })
                .sum()
        }
    }
}
