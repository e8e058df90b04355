//! The node's content store: the one copy of every blob containerd uses.
//!
//! Layout under the data directory (the shape of containerd's own store):
//! - `blobs/sha256/<hex>`: committed blobs, read-only, renamed into place only
//!   after their digest was verified and their bytes fsynced;
//! - `ingest/<sha256 of ref>/data`: writes in progress, resumable after a crash;
//! - `metadata.redb`: labels and timestamps of blobs, their piece digests
//!   (what the mesh offers), parameters of ingests.
//!
//! No path is built from a ref or a digest that was not validated: ingest
//! directories are named by the hash of the ref, blobs by a parsed [`Digest`].
//!
//! # Blocking work: one rule
//!
//! The store is synchronous: its calls do file I/O, fsync and redb
//! transactions, and may wait on a ref's lock. Async code of the whole crate
//! reaches it, and every other blocking call (opening, reading or writing a
//! file, reading a config file), through [`tokio::task::block_in_place`],
//! never inline on a runtime worker; a long blocking loop with nothing to
//! await (an unpacker, a streamed read) runs on `spawn_blocking` instead.
//! `block_in_place` needs tokio's multi-threaded runtime and panics on a
//! current-thread one, so everything that starts async work on the store
//! ([`crate::daemon::run`], [`crate::supernode::serve`],
//! [`crate::mesh::Mesh::start`]) first calls [`require_blocking_runtime`],
//! which refuses any other runtime with a clear error.

pub mod image_index;
mod import;
mod ingest;
mod metadata;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

pub use crate::protocol::Digest;
use crate::protocol::InvalidDigest;
use image_index::{ImageLayers, IndexedKind};
pub use import::Imported;
pub use ingest::{Ingest, IngestStatus, digest_in_ref};
pub use metadata::PieceRecord;
use metadata::{BlobMeta, Metadata};

/// How long a writer waits for a ref another writer holds before giving up
/// with [`StoreError::Locked`]. containerd's client closes a writer by
/// half-closing its stream and may reopen the ref at once, before the server
/// saw the close; containerd's own store waits about as long.
const LOCK_GRACE: Duration = Duration::from_secs(1);

/// Longest ref accepted. containerd's refs are `<namespace>/<seq>/<kind>-<digest>`,
/// well under this; anything longer is a client bug or an attack.
pub const MAX_REF_LEN: usize = 1024;

/// Prefix of the refs of ingests dfdaemon makes for itself (the fast path's
/// layers). containerd's refs start with a namespace, which never starts
/// with a dot, so no containerd ref has it. Such ingests are not listed to
/// containerd: its GC aborts every listed ingest it does not know, which
/// would throw away a layer a cancelled pull had half fetched, or one
/// another pull is fetching right now. [`Store::abort_idle_own`] expires them.
pub const OWN_REF_PREFIX: &str = ".damselfly/";

/// Whether `reference` names one of dfdaemon's own ingests.
pub fn is_own_ref(reference: &str) -> bool {
    reference.starts_with(OWN_REF_PREFIX)
}

/// The runtime async code runs on cannot reach the store (see the module
/// doc, "Blocking work: one rule").
#[derive(Debug, thiserror::Error)]
#[error(
    "damselfly needs tokio's multi-threaded runtime (it reaches the store through \
     block_in_place), not {0}"
)]
pub struct WrongRuntime(&'static str);

/// Checks that the current runtime can run `block_in_place`: a tokio
/// multi-threaded runtime.
pub fn require_blocking_runtime() -> Result<(), WrongRuntime> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => Ok(()),
        Ok(RuntimeFlavor::CurrentThread) => Err(WrongRuntime("a current-thread runtime")),
        Ok(_) => Err(WrongRuntime("an unknown runtime flavour")),
        Err(_) => Err(WrongRuntime("no runtime")),
    }
}

/// Errors of the store, one variant per gRPC status class they map to.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("ref {0} is locked by another writer")]
    Locked(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("metadata database: {0}")]
    Database(String),
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

impl From<InvalidDigest> for StoreError {
    fn from(error: InvalidDigest) -> Self {
        Self::InvalidArgument(error.to_string())
    }
}

impl StoreError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// A committed blob as the store describes it.
#[derive(Clone, Debug)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: i64,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub labels: HashMap<String, String>,
}

/// How [`Store::update_labels`] changes a blob's labels.
pub enum LabelUpdate {
    /// Replace every label with these.
    ReplaceAll(HashMap<String, String>),
    /// Set these keys (an empty value removes the key), keep the others.
    Keys(HashMap<String, String>),
}

impl LabelUpdate {
    /// Applies the update to `labels`.
    pub fn apply(self, labels: &mut HashMap<String, String>) {
        match self {
            Self::ReplaceAll(new) => *labels = new,
            Self::Keys(keys) => {
                for (key, value) in keys {
                    if value.is_empty() {
                        labels.remove(&key);
                    } else {
                        labels.insert(key, value);
                    }
                }
            }
        }
    }
}

/// Creates `dir` (and its parents) if needed, and makes it mode 0700.
pub(crate) fn private_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
        .map_err(|e| StoreError::io(format!("create {} mode 0700", dir.display()), e))
}

/// The content store. Cheap to share: wrap it in an [`Arc`].
pub struct Store {
    root: PathBuf,
    meta: Metadata,
    /// Refs that have an open [`Ingest`]; a second writer gets [`StoreError::Locked`].
    locked: Mutex<HashSet<String>>,
    /// Signalled whenever a ref is unlocked.
    unlocked: Condvar,
    /// When each blob was last opened for reading (since this open), for
    /// least-recently-used eviction.
    read_at: Mutex<HashMap<Digest, SystemTime>>,
}

impl Store {
    /// Opens the store at `root`, creating it if needed, and removes what a
    /// crash may have left half-made (ingest directories without a record and
    /// records whose data file is gone).
    /// Everything in it is private to dfdaemon's user, whatever the umask:
    /// directories 0700, the database 0600, committed blobs 0400.
    pub fn open(root: &Path) -> Result<Arc<Self>, StoreError> {
        for dir in [
            root,
            &root.join("blobs"),
            &root.join("blobs/sha256"),
            &root.join("ingest"),
        ] {
            private_dir(dir)?;
        }
        let db = root.join("metadata.redb");
        let meta = Metadata::open(&db)?;
        fs::set_permissions(&db, fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::io(format!("make {} mode 0600", db.display()), e))?;
        let store = Arc::new(Self {
            root: root.to_owned(),
            meta,
            locked: Mutex::new(HashSet::new()),
            unlocked: Condvar::new(),
            read_at: Mutex::new(HashMap::new()),
        });
        store.recover_ingests()?;
        Ok(store)
    }

    /// Path of a committed blob (which may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Describes a committed blob.
    pub fn info(&self, digest: &Digest) -> Result<BlobInfo, StoreError> {
        let path = self.blob_path(digest);
        let stat = match fs::metadata(&path) {
            Ok(stat) => stat,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("content {digest}")));
            }
            Err(e) => return Err(StoreError::io(format!("stat {}", path.display()), e)),
        };
        let meta = self.meta.blob(&digest.to_string())?.unwrap_or_else(|| {
            // Committed but its record was lost (crash between rename and
            // record, or a blob put in place by hand): the file is the truth.
            let mtime = stat.modified().map(to_nanos).unwrap_or_default();
            BlobMeta {
                created_at: mtime,
                updated_at: mtime,
                labels: HashMap::new(),
            }
        });
        Ok(BlobInfo {
            digest: digest.clone(),
            size: stat.len() as i64,
            created_at: from_nanos(meta.created_at),
            updated_at: from_nanos(meta.updated_at),
            labels: meta.labels,
        })
    }

    /// Opens a committed blob for reading, with its size.
    pub fn open_blob(&self, digest: &Digest) -> Result<(fs::File, i64), StoreError> {
        let path = self.blob_path(digest);
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("content {digest}")));
            }
            Err(e) => return Err(StoreError::io(format!("open {}", path.display()), e)),
        };
        self.read_at
            .lock()
            .expect("read times")
            .insert(digest.clone(), SystemTime::now());
        let size = file
            .metadata()
            .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?
            .len();
        Ok((file, size as i64))
    }

    /// When blob `digest` was last opened for reading since the store was
    /// opened, if it was.
    pub fn last_read(&self, digest: &Digest) -> Option<SystemTime> {
        self.read_at
            .lock()
            .expect("read times")
            .get(digest)
            .copied()
    }

    /// Changes a blob's labels and returns its new description.
    pub fn update_labels(
        &self,
        digest: &Digest,
        update: LabelUpdate,
    ) -> Result<BlobInfo, StoreError> {
        let info = self.info(digest)?;
        let mut labels = info.labels;
        update.apply(&mut labels);
        let meta = BlobMeta {
            created_at: to_nanos(info.created_at),
            updated_at: to_nanos(SystemTime::now()),
            labels,
        };
        self.meta.put_blob(&digest.to_string(), &meta)?;
        self.info(digest)
    }

    /// Every committed blob, in digest order.
    pub fn list(&self) -> Result<Vec<BlobInfo>, StoreError> {
        let dir = self.root.join("blobs/sha256");
        let entries =
            fs::read_dir(&dir).map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
        let mut digests = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
            let name = entry.file_name();
            // Anything not named like a digest was not put there by us.
            if let Some(digest) = name
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse().ok())
            {
                digests.push(digest);
            }
        }
        digests.sort();
        let mut infos = Vec::with_capacity(digests.len());
        for digest in digests {
            match self.info(&digest) {
                Ok(info) => infos.push(info),
                // Deleted while we listed.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(infos)
    }

    /// Deletes a committed blob.
    pub fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("content {digest}")));
            }
            Err(e) => return Err(StoreError::io(format!("delete {}", path.display()), e)),
        }
        self.meta.remove_blob(&digest.to_string())
    }

    /// Remembers the piece digests of committed blob `digest`; `false` if
    /// the blob is not (or no longer) in the store.
    pub fn record_pieces(&self, digest: &Digest, record: &PieceRecord) -> Result<bool, StoreError> {
        self.meta.put_pieces(digest.as_str(), record)
    }

    /// The committed blobs that have piece digests recorded.
    pub fn piece_records(&self) -> Result<Vec<(Digest, PieceRecord)>, StoreError> {
        self.meta
            .all_pieces()?
            .into_iter()
            .map(|(key, record)| Ok((key.parse()?, record)))
            .collect()
    }

    /// Indexes blob `digest`, just committed under `reference`, if the ref
    /// names a manifest or a config. The index only helps: a blob that does
    /// not parse is left out, and a failure is logged, never returned.
    pub fn index_committed(&self, reference: &str, digest: &Digest) {
        let Some(kind) = IndexedKind::of_ref(reference) else {
            return;
        };
        let path = self.blob_path(digest);
        let bytes = match fs::metadata(&path) {
            Ok(meta) if meta.len() <= image_index::MAX_INDEXED_BYTES => fs::read(&path),
            Ok(_) => return,
            Err(e) => Err(e),
        };
        let result = match (kind, bytes) {
            (_, Err(e)) => Err(StoreError::io(format!("read {}", path.display()), e)),
            (IndexedKind::Manifest, Ok(bytes)) => match image_index::parse_manifest(&bytes) {
                Some(record) => self.meta.index_manifest(digest.as_str(), &record),
                None => Ok(()),
            },
            (IndexedKind::Config, Ok(bytes)) => match image_index::parse_config(&bytes) {
                Some(record) => {
                    let diff_ids = record.diff_ids.iter().map(|d| d.parse()).collect::<Result<
                        Vec<Digest>,
                        InvalidDigest,
                    >>(
                    );
                    diff_ids.map_err(StoreError::from).and_then(|diff_ids| {
                        let chains = image_index::chain_ids(&diff_ids);
                        self.meta.index_config(digest.as_str(), &record, &chains)
                    })
                }
                None => Ok(()),
            },
        };
        if let Err(e) = result {
            tracing::warn!(%digest, %reference, error = %e, "cannot index image metadata");
        }
    }

    /// The newest image whose layers include chain ID `chain`, with that
    /// layer's position; `None` if no indexed image has it.
    pub fn image_with_chain(&self, chain: &Digest) -> Result<Option<ImageLayers>, StoreError> {
        for (manifest, manifest_record, config, config_record) in
            self.meta.images_with_chain(chain.as_str())?
        {
            let Some(layers) = image_index::image_layers(&manifest_record, &config_record)? else {
                continue;
            };
            let Some(position) = layers.iter().position(|l| l.chain_id == *chain) else {
                continue;
            };
            return Ok(Some(ImageLayers {
                manifest: manifest.parse()?,
                config: config.parse()?,
                layers,
                position,
            }));
        }
        Ok(None)
    }

    /// Opens the writer for `reference`, resuming its ingest if one exists.
    /// `total` and `expected` describe the blob when the client knows them.
    pub fn writer(
        self: &Arc<Self>,
        reference: &str,
        total: i64,
        expected: Option<Digest>,
    ) -> Result<Ingest, StoreError> {
        validate_ref(reference)?;
        if total < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "negative total {total} for ref {reference}"
            )));
        }
        if let Some(expected) = &expected
            && self.blob_path(expected).exists()
        {
            return Err(StoreError::AlreadyExists(format!("content {expected}")));
        }
        let lock = self.lock_ref(reference)?;
        Ingest::open(lock, total, expected)
    }

    /// Takes the writer lock on `reference`, waiting up to [`LOCK_GRACE`].
    fn lock_ref(self: &Arc<Self>, reference: &str) -> Result<RefLock, StoreError> {
        let locked = self.locked.lock().expect("lock table");
        let (mut locked, _) = self
            .unlocked
            .wait_timeout_while(locked, LOCK_GRACE, |locked| locked.contains(reference))
            .expect("lock table");
        if !locked.insert(reference.to_owned()) {
            return Err(StoreError::Locked(reference.to_owned()));
        }
        Ok(RefLock {
            store: self.clone(),
            reference: reference.to_owned(),
        })
    }

    /// The state of the ingest for `reference`.
    pub fn status(&self, reference: &str) -> Result<IngestStatus, StoreError> {
        validate_ref(reference)?;
        let meta = self
            .meta
            .ingest(reference)?
            .ok_or_else(|| StoreError::NotFound(format!("ref {reference}")))?;
        ingest::status_of(&self.ingest_dir(reference), reference, &meta)
    }

    /// Every ingest in progress.
    pub fn statuses(&self) -> Result<Vec<IngestStatus>, StoreError> {
        let mut out = Vec::new();
        for (reference, meta) in self.meta.ingests()? {
            match ingest::status_of(&self.ingest_dir(&reference), &reference, &meta) {
                Ok(status) => out.push(status),
                // Aborted or committed while we listed.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Aborts dfdaemon's own ingests that no writer holds and that nobody
    /// wrote for `idle`; returns their refs.
    pub fn abort_idle_own(&self, idle: Duration) -> Result<Vec<String>, StoreError> {
        let now = SystemTime::now();
        let mut aborted = Vec::new();
        for status in self.statuses()? {
            let idle_for = now.duration_since(status.updated_at).unwrap_or_default();
            if !is_own_ref(&status.reference) || idle_for < idle {
                continue;
            }
            // Holding the lock table: no writer opens the ref meanwhile.
            let locked = self.locked.lock().expect("lock table");
            if !locked.contains(&status.reference) {
                self.remove_ingest(&status.reference)?;
                aborted.push(status.reference);
            }
        }
        Ok(aborted)
    }

    /// Abandons the ingest for `reference` and frees its space, even if a
    /// writer has it open (containerd's GC aborts what it does not know). An
    /// unknown ref is not an error: containerd aborts inside its own
    /// transaction, which an error would roll back.
    pub fn abort(&self, reference: &str) -> Result<(), StoreError> {
        validate_ref(reference)?;
        self.remove_ingest(reference)
    }

    /// Directory of the ingest for a (validated) ref: named by the ref's hash,
    /// so no ref can name a path of its own.
    fn ingest_dir(&self, reference: &str) -> PathBuf {
        self.root
            .join("ingest")
            .join(Digest::of(reference.as_bytes()).hex())
    }

    /// Removes an ingest's record and then its directory; a crash between the
    /// two leaves a directory without record, which [`Store::open`] removes.
    fn remove_ingest(&self, reference: &str) -> Result<(), StoreError> {
        self.meta.remove_ingest(reference)?;
        let dir = self.ingest_dir(reference);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(format!("remove {}", dir.display()), e)),
        }
    }

    /// Drops the ingest record of `reference` if its data file is gone (a
    /// crash between a commit's rename and its cleanup; or an abort that an
    /// older version's download undid by writing the record back); whether
    /// it did.
    pub(crate) fn drop_ingest_without_data(&self, reference: &str) -> Result<bool, StoreError> {
        let data = self.ingest_dir(reference).join(ingest::DATA_FILE);
        let exists = data
            .try_exists()
            .map_err(|e| StoreError::io(format!("stat {}", data.display()), e))?;
        if !exists {
            tracing::warn!(%reference, "dropping ingest record without data");
            self.remove_ingest(reference)?;
        }
        Ok(!exists)
    }

    /// Drops records whose data is gone and directories without a record.
    fn recover_ingests(&self) -> Result<(), StoreError> {
        let mut known = HashSet::new();
        for (reference, _) in self.meta.ingests()? {
            if !self.drop_ingest_without_data(&reference)? {
                known.insert(self.ingest_dir(&reference));
            }
        }
        let ingest_root = self.root.join("ingest");
        let entries = fs::read_dir(&ingest_root)
            .map_err(|e| StoreError::io(format!("list {}", ingest_root.display()), e))?;
        for entry in entries {
            let path = entry
                .map_err(|e| StoreError::io(format!("list {}", ingest_root.display()), e))?
                .path();
            if !known.contains(&path) {
                tracing::warn!(path = %path.display(), "removing ingest directory without record");
                fs::remove_dir_all(&path)
                    .map_err(|e| StoreError::io(format!("remove {}", path.display()), e))?;
            }
        }
        Ok(())
    }
}

/// Holds the writer lock on a ref; releases it when dropped.
pub(crate) struct RefLock {
    store: Arc<Store>,
    reference: String,
}

impl Drop for RefLock {
    fn drop(&mut self) {
        self.store
            .locked
            .lock()
            .expect("lock table")
            .remove(&self.reference);
        self.store.unlocked.notify_all();
    }
}

/// Rejects refs that are empty, absurdly long, or carry control characters.
/// Slashes and dots are fine: containerd's refs have them, and a ref never
/// becomes a path (see [`Store::ingest_dir`]).
fn validate_ref(reference: &str) -> Result<(), StoreError> {
    if reference.is_empty() {
        return Err(StoreError::InvalidArgument("empty ref".into()));
    }
    if reference.len() > MAX_REF_LEN {
        return Err(StoreError::InvalidArgument(format!(
            "ref of {} bytes is longer than {MAX_REF_LEN}",
            reference.len()
        )));
    }
    if reference.chars().any(char::is_control) {
        return Err(StoreError::InvalidArgument(format!(
            "ref {reference:?} contains control characters"
        )));
    }
    Ok(())
}

pub(crate) fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

pub(crate) fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_nanos(n.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn commit(store: &Arc<Store>, reference: &str, data: &[u8]) -> Digest {
        let mut ingest = store.writer(reference, 0, None).unwrap();
        ingest.write(0, data).unwrap();
        ingest
            .commit(data.len() as i64, None, HashMap::new())
            .unwrap()
    }

    #[test]
    fn only_the_multi_threaded_runtime_can_reach_the_store() {
        assert!(require_blocking_runtime().is_err(), "outside any runtime");
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let refused = current.block_on(async { require_blocking_runtime() });
        let message = refused.expect_err("a current-thread runtime").to_string();
        assert!(message.contains("current-thread"), "{message}");
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        multi
            .block_on(async { require_blocking_runtime() })
            .unwrap();
    }

    #[test]
    fn piece_records_live_and_die_with_their_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = commit(&store, "r", b"hello");
        let record = PieceRecord {
            size: 5,
            piece_size: 4,
            digests: vec![Digest::of(b"hell"), Digest::of(b"o")],
        };
        assert!(store.record_pieces(&digest, &record).unwrap());
        let unknown = Digest::of(b"never committed");
        assert!(!store.record_pieces(&unknown, &record).unwrap());
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.piece_records().unwrap(),
            vec![(digest.clone(), record)]
        );
        store.delete(&digest).unwrap();
        assert!(store.piece_records().unwrap().is_empty());
    }

    #[test]
    fn committed_manifests_and_configs_map_chain_ids_to_layers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (diff_a, diff_b) = (Digest::of(b"tar a"), Digest::of(b"tar b"));
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff_a}","{diff_b}"]}}}}"#
        );
        let (layer_a, layer_b) = (Digest::of(b"gz a"), Digest::of(b"gz b"));
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_a}","size":4}},
                      {{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_b}","size":4}}]}}"#,
            Digest::of(config.as_bytes()),
            config.len()
        );
        // containerd writes the manifest before the config.
        let manifest_digest = commit(&store, "default/1/manifest-sha256:x", manifest.as_bytes());
        let config_digest = commit(&store, "default/2/config-sha256:y", config.as_bytes());
        commit(&store, "default/3/layer-sha256:z", b"not indexed");
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let chains = image_index::chain_ids(&[diff_a, diff_b.clone()]);
        let found = store
            .image_with_chain(&chains[1])
            .unwrap()
            .expect("indexed");
        assert_eq!(
            (found.manifest.clone(), found.config),
            (manifest_digest.clone(), config_digest)
        );
        assert_eq!(found.position, 1);
        assert_eq!(found.layers[1].digest, layer_b);
        assert_eq!(found.layers[1].diff_id, diff_b);
        assert_eq!(
            found.layers[1].media_type,
            "application/vnd.oci.image.layer.v1.tar"
        );
        assert_eq!(
            store.image_with_chain(&Digest::of(b"unknown")).unwrap(),
            None
        );

        store.delete(&manifest_digest).unwrap();
        assert_eq!(store.image_with_chain(&chains[0]).unwrap(), None);
    }

    #[test]
    fn committed_blobs_are_read_only_and_listed() {
        let (_dir, store) = store();
        let digest = commit(&store, "r", b"hello");
        let path = store.blob_path(&digest);
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o400
        );
        let listed: Vec<_> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|i| i.digest)
            .collect();
        assert_eq!(listed, vec![digest]);
        assert!(store.statuses().unwrap().is_empty(), "the ingest is gone");
    }

    #[test]
    fn reopening_recovers_from_half_made_ingests() {
        let (dir, store) = store();
        let mut ingest = store.writer("kept", 10, None).unwrap();
        ingest.write(0, b"12345").unwrap();
        drop(ingest);
        // A directory without record (crash after mkdir), and a record whose
        // data file is gone (crash between a commit's rename and cleanup).
        fs::create_dir_all(dir.path().join("ingest/orphan")).unwrap();
        let mut lost = store.writer("lost", 0, None).unwrap();
        lost.write(0, b"x").unwrap();
        drop(lost);
        fs::remove_file(store.ingest_dir("lost").join(ingest::DATA_FILE)).unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert!(!dir.path().join("ingest/orphan").exists());
        let statuses = store.statuses().unwrap();
        assert_eq!(statuses.len(), 1);
        assert_eq!(
            (
                statuses[0].reference.as_str(),
                statuses[0].offset,
                statuses[0].total
            ),
            ("kept", 5, 10)
        );
        let mut resumed = store.writer("kept", 10, None).unwrap();
        assert_eq!(resumed.offset(), 5);
        resumed.write(5, b"67890").unwrap();
        let digest = resumed
            .commit(10, Some(&Digest::of(b"1234567890")), HashMap::new())
            .unwrap();
        assert_eq!(fs::read(store.blob_path(&digest)).unwrap(), b"1234567890");
    }

    #[test]
    fn idle_own_ingests_are_aborted_and_hidden_from_no_one_else() {
        let (_dir, store) = store();
        let own = format!("{OWN_REF_PREFIX}fastpath/layer-x");
        let held = format!("{OWN_REF_PREFIX}fastpath/layer-y");
        for reference in [&own, &held, &"k8s.io/1/layer-z".to_owned()] {
            store
                .writer(reference, 10, None)
                .unwrap()
                .write(0, b"12345")
                .unwrap();
        }
        let _writer = store.writer(&held, 10, None).unwrap();
        assert!(
            store
                .abort_idle_own(Duration::from_secs(3600))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.abort_idle_own(Duration::ZERO).unwrap(),
            vec![own.clone()]
        );
        let left: Vec<_> = store
            .statuses()
            .unwrap()
            .into_iter()
            .map(|s| s.reference)
            .collect();
        assert!(!left.contains(&own) && left.contains(&held), "{left:?}");
        assert_eq!(left.len(), 2);
        assert!(is_own_ref(&held) && !is_own_ref("k8s.io/1/layer-z"));
    }

    #[test]
    fn label_updates_replace_or_patch() {
        let (_dir, store) = store();
        let digest = commit(&store, "r", b"labelled");
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        store
            .update_labels(
                &digest,
                LabelUpdate::ReplaceAll(labels(&[("a", "1"), ("b", "2")])),
            )
            .unwrap();
        let info = store
            .update_labels(&digest, LabelUpdate::Keys(labels(&[("a", ""), ("c", "3")])))
            .unwrap();
        assert_eq!(info.labels, labels(&[("b", "2"), ("c", "3")]));
        assert!(info.updated_at >= info.created_at);
        let missing = Digest::of(b"missing");
        assert!(matches!(
            store.update_labels(&missing, LabelUpdate::ReplaceAll(HashMap::new())),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn aborting_frees_a_ref_even_while_it_is_open() {
        let (_dir, store) = store();
        let mut ingest = store.writer("r", 0, None).unwrap();
        ingest.write(0, b"doomed").unwrap();
        store.abort("r").unwrap();
        assert!(matches!(store.status("r"), Err(StoreError::NotFound(_))));
        assert!(
            ingest.commit(0, None, HashMap::new()).is_err(),
            "an aborted ingest cannot commit"
        );
        drop(ingest);
        assert!(
            store.statuses().unwrap().is_empty(),
            "closing does not resurrect it"
        );
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn an_abort_during_a_mesh_download_is_not_undone_by_the_download() {
        let (_dir, store) = store();
        let mut ingest = store.writer("r", 10, None).unwrap();
        ingest.write(0, b"12345").unwrap();
        ingest.begin_out_of_order().unwrap();
        store.abort("r").unwrap();
        for (step, result) in [
            ("advance", ingest.begin_out_of_order()),
            ("end", ingest.end_out_of_order()),
        ] {
            assert!(
                matches!(result, Err(StoreError::NotFound(_))),
                "{step} after the abort: {result:?}"
            );
        }
        drop(ingest);
        assert_eq!(store.meta.ingest("r").unwrap(), None, "no record came back");
        let mut again = store.writer("r", 10, None).unwrap();
        assert_eq!(again.offset(), 0);
        again.write(0, b"1234567890").unwrap();
        again.commit(10, None, HashMap::new()).unwrap();
    }

    #[test]
    fn a_record_without_data_is_repaired_when_its_ref_is_opened() {
        let (_dir, store) = store();
        let mut ingest = store.writer("r", 10, None).unwrap();
        ingest.write(0, b"12345").unwrap();
        drop(ingest);
        // What older versions left: the abort removed record and data, and
        // the download still running wrote the record back.
        let record = store.meta.ingest("r").unwrap().unwrap();
        store.abort("r").unwrap();
        store.meta.put_ingest("r", &record).unwrap();

        let mut repaired = store.writer("r", 10, None).unwrap();
        assert_eq!(repaired.offset(), 0, "started over");
        repaired.write(0, b"1234567890").unwrap();
        let digest = repaired.commit(10, None, HashMap::new()).unwrap();
        assert_eq!(fs::read(store.blob_path(&digest)).unwrap(), b"1234567890");
    }
}
