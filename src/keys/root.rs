//! Root key rotation: moving the keys an old shared root key wraps onto the
//! one configured now.

use super::{
    KeyManager, RootRotationProgress,
    errors::{kms_error, placement_error},
};
use crate::{
    error::{Error, Result},
    ids::TenantId,
    kms::{Purpose, WrapContext},
    store::RootWrappedSlot,
};

impl KeyManager {
    /// Moves every key wrapped directly by an old shared root key of `region`
    /// (tenant key versions and subject-index keys of shared-tier tenants)
    /// onto the shared root key configured now, with KMS ReEncrypt: the key
    /// material never leaves KMS. Page by page, one key at a time, each swap
    /// a compare-and-swap on the old wrapping: at every moment every key is
    /// wrapped by the old or the new root key, never by nothing. Killed at any
    /// point, it is resumed by running it again; run twice, the second run
    /// finds nothing to do. Progress goes to `progress` after every page;
    /// when nobody listens any more, it stops (and can be resumed).
    ///
    /// `to`, when given, must name the configured key: rotating to a key the
    /// sidecars do not use for new keys would leave new versions behind.
    pub async fn rotate_root(
        &self,
        region: Option<&str>,
        to: Option<&str>,
        page_size: u32,
        progress: &tokio::sync::mpsc::Sender<RootRotationProgress>,
    ) -> Result<RootRotationProgress> {
        let target = self
            .root
            .shared_key(region)
            .map_err(|e| placement_error("region", e))?;
        if let Some(to) = to {
            let named = self
                .root
                .resolve_key(to, region)
                .await
                .map_err(|e| placement_error("to", e))?;
            if named != target {
                return Err(Error::FailedPrecondition(format!(
                    "the shared root key configured for this region is {target}, not {named}: \
                     configure kms.key_id = {named} on every sidecar first, so that new keys are \
                     wrapped by it too, then rotate"
                )));
            }
        }
        let (total, already) = self
            .store
            .count_shared_root_wrapped(region, &target)
            .await?;
        let mut state = RootRotationProgress {
            to: target.clone(),
            total,
            already_on_target: already,
            rewrapped: 0,
            changed_concurrently: 0,
            done: false,
        };
        tracing::info!(to = %target, total, already, "root key rotation started");
        if progress.send(state.clone()).await.is_err() {
            return Ok(state);
        }
        let mut after: Option<TenantId> = None;
        loop {
            // A page holds the keys of up to `page_size` tenants.
            let page = self
                .store
                .shared_root_wrapped(region, after.as_ref(), page_size)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.tenant.clone());
            for row in page.iter().filter(|row| row.wrapped.root_key_id != target) {
                let purpose = match row.slot {
                    RootWrappedSlot::Index => Purpose::SubjectIndex,
                    RootWrappedSlot::Version(version) => Purpose::TenantKey { version },
                };
                let ctx = WrapContext {
                    tenant: &row.tenant,
                    purpose,
                };
                let rewrapped = self
                    .root
                    .re_encrypt(ctx, &row.wrapped, &target)
                    .await
                    .map_err(|e| kms_error(&row.tenant, e))?;
                if self
                    .store
                    .replace_root_wrapped(&row.tenant, row.slot, &row.wrapped, &rewrapped)
                    .await?
                {
                    // Nothing cached changes: the caches hold the keys
                    // unwrapped, and the rewrapped ones are the same keys.
                    state.rewrapped += 1;
                } else {
                    // Shredded or rewrapped by someone else meanwhile.
                    state.changed_concurrently += 1;
                }
            }
            if progress.send(state.clone()).await.is_err() {
                tracing::warn!(
                    rewrapped = state.rewrapped,
                    "root key rotation stopped: nobody follows it; run it again to resume"
                );
                return Ok(state);
            }
        }
        state.done = true;
        tracing::info!(to = %target, rewrapped = state.rewrapped, already = state.already_on_target, "root key rotation done");
        let _ = progress.send(state.clone()).await;
        Ok(state)
    }
}
