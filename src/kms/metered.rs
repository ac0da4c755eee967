//! Counts the calls that reach a root-key provider, per operation. KMS calls
//! cost money and are rate-limited per account and region, so these counts
//! are what capacity planning (docs/SCALING.md) and alerts are about; the
//! tests use them to prove that the cache absorbs requests.
//!
//! Each call is also recorded as `keywarden_kms_calls_total{operation,
//! outcome}` and `keywarden_kms_call_duration_seconds{operation}` (a call
//! refused by a hook in front of this one is not a KMS call).
//!
//! It also notes when a call last succeeded, so that readiness
//! ([`crate::server::ready`]) counts the data plane's own KMS calls as
//! proof that the provider answers, and makes no call of its own while they
//! succeed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    KmsError, RootKeyProvider,
    forward::{Call, Forward},
};
use crate::observe::metrics::{KMS_CALL_SECONDS, KMS_CALLS, Timer, timed};

/// Calls made so far, per operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KmsCallCounts {
    pub generate_data_key: u64,
    pub decrypt: u64,
    pub re_encrypt: u64,
    pub create_key: u64,
    pub schedule_key_deletion: u64,
    pub describe: u64,
}

#[derive(Default)]
struct Counters {
    generate_data_key: AtomicU64,
    decrypt: AtomicU64,
    re_encrypt: AtomicU64,
    create_key: AtomicU64,
    schedule_key_deletion: AtomicU64,
    describe: AtomicU64,
}

/// A provider that counts what passes through it to `inner`.
pub struct Metered {
    inner: Arc<dyn RootKeyProvider>,
    counters: Counters,
    /// When [`Metered::last_success`] counts from.
    epoch: Instant,
    /// Nanoseconds from `epoch` to the end of the last successful call,
    /// plus one; 0: none yet.
    last_success: AtomicU64,
    /// The same for the last call that failed because the provider could
    /// not be reached or failed ([`KmsError::Unavailable`],
    /// [`KmsError::Failed`]); refusals and unusable keys are answers.
    last_failure: AtomicU64,
}

impl Metered {
    pub fn new(inner: Arc<dyn RootKeyProvider>) -> Self {
        Self {
            inner,
            counters: Counters::default(),
            epoch: Instant::now(),
            last_success: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
        }
    }

    fn at(&self, stamp: &AtomicU64) -> Option<Instant> {
        match stamp.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.epoch + Duration::from_nanos(n - 1)),
        }
    }

    /// When a call through this provider last succeeded (any operation,
    /// including the health check), if one has.
    pub fn last_success(&self) -> Option<Instant> {
        self.at(&self.last_success)
    }

    /// When a call through this provider last failed for want of the
    /// provider (unreachable, or failing), if one has.
    pub fn last_failure(&self) -> Option<Instant> {
        self.at(&self.last_failure)
    }

    pub fn counts(&self) -> KmsCallCounts {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KmsCallCounts {
            generate_data_key: get(&c.generate_data_key),
            decrypt: get(&c.decrypt),
            re_encrypt: get(&c.re_encrypt),
            create_key: get(&c.create_key),
            schedule_key_deletion: get(&c.schedule_key_deletion),
            describe: get(&c.describe),
        }
    }
}

impl Forward for Metered {
    fn inner(&self) -> &dyn RootKeyProvider {
        &*self.inner
    }

    async fn before(&self, call: Call<'_>) -> Result<(), KmsError> {
        let c = &self.counters;
        let counter = match call {
            Call::ResolveKey | Call::Health => &c.describe,
            Call::CreateDedicatedKey(_) => &c.create_key,
            Call::GenerateDataKey(_) => &c.generate_data_key,
            Call::Decrypt(_) => &c.decrypt,
            Call::ReEncrypt(_) => &c.re_encrypt,
            Call::ScheduleKeyDeletion => &c.schedule_key_deletion,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn start(&self, call: Call<'_>) -> Option<Timer> {
        let operation = match call {
            Call::ResolveKey | Call::Health => "describe",
            Call::CreateDedicatedKey(_) => "create_key",
            Call::GenerateDataKey(_) => "generate_data_key",
            Call::Decrypt(_) => "decrypt",
            Call::ReEncrypt(_) => "re_encrypt",
            Call::ScheduleKeyDeletion => "schedule_key_deletion",
        };
        Some(timed(KMS_CALLS, KMS_CALL_SECONDS, operation))
    }

    fn after(&self, _call: Call<'_>, outcome: Result<(), &KmsError>) {
        let stamp = match outcome {
            Ok(()) => &self.last_success,
            Err(KmsError::Unavailable(_) | KmsError::Failed(_)) => &self.last_failure,
            Err(KmsError::Refused | KmsError::Unsupported(_) | KmsError::KeyNotUsable(_)) => {
                return;
            }
        };
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        stamp.fetch_max(nanos + 1, Ordering::Relaxed);
    }
}
