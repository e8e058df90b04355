//! The snapshotter's fast path: containerd's remote-snapshot protocol,
//! answered by fetching and unpacking layers in dfdaemon.
//!
//! containerd's unpacker Prepares each layer with label
//! `containerd.io/snapshot.ref=<chain ID>`, one layer at a time, before it
//! fetches anything; a Prepare answered with AlreadyExists (and a committed
//! snapshot that its Walk finds) makes containerd skip that layer's fetch
//! and apply. On the first such Prepare of an image, the store's image
//! index maps the chain ID to the image's layers, and every layer from it
//! on is started at once ([`job`]): fetched (store, mesh, registry) and
//! unpacked while its bytes arrive ([`layer`]), diff_id checked, then
//! committed in order under its chain ID. Each Prepare answers when its
//! layer is committed and its blob is recorded in containerd ([`containerd`]),
//! so the image is complete there. Whenever the fast path cannot be taken,
//! Prepare goes the ordinary way and containerd fetches and applies the
//! layer itself: slower, never wrong.

pub mod containerd;
mod job;
pub mod layer;
pub mod metrics;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::block_in_place;

use crate::mesh::Mesh;
use crate::registry::Registries;
use crate::snapshotter::{RemoteLayers, Snapshotter};
use crate::store::image_index::ImageLayers;
use crate::store::{Digest, Store};
use containerd::Containerd;
use job::{Job, LayerState};
use metrics::FastPathStats;

/// The label containerd's unpacker puts on a Prepare: the layer's chain ID.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// What the fast path works with.
pub struct FastPathConfig {
    pub store: Arc<Store>,
    pub snapshotter: Arc<Snapshotter>,
    pub mesh: Option<Arc<Mesh>>,
    pub registries: Arc<Registries>,
    pub containerd: Arc<Containerd>,
}

/// Layer states of the jobs running or recently ended, by (namespace, chain ID).
type LayerStates = Arc<Mutex<HashMap<(String, Digest), watch::Receiver<LayerState>>>>;

/// How long a finished job's layer states are kept: the Prepares of its
/// later layers arrive one by one, and a failed layer's fallback should not
/// start the same doomed job again for the layers above it.
const STATES_KEPT: Duration = Duration::from_secs(60);

/// Answers remote-snapshot Prepares; see the module doc.
pub struct FastPath {
    config: FastPathConfig,
    layers: LayerStates,
    /// Images the fast path declined, so that the reason is logged once.
    declined: Mutex<HashSet<Digest>>,
    pub stats: Arc<FastPathStats>,
}

impl FastPath {
    pub fn new(config: FastPathConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            layers: LayerStates::default(),
            declined: Mutex::default(),
            stats: Arc::default(),
        })
    }

    /// Answers one remote-snapshot Prepare: `true` once a committed
    /// snapshot for the target exists on `parent`.
    async fn prepare(
        self: Arc<Self>,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> bool {
        let Some(target) = labels
            .get(SNAPSHOT_REF)
            .and_then(|t| t.parse::<Digest>().ok())
        else {
            return false;
        };
        let Some(namespace) = key.split('/').next().filter(|ns| !ns.is_empty()) else {
            return false;
        };
        let Err(declined) = self.layer(namespace, &target, &parent).await else {
            return true;
        };
        self.stats.declined(declined.kind);
        let first = declined.image.as_ref().is_none_or(|image| {
            self.declined
                .lock()
                .expect("declined")
                .insert(image.clone())
        });
        if first {
            tracing::warn!(%target, image = ?declined.image.map(|d| d.to_string()),
                reason = %declined.reason,
                "fast path not taken: containerd fetches and applies this image itself");
        }
        false
    }

    /// Waits until the layer with chain ID `target` is committed on
    /// `parent` and its blob recorded in containerd, starting the image's
    /// job if none runs. Answers only what the snapshotter holds now: a
    /// job's Ready is rechecked, since containerd's GC may have removed
    /// that snapshot since (an image removed and pulled again), and then a
    /// new job unpacks the layer again, once.
    async fn layer(&self, namespace: &str, target: &Digest, parent: &str) -> Result<(), Declined> {
        if self.committed(target, parent)? {
            return self.record_existing(namespace, target).await;
        }
        let mut state = self.state_or_start(namespace, target, parent).await?;
        let mut restarted = false;
        loop {
            let current = state.borrow_and_update().clone();
            match current {
                LayerState::Pending => {}
                LayerState::Ready if self.committed(target, parent)? => return Ok(()),
                LayerState::Ready if !restarted => {
                    self.forget(namespace, target, &state);
                    state = self.state_or_start(namespace, target, parent).await?;
                    restarted = true;
                    continue;
                }
                LayerState::Ready => {
                    self.forget(namespace, target, &state);
                    return Err(Declined::new(
                        None,
                        "removed",
                        "the layer's snapshot was removed after its job committed it".into(),
                    ));
                }
                LayerState::Failed {
                    image,
                    kind,
                    reason,
                } => return Err(Declined::new(Some(image), kind, reason.to_string())),
            }
            if state.changed().await.is_err() {
                return Err(Declined::new(None, "ended", "the layer's job ended".into()));
            }
        }
    }

    /// Whether a committed snapshot for `target` on `parent` exists.
    fn committed(&self, target: &Digest, parent: &str) -> Result<bool, Declined> {
        let snapshotter = &self.config.snapshotter;
        block_in_place(|| snapshotter.find_committed(target.as_str(), parent))
            .map(|found| found.is_some())
            .map_err(|e| Declined::new(None, "snapshotter", e.to_string()))
    }

    /// Drops the layer state `stale` of `target`, unless a newer job's
    /// state has replaced it, so that the next Prepare starts afresh.
    fn forget(&self, namespace: &str, target: &Digest, stale: &watch::Receiver<LayerState>) {
        forget_states(&self.layers, namespace, [(target.clone(), stale)]);
    }

    /// A snapshot for `target` exists already (unpacked for another
    /// namespace, or before a restart): records the layer's blob in this
    /// namespace, so that the image is complete there too.
    async fn record_existing(&self, namespace: &str, target: &Digest) -> Result<(), Declined> {
        let image = self.indexed_image(target)?;
        let layer = &image.layers[image.position];
        self.config
            .containerd
            .record_blob(namespace, &layer.digest, layer.size)
            .await
            .map_err(|e| Declined::new(Some(image.manifest.clone()), "containerd", e.to_string()))
    }

    fn indexed_image(&self, target: &Digest) -> Result<ImageLayers, Declined> {
        block_in_place(|| self.config.store.image_with_chain(target))
            .map_err(|e| Declined::new(None, "store", e.to_string()))?
            .ok_or_else(|| {
                Declined::new(
                    None,
                    "not_indexed",
                    "no indexed image has this chain ID".into(),
                )
            })
    }

    /// The state of the layer `target` in `namespace`: of the job that runs
    /// it, or of a job started now for its image.
    async fn state_or_start(
        &self,
        namespace: &str,
        target: &Digest,
        parent: &str,
    ) -> Result<watch::Receiver<LayerState>, Declined> {
        let key = (namespace.to_owned(), target.clone());
        if let Some(state) = self.layers.lock().expect("layers").get(&key) {
            return Ok(state.clone());
        }
        let image = self.indexed_image(target)?;
        let source = self.source(namespace, &image.manifest).await;
        let job = Job::new(
            namespace,
            &image,
            parent,
            source,
            &self.config,
            self.stats.clone(),
        );
        let state = {
            let mut layers = self.layers.lock().expect("layers");
            if let Some(state) = layers.get(&key) {
                return Ok(state.clone()); // another Prepare started it meanwhile
            }
            for (chain, state) in job.states() {
                layers.insert((namespace.to_owned(), chain), state);
            }
            layers[&key].clone()
        };
        let (layers, states, namespace) = (self.layers.clone(), job.states(), namespace.to_owned());
        tokio::spawn(async move {
            job.run().await;
            tokio::time::sleep(STATES_KEPT).await;
            forget_states(
                &layers,
                &namespace,
                states.iter().map(|(chain, state)| (chain.clone(), state)),
            );
        });
        Ok(state)
    }

    /// Where `namespace` fetched `manifest` from, as containerd labelled it.
    async fn source(&self, namespace: &str, manifest: &Digest) -> Option<(String, String)> {
        match self.config.containerd.sources(namespace, manifest).await {
            Ok(sources) => {
                let (label, repository) = sources.into_iter().next()?;
                match self.config.registries.source_host(&label) {
                    Ok(host) => Some((host, repository)),
                    Err(e) => {
                        tracing::warn!(%manifest, error = %e, "bad distribution source label");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%manifest, error = %e, "no distribution source from containerd");
                None
            }
        }
    }
}

/// Removes each of `states` from `layers` where it is still the state kept
/// for its chain ID: a job started later for the same layers (the image was
/// removed and pulled again) keeps its own.
fn forget_states<'a>(
    layers: &LayerStates,
    namespace: &str,
    states: impl IntoIterator<Item = (Digest, &'a watch::Receiver<LayerState>)>,
) {
    let mut layers = layers.lock().expect("layers");
    for (chain, state) in states {
        let key = (namespace.to_owned(), chain);
        if layers
            .get(&key)
            .is_some_and(|kept| kept.same_channel(state))
        {
            layers.remove(&key);
        }
    }
}

impl RemoteLayers for Arc<FastPath> {
    fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> BoxFuture<'static, bool> {
        Box::pin(self.clone().prepare(key, parent, labels))
    }
}

/// Why a Prepare goes the ordinary way.
struct Declined {
    image: Option<Digest>,
    kind: &'static str,
    reason: String,
}

impl Declined {
    fn new(image: Option<Digest>, kind: &'static str, reason: String) -> Self {
        Self {
            image,
            kind,
            reason,
        }
    }
}
