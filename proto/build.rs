//! Compiles `chorus/v1/*.proto` with protox (pure Rust, no system `protoc`) and
//! generates prost messages plus tonic clients and servers into `OUT_DIR`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "chorus/v1/common.proto",
    "chorus/v1/orchestrator.proto",
    "chorus/v1/rollout.proto",
    "chorus/v1/learner.proto",
    "chorus/v1/environment.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let descriptors = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        // Weight chunks are shared, not copied, between the learner's published version and
        // every stream of it, and decoded as slices of the receive buffer.
        .bytes(".chorus.v1.WeightChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
