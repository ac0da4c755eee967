//! The gRPC API: `keywarden.v1.Crypto` (data plane) and `keywarden.v1.Admin`
//! (control plane), as thin translations to [`crate::keys::KeyManager`].
//! Validation of request fields happens here, at the edge; errors become a
//! `tonic::Status` in one place, [`status`].

pub mod admin;
pub mod budget;
pub mod codec;
pub mod crypto;
pub mod datakeys;
pub mod edge;
pub mod status;
pub mod streams;

use std::sync::Arc;

use tonic::{Request, Status};

use crate::{
    audit::{AuditLog, Entry, Phase, counts::Counts},
    auth::{Caller, Guard, Permission},
    config::{DataPlaneAudit, RequestLimits, ServerConfig},
    envelope::Context,
    error::{Dependency, Error},
    ids::TenantId,
    keys::KeyManager,
    observe::metrics::Refusal,
    rate::TenantLimiter,
    receipt::ReceiptSigner,
};

pub mod pb;

/// Most entries in a context map.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
/// Longest context key or value, in bytes.
pub const MAX_CONTEXT_FIELD_BYTES: usize = 1024;

/// What both services share.
#[derive(Clone)]
pub struct Shared {
    pub keys: Arc<KeyManager>,
    pub limits: RequestLimits,
    /// Connections and calls: the edge's limits and timeouts.
    pub server: ServerConfig,
    /// Every Admin call is recorded here; admin calls fail closed without it.
    pub audit: Arc<AuditLog>,
    /// Which data-plane calls are recorded, and the counts when counted.
    pub data_plane_audit: DataPlaneAudit,
    pub counts: Arc<Counts>,
    pub guard: Arc<Guard>,
    pub limiter: Arc<TenantLimiter>,
    /// Signs erasure receipts.
    pub receipts: Arc<ReceiptSigner>,
    /// Stated in erasure receipts: how long keystore backups are kept.
    pub backup_retention: std::time::Duration,
    /// Per-tenant call counts (`[admin] tenant_metrics`); None: off.
    pub tenant_metrics: Option<Arc<crate::observe::metrics::TenantLabels>>,
}

impl Shared {
    /// Authorizes a call the edge admitted ([`edge`]: the caller is
    /// authenticated, and may do `permission` for some tenant) for the
    /// tenant its body names. An invalid tenant id is INVALID_ARGUMENT
    /// (naming the field, never echoing the value); a refusal is counted in
    /// the audit log and returned.
    pub fn admit<T>(
        &self,
        request: &Request<T>,
        action: &'static str,
        permission: Permission,
        tenant: Option<&str>,
    ) -> Result<Caller, Status> {
        let caller = caller_of(request, action)?;
        if let Some(tenant) = tenant {
            TenantId::parse("tenant_id", tenant)?;
            crate::observe::trace::record_tenant(tenant);
        }
        if let Err(e) = self.guard.authorize(&caller, permission, tenant) {
            self.count_refusal(action, &caller.identity, tenant, &e);
            return Err(e.into());
        }
        Ok(caller)
    }

    /// [`Shared::admit`] for a unary call, for the tenant its body names;
    /// answers the caller and the body.
    pub(crate) fn admit_request<T: TenantRequest>(
        &self,
        request: Request<T>,
        action: &'static str,
        permission: Permission,
    ) -> Result<(Caller, T), Status> {
        let caller = self.admit(&request, action, permission, request.get_ref().tenant_id())?;
        Ok((caller, request.into_inner()))
    }

    /// Counts a call refused before it ran (authentication, authorization),
    /// per interval, caller, tenant and code: a flood of refusals is a
    /// counter, not a record and a disk sync each.
    pub fn count_refusal(
        &self,
        action: &'static str,
        caller: &str,
        tenant: Option<&str>,
        error: &Error,
    ) {
        crate::observe::metrics::refused(match error {
            Error::Unauthenticated(_) => Refusal::Authentication,
            _ => Refusal::Authorization,
        });
        self.counts.refused(
            action,
            tenant,
            caller,
            status::code_name(status::code(error)),
        );
    }

    /// Records a data-plane call that ran, as `audit.data_plane` says. In
    /// "every" mode the answer waits for its record; if the record cannot be
    /// written the caller gets UNAVAILABLE instead of the answer. Refusals
    /// for a tenant's rate limit are counted in every mode.
    pub async fn record_data_plane<R>(
        &self,
        action: &'static str,
        caller: &Caller,
        tenant: &str,
        result: Result<R, Status>,
    ) -> Result<R, Status> {
        let outcome = match &result {
            Ok(_) => "OK",
            Err(status) => status::code_name(status.code()),
        };
        if let Some(tenants) = &self.tenant_metrics
            && TenantId::parse("tenant_id", tenant).is_ok()
        {
            tenants.record(tenant, action, outcome);
        }
        // Rate-limit refusals are always counted, never recorded one by one:
        // a tenant flooding past its limit must not flood the log (or wait
        // on its disk) too.
        let mode = if outcome == "RESOURCE_EXHAUSTED" {
            DataPlaneAudit::Counts
        } else {
            self.data_plane_audit
        };
        match mode {
            DataPlaneAudit::Off => {}
            DataPlaneAudit::Counts => {
                // The tenant id as given, only if valid; no allocation per call.
                let tenant = Some(tenant).filter(|t| TenantId::parse("tenant_id", t).is_ok());
                self.counts.add(action, tenant, &caller.identity, outcome);
            }
            DataPlaneAudit::Every => {
                let entry = Entry {
                    action,
                    phase: Phase::Answered,
                    caller: caller.identity.clone(),
                    tenant: valid_tenant(Some(tenant)),
                    outcome: Some(outcome.to_owned()),
                    trace_id: current_trace_id(),
                    ..Entry::default()
                };
                if let Err(e) = self.audit.record(entry).await {
                    return Err(Error::unavailable(Dependency::AuditLog, e).into());
                }
            }
        }
        result
    }
    fn check_plaintext(&self, field: &'static str, plaintext: &[u8]) -> Result<(), Error> {
        if plaintext.len() > self.limits.max_plaintext_bytes {
            crate::observe::metrics::refused(Refusal::Size);
            return Err(Error::invalid(
                field,
                format!(
                    "is {} bytes; the limit is {} bytes",
                    plaintext.len(),
                    self.limits.max_plaintext_bytes
                ),
            ));
        }
        Ok(())
    }

    fn check_batch(&self, items: usize) -> Result<(), Error> {
        if items == 0 {
            return Err(Error::invalid("items", "a batch needs at least one item"));
        }
        if items > self.limits.max_batch_items {
            return Err(Error::invalid(
                "items",
                format!(
                    "{items} items; the limit is {} per batch",
                    self.limits.max_batch_items
                ),
            ));
        }
        Ok(())
    }
}

/// A unary request's body, and the tenant it names: every data-plane
/// request names one; an admin request about no single tenant
/// (RotateRootKey, ListTenants, GetAuditHead) names none.
pub(crate) trait TenantRequest {
    fn tenant_id(&self) -> Option<&str>;
}

macro_rules! tenant_requests {
    (naming: $($t:ty),*; none: $($n:ty),*) => {
        $(impl TenantRequest for $t {
            fn tenant_id(&self) -> Option<&str> {
                Some(&self.tenant_id)
            }
        })*
        $(impl TenantRequest for $n {
            fn tenant_id(&self) -> Option<&str> {
                None
            }
        })*
    };
}

tenant_requests!(
    naming:
    pb::EncryptRequest,
    pb::DecryptRequest,
    pb::EncryptBatchRequest,
    pb::DecryptBatchRequest,
    pb::RewrapRequest,
    pb::GenerateDataKeyRequest,
    pb::DecryptDataKeyRequest,
    pb::RewrapDataKeyRequest,
    pb::CreateTenantRequest,
    pb::GetTenantRequest,
    pb::RotateTenantKeyRequest,
    pb::ShredTenantRequest,
    pb::ShredSubjectRequest,
    pb::UpdateTenantPolicyRequest,
    pb::BlindIndexRequest,
    pb::BlindIndexBatchRequest,
    pb::RotateIndexKeyRequest,
    pb::RetireIndexKeyRequest,
    pb::GetIndexKeysRequest;
    none:
    pb::RotateRootKeyRequest,
    pb::ListTenantsRequest,
    pb::GetAuditHeadRequest
);

/// The trace id of the call being served, as audit records write it.
fn current_trace_id() -> Option<String> {
    crate::observe::trace::current_trace_id().map(|id| id.to_string())
}

/// The caller the edge authenticated ([`edge`]); every keywarden method
/// passes the edge, which puts it in the request's extensions.
fn caller_of<T>(request: &Request<T>, action: &str) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            Error::internal(format!("{action} arrived without an authenticated caller")).into()
        })
}

/// Context keys in this namespace are keywarden's own: refused from callers,
/// at every entry point that takes a context, so that no caller can present
/// a context that keywarden uses (or once used) for keys it stores.
pub const RESERVED_CONTEXT_PREFIX: &str = "keywarden.";

/// Checks a context map's shape. Its contents are not echoed: they may
/// identify records.
fn check_context(context: &Context) -> Result<(), Error> {
    if context.len() > MAX_CONTEXT_ENTRIES {
        return Err(Error::invalid(
            "context",
            format!(
                "{} entries; at most {MAX_CONTEXT_ENTRIES} are allowed",
                context.len()
            ),
        ));
    }
    for (key, value) in context {
        if key.is_empty() {
            return Err(Error::invalid("context", "keys must not be empty"));
        }
        if key.starts_with(RESERVED_CONTEXT_PREFIX) {
            return Err(Error::invalid(
                "context",
                format!("keys beginning with \"{RESERVED_CONTEXT_PREFIX}\" are reserved"),
            ));
        }
        if key.len() > MAX_CONTEXT_FIELD_BYTES || value.len() > MAX_CONTEXT_FIELD_BYTES {
            return Err(Error::invalid(
                "context",
                format!("keys and values are limited to {MAX_CONTEXT_FIELD_BYTES} bytes"),
            ));
        }
    }
    Ok(())
}

/// The tenant id for an audit record: only a valid one (an invalid one
/// could be anything, including data pasted into the wrong field).
fn valid_tenant(tenant: Option<&str>) -> Option<String> {
    tenant
        .filter(|t| TenantId::parse("tenant_id", t).is_ok())
        .map(str::to_owned)
}

fn timestamp(at: crate::time::UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.0.div_euclid(1000),
        nanos: i32::try_from(at.0.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}
