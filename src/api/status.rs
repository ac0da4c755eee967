//! The one mapping from [`Error`] to gRPC status codes. Exhaustive, no
//! wildcard: a new error variant does not compile until it has a code.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

pub fn code(error: &Error) -> Code {
    match error {
        Error::InvalidArgument { .. } | Error::Undecryptable => Code::InvalidArgument,
        Error::TenantNotFound(_) => Code::NotFound,
        Error::TenantExists(_) => Code::AlreadyExists,
        Error::TenantShredded { .. }
        | Error::SubjectShredded { .. }
        | Error::KeyVersionGone { .. }
        | Error::FailedPrecondition(_)
        | Error::RootKeyUnusable { .. } => Code::FailedPrecondition,
        Error::Aborted(_) => Code::Aborted,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::ResourceExhausted { .. } => Code::ResourceExhausted,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Internal => Code::Internal,
    }
}

impl From<crate::ids::InvalidId> for Status {
    fn from(e: crate::ids::InvalidId) -> Self {
        Error::from(e).into()
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        if let Error::ResourceExhausted {
            retry_after: Some(after),
            ..
        } = &error
        {
            // google.rpc.RetryInfo, which gRPC clients and proxies understand,
            // and the same figure in plain metadata for everyone else.
            let details = ErrorDetails::with_retry_info(Some(*after));
            let mut status = Status::with_error_details(code(&error), error.to_string(), details);
            if let Ok(value) = after.as_millis().to_string().parse() {
                status.metadata_mut().insert("retry-after-ms", value);
            }
            return status;
        }
        Status::new(code(&error), error.to_string())
    }
}

/// The canonical upper-case name of a code, as the CLI prints it (and the
/// `grpc_code` label).
pub use crate::observe::grpc::code_name;
