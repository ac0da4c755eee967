//! The policy scheduler as the server runs it: the key manager applies the
//! tenants' policies and hands back what changed, and the server records
//! each change in the audit log, so the key hierarchy does not know the log.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use crate::{
    audit::{AuditLog, Entry, Phase},
    keys::KeyManager,
    observe::metrics::POLICY_ACTIONS,
};

/// Runs [`KeyManager::spawn_policy_scheduler`] every `every`, recording each
/// change in `audit` (caller "scheduler") for as long as the log lives, and
/// counting it in `keywarden_policy_actions_total`.
pub fn spawn_policy_scheduler(keys: &Arc<KeyManager>, every: Duration, audit: Weak<AuditLog>) {
    keys.spawn_policy_scheduler(every, move |changes| {
        let audit = audit.clone();
        async move {
            let Some(audit) = audit.upgrade() else { return };
            for (tenant, action, detail) in changes {
                let label = match action {
                    "AutomaticRotation" => Some("rotation"),
                    "RetentionDestroy" => Some("version_destroyed"),
                    _ => None,
                };
                if let Some(label) = label {
                    metrics::counter!(POLICY_ACTIONS, "action" => label).increment(1);
                }
                let entry = Entry {
                    action,
                    phase: Phase::Answered,
                    caller: "scheduler".into(),
                    tenant: Some(tenant.to_string()),
                    outcome: Some("OK".into()),
                    detail: Some(detail),
                    ..Entry::default()
                };
                if let Err(e) = audit.record(entry).await {
                    tracing::error!(error = %e, "the audit log could not record a policy change");
                }
            }
        }
    });
}
