//! dfdaemon, the per-node daemon: opens the node's store, joins the mesh
//! when supernodes are configured, and serves the store to containerd as a
//! content-store plugin until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::mesh::{Mesh, MeshConfig};
use crate::{plugin, store::Store};

/// What dfdaemon needs to run.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Root of the node's content store.
    pub data_dir: PathBuf,
    /// Unix socket containerd's `[proxy_plugins]` entry points at.
    pub content_socket: PathBuf,
    /// The mesh; `None` makes dfdaemon a plain local content store.
    pub mesh: Option<MeshConfig>,
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
        Some(mesh) => Some(Mesh::start(mesh, store.clone()).await?),
        None => {
            tracing::info!("no supernode configured: plain local content store");
            None
        }
    };
    plugin::serve(store, mesh, &config.content_socket, terminated()).await
}

/// Completes on the first SIGINT or SIGTERM.
async fn terminated() {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
