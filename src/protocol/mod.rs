//! The mesh's wire protocol, shared by dfdaemon and the supernode, and
//! depending on nothing else of damselfly's:
//!
//! - [`api`]: the gRPC messages and services (proto/mesh.proto);
//! - [`Digest`]: validated content digests, the task ids of the mesh;
//! - [`piece`]: how every node cuts a blob into pieces;
//! - [`wire`]: the checked Rust values the scheduler reads messages into;
//! - [`status`]: what each gRPC status code means to the caller.

pub mod digest;
pub mod piece;
pub mod status;
pub mod wire;

pub use digest::{Digest, InvalidDigest};

/// The mesh gRPC API (proto/mesh.proto), client and server.
pub mod api {
    tonic::include_proto!("damselfly.mesh.v1");
}
