//! Data keys for client-side encryption: a fresh 256-bit key handed to the
//! caller with its wrapped form (suite 0x05, [`envelope::datakey`]), sealed
//! under the key [`KeyManager::encrypt`] would use; the wrapped form opened
//! again, or moved to the primary version. The wrapped form is in a key
//! domain of its own: only these calls open it, and they open nothing else.

use super::{ActiveTenant, KeyManager};
use crate::{
    envelope::{Context, KeyRef, datakey},
    error::{Error, Result},
    ids::SubjectId,
    secret::Key256,
};

/// A data key made by [`KeyManager::generate_data_key`].
pub struct GeneratedDataKey {
    /// The key in the clear: the caller encrypts with it, then forgets it.
    pub key: Key256,
    /// The key sealed under the tenant's primary version or the subject's
    /// key, for [`KeyManager::decrypt_data_key`].
    pub wrapped: Vec<u8>,
    pub key_version: u32,
}

/// A wrapped data key opened by [`KeyManager::decrypt_data_key`].
pub struct OpenedDataKey {
    pub key: Key256,
    /// The tenant key version that protected it (for a subject key: the
    /// version that wraps the subject key).
    pub key_version: u32,
}

/// A wrapped data key sealed afresh by [`KeyManager::rewrap_data_key`].
pub struct RewrappedDataKey {
    pub wrapped: Vec<u8>,
    pub key_version: u32,
    pub previous_key_version: u32,
}

// Key bytes never print (Key256's Debug shows none either).
impl std::fmt::Debug for GeneratedDataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedDataKey")
            .field("wrapped_len", &self.wrapped.len())
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for OpenedDataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedDataKey")
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RewrappedDataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewrappedDataKey")
            .field("wrapped_len", &self.wrapped.len())
            .field("key_version", &self.key_version)
            .field("previous_key_version", &self.previous_key_version)
            .finish()
    }
}

impl KeyManager {
    /// A fresh data key, wrapped under the tenant's primary key version, or
    /// the subject's key (made on first use), for `context`.
    pub async fn generate_data_key(
        &self,
        tenant: &ActiveTenant,
        subject: Option<&SubjectId>,
        context: &Context,
    ) -> Result<GeneratedDataKey> {
        let (handle, key_ref) = self.encryption_key(tenant, subject).await?;
        let sealing = handle.get()?;
        let key = Key256::generate().map_err(Error::internal)?;
        let wrapped = datakey::wrap(&sealing.key, key_ref, tenant.id.as_str(), context, &key)
            .map_err(Error::internal)?;
        Ok(GeneratedDataKey {
            key,
            wrapped,
            key_version: sealing.tenant_version,
        })
    }

    /// Opens a wrapped data key. Anything that is not one made for this
    /// tenant and context is [`Error::Undecryptable`]; a shredded subject or
    /// a destroyed key version is reported as such, as for Decrypt.
    pub async fn decrypt_data_key(
        &self,
        tenant: &ActiveTenant,
        context: &Context,
        wrapped: &[u8],
    ) -> Result<OpenedDataKey> {
        let key_ref = datakey::parse(wrapped).map_err(|_| Error::Undecryptable)?;
        let handle = self.key_for(tenant, key_ref).await?;
        let sealing = handle.get()?;
        let key = datakey::unwrap(&sealing.key, wrapped, tenant.id.as_str(), context)
            .map_err(|_| Error::Undecryptable)?;
        Ok(OpenedDataKey {
            key,
            key_version: sealing.tenant_version,
        })
    }

    /// Seals a wrapped data key afresh without answering the key: a
    /// tenant-key one under the primary version, a subject-key one under its
    /// subject key (so shredding the subject still erases it).
    pub async fn rewrap_data_key(
        &self,
        tenant: &ActiveTenant,
        context: &Context,
        wrapped: &[u8],
    ) -> Result<RewrappedDataKey> {
        let key_ref = datakey::parse(wrapped).map_err(|_| Error::Undecryptable)?;
        let old_handle = self.key_for(tenant, key_ref).await?;
        let old = old_handle.get()?;
        let key = datakey::unwrap(&old.key, wrapped, tenant.id.as_str(), context)
            .map_err(|_| Error::Undecryptable)?;
        let primary = tenant.primary_key();
        let (new, new_ref) = match key_ref {
            KeyRef::Tenant { .. } => (
                primary.get()?,
                KeyRef::Tenant {
                    version: tenant.primary_version,
                },
            ),
            subject @ KeyRef::Subject { .. } => (old, subject),
        };
        let wrapped = datakey::wrap(&new.key, new_ref, tenant.id.as_str(), context, &key)
            .map_err(Error::internal)?;
        Ok(RewrappedDataKey {
            wrapped,
            key_version: new.tenant_version,
            previous_key_version: old.tenant_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_key_bytes() {
        let key = || Key256::from_slice(&[0xab; 32]).unwrap();
        let printed = [
            format!(
                "{:?}",
                GeneratedDataKey {
                    key: key(),
                    wrapped: vec![0xcd; 83],
                    key_version: 1,
                }
            ),
            format!(
                "{:?}",
                OpenedDataKey {
                    key: key(),
                    key_version: 1,
                }
            ),
            format!(
                "{:?}",
                RewrappedDataKey {
                    wrapped: vec![0xcd; 83],
                    key_version: 2,
                    previous_key_version: 1,
                }
            ),
        ];
        for text in printed {
            for secret in ["ab", "AB", "171", "cd", "205"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
        assert_eq!(
            format!(
                "{:?}",
                OpenedDataKey {
                    key: key(),
                    key_version: 7
                }
            ),
            "OpenedDataKey { key_version: 7, .. }"
        );
    }
}
