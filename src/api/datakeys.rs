//! `Crypto.GenerateDataKey`, `DecryptDataKey`, `RewrapDataKey`: data keys
//! for client-side encryption ([`crate::keys::KeyManager::generate_data_key`]).
//! Each is one item against the tenant's rate limit, and audited and metered
//! as Decrypt is (`audit.data_plane`; the gRPC metrics by method name). The
//! permission is `datakey`, checked at the edge and here for the tenant.

use tonic::{Request, Response, Status};

use super::{Shared, check_context, pb};
use crate::{
    auth::Permission,
    error::Error,
    ids::{SubjectId, TenantId},
    keys::ActiveTenant,
};

/// The tenant a call names, active, with one item taken from its rate.
async fn tenant(shared: &Shared, raw: &str) -> Result<ActiveTenant, Error> {
    let id = TenantId::parse("tenant_id", raw)?;
    let tenant = shared.keys.active_tenant(&id).await?;
    shared.limiter.check(&tenant.id, tenant.rate(), 1)?;
    Ok(tenant)
}

pub async fn generate(
    shared: &Shared,
    request: Request<pb::GenerateDataKeyRequest>,
) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
    const ACTION: &str = "GenerateDataKey";
    let (caller, r) = shared.admit_request(request, ACTION, Permission::DataKey)?;
    let result = async {
        let subject = match r.subject_id.as_str() {
            "" => None,
            raw => Some(SubjectId::parse("subject_id", raw)?),
        };
        check_context(&r.context)?;
        let tenant = tenant(shared, &r.tenant_id).await?;
        let made = shared
            .keys
            .generate_data_key(&tenant, subject.as_ref(), &r.context)
            .await?;
        Ok(Response::new(pb::GenerateDataKeyResponse {
            data_key: made.key.expose().to_vec(),
            wrapped_data_key: made.wrapped,
            key_version: made.key_version,
        }))
    }
    .await;
    shared
        .record_data_plane(ACTION, &caller, &r.tenant_id, result)
        .await
}

pub async fn decrypt(
    shared: &Shared,
    request: Request<pb::DecryptDataKeyRequest>,
) -> Result<Response<pb::DecryptDataKeyResponse>, Status> {
    const ACTION: &str = "DecryptDataKey";
    let (caller, r) = shared.admit_request(request, ACTION, Permission::DataKey)?;
    let result = async {
        check_context(&r.context)?;
        let tenant = tenant(shared, &r.tenant_id).await?;
        let opened = shared
            .keys
            .decrypt_data_key(&tenant, &r.context, &r.wrapped_data_key)
            .await?;
        Ok(Response::new(pb::DecryptDataKeyResponse {
            data_key: opened.key.expose().to_vec(),
            key_version: opened.key_version,
        }))
    }
    .await;
    shared
        .record_data_plane(ACTION, &caller, &r.tenant_id, result)
        .await
}

pub async fn rewrap(
    shared: &Shared,
    request: Request<pb::RewrapDataKeyRequest>,
) -> Result<Response<pb::RewrapDataKeyResponse>, Status> {
    const ACTION: &str = "RewrapDataKey";
    let (caller, r) = shared.admit_request(request, ACTION, Permission::DataKey)?;
    let result = async {
        check_context(&r.context)?;
        let tenant = tenant(shared, &r.tenant_id).await?;
        let rewrapped = shared
            .keys
            .rewrap_data_key(&tenant, &r.context, &r.wrapped_data_key)
            .await?;
        Ok(Response::new(pb::RewrapDataKeyResponse {
            wrapped_data_key: rewrapped.wrapped,
            key_version: rewrapped.key_version,
            previous_key_version: rewrapped.previous_key_version,
        }))
    }
    .await;
    shared
        .record_data_plane(ACTION, &caller, &r.tenant_id, result)
        .await
}
