//! One layer on the fast path: its blob comes from the store, the mesh or
//! the registry, and is unpacked into a staging directory while it arrives.
//! The blob is written into the store as it streams by (so it is kept once,
//! and peers can fetch its pieces), and unpacked on a blocking thread that
//! reads the same bytes from a channel.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::block_in_place;

use crate::mesh::Mesh;
use crate::mesh::session::BlobSession;
use crate::registry::{Registries, RegistryError};
use crate::store::image_index::ImageLayer;
use crate::store::{Digest, Ingest, Store, StoreError};
use crate::unpack::{Applied, Compression, UnpackError, apply_layer};

/// Chunks buffered between the fetch and the unpacker.
const CHANNEL_CHUNKS: usize = 64;
/// Size of the chunks read back from the store.
const READ_CHUNK: usize = 1 << 20;
/// Prefix of the refs of the fast path's own ingests, which containerd has
/// no record of.
pub const INGEST_PREFIX: &str = "damselfly/fastpath/layer-";

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
    /// Fetches `layer` and unpacks it into `dir` as its bytes arrive;
    /// checks the diff_id against the config's.
    pub async fn unpack(&self, layer: &ImageLayer, dir: PathBuf) -> Result<Unpacked, LayerError> {
        let digest = layer.digest.clone();
        let compression = Compression::from_media_type(&layer.media_type).map_err(|source| {
            LayerError::Unpack {
                digest: digest.clone(),
                source,
            }
        })?;
        let (chunks, receiver) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
        let unpacker = tokio::task::spawn_blocking(move || {
            apply_layer(ChannelReader::new(receiver), compression, &dir, &[])
        });
        let fed = self.feed(layer, &chunks).await;
        drop(chunks);
        let unpacked = unpacker.await.map_err(|e| LayerError::Stopped {
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
        Ok(Unpacked { applied, origin })
    }

    /// Sends the layer's bytes, in order, to `chunks`.
    async fn feed(
        &self,
        layer: &ImageLayer,
        chunks: &mpsc::Sender<Bytes>,
    ) -> Result<Origin, LayerError> {
        let digest = &layer.digest;
        let store_error = |source| LayerError::Store {
            digest: digest.clone(),
            source,
        };
        let reference = format!("{INGEST_PREFIX}{digest}");
        let mut ingest = match block_in_place(|| {
            self.store
                .writer(&reference, layer.size as i64, Some(digest.clone()))
        }) {
            Ok(ingest) => ingest,
            Err(StoreError::AlreadyExists(_)) => {
                let (file, _) =
                    block_in_place(|| self.store.open_blob(digest)).map_err(store_error)?;
                send_file(&file, 0, layer.size, chunks, digest).await?;
                return Ok(Origin::Store);
            }
            Err(e) => return Err(store_error(e)),
        };
        let mut session = self
            .mesh
            .as_ref()
            .and_then(|mesh| BlobSession::start(mesh, &reference, layer.size as i64));
        if let Some(session) = session.as_mut() {
            session
                .before_stat(&mut ingest)
                .await
                .map_err(store_error)?;
        }
        let held = ingest.offset() as u64;
        if held > 0 {
            let file = block_in_place(|| ingest.data_file()).map_err(store_error)?;
            send_file(&file, 0, held, chunks, digest).await?;
        }
        let origin = if held == layer.size {
            Origin::Peers
        } else {
            self.stream_from_registry(layer, &mut ingest, session.as_mut(), chunks)
                .await?;
            Origin::Registry
        };
        block_in_place(|| ingest.commit(layer.size as i64, Some(digest), HashMap::new()))
            .map_err(store_error)?;
        if let Some(session) = &session {
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
        chunks: &mpsc::Sender<Bytes>,
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
        let mut stream = self
            .registries
            .open_blob(host, repository, digest, ingest.offset() as u64)
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

/// Sends bytes `start..end` of `file` to `chunks`.
async fn send_file(
    file: &std::fs::File,
    start: u64,
    end: u64,
    chunks: &mpsc::Sender<Bytes>,
    digest: &Digest,
) -> Result<(), LayerError> {
    let mut at = start;
    while at < end {
        let mut buf = vec![0; READ_CHUNK.min((end - at) as usize)];
        block_in_place(|| file.read_exact_at(&mut buf, at)).map_err(|e| LayerError::Store {
            digest: digest.clone(),
            source: StoreError::io("read a layer back from the store", e),
        })?;
        at += buf.len() as u64;
        send(chunks, buf.into(), digest).await?;
    }
    Ok(())
}

async fn send(
    chunks: &mpsc::Sender<Bytes>,
    chunk: Bytes,
    digest: &Digest,
) -> Result<(), LayerError> {
    chunks.send(chunk).await.map_err(|_| LayerError::Stopped {
        digest: digest.clone(),
        reason: "it no longer reads".into(),
    })
}

/// A blocking reader over the chunks a fetch sends; end of file when the
/// sender is dropped.
struct ChannelReader {
    receiver: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<Bytes>) -> Self {
        Self {
            receiver,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_reader_yields_the_chunks_in_order_then_eof() {
        let (sender, receiver) = mpsc::channel(4);
        let writer = std::thread::spawn(move || {
            for chunk in [&b"hello "[..], b"", b"layer"] {
                sender.blocking_send(Bytes::from_static(chunk)).unwrap();
            }
        });
        let mut text = String::new();
        ChannelReader::new(receiver)
            .read_to_string(&mut text)
            .unwrap();
        writer.join().unwrap();
        assert_eq!(text, "hello layer");
    }
}
