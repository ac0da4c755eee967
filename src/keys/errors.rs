//! Keystore and KMS errors as the crate's [`Error`]: what the caller may
//! fix, what is unavailable, and what is internal.

use crate::{
    error::{Dependency, Error},
    ids::TenantId,
    kms::KmsError,
    store::StoreError,
};

pub(super) fn kms_error(tenant: &TenantId, e: KmsError) -> Error {
    match e {
        KmsError::Unavailable(detail) => Error::unavailable(Dependency::RootKey, detail),
        KmsError::Refused => Error::internal(format!(
            "the root key refused to unwrap a key of tenant {tenant}: the keystore row is corrupt or was moved"
        )),
        KmsError::Unsupported(message) => Error::FailedPrecondition(message),
        KmsError::KeyNotUsable(detail) => Error::RootKeyUnusable {
            tenant: tenant.clone(),
            detail,
        },
        KmsError::Failed(detail) => Error::internal(detail),
    }
}

/// A KMS error while placing a new tenant: a key or region the caller named
/// is the caller's to fix.
pub(super) fn placement_error(field: &'static str, e: KmsError) -> Error {
    match e {
        KmsError::KeyNotUsable(reason) => Error::invalid(field, reason),
        KmsError::Unsupported(message) => Error::FailedPrecondition(message),
        KmsError::Unavailable(detail) => Error::unavailable(Dependency::RootKey, detail),
        KmsError::Refused | KmsError::Failed(_) => Error::internal(e),
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TenantNotFound(id) => Error::TenantNotFound(id),
            StoreError::TenantExists(id) => Error::TenantExists(id),
            StoreError::TenantShredded { tenant, at } => Error::TenantShredded { tenant, at },
            StoreError::Conflict => Error::internal("unexpected keystore conflict"),
            StoreError::SubjectQuota { tenant, max } => Error::ResourceExhausted {
                reason: format!(
                    "tenant {tenant} holds its quota of {max} subject keys (policy.max_subjects): \
                     a new subject needs a shred of another or a larger quota"
                ),
                retry_after: None,
            },
            StoreError::Unavailable(detail) => Error::unavailable(Dependency::Keystore, detail),
            StoreError::Corrupt(detail) => Error::internal(detail),
        }
    }
}
