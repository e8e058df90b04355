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
mod pipe;

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
type LayerStates = Arc<Mutex<HashMap<(String, Digest), Tracked>>>;

/// One layer of a job, as the Prepares for it see it.
#[derive(Clone)]
struct Tracked {
    state: watch::Receiver<LayerState>,
    /// The Prepares waiting on any layer of the same job.
    waiters: Arc<Waiters>,
}

/// How long a finished job's layer states are kept: the Prepares of its
/// later layers arrive one by one, and a failed layer's fallback should not
/// start the same doomed job again for the layers above it.
const STATES_KEPT: Duration = Duration::from_secs(60);

/// How long a job goes on with no Prepare waiting for any of its layers
/// before it is taken for abandoned (the pull was cancelled: its client
/// went away). An image's Prepares come milliseconds apart, one after the
/// other, so a silence this long means nobody wants the layers now; a
/// retried pull resumes each blob where its ingest stopped.
const ABANDONED_AFTER: Duration = Duration::from_secs(5);

/// How long a layer's half-fetched ingest is kept unwritten for a retried
/// pull to resume (kubelet retries within minutes; containerd's own pull
/// leases expire after an hour), and how often that is checked.
const INGEST_KEPT: Duration = Duration::from_secs(3600);
const INGEST_SWEEP: Duration = Duration::from_secs(600);

/// Drops the fast path's ingests that no pull resumed within
/// [`INGEST_KEPT`]; runs for as long as dfdaemon does.
pub async fn expire_abandoned_ingests(store: Arc<Store>) {
    let mut every = tokio::time::interval(INGEST_SWEEP);
    loop {
        every.tick().await;
        match block_in_place(|| store.abort_idle_own(INGEST_KEPT)) {
            Ok(aborted) if aborted.is_empty() => {}
            Ok(aborted) => tracing::info!(
                ?aborted,
                "fast path: dropped half-fetched layers no pull resumed"
            ),
            Err(e) => tracing::warn!(error = %e, "fast path: could not expire abandoned ingests"),
        }
    }
}

/// How many Prepares wait on one job's layers.
#[derive(Default)]
struct Waiters(watch::Sender<usize>);

impl Waiters {
    /// Counts one waiting Prepare until the guard is dropped (it answers,
    /// or containerd cancels it).
    fn wait(self: &Arc<Self>) -> Waiting {
        self.0.send_modify(|n| *n += 1);
        Waiting(self.clone())
    }

    /// Resolves once no Prepare has waited for [`ABANDONED_AFTER`].
    async fn abandoned(&self) {
        let mut count = self.0.subscribe();
        loop {
            let _ = count.wait_for(|n| *n == 0).await;
            let back = tokio::time::timeout(ABANDONED_AFTER, count.wait_for(|n| *n > 0));
            if back.await.is_err() {
                return;
            }
        }
    }
}

/// One Prepare waiting on a job.
struct Waiting(Arc<Waiters>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.0.send_modify(|n| *n -= 1);
    }
}

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
    /// that snapshot since (an image removed and pulled again); then that
    /// job is forgotten and the layer started afresh, once.
    async fn layer(&self, namespace: &str, target: &Digest, parent: &str) -> Result<(), Declined> {
        if self.committed(target, parent)? {
            return self.record_existing(namespace, target).await;
        }
        for _ in 0..2 {
            let tracked = self.state_or_start(namespace, target, parent).await?;
            let _waiting = tracked.waiters.wait();
            if self.settled(tracked.state.clone(), target, parent).await? {
                return Ok(());
            }
            self.forget(&tracked.waiters);
        }
        Err(Declined::new(
            None,
            "removed",
            "the layer's snapshot was removed each time its job committed it".into(),
        ))
    }

    /// Waits for a job's layer to settle: `true` when it is committed on
    /// `parent`, `false` when the job says Ready but the snapshot is gone.
    async fn settled(
        &self,
        mut state: watch::Receiver<LayerState>,
        target: &Digest,
        parent: &str,
    ) -> Result<bool, Declined> {
        loop {
            match state.borrow_and_update().clone() {
                LayerState::Pending => {}
                LayerState::Ready => return self.committed(target, parent),
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

    /// Drops the layer states of the job that `waiters` belongs to, so that
    /// the next Prepare for any of its layers starts afresh.
    fn forget(&self, waiters: &Arc<Waiters>) {
        forget_job(&self.layers, waiters);
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
    ) -> Result<Tracked, Declined> {
        let key = (namespace.to_owned(), target.clone());
        if let Some(tracked) = self.layers.lock().expect("layers").get(&key) {
            return Ok(tracked.clone());
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
        let waiters = Arc::new(Waiters::default());
        let tracked = {
            let mut layers = self.layers.lock().expect("layers");
            if let Some(tracked) = layers.get(&key) {
                return Ok(tracked.clone()); // another Prepare started it meanwhile
            }
            for (chain, state) in job.states() {
                let waiters = waiters.clone();
                layers.insert((namespace.to_owned(), chain), Tracked { state, waiters });
            }
            layers[&key].clone()
        };
        let (layers, namespace, manifest, stats) = (
            self.layers.clone(),
            namespace.to_owned(),
            job.manifest().clone(),
            self.stats.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                () = job.run() => tokio::time::sleep(STATES_KEPT).await,
                () = waiters.abandoned() => {
                    stats.cancelled();
                    tracing::warn!(%namespace, %manifest,
                        "fast path: no pull waits for this image any more (cancelled); \
                         stopped its layers not yet committed");
                }
            }
            forget_job(&layers, &waiters);
        });
        Ok(tracked)
    }

    /// Where `namespace` fetched `manifest` from, as containerd labelled it.
    async fn source(&self, namespace: &str, manifest: &Digest) -> Option<(String, String)> {
        match self.config.containerd.sources(namespace, manifest).await {
            Ok(sources) => {
                let (label, repository) = sources.into_iter().next()?;
                // Reads the hosts dir.
                match block_in_place(|| self.config.registries.source_host(&label)) {
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

/// Drops every layer state of the job that `waiters` belongs to.
fn forget_job(layers: &LayerStates, waiters: &Arc<Waiters>) {
    layers
        .lock()
        .expect("layers")
        .retain(|_, tracked| !Arc::ptr_eq(&tracked.waiters, waiters));
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
