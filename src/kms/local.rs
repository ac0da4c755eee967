//! The local root key: a 256-bit key in a file (mode 0600), generated on first
//! start. For development and single-host use: anyone who can read the file
//! can unwrap every tenant key, and a copy of the file outlives any shred.
//! Production uses a KMS.
//!
//! Wrapped form: `nonce (12) || AES-256-GCM(root key, nonce, key, aad) || tag
//! (16)`, with the associated data encoding the [`WrapContext`] (tenant,
//! purpose, version) the same way the envelope encodes a context.

use std::{collections::BTreeMap, io, path::Path};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload, generic_array::GenericArray},
};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{GeneratedKey, KmsError, RootKeyProvider, WrapContext, WrappedKey};
use crate::{
    envelope::associated_data,
    ids::TenantId,
    secret::{Key256, load_or_create_key_file},
    time::UnixMillis,
};

/// File name of the root key inside the data directory.
pub const ROOT_KEY_FILE: &str = "root.key";
const AAD_LABEL: &[u8] = b"keywarden.local-root.v1";
const NONCE_LEN: usize = 12;

pub struct LocalRootKey {
    cipher: Aes256Gcm,
    /// "local:" and 16 hex digits of a hash of the key: tells root keys apart
    /// in the keystore without revealing anything about them.
    id: String,
}

impl LocalRootKey {
    /// Loads the root key from `path`, or creates it (mode 0600, never
    /// overwriting) when the file does not exist. Refuses a file that other
    /// users may read, or that is not 32 bytes.
    pub fn load_or_create(path: &Path) -> io::Result<(Self, bool)> {
        let (key, created) = load_or_create_key_file(path)?;
        Ok((Self::from_key(&key), created))
    }

    /// A provider for a key held in memory (tests).
    pub fn from_key(key: &Key256) -> Self {
        let digest = Sha256::new()
            .chain_update(b"keywarden.local-root.id")
            .chain_update(key.expose())
            .finalize();
        Self {
            cipher: Aes256Gcm::new(GenericArray::from_slice(key.expose())),
            id: format!("local:{}", hex::encode(&digest[..8])),
        }
    }

    /// The root key's id, as recorded with every key it wraps.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aad(ctx: WrapContext<'_>) -> Vec<u8> {
        // Tenant ids and purposes are short: the encoding always exists.
        let pairs: BTreeMap<String, String> = ctx
            .pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        associated_data(AAD_LABEL, ctx.tenant.as_str(), &pairs)
            .expect("a wrap context is far below 4 GiB")
    }

    fn wrap(&self, ctx: WrapContext<'_>, key: &Key256) -> Result<WrappedKey, KmsError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| KmsError::Failed(e.to_string()))?;
        let aad = Self::aad(ctx);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.expose(),
                    aad: &aad,
                },
            )
            .map_err(|_| KmsError::Failed("AES-GCM seal failed".into()))?;
        let mut ciphertext = nonce.to_vec();
        ciphertext.extend_from_slice(&sealed);
        Ok(WrappedKey {
            root_key_id: self.id.clone(),
            ciphertext,
        })
    }
}

#[async_trait]
impl RootKeyProvider for LocalRootKey {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn shared_key(&self, region: Option<&str>) -> Result<String, KmsError> {
        match region {
            None => Ok(self.id.clone()),
            Some(_) => Err(no_regions()),
        }
    }

    async fn resolve_key(&self, key: &str, region: Option<&str>) -> Result<String, KmsError> {
        if region.is_some() {
            return Err(no_regions());
        }
        if key != self.id {
            return Err(KmsError::KeyNotUsable(format!(
                "root key {key} is not this sidecar's local root key ({})",
                self.id
            )));
        }
        Ok(self.id.clone())
    }

    async fn create_dedicated_key(
        &self,
        _tenant: &TenantId,
        _region: Option<&str>,
    ) -> Result<String, KmsError> {
        Err(KmsError::Unsupported(
            "the local root-key provider has one root key and cannot create a dedicated one; configure AWS KMS"
                .into(),
        ))
    }

    async fn generate_data_key(
        &self,
        root_key_id: &str,
        ctx: WrapContext<'_>,
    ) -> Result<GeneratedKey, KmsError> {
        self.check_id(root_key_id)?;
        let key = Key256::generate().map_err(|e| KmsError::Failed(e.to_string()))?;
        let wrapped = self.wrap(ctx, &key)?;
        Ok(GeneratedKey { key, wrapped })
    }

    async fn decrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
    ) -> Result<Key256, KmsError> {
        if wrapped.root_key_id != self.id || wrapped.ciphertext.len() < NONCE_LEN {
            return Err(KmsError::Refused);
        }
        let (nonce, sealed) = wrapped.ciphertext.split_at(NONCE_LEN);
        let aad = Self::aad(ctx);
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
                .map_err(|_| KmsError::Refused)?,
        );
        Key256::from_slice(&plain).ok_or(KmsError::Refused)
    }

    async fn re_encrypt(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &WrappedKey,
        to_root_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        self.check_id(to_root_key_id)?;
        let key = self.decrypt(ctx, wrapped).await?;
        self.wrap(ctx, &key)
    }

    async fn schedule_key_deletion(
        &self,
        _root_key_id: &str,
        _waiting_days: u32,
    ) -> Result<UnixMillis, KmsError> {
        Err(KmsError::Unsupported(
            "the local root key cannot be scheduled for deletion; delete its file to erase every tenant".into(),
        ))
    }

    async fn health(&self) -> Result<(), KmsError> {
        Ok(())
    }
}

impl LocalRootKey {
    fn check_id(&self, root_key_id: &str) -> Result<(), KmsError> {
        if root_key_id == self.id {
            Ok(())
        } else {
            Err(KmsError::KeyNotUsable(format!(
                "root key {root_key_id} is not this sidecar's local root key ({})",
                self.id
            )))
        }
    }
}

fn no_regions() -> KmsError {
    KmsError::Unsupported(
        "the local root-key provider has no regions; configure AWS KMS to place tenants in regions"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;
    use crate::kms::Purpose;

    fn ctx(tenant: &TenantId, version: u32) -> WrapContext<'_> {
        WrapContext {
            tenant,
            purpose: Purpose::TenantKey { version },
        }
    }

    #[tokio::test]
    async fn unwraps_only_for_the_same_tenant_version_and_purpose() {
        let root = LocalRootKey::from_key(&Key256::generate().unwrap());
        let a = TenantId::parse("t", "a").unwrap();
        let b = TenantId::parse("t", "b").unwrap();
        let made = root.generate_data_key(root.id(), ctx(&a, 1)).await.unwrap();
        let back = root.decrypt(ctx(&a, 1), &made.wrapped).await.unwrap();
        assert_eq!(back.expose(), made.key.expose());

        for wrong in [
            ctx(&b, 1),
            ctx(&a, 2),
            WrapContext {
                tenant: &a,
                purpose: Purpose::SubjectIndex,
            },
        ] {
            assert!(matches!(
                root.decrypt(wrong, &made.wrapped).await,
                Err(KmsError::Refused)
            ));
        }
        let other_root = LocalRootKey::from_key(&Key256::generate().unwrap());
        assert!(matches!(
            other_root.decrypt(ctx(&a, 1), &made.wrapped).await,
            Err(KmsError::Refused)
        ));
    }

    #[test]
    fn root_key_file_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ROOT_KEY_FILE);
        let (first, created) = LocalRootKey::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (second, created) = LocalRootKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first.id(), second.id());
    }

    #[test]
    fn refuses_a_root_key_file_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ROOT_KEY_FILE);
        LocalRootKey::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = LocalRootKey::load_or_create(&path).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
