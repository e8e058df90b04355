//! dfget: damselfly's command-line client (argument parsing only).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use damselfly::dfget::pull::{PullOptions, pull};

/// Pulls through damselfly and shows where the bytes came from.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pulls IMAGE through containerd's CRI image service, as kubelet does,
    /// and reports which layers dfdaemon unpacked and where they came from.
    Pull {
        /// The image, e.g. `registry.example.com/app:v1`.
        image: String,
        /// containerd's API socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        containerd: PathBuf,
        /// dfdaemon's metrics endpoint.
        #[arg(long, default_value = "http://127.0.0.1:65003/metrics")]
        metrics: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    damselfly::telemetry::init_logging();
    match Args::parse().command {
        Command::Pull {
            image,
            containerd,
            metrics,
        } => {
            let report = pull(&PullOptions {
                image,
                containerd_socket: containerd,
                metrics_url: metrics,
            })
            .await?;
            print!("{report}");
        }
    }
    Ok(())
}
