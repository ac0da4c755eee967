//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so building
//! keywarden needs no system `protoc`. The descriptor set is kept for gRPC
//! server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

/// Kept in step with the hand-written Debug impls in src/api/pb.rs (a missing
/// one fails to compile wherever the message is formatted; a test there
/// formats every one of them).
const REDACTED_MESSAGES: &[&str] = &[
    "EncryptRequest",
    "EncryptResponse",
    "DecryptRequest",
    "DecryptResponse",
    "EncryptItem",
    "DecryptItem",
    "RewrapRequest",
    "RewrapResponse",
    "EncryptStreamStart",
    "EncryptStreamRequest",
    "EncryptStreamResponse",
    "DecryptStreamRequest",
    "DecryptStreamResponse",
    "ShredSubjectRequest",
    "IndexValue",
    "BlindIndexRequest",
    "BlindIndexResponse",
    "BlindIndexItem",
    "DecryptStreamStart",
    "GenerateDataKeyRequest",
    "GenerateDataKeyResponse",
    "DecryptDataKeyRequest",
    "DecryptDataKeyResponse",
    "RewrapDataKeyRequest",
    "RewrapDataKeyResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/keywarden/v1/keywarden.proto";
    println!("cargo:rerun-if-changed={proto}");
    // sqlx::migrate! embeds migrations/ but does not tell cargo to watch it:
    // a new migration file would otherwise not reach the binary (sqlx's
    // documented remedy).
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The list, for src/api/pb.rs's test that every message holding a
    // secret is on it.
    fs::write(
        out.join("redacted_messages.rs"),
        format!("&{REDACTED_MESSAGES:?}\n"),
    )?;
    fs::write(
        out.join("keywarden_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Context maps as BTreeMap: iterated in byte order of the keys, the
        // canonical order the envelope binds them in.
        .btree_map(".")
        // prost's codec with counts (batch items, context entries) bounded
        // before decoding: src/api/codec.rs.
        .codec_path("crate::api::codec::WireCodec")
        // Messages that carry plaintext, ciphertext, stream chunks or subject
        // ids get no derived Debug (it would print those bytes): src/api/pb.rs
        // writes theirs, printing lengths. Skipping a message skips its oneof
        // too. No message carries a bearer token: those travel in metadata.
        .skip_debug(
            REDACTED_MESSAGES
                .iter()
                .map(|m| format!(".keywarden.v1.{m}")),
        )
        .compile_fds(descriptors)?;
    Ok(())
}
