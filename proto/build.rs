//! Compiles `chukei/**/*.proto` with protox (no system `protoc`) and generates
//! prost messages and tonic clients/servers, plus the descriptor set that gRPC
//! reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "chukei/common/v1/common.proto",
    "chukei/relay/v1/relay.proto",
    "chukei/carrier/v1/carrier.proto",
    "chukei/terminal/v1/terminal.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("chukei_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
