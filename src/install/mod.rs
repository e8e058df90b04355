//! Putting dfdaemon into a node's containerd: the `dfdaemon` subcommands
//! an installer (the Debian package's instructions, the node installer
//! DaemonSet's script) runs on the host.
//!
//! - [`containerd_config`]: `containerd-config install|uninstall`, the edit
//!   of containerd's config.toml that makes dfdaemon its content store and
//!   CRI's snapshotter, recorded so that uninstall gives the file back;
//! - [`import`]: `import-content`, which moves the blobs of containerd's
//!   built-in content store into dfdaemon's, so no image is lost in the switch.

pub mod containerd_config;
pub mod import;
