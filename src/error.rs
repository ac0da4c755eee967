//! The crate's one error type. `api::status` maps it to gRPC codes in one
//! exhaustive match. Messages are for the caller: they name fields and ids,
//! never secret input (plaintext, ciphertext, key bytes, subject ids).
//! Internal details (a database error, a KMS error) go to the log where the
//! error is made, not into the message.

use std::fmt;

use thiserror::Error;

use crate::{ids::TenantId, time::UnixMillis};

/// The outside systems keywarden depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// The root-key provider (local root key file, or AWS KMS).
    RootKey,
    /// The keystore (SQLite, or PostgreSQL).
    Keystore,
    /// The audit log: admin calls are refused while it cannot be written.
    AuditLog,
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dependency::RootKey => "the root-key provider (KMS)",
            Dependency::Keystore => "the keystore",
            Dependency::AuditLog => "the audit log",
        })
    }
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A malformed request field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// A ciphertext that fails to parse or authenticate, whatever the reason:
    /// tampering, truncation, another tenant, another context. One message.
    #[error(
        "ciphertext could not be decrypted: it is malformed, was altered, or was made for another tenant or context"
    )]
    Undecryptable,

    #[error("tenant {0} does not exist")]
    TenantNotFound(TenantId),

    #[error("tenant {0} already exists")]
    TenantExists(TenantId),

    #[error(
        "tenant {tenant} was shredded at {at}: its keys are destroyed and its id cannot be reused"
    )]
    TenantShredded { tenant: TenantId, at: UnixMillis },

    #[error(
        "the data subject's key in tenant {tenant} was shredded at {at}: its data can no longer be encrypted or decrypted"
    )]
    SubjectShredded { tenant: TenantId, at: UnixMillis },

    #[error("key version {version} of tenant {tenant} no longer exists")]
    KeyVersionGone { tenant: TenantId, version: u32 },

    /// The request cannot be carried out in the sidecar's present set-up
    /// (e.g. the local provider has no per-tenant keys); the message says why.
    #[error("{0}")]
    FailedPrecondition(String),

    /// A tenant's root key is disabled, missing or pending deletion in KMS.
    #[error("the root key of tenant {tenant} cannot be used: {detail}")]
    RootKeyUnusable { tenant: TenantId, detail: String },

    /// A change lost too many races to concurrent changes of the same tenant.
    #[error("tenant {0} was changed concurrently too many times; retry")]
    Aborted(TenantId),

    /// No credential, or one that fails (expired, wrongly signed, unknown).
    #[error("{0}")]
    Unauthenticated(String),

    /// The caller is known but the policy does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),

    /// A tenant's rate or size limit; `retry_after` when waiting helps.
    #[error("{reason}")]
    ResourceExhausted {
        reason: String,
        retry_after: Option<std::time::Duration>,
    },

    /// A dependency did not answer; retrying later may succeed.
    #[error("{0} is unavailable; retry later")]
    Unavailable(Dependency),

    /// A bug or a corrupt keystore. The message says only that; the log has
    /// the details.
    #[error("internal error; the sidecar's log has the details")]
    Internal,
}

impl From<crate::ids::InvalidId> for Error {
    fn from(e: crate::ids::InvalidId) -> Self {
        Error::invalid(e.field, e.reason)
    }
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Logs `detail` (which may hold internal information but never secrets)
    /// and returns [`Error::Internal`].
    pub fn internal(detail: impl fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Error::Internal
    }

    /// Logs `detail` and returns [`Error::Unavailable`].
    pub fn unavailable(dependency: Dependency, detail: impl fmt::Display) -> Self {
        tracing::warn!(%dependency, %detail, "dependency unavailable");
        Error::Unavailable(dependency)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
