//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so building
//! keywarden needs no system `protoc`. The descriptor set is kept for gRPC
//! server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/keywarden/v1/keywarden.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("keywarden_descriptor.bin"))
        .compile_fds(descriptors)?;
    Ok(())
}
