//! `keywarden.v1.Admin`: tenants, rotation, shredding.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Shared, pb, status::code_name, timestamp};
use crate::{
    audit::Entry,
    error::{Dependency, Error},
    ids::{SubjectId, TenantId},
    keys::{PlacementRequest, RootKeyChoice, RootRotationProgress, TenantInfo},
    store::{TenantRecord, TenantState, Tier},
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
    }
}

fn tier(tier: Tier) -> pb::TenantTier {
    match tier {
        Tier::Shared => pb::TenantTier::Shared,
        Tier::Dedicated => pb::TenantTier::Dedicated,
        Tier::Customer => pb::TenantTier::Customer,
    }
}

impl AdminService {
    /// What the audit log records of a request: the caller (the transport's
    /// peer until authentication exists), the tenant if its id is valid, and
    /// the subject id (written only as a keyed hash).
    fn entry<T>(
        &self,
        action: &'static str,
        request: &Request<T>,
        tenant: Option<String>,
        subject: Option<Vec<u8>>,
    ) -> Entry {
        Entry {
            action,
            caller: request
                .remote_addr()
                .map_or_else(|| "unix socket".to_owned(), |addr| format!("tcp {addr}")),
            tenant: tenant.filter(|t| TenantId::parse("tenant_id", t).is_ok()),
            subject: subject.filter(|s| !s.is_empty()),
            ..Entry::default()
        }
    }

    /// Records that the call was asked (refusing it if that cannot be
    /// written), runs it, and records its outcome.
    async fn audited<T>(
        &self,
        entry: Entry,
        call: impl std::future::Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Response<T>, Status> {
        if let Err(e) = self.shared.audit.record(entry.clone()).await {
            return Err(Error::unavailable(Dependency::AuditLog, e).into());
        }
        let result = call.await;
        let outcome = match &result {
            Ok(_) => "OK",
            Err(status) => code_name(status.code()),
        };
        let answered = Entry {
            outcome: Some(outcome.to_owned()),
            ..entry
        };
        if let Err(e) = self.shared.audit.record(answered).await {
            // The change is made; the next call will be refused until the
            // log can be written again.
            tracing::error!(error = %e, "the audit log could not record an outcome");
        }
        result
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
        tenant_message(&info.record, root_key_id, &info.versions)
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

impl AdminService {
    async fn handle_rotate_root_key(
        &self,
        request: Request<pb::RotateRootKeyRequest>,
    ) -> Result<Response<RotateRootKeyStream>, Status> {
        let r = request.into_inner();
        let region = parse_region(&r.region)?;
        let page_size = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("at most {MAX_PAGE_SIZE} keys per page"),
                )
                .into());
            }
            n => n,
        };
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
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn handle_create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = request.get_ref();
        let id = TenantId::parse("tenant_id", &r.tenant_id)?;
        let placement = PlacementRequest {
            root_key: parse_root_key(&r.root_key)?,
            region: parse_region(&r.region)?,
        };
        let info = self.shared.keys.create_tenant(&id, &placement).await?;
        Ok(Response::new(self.tenant_info(info)))
    }

    async fn handle_get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = TenantId::parse("tenant_id", &request.get_ref().tenant_id)?;
        let info = self.shared.keys.tenant_info(&id).await?;
        Ok(Response::new(self.tenant_info(info)))
    }

    async fn handle_list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let r = request.into_inner();
        let size = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("at most {MAX_PAGE_SIZE} tenants per page"),
                )
                .into());
            }
            n => n,
        };
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
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: records
                .iter()
                .map(|r| tenant_message(r, self.root_key_id(r), &[]))
                .collect(),
            next_page_token,
        }))
    }

    async fn handle_rotate_tenant_key(
        &self,
        request: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = TenantId::parse("tenant_id", &request.get_ref().tenant_id)?;
        let info = self.shared.keys.rotate(&id).await?;
        Ok(Response::new(self.tenant_info(info)))
    }

    async fn handle_shred_tenant(
        &self,
        request: Request<pb::ShredTenantRequest>,
    ) -> Result<Response<pb::ShredTenantResponse>, Status> {
        let r = request.into_inner();
        let id = TenantId::parse("tenant_id", &r.tenant_id)?;
        if r.confirm != r.tenant_id {
            return Err(Error::invalid(
                "confirm",
                "must repeat tenant_id exactly; shredding destroys the tenant's keys for good",
            )
            .into());
        }
        let report = self.shared.keys.shred_tenant(&id).await?;
        let shred = &report.shred;
        let dedicated = report.placement.tier == Tier::Dedicated;
        Ok(Response::new(pb::ShredTenantResponse {
            tenant_id: id.to_string(),
            shredded_at: Some(timestamp(shred.at)),
            already_shredded: shred.already_shredded,
            destroyed_key_versions: shred.destroyed_key_versions,
            destroyed_subject_keys: shred.destroyed_subject_keys,
            root_key_id: match (&report.placement.root_key, dedicated) {
                (Some(key), true) => key.clone(),
                _ => String::new(),
            },
            root_key_deletion_date: report.root_key_deletion.map(timestamp),
        }))
    }

    async fn handle_shred_subject(
        &self,
        request: Request<pb::ShredSubjectRequest>,
    ) -> Result<Response<pb::ShredSubjectResponse>, Status> {
        let r = request.into_inner();
        let id = TenantId::parse("tenant_id", &r.tenant_id)?;
        let subject = SubjectId::parse("subject_id", &r.subject_id)?;
        let shred = self.shared.keys.shred_subject(&id, &subject).await?;
        Ok(Response::new(pb::ShredSubjectResponse {
            shredded_at: Some(timestamp(shred.at)),
            already_shredded: shred.already_shredded,
            key_destroyed: shred.key_destroyed,
        }))
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
        let entry = self.entry("RotateRootKey", &request, None, None);
        self.audited(entry, self.handle_rotate_root_key(request))
            .await
    }

    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = request.get_ref();
        let entry = self.entry("CreateTenant", &request, Some(r.tenant_id.clone()), None);
        self.audited(entry, self.handle_create_tenant(request))
            .await
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = request.get_ref();
        let entry = self.entry("GetTenant", &request, Some(r.tenant_id.clone()), None);
        self.audited(entry, self.handle_get_tenant(request)).await
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let entry = self.entry("ListTenants", &request, None, None);
        self.audited(entry, self.handle_list_tenants(request)).await
    }

    async fn rotate_tenant_key(
        &self,
        request: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = request.get_ref();
        let entry = self.entry("RotateTenantKey", &request, Some(r.tenant_id.clone()), None);
        self.audited(entry, self.handle_rotate_tenant_key(request))
            .await
    }

    async fn shred_tenant(
        &self,
        request: Request<pb::ShredTenantRequest>,
    ) -> Result<Response<pb::ShredTenantResponse>, Status> {
        let r = request.get_ref();
        let entry = self.entry("ShredTenant", &request, Some(r.tenant_id.clone()), None);
        self.audited(entry, self.handle_shred_tenant(request)).await
    }

    async fn shred_subject(
        &self,
        request: Request<pb::ShredSubjectRequest>,
    ) -> Result<Response<pb::ShredSubjectResponse>, Status> {
        let r = request.get_ref();
        let entry = self.entry(
            "ShredSubject",
            &request,
            Some(r.tenant_id.clone()),
            Some(r.subject_id.as_bytes().to_vec()),
        );
        self.audited(entry, self.handle_shred_subject(request))
            .await
    }
}
