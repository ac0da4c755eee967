//! Subject keys stored in the legacy form, and the upgrade that rewraps them.
//!
//! Until this version a subject key was stored as an ordinary tenant-key
//! envelope of its 32 bytes, sealed with the context
//! `{"keywarden.purpose": "subject-key", "keywarden.subject": <hex id>}`
//! (docs/FORMAT.md, "The legacy form"). The data plane accepted that
//! context, so a caller allowed to decrypt for the tenant could open a
//! copied row (a key "erased" by a shred, from a backup) and Encrypt could
//! mint one. Now subject keys are wrapped in a domain of their own
//! ([`crate::envelope::wrap`]) and `keywarden.` context keys are refused at
//! the edge.
//!
//! Rows in the legacy form keep working (this module opens them, from the
//! keystore only), and [`KeyManager::upgrade_subject_keys`], run in the
//! background at every start, rewraps them into the subject-key domain page
//! by page, each row a compare-and-swap, so the upgrade needs no downtime
//! and resumes where it stopped: rows already rewrapped are not listed
//! again. Several sidecars on one PostgreSQL keystore may run it at once;
//! the worst case is a row rewrapped twice, of the same key.

use std::{sync::Arc, time::Duration};

use zeroize::Zeroizing;

use super::{ActiveTenant, KeyManager};
use crate::{
    envelope::{self, Context, EnvelopeKey, KeyRef, Mode},
    error::{Error, Result},
    ids::{SubjectKeyId, TenantId},
    secret::Key256,
    store::SubjectKeyRecord,
};

/// Rows read per keystore query by the upgrade.
const PAGE: u32 = 500;

/// Whether a stored subject key is in the legacy form: a whole tenant-key
/// envelope of 32 bytes (suite 0x01, key reference kind 0x01).
pub(super) fn is_legacy(wrapped: &[u8]) -> bool {
    wrapped.len() == envelope::TENANT_OVERHEAD + 32
        && wrapped[0] == envelope::FORMAT_V1
        && wrapped[1] == envelope::SUITE_AES256GCM_CMAC_KDF
}

/// The context the legacy form was sealed with.
fn legacy_context(id: SubjectKeyId) -> Context {
    Context::from([
        ("keywarden.purpose".to_owned(), "subject-key".to_owned()),
        ("keywarden.subject".to_owned(), hex::encode(id.0)),
    ])
}

/// Opens a legacy row with the tenant key version that sealed it.
pub(super) fn unwrap_subject_key(
    wrapping: &EnvelopeKey,
    tenant: &ActiveTenant,
    id: SubjectKeyId,
    record: &SubjectKeyRecord,
) -> Option<Key256> {
    let parsed = envelope::parse(&record.wrapped).ok()?;
    if parsed.mode != Mode::Randomized
        || parsed.key_ref
            != (KeyRef::Tenant {
                version: record.tenant_version,
            })
    {
        return None;
    }
    let bytes = Zeroizing::new(
        envelope::open(wrapping, &parsed, tenant.id.as_str(), &legacy_context(id)).ok()?,
    );
    Key256::from_slice(&bytes)
}

/// Seals a subject key in the legacy form, as keywarden did before the
/// subject-key domain: for tests of the upgrade only.
#[doc(hidden)]
pub fn legacy_wrap(
    wrapping: &EnvelopeKey,
    tenant: &TenantId,
    tenant_version: u32,
    id: SubjectKeyId,
    key: &Key256,
) -> Vec<u8> {
    envelope::seal(
        wrapping,
        KeyRef::Tenant {
            version: tenant_version,
        },
        tenant.as_str(),
        &legacy_context(id),
        key.expose(),
    )
    .expect("sealing 32 bytes cannot fail")
}

/// What one run of the upgrade did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubjectKeyUpgrade {
    /// Rows rewrapped into the subject-key domain.
    pub rewrapped: u64,
    /// Rows that changed under the upgrade (shredded, or moved by retention
    /// or by another sidecar), left as they are.
    pub changed_concurrently: u64,
    /// Rows of tenants the upgrade could not reach now (e.g. KMS
    /// unavailable); the next run retries them.
    pub failed: u64,
}

impl KeyManager {
    /// Rewraps every subject key still in the legacy form into the
    /// subject-key domain, under its tenant's primary version. Resumable:
    /// killed at any point, the next run lists only the rows left.
    pub async fn upgrade_subject_keys(&self) -> Result<SubjectKeyUpgrade> {
        let mut done = SubjectKeyUpgrade::default();
        let mut after: Option<(TenantId, SubjectKeyId)> = None;
        loop {
            let page = self
                .store
                .legacy_subject_keys(after.as_ref().map(|(t, s)| (t, s)), PAGE)
                .await?;
            let Some((tenant, subject, _)) = page.last() else {
                break;
            };
            after = Some((tenant.clone(), *subject));
            for (tenant, subject, record) in page {
                match self.upgrade_one(&tenant, subject, &record).await {
                    Ok(true) => done.rewrapped += 1,
                    Ok(false) => done.changed_concurrently += 1,
                    Err(e) => {
                        done.failed += 1;
                        tracing::warn!(tenant = %tenant, error = %e, "a subject key could not be rewrapped now; the next start retries it");
                    }
                }
            }
        }
        Ok(done)
    }

    async fn upgrade_one(
        &self,
        tenant: &TenantId,
        subject: SubjectKeyId,
        record: &SubjectKeyRecord,
    ) -> Result<bool> {
        let tenant = match self.active_tenant(tenant).await {
            Ok(tenant) => tenant,
            // Shredded since it was listed: its rows are gone.
            Err(Error::TenantShredded { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let key = self.subject_key_bytes(&tenant, subject, record).await?;
        let rewrapped = self.wrap_subject_key(&tenant, subject, &key).await?;
        Ok(self
            .store
            .replace_subject_wrap(&tenant.id, &subject, record.tenant_version, rewrapped)
            .await?)
    }

    /// Runs [`KeyManager::upgrade_subject_keys`] in the background, retrying
    /// every `retry` until a run leaves nothing behind.
    pub fn spawn_subject_key_upgrade(self: &Arc<Self>, retry: Duration) {
        let keys = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(manager) = keys.upgrade() else { break };
                match manager.upgrade_subject_keys().await {
                    Ok(run) => {
                        if run.rewrapped > 0 || run.changed_concurrently > 0 || run.failed > 0 {
                            tracing::info!(
                                rewrapped = run.rewrapped,
                                changed_concurrently = run.changed_concurrently,
                                failed = run.failed,
                                "subject keys upgraded to the subject-key domain"
                            );
                        }
                        if run.failed == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the subject key upgrade could not run now; retrying")
                    }
                }
                drop(manager);
                tokio::time::sleep(retry).await;
            }
        });
    }
}
