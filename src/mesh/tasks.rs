//! The blobs this node is writing right now and which of their pieces it
//! holds verified: what the piece server may serve before a blob is
//! committed, and what the node tells a supernode that asks.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::Digest;

use crate::protocol::piece::piece_count;

/// One blob in flight on this node.
pub struct LocalTask {
    pub digest: Digest,
    pub size: u64,
    pub piece_size: u64,
    /// The ingest's data file, where verified pieces sit at their offsets.
    pub data: PathBuf,
    /// Digest of each verified piece; `None` for pieces not held yet.
    pieces: Mutex<Vec<Option<Digest>>>,
    /// This node streams the blob from the registry.
    ingesting: AtomicBool,
    /// The peers that sent verified pieces: named if the blob they make up
    /// fails its digest.
    sources: Mutex<HashSet<String>>,
}

impl LocalTask {
    /// Records a verified piece.
    pub fn verified(&self, number: u32, digest: Digest) {
        if let Some(slot) = self.pieces.lock().expect("pieces").get_mut(number as usize) {
            *slot = Some(digest);
        }
    }

    /// Records a verified piece that peer `parent` sent.
    pub fn received(&self, number: u32, digest: Digest, parent: &str) {
        self.verified(number, digest);
        let mut sources = self.sources.lock().expect("sources");
        if !sources.contains(parent) {
            sources.insert(parent.to_owned());
        }
    }

    /// The peers that sent pieces since the last call.
    pub fn take_sources(&self) -> Vec<String> {
        self.sources.lock().expect("sources").drain().collect()
    }

    /// Forgets pieces from `number` on (their bytes were dropped).
    pub fn forget_from(&self, number: u32) {
        for slot in self
            .pieces
            .lock()
            .expect("pieces")
            .iter_mut()
            .skip(number as usize)
        {
            *slot = None;
        }
    }

    /// Marks this node as the blob's ingester (told to a supernode that
    /// restarts, so that it does not elect another one).
    pub fn start_ingesting(&self) {
        self.ingesting.store(true, Ordering::Relaxed);
    }

    pub fn is_ingesting(&self) -> bool {
        self.ingesting.load(Ordering::Relaxed)
    }

    pub fn has(&self, number: u32) -> bool {
        self.pieces
            .lock()
            .expect("pieces")
            .get(number as usize)
            .is_some_and(Option::is_some)
    }

    /// The first piece from `number` on that is not held (the piece count
    /// if all are): where the verified prefix ends.
    pub fn first_missing_from(&self, number: u32) -> u32 {
        let pieces = self.pieces.lock().expect("pieces");
        (number as usize..pieces.len())
            .find(|&n| pieces[n].is_none())
            .unwrap_or(pieces.len()) as u32
    }

    /// Up to `limit` pieces from `number` on that are not held and not in
    /// `skip`.
    pub fn missing_from(&self, number: u32, limit: usize, skip: &HashSet<u32>) -> Vec<u32> {
        let pieces = self.pieces.lock().expect("pieces");
        (number as usize..pieces.len())
            .filter(|&n| pieces[n].is_none() && !skip.contains(&(n as u32)))
            .take(limit)
            .map(|n| n as u32)
            .collect()
    }

    /// The verified pieces, as `(number, digest)`.
    pub fn held(&self) -> Vec<(u32, Digest)> {
        self.pieces
            .lock()
            .expect("pieces")
            .iter()
            .enumerate()
            .filter_map(|(n, d)| d.clone().map(|d| (n as u32, d)))
            .collect()
    }
}

/// The set of blobs in flight, keyed by digest.
#[derive(Default)]
pub struct LocalTasks {
    tasks: Mutex<HashMap<Digest, Arc<LocalTask>>>,
}

impl LocalTasks {
    /// Starts tracking a blob being written into `data`.
    pub fn start(
        &self,
        digest: Digest,
        size: u64,
        piece_size: u64,
        data: PathBuf,
    ) -> Arc<LocalTask> {
        let task = Arc::new(LocalTask {
            digest: digest.clone(),
            size,
            piece_size,
            data,
            pieces: Mutex::new(vec![None; piece_count(size, piece_size) as usize]),
            ingesting: AtomicBool::new(false),
            sources: Mutex::default(),
        });
        self.tasks
            .lock()
            .expect("tasks")
            .insert(digest, task.clone());
        task
    }

    pub fn get(&self, digest: &Digest) -> Option<Arc<LocalTask>> {
        self.tasks.lock().expect("tasks").get(digest).cloned()
    }

    /// Stops tracking a blob (committed, or given up).
    pub fn finish(&self, task: &Arc<LocalTask>) {
        let mut tasks = self.tasks.lock().expect("tasks");
        if tasks
            .get(&task.digest)
            .is_some_and(|t| Arc::ptr_eq(t, task))
        {
            tasks.remove(&task.digest);
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.lock().expect("tasks").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<LocalTask>> {
        self.tasks
            .lock()
            .expect("tasks")
            .values()
            .cloned()
            .collect()
    }
}
