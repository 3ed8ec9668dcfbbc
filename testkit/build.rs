//! Generates the test gRPC echo service (unary and bidi streaming) and the gRPC health service
//! with tonic.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    println!("cargo:rerun-if-changed=proto/health.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/echo.proto", "proto/health.proto"],
        &["proto"],
    )?;
    Ok(())
}
