//! The supernode, the mesh's coordinator: serves the Supernode gRPC API of
//! proto/mesh.proto over the [`scheduler::Scheduler`] and Prometheus metrics
//! over HTTP, until SIGINT or SIGTERM. Its scheduling state is soft (rebuilt
//! from the daemons' registrations after a restart); its data dir holds the
//! [`repo`], a copy of the blobs the mesh fetched, served as a peer.

mod bits;
pub mod metrics;
pub mod repo;
pub mod scheduler;
pub mod service;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::mesh::MeshConfig;
use crate::mesh::metrics::MeshCollector;
use crate::protocol::api::supernode_server::SupernodeServer;
use crate::shutdown::Shutdown;
use metrics::SupernodeMetrics;
use repo::{Repo, RepoConfig};
use scheduler::SchedulerConfig;
use service::SupernodeService;

/// The repo serves many nodes at once: more upload slots than a node's.
const REPO_UPLOAD_SLOTS: usize = 32;
/// Piece transfers at once while the repo copies a blob.
const REPO_DOWNLOAD_PARALLELISM: usize = 4;
/// A copy that makes no progress for this long is given up.
const REPO_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request accepted. A registration lists every blob a daemon
/// offers with each piece's digest, about 80 bytes a piece: 64 MiB covers
/// some 800,000 pieces, over 780 GiB of content in 1 MiB pieces.
const MAX_REGISTRATION_BYTES: usize = 64 << 20;

/// What the supernode needs to run.
#[derive(Debug, Clone)]
pub struct SupernodeConfig {
    /// Its own directory (the repo lives in `repo/`); created if missing.
    pub data_dir: PathBuf,
    /// Where the gRPC API listens (port 8002 by convention).
    pub listen: SocketAddr,
    /// The address daemons reach this supernode at.
    pub advertise_ip: IpAddr,
    /// Where `/metrics` is served.
    pub metrics_listen: SocketAddr,
    pub scheduler: SchedulerConfig,
    /// Most bytes the repo keeps; 0: no repo.
    pub repo_max_bytes: u64,
    /// Port of the repo's piece server (on `advertise_ip`).
    pub upload_port: u16,
}

/// A file in the data dir that says a supernode ran here before.
const RAN_BEFORE: &str = "ran-before";

/// Runs the supernode until SIGINT or SIGTERM, then waits (up to
/// [`crate::shutdown::STOP_WITHIN`]) for its background tasks to end.
pub async fn run(mut config: SupernodeConfig) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signals().context("handle SIGINT and SIGTERM")?;
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .with_context(|| format!("create the data dir {}", config.data_dir.display()))?;
    // Only a restart needs the recovery window: on a first start no daemon
    // can be ingesting for this supernode.
    let marker = config.data_dir.join(RAN_BEFORE);
    let restarted = tokio::fs::try_exists(&marker).await.unwrap_or(false);
    if !restarted {
        config.scheduler.recovery = Duration::ZERO;
        tokio::fs::write(&marker, b"")
            .await
            .with_context(|| format!("write {}", marker.display()))?;
    }
    let grpc = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen for gRPC on {}", config.listen))?;
    let metrics = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("listen for metrics on {}", config.metrics_listen))?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        listen = %config.listen,
        advertise_ip = %config.advertise_ip,
        restarted,
        recovery_ms = config.scheduler.recovery.as_millis() as u64,
        "supernode starting"
    );
    let repo = if config.repo_max_bytes > 0 {
        Some(
            Repo::start(
                RepoConfig {
                    dir: config.data_dir.join("repo"),
                    max_bytes: config.repo_max_bytes,
                    mesh: MeshConfig {
                        supernodes: vec![
                            SocketAddr::new(config.advertise_ip, config.listen.port()).to_string(),
                        ],
                        advertise_ip: config.advertise_ip,
                        upload_port: config.upload_port,
                        upload_slots: REPO_UPLOAD_SLOTS,
                        download_parallelism: REPO_DOWNLOAD_PARALLELISM,
                        stall_timeout: REPO_STALL_TIMEOUT,
                        supernode: true,
                    },
                },
                &shutdown,
            )
            .await?,
        )
    } else {
        None
    };
    serve(config.scheduler, grpc, metrics, repo, shutdown).await
}

/// Serves the gRPC API on `grpc` and the metrics on `metrics` until
/// `shutdown` is cancelled, expiring silent hosts every heartbeat interval,
/// and has `repo` (if any, started on the same `shutdown`) copy each new
/// blob. Then waits (up to [`crate::shutdown::STOP_WITHIN`]) for every task of `shutdown` to
/// end.
pub async fn serve(
    config: SchedulerConfig,
    grpc: TcpListener,
    metrics: TcpListener,
    repo: Option<Arc<Repo>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    crate::store::require_blocking_runtime()?;
    shutdown
        .serve_then_stop(serve_until(config, grpc, metrics, repo, &shutdown))
        .await
}

async fn serve_until(
    config: SchedulerConfig,
    grpc: TcpListener,
    metrics: TcpListener,
    repo: Option<Arc<Repo>>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let grpc_addr = grpc.local_addr().context("gRPC listener address")?;
    let mut registry = Registry::default();
    let new_blobs = repo.map(|repo| {
        let damselfly = registry.sub_registry_with_prefix("damselfly");
        damselfly.register_collector(Box::new(MeshCollector::new(
            repo.mesh().clone(),
            "supernode_repo",
        )));
        let (tell, told) = tokio::sync::mpsc::unbounded_channel();
        shutdown.spawn(repo.copy_all(told));
        tell
    });
    let service = SupernodeService::new(
        config.clone(),
        SupernodeMetrics::register(&mut registry),
        new_blobs,
    );
    shutdown.spawn(
        service
            .clone()
            .expire_periodically(config.heartbeat_interval),
    );
    // Ready once this runs: the repo is open and the API listener bound.
    let ready: crate::metrics::Readiness = Arc::new(|| true);
    let metrics_server =
        crate::metrics::serve(metrics, Arc::new(registry), ready, shutdown.cancelled());
    tracing::info!(addr = %grpc_addr, "serving the mesh API");
    let grpc_server = async {
        Server::builder()
            .add_service(
                SupernodeServer::new(service).max_decoding_message_size(MAX_REGISTRATION_BYTES),
            )
            .serve_with_incoming_shutdown(
                TcpIncoming::from(grpc).with_nodelay(Some(true)),
                shutdown.cancelled(),
            )
            .await
            .with_context(|| format!("serve gRPC on {grpc_addr}"))
    };
    tokio::try_join!(grpc_server, metrics_server)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::api::supernode_client::SupernodeClient;
    use crate::protocol::api::{HeartbeatRequest, Host, JoinRequest, RegisterRequest, Role};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "multi_thread")]
    async fn serves_the_mesh_api_and_metrics_until_shutdown() {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, metrics_addr) = (grpc.local_addr().unwrap(), metrics.local_addr().unwrap());
        let shutdown = Shutdown::new();
        let server = tokio::spawn(serve(
            SchedulerConfig::default(),
            grpc,
            metrics,
            None,
            shutdown.clone(),
        ));

        let mut client = SupernodeClient::connect(format!("http://{grpc_addr}"))
            .await
            .unwrap();
        let heartbeat = HeartbeatRequest {
            host_id: "a".into(),
            uploads_in_use: 0,
        };
        let answer = client.heartbeat(heartbeat.clone()).await.unwrap();
        assert!(answer.into_inner().reregister);
        let register = RegisterRequest {
            host: Some(Host {
                id: "a".into(),
                ip: "127.0.0.1".into(),
                upload_port: 65002,
                supernode: false,
            }),
            blobs: vec![],
        };
        let answer = client.register(register).await.unwrap().into_inner();
        assert_eq!(answer.heartbeat_ms, 1000);
        let join = JoinRequest {
            host_id: "a".into(),
            digest: crate::store::Digest::of(b"blob").to_string(),
            size: 10,
        };
        let answer = client.join(join).await.unwrap().into_inner();
        assert_eq!(answer.role(), Role::Ingest);

        let mut http = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        http.read_to_string(&mut text).await.unwrap();
        for line in [
            "damselfly_supernode_hosts 1",
            "damselfly_supernode_tasks 1",
            "damselfly_supernode_ingesters_elected_total 1",
        ] {
            assert!(text.contains(line), "no {line:?} in {text}");
        }

        shutdown.cancel();
        server.await.unwrap().unwrap();
        assert_eq!(shutdown.running(), 0, "the expiry loop ended");
    }
}
