//! `keywarden.v1.Admin`: tenants, rotation, shredding.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tonic::{Request, Response, Status};

use super::{Shared, pb, timestamp};
use crate::{
    error::Error,
    ids::{SubjectId, TenantId},
    keys::TenantInfo,
    store::{TenantRecord, TenantState},
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

fn tenant_message(record: &TenantRecord, versions: &[crate::store::TenantKeyRecord]) -> pb::Tenant {
    let (state, primary, shredded_at) = match &record.state {
        TenantState::Active {
            primary_version, ..
        } => (pb::TenantState::Active, *primary_version, None),
        TenantState::Shredded { at } => (pb::TenantState::Shredded, 0, Some(timestamp(*at))),
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
    }
}

fn tenant_info(info: TenantInfo) -> pb::Tenant {
    tenant_message(&info.record, &info.versions)
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

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = TenantId::parse("tenant_id", &request.get_ref().tenant_id)?;
        let info = self.shared.keys.create_tenant(&id).await?;
        Ok(Response::new(tenant_info(info)))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = TenantId::parse("tenant_id", &request.get_ref().tenant_id)?;
        let info = self.shared.keys.tenant_info(&id).await?;
        Ok(Response::new(tenant_info(info)))
    }

    async fn list_tenants(
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
            tenants: records.iter().map(|r| tenant_message(r, &[])).collect(),
            next_page_token,
        }))
    }

    async fn rotate_tenant_key(
        &self,
        request: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = TenantId::parse("tenant_id", &request.get_ref().tenant_id)?;
        let info = self.shared.keys.rotate(&id).await?;
        Ok(Response::new(tenant_info(info)))
    }

    async fn shred_tenant(
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
        let shred = self.shared.keys.shred_tenant(&id).await?;
        Ok(Response::new(pb::ShredTenantResponse {
            tenant_id: id.to_string(),
            shredded_at: Some(timestamp(shred.at)),
            already_shredded: shred.already_shredded,
            destroyed_key_versions: shred.destroyed_key_versions,
            destroyed_subject_keys: shred.destroyed_subject_keys,
        }))
    }

    async fn shred_subject(
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
