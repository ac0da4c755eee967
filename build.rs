//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so building
//! keywarden needs no system `protoc`. The descriptor set is kept for gRPC
//! server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/keywarden/v1/keywarden.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
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
        .compile_fds(descriptors)?;
    Ok(())
}
