//! damselfly: peer-to-peer distribution of container images for containerd.
//!
//! - [`store`]: the node's content store, the one copy of every blob;
//! - [`plugin`]: containerd's Content service over that store, on a unix socket;
//! - [`snapshotter`]: containerd's Snapshots service, an overlayfs snapshotter, on its own socket;
//! - [`unpack`]: the layer applier, which unpacks OCI layers into overlay upper dirs;
//! - [`registry`]: fetches blobs from the registries images come from,
//!   configured like containerd's CRI (hosts.toml, config.json credentials);
//! - [`fastpath`]: containerd's remote-snapshot protocol: layers fetched and
//!   unpacked by dfdaemon, all at once, while their bytes arrive;
//! - [`protocol`]: the mesh's wire protocol, shared by both sides;
//! - [`mesh`]: the piece mesh on a node; [`supernode`]: its coordinator;
//! - [`dfget`]: the command-line client;
//! - [`install`]: what installers run on a node: containerd's config edit,
//!   the import of containerd's own blobs;
//! - [`daemon`]: dfdaemon, which ties them together on a node;
//! - [`needs_root`]: how tests that need root skip (or, in CI, fail) as another user.

pub mod config;
pub mod daemon;
pub mod dfget;
pub mod fastpath;
pub mod install;
pub mod mesh;
pub mod metrics;
pub mod needs_root;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod shutdown;
pub mod snapshotter;
pub mod store;
pub mod supernode;
pub mod telemetry;
pub mod unpack;
