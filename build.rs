//! Generates the gRPC code: the server side of the containerd services
//! dfdaemon serves, and both sides of damselfly's own mesh API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(
            ".containerd.services.content.v1",
            "::containerd_client::services::v1",
        )
        .extern_path(
            ".containerd.services.snapshots.v1",
            "::containerd_client::services::v1::snapshots",
        )
        .compile_protos(
            &[
                "proto/containerd_content.proto",
                "proto/containerd_snapshots.proto",
            ],
            &["proto"],
        )?;
    tonic_prost_build::configure().compile_protos(&["proto/mesh.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
