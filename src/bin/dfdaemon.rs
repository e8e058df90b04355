//! dfdaemon: the damselfly daemon of one node (argument parsing only).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use damselfly::config::{FileConfig, SEED_CONFIG};
use damselfly::daemon::{self, DaemonConfig};
use damselfly::install::containerd_config::{self, Settings};
use damselfly::mesh::MeshConfig;
use damselfly::registry::RegistryConfig;

/// Serves this node's content store and snapshotter to containerd as proxy
/// plugins, and shares blobs with other nodes through the mesh when
/// supernodes are given.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Without a subcommand, dfdaemon runs as the daemon.
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML config file (keys as the long options, e.g. `data_dir`, plus
    /// `nodes: [supernode addresses]`). Options given here win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of the content store (blobs, ingests, metadata) and of
    /// the snapshots.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Unix socket for containerd's `[proxy_plugins]` content entry. With
    /// neither socket option, both are served at their defaults
    /// (/run/damselfly/content.sock and snapshot.sock); with one, only it.
    #[arg(long)]
    content_socket: Option<PathBuf>,
    /// Unix socket for containerd's `[proxy_plugins]` snapshot entry.
    #[arg(long)]
    snapshot_socket: Option<PathBuf>,
    /// Group (name or number) given the plugin sockets, which are mode 0660:
    /// containerd's, if it does not run as root.
    #[arg(long)]
    socket_group: Option<String>,
    /// A supernode, `IP[:PORT]` (port 8002 by default); repeat for several.
    /// Without any, `nodes:` of /etc/dragonfly/dfget.yml is used if present.
    #[arg(long = "supernode")]
    supernodes: Vec<String>,
    /// The address other nodes reach this node's piece server at.
    #[arg(long)]
    advertise_ip: Option<IpAddr>,
    /// Port of the piece server.
    #[arg(long)]
    upload_port: Option<u16>,
    /// Address of the Prometheus endpoint (`/metrics`), served with the mesh
    /// or the snapshotter's fast path; 127.0.0.1:65003 unless given.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// containerd's API socket, where the fast path records the layers it
    /// fetched.
    #[arg(long)]
    containerd_socket: Option<PathBuf>,
    /// containerd's registry hosts directory (CRI's `config_path`), read
    /// for endpoints, mirrors and TLS.
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Docker-style `config.json` with registry credentials.
    #[arg(long)]
    docker_config: Option<PathBuf>,
}

/// What installers run on the host (see `damselfly::install`).
#[derive(Subcommand)]
enum Command {
    /// Edits containerd's config.toml to use dfdaemon (install), or gives
    /// it back (uninstall): content and snapshot proxy plugins, the
    /// built-in content store disabled, CRI's snapshotter and config_path.
    ContainerdConfig {
        #[arg(value_enum)]
        action: ConfigAction,
        /// containerd's config file.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        config: PathBuf,
        /// Print the diff and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// dfdaemon's content socket, as containerd is to reach it.
        #[arg(long, default_value = damselfly::config::CONTENT_SOCKET)]
        content_socket: PathBuf,
        /// dfdaemon's snapshot socket.
        #[arg(long, default_value = damselfly::config::SNAPSHOT_SOCKET)]
        snapshot_socket: PathBuf,
        /// CRI's registry config_path, set if the config has none.
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        hosts_dir: PathBuf,
    },
    /// Imports the blobs of containerd's built-in content store into
    /// dfdaemon's store (hard links where possible, digests verified). Run
    /// it while dfdaemon is stopped, before containerd switches to it.
    ImportContent {
        /// containerd's content store (the dir holding `blobs/`).
        #[arg(long, default_value = damselfly::install::import::CONTAINERD_CONTENT)]
        from: PathBuf,
        /// dfdaemon's data dir.
        #[arg(long, default_value = "/var/lib/damselfly")]
        data_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ConfigAction {
    Install,
    Uninstall,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    damselfly::telemetry::init_logging();
    let args = Args::parse();
    if let Some(command) = args.command {
        return run_command(command);
    }
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::load_if_present(std::path::Path::new(SEED_CONFIG))?,
    };
    let supernodes = if args.supernodes.is_empty() {
        file.nodes.clone()
    } else {
        args.supernodes.clone()
    };
    let mesh = if supernodes.is_empty() {
        None
    } else {
        let advertise_ip = args
            .advertise_ip
            .or(file.advertise_ip)
            .ok_or_else(|| anyhow::anyhow!("--advertise-ip is required with supernodes"))?;
        Some(MeshConfig {
            supernodes: damselfly::config::supernode_addrs(&supernodes)?,
            advertise_ip,
            upload_port: args.upload_port.or(file.upload_port).unwrap_or(65002),
            upload_slots: file.upload_slots.unwrap_or(16),
            download_parallelism: file.download_parallelism.unwrap_or(4),
            stall_timeout: Duration::from_millis(file.stall_timeout_ms.unwrap_or(5000)),
            supernode: false,
        })
    };
    let (content_socket, snapshot_socket) = damselfly::config::plugin_sockets(
        args.content_socket.or(file.content_socket),
        args.snapshot_socket.or(file.snapshot_socket),
    );
    let socket_group = args
        .socket_group
        .or(file.socket_group)
        .map(|name| damselfly::config::socket_group(&name))
        .transpose()?;
    daemon::run(DaemonConfig {
        data_dir: args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| "/var/lib/damselfly".into()),
        content_socket,
        snapshot_socket,
        socket_group,
        mesh,
        metrics_listen: Some(
            args.metrics_listen
                .or(file.metrics_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 65003))),
        ),
        containerd_socket: args
            .containerd_socket
            .or(file.containerd_socket)
            .unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
        registry: registry_config(
            args.hosts_dir.or(file.hosts_dir),
            args.docker_config.or(file.docker_config),
        ),
    })
    .await
}

/// The registry settings: the defaults, with what was given instead.
fn registry_config(hosts_dir: Option<PathBuf>, docker_config: Option<PathBuf>) -> RegistryConfig {
    let defaults = RegistryConfig::default();
    RegistryConfig {
        hosts_dir: hosts_dir.unwrap_or(defaults.hosts_dir),
        docker_config: docker_config.or(defaults.docker_config),
    }
}

/// Runs an installer subcommand and prints what it did.
fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::ContainerdConfig {
            action,
            config,
            dry_run,
            content_socket,
            snapshot_socket,
            hosts_dir,
        } => {
            let report = match action {
                ConfigAction::Install => containerd_config::install(
                    &config,
                    &Settings {
                        content_socket,
                        snapshot_socket,
                        hosts_dir,
                    },
                    dry_run,
                )?,
                ConfigAction::Uninstall => containerd_config::uninstall(&config, dry_run)?,
            };
            if dry_run || report.changed {
                print!("{}", report.diff);
            }
            let verb = match (report.changed, dry_run) {
                (false, _) => "unchanged",
                (true, true) => "would change (dry run, nothing written)",
                (true, false) => "changed",
            };
            println!("{}: {verb}", config.display());
            for note in report.notes {
                println!("note: {note}");
            }
            Ok(())
        }
        Command::ImportContent { from, data_dir } => {
            let store = damselfly::store::Store::open(&data_dir).map_err(|e| {
                anyhow::anyhow!(
                    "open the store in {} (stop dfdaemon first): {e}",
                    data_dir.display()
                )
            })?;
            let report = damselfly::install::import::import_content(&from, &store)?;
            println!(
                "imported from {}: {} linked, {} copied ({} bytes), {} already present, {} skipped",
                from.display(),
                report.linked,
                report.copied,
                report.bytes,
                report.present,
                report.skipped
            );
            Ok(())
        }
    }
}
