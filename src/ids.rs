//! Identifiers that cross the API, parsed once at the edge.
//!
//! A [`TenantId`] is public (it appears in logs and error messages). A
//! [`SubjectId`] is personal data: it never prints, never reaches the
//! keystore, and is turned into a [`SubjectKeyId`] (a keyed hash) at once.

use std::{fmt, sync::Arc};

/// An identifier that breaks its rule: the field, and the rule broken,
/// without the input. Becomes [`crate::error::Error::InvalidArgument`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidId {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidId {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Longest tenant id, in bytes.
pub const MAX_TENANT_ID_LEN: usize = 128;
/// Longest subject id, in bytes.
pub const MAX_SUBJECT_ID_LEN: usize = 256;

/// A tenant id: 1 to 128 bytes of `[A-Za-z0-9._-]`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// Parses a tenant id; the error names the field and the rule broken,
    /// without echoing the input.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() {
            return Err(InvalidId::new(field, "must not be empty"));
        }
        if raw.len() > MAX_TENANT_ID_LEN {
            return Err(InvalidId::new(
                field,
                format!(
                    "is {} bytes; at most {MAX_TENANT_ID_LEN} are allowed",
                    raw.len()
                ),
            ));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(InvalidId::new(
                field,
                "may contain only letters, digits, '.', '_' and '-'",
            ));
        }
        Ok(Self(raw.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({:?})", &*self.0)
    }
}

/// A data subject's id, as the caller gave it. Personal data: it prints as
/// `SubjectId([REDACTED])` and is only ever hashed.
pub struct SubjectId(String);

impl SubjectId {
    /// Parses a subject id: 1 to 256 bytes.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() {
            return Err(InvalidId::new(field, "must not be empty"));
        }
        if raw.len() > MAX_SUBJECT_ID_LEN {
            return Err(InvalidId::new(
                field,
                format!(
                    "is {} bytes; at most {MAX_SUBJECT_ID_LEN} are allowed",
                    raw.len()
                ),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id's bytes, to be hashed.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectId([REDACTED])")
    }
}

/// How a tenant tells two subject ids apart: the rule every path that takes
/// a subject id (Encrypt, EncryptStream, ShredSubject) applies before the id
/// is hashed into its subject key id. Chosen when the tenant is created and
/// fixed after (changing it would change every subject's key id), stated in
/// each subject erasure receipt.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum SubjectIds {
    /// Byte for byte: `Ada@Example.com` and `ada@example.com` are two
    /// subjects, and so are the NFC and NFD forms of `Zoë`.
    #[default]
    #[serde(rename = "exact")]
    Exact,
    /// Unicode Normalization Form C: canonically equivalent spellings (NFC
    /// and NFD `Zoë`) are one subject.
    #[serde(rename = "nfc")]
    Nfc,
    /// Unicode canonical caseless matching (Unicode 3.13, D145): NFC of the
    /// full case folding of the NFD form. `Ada@Example.com`, `ada@example.com`
    /// and `ADA@EXAMPLE.COM` are one subject; `Straße` and `STRASSE` too.
    #[serde(rename = "nfc-casefold")]
    NfcCasefold,
}

impl SubjectIds {
    pub const ALL: [SubjectIds; 3] = [SubjectIds::Exact, SubjectIds::Nfc, SubjectIds::NfcCasefold];

    /// The rule's name, as the API, the policy and receipts spell it.
    pub fn name(self) -> &'static str {
        match self {
            SubjectIds::Exact => "exact",
            SubjectIds::Nfc => "nfc",
            SubjectIds::NfcCasefold => "nfc-casefold",
        }
    }

    /// The rule named `name` ("" is the default, exact).
    pub fn parse(name: &str) -> Option<Self> {
        if name.is_empty() {
            return Some(Self::default());
        }
        Self::ALL.into_iter().find(|rule| rule.name() == name)
    }

    /// The form of `id` this rule hashes (personal data: only hash it).
    pub fn apply(self, id: &SubjectId) -> std::borrow::Cow<'_, [u8]> {
        use unicode_normalization::UnicodeNormalization;
        match self {
            SubjectIds::Exact => id.0.as_bytes().into(),
            SubjectIds::Nfc => id.0.nfc().collect::<String>().into_bytes().into(),
            SubjectIds::NfcCasefold => {
                caseless::default_case_fold_str(&id.0.nfd().collect::<String>())
                    .nfc()
                    .collect::<String>()
                    .into_bytes()
                    .into()
            }
        }
    }
}

/// The 128-bit keyed hash that stands for a subject in the keystore and in
/// ciphertexts (see `keys::subject_key_id`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubjectKeyId(pub [u8; crate::envelope::SUBJECT_KEY_ID_LEN]);

impl fmt::Debug for SubjectKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubjectKeyId({})", hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_follow_the_rules() {
        assert!(TenantId::parse("tenant_id", "acme-corp.eu_1").is_ok());
        assert!(TenantId::parse("tenant_id", &"a".repeat(128)).is_ok());
        for bad in ["", "has space", "slash/", "ümlaut", "semi;colon"] {
            assert!(TenantId::parse("tenant_id", bad).is_err(), "{bad:?}");
        }
        let err = TenantId::parse("tenant_id", &"a".repeat(129)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tenant_id: is 129 bytes; at most 128 are allowed"
        );
    }

    #[test]
    fn subject_id_rules_match_what_they_say() {
        let id = |s: &str| SubjectId::parse("s", s).unwrap();
        let same = |rule: SubjectIds, a: &str, b: &str| rule.apply(&id(a)) == rule.apply(&id(b));
        let nfc = "Zo\u{eb}";
        let nfd = "Zoe\u{308}";
        assert!(!same(SubjectIds::Exact, nfc, nfd));
        assert!(!same(
            SubjectIds::Exact,
            "Ada@Example.com",
            "ada@example.com"
        ));
        assert!(same(SubjectIds::Nfc, nfc, nfd));
        assert!(!same(SubjectIds::Nfc, "Ada@Example.com", "ada@example.com"));
        assert!(same(
            SubjectIds::NfcCasefold,
            "Ada@Example.com",
            "ADA@example.COM"
        ));
        assert!(same(SubjectIds::NfcCasefold, nfd, "zo\u{eb}"));
        assert!(same(SubjectIds::NfcCasefold, "Stra\u{df}e", "STRASSE"));
        assert!(same(
            SubjectIds::NfcCasefold,
            "\u{3a3}\u{391}\u{3a3}",
            "\u{3c3}\u{3b1}\u{3c2}"
        ));
        assert!(!same(SubjectIds::NfcCasefold, "ada", "ada "));
        // The output is NFC: composed.
        assert_eq!(
            &*SubjectIds::NfcCasefold.apply(&id(nfd)),
            "zo\u{eb}".as_bytes()
        );
        for rule in SubjectIds::ALL {
            assert_eq!(SubjectIds::parse(rule.name()), Some(rule));
        }
        assert_eq!(SubjectIds::parse(""), Some(SubjectIds::Exact));
        assert_eq!(SubjectIds::parse("lowercase"), None);
    }

    #[test]
    fn subject_ids_never_print() {
        let id = SubjectId::parse("subject_id", "alice@example.com").unwrap();
        assert_eq!(format!("{id:?}"), "SubjectId([REDACTED])");
        assert!(SubjectId::parse("subject_id", "").is_err());
        assert!(SubjectId::parse("subject_id", &"x".repeat(257)).is_err());
    }
}
