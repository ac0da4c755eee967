//! Blind-index tokens: truncated keyed hashes of values an app stores beside
//! their ciphertexts and queries by equality (docs/FORMAT.md, "Blind
//! indexes", is the specification; tests/reference/blind_index_vectors.py
//! is an independent implementation).
//!
//! ```text
//! token = [index key version]_32 || T
//! T     = the first ceil(bits / 8) bytes of HMAC-SHA256(index key, M),
//!         the unused low bits of the last byte set to zero
//! M     = "kw1.bix" || [index key version]_32 || [bits]_16
//!         || enc(tenant id) || [m]_32 || enc(key_1) || enc(value_1) || ...   (the context)
//!         || [n]_32 || V_1 || ... || V_n                                     (the values)
//! V_i   = [t]_8 || t transformation codes (last-N: 0x05 || [N]_32)
//!         || [len(x_i)]_32 || x_i, x_i the value after its transformations
//! ```
//!
//! Pure functions: the key comes from [`crate::keys`], which keeps index
//! keys in their own key domain ([`super::wrap::KeyDomain::BlindIndexKey`]).

use std::borrow::Cow;

use caseless::Caseless as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use unicode_normalization::UnicodeNormalization;

use super::Context;
use crate::secret::Key256;

/// The HMAC input's label: 7 ASCII bytes no other keyed hash uses.
pub const LABEL: &[u8; 7] = b"kw1.bix";
/// Fewest bits of a token's hash.
pub const MIN_BITS: u32 = 8;
/// Most bits of a token's hash: all of HMAC-SHA256.
pub const MAX_BITS: u32 = 256;
/// Most values in one token (a compound index).
pub const MAX_VALUES: usize = 16;
/// Most transformations applied to one value.
pub const MAX_TRANSFORMATIONS: usize = 8;
/// Largest N of a last-N-characters transformation.
pub const MAX_LAST_CHARS: u32 = 4096;
/// Largest value that takes transformations (any value without them may
/// be as large as a plaintext): a transformation may make text longer (NFKC
/// up to 11 times its UTF-8 bytes), so its input is kept small.
pub const MAX_TEXT_VALUE_BYTES: usize = 64 << 10;
/// Largest text any transformation may make: a step whose output would be
/// longer is refused ([`TransformError::TooLong`]) as soon as it passes this,
/// so NFKC's expansion cannot make the work larger than the input allows.
pub const MAX_TRANSFORMED_BYTES: usize = MAX_TEXT_VALUE_BYTES;
/// Text all the transformations of one call may read, summed over every
/// step of every value of every item: [`TransformBudget`]. With the limits
/// above, a call does at most this much Unicode work however its values are
/// shaped (a few milliseconds in a release build).
pub const MAX_TRANSFORM_BYTES_PER_CALL: usize = 4 << 20;
/// Bytes of the version before the hash.
pub const VERSION_LEN: usize = 4;

/// One step applied to a value (as UTF-8 text) before it is hashed, in the
/// order the request lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transformation {
    /// Unicode Normalization Form C.
    Nfc,
    /// Unicode Normalization Form KC.
    Nfkc,
    /// Unicode full case folding (CaseFolding.txt, statuses C and F), as
    /// Python's `str.casefold()`.
    CaseFold,
    /// Removes leading and trailing characters with the Unicode
    /// `White_Space` property.
    Trim,
    /// Keeps the last N Unicode scalar values (all of them if fewer).
    LastChars(u32),
}

impl Transformation {
    /// The transformation's code in `M`.
    fn code(self) -> u8 {
        match self {
            Transformation::Nfc => 0x01,
            Transformation::Nfkc => 0x02,
            Transformation::CaseFold => 0x03,
            Transformation::Trim => 0x04,
            Transformation::LastChars(_) => 0x05,
        }
    }

    fn apply(self, text: &str) -> Result<String, TransformError> {
        match self {
            Transformation::Nfc => capped(text.nfc()),
            Transformation::Nfkc => capped(text.nfkc()),
            Transformation::CaseFold => capped(text.chars().default_case_fold()),
            Transformation::Trim => Ok(text.trim_matches(char::is_whitespace).to_owned()),
            Transformation::LastChars(n) => {
                let count = text.chars().count();
                let skip = count.saturating_sub(n as usize);
                Ok(text.chars().skip(skip).collect())
            }
        }
    }
}

/// `chars` as a string, refused once it passes [`MAX_TRANSFORMED_BYTES`].
fn capped(chars: impl Iterator<Item = char>) -> Result<String, TransformError> {
    let mut out = String::new();
    for c in chars {
        if out.len() + c.len_utf8() > MAX_TRANSFORMED_BYTES {
            return Err(TransformError::TooLong);
        }
        out.push(c);
    }
    Ok(out)
}

/// Why a value cannot be transformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransformError {
    /// It is not UTF-8.
    NotText,
    /// A step made it longer than [`MAX_TRANSFORMED_BYTES`].
    TooLong,
    /// The call's transformations read more than
    /// [`MAX_TRANSFORM_BYTES_PER_CALL`].
    OverBudget,
}

/// What the transformations of one call may still read (bytes of text, each
/// step's input counted); shared by the items of a batch.
#[derive(Debug)]
pub struct TransformBudget(std::sync::atomic::AtomicUsize);

impl TransformBudget {
    /// The budget of one call: [`MAX_TRANSFORM_BYTES_PER_CALL`].
    pub fn per_call() -> Self {
        Self::of(MAX_TRANSFORM_BYTES_PER_CALL)
    }

    /// A budget of `bytes` (tests and offline tools: `usize::MAX`).
    pub fn of(bytes: usize) -> Self {
        Self(std::sync::atomic::AtomicUsize::new(bytes))
    }

    /// Takes `bytes`, or refuses (taking nothing) if fewer are left.
    fn take(&self, bytes: usize) -> Result<(), TransformError> {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(bytes)
            })
            .map(|_| ())
            .map_err(|_| TransformError::OverBudget)
    }
}

/// A value after its transformations: as given when there are none (any
/// bytes), else as UTF-8 text transformed in order.
pub fn transform<'a>(
    value: &'a [u8],
    transformations: &[Transformation],
    budget: &TransformBudget,
) -> Result<Cow<'a, [u8]>, TransformError> {
    if transformations.is_empty() {
        return Ok(Cow::Borrowed(value));
    }
    let mut text = std::str::from_utf8(value)
        .map_err(|_| TransformError::NotText)?
        .to_owned();
    for t in transformations {
        budget.take(text.len())?;
        text = t.apply(&text)?;
    }
    Ok(Cow::Owned(text.into_bytes()))
}

/// One value of a token, transformed, with the transformations that made it
/// (they are part of the hash input).
pub struct Field<'a> {
    pub value: &'a [u8],
    pub transformations: &'a [Transformation],
}

/// Bytes of a token of `bits`.
pub fn token_len(bits: u32) -> usize {
    VERSION_LEN + bits.div_ceil(8) as usize
}

/// The token of `fields` (already transformed) for `tenant` and `context`
/// under index key `version`. The caller checks the bounds: `bits` in
/// [`MIN_BITS`]..=[`MAX_BITS`], 1..=[`MAX_VALUES`] fields of at most
/// [`MAX_TRANSFORMATIONS`] each.
pub fn token(
    key: &Key256,
    version: u32,
    bits: u32,
    tenant: &str,
    context: &Context,
    fields: &[Field<'_>],
) -> Vec<u8> {
    debug_assert!((MIN_BITS..=MAX_BITS).contains(&bits));
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key.expose()).expect("HMAC takes any key length");
    mac.update(LABEL);
    mac.update(&version.to_be_bytes());
    mac.update(&(bits as u16).to_be_bytes());
    enc(&mut mac, tenant.as_bytes());
    mac.update(&len32(context.len()));
    for (k, v) in context {
        enc(&mut mac, k.as_bytes());
        enc(&mut mac, v.as_bytes());
    }
    mac.update(&len32(fields.len()));
    for field in fields {
        mac.update(&[u8::try_from(field.transformations.len()).unwrap_or(u8::MAX)]);
        for t in field.transformations {
            mac.update(&[t.code()]);
            if let Transformation::LastChars(n) = t {
                mac.update(&n.to_be_bytes());
            }
        }
        enc(&mut mac, field.value);
    }
    let digest = mac.finalize().into_bytes();
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(VERSION_LEN + bytes);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&digest[..bytes]);
    let unused = bytes as u32 * 8 - bits;
    if unused > 0
        && let Some(last) = out.last_mut()
    {
        *last &= 0xFFu8 << unused;
    }
    out
}

fn enc(mac: &mut Hmac<Sha256>, bytes: &[u8]) {
    mac.update(&len32(bytes.len()));
    mac.update(bytes);
}

/// A length as `[n]_32`; the callers' bounds (request size, context limits)
/// keep every length far below 2^32.
fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key256 {
        Key256::from_slice(&[7; 32]).unwrap()
    }

    fn one(value: &[u8], bits: u32) -> Vec<u8> {
        token(
            &key(),
            1,
            bits,
            "acme",
            &Context::new(),
            &[Field {
                value,
                transformations: &[],
            }],
        )
    }

    #[test]
    fn a_token_is_its_version_then_the_truncated_hash_with_unused_bits_zero() {
        for bits in MIN_BITS..=MAX_BITS {
            let t = one(b"alice@example.com", bits);
            assert_eq!(t.len(), token_len(bits), "{bits}");
            assert_eq!(t[..4], [0, 0, 0, 1]);
            let unused = (8 - bits % 8) % 8;
            assert_eq!(t.last().unwrap() & ((1u8 << unused) - 1), 0, "{bits}");
            // `bits` is part of the hash input: a shorter token is not a
            // prefix of a longer one's hash.
            if (16..MAX_BITS).contains(&bits) {
                let full = one(b"alice@example.com", MAX_BITS);
                assert_ne!(t[4..6], full[4..6], "{bits}");
            }
        }
    }

    #[test]
    fn the_unicode_versions_are_the_ones_format_md_names() {
        // docs/FORMAT.md, "Transformations", names them: a dependency update
        // that changes one must update the document too.
        assert_eq!(unicode_normalization::UNICODE_VERSION, (18, 0, 0));
        assert_eq!(caseless::UNICODE_VERSION, (16, 0, 0));
    }

    #[test]
    fn transformations_follow_their_definitions() {
        let apply = |v: &str, t: &[Transformation]| {
            String::from_utf8(
                transform(v.as_bytes(), t, &TransformBudget::per_call())
                    .unwrap()
                    .into_owned(),
            )
            .unwrap()
        };
        use Transformation::*;
        assert_eq!(apply("Straße", &[CaseFold]), "strasse");
        assert_eq!(apply("e\u{301}", &[Nfc]), "\u{e9}");
        assert_eq!(apply("\u{fb01}", &[Nfkc]), "fi");
        assert_eq!(apply("\u{fb01}", &[Nfc]), "\u{fb01}");
        assert_eq!(apply(" \u{3000}x y\t\n", &[Trim]), "x y");
        assert_eq!(apply("0123456789", &[LastChars(4)]), "6789");
        assert_eq!(apply("ab", &[LastChars(4)]), "ab");
        assert_eq!(apply("h\u{e9}llo\u{1f511}", &[LastChars(2)]), "o\u{1f511}");
        // In order: folding then the last two, or the last two then folding.
        assert_eq!(apply("XXß", &[CaseFold, LastChars(2)]), "ss");
        assert_eq!(apply("XXß", &[LastChars(2), CaseFold]), "xss");
        // Bytes without transformations; text only with them.
        let budget = TransformBudget::per_call();
        assert_eq!(transform(&[0xff], &[], &budget).unwrap().as_ref(), &[0xff]);
        assert_eq!(
            transform(&[0xff], &[Nfc], &budget),
            Err(TransformError::NotText)
        );
    }

    #[test]
    fn the_work_of_transformations_is_bounded_before_it_is_done() {
        use Transformation::*;
        // U+FDFA grows 3 bytes to 33 under NFKC: 6 KiB of it passes the
        // cap on a step's output, and is refused as it passes.
        let expanding = "\u{fdfa}".repeat(2048);
        assert!(expanding.len() <= MAX_TEXT_VALUE_BYTES);
        let budget = TransformBudget::per_call();
        assert_eq!(
            transform(expanding.as_bytes(), &[Nfkc], &budget),
            Err(TransformError::TooLong)
        );
        // Within the cap it transforms, and each step's input counts.
        let fits = "\u{fdfa}".repeat(1024);
        let budget = TransformBudget::of(fits.len() + 1);
        let once = transform(fits.as_bytes(), &[Nfkc], &budget).unwrap();
        assert!(once.len() > fits.len() && once.len() <= MAX_TRANSFORMED_BYTES);
        // A second step reads the expanded text: over this budget.
        let budget = TransformBudget::of(fits.len() + 1);
        assert_eq!(
            transform(fits.as_bytes(), &[Nfkc, CaseFold], &budget),
            Err(TransformError::OverBudget)
        );
        // One call's budget runs out after a bounded number of such values.
        let budget = TransformBudget::per_call();
        let steps = [Nfkc, CaseFold, Nfkc, CaseFold, Nfc, Nfkc, Trim, CaseFold];
        let mut done = 0;
        while transform(fits.as_bytes(), &steps, &budget).is_ok() {
            done += 1;
        }
        // (Every step after the first reads the expanded text, which the
        // later steps leave as it is.)
        let per_value = fits.len() + (steps.len() - 1) * once.len();
        assert_eq!(done, MAX_TRANSFORM_BYTES_PER_CALL / per_value);
    }
}
