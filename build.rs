//! Generates the gRPC server side of the containerd services dfdaemon serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(
            ".containerd.services.content.v1",
            "::containerd_client::services::v1",
        )
        .compile_protos(&["proto/containerd_content.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
