//! The mesh's part in one containerd Write stream for a layer blob. The
//! negotiation STAT starts a background Join; the next STAT (the one
//! containerd's client waits on) settles the role: download from peers
//! (the STAT is held until the blob is complete, so containerd commits
//! without asking the registry) or ingest from the registry (containerd
//! streams the blob in; each piece is announced as it completes).
//!
//! A session's life is a [`Phase`]. Every end but a commit abandons it: the
//! node stops serving the blob from the ingest and tells the supernode
//! (`Leave`), which elects another ingester at once, and the ingest (with
//! the ref's lock) is closed by the Write that owned the session.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, block_in_place};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Mesh;
use super::downloader::{DownloadEnd, download};
use super::tasks::LocalTask;
use crate::protocol::api::Role;
use crate::protocol::piece::{piece_count, piece_range, piece_size};
use crate::store::{Digest, Ingest, StoreError, digest_in_ref};

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the supernode to give this node a role.
    Joining,
    /// Fetching pieces from peers (and, once whole, waiting for the commit).
    Downloading,
    /// containerd streams the blob from the registry; pieces are announced.
    Ingesting,
    /// The blob is in the store: this node holds it for good.
    Committed,
    /// Ended without a commit (containerd's client went away, a write
    /// failed, the disk is full): the node left the task.
    Abandoned,
}

/// The mesh side of one Write stream.
pub struct BlobSession {
    mesh: Arc<Mesh>,
    digest: Digest,
    size: u64,
    phase: Phase,
    join: Option<JoinHandle<Option<(Role, String)>>>,
    ingesting: Option<Ingesting>,
    task: Option<Arc<LocalTask>>,
    /// How much of the blob, from offset 0, the ingest holds verified
    /// while peers' pieces arrive.
    verified: watch::Sender<u64>,
}

/// This node writes the blob from the registry and publishes its pieces.
struct Ingesting {
    hasher: PieceHasher,
    dirty: Arc<Notify>,
    /// Stops the announcer when the session ends.
    _done: DropGuard,
    supernode: String,
}

impl BlobSession {
    /// A session for a layer blob whose ref names its digest and whose size
    /// is known; `None` for anything else (that stays a plain local write).
    pub fn start(mesh: &Arc<Mesh>, reference: &str, total: i64) -> Option<Self> {
        let kind = reference.rsplit('/').next()?;
        if !kind.starts_with("layer-") || total <= 0 {
            return None;
        }
        let digest = digest_in_ref(reference)?;
        let join = {
            let mesh = mesh.clone();
            let digest = digest.clone();
            tokio::spawn(async move { mesh.join(&digest, total).await })
        };
        Some(Self {
            mesh: mesh.clone(),
            digest,
            size: total as u64,
            phase: Phase::Joining,
            join: Some(join),
            ingesting: None,
            task: None,
            verified: watch::Sender::new(0),
        })
    }

    /// Follows the verified prefix of the ingest while [`Self::before_stat`]
    /// downloads from peers: those bytes are final and may be read.
    pub fn verified_prefix(&self) -> watch::Receiver<u64> {
        self.verified.subscribe()
    }

    /// Called before answering each STAT after the negotiation. The first
    /// call settles the role and, for a downloader, downloads, until
    /// `client_gone` completes (the client waiting for the STAT went away):
    /// then the session is abandoned.
    pub async fn before_stat(
        &mut self,
        ingest: &mut Ingest,
        client_gone: impl Future<Output = ()> + Send,
    ) -> Result<(), StoreError> {
        let Some(join) = self.join.take() else {
            return Ok(());
        };
        let Ok(Some((role, supernode))) = join.await else {
            return Ok(()); // no supernode: a plain pull from the registry
        };
        let task = self.mesh.tasks.start(
            self.digest.clone(),
            self.size,
            piece_size(self.size),
            ingest.data_path(),
        );
        self.task = Some(task.clone());
        block_in_place(|| seed_verified_prefix(&task, ingest))?;
        if role == Role::Download {
            tracing::info!(digest = %self.digest, size = self.size, %supernode, "downloading from peers");
            self.phase = Phase::Downloading;
            let verified = Some(&self.verified);
            match download(&self.mesh, &task, ingest, &supernode, verified, client_gone).await? {
                DownloadEnd::Complete if ingest.digest() == self.digest => return Ok(()),
                DownloadEnd::Complete | DownloadEnd::Refuted => {
                    self.discard_mesh_bytes(&task, ingest)?
                }
                DownloadEnd::ClientGone => {
                    self.abandon("containerd's client went away");
                    return Ok(());
                }
                DownloadEnd::TakeOver | DownloadEnd::Stalled => {}
            }
        }
        self.phase = Phase::Ingesting;
        tracing::info!(digest = %self.digest, size = self.size, offset = ingest.offset(), %supernode, "ingesting from the registry");
        task.start_ingesting();
        let hasher = block_in_place(|| PieceHasher::resume(&task, ingest))?;
        let dirty = Arc::new(Notify::new());
        let done = CancellationToken::new();
        tokio::spawn(
            self.mesh
                .clone()
                .announcer(task, dirty.clone(), done.clone()),
        );
        self.ingesting = Some(Ingesting {
            hasher,
            dirty,
            _done: done.drop_guard(),
            supernode,
        });
        Ok(())
    }

    /// The blob assembled from peers' pieces is not the blob (their piece
    /// digests were a lie that the pieces matched), or another node's blob
    /// by the same digests was not (the supernode said so): empties the
    /// ingest, so that it is fetched from the registry from offset 0, and
    /// reports the peers that sent the pieces.
    fn discard_mesh_bytes(
        &self,
        task: &Arc<LocalTask>,
        ingest: &mut Ingest,
    ) -> Result<(), StoreError> {
        tracing::warn!(digest = %self.digest, actual = %ingest.digest(),
            "the blob assembled from peers failed its digest: discarded, reporting the peers");
        block_in_place(|| ingest.truncate())?;
        task.forget_from(0);
        self.verified.send_replace(0);
        let (mesh, task) = (self.mesh.clone(), task.clone());
        tokio::spawn(async move { mesh.blob_failed(&task).await });
        Ok(())
    }

    /// containerd wrote `data` (from the registry), taking the ingest from
    /// offset `before` to `after` (a write at offset 0 starts it over).
    pub fn wrote(&mut self, before: i64, after: i64, data: &[u8]) {
        let (Some(ingesting), Some(task)) = (self.ingesting.as_mut(), self.task.as_ref()) else {
            return;
        };
        if after - before != data.len() as i64 {
            task.forget_from(0);
            ingesting.hasher.restart();
        }
        self.mesh
            .stats
            .registry_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        for (number, digest) in ingesting.hasher.update(data) {
            let (start, end) = piece_range(number, task.size, task.piece_size);
            tracing::info!(
                taskID = %task.digest, superNode = %ingesting.supernode, dstCid = "registry",
                range = %format!("{start}-{}", end - 1), pieceSize = end - start, pieceNum = number,
                source = "registry", "downloading piece"
            );
            task.verified(number, digest);
            ingesting.dirty.notify_one();
        }
    }

    /// The blob was committed: tell the supernode this node holds all of it.
    pub fn committed(&mut self) {
        self.phase = Phase::Committed;
        if let Some(task) = self.task.clone() {
            let mesh = self.mesh.clone();
            tokio::spawn(async move { mesh.committed(&task).await });
        }
    }

    /// Ends the session without a commit: stops announcing and serving
    /// from the ingest, and leaves the task, so that the supernode stops
    /// sending peers here and elects another ingester at once.
    fn abandon(&mut self, why: &str) {
        if self.phase == Phase::Abandoned {
            return;
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Abandoned);
        self.ingesting = None;
        let Some(task) = &self.task else { return };
        tracing::info!(digest = %self.digest, ?phase, pieces = task.first_missing_from(0), why, "abandoning the blob; leaving the task");
        self.mesh.tasks.finish(task);
        // Outside a runtime (the daemon is shutting down) nobody is told:
        // the supernode expires the host instead.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mesh = self.mesh.clone();
            let digest = task.digest.clone();
            runtime.spawn(async move { mesh.leave(&digest).await });
        }
    }
}

impl Drop for BlobSession {
    /// The stream ended. After a commit the blob is served from the store
    /// from now on; any other end abandons the session.
    fn drop(&mut self) {
        if self.phase != Phase::Committed {
            self.abandon("the write stream ended without a commit");
        } else if let Some(task) = &self.task {
            self.mesh.tasks.finish(task);
        }
    }
}

/// Marks the pieces an ingest already holds whole (it was resumed) as
/// verified, with their digests computed from the data.
pub fn seed_verified_prefix(task: &LocalTask, ingest: &mut Ingest) -> Result<(), StoreError> {
    let offset = ingest.offset() as u64;
    // A complete ingest holds its last piece too, even if it is short.
    let whole = if offset >= task.size {
        piece_count(task.size, task.piece_size)
    } else {
        (offset / task.piece_size) as u32
    };
    if whole == 0 {
        return Ok(());
    }
    let file = ingest.data_file()?;
    for number in 0..whole {
        let (start, end) = piece_range(number, task.size, task.piece_size);
        task.verified(number, hash_range(&file, start, end)?);
    }
    Ok(())
}

fn hash_range(file: &File, start: u64, end: u64) -> Result<Digest, StoreError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let n = buf.len().min((end - at) as usize);
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| StoreError::io("read back a piece", e))?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(Digest::from_hasher(hasher))
}

/// Hashes a sequentially written blob piece by piece.
struct PieceHasher {
    size: u64,
    piece_size: u64,
    /// Bytes of the blob hashed so far.
    position: u64,
    current: Sha256,
}

impl PieceHasher {
    /// Starts at the ingest's offset, re-reading the part of the current
    /// piece already written.
    fn resume(task: &LocalTask, ingest: &mut Ingest) -> Result<Self, StoreError> {
        let position = ingest.offset() as u64;
        let piece_start = position - position % task.piece_size;
        let mut current = Sha256::new();
        if piece_start < position {
            let file = ingest.data_file()?;
            let mut buf = vec![0u8; (position - piece_start) as usize];
            file.read_exact_at(&mut buf, piece_start)
                .map_err(|e| StoreError::io("read back the current piece", e))?;
            current.update(&buf);
        }
        Ok(Self {
            size: task.size,
            piece_size: task.piece_size,
            position,
            current,
        })
    }

    /// Starts over at offset 0.
    fn restart(&mut self) {
        self.position = 0;
        self.current = Sha256::new();
    }

    /// Feeds bytes; returns the pieces they completed.
    fn update(&mut self, mut data: &[u8]) -> Vec<(u32, Digest)> {
        let mut done = Vec::new();
        while !data.is_empty() && self.position < self.size {
            let piece_end =
                (self.position - self.position % self.piece_size + self.piece_size).min(self.size);
            let take = data.len().min((piece_end - self.position) as usize);
            self.current.update(&data[..take]);
            self.position += take as u64;
            data = &data[take..];
            if self.position == piece_end {
                let number = ((piece_end - 1) / self.piece_size) as u32;
                done.push((
                    number,
                    Digest::from_hasher(std::mem::take(&mut self.current)),
                ));
            }
        }
        done
    }
}
