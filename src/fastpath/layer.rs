//! One layer on the fast path: its blob comes from the store, the mesh or
//! the registry, and is unpacked into a staging directory while it arrives.
//! The blob is written into the store as it streams by (so it is kept once,
//! and peers can fetch its pieces), and unpacked on a blocking thread that
//! reads the same bytes from a channel: from peers, each stretch as soon as
//! the pieces before it are verified; from the registry, as it is written.
//! Its ingest is one of dfdaemon's own (see [`OWN_REF_PREFIX`]), so a pull
//! cancelled midway leaves it for a retry to resume.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::block_in_place;

use super::pipe::{Closed, PipeSender, pipe};
use crate::mesh::Mesh;
use crate::mesh::session::BlobSession;
use crate::registry::{Registries, RegistryError};
use crate::snapshotter::Staging;
use crate::store::image_index::ImageLayer;
use crate::store::{Digest, Ingest, OWN_REF_PREFIX, Store, StoreError};
use crate::unpack::{Applied, Compression, UnpackError, Whiteouts, apply_layer};

/// Size of the chunks read back from the store.
const READ_CHUNK: usize = 64 << 10;

/// Why a layer could not be taken on the fast path.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {digest}: {source}")]
    Unpack { digest: Digest, source: UnpackError },
    #[error("layer {digest}: {source}")]
    Store { digest: Digest, source: StoreError },
    #[error("layer {digest}: {source}")]
    Registry {
        digest: Digest,
        source: RegistryError,
    },
    #[error("layer {digest}: no registry is known for it (no distribution-source label)")]
    NoSource { digest: Digest },
    #[error("layer {digest}: diff_id is {actual}, the config says {expected}")]
    DiffId {
        digest: Digest,
        actual: Digest,
        expected: Digest,
    },
    #[error("layer {digest}: the unpacker stopped: {reason}")]
    Stopped { digest: Digest, reason: String },
    #[error("layer {digest}: snapshotter: {reason}")]
    Snapshot { digest: Digest, reason: String },
    #[error("layer {digest}: record in containerd: {reason}")]
    Containerd { digest: Digest, reason: String },
}

impl LayerError {
    /// A short label for metrics and "why" log lines.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unpack { .. } => "unpack",
            Self::Store { .. } => "store",
            Self::Registry { source, .. } if source.is_auth() => "unauthorized",
            Self::Registry { .. } => "registry",
            Self::NoSource { .. } => "no_source",
            Self::DiffId { .. } => "diff_id",
            Self::Stopped { .. } => "stopped",
            Self::Snapshot { .. } => "snapshotter",
            Self::Containerd { .. } => "containerd",
        }
    }
}

/// Where a layer's bytes came from, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Store,
    Peers,
    Registry,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Peers => "peers",
            Self::Registry => "registry",
        }
    }
}

/// What the fetch of one layer needs.
pub struct Fetch {
    pub store: Arc<Store>,
    pub mesh: Option<Arc<Mesh>>,
    pub registries: Arc<Registries>,
    /// The registry host and repository the image came from.
    pub source: Option<(String, String)>,
}

/// A layer unpacked into `dir`, its diff_id checked.
pub struct Unpacked {
    pub applied: Applied,
    pub origin: Origin,
}

impl Fetch {
    /// Fetches `layer` and unpacks it into `staging` as its bytes arrive;
    /// checks the diff_id against the config's.
    pub async fn unpack(
        &self,
        layer: &ImageLayer,
        staging: Staging,
    ) -> Result<(Staging, Unpacked), LayerError> {
        let digest = layer.digest.clone();
        let compression = Compression::from_media_type(&layer.media_type).map_err(|source| {
            LayerError::Unpack {
                digest: digest.clone(),
                source,
            }
        })?;
        let whiteouts = Whiteouts::for_layer(&layer.chain_id, &layer.diff_id);
        let (chunks, reader) = pipe();
        // The staging directory goes to the unpacker's thread and comes back
        // with its result. If this future is dropped (the pull was
        // cancelled), the thread sees its stream end, stops, and removes the
        // directory itself: nothing writes there once it is gone.
        let unpacker = tokio::task::spawn_blocking(move || {
            let applied = apply_layer(reader, compression, &staging.fs(), &[], whiteouts);
            (staging, applied)
        });
        let fed = self.feed(layer, &chunks).await;
        drop(chunks);
        let (staging, unpacked) = unpacker.await.map_err(|e| LayerError::Stopped {
            digest: digest.clone(),
            reason: e.to_string(),
        })?;
        // A failed unpack closes the channel, which stops the feed: then the
        // unpacker's error says why. A feed that failed by itself cut the
        // unpacker's stream short: then the feed's error says why.
        let origin = match fed {
            Err(e) if !matches!(e, LayerError::Stopped { .. }) => return Err(e),
            fed => fed,
        };
        let applied = unpacked.map_err(|source| LayerError::Unpack {
            digest: digest.clone(),
            source,
        })?;
        let origin = origin?;
        if applied.diff_id != layer.diff_id {
            return Err(LayerError::DiffId {
                digest,
                actual: applied.diff_id,
                expected: layer.diff_id.clone(),
            });
        }
        Ok((staging, Unpacked { applied, origin }))
    }

    /// Sends the layer's bytes, in order, to `chunks`: what peers send is
    /// passed on as each piece is verified, the rest as the registry sends it.
    async fn feed(&self, layer: &ImageLayer, chunks: &PipeSender) -> Result<Origin, LayerError> {
        let digest = &layer.digest;
        let store_error = |source| LayerError::Store {
            digest: digest.clone(),
            source,
        };
        let reference = format!("{OWN_REF_PREFIX}fastpath/layer-{digest}");
        let mut ingest = match block_in_place(|| {
            self.store
                .writer(&reference, layer.size as i64, Some(digest.clone()))
        }) {
            Ok(ingest) => ingest,
            Err(StoreError::AlreadyExists(_)) => {
                let (file, _) =
                    block_in_place(|| self.store.open_blob(digest)).map_err(store_error)?;
                send_file(&file, &mut 0, layer.size, chunks, digest).await?;
                return Ok(Origin::Store);
            }
            Err(e) => return Err(store_error(e)),
        };
        let file = block_in_place(|| ingest.data_file()).map_err(store_error)?;
        let mut sent = 0;
        let mut session = self
            .mesh
            .as_ref()
            .and_then(|mesh| BlobSession::start(mesh, &reference, layer.size as i64));
        if let Some(session) = session.as_mut() {
            let verified = session.verified_prefix();
            tokio::select! {
                settled = session.before_stat(&mut ingest, std::future::pending()) => settled.map_err(store_error)?,
                stopped = follow(&file, verified, &mut sent, chunks, digest) => return Err(stopped),
            }
        }
        let held = ingest.offset() as u64;
        send_file(&file, &mut sent, held, chunks, digest).await?;
        let origin = if held == layer.size {
            Origin::Peers
        } else {
            self.stream_from_registry(layer, &mut ingest, session.as_mut(), chunks)
                .await?;
            Origin::Registry
        };
        block_in_place(|| ingest.commit(layer.size as i64, Some(digest), HashMap::new()))
            .map_err(store_error)?;
        if let Some(session) = &mut session {
            session.committed();
        }
        Ok(origin)
    }

    /// Streams the rest of the blob from the registry into the ingest and
    /// to the unpacker, announcing each completed piece to the mesh.
    async fn stream_from_registry(
        &self,
        layer: &ImageLayer,
        ingest: &mut Ingest,
        mut session: Option<&mut BlobSession>,
        chunks: &PipeSender,
    ) -> Result<(), LayerError> {
        let digest = &layer.digest;
        let Some((host, repository)) = &self.source else {
            return Err(LayerError::NoSource {
                digest: digest.clone(),
            });
        };
        let registry_error = |source| LayerError::Registry {
            digest: digest.clone(),
            source,
        };
        let offset = ingest.offset() as u64;
        tracing::info!(%digest, %host, %repository, offset, size = layer.size,
            "fast path: fetching the layer from the registry");
        let mut stream = self
            .registries
            .open_blob(host, repository, digest, offset)
            .await
            .map_err(registry_error)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(registry_error)?;
            let before = ingest.offset();
            block_in_place(|| ingest.write(before, &chunk)).map_err(|source| {
                LayerError::Store {
                    digest: digest.clone(),
                    source,
                }
            })?;
            if let Some(session) = session.as_deref_mut() {
                session.wrote(before, ingest.offset(), &chunk);
            }
            send(chunks, chunk, digest).await?;
        }
        Ok(())
    }
}

/// Sends bytes `*at..end` of `file` to `chunks`, moving `at` past each
/// chunk sent (so that a dropped call leaves it at what was sent).
async fn send_file(
    file: &File,
    at: &mut u64,
    end: u64,
    chunks: &PipeSender,
    digest: &Digest,
) -> Result<(), LayerError> {
    while *at < end {
        let mut buf = vec![0; READ_CHUNK.min((end - *at) as usize)];
        block_in_place(|| file.read_exact_at(&mut buf, *at)).map_err(|e| LayerError::Store {
            digest: digest.clone(),
            source: StoreError::io("read a layer back from the store", e),
        })?;
        let len = buf.len() as u64;
        send(chunks, buf.into(), digest).await?;
        *at += len;
    }
    Ok(())
}

/// Sends the ingest's verified prefix as it grows, from `*sent` on, while
/// peers' pieces arrive; returns only if that fails (the unpacker stopped).
async fn follow(
    file: &File,
    mut verified: watch::Receiver<u64>,
    sent: &mut u64,
    chunks: &PipeSender,
    digest: &Digest,
) -> LayerError {
    loop {
        let upto = *verified.borrow_and_update();
        if let Err(e) = send_file(file, sent, upto, chunks, digest).await {
            return e;
        }
        if verified.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn send(chunks: &PipeSender, chunk: Bytes, digest: &Digest) -> Result<(), LayerError> {
    chunks
        .send(chunk)
        .await
        .map_err(|Closed| LayerError::Stopped {
            digest: digest.clone(),
            reason: "it no longer reads".into(),
        })
}
