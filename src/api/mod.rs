//! The gRPC API: `keywarden.v1.Crypto` (data plane) and `keywarden.v1.Admin`
//! (control plane), as thin translations to [`crate::keys::KeyManager`].
//! Validation of request fields happens here, at the edge; errors become a
//! `tonic::Status` in one place, [`status`].

pub mod admin;
pub mod crypto;
pub mod status;

use std::sync::Arc;

use crate::{audit::AuditLog, config::Limits, envelope::Context, error::Error, keys::KeyManager};

/// The generated protobuf types and service stubs.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("keywarden.v1");

    /// The encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keywarden_descriptor");
}

/// Most entries in a context map.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
/// Longest context key or value, in bytes.
pub const MAX_CONTEXT_FIELD_BYTES: usize = 1024;

/// What both services share.
#[derive(Clone)]
pub struct Shared {
    pub keys: Arc<KeyManager>,
    pub limits: Limits,
    /// Every Admin call is recorded here; admin calls fail closed without it.
    pub audit: Arc<AuditLog>,
}

impl Shared {
    fn check_plaintext(&self, field: &'static str, plaintext: &[u8]) -> Result<(), Error> {
        if plaintext.len() > self.limits.max_plaintext_bytes {
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
        if key.len() > MAX_CONTEXT_FIELD_BYTES || value.len() > MAX_CONTEXT_FIELD_BYTES {
            return Err(Error::invalid(
                "context",
                format!("keys and values are limited to {MAX_CONTEXT_FIELD_BYTES} bytes"),
            ));
        }
    }
    Ok(())
}

fn timestamp(at: crate::store::UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.0.div_euclid(1000),
        nanos: i32::try_from(at.0.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}
