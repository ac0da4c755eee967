//! Static API tokens: random strings that name their holder, kept by the
//! sidecar only as SHA-256 hashes and compared in constant time.
//!
//! A tokens file (`auth.tokens_file`) lists them:
//!
//! ```toml
//! [[token]]
//! name = "billing"      # the caller's identity becomes "token:billing"
//! sha256 = "9f86d08…"   # hex SHA-256 of the token; `keywarden token new` prints both
//! ```
//!
//! The embedded default also makes one token of its own, `token:admin`, in
//! the data directory (`admin.token`, mode 0600), so the CLI on the same host
//! can administer the sidecar without any set-up.

use std::{
    fs, io,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::SettingsError;

/// Every static token starts with this, so it is told from a JWT at a glance
/// (and secret scanners can find leaked ones).
pub const TOKEN_PREFIX: &str = "kwt_";
/// The embedded admin token's file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The embedded admin token's name: its identity is `token:admin`.
pub const ADMIN_TOKEN_NAME: &str = "admin";

/// A new random token: the prefix and 32 random bytes, base64url.
pub fn generate() -> SecretString {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut()).expect("the OS random source is available");
    SecretString::from(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(*bytes)))
}

/// The hash a tokens file holds for `token`.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The known tokens: (hash, name).
#[derive(Clone, Default)]
pub struct StaticTokens {
    entries: Vec<([u8; 32], String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
}

impl StaticTokens {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a token by its value (the embedded admin token).
    pub fn add(&mut self, name: &str, token: &SecretString) {
        self.entries
            .push((hash(token.expose_secret()), name.to_owned()));
    }

    /// Adds every token of `other` (the embedded admin token, kept across
    /// reloads of the tokens file).
    pub fn extend(&mut self, other: &StaticTokens) {
        self.entries.extend(other.entries.iter().cloned());
    }

    /// Reads a tokens file.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = fs::read_to_string(path).map_err(|e| {
            SettingsError::new(
                "auth.tokens_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a tokens file's text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, SettingsError> {
        let setting = "auth.tokens_file";
        let file: TokensFile = toml::from_str(text).map_err(|e| {
            let reason = crate::secret::toml_error_without_content(text, &e);
            SettingsError::new(setting, format!("{source}: {reason}"))
        })?;
        let mut tokens = Self::default();
        for entry in file.token {
            if entry.name.is_empty()
                || entry.name.len() > 128
                || entry.name.contains(char::is_whitespace)
            {
                return Err(SettingsError::new(
                    setting,
                    "every token needs a name of 1 to 128 characters without spaces",
                ));
            }
            let mut digest = [0u8; 32];
            hex::decode_to_slice(entry.sha256.trim(), &mut digest).map_err(|_| {
                SettingsError::new(
                    setting,
                    format!("token {}: sha256 must be 64 hex digits", entry.name),
                )
            })?;
            tokens.entries.push((digest, entry.name));
        }
        Ok(tokens)
    }

    /// The name of the token `presented`, comparing its hash with every
    /// known hash in constant time (no early exit on a match).
    pub fn find(&self, presented: &str) -> Option<&str> {
        let digest = hash(presented);
        let mut found = None;
        for (known, name) in &self.entries {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Reads the admin token file in `dir`, creating it (mode 0600) with a new
/// token on first start. Refuses a file that others may read.
pub fn load_or_create_admin_token(dir: &Path) -> io::Result<(SecretString, bool)> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is readable by others (mode {:o}); chmod 600 it",
                        path.display(),
                        mode & 0o777
                    ),
                ));
            }
            let token = text.trim();
            if !token.starts_with(TOKEN_PREFIX) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} does not hold a keywarden token", path.display()),
                ));
            }
            Ok((SecretString::from(token.to_owned()), false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let token = generate();
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(token.expose_secret().as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            Ok((token, true))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let token = generate();
        let path = dir.path().join("tokens.toml");
        fs::write(
            &path,
            format!(
                "[[token]]\nname = \"billing\"\nsha256 = \"{}\"\n",
                hex::encode(hash(token.expose_secret()))
            ),
        )
        .unwrap();
        let tokens = StaticTokens::load(&path).unwrap();
        assert_eq!(tokens.find(token.expose_secret()), Some("billing"));
        assert_eq!(tokens.find("kwt_wrong"), None);
        assert!(!format!("{token:?}").contains(token.expose_secret()));

        fs::write(&path, "[[token]]\nname = \"x\"\nsha256 = \"zz\"\n").unwrap();
        let err = StaticTokens::load(&path).err().unwrap();
        assert_eq!(err.setting, "auth.tokens_file");
    }

    #[test]
    fn admin_token_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = load_or_create_admin_token(dir.path()).unwrap();
        assert!(created);
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (again, created) = load_or_create_admin_token(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(first.expose_secret(), again.expose_secret());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_admin_token(dir.path()).is_err());
    }
}
