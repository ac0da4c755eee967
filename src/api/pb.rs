//! The generated protobuf types and service stubs, and the Debug of the
//! messages that carry secrets.
//!
//! prost derives Debug for every message, which would print plaintext,
//! ciphertext, stream chunks and subject ids byte for byte wherever a request
//! is logged or a test fails. build.rs turns the derive off for those
//! messages (`skip_debug`); the impls below print their lengths instead, and
//! a context map as its number of entries (its values may name a record).
//! Tenant ids, versions and codes print as they are: they are in errors and
//! audit records anyway. Messages that only contain these (batches, results)
//! keep the derived Debug, which calls the impls below for their parts.

#![allow(clippy::all, clippy::pedantic)]

use std::fmt;

tonic::include_proto!("keywarden.v1");

/// The encoded descriptors, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keywarden_descriptor");

/// Prints `<N bytes>` in place of secret bytes.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

/// Prints `<N entries>` in place of a context map.
struct Entries(usize);

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} entries>", self.0)
    }
}

/// Debug for a message, field by field: `shown` as it is, `bytes` as
/// [`Redacted`], `entries` as [`Entries`].
macro_rules! redacted_debug {
    ($($message:ident { $($field:ident: $how:ident),* $(,)? })*) => {$(
        impl fmt::Debug for $message {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($message))
                    $(.field(stringify!($field), &redacted_debug!(@$how self.$field)))*
                    .finish()
            }
        }
    )*};
    (@shown $value:expr) => { &$value };
    (@bytes $value:expr) => { Redacted($value.len()) };
    (@entries $value:expr) => { Entries($value.len()) };
}

redacted_debug! {
    EncryptRequest { tenant_id: shown, subject_id: bytes, context: entries, plaintext: bytes, deterministic: shown, key_version: shown }
    EncryptResponse { ciphertext: bytes, key_version: shown }
    DecryptRequest { tenant_id: shown, context: entries, ciphertext: bytes }
    DecryptResponse { plaintext: bytes, key_version: shown }
    EncryptItem { subject_id: bytes, context: entries, plaintext: bytes, deterministic: shown, key_version: shown }
    DecryptItem { context: entries, ciphertext: bytes }
    RewrapRequest { tenant_id: shown, context: entries, ciphertext: bytes }
    RewrapResponse { ciphertext: bytes, key_version: shown, previous_key_version: shown }
    EncryptStreamStart { tenant_id: shown, subject_id: bytes, context: entries }
    EncryptStreamRequest { part: shown }
    EncryptStreamResponse { chunk: bytes, key_version: shown }
    DecryptStreamRequest { part: shown }
    DecryptStreamResponse { chunk: bytes, key_version: shown }
    ShredSubjectRequest { tenant_id: shown, subject_id: bytes }
    IndexValue { value: bytes, transformations: shown }
    BlindIndexRequest { tenant_id: shown, context: entries, values: shown, bits: shown, key_version: shown, all_versions: shown }
    BlindIndexResponse { tokens: entries, key_version: shown }
    BlindIndexItem { context: entries, values: shown, bits: shown, key_version: shown, all_versions: shown }
    DecryptStreamStart { tenant_id: shown, context: entries }
    GenerateDataKeyRequest { tenant_id: shown, subject_id: bytes, context: entries }
    GenerateDataKeyResponse { data_key: bytes, wrapped_data_key: bytes, key_version: shown }
    DecryptDataKeyRequest { tenant_id: shown, context: entries, wrapped_data_key: bytes }
    DecryptDataKeyResponse { data_key: bytes, key_version: shown }
    RewrapDataKeyRequest { tenant_id: shown, context: entries, wrapped_data_key: bytes }
    RewrapDataKeyResponse { wrapped_data_key: bytes, key_version: shown, previous_key_version: shown }
}

/// Debug for a stream request's part: its start as it prints, a chunk as
/// [`Redacted`].
macro_rules! stream_part_debug {
    ($($part:ty),*) => {$(
        impl fmt::Debug for $part {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    Self::Start(start) => f.debug_tuple("Start").field(start).finish(),
                    Self::Chunk(chunk) => f
                        .debug_tuple("Chunk")
                        .field(&Redacted(chunk.len()))
                        .finish(),
                }
            }
        }
    )*};
}

stream_part_debug!(encrypt_stream_request::Part, decrypt_stream_request::Part);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use base64::{
        Engine,
        engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    };

    use super::*;

    /// Distinct secret bytes per field, each long enough to be unmistakable.
    const PLAINTEXT: &[u8] = b"plaintext-of-a-patient-diagnosis";
    const CIPHERTEXT: &[u8] = b"\x01\x01\x01\x00\x00\x00\x07ciphertext-bytes-of-a-record";
    const CHUNK: &[u8] = b"chunk-of-a-large-medical-scan";
    const SUBJECT: &str = "ada.lovelace@example.com";
    const CONTEXT_VALUE: &str = "row-8812-of-patients";

    fn context() -> BTreeMap<String, String> {
        [("record".to_owned(), CONTEXT_VALUE.to_owned())].into()
    }

    /// Every form a secret could take in Debug output.
    fn forms(secret: &[u8]) -> Vec<String> {
        let mut forms = vec![
            String::from_utf8_lossy(secret).into_owned(),
            hex::encode(secret),
            STANDARD.encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
            // How Debug prints a Vec<u8>, without the brackets.
            format!("{secret:?}").trim_matches(['[', ']']).to_owned(),
        ];
        // A string's Debug (escaped).
        if let Ok(text) = std::str::from_utf8(secret) {
            forms.push(format!("{text:?}"));
        }
        forms
    }

    /// Every message that holds a secret, alone and inside the messages
    /// that contain it.
    fn messages() -> Vec<(&'static str, String)> {
        let encrypt_response = EncryptResponse {
            ciphertext: CIPHERTEXT.to_vec(),
            key_version: 3,
        };
        let decrypt_response = DecryptResponse {
            plaintext: PLAINTEXT.to_vec(),
            key_version: 3,
        };
        let encrypt_item = EncryptItem {
            subject_id: SUBJECT.into(),
            context: context(),
            plaintext: PLAINTEXT.to_vec(),
            deterministic: true,
            key_version: 2,
        };
        let decrypt_item = DecryptItem {
            context: context(),
            ciphertext: CIPHERTEXT.to_vec(),
        };
        let start = EncryptStreamStart {
            tenant_id: "acme".into(),
            subject_id: SUBJECT.into(),
            context: context(),
        };
        let decrypt_start = DecryptStreamStart {
            tenant_id: "acme".into(),
            context: BTreeMap::new(),
        };
        let index_value = IndexValue {
            value: PLAINTEXT.to_vec(),
            transformations: vec![IndexTransformation {
                kind: index_transformation::Kind::CaseFold as i32,
                count: 0,
            }],
        };
        let index_response = BlindIndexResponse {
            tokens: vec![CIPHERTEXT.to_vec()],
            key_version: 1,
        };
        let both = |value: &dyn fmt::Debug| format!("{value:?}\n{value:#?}");
        vec![
            (
                "EncryptRequest",
                both(&EncryptRequest {
                    tenant_id: "acme".into(),
                    subject_id: SUBJECT.into(),
                    context: context(),
                    plaintext: PLAINTEXT.to_vec(),
                    deterministic: false,
                    key_version: 0,
                }),
            ),
            ("EncryptResponse", both(&encrypt_response)),
            (
                "DecryptRequest",
                both(&DecryptRequest {
                    tenant_id: "acme".into(),
                    context: context(),
                    ciphertext: CIPHERTEXT.to_vec(),
                }),
            ),
            ("DecryptResponse", both(&decrypt_response)),
            ("EncryptItem", both(&encrypt_item)),
            ("DecryptItem", both(&decrypt_item)),
            (
                "EncryptBatchRequest",
                both(&EncryptBatchRequest {
                    tenant_id: "acme".into(),
                    items: vec![encrypt_item],
                }),
            ),
            (
                "EncryptBatchResponse",
                both(&EncryptBatchResponse {
                    results: vec![EncryptResult {
                        result: Some(encrypt_result::Result::Ok(encrypt_response)),
                    }],
                }),
            ),
            (
                "DecryptBatchRequest",
                both(&DecryptBatchRequest {
                    tenant_id: "acme".into(),
                    items: vec![decrypt_item],
                }),
            ),
            (
                "DecryptBatchResponse",
                both(&DecryptBatchResponse {
                    results: vec![DecryptResult {
                        result: Some(decrypt_result::Result::Ok(decrypt_response)),
                    }],
                }),
            ),
            (
                "RewrapRequest",
                both(&RewrapRequest {
                    tenant_id: "acme".into(),
                    context: context(),
                    ciphertext: CIPHERTEXT.to_vec(),
                }),
            ),
            (
                "RewrapResponse",
                both(&RewrapResponse {
                    ciphertext: CIPHERTEXT.to_vec(),
                    key_version: 4,
                    previous_key_version: 3,
                }),
            ),
            ("EncryptStreamStart", both(&start)),
            (
                "EncryptStreamRequest start",
                both(&EncryptStreamRequest {
                    part: Some(encrypt_stream_request::Part::Start(start)),
                }),
            ),
            (
                "EncryptStreamRequest chunk",
                both(&EncryptStreamRequest {
                    part: Some(encrypt_stream_request::Part::Chunk(CHUNK.to_vec())),
                }),
            ),
            (
                "EncryptStreamResponse",
                both(&EncryptStreamResponse {
                    chunk: CHUNK.to_vec(),
                    key_version: 3,
                }),
            ),
            (
                "DecryptStreamRequest start",
                both(&DecryptStreamRequest {
                    part: Some(decrypt_stream_request::Part::Start(decrypt_start)),
                }),
            ),
            (
                "DecryptStreamRequest chunk",
                both(&DecryptStreamRequest {
                    part: Some(decrypt_stream_request::Part::Chunk(CHUNK.to_vec())),
                }),
            ),
            (
                "DecryptStreamResponse",
                both(&DecryptStreamResponse {
                    chunk: CHUNK.to_vec(),
                    key_version: 3,
                }),
            ),
            (
                "ShredSubjectRequest",
                both(&ShredSubjectRequest {
                    tenant_id: "acme".into(),
                    subject_id: SUBJECT.into(),
                }),
            ),
            (
                "BlindIndexRequest",
                both(&BlindIndexRequest {
                    tenant_id: "acme".into(),
                    context: context(),
                    values: vec![index_value.clone()],
                    bits: 32,
                    key_version: 0,
                    all_versions: true,
                }),
            ),
            ("BlindIndexResponse", both(&index_response)),
            (
                "BlindIndexBatchRequest",
                both(&BlindIndexBatchRequest {
                    tenant_id: "acme".into(),
                    items: vec![BlindIndexItem {
                        context: context(),
                        values: vec![index_value],
                        bits: 32,
                        key_version: 0,
                        all_versions: false,
                    }],
                }),
            ),
            (
                "BlindIndexBatchResponse",
                both(&BlindIndexBatchResponse {
                    results: vec![BlindIndexResult {
                        result: Some(blind_index_result::Result::Ok(index_response)),
                    }],
                }),
            ),
        ]
    }

    #[test]
    fn debug_of_messages_with_secrets_shows_no_secret_byte() {
        let secrets: [&[u8]; 5] = [
            PLAINTEXT,
            CIPHERTEXT,
            CHUNK,
            SUBJECT.as_bytes(),
            CONTEXT_VALUE.as_bytes(),
        ];
        let messages = messages();
        assert_eq!(messages.len(), 24);
        for (name, printed) in &messages {
            assert!(
                printed.contains(name.split(' ').next().unwrap()),
                "{printed}"
            );
            for secret in secrets {
                for form in forms(secret) {
                    assert!(
                        !printed.contains(&form),
                        "Debug of {name} shows {form:?}:\n{printed}"
                    );
                }
            }
        }
    }

    #[test]
    fn debug_shows_lengths_and_the_fields_that_are_not_secret() {
        let request = EncryptRequest {
            tenant_id: "acme".into(),
            subject_id: SUBJECT.into(),
            context: context(),
            plaintext: PLAINTEXT.to_vec(),
            deterministic: true,
            key_version: 2,
        };
        assert_eq!(
            format!("{request:?}"),
            "EncryptRequest { tenant_id: \"acme\", subject_id: <24 bytes>, \
             context: <1 entries>, plaintext: <32 bytes>, deterministic: true, \
             key_version: 2 }"
        );
        let chunk = DecryptStreamRequest {
            part: Some(decrypt_stream_request::Part::Chunk(CHUNK.to_vec())),
        };
        assert_eq!(
            format!("{chunk:?}"),
            "DecryptStreamRequest { part: Some(Chunk(<29 bytes>)) }"
        );
        let response = RewrapResponse {
            ciphertext: CIPHERTEXT.to_vec(),
            key_version: 4,
            previous_key_version: 3,
        };
        assert_eq!(
            format!("{response:?}"),
            "RewrapResponse { ciphertext: <35 bytes>, key_version: 4, previous_key_version: 3 }"
        );
    }

    /// Every message with a field that can hold a secret (bytes, a subject
    /// id, a context map) has the redacted Debug: a new message cannot
    /// forget it.
    #[test]
    fn every_message_with_a_secret_field_is_redacted() {
        use prost::Message as _;
        use prost_types::field_descriptor_proto::Type;
        const REDACTED_MESSAGES: &[&str] =
            include!(concat!(env!("OUT_DIR"), "/redacted_messages.rs"));
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let file = set
            .file
            .iter()
            .find(|f| f.package() == "keywarden.v1")
            .unwrap();
        let mut unredacted = Vec::new();
        for message in &file.message_type {
            let secret = message.field.iter().any(|field| {
                field.r#type() == Type::Bytes
                    || field.name() == "subject_id"
                    || field.name() == "context"
            });
            if secret && !REDACTED_MESSAGES.contains(&message.name()) {
                unredacted.push(message.name().to_owned());
            }
        }
        assert!(unredacted.is_empty(), "not redacted: {unredacted:?}");
        // And the data-key messages print no key.
        let key = b"data-key-bytes-of-thirty-two-by!";
        let shown = format!(
            "{:?} {:?}",
            GenerateDataKeyResponse {
                data_key: key.to_vec(),
                wrapped_data_key: CIPHERTEXT.to_vec(),
                key_version: 1,
            },
            DecryptDataKeyResponse {
                data_key: key.to_vec(),
                key_version: 1,
            }
        );
        for form in forms(key).into_iter().chain(forms(CIPHERTEXT)) {
            assert!(!shown.contains(&form), "{shown}");
        }
    }
}
