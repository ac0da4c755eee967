//! What one setting may hold by itself: each rule written once, with the
//! words its error gives, and checked where the setting is named. What
//! depends on two settings is in [`super::Config::validate`].
//!
//! The rules are checked on the merged configuration, not on each source:
//! a value in the file that the environment replaces is never checked.

use super::ConfigError;

/// Most runtime threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 256;
/// Longest cache time to live, time to idle or grace, in seconds: a year.
pub const MAX_CACHE_SECONDS: u64 = 365 * 86_400;

/// The numbers a setting may hold, and the reason an error gives otherwise.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bounds {
    min: u64,
    max: u64,
    reason: &'static str,
}

/// A count, a size or a timeout that 0 would switch off or make useless.
pub(super) const AT_LEAST_ONE: Bounds = Bounds {
    min: 1,
    max: u64::MAX,
    reason: "must be at least 1",
};

/// The cache's time to live and time to idle.
pub(super) const AT_LEAST_ONE_SECOND: Bounds = Bounds {
    reason: "must be at least 1 second",
    ..AT_LEAST_ONE
};

/// The cache's durations: it adds time to live and grace, which numbers
/// near `u64::MAX` would overflow. Far beyond any sensible setting.
pub(super) const CACHE_SECONDS: Bounds = Bounds {
    min: 0,
    max: MAX_CACHE_SECONDS,
    reason: "must be at most 31536000 (a year)",
};

/// `worker_threads`; 0 asks for one per CPU.
pub(super) const WORKER_THREADS: Bounds = Bounds {
    min: 0,
    max: MAX_WORKER_THREADS as u64,
    reason: "must be at most 256 (0: one per CPU)",
};

/// `server.stream_window_bytes`: HTTP/2's smallest useful window to its
/// largest frame size.
pub(super) const STREAM_WINDOW_BYTES: Bounds = Bounds {
    min: 16 << 10,
    max: 16 << 20,
    reason: "must be from 16384 to 16777216",
};

/// `kms.deletion_waiting_days`: the range KMS's ScheduleKeyDeletion accepts.
pub(super) const DELETION_WAITING_DAYS: Bounds = Bounds {
    min: 7,
    max: 30,
    reason: "must be 7 to 30 (the range KMS accepts)",
};

impl Bounds {
    /// `value` if it is within bounds; else an error naming `setting`.
    pub(super) fn check(self, setting: &str, value: impl TryInto<u64>) -> Result<(), ConfigError> {
        // Only a usize beyond u64 fails to convert: above every maximum.
        let value = value.try_into().unwrap_or(u64::MAX);
        if (self.min..=self.max).contains(&value) {
            Ok(())
        } else {
            Err(ConfigError::new(setting, self.reason))
        }
    }

    /// Checks each `(setting, value)` in order; the first outside bounds is
    /// the error.
    pub(super) fn check_all<const N: usize>(
        self,
        settings: [(&str, u64); N],
    ) -> Result<(), ConfigError> {
        settings
            .into_iter()
            .try_for_each(|(setting, value)| self.check(setting, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reasons_say_the_bounds() {
        for bounds in [CACHE_SECONDS, WORKER_THREADS] {
            assert!(bounds.reason.contains(&format!("at most {} ", bounds.max)));
        }
        let window = STREAM_WINDOW_BYTES;
        assert!(
            window
                .reason
                .ends_with(&format!("{} to {}", window.min, window.max))
        );
        let days = DELETION_WAITING_DAYS;
        assert!(
            days.reason
                .contains(&format!("{} to {} ", days.min, days.max))
        );
    }

    #[test]
    fn a_value_beyond_u64_is_out_of_bounds() {
        let err = WORKER_THREADS
            .check("worker_threads", u128::MAX)
            .unwrap_err();
        assert_eq!(err.setting, "worker_threads");
        AT_LEAST_ONE.check("x", usize::MAX).unwrap();
        assert_eq!(
            AT_LEAST_ONE.check("x", 0u32).unwrap_err().reason,
            "must be at least 1"
        );
    }
}
