//! Compiles the public API (proto/aitl/v1) with protox — no protoc on any
//! machine — and keeps the descriptor set for server reflection and for
//! decoding training-log records to JSON.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/aitl/v1/common.proto",
    "proto/aitl/v1/support.proto",
    "proto/aitl/v1/knowledge.proto",
    "proto/aitl/v1/trainlog.proto",
    "proto/aitl/v1/flywheel.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("aitl_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
