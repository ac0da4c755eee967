//! The data plane: sealing and opening envelopes, whole or streamed, and
//! rewrapping them, under the keys resolution finds (see `resolve.rs`).

use zeroize::Zeroizing;

use super::{
    ActiveTenant, Decrypted, KeyHandle, KeyManager, Rewrapped, SUBJECT_KEY_VERSION, Sealed,
};
use crate::{
    envelope::{
        self, Context, KeyRef, Mode,
        stream::{self, StreamOpener, StreamSealer},
    },
    error::{Error, Result},
    ids::SubjectId,
};

impl KeyManager {
    /// Seals under the tenant's primary key, or the subject's key, in
    /// `mode` (suite 0x01, or deterministic 0x04). A deterministic
    /// tenant-key seal may name tenant key version `key_version` instead of
    /// the primary (0), so a caller can compute a value's ciphertext under
    /// every live version during a rotation; see [`check_key_version`] for
    /// when a non-zero version is allowed.
    pub async fn encrypt(
        &self,
        tenant: &ActiveTenant,
        subject: Option<&SubjectId>,
        context: &Context,
        plaintext: &[u8],
        mode: Mode,
        key_version: u32,
    ) -> Result<Sealed> {
        check_key_version(mode, subject.is_some(), key_version)?;
        let (handle, key_ref) = match key_version {
            0 => self.encryption_key(tenant, subject).await?,
            version => (
                self.sealing_version(tenant, version).await?,
                KeyRef::Tenant { version },
            ),
        };
        let key = handle.get()?;
        let ciphertext = envelope::seal_mode(
            mode,
            &key.key,
            key_ref,
            tenant.id.as_str(),
            context,
            plaintext,
        )
        .map_err(Error::internal)?;
        Ok(Sealed {
            ciphertext,
            key_version: key.tenant_version,
        })
    }

    /// The key new data is sealed under: the tenant's primary version, or
    /// the subject's key (made on first use). Public for benches/keys.rs.
    #[doc(hidden)]
    pub async fn encryption_key(
        &self,
        tenant: &ActiveTenant,
        subject: Option<&SubjectId>,
    ) -> Result<(KeyHandle, KeyRef)> {
        Ok(match subject {
            None => (
                tenant.primary_key(),
                KeyRef::Tenant {
                    version: tenant.primary_version,
                },
            ),
            Some(subject) => {
                let id = self.subject_key_id(tenant, subject).await?;
                (
                    self.subject_key(tenant, id, true).await?,
                    KeyRef::Subject {
                        id: id.0,
                        version: SUBJECT_KEY_VERSION,
                    },
                )
            }
        })
    }

    /// Starts a streaming envelope (EncryptStream) under the key [`encrypt`]
    /// would use: the sealer, the envelope's header, and the tenant key
    /// version.
    ///
    /// [`encrypt`]: KeyManager::encrypt
    pub async fn encrypt_stream(
        &self,
        tenant: &ActiveTenant,
        subject: Option<&SubjectId>,
        context: &Context,
    ) -> Result<(StreamSealer, Vec<u8>, u32)> {
        let (handle, key_ref) = self.encryption_key(tenant, subject).await?;
        let key = handle.get()?;
        let (sealer, header) = StreamSealer::start(&key.key, key_ref, tenant.id.as_str(), context)
            .map_err(Error::internal)?;
        Ok((sealer, header, key.tenant_version))
    }

    /// Starts opening a streaming envelope (DecryptStream) whose whole
    /// header is `header`: the opener and the tenant key version. A header
    /// that does not parse is [`Error::Undecryptable`].
    pub async fn decrypt_stream(
        &self,
        tenant: &ActiveTenant,
        header: &[u8],
        context: &Context,
    ) -> Result<(StreamOpener, u32)> {
        let parsed = stream::parse_header(header)
            .ok()
            .flatten()
            .filter(|h| h.len == header.len())
            .ok_or(Error::Undecryptable)?;
        let handle = self.key_for(tenant, parsed.key_ref).await?;
        let key = handle.get()?;
        let opener = StreamOpener::start(&key.key, header, tenant.id.as_str(), context)
            .map_err(|_| Error::Undecryptable)?;
        Ok((opener, key.tenant_version))
    }

    /// Opens a ciphertext. Every failure that tampering could cause is
    /// [`Error::Undecryptable`].
    pub async fn decrypt(
        &self,
        tenant: &ActiveTenant,
        context: &Context,
        ciphertext: &[u8],
    ) -> Result<Decrypted> {
        let parsed = envelope::parse(ciphertext).map_err(|_| Error::Undecryptable)?;
        let handle = self.key_for(tenant, parsed.key_ref).await?;
        let key = handle.get()?;
        let plaintext = envelope::open(&key.key, &parsed, tenant.id.as_str(), context)
            .map_err(|_| Error::Undecryptable)?;
        Ok(Decrypted {
            plaintext: Zeroizing::new(plaintext),
            key_version: key.tenant_version,
        })
    }

    /// Re-seals a ciphertext in its own suite: a tenant-key ciphertext under
    /// the primary version; a subject-key ciphertext under its subject key
    /// (so shredding the subject still erases it). A randomized envelope gets
    /// a fresh salt and nonce; a deterministic one stays deterministic, so
    /// once every row is rewrapped equal values are equal again.
    pub async fn rewrap(
        &self,
        tenant: &ActiveTenant,
        context: &Context,
        ciphertext: &[u8],
    ) -> Result<Rewrapped> {
        let parsed = envelope::parse(ciphertext).map_err(|_| Error::Undecryptable)?;
        let old_handle = self.key_for(tenant, parsed.key_ref).await?;
        let old_key = old_handle.get()?;
        let plaintext = Zeroizing::new(
            envelope::open(&old_key.key, &parsed, tenant.id.as_str(), context)
                .map_err(|_| Error::Undecryptable)?,
        );
        let primary = tenant.primary_key();
        let (new_key, new_ref) = match parsed.key_ref {
            KeyRef::Tenant { .. } => (
                primary.get()?,
                KeyRef::Tenant {
                    version: tenant.primary_version,
                },
            ),
            subject @ KeyRef::Subject { .. } => (old_key, subject),
        };
        let ciphertext = envelope::seal_mode(
            parsed.mode,
            &new_key.key,
            new_ref,
            tenant.id.as_str(),
            context,
            &plaintext,
        )
        .map_err(Error::internal)?;
        Ok(Rewrapped {
            ciphertext,
            key_version: new_key.tenant_version,
            previous_key_version: old_key.tenant_version,
        })
    }
}

/// Whether an Encrypt may name tenant key version `key_version` (non-zero):
/// only for a deterministic envelope (the one kind looked up by its bytes)
/// under the tenant key (a subject key has one version, so the ciphertext
/// would not change). Checked before any keystore read.
pub fn check_key_version(mode: Mode, subject: bool, key_version: u32) -> Result<()> {
    if key_version == 0 {
        return Ok(());
    }
    if mode != Mode::Deterministic {
        return Err(Error::invalid(
            "key_version",
            "is allowed only with deterministic = true",
        ));
    }
    if subject {
        return Err(Error::invalid(
            "key_version",
            "is not allowed with subject_id: a subject key has one version",
        ));
    }
    Ok(())
}
