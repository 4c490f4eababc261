//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so a fresh
//! machine needs no system `protoc`. The file descriptor set is kept for
//! gRPC server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/switchyard/v1/chat.proto",
        "proto/switchyard/v1/models.proto",
        "proto/switchyard/v1/generations.proto",
        "proto/switchyard/v1/speech.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("switchyard_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `bytes` fields as `Bytes`: audio and media move without copies.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
