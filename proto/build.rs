//! Generates the Rust types and the tonic client/server for `proto/trellis/**` with prost, and serde impls in the protobuf JSON
//! mapping with pbjson (so snapshots can be read from YAML/JSON files). protoc comes vendored, so
//! no system protoc is needed.

use std::{env, error::Error, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let protos = [
        "proto/trellis/v1/snapshot.proto",
        "proto/trellis/v1/config.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = out_dir.join("trellis_descriptor.bin");

    let mut config = tonic_prost_build::Config::new();
    config
        .protoc_executable(protoc)
        .file_descriptor_set_path(&descriptors)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types");
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::ConfigCodec")
        .compile_with_config(config, &protos, &["proto"])?;

    let set = fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .build(&[".trellis"])?;
    Ok(())
}
