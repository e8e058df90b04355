//! supernode: the damselfly mesh coordinator (argument parsing only).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use damselfly::supernode::scheduler::{MISSED_HEARTBEATS, SchedulerConfig};
use damselfly::supernode::{self, SupernodeConfig};

/// Coordinates the damselfly mesh: tracks hosts and pieces, elects ingesters,
/// schedules parents.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The supernode's own directory.
    #[arg(long, default_value = "/var/lib/damselfly-supernode")]
    data_dir: PathBuf,
    /// Address of the gRPC API daemons talk to.
    #[arg(long, default_value = "0.0.0.0:8002")]
    listen: SocketAddr,
    /// The IP daemons reach this supernode at.
    #[arg(long)]
    advertise_ip: IpAddr,
    /// Address of the Prometheus endpoint (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:8003")]
    metrics_listen: SocketAddr,
    /// Heartbeat interval told to daemons; three missed ones drop a host.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_ms: u64,
    /// Most concurrent piece uploads asked of one host.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    upload_cap: u32,
    /// Most MiB of blobs the repo keeps (oldest evicted first); 0: no repo.
    #[arg(long, default_value_t = 10240)]
    repo_max_mib: u64,
    /// Port the repo serves pieces on.
    #[arg(long, default_value_t = 8001)]
    upload_port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    damselfly::telemetry::init_logging();
    let args = Args::parse();
    supernode::run(SupernodeConfig {
        data_dir: args.data_dir,
        listen: args.listen,
        advertise_ip: args.advertise_ip,
        metrics_listen: args.metrics_listen,
        scheduler: SchedulerConfig {
            heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
            upload_cap: args.upload_cap,
            // Daemons notice a restart at their next heartbeat and register
            // at once: as long as it takes to call a silent host dead.
            recovery: Duration::from_millis(args.heartbeat_ms) * MISSED_HEARTBEATS,
        },
        repo_max_bytes: args.repo_max_mib.saturating_mul(1 << 20),
        upload_port: args.upload_port,
    })
    .await
}
