//! Compiles every `.proto` under `osprey/` into OUT_DIR (never committed), with a descriptor set
//! for server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "osprey/v1/types.proto",
    "osprey/v1/gateway.proto",
    "osprey/worker/v1/common.proto",
    "osprey/worker/v1/vision.proto",
    "osprey/worker/v1/sam.proto",
    "osprey/worker/v1/llm.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=osprey");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() {
        // A fresh machine needs no system protoc.
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("osprey_descriptor.bin"))
        .codec_path("crate::codec::ProstCodec")
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
