//! One image on the fast path: every layer from the first one containerd
//! asked for is fetched and unpacked at once, each into its own staging
//! directory, then committed strictly in order (a snapshot's parent must be
//! committed first, and a layer's implicit directories take their
//! attributes from the layers below it). Each layer's state is published on
//! a watch channel that the Prepares for it wait on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::{JoinHandle, block_in_place};

use super::containerd::Containerd;
use super::layer::{Fetch, LayerError, Unpacked};
use super::metrics::FastPathStats;
use super::{FastPathConfig, SNAPSHOT_REF};
use crate::snapshotter::{Snapshotter, Staging};
use crate::store::Digest;
use crate::store::image_index::{ImageLayer, ImageLayers};
use crate::unpack::inherit_implicit_dirs;

/// Where one layer of a job is.
#[derive(Debug, Clone)]
pub enum LayerState {
    Pending,
    /// Committed and recorded in containerd.
    Ready,
    Failed {
        image: Digest,
        kind: &'static str,
        reason: Arc<str>,
    },
}

/// The layers of one image still to unpack, from the one first asked for.
pub struct Job {
    namespace: String,
    manifest: Digest,
    layers: Vec<ImageLayer>,
    /// The parent of the first layer, as containerd named it.
    parent: String,
    states: Vec<watch::Sender<LayerState>>,
    fetch: Arc<Fetch>,
    snapshotter: Arc<Snapshotter>,
    containerd: Arc<Containerd>,
    stats: Arc<FastPathStats>,
}

impl Job {
    pub fn new(
        namespace: &str,
        image: &ImageLayers,
        parent: &str,
        source: Option<(String, String)>,
        config: &FastPathConfig,
        stats: Arc<FastPathStats>,
    ) -> Self {
        let layers = image.layers[image.position..].to_vec();
        Self {
            namespace: namespace.to_owned(),
            manifest: image.manifest.clone(),
            states: layers
                .iter()
                .map(|_| watch::Sender::new(LayerState::Pending))
                .collect(),
            layers,
            parent: parent.to_owned(),
            fetch: Arc::new(Fetch {
                store: config.store.clone(),
                mesh: config.mesh.clone(),
                registries: config.registries.clone(),
                source,
            }),
            snapshotter: config.snapshotter.clone(),
            containerd: config.containerd.clone(),
            stats,
        }
    }

    /// Each layer's chain ID and state.
    pub fn states(&self) -> Vec<(Digest, watch::Receiver<LayerState>)> {
        self.layers
            .iter()
            .zip(&self.states)
            .map(|(layer, state)| (layer.chain_id.clone(), state.subscribe()))
            .collect()
    }

    /// Unpacks every layer at once and commits them in order. The first
    /// failure fails that layer and every layer above it (their parent
    /// will be containerd's own snapshot, not ours).
    pub async fn run(self) {
        tracing::info!(namespace = %self.namespace, manifest = %self.manifest, layers = self.layers.len(),
            "fast path: fetching and unpacking every layer at once");
        let mut unpacks: Vec<JoinHandle<Result<(Staging, Unpacked), LayerError>>> =
            self.layers.iter().map(|layer| self.start(layer)).collect();
        let mut parent = self.parent.clone();
        for (index, unpack) in unpacks.iter_mut().enumerate() {
            let layer = &self.layers[index];
            match self.commit(layer, &parent, unpack).await {
                Ok(name) => {
                    self.states[index].send_replace(LayerState::Ready);
                    parent = name;
                }
                Err(e) => {
                    tracing::warn!(namespace = %self.namespace, manifest = %self.manifest, error = %e,
                        "fast path: layer failed; containerd takes it and the layers above");
                    self.fail_from(index, e.kind(), &e.to_string());
                    unpacks[index + 1..].iter().for_each(JoinHandle::abort);
                    return;
                }
            }
        }
    }

    /// Starts fetching and unpacking `layer` into a new staging directory.
    fn start(&self, layer: &ImageLayer) -> JoinHandle<Result<(Staging, Unpacked), LayerError>> {
        let (fetch, snapshotter, layer) =
            (self.fetch.clone(), self.snapshotter.clone(), layer.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let staging =
                block_in_place(|| snapshotter.stage()).map_err(|e| LayerError::Snapshot {
                    digest: layer.digest.clone(),
                    reason: e.to_string(),
                })?;
            let unpacked = fetch.unpack(&layer, staging.fs()).await?;
            let seconds = started.elapsed().as_secs_f64();
            tracing::info!(digest = %layer.digest, source = unpacked.origin.as_str(),
                tar_bytes = unpacked.applied.tar_bytes, seconds,
                mb_per_s = unpacked.applied.tar_bytes as f64 / 1e6 / seconds.max(1e-9),
                "fast path: layer fetched and unpacked");
            Ok((staging, unpacked))
        })
    }

    /// Waits for `layer`'s unpack and commits it on `parent`; returns the
    /// snapshot's name. A snapshot for it that already exists is taken as it is.
    async fn commit(
        &self,
        layer: &ImageLayer,
        parent: &str,
        unpack: &mut JoinHandle<Result<(Staging, Unpacked), LayerError>>,
    ) -> Result<String, LayerError> {
        let snapshot_error = |e: &dyn std::fmt::Display| LayerError::Snapshot {
            digest: layer.digest.clone(),
            reason: e.to_string(),
        };
        let chain = layer.chain_id.as_str();
        let existing = block_in_place(|| self.snapshotter.find_committed(chain, parent))
            .map_err(|e| snapshot_error(&e))?;
        let name = match existing {
            Some(name) => {
                unpack.abort();
                name
            }
            None => {
                let (staging, unpacked) = unpack.await.map_err(|e| snapshot_error(&e))??;
                let name = format!("{}/damselfly/{chain}", self.namespace);
                let labels = HashMap::from([(SNAPSHOT_REF.to_owned(), chain.to_owned())]);
                block_in_place(|| {
                    let lowers = if parent.is_empty() {
                        Vec::new()
                    } else {
                        self.snapshotter
                            .lower_dirs(parent)
                            .map_err(|e| snapshot_error(&e))?
                    };
                    inherit_implicit_dirs(&staging.fs(), &unpacked.applied.implicit_dirs, &lowers)
                        .map_err(|source| LayerError::Unpack {
                            digest: layer.digest.clone(),
                            source,
                        })?;
                    self.snapshotter
                        .commit_staged(staging, &name, parent, labels)
                        .map_err(|e| snapshot_error(&e))
                })?;
                self.stats
                    .unpacked(unpacked.origin.as_str(), unpacked.applied.tar_bytes);
                name
            }
        };
        self.containerd
            .record_blob(&self.namespace, &layer.digest, layer.size)
            .await
            .map_err(|e| LayerError::Containerd {
                digest: layer.digest.clone(),
                reason: e.to_string(),
            })?;
        Ok(name)
    }

    /// Fails layer `index` with `reason`, and every layer above it.
    fn fail_from(&self, index: usize, kind: &'static str, reason: &str) {
        let reason: Arc<str> = reason.into();
        for (at, state) in self.states.iter().enumerate().skip(index) {
            let (kind, reason) = if at == index {
                (kind, reason.clone())
            } else {
                (
                    "lower_layer",
                    Arc::from("a layer below it failed on the fast path"),
                )
            };
            state.send_replace(LayerState::Failed {
                image: self.manifest.clone(),
                kind,
                reason,
            });
        }
    }
}
