//! The supernode's repo: a content store of its own (the same layout as a
//! node's) that takes a copy of every blob the mesh starts fetching from a
//! registry, by downloading it from the peers like any node would, and then
//! offers it as a peer (pieces logged `source="supernode"` by downloaders).
//! The copy outlives the nodes that pulled the blob: a node that joins the
//! cluster later, or that pruned the image, still gets it inside the
//! cluster. The repo never fetches from a registry itself (the scheduler
//! never elects it), keeps at most `max_bytes`, and evicts the least
//! recently used blobs first (last read by a peer, else committed), never
//! one read within [`SERVING`]: a blob a peer is downloading is read piece
//! after piece, so it is never pulled from under it.
//!
//! The repo is a store like a node's, with the piece digests of each blob
//! recorded: a supernode restarted on the same data dir (the same
//! PersistentVolume) offers every blob again at its first registration and
//! fetches none of them anew. Read times live in memory, so right after a
//! restart the order is the commit order.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::block_in_place;

use crate::mesh::downloader::{DownloadEnd, download};
use crate::mesh::session::seed_verified_prefix;
use crate::mesh::{Mesh, MeshConfig};
use crate::protocol::api::Role;
use crate::protocol::piece::piece_size;
use crate::shutdown::Shutdown;
use crate::store::{Digest, Store};

/// Blobs copied at the same time.
const CONCURRENT_COPIES: usize = 4;
/// A blob read this recently is being served, and is not evicted: longer
/// than a downloader waits for a piece before it gives up on a parent.
pub const SERVING: Duration = Duration::from_secs(30);

/// How the repo is set up.
#[derive(Debug, Clone)]
pub struct RepoConfig {
    /// The repo's content store.
    pub dir: PathBuf,
    /// Most bytes of blobs kept; the oldest go first.
    pub max_bytes: u64,
    /// Its place in the mesh (`supernode: true`).
    pub mesh: MeshConfig,
}

/// The repo: its store, its mesh peer, and the copies in progress.
pub struct Repo {
    store: Arc<Store>,
    mesh: Arc<Mesh>,
    max_bytes: u64,
    copying: Mutex<HashSet<Digest>>,
    slots: Semaphore,
    /// The supernode's: copies in progress end with it.
    shutdown: Shutdown,
}

impl Repo {
    /// Opens the repo's store and joins the mesh as a seeding peer, until
    /// `shutdown` is cancelled.
    pub async fn start(config: RepoConfig, shutdown: &Shutdown) -> anyhow::Result<Arc<Self>> {
        let store = tokio::task::spawn_blocking({
            let dir = config.dir.clone();
            move || Store::open(&dir)
        })
        .await?
        .with_context(|| format!("open the repo in {}", config.dir.display()))?;
        let mesh = Mesh::start(config.mesh, store.clone(), shutdown).await?;
        tracing::info!(dir = %config.dir.display(), max_bytes = config.max_bytes, "repo open");
        Ok(Arc::new(Self {
            store,
            mesh,
            max_bytes: config.max_bytes,
            copying: Mutex::new(HashSet::new()),
            slots: Semaphore::new(CONCURRENT_COPIES),
            shutdown: shutdown.clone(),
        }))
    }

    /// The repo's place in the mesh.
    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.mesh
    }

    /// Copies every blob named on `new_blobs` (digest and size), until the
    /// channel closes.
    pub async fn copy_all(self: Arc<Self>, mut new_blobs: mpsc::UnboundedReceiver<(Digest, u64)>) {
        while let Some((digest, size)) = new_blobs.recv().await {
            if size > self.max_bytes || block_in_place(|| self.store.blob_path(&digest).exists()) {
                continue;
            }
            if !self.copying.lock().expect("copying").insert(digest.clone()) {
                continue;
            }
            let repo = self.clone();
            self.shutdown.spawn(async move {
                if let Err(e) = repo.copy(&digest, size).await {
                    tracing::warn!(%digest, error = %e, "repo: could not copy the blob");
                }
                repo.copying.lock().expect("copying").remove(&digest);
            });
        }
    }

    /// Downloads one blob from its peers into the repo and offers it.
    async fn copy(&self, digest: &Digest, size: u64) -> anyhow::Result<()> {
        let _slot = self.slots.acquire().await?;
        let reference = format!("repo/{digest}");
        let mut ingest = block_in_place(|| {
            self.store
                .writer(&reference, size as i64, Some(digest.clone()))
        })?;
        let Some((Role::Download, supernode)) = self.mesh.join(digest, size as i64).await else {
            anyhow::bail!("the supernode did not offer the blob for download");
        };
        let task =
            self.mesh
                .tasks
                .start(digest.clone(), size, piece_size(size), ingest.data_path());
        let end = async {
            block_in_place(|| seed_verified_prefix(&task, &mut ingest))?;
            download(
                &self.mesh,
                &task,
                &mut ingest,
                &supernode,
                None,
                std::future::pending(),
            )
            .await
        }
        .await;
        self.mesh.tasks.finish(&task);
        match end? {
            DownloadEnd::Complete if ingest.digest() == *digest => {
                block_in_place(|| ingest.commit(size as i64, Some(digest), HashMap::new()))?;
                drop(ingest);
                tracing::info!(%digest, size, "repo: blob stored; offered to peers");
                self.mesh.committed(&task).await;
                let evicted = block_in_place(|| {
                    evict_least_recently_used(
                        &self.store,
                        self.max_bytes,
                        digest,
                        SystemTime::now(),
                    )
                })?;
                if !evicted.is_empty() {
                    self.mesh.deleted();
                }
                Ok(())
            }
            other => {
                drop(ingest);
                block_in_place(|| self.store.abort(&reference))?;
                if matches!(other, DownloadEnd::Complete | DownloadEnd::Refuted) {
                    // The peers' pieces matched digests that were a lie:
                    // the copy is gone, and the peers that sent it are named.
                    self.mesh.blob_failed(&task).await;
                    anyhow::bail!("the copy assembled from peers is not the blob");
                }
                anyhow::bail!("download ended with {other:?}")
            }
        }
    }
}

/// Deletes the least recently used blobs of `store` (but never `keep`, nor
/// one read within [`SERVING`] of `now`) until it holds at most
/// `max_bytes`; returns what it deleted, oldest use first.
fn evict_least_recently_used(
    store: &Store,
    max_bytes: u64,
    keep: &Digest,
    now: SystemTime,
) -> anyhow::Result<Vec<Digest>> {
    let mut blobs: Vec<(SystemTime, _)> = store
        .list()?
        .into_iter()
        .map(|b| {
            (
                store
                    .last_read(&b.digest)
                    .unwrap_or(b.created_at)
                    .max(b.created_at),
                b,
            )
        })
        .collect();
    let mut total: u64 = blobs.iter().map(|(_, b)| b.size as u64).sum();
    blobs.sort_by_key(|(used, _)| *used);
    let mut evicted = Vec::new();
    for (used, blob) in blobs {
        if total <= max_bytes {
            break;
        }
        let serving = now.duration_since(used).is_ok_and(|ago| ago < SERVING)
            && store.last_read(&blob.digest).is_some();
        if blob.digest == *keep || serving {
            continue;
        }
        store.delete(&blob.digest)?;
        total -= blob.size as u64;
        tracing::info!(digest = %blob.digest, size = blob.size, "repo: evicted");
        evicted.push(blob.digest);
    }
    if total > max_bytes {
        tracing::info!(
            total,
            max_bytes,
            "repo: over its cap while its blobs are being served"
        );
    }
    Ok(evicted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_drops_the_least_recently_used_blobs_never_one_being_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let commit = |name: &str, bytes: &[u8]| {
            let mut ingest = store.writer(name, 0, None).unwrap();
            ingest.write(0, bytes).unwrap();
            let digest = ingest.commit(0, None, HashMap::new()).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            digest
        };
        let old = commit("old", &[1; 100]);
        let middle = commit("middle", &[2; 100]);
        let young = commit("young", &[3; 100]);
        let new = commit("new", &[4; 100]);
        let later = SystemTime::now() + SERVING * 2;

        assert!(
            evict_least_recently_used(&store, 400, &new, later)
                .unwrap()
                .is_empty()
        );
        // `old` was read after `middle` was committed: `middle` is the least
        // recently used.
        store.open_blob(&old).unwrap();
        assert_eq!(
            evict_least_recently_used(&store, 350, &new, later).unwrap(),
            std::slice::from_ref(&middle)
        );
        // `old` and `young` are being served (read just now): over the cap,
        // they stay, and so does the blob just stored.
        store.open_blob(&young).unwrap();
        store.open_blob(&old).unwrap();
        assert!(
            evict_least_recently_used(&store, 50, &new, SystemTime::now())
                .unwrap()
                .is_empty()
        );
        // Once they are not, the least recently used goes first.
        assert_eq!(
            evict_least_recently_used(&store, 150, &new, later).unwrap(),
            [young, old.clone()]
        );
        assert!(store.info(&new).is_ok() && store.info(&old).is_err());
    }
}
