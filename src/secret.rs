//! Secret key material.
//!
//! Every 256-bit key keywarden holds in memory (an unwrapped tenant key, a
//! subject key, a subject-index key, the local root key) is a [`Key256`]. It
//! zeroizes its bytes when dropped, cannot be cloned, compared, serialized or
//! printed: its `Debug` is `Key256([REDACTED])`. The only way to the bytes is
//! [`Key256::expose`], which a reviewer can grep for.

use std::{
    fmt, fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};
use zeroize::Zeroizing;

/// Length in bytes of every key in the hierarchy.
pub const KEY_LEN: usize = 32;

/// A 256-bit secret key that zeroizes on drop and never prints.
pub struct Key256(SecretBox<[u8; KEY_LEN]>);

impl Key256 {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = Self(SecretBox::new(Box::new([0u8; KEY_LEN])));
        getrandom::fill(key.0.expose_secret_mut())?;
        Ok(key)
    }

    /// Copies a key out of a slice that must be exactly 32 bytes long. The
    /// caller remains responsible for zeroizing its own copy.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: &[u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(SecretBox::new(Box::new(*array))))
    }

    /// The key bytes. Call only to hand them to a cipher.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }
}

/// Loads a key from a file of exactly 32 bytes, or creates the file with a
/// fresh key (mode 0600, never overwriting) when it does not exist. Refuses
/// a file that other users may read. Answers the key and whether it was made.
pub fn load_or_create_key_file(path: &Path) -> io::Result<(Key256, bool)> {
    let created = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            let key = Key256::generate().map_err(io::Error::other)?;
            file.write_all(key.expose())?;
            file.sync_all()?;
            true
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(e),
    };
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is readable by other users (mode {:o}); run chmod 600 on it",
                path.display(),
                mode & 0o777
            ),
        ));
    }
    let bytes = Zeroizing::new(fs::read(path)?);
    let key = Key256::from_slice(&bytes).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a 32-byte key", path.display()),
        )
    })?;
    Ok((key, created))
}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256([REDACTED])")
    }
}

/// A TOML parse error of a file that may hold secrets (the configuration,
/// the tokens file, the policy file), fit for a log line, an error message
/// or `/ready`'s body: where it is (`line L, column C`, from `text`) and
/// serde's or toml's reason with every quoted part (`"..."` and `` `...` ``,
/// where they quote the file's own values and keys) replaced by `"…"`.
pub fn toml_error_without_content(text: &str, e: &toml::de::Error) -> String {
    let mut out = String::new();
    if let Some(span) = e.span() {
        let before = &text.as_bytes()[..span.start.min(text.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        out.push_str(&format!("line {line}, column {column}: "));
    }
    out.push_str(&toml_reason_without_content(e));
    out
}

/// toml's or serde's reason of `e` with the file's values left out
/// ([`toml_error_without_content`]): every double-quoted part (a string
/// value: `invalid type: string "…"`) and the backticked value of an
/// `unknown variant` become `…`. Backticked names of fields stay: they are
/// the schema's (`missing field`, `expected one of`) or a key the file
/// misspelt (`unknown field`), which the operator needs to find it.
pub fn toml_reason_without_content(e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    let mut out = String::new();
    let mut quote = None;
    for c in message.chars() {
        match quote {
            Some(open) if c == open => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None if c == '"' || (c == '`' && out.ends_with("unknown variant ")) => {
                out.push(c);
                quote = Some(c);
            }
            None => out.push(c),
        }
    }
    if quote.is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_toml_error_names_the_place_and_quotes_nothing_of_the_file() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Kind {
            Local,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct File {
            token: Vec<String>,
            kind: Option<Kind>,
        }
        for text in [
            "# a comment\ntoken = \"kwt_LEAKED-SECRET\"\n",
            "token = [1]\n",
            "token = [\"a\"]\nkind = \"kwt_LEAKED-SECRET\"\n",
            "token = [\"a\", 'postgres://u:LEAKED-SECRET@db/k', 3]\n",
            "token = \"kwt_LEAKED-SECRET\n",
        ] {
            let e = toml::from_str::<File>(text).unwrap_err();
            let message = toml_error_without_content(text, &e);
            assert!(!message.contains("LEAKED"), "{message}");
            assert!(message.starts_with("line "), "{message}");
        }
        let e = toml::from_str::<File>("token = []\nkinds = 1\n").unwrap_err();
        assert!(
            toml_reason_without_content(&e).starts_with("unknown field `kinds`, expected"),
            "{e}"
        );
        let e = toml::from_str::<File>("\n\ntoken = \"kwt_x\"").unwrap_err();
        assert_eq!(
            toml_error_without_content("\n\ntoken = \"kwt_x\"", &e),
            "line 3, column 9: invalid type: string \"…\", expected a sequence"
        );
    }
    use super::*;

    #[test]
    fn debug_shows_no_key_bytes() {
        let key = Key256::from_slice(&[0xAB; KEY_LEN]).unwrap();
        let printed = format!("{key:?} {key:#?}");
        assert_eq!(printed, "Key256([REDACTED]) Key256([REDACTED])");
    }

    #[test]
    fn from_slice_refuses_wrong_lengths() {
        assert!(Key256::from_slice(&[0u8; 31]).is_none());
        assert!(Key256::from_slice(&[0u8; 33]).is_none());
    }

    #[test]
    fn generated_keys_differ() {
        let a = Key256::generate().unwrap();
        let b = Key256::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }
}
