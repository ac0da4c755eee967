//! Readiness: whether this sidecar can serve now, from cached checks of what
//! it depends on, for `/ready` and for gRPC health.
//!
//! Four checks, each cached; [`Readiness::report`] reads the cache and does
//! no I/O, so a probe every second costs nothing:
//!
//! - **keystore**: [`Keystore::ping`] (`SELECT 1`) every
//!   [`ReadySettings::keystore_interval`] (default 5 s), failing after
//!   [`ReadySettings::keystore_timeout`] (default 2 s).
//! - **root_key**: the root-key provider answers, or the key cache may still
//!   serve: every [`ReadySettings::root_key_interval`] (default 30 s), and
//!   within a second of a call failing for want of the provider while the
//!   check passed (backing off while such checks keep passing: [`Pacing`]). The check passes without any call if a call through the
//!   provider succeeded within the last interval with none failing since (a
//!   busy sidecar makes no extra KMS call); otherwise it calls
//!   [`RootKeyProvider::health`] (AWS KMS: DescribeKey), failing after
//!   [`ReadySettings::root_key_timeout`] (default 5 s). When it fails, the
//!   check still passes (`"stale: ..."`) until `cache.stale_if_error_seconds`
//!   have passed since the last successful call, the grace during which the
//!   cache serves expired keys; a call that succeeds after the failure
//!   passes it at once.
//! - **audit**: the last audit write succeeded ([`AuditLog::writable`]).
//!   Read at each report: no interval. After a failed write, one record
//!   ([`AUDIT_PROBE`]) is tried every keystore interval until one succeeds.
//! - **draining**: [`Readiness::start_drain`] was called. At each report.
//!
//! The body is one JSON line (README, "Readiness"): `ready`, then each
//! check's state, then the notes. An error appears only as a category
//! (`timeout`, `unavailable`, `key_not_usable`, `error`, `write`): never
//! its text, which can name hosts.
//!
//! gRPC health ([`Readiness::follow`]) follows: the overall service `""` and
//! `keywarden.v1.Crypto` are SERVING exactly when the report is ready;
//! `keywarden.v1.Admin` ignores the root_key check (most admin calls need no
//! KMS call, and an operator needs them during a KMS outage), and follows the
//! other three.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{sync::watch, time::Instant};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    audit::{AuditLog, Entry, Phase},
    kms::{KmsError, RootKeyProvider, metered::Metered},
    store::{Keystore, StoreError},
};

/// The Crypto service's name in gRPC health (`keywarden.v1.Crypto`; named
/// here, not taken from the generated code, so that this module needs
/// nothing of the wire: tests/ready.rs checks that they agree).
pub const CRYPTO_SERVICE: &str = "keywarden.v1.Crypto";
/// The Admin service's name in gRPC health.
pub const ADMIN_SERVICE: &str = "keywarden.v1.Admin";

/// The action of the record readiness writes to learn that the audit log
/// is writable again after a failed write.
pub const AUDIT_PROBE: &str = "AuditWritable";

/// How often each dependency is checked, and how long a check may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadySettings {
    pub keystore_interval: Duration,
    pub keystore_timeout: Duration,
    pub root_key_interval: Duration,
    pub root_key_timeout: Duration,
    /// `cache.stale_if_error_seconds`: how long after the last successful
    /// root-key call the root_key check still passes while it fails.
    pub stale_if_error: Duration,
}

impl ReadySettings {
    /// The defaults, with the cache's grace.
    pub fn new(stale_if_error: Duration) -> Self {
        Self {
            keystore_interval: Duration::from_secs(5),
            keystore_timeout: Duration::from_secs(2),
            root_key_interval: Duration::from_secs(30),
            root_key_timeout: Duration::from_secs(5),
            stale_if_error,
        }
    }
}

/// What readiness watches.
pub struct ReadyParts {
    pub store: Arc<dyn Keystore>,
    /// The provider the data plane calls through, so its successes count.
    pub root: Arc<Metered>,
    pub audit: Arc<AuditLog>,
}

/// The outcome of the last run of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Not run yet: not ready.
    Pending,
    Ok,
    /// Failing since `since`, for a reason of `category`.
    Failing {
        category: &'static str,
        since: Instant,
    },
}

/// The checks that run in the background.
#[derive(Clone, Copy)]
enum Which {
    Keystore,
    RootKey,
}

/// The checks' cached outcomes.
struct State {
    keystore: Check,
    root_key: Check,
}

/// Cached readiness; see the module docs. Built by [`Readiness::start`],
/// which also starts the checks.
pub struct Readiness {
    parts: ReadyParts,
    settings: ReadySettings,
    state: Mutex<State>,
    draining: AtomicBool,
    notes: Mutex<BTreeMap<String, String>>,
    /// Bumped whenever something may have changed, for [`Readiness::follow`].
    changed: watch::Sender<()>,
    /// gRPC health, once [`Readiness::follow`] was called.
    health: OnceLock<HealthReporter>,
    /// Held while verdicts are taken and set in gRPC health, so that a
    /// verdict taken before a drain is never set after the drain's.
    applying: tokio::sync::Mutex<()>,
}

/// A report: whether ready, and the body to answer `/ready` with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyReport {
    pub ready: bool,
    pub body: String,
}

/// The body, in this field order (README, "Readiness").
#[derive(Serialize)]
struct Body<'a> {
    ready: bool,
    checks: Checks,
    notes: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Checks {
    keystore: String,
    root_key: String,
    audit: String,
    draining: bool,
}

/// Each check's verdict at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verdicts {
    keystore: (bool, String),
    root_key: (bool, String),
    audit: (bool, String),
    draining: bool,
}

impl Verdicts {
    fn ready(&self) -> bool {
        self.keystore.0 && self.root_key.0 && self.audit.0 && !self.draining
    }

    /// What the Admin service needs: all but the root key.
    fn admin_ready(&self) -> bool {
        self.keystore.0 && self.audit.0 && !self.draining
    }
}

fn verdict(check: Check) -> (bool, String) {
    match check {
        Check::Pending => (false, "pending".into()),
        Check::Ok => (true, "ok".into()),
        Check::Failing { category, .. } => (false, format!("failing: {category}")),
    }
}

/// The root_key check's verdict at `now`, given when a call last succeeded
/// and the grace.
fn root_verdict(
    check: Check,
    last_success: Option<Instant>,
    grace: Duration,
    now: Instant,
) -> (bool, String) {
    match check {
        Check::Failing { category, since } => match last_success {
            // A call succeeded after the check failed: the provider answers.
            Some(last) if last > since => (true, "ok".into()),
            Some(last) if now < last + grace => (true, format!("stale: {category}")),
            _ => verdict(check),
        },
        other => verdict(other),
    }
}

fn store_category(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "unavailable",
        _ => "error",
    }
}

fn kms_category(e: &KmsError) -> &'static str {
    match e {
        KmsError::Unavailable(_) => "unavailable",
        KmsError::KeyNotUsable(_) => "key_not_usable",
        KmsError::Refused | KmsError::Unsupported(_) | KmsError::Failed(_) => "error",
    }
}

impl Readiness {
    /// Readiness over `parts`, with every check pending, and the tasks that
    /// run the checks (each runs once at once, then every interval; they end
    /// when the last `Arc` of this is dropped).
    pub fn start(parts: ReadyParts, settings: ReadySettings) -> Arc<Self> {
        let this = Arc::new(Self::new(parts, settings));
        tokio::spawn(keystore_checks(Arc::downgrade(&this)));
        tokio::spawn(root_key_checks(Arc::downgrade(&this)));
        this
    }

    fn new(parts: ReadyParts, settings: ReadySettings) -> Self {
        Self {
            parts,
            settings,
            state: Mutex::new(State {
                keystore: Check::Pending,
                root_key: Check::Pending,
            }),
            draining: AtomicBool::new(false),
            notes: Mutex::new(BTreeMap::new()),
            changed: watch::Sender::new(()),
            health: OnceLock::new(),
            applying: tokio::sync::Mutex::new(()),
        }
    }

    fn verdicts(&self) -> Verdicts {
        let (keystore, root_key) = {
            let state = self.state.lock().expect("readiness state");
            (state.keystore, state.root_key)
        };
        let audit = if self.parts.audit.writable() {
            (true, "ok".into())
        } else {
            (false, "failing: write".into())
        };
        Verdicts {
            keystore: verdict(keystore),
            root_key: root_verdict(
                root_key,
                self.parts.root.last_success(),
                self.settings.stale_if_error,
                Instant::now(),
            ),
            audit,
            draining: self.draining.load(Ordering::SeqCst),
        }
    }

    /// Whether ready now, and the body for `/ready`. Reads the cache only.
    pub fn report(&self) -> ReadyReport {
        let verdicts = self.verdicts();
        let notes = self.notes.lock().expect("readiness notes");
        ReadyReport {
            ready: verdicts.ready(),
            body: body(&verdicts, &notes),
        }
    }

    /// From now on: not ready, and gRPC health NOT_SERVING for every service
    /// (at once if [`Readiness::drain`] is awaited; otherwise as soon as the
    /// follower task runs). Irreversible.
    pub fn start_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining: not ready from now on");
        }
        self.publish();
    }

    /// [`Readiness::start_drain`], and gRPC health set to NOT_SERVING before
    /// this returns.
    pub async fn drain(&self) {
        self.start_drain();
        if let Some(health) = self.health.get() {
            self.apply(health).await;
        }
    }

    /// Sets gRPC health from the verdicts now.
    async fn apply(&self, health: &HealthReporter) {
        let _applying = self.applying.lock().await;
        set_health(health, &self.verdicts()).await;
    }

    /// Sets (or with `None` clears) a note shown in the body under `notes`
    /// (e.g. a reload that failed). Notes do not change readiness. The text
    /// is shown as given: it must hold no secret.
    pub fn set_note(&self, name: &str, note: Option<String>) {
        let mut notes = self.notes.lock().expect("readiness notes");
        match note {
            Some(note) => notes.insert(name.to_owned(), note),
            None => notes.remove(name),
        };
    }

    /// Sets gRPC health from now on as the module docs say: at once, then
    /// whenever a check changes (and at least every keystore interval).
    pub async fn follow(self: &Arc<Self>, health: HealthReporter) {
        let _ = self.health.set(health.clone());
        let mut changed = self.changed.subscribe();
        self.apply(&health).await;
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                let Some(readiness) = this.upgrade() else {
                    return;
                };
                readiness.apply(&health).await;
            }
        });
    }

    /// Sets the gauges and tells the health follower to look again.
    fn publish(&self) {
        let verdicts = self.verdicts();
        let gauge = |on: bool| if on { 1.0 } else { 0.0 };
        metrics::gauge!("keywarden_ready").set(gauge(verdicts.ready()));
        for (check, passes) in [
            ("keystore", verdicts.keystore.0),
            ("root_key", verdicts.root_key.0),
            ("audit", verdicts.audit.0),
            ("draining", !verdicts.draining),
        ] {
            metrics::gauge!("keywarden_ready_check", "check" => check).set(gauge(passes));
        }
        self.changed.send_replace(());
    }

    /// Records a check's outcome, logging a change.
    fn record(&self, which: Which, outcome: Result<(), &'static str>) {
        let now = Instant::now();
        let mut state = self.state.lock().expect("readiness state");
        let (name, slot) = match which {
            Which::Keystore => ("keystore", &mut state.keystore),
            Which::RootKey => ("root_key", &mut state.root_key),
        };
        let next = match (outcome, *slot) {
            (Ok(()), _) => Check::Ok,
            // Still failing: keep when it began.
            (Err(category), Check::Failing { since, .. }) => Check::Failing { category, since },
            (Err(category), _) => Check::Failing {
                category,
                since: now,
            },
        };
        match (*slot, next) {
            (Check::Ok | Check::Pending, Check::Failing { category, .. }) => {
                tracing::warn!(check = name, category, "readiness check failing");
            }
            (Check::Failing { .. }, Check::Ok) => {
                tracing::info!(check = name, "readiness check passes again");
            }
            _ => {}
        }
        *slot = next;
        drop(state);
        self.publish();
    }

    async fn check_keystore(&self) {
        let outcome =
            match tokio::time::timeout(self.settings.keystore_timeout, self.parts.store.ping())
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "keystore ping failed");
                    Err(store_category(&e))
                }
                Err(_) => Err("timeout"),
            };
        self.record(Which::Keystore, outcome);
    }

    /// After a failed audit write, tries one record ([`AUDIT_PROBE`]) to
    /// learn whether the log is writable again: a sidecar that is not ready
    /// may get no call that would write one. Nothing while writes succeed.
    async fn probe_audit(&self) {
        let audit = &self.parts.audit;
        if audit.writable() {
            return;
        }
        let entry = Entry {
            action: AUDIT_PROBE,
            phase: Phase::Answered,
            caller: "readiness".into(),
            outcome: Some("OK".into()),
            detail: Some("the audit log is writable again after a failed write".into()),
            ..Entry::default()
        };
        // An error leaves the log not writable (the check says so); the next
        // interval tries again.
        if let Ok(Ok(_)) =
            tokio::time::timeout(self.settings.keystore_timeout, audit.record(entry)).await
        {
            tracing::info!(check = "audit", "readiness check passes again");
            self.publish();
        }
    }

    async fn check_root_key(&self) {
        // A call that succeeded within the interval, with none failing since,
        // proves the provider answers: no call of our own.
        let root = &self.parts.root;
        let recent = root.last_success().is_some_and(|last| {
            last.elapsed() < self.settings.root_key_interval
                && root.last_failure().is_none_or(|failed| failed < last)
        });
        let outcome = if recent {
            Ok(())
        } else {
            match tokio::time::timeout(self.settings.root_key_timeout, self.parts.root.health())
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "root-key provider health check failed");
                    Err(kms_category(&e))
                }
                Err(_) => Err("timeout"),
            }
        };
        self.record(Which::RootKey, outcome);
    }
}

/// The body for `verdicts` and `notes`: one JSON line.
fn body(verdicts: &Verdicts, notes: &BTreeMap<String, String>) -> String {
    serde_json::to_string(&Body {
        ready: verdicts.ready(),
        checks: Checks {
            keystore: verdicts.keystore.1.clone(),
            root_key: verdicts.root_key.1.clone(),
            audit: verdicts.audit.1.clone(),
            draining: verdicts.draining,
        },
        notes,
    })
    .expect("strings and booleans serialize")
}

/// Sets each service's gRPC health from `verdicts`.
async fn set_health(health: &HealthReporter, verdicts: &Verdicts) {
    let status = |on: bool| {
        if on {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    health
        .set_service_status("", status(verdicts.ready()))
        .await;
    health
        .set_service_status(CRYPTO_SERVICE, status(verdicts.ready()))
        .await;
    health
        .set_service_status(ADMIN_SERVICE, status(verdicts.admin_ready()))
        .await;
}

/// Checks the keystore now and every interval, and publishes at each (so
/// that the audit check and the root key's grace reach the gauges and gRPC
/// health within one keystore interval); tries the audit log if its last
/// write failed.
async fn keystore_checks(readiness: Weak<Readiness>) {
    let every = match readiness.upgrade() {
        Some(r) => r.settings.keystore_interval,
        None => return,
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(readiness) = readiness.upgrade() else {
            return;
        };
        readiness.check_keystore().await;
        readiness.probe_audit().await;
    }
}

/// How often the root-key loop looks whether a check is due (no I/O).
const ROOT_KEY_POLL: Duration = Duration::from_secs(1);

/// Checks the root key now, then whenever due: every interval, and soon
/// (see [`Pacing`]) after a call failed for want of the provider while the
/// check passed.
async fn root_key_checks(readiness: Weak<Readiness>) {
    let (every, poll) = match readiness.upgrade() {
        Some(r) => (
            r.settings.root_key_interval,
            r.settings.root_key_interval.min(ROOT_KEY_POLL),
        ),
        None => return,
    };
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pacing = Pacing::new(every);
    let mut last_check: Option<Instant> = None;
    loop {
        ticks.tick().await;
        let Some(readiness) = readiness.upgrade() else {
            return;
        };
        let passing = || readiness.state.lock().expect("readiness state").root_key == Check::Ok;
        let failed_since =
            |at: Instant| readiness.parts.root.last_failure().is_some_and(|f| f > at);
        let Some(due) = (match last_check {
            None => Some(Due::Interval),
            Some(last) => pacing.due(last.elapsed(), passing(), failed_since(last)),
        }) else {
            continue;
        };
        let failed_before = last_check.is_none_or(failed_since);
        last_check = Some(Instant::now());
        readiness.check_root_key().await;
        pacing.checked(due, passing(), failed_before);
    }
}

/// Why a root-key check is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    Interval,
    Failure,
}

/// When a failed call makes the root key be checked again before its
/// interval: within [`ROOT_KEY_POLL`] of the first failure after a passing
/// check, so an outage of the provider is seen at once. While failures keep
/// coming and those checks keep passing (the provider answers; what fails
/// is one tenant's own key, e.g. a customer's revoked KMS key), the wait
/// doubles up to the interval: a failing tenant costs the shared key one
/// health call per interval, not one a second. A check that fails, or an
/// interval with no failure at all, starts over at the prompt wait.
#[derive(Debug)]
struct Pacing {
    every: Duration,
    /// How long after the last check a failure may trigger the next.
    wait: Duration,
}

impl Pacing {
    fn new(every: Duration) -> Self {
        Self {
            every,
            wait: Duration::ZERO,
        }
    }

    /// Whether a check is due `since` after the last one, with the check
    /// `passing` and a call having `failed` since it.
    fn due(&self, since: Duration, passing: bool, failed: bool) -> Option<Due> {
        if since >= self.every {
            Some(Due::Interval)
        } else if passing && failed && since >= self.wait {
            Some(Due::Failure)
        } else {
            None
        }
    }

    /// A check made because `due` ended `passed`; `failed`: a call had
    /// failed since the check before.
    fn checked(&mut self, due: Due, passed: bool, failed: bool) {
        self.wait = match (due, passed, failed) {
            (_, false, _) | (Due::Interval, true, false) => Duration::ZERO,
            (Due::Failure, true, _) => (self.wait * 2).clamp(ROOT_KEY_POLL, self.every),
            (Due::Interval, true, true) => self.wait,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_key_failing_for_good_backs_the_rechecks_off_to_the_interval() {
        let every = Duration::from_secs(30);
        let mut pacing = Pacing::new(every);
        // The first failure after a pass: checked at the next poll.
        assert_eq!(pacing.due(Duration::ZERO, true, true), Some(Due::Failure));
        // Failures keep coming, the shared key keeps answering: 1, 2, 4,
        // 8, 16, then 30 s between checks, never shorter.
        let mut waits = Vec::new();
        for _ in 0..8 {
            pacing.checked(Due::Failure, true, true);
            waits.push(pacing.wait.as_secs());
            assert_eq!(
                pacing.due(pacing.wait - Duration::from_millis(1), true, true),
                None
            );
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        // An interval check while failures go on keeps the wait.
        pacing.checked(Due::Interval, true, true);
        assert_eq!(pacing.wait, every);
        // A quiet interval, or a failing check, starts over at once.
        pacing.checked(Due::Interval, true, false);
        assert_eq!(pacing.wait, Duration::ZERO);
        pacing.checked(Due::Failure, true, true);
        pacing.checked(Due::Failure, false, true);
        assert_eq!(pacing.wait, Duration::ZERO);
        // Nothing failed, nothing due before the interval; the interval is.
        assert_eq!(pacing.due(Duration::from_secs(29), true, false), None);
        assert_eq!(pacing.due(every, true, false), Some(Due::Interval));
        // While the check fails, failures do not re-check (the interval does).
        assert_eq!(pacing.due(Duration::from_secs(5), false, true), None);
    }

    fn verdicts(keystore: Check, root_key: Check, audit: bool, draining: bool) -> Verdicts {
        Verdicts {
            keystore: verdict(keystore),
            root_key: verdict(root_key),
            audit: if audit {
                (true, "ok".into())
            } else {
                (false, "failing: write".into())
            },
            draining,
        }
    }

    #[test]
    fn a_ready_body_is_exactly_this() {
        let v = verdicts(Check::Ok, Check::Ok, true, false);
        assert!(v.ready());
        assert_eq!(
            body(&v, &BTreeMap::new()),
            r#"{"ready":true,"checks":{"keystore":"ok","root_key":"ok","audit":"ok","draining":false},"notes":{}}"#
        );
    }

    #[test]
    fn a_failing_body_names_each_check_and_the_notes_in_order() {
        let since = Instant::now();
        let v = verdicts(
            Check::Pending,
            Check::Failing {
                category: "timeout",
                since,
            },
            false,
            true,
        );
        assert!(!v.ready());
        let notes = BTreeMap::from([
            (
                "tokens".to_owned(),
                "reload failed: does not parse".to_owned(),
            ),
            ("policy".to_owned(), "reload failed".to_owned()),
        ]);
        assert_eq!(
            body(&v, &notes),
            r#"{"ready":false,"checks":{"keystore":"pending","root_key":"failing: timeout","audit":"failing: write","draining":true},"notes":{"policy":"reload failed","tokens":"reload failed: does not parse"}}"#
        );
    }

    #[test]
    fn the_admin_service_ignores_only_the_root_key() {
        let failing = Check::Failing {
            category: "unavailable",
            since: Instant::now(),
        };
        let kms_down = verdicts(Check::Ok, failing, true, false);
        assert!(!kms_down.ready());
        assert!(kms_down.admin_ready());
        for other in [
            verdicts(failing, Check::Ok, true, false),
            verdicts(Check::Ok, Check::Ok, false, false),
            verdicts(Check::Ok, Check::Ok, true, true),
        ] {
            assert!(!other.ready());
            assert!(!other.admin_ready());
        }
    }

    #[test]
    fn a_failing_root_key_passes_within_the_grace_and_after_a_later_success() {
        let t0 = Instant::now();
        let since = t0 + Duration::from_secs(10);
        let failing = Check::Failing {
            category: "unavailable",
            since,
        };
        let grace = Duration::from_secs(60);
        let last = Some(t0);
        // Within the grace from the last success: passes, and says so.
        assert_eq!(
            root_verdict(failing, last, grace, t0 + Duration::from_secs(59)),
            (true, "stale: unavailable".into())
        );
        // The grace is over.
        assert_eq!(
            root_verdict(failing, last, grace, t0 + Duration::from_secs(60)),
            (false, "failing: unavailable".into())
        );
        // No grace, or no success ever.
        assert_eq!(
            root_verdict(failing, last, Duration::ZERO, since),
            (false, "failing: unavailable".into())
        );
        assert_eq!(
            root_verdict(failing, None, grace, since),
            (false, "failing: unavailable".into())
        );
        // A data-plane call succeeded after the check failed.
        assert_eq!(
            root_verdict(
                failing,
                Some(since + Duration::from_millis(1)),
                Duration::ZERO,
                t0 + Duration::from_secs(600)
            ),
            (true, "ok".into())
        );
    }

    #[test]
    fn error_texts_become_categories() {
        assert_eq!(
            store_category(&StoreError::Unavailable(
                "postgres://user:secret@db/keys refused".into()
            )),
            "unavailable"
        );
        assert_eq!(store_category(&StoreError::Corrupt("x".into())), "error");
        assert_eq!(
            kms_category(&KmsError::Unavailable("https://kms.example".into())),
            "unavailable"
        );
        assert_eq!(
            kms_category(&KmsError::KeyNotUsable("arn:...".into())),
            "key_not_usable"
        );
        assert_eq!(kms_category(&KmsError::Failed("denied".into())), "error");
    }
}
