//! Compiles `proto/` with the protoc shipped by `protoc-bin-vendored`, so a
//! fresh machine needs nothing but cargo.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known_types = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let descriptor_path = PathBuf::from(env::var("OUT_DIR")?).join("muster_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .codec_path("crate::codec::LeanCodec")
        .compile_protos(
            &[PathBuf::from("proto/muster/v1/muster.proto")],
            &[PathBuf::from("proto"), well_known_types],
        )?;

    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
