//! The text form of a ciphertext, for people and for the CLI: `kw1:` followed
//! by the envelope in unpadded base64url (RFC 4648 section 5). One line, safe
//! in URLs, shells and CSV.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::Undecryptable;

/// Marks text-form version 1.
pub const PREFIX: &str = "kw1:";

pub fn encode(ciphertext: &[u8]) -> String {
    let mut text = String::with_capacity(PREFIX.len() + ciphertext.len().div_ceil(3) * 4);
    text.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(ciphertext, &mut text);
    text
}

/// Surrounding whitespace (a trailing newline from a pipe) is ignored.
pub fn decode(text: &str) -> Result<Vec<u8>, Undecryptable> {
    let body = text.trim().strip_prefix(PREFIX).ok_or(Undecryptable)?;
    URL_SAFE_NO_PAD.decode(body).map_err(|_| Undecryptable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_text() {
        let bytes = [0u8, 1, 2, 250, 251, 252, 253, 254, 255];
        let text = encode(&bytes);
        assert_eq!(text, "kw1:AAEC-vv8_f7_");
        assert_eq!(decode(&format!("{text}\n")).unwrap(), bytes);
        assert_eq!(decode("AAEC"), Err(Undecryptable));
        assert_eq!(decode("kw1:AAEC+/"), Err(Undecryptable));
    }
}
