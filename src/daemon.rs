//! dfdaemon, the per-node daemon: serves containerd, until SIGINT or
//! SIGTERM, the node's store as a content-store plugin (joining the mesh
//! when supernodes are configured) and its snapshotter as a snapshot plugin,
//! each on its own socket if asked to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::mesh::metrics::MeshCollector;
use crate::mesh::{Mesh, MeshConfig};
use crate::shutdown::terminated;
use crate::snapshotter::Snapshotter;
use crate::{metrics, plugin, store::Store};

/// What dfdaemon needs to run.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Root of the node's content store and snapshots.
    pub data_dir: PathBuf,
    /// Unix socket of the content plugin (containerd's `[proxy_plugins]`
    /// entry of type "content"); `None`: no content store is served.
    pub content_socket: Option<PathBuf>,
    /// Unix socket of the snapshot plugin (type "snapshot"); `None`: no
    /// snapshotter is served.
    pub snapshot_socket: Option<PathBuf>,
    /// The mesh, which shares the content store; `None` makes dfdaemon a
    /// plain local content store.
    pub mesh: Option<MeshConfig>,
    /// Where to serve Prometheus metrics (`/metrics`), with the mesh.
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs the daemon until a termination signal.
pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    if config.mesh.is_some() && config.content_socket.is_none() {
        tracing::warn!("supernodes configured but no content socket: the mesh is not joined");
    }
    let content = async {
        match &config.content_socket {
            Some(socket) => serve_content(&config, socket).await,
            None => Ok(()),
        }
    };
    let snapshots = async {
        match &config.snapshot_socket {
            Some(socket) => serve_snapshots(&config.data_dir, socket).await,
            None => Ok(()),
        }
    };
    tokio::try_join!(content, snapshots)?;
    Ok(())
}

/// Opens the store, starts the mesh if configured, and serves the content plugin.
async fn serve_content(config: &DaemonConfig, socket: &Path) -> anyhow::Result<()> {
    let store = tokio::task::spawn_blocking({
        let dir = config.data_dir.clone();
        move || Store::open(&dir)
    })
    .await?
    .with_context(|| format!("open the store in {}", config.data_dir.display()))?;
    tracing::info!(data_dir = %config.data_dir.display(), "store open");
    let mesh: Option<Arc<Mesh>> = match config.mesh.clone() {
        Some(mesh) => {
            let mesh = Mesh::start(mesh, store.clone()).await?;
            if let Some(addr) = config.metrics_listen {
                serve_metrics(addr, &mesh).await;
            }
            Some(mesh)
        }
        None => {
            tracing::info!("no supernode configured: plain local content store");
            None
        }
    };
    plugin::serve_content(store, mesh, socket, terminated()).await
}

/// Opens the snapshotter and serves the snapshot plugin.
async fn serve_snapshots(data_dir: &Path, socket: &Path) -> anyhow::Result<()> {
    let snapshotter = tokio::task::spawn_blocking({
        let dir = data_dir.to_owned();
        move || Snapshotter::open(&dir)
    })
    .await?
    .with_context(|| format!("open the snapshotter in {}", data_dir.display()))?;
    tracing::info!(data_dir = %data_dir.display(), "snapshotter open");
    plugin::serve_snapshots(Arc::new(snapshotter), None, socket, terminated()).await
}

/// Serves the mesh's metrics on `addr`. Metrics are not worth failing the
/// content store for: if the address is taken, say so and go on.
async fn serve_metrics(addr: SocketAddr, mesh: &Arc<Mesh>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot serve metrics");
            return;
        }
    };
    let mut registry = Registry::with_prefix("damselfly");
    registry.register_collector(Box::new(MeshCollector::new(mesh.clone(), "dfdaemon")));
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, Arc::new(registry), std::future::pending()).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
}
