//! The root key: the seam between keywarden and whatever holds the key that
//! wraps every tenant key (a local root key file for development, AWS KMS in
//! production). Chosen once at start-up; swapped in tests.
//!
//! Every wrap and unwrap names a [`WrapContext`]: the tenant and what the key
//! is for. A provider binds it to the wrapped key (associated data locally, a
//! KMS encryption context in AWS), so a wrapped key presented for another
//! tenant, version or purpose is refused by the provider itself.

pub mod aws;
pub mod forward;
pub mod local;
pub mod metered;

use async_trait::async_trait;
use thiserror::Error;

use crate::{ids::TenantId, secret::Key256, time::UnixMillis};

/// What a wrapped key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A tenant key version, which seals the tenant's data and subject keys.
    TenantKey { version: u32 },
    /// The tenant's subject-index key, which hashes subject ids into subject
    /// key ids.
    SubjectIndex,
}

/// The binding of a wrapped key: which tenant, which purpose.
#[derive(Clone, Copy, Debug)]
pub struct WrapContext<'a> {
    pub tenant: &'a TenantId,
    pub purpose: Purpose,
}

impl WrapContext<'_> {
    /// The context as string pairs, in a fixed order: what AWS KMS calls the
    /// encryption context, and what the local provider authenticates.
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        let (purpose, version) = match self.purpose {
            Purpose::TenantKey { version } => ("tenant-key", version.to_string()),
            Purpose::SubjectIndex => ("subject-index", String::new()),
        };
        [
            ("keywarden:tenant", self.tenant.to_string()),
            ("keywarden:purpose", purpose.to_owned()),
            ("keywarden:version", version),
        ]
    }
}

/// A key wrapped by a root key: opaque bytes and the id of the root key that
/// can unwrap them.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub root_key_id: String,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("root_key_id", &self.root_key_id)
            .field("len", &self.ciphertext.len())
            .finish()
    }
}

/// A new data key: the key itself and its wrapped form.
#[derive(Debug)]
pub struct GeneratedKey {
    pub key: Key256,
    pub wrapped: WrappedKey,
}

#[derive(Debug, Error)]
pub enum KmsError {
    /// The provider could not be reached or did not answer in time. The
    /// string is for the log.
    #[error("root-key provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused to unwrap: the wrapped key is corrupt, was made
    /// by another root key, or is presented for another context.
    #[error("root-key provider refused to unwrap the key for this context")]
    Refused,
    /// The provider cannot do this at all (e.g. the local provider has no
    /// regions or per-tenant keys). The string is for the caller.
    #[error("{0}")]
    Unsupported(String),
    /// A root key the caller named is unknown, disabled, or elsewhere than
    /// required. The string is for the caller (it names only the key).
    #[error("{0}")]
    KeyNotUsable(String),
    /// The provider failed for another reason. The string is for the log.
    #[error("root-key provider failed: {0}")]
    Failed(String),
}

/// The root key. Implementations: [`local::LocalRootKey`] and
/// [`aws::AwsKms`]; in front of one, any [`forward::Forward`] (such as
/// [`metered::Metered`]).
///
/// A root key is named by a provider-specific id: `local:<hash>` for the
/// local key, a key ARN in AWS KMS. Every wrapped key records the id of the
/// root key that wrapped it.
#[async_trait]
pub trait RootKeyProvider: Send + Sync + 'static {
    /// A short name for logs: "local", "aws".
    fn kind(&self) -> &'static str;

    /// The shared root key for tenants placed in `region` (`None`: the
    /// default region).
    fn shared_key(&self, region: Option<&str>) -> Result<String, KmsError>;

    /// Checks that a root key the caller names (id, ARN or alias) exists, is
    /// enabled and lives in `region`, and returns its canonical id.
    async fn resolve_key(&self, key: &str, region: Option<&str>) -> Result<String, KmsError>;

    /// Creates a root key for one tenant, tagged with its id (AWS KMS:
    /// CreateKey).
    async fn create_dedicated_key(
        &self,
        tenant: &TenantId,
        region: Option<&str>,
    ) -> Result<String, KmsError>;

    /// Makes a fresh 256-bit data key under `root_key_id` and returns it with
    /// its wrapped form (AWS KMS: GenerateDataKey).
    async fn generate_data_key(
        &self,
        root_key_id: &str,
        ctx: WrapContext<'_>,
    ) -> Result<GeneratedKey, KmsError>;

    /// Unwraps a key made by `generate_data_key` for the same context (AWS
    /// KMS: Decrypt).
    async fn decrypt(&self, ctx: WrapContext<'_>, wrapped: &WrappedKey)
    -> Result<Key256, KmsError>;

    /// Moves a wrapped key under another root key without revealing it (AWS
    /// KMS: ReEncrypt).
    async fn re_encrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
        to_root_key_id: &str,
    ) -> Result<WrappedKey, KmsError>;

    /// Schedules a root key's deletion after `waiting_days` and answers when
    /// it will be deleted (AWS KMS: ScheduleKeyDeletion).
    async fn schedule_key_deletion(
        &self,
        root_key_id: &str,
        waiting_days: u32,
    ) -> Result<UnixMillis, KmsError>;

    /// Answers whether the provider is reachable and its key usable (AWS KMS:
    /// DescribeKey).
    async fn health(&self) -> Result<(), KmsError>;
}
