//! `keywarden.v1.Admin`: tenants, rotation, shredding.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Shared, TenantRequest, pb, status::code_name, timestamp, valid_tenant};
use crate::{
    audit::{Entry, Phase},
    auth::{Caller, Permission},
    error::{Dependency, Error},
    ids::{SubjectId, SubjectIds, TenantId},
    keys::{BlindIndexKeyInfo, PlacementRequest, RootKeyChoice, RootRotationProgress, TenantInfo},
    observe::metrics::SHREDS,
    receipt::{RECEIPT_VERSION, Receipt, ReceiptKind},
    store::{BlindIndexKeyState, TenantPolicy, TenantRecord, TenantState, Tier, UnixMillis},
};

/// ListTenants page size when the request says 0, and the most it may ask.
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

pub struct AdminService {
    shared: Shared,
}

impl AdminService {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

fn tenant_message(
    record: &TenantRecord,
    root_key_id: String,
    versions: &[crate::store::TenantKeyRecord],
    destroyed: &[(u32, UnixMillis)],
) -> pb::Tenant {
    let (state, primary, shredded_at, deletion) = match &record.state {
        TenantState::Active {
            primary_version, ..
        } => (pb::TenantState::Active, *primary_version, None, None),
        TenantState::Shredded {
            at,
            root_key_deletion,
        } => (
            pb::TenantState::Shredded,
            0,
            Some(timestamp(*at)),
            root_key_deletion.map(timestamp),
        ),
    };
    pb::Tenant {
        tenant_id: record.id.to_string(),
        state: state as i32,
        created_at: Some(timestamp(record.created_at)),
        primary_version: primary,
        versions: versions
            .iter()
            .map(|v| pb::KeyVersion {
                version: v.version,
                state: if v.version == primary {
                    pb::KeyVersionState::Primary
                } else {
                    pb::KeyVersionState::Active
                } as i32,
                created_at: Some(timestamp(v.created_at)),
                root_key_id: v.wrapped.root_key_id.clone(),
            })
            .collect(),
        shredded_at,
        tier: tier(record.placement.tier) as i32,
        region: record.placement.region.clone().unwrap_or_default(),
        root_key_id,
        root_key_deletion_date: deletion,
        policy: Some(policy_message(&record.policy)),
        destroyed_versions: destroyed.iter().map(|(v, _)| *v).collect(),
    }
}

fn tier(tier: Tier) -> pb::TenantTier {
    match tier {
        Tier::Shared => pb::TenantTier::Shared,
        Tier::Dedicated => pb::TenantTier::Dedicated,
        Tier::Customer => pb::TenantTier::Customer,
    }
}

/// Who asked for an admin call, and the hash of the audit record that says
/// so: what an erasure receipt names.
struct Asked {
    caller: Caller,
    record: String,
}

impl AdminService {
    /// Authenticates and authorizes an admin call for the tenant its body
    /// names, records that it was asked (refusing it if that cannot be
    /// written), runs `handler` on the body, and records its outcome.
    async fn call<T: TenantRequest, R>(
        &self,
        action: &'static str,
        permission: Permission,
        request: Request<T>,
        handler: impl AsyncFnOnce(T, Asked) -> Result<R, Status>,
    ) -> Result<Response<R>, Status> {
        self.call_about(action, permission, request, None, handler)
            .await
    }

    /// [`Self::call`] for a call about a subject, whose id the audit
    /// records hold only as a keyed hash.
    async fn call_about<T: TenantRequest, R>(
        &self,
        action: &'static str,
        permission: Permission,
        request: Request<T>,
        subject: Option<Vec<u8>>,
        handler: impl AsyncFnOnce(T, Asked) -> Result<R, Status>,
    ) -> Result<Response<R>, Status> {
        let tenant = valid_tenant(request.get_ref().tenant_id());
        let (caller, body) = self.shared.admit_request(request, action, permission)?;
        let asked = Entry {
            action,
            phase: Phase::Asked,
            caller: caller.identity.clone(),
            tenant,
            subject: subject.filter(|s| !s.is_empty()),
            trace_id: super::current_trace_id(),
            ..Entry::default()
        };
        let record = match self.shared.audit.record(asked.clone()).await {
            Ok(hash) => hash,
            Err(e) => return Err(Error::unavailable(Dependency::AuditLog, e).into()),
        };
        let result = handler(body, Asked { caller, record }).await;
        let outcome = match &result {
            Ok(_) => "OK",
            Err(status) => code_name(status.code()),
        };
        let answered = Entry {
            phase: Phase::Answered,
            outcome: Some(outcome.to_owned()),
            ..asked
        };
        if let Err(e) = self.shared.audit.record(answered).await {
            // The change is made; the next call will be refused until the
            // log can be written again.
            tracing::error!(error = %e, "the audit log could not record an outcome");
        }
        result.map(Response::new)
    }

    /// The tenant's current root key id, or empty when it cannot be named
    /// (e.g. its region is no longer configured).
    fn root_key_id(&self, record: &TenantRecord) -> String {
        self.shared
            .keys
            .root_key_of(&record.id, &record.placement)
            .unwrap_or_default()
    }

    fn tenant_info(&self, info: TenantInfo) -> pb::Tenant {
        let root_key_id = self.root_key_id(&info.record);
        tenant_message(&info.record, root_key_id, &info.versions, &info.destroyed)
    }

    /// Signs a receipt, stamped now.
    fn receipt(&self, receipt: Receipt) -> String {
        self.shared.receipts.sign(Receipt {
            version: RECEIPT_VERSION,
            issued_at: UnixMillis::now().to_string(),
            ..receipt
        })
    }

    /// Until when a keystore backup taken before `at` may still exist.
    fn backups_until(&self, at: UnixMillis) -> Option<String> {
        let retention = i64::try_from(self.shared.backup_retention.as_millis()).ok()?;
        Some(UnixMillis(at.0.saturating_add(retention)).to_string())
    }
}

/// A region name as AWS spells them: lower-case letters, digits and '-'.
fn parse_region(raw: &str) -> Result<Option<String>, Error> {
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.len() > 32
        || !raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(Error::invalid(
            "region",
            "must be a region name such as eu-central-1 (lower-case letters, digits and '-', at most 32)",
        ));
    }
    Ok(Some(raw.to_owned()))
}

fn parse_root_key(raw: &str) -> Result<RootKeyChoice, Error> {
    match raw {
        "" => Ok(RootKeyChoice::Shared),
        "dedicated" => Ok(RootKeyChoice::Dedicated),
        key if key.len() > 2048 || key.chars().any(char::is_whitespace) => Err(Error::invalid(
            "root_key",
            "must be empty, \"dedicated\", or a KMS key id, ARN or alias",
        )),
        key => Ok(RootKeyChoice::Existing(key.to_owned())),
    }
}

/// Page tokens are the last tenant id of the previous page, base64url: opaque
/// to callers, so the scheme may change.
fn parse_page_token(token: &str) -> Result<Option<TenantId>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Error::invalid("page_token", "is not a token this server issued");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    TenantId::parse("page_token", &text)
        .map(Some)
        .map_err(|_| invalid())
}

fn progress_message(p: RootRotationProgress) -> pb::RotateRootKeyProgress {
    pb::RotateRootKeyProgress {
        to: p.to,
        total: p.total,
        already_on_target: p.already_on_target,
        rewrapped: p.rewrapped,
        changed_concurrently: p.changed_concurrently,
        done: p.done,
    }
}

/// A request's `page_size`: 0 for the default, at most [`MAX_PAGE_SIZE`]
/// `things` per page.
fn page_size(asked: u32, things: &str) -> Result<u32, Status> {
    match asked {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => Err(Error::invalid(
            "page_size",
            format!("at most {MAX_PAGE_SIZE} {things} per page"),
        )
        .into()),
        n => Ok(n),
    }
}

/// Checks a policy from a request against the rules its fields document.
fn parse_policy(
    p: pb::TenantPolicy,
    limits: &crate::config::RequestLimits,
) -> Result<TenantPolicy, Error> {
    const HOUR: u64 = 3600;
    if p.rotation_period_seconds != 0 && p.rotation_period_seconds < HOUR {
        return Err(Error::invalid(
            "policy.rotation_period_seconds",
            "must be 0 (no automatic rotation) or at least 3600",
        ));
    }
    if p.retention_seconds != 0 {
        if p.retention_seconds < HOUR {
            return Err(Error::invalid(
                "policy.retention_seconds",
                "must be 0 (keep every version) or at least 3600",
            ));
        }
        if p.retention_seconds < p.rotation_period_seconds {
            return Err(Error::invalid(
                "policy.retention_seconds",
                "must be at least the rotation period",
            ));
        }
    }
    let subject_ids = SubjectIds::parse(&p.subject_ids).ok_or_else(|| {
        Error::invalid(
            "policy.subject_ids",
            "must be \"exact\" (or empty), \"nfc\" or \"nfc-casefold\"",
        )
    })?;
    if p.max_plaintext_bytes > limits.max_plaintext_bytes as u64 {
        return Err(Error::invalid(
            "policy.max_plaintext_bytes",
            format!(
                "must be at most the sidecar's limit of {} bytes",
                limits.max_plaintext_bytes
            ),
        ));
    }
    Ok(TenantPolicy {
        rotation_period_seconds: p.rotation_period_seconds,
        retention_seconds: p.retention_seconds,
        min_decrypt_version: p.min_decrypt_version,
        max_items_per_second: p.max_items_per_second,
        burst: p.burst,
        max_plaintext_bytes: p.max_plaintext_bytes,
        subject_ids,
        max_subjects: p.max_subjects,
    })
}

fn policy_message(p: &TenantPolicy) -> pb::TenantPolicy {
    pb::TenantPolicy {
        rotation_period_seconds: p.rotation_period_seconds,
        retention_seconds: p.retention_seconds,
        min_decrypt_version: p.min_decrypt_version,
        max_items_per_second: p.max_items_per_second,
        burst: p.burst,
        max_plaintext_bytes: p.max_plaintext_bytes,
        subject_ids: p.subject_ids.name().to_owned(),
        max_subjects: p.max_subjects,
    }
}

/// The stream RotateRootKey answers with.
type RotateRootKeyStream = ReceiverStream<Result<pb::RotateRootKeyProgress, Status>>;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    type RotateRootKeyStream = RotateRootKeyStream;

    async fn rotate_root_key(
        &self,
        request: Request<pb::RotateRootKeyRequest>,
    ) -> Result<Response<Self::RotateRootKeyStream>, Status> {
        self.call(
            "RotateRootKey",
            Permission::AdminRotate,
            request,
            async |r, _| {
                let region = parse_region(&r.region)?;
                let page_size = page_size(r.page_size, "keys")?;
                let to = (!r.to.is_empty()).then_some(r.to);
                let keys = self.shared.keys.clone();
                let (out, stream) = mpsc::channel(4);
                tokio::spawn(async move {
                    let (progress, mut updates) = mpsc::channel(4);
                    let forward = {
                        let out = out.clone();
                        tokio::spawn(async move {
                            while let Some(update) = updates.recv().await {
                                if out.send(Ok(progress_message(update))).await.is_err() {
                                    break;
                                }
                            }
                        })
                    };
                    let result = keys
                        .rotate_root(region.as_deref(), to.as_deref(), page_size, &progress)
                        .await;
                    drop(progress);
                    let _ = forward.await;
                    if let Err(e) = result {
                        let _ = out.send(Err(e.into())).await;
                    }
                });
                Ok(ReceiverStream::new(stream))
            },
        )
        .await
    }

    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.call(
            "CreateTenant",
            Permission::AdminCreate,
            request,
            async |r, _| {
                let id = TenantId::parse("tenant_id", &r.tenant_id)?;
                let placement = PlacementRequest {
                    root_key: parse_root_key(&r.root_key)?,
                    region: parse_region(&r.region)?,
                };
                let policy = parse_policy(r.policy.unwrap_or_default(), &self.shared.limits)?;
                let info = self
                    .shared
                    .keys
                    .create_tenant(&id, &placement, &policy)
                    .await?;
                Ok(self.tenant_info(info))
            },
        )
        .await
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.call("GetTenant", Permission::AdminRead, request, async |r, _| {
            let id = TenantId::parse("tenant_id", &r.tenant_id)?;
            let info = self.shared.keys.tenant_info(&id).await?;
            Ok(self.tenant_info(info))
        })
        .await
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        self.call(
            "ListTenants",
            Permission::AdminRead,
            request,
            async |r, _| {
                let size = page_size(r.page_size, "tenants")?;
                let after = parse_page_token(&r.page_token)?;
                // One more than asked tells whether another page follows.
                let mut records = self
                    .shared
                    .keys
                    .list_tenants(after.as_ref(), size + 1)
                    .await?;
                let more = records.len() > size as usize;
                records.truncate(size as usize);
                let next_page_token = match records.last() {
                    Some(last) if more => URL_SAFE_NO_PAD.encode(last.id.as_str()),
                    _ => String::new(),
                };
                Ok(pb::ListTenantsResponse {
                    tenants: records
                        .iter()
                        .map(|r| tenant_message(r, self.root_key_id(r), &[], &[]))
                        .collect(),
                    next_page_token,
                })
            },
        )
        .await
    }

    async fn rotate_tenant_key(
        &self,
        request: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.call(
            "RotateTenantKey",
            Permission::AdminRotate,
            request,
            async |r, _| {
                let id = TenantId::parse("tenant_id", &r.tenant_id)?;
                let info = self.shared.keys.rotate(&id).await?;
                Ok(self.tenant_info(info))
            },
        )
        .await
    }

    async fn shred_tenant(
        &self,
        request: Request<pb::ShredTenantRequest>,
    ) -> Result<Response<pb::ShredTenantResponse>, Status> {
        self.call(
            "ShredTenant",
            Permission::AdminShred,
            request,
            async |r, asked| {
                let id = TenantId::parse("tenant_id", &r.tenant_id)?;
                if r.confirm != r.tenant_id {
                    return Err(Error::invalid(
                        "confirm",
                        "must repeat tenant_id exactly; shredding destroys the tenant's keys for good",
                    )
                    .into());
                }
                let report = self.shared.keys.shred_tenant(&id).await?;
                if !report.shred.already_shredded {
                    metrics::counter!(SHREDS, "kind" => "tenant").increment(1);
                }
                let shred = &report.shred;
                let dedicated = report.placement.tier == Tier::Dedicated;
                let root_key_id = match (&report.placement.root_key, dedicated) {
                    (Some(key), true) => key.clone(),
                    _ => String::new(),
                };
                let receipt = self.receipt(Receipt {
                    kind: ReceiptKind::Tenant,
                    tenant: id.to_string(),
                    subject: None,
                    shredded_at: shred.at.to_string(),
                    already_shredded: shred.already_shredded,
                    destroyed_key_versions: shred.destroyed_key_versions,
                    destroyed_subject_keys: shred.destroyed_subject_keys,
                    by: asked.caller.identity,
                    audit_record: asked.record,
                    backups_may_hold_copies_until: self.backups_until(shred.at),
                    root_key_id: (!root_key_id.is_empty()).then(|| root_key_id.clone()),
                    root_key_deletion_date: report.root_key_deletion.map(|d| d.to_string()),
                    ..Receipt::default()
                });
                Ok(pb::ShredTenantResponse {
                    tenant_id: id.to_string(),
                    shredded_at: Some(timestamp(shred.at)),
                    already_shredded: shred.already_shredded,
                    destroyed_key_versions: shred.destroyed_key_versions,
                    destroyed_subject_keys: shred.destroyed_subject_keys,
                    root_key_id,
                    root_key_deletion_date: report.root_key_deletion.map(timestamp),
                    receipt,
                })
            },
        )
        .await
    }

    async fn shred_subject(
        &self,
        request: Request<pb::ShredSubjectRequest>,
    ) -> Result<Response<pb::ShredSubjectResponse>, Status> {
        let r = request.get_ref();
        // The audit record hashes the subject id as the tenant's rule makes
        // it, as the receipt does (the id as given if the tenant is unknown).
        let subject = match (
            TenantId::parse("tenant_id", &r.tenant_id),
            SubjectId::parse("subject_id", &r.subject_id),
        ) {
            (Ok(id), Ok(subject)) => match self.shared.keys.subject_id_rule(&id).await {
                Ok(rule) => rule.apply(&subject).into_owned(),
                Err(_) => r.subject_id.as_bytes().to_vec(),
            },
            _ => r.subject_id.as_bytes().to_vec(),
        };
        let shred = async |r: pb::ShredSubjectRequest, asked: Asked| {
            let id = TenantId::parse("tenant_id", &r.tenant_id)?;
            let subject = SubjectId::parse("subject_id", &r.subject_id)?;
            let (shred, rule) = self.shared.keys.shred_subject(&id, &subject).await?;
            if !shred.already_shredded {
                metrics::counter!(SHREDS, "kind" => "subject").increment(1);
            }
            let receipt = self.receipt(Receipt {
                kind: ReceiptKind::Subject,
                tenant: id.to_string(),
                subject: Some(self.shared.audit.subject_hash(&rule.apply(&subject))),
                subject_ids: Some(rule.name().to_owned()),
                shredded_at: shred.at.to_string(),
                already_shredded: shred.already_shredded,
                destroyed_key_versions: 0,
                destroyed_subject_keys: u64::from(shred.key_destroyed),
                by: asked.caller.identity,
                audit_record: asked.record,
                backups_may_hold_copies_until: self.backups_until(shred.at),
                ..Receipt::default()
            });
            Ok(pb::ShredSubjectResponse {
                shredded_at: Some(timestamp(shred.at)),
                already_shredded: shred.already_shredded,
                key_destroyed: shred.key_destroyed,
                receipt,
            })
        };
        self.call_about(
            "ShredSubject",
            Permission::AdminShred,
            request,
            Some(subject),
            shred,
        )
        .await
    }

    async fn update_tenant_policy(
        &self,
        request: Request<pb::UpdateTenantPolicyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.call("UpdateTenantPolicy", Permission::AdminPolicy, request, async |r, _| {
            let id = TenantId::parse("tenant_id", &r.tenant_id)?;
            let requested = r.policy.unwrap_or_default();
            let keep_rule = requested.subject_ids.is_empty();
            let mut policy = parse_policy(requested, &self.shared.limits)?;
            let current = self.shared.keys.subject_id_rule(&id).await?;
            if keep_rule {
                policy.subject_ids = current;
            }
            if policy.subject_ids != current {
                return Err(Error::FailedPrecondition(format!(
                    "policy.subject_ids is fixed when the tenant is created (tenant {id} uses \"{}\"): \
                     changing it would give every subject another key id",
                    current.name()
                ))
                .into());
            }
            let info = self.shared.keys.update_policy(&id, &policy).await?;
            Ok(self.tenant_info(info))
        })
        .await
    }

    async fn get_audit_head(
        &self,
        request: Request<pb::GetAuditHeadRequest>,
    ) -> Result<Response<pb::AuditHead>, Status> {
        self.call(
            "GetAuditHead",
            Permission::AuditRead,
            request,
            async |_, _| {
                let (records, head) = self
                    .shared
                    .audit
                    .head()
                    .await
                    .map_err(|e| Error::unavailable(Dependency::AuditLog, e))?;
                Ok(pb::AuditHead {
                    records,
                    head,
                    receipt_public_key: self.shared.receipts.public_key(),
                })
            },
        )
        .await
    }

    async fn rotate_index_key(
        &self,
        request: Request<pb::RotateIndexKeyRequest>,
    ) -> Result<Response<pb::IndexKeys>, Status> {
        self.call(
            "RotateIndexKey",
            Permission::AdminRotate,
            request,
            async |r, _| {
                let id = TenantId::parse("tenant_id", &r.tenant_id)?;
                let info = self.shared.keys.rotate_blind_index_key(&id).await?;
                Ok(index_keys(&id, &info))
            },
        )
        .await
    }

    async fn retire_index_key(
        &self,
        request: Request<pb::RetireIndexKeyRequest>,
    ) -> Result<Response<pb::IndexKeys>, Status> {
        self.call(
            "RetireIndexKey",
            Permission::AdminRotate,
            request,
            async |r, _| {
                let id = TenantId::parse("tenant_id", &r.tenant_id)?;
                if r.version == 0 {
                    return Err(Error::invalid("version", "must be 1 or more").into());
                }
                let info = self
                    .shared
                    .keys
                    .retire_blind_index_key(&id, r.version)
                    .await?;
                Ok(index_keys(&id, &info))
            },
        )
        .await
    }

    async fn get_index_keys(
        &self,
        request: Request<pb::GetIndexKeysRequest>,
    ) -> Result<Response<pb::IndexKeys>, Status> {
        self.call(
            "GetIndexKeys",
            Permission::AdminRead,
            request,
            async |r, _| {
                let id = TenantId::parse("tenant_id", &r.tenant_id)?;
                let info = self.shared.keys.blind_index_key_info(&id).await?;
                Ok(index_keys(&id, &info))
            },
        )
        .await
    }
}

/// A tenant's blind-index key versions as the API answers them.
fn index_keys(id: &TenantId, info: &BlindIndexKeyInfo) -> pb::IndexKeys {
    pb::IndexKeys {
        tenant_id: id.to_string(),
        primary_version: info.primary_version(),
        versions: info
            .versions
            .iter()
            .map(|record| pb::IndexKeyVersion {
                version: record.version,
                created_at: Some(timestamp(record.created_at)),
                retired: matches!(record.state, BlindIndexKeyState::Retired { .. }),
                retired_at: match record.state {
                    BlindIndexKeyState::Retired { at } => Some(timestamp(at)),
                    BlindIndexKeyState::Live { .. } => None,
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_and_are_bounded() {
        assert_eq!(page_size(0, "tenants").unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(1, "tenants").unwrap(), 1);
        assert_eq!(page_size(MAX_PAGE_SIZE, "keys").unwrap(), MAX_PAGE_SIZE);
        let refused = page_size(MAX_PAGE_SIZE + 1, "keys").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert_eq!(refused.message(), "page_size: at most 1000 keys per page");
    }
}
