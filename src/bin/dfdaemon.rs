//! dfdaemon: the damselfly daemon of one node (argument parsing only).

use std::path::PathBuf;

use clap::Parser;
use damselfly::daemon::{self, DaemonConfig};

/// Serves this node's content store to containerd as a content plugin.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory of the content store (blobs, ingests, metadata).
    #[arg(long, default_value = "/var/lib/damselfly")]
    data_dir: PathBuf,
    /// Unix socket for containerd's `[proxy_plugins]` content entry.
    #[arg(long, default_value = "/run/damselfly/content.sock")]
    content_socket: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    damselfly::telemetry::init_logging();
    let args = Args::parse();
    daemon::run(DaemonConfig {
        data_dir: args.data_dir,
        content_socket: args.content_socket,
    })
    .await
}
