//! Per-tenant rate limits: a token bucket (GCRA, from governor) per tenant
//! on each sidecar, sized by the tenant's policy or the configured default.
//! Checking costs a few atomic operations, so a tenant flooding far past its
//! limit is refused cheaply and leaves the CPU to the others.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    state::{InMemoryState, NotKeyed},
};

use crate::{
    error::Error,
    ids::TenantId,
    observe::metrics::{Refusal, refused},
};

/// A rate: items per second, and how many may come at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    /// 0: one second's worth.
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Option<Quota> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst).unwrap_or(per_second);
        Some(Quota::per_second(per_second).allow_burst(burst))
    }
}

struct Bucket {
    rate: Rate,
    limiter: RateLimiter<NotKeyed, InMemoryState, DefaultClock>,
}

/// Every tenant's bucket on this sidecar. Buckets of tenants idle for ten
/// minutes are dropped (they would be full again by then anyway).
pub struct TenantLimiter {
    default: Rate,
    buckets: moka::sync::Cache<TenantId, Arc<Bucket>>,
    clock: DefaultClock,
}

impl TenantLimiter {
    pub fn new(default: Rate) -> Self {
        Self {
            default,
            buckets: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            clock: DefaultClock::default(),
        }
    }

    /// Takes `items` from `tenant`'s bucket, whose rate is `rate` (the
    /// tenant's policy) or else the default. RESOURCE_EXHAUSTED, with how
    /// long to wait, when the bucket is short.
    pub fn check(&self, tenant: &TenantId, rate: Option<Rate>, items: usize) -> Result<(), Error> {
        let rate = rate.unwrap_or(self.default);
        let Some(quota) = rate.quota() else {
            return Ok(());
        };
        let mut bucket = self.buckets.get_with_by_ref(tenant, || {
            Arc::new(Bucket {
                rate,
                limiter: RateLimiter::direct(quota),
            })
        });
        if bucket.rate != rate {
            // The tenant's policy changed: a new bucket at the new rate.
            bucket = Arc::new(Bucket {
                rate,
                limiter: RateLimiter::direct(quota),
            });
            self.buckets.insert(tenant.clone(), bucket.clone());
        }
        let n =
            NonZeroU32::new(u32::try_from(items).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let checked = bucket.limiter.check_n(n);
        if !matches!(checked, Ok(Ok(()))) {
            refused(Refusal::RateLimit);
        }
        match checked {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(Error::ResourceExhausted {
                    reason: format!(
                        "tenant {tenant} is over its rate limit of {} items per second; retry in {} ms",
                        rate.per_second,
                        wait.as_millis().max(1)
                    ),
                    retry_after: Some(wait.max(Duration::from_millis(1))),
                })
            }
            Err(_) => Err(Error::ResourceExhausted {
                reason: format!(
                    "{items} items at once exceed tenant {tenant}'s burst of {}; send smaller batches",
                    quota.burst_size()
                ),
                retry_after: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_burst_and_says_when_to_retry() {
        let limiter = TenantLimiter::new(Rate {
            per_second: 0,
            burst: 0,
        });
        let acme = TenantId::parse("t", "acme").unwrap();
        // No default and no policy: no limit.
        for _ in 0..1000 {
            limiter.check(&acme, None, 1).unwrap();
        }
        let rate = Some(Rate {
            per_second: 10,
            burst: 5,
        });
        for _ in 0..5 {
            limiter.check(&acme, rate, 1).unwrap();
        }
        match limiter.check(&acme, rate, 1) {
            Err(Error::ResourceExhausted {
                retry_after: Some(wait),
                reason,
            }) => {
                assert!(wait <= Duration::from_millis(100), "{wait:?}");
                assert!(reason.contains("10 items per second"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Another tenant has its own bucket.
        let globex = TenantId::parse("t", "globex").unwrap();
        limiter.check(&globex, rate, 5).unwrap();
        // A batch larger than the burst can never fit.
        match limiter.check(&globex, rate, 6) {
            Err(Error::ResourceExhausted {
                retry_after: None, ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
}
