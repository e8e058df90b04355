//! dfdaemon, the per-node daemon: opens the node's store, joins the mesh
//! when supernodes are configured, and serves the store to containerd as a
//! content-store plugin until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::mesh::metrics::MeshCollector;
use crate::mesh::{Mesh, MeshConfig};
use crate::shutdown::terminated;
use crate::{metrics, plugin, store::Store};

/// What dfdaemon needs to run.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Root of the node's content store.
    pub data_dir: PathBuf,
    /// Unix socket containerd's `[proxy_plugins]` entry points at.
    pub content_socket: PathBuf,
    /// The mesh; `None` makes dfdaemon a plain local content store.
    pub mesh: Option<MeshConfig>,
    /// Where to serve Prometheus metrics (`/metrics`), with the mesh.
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs the daemon until a termination signal.
pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let store = tokio::task::spawn_blocking({
        let dir = config.data_dir.clone();
        move || Store::open(&dir)
    })
    .await?
    .with_context(|| format!("open the store in {}", config.data_dir.display()))?;
    tracing::info!(data_dir = %config.data_dir.display(), "store open");
    let mesh: Option<Arc<Mesh>> = match config.mesh {
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
    plugin::serve(store, mesh, &config.content_socket, terminated()).await
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
