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

use crate::fastpath::containerd::Containerd;
use crate::fastpath::{self, FastPath, FastPathConfig};
use crate::mesh::metrics::MeshCollector;
use crate::mesh::{Mesh, MeshConfig};
use crate::registry::{Registries, RegistryConfig};
use crate::shutdown::Shutdown;
use crate::snapshotter::{RemoteLayers, Snapshotter};
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
    /// The group given the plugin sockets (mode 0660); `None`: dfdaemon's own.
    pub socket_group: Option<nix::unistd::Gid>,
    /// The mesh, which shares the content store; `None` makes dfdaemon a
    /// plain local content store.
    pub mesh: Option<MeshConfig>,
    /// Where to serve Prometheus metrics (`/metrics`), with the mesh or the fast path.
    pub metrics_listen: Option<SocketAddr>,
    /// containerd's API socket: the fast path records layers there.
    pub containerd_socket: PathBuf,
    /// How the fast path reaches registries (containerd's hosts.toml files,
    /// Docker credentials).
    pub registry: RegistryConfig,
}

/// Runs the daemon until a termination signal, then waits (up to
/// [`crate::shutdown::STOP_WITHIN`]) for its background tasks to end. With both plugins
/// served, the snapshotter takes containerd's remote-snapshot fast path.
pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    crate::store::require_blocking_runtime()?;
    let shutdown = Shutdown::on_signals().context("handle SIGINT and SIGTERM")?;
    shutdown.serve_then_stop(serve(config, &shutdown)).await
}

/// Serves the plugins until `shutdown` is cancelled or one of them fails,
/// with the mesh's and the fast path's background tasks on `shutdown`.
async fn serve(config: DaemonConfig, shutdown: &Shutdown) -> anyhow::Result<()> {
    tokio::task::block_in_place(|| crate::store::private_dir(&config.data_dir))
        .with_context(|| format!("make the data dir {} private", config.data_dir.display()))?;
    let nofile = crate::mesh::limits::raise_nofile();
    tracing::info!(nofile, "open-files limit");
    if config.mesh.is_some() && config.content_socket.is_none() {
        tracing::warn!("supernodes configured but no content socket: the mesh is not joined");
    }
    let store = match config.content_socket {
        Some(_) => Some(open_store(&config.data_dir).await?),
        None => None,
    };
    let mesh = match (&store, config.mesh.clone()) {
        (Some(store), Some(mesh)) => Some(Mesh::start(mesh, store.clone(), shutdown).await?),
        _ => None,
    };
    let snapshotter = match config.snapshot_socket {
        Some(_) => Some(open_snapshotter(&config.data_dir).await?),
        None => None,
    };
    let fast_path = match (&store, &snapshotter) {
        (Some(store), Some(snapshotter)) => {
            shutdown.spawn(fastpath::expire_abandoned_ingests(store.clone()));
            Some(FastPath::new(FastPathConfig {
                store: store.clone(),
                snapshotter: snapshotter.clone(),
                mesh: mesh.clone(),
                registries: Arc::new(tokio::task::block_in_place(|| {
                    Registries::new(config.registry.clone())
                })?),
                containerd: Arc::new(Containerd::new(config.containerd_socket.clone())),
            }))
        }
        _ => None,
    };
    if let Some(addr) = config
        .metrics_listen
        .filter(|_| mesh.is_some() || fast_path.is_some())
    {
        let sockets = [&config.content_socket, &config.snapshot_socket]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        serve_metrics(addr, mesh.as_ref(), fast_path.as_ref(), sockets, shutdown).await;
    }
    let content = async {
        match (&config.content_socket, store) {
            (Some(socket), Some(store)) => {
                let stop = shutdown.cancelled();
                plugin::serve_content(store, mesh, socket, config.socket_group, stop).await
            }
            _ => Ok(()),
        }
    };
    let snapshots = async {
        match (&config.snapshot_socket, snapshotter) {
            (Some(socket), Some(snapshotter)) => {
                let remote = fast_path.map(|f| Arc::new(f) as Arc<dyn RemoteLayers>);
                plugin::serve_snapshots(
                    snapshotter,
                    remote,
                    socket,
                    config.socket_group,
                    shutdown.cancelled(),
                )
                .await
            }
            _ => Ok(()),
        }
    };
    tokio::try_join!(content, snapshots)?;
    Ok(())
}

async fn open_store(data_dir: &Path) -> anyhow::Result<Arc<Store>> {
    let dir = data_dir.to_owned();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await?
        .with_context(|| format!("open the store in {}", data_dir.display()))?;
    tracing::info!(data_dir = %data_dir.display(), "store open");
    Ok(store)
}

async fn open_snapshotter(data_dir: &Path) -> anyhow::Result<Arc<Snapshotter>> {
    let dir = data_dir.to_owned();
    let snapshotter = tokio::task::spawn_blocking(move || Snapshotter::open(&dir))
        .await?
        .with_context(|| format!("open the snapshotter in {}", data_dir.display()))?;
    tracing::info!(data_dir = %data_dir.display(), "snapshotter open");
    Ok(Arc::new(snapshotter))
}

/// Serves the mesh's and the fast path's metrics on `addr`, with `/readyz`
/// answering ready while every plugin socket of `sockets` accepts a
/// connection, until `shutdown` is cancelled. Metrics are not worth failing
/// the plugins for: if the address is taken, say so and go on.
async fn serve_metrics(
    addr: SocketAddr,
    mesh: Option<&Arc<Mesh>>,
    fast_path: Option<&Arc<FastPath>>,
    sockets: Vec<PathBuf>,
    shutdown: &Shutdown,
) {
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot serve metrics");
            return;
        }
    };
    let mut registry = Registry::with_prefix("damselfly");
    if let Some(mesh) = mesh {
        registry.register_collector(Box::new(MeshCollector::new(mesh.clone(), "dfdaemon")));
    }
    if let Some(fast_path) = fast_path {
        fast_path.stats.register(&mut registry);
    }
    let stop = shutdown.cancelled();
    shutdown.spawn(async move {
        let ready: metrics::Readiness = Arc::new(move || {
            sockets
                .iter()
                .all(|s| std::os::unix::net::UnixStream::connect(s).is_ok())
        });
        if let Err(e) = metrics::serve(listener, Arc::new(registry), ready, stop).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
}
