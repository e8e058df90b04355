//! dfdaemon's YAML config file. Also reads the seed deployment's
//! `/etc/dragonfly/dfget.yml`, whose `nodes:` lists the supernodes.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Where the seed deployment kept its config.
pub const SEED_CONFIG: &str = "/etc/dragonfly/dfget.yml";
/// Where containerd's proxy plugins find dfdaemon by default.
pub const CONTENT_SOCKET: &str = "/run/damselfly/content.sock";
pub const SNAPSHOT_SOCKET: &str = "/run/damselfly/snapshot.sock";
/// The supernode port when an address has none.
pub const SUPERNODE_PORT: u16 = 8002;

/// Every key is optional; command-line options win over the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub content_socket: Option<PathBuf>,
    pub snapshot_socket: Option<PathBuf>,
    /// Group of the plugin sockets (name or number), e.g. containerd's.
    pub socket_group: Option<String>,
    /// Supernodes, `IP[:PORT]`.
    #[serde(default)]
    pub nodes: Vec<String>,
    pub advertise_ip: Option<IpAddr>,
    pub upload_port: Option<u16>,
    pub upload_slots: Option<usize>,
    pub download_parallelism: Option<usize>,
    pub stall_timeout_ms: Option<u64>,
    pub metrics_listen: Option<SocketAddr>,
    pub containerd_socket: Option<PathBuf>,
    pub hosts_dir: Option<PathBuf>,
    pub docker_config: Option<PathBuf>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        serde_yaml_ng::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    /// The file's config, or the defaults if there is no such file.
    pub fn load_if_present(path: &Path) -> anyhow::Result<Self> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(Self::default())
        }
    }
}

/// The plugin sockets to serve, content's then the snapshotter's: those
/// asked for, or both defaults when neither is.
pub fn plugin_sockets(
    content: Option<PathBuf>,
    snapshot: Option<PathBuf>,
) -> (Option<PathBuf>, Option<PathBuf>) {
    if content.is_none() && snapshot.is_none() {
        return (Some(CONTENT_SOCKET.into()), Some(SNAPSHOT_SOCKET.into()));
    }
    (content, snapshot)
}

/// The group `name` (a group name, or a number) names.
pub fn socket_group(name: &str) -> anyhow::Result<nix::unistd::Gid> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(gid));
    }
    let group = nix::unistd::Group::from_name(name)
        .with_context(|| format!("look up group {name:?}"))?
        .with_context(|| format!("socket group {name:?}: no such group"))?;
    Ok(group.gid)
}

/// Validates supernode addresses, adding the default port where missing.
pub fn supernode_addrs(nodes: &[String]) -> anyhow::Result<Vec<String>> {
    nodes
        .iter()
        .map(|node| {
            if let Ok(addr) = node.parse::<SocketAddr>() {
                return Ok(addr.to_string());
            }
            let ip: IpAddr = node
                .parse()
                .with_context(|| format!("supernode address {node:?} is neither IP nor IP:PORT"))?;
            Ok(SocketAddr::new(ip, SUPERNODE_PORT).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_seed_format() {
        let config: FileConfig =
            serde_yaml_ng::from_str("nodes:\n  - 10.0.0.1\n  - 10.0.0.2:9000\n").unwrap();
        assert_eq!(
            supernode_addrs(&config.nodes).unwrap(),
            vec!["10.0.0.1:8002".to_string(), "10.0.0.2:9000".to_string()]
        );
        assert!(supernode_addrs(&["example.com".into()]).is_err());
        assert_eq!(socket_group("0").unwrap().as_raw(), 0);
        assert_eq!(socket_group("root").unwrap().as_raw(), 0);
        assert!(socket_group("no-such-group-here").is_err());
        assert!(serde_yaml_ng::from_str::<FileConfig>("bogus_key: 1\n").is_err());
    }

    #[test]
    fn serves_the_sockets_asked_for_or_both_defaults() {
        let path = |p: &str| Some(PathBuf::from(p));
        assert_eq!(
            plugin_sockets(None, None),
            (path(CONTENT_SOCKET), path(SNAPSHOT_SOCKET))
        );
        assert_eq!(plugin_sockets(path("/c"), None), (path("/c"), None));
        assert_eq!(plugin_sockets(None, path("/s")), (None, path("/s")));
        let config: FileConfig = serde_yaml_ng::from_str("snapshot_socket: /s\n").unwrap();
        assert_eq!(config.snapshot_socket, path("/s"));
    }
}
