//! damselfly: peer-to-peer distribution of container images for containerd.
//!
//! - [`store`]: the node's content store, the one copy of every blob;
//! - [`plugin`]: containerd's Content service over that store, on a unix socket;
//! - [`daemon`]: dfdaemon, which ties them together on a node;
//! - [`unpack`]: the layer applier, which unpacks OCI layers into overlay upper dirs.

pub mod config;
pub mod daemon;
pub mod dfget;
pub mod mesh;
pub mod metrics;
pub mod plugin;
pub mod shutdown;
pub mod snapshotter;
pub mod store;
pub mod supernode;
pub mod telemetry;
pub mod unpack;
