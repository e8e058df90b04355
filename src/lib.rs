//! damselfly: peer-to-peer distribution of container images for containerd.
//!
//! - [`store`]: the node's content store, the one copy of every blob;
//! - [`plugin`]: containerd's Content service over that store, on a unix socket;
//! - [`registry`]: fetches blobs from the registries images come from,
//!   configured like containerd's CRI (hosts.toml, config.json credentials);
//! - [`daemon`]: dfdaemon, which ties them together on a node.

pub mod config;
pub mod daemon;
pub mod mesh;
pub mod metrics;
pub mod plugin;
pub mod registry;
pub mod shutdown;
pub mod store;
pub mod supernode;
pub mod telemetry;
