//! dfdaemon, the per-node daemon: opens the node's store and serves it to
//! containerd as a content-store plugin until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::{plugin, store::Store};

/// What dfdaemon needs to run.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Root of the node's content store.
    pub data_dir: PathBuf,
    /// Unix socket containerd's `[proxy_plugins]` entry points at.
    pub content_socket: PathBuf,
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
    plugin::serve(store, &config.content_socket, terminated()).await
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
