use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files =
        ["flowers/v1/batch.proto", "flowers/v1/coordinator.proto"].map(|f| proto_root.join(f));
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("flowers_descriptor.bin");
    // A vendored protoc keeps the build offline and independent of the host.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_with_config(config, &files, std::slice::from_ref(&proto_root))?;
    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
