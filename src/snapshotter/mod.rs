//! containerd's snapshotter on overlayfs: the file systems containers run
//! on, as a chain of committed layers under an active (writable) or view
//! (read-only) snapshot, with the semantics of containerd's overlay
//! snapshotter. Synchronous: callers on a tokio runtime wrap calls in
//! `block_in_place`.
//!
//! Layout under `DATA_DIR/snapshots/` (that of containerd's overlay snapshotter):
//! - `<id>/fs`: a snapshot's contents (the overlay upper dir of an active
//!   one) and `<id>/work`: the overlay work dir of an active one;
//! - `new-<n>`: directories being made, renamed to `<id>` inside the
//!   metadata transaction that records them;
//! - `metadata.redb`: names, kinds, parents, labels, times, usage.
//!
//! Keys and names are opaque strings (containerd's are
//! `<namespace>/<seq>/<name>`): they are only checked for length and never
//! make a path; directories are named by numeric ids. Whatever a crash
//! leaves (a `new-` directory, an `<id>` no record names) is removed by
//! [`Snapshotter::open`] and [`Snapshotter::cleanup`].

mod metadata;
mod mounts;
mod remote;
mod staging;
mod usage;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::store::{LabelUpdate, from_nanos, to_nanos};
use metadata::{Metadata, Record};
pub use mounts::Mount;
pub use remote::RemoteLayers;
pub use staging::Staging;
use staging::{STAGING_PREFIX, Stager, remove_all};
pub use usage::Usage;

/// Longest key or name accepted; containerd's are far shorter.
pub const MAX_KEY_LEN: usize = 4096;
/// The label containerd's remote-snapshotter protocol names a layer with.
pub const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";

/// What a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only, over a committed parent; never committed.
    View,
    /// Writable; committing it makes a committed snapshot.
    Active,
    /// Read-only; the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Active => "active",
            Self::Committed => "committed",
        }
    }
}

/// A snapshot as the snapshotter describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub name: String,
    /// "" for none.
    pub parent: String,
    pub kind: Kind,
    pub labels: HashMap<String, String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// Errors of the snapshotter, one variant per gRPC status class they map to.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("snapshot database: {0}")]
    Database(String),
    #[error("corrupt snapshot metadata: {0}")]
    Corrupt(String),
}

impl SnapshotError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The snapshotter of one data directory.
pub struct Snapshotter {
    /// `DATA_DIR/snapshots`.
    root: PathBuf,
    meta: Metadata,
    stager: Stager,
}

impl Snapshotter {
    /// Opens the snapshotter of `data_dir`, creating it if needed, and
    /// removes what a crash may have left half-made.
    pub fn open(data_dir: &Path) -> Result<Self, SnapshotError> {
        let root = data_dir.join("snapshots");
        check_mountable(&root)?;
        fs::create_dir_all(&root)
            .and_then(|()| fs::set_permissions(&root, fs::Permissions::from_mode(0o700)))
            .map_err(|e| SnapshotError::io(format!("create {}", root.display()), e))?;
        let db = root.join("metadata.redb");
        let meta = Metadata::open(&db)?;
        fs::set_permissions(&db, fs::Permissions::from_mode(0o600))
            .map_err(|e| SnapshotError::io(format!("make {} mode 0600", db.display()), e))?;
        let snapshotter = Self {
            meta,
            root,
            stager: Stager::default(),
        };
        snapshotter.cleanup()?;
        Ok(snapshotter)
    }

    /// Creates the active snapshot `key` over committed `parent` ("" for none).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates the read-only snapshot `key` of committed `parent` ("" for none).
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::View, key, parent, labels)
    }

    /// The mounts of active or view snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let chain = self.meta.chain(key)?;
        let record = &chain[0];
        if record.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed: mount a view of it"
            )));
        }
        Ok(self.mounts_of(record.kind, record.id, &chain[1..]))
    }

    /// Makes active snapshot `key` the committed snapshot `name`, with
    /// `labels` (the active one's are not kept), measuring its usage.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        validate_key(name)?;
        let active = self.get(key)?;
        if active.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is {}, not active",
                active.kind.as_str()
            )));
        }
        let usage = self.measure(active.id)?;
        let now = to_nanos(SystemTime::now());
        self.meta.write(|tx| {
            let current = tx
                .get(key)?
                .ok_or_else(|| SnapshotError::NotFound(key.into()))?;
            if current.id != active.id || current.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} changed while it was being committed"
                )));
            }
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.into()));
            }
            tx.remove(key)?;
            tx.put(
                name,
                &Record {
                    kind: Kind::Committed,
                    labels,
                    created_at: now,
                    updated_at: now,
                    usage,
                    ..current
                },
            )
        })
    }

    /// Removes snapshot `key`, which must have no children.
    pub fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let id = self.meta.write(|tx| {
            let record = tx
                .get(key)?
                .ok_or_else(|| SnapshotError::NotFound(key.into()))?;
            if tx.has_children(record.id)? {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: other snapshots are based on it"
                )));
            }
            tx.remove(key)?;
            if let Some(parent) = tx.chain(&record.parent)?.first() {
                tx.unlink(parent.id, record.id)?;
            }
            Ok(record.id)
        })?;
        // Forgotten first: if this fails or is cut short, Cleanup finishes it.
        remove_all(&self.dir(id));
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        Ok(info(key.to_owned(), self.get(key)?))
    }

    /// Changes the labels of snapshot `name` (its only mutable field).
    pub fn update(&self, name: &str, update: LabelUpdate) -> Result<Info, SnapshotError> {
        let now = to_nanos(SystemTime::now());
        let record = self.meta.write(|tx| {
            let mut record = tx
                .get(name)?
                .ok_or_else(|| SnapshotError::NotFound(name.into()))?;
            update.apply(&mut record.labels);
            record.updated_at = now;
            tx.put(name, &record)?;
            Ok(record)
        })?;
        Ok(info(name.to_owned(), record))
    }

    /// Every snapshot, in name order.
    pub fn list(&self) -> Result<Vec<Info>, SnapshotError> {
        Ok(self
            .meta
            .all()?
            .into_iter()
            .map(|(name, record)| info(name, record))
            .collect())
    }

    /// What snapshot `key` takes: measured now for an active one, as
    /// measured at commit for a committed one, nothing for a view.
    pub fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let record = self.get(key)?;
        match record.kind {
            Kind::Active => self.measure(record.id),
            Kind::View | Kind::Committed => Ok(record.usage),
        }
    }

    /// Removes the directories no snapshot owns: left by a crash, by a
    /// removal that failed, or by a staging that is no longer live.
    pub fn cleanup(&self) -> Result<(), SnapshotError> {
        let context = || format!("list {}", self.root.display());
        // In a write transaction: no directory is being renamed into place
        // meanwhile, so every `<id>` without a record is an orphan.
        let doomed = self.meta.write(|tx| {
            let ids = tx.ids()?;
            let mut doomed = Vec::new();
            for entry in fs::read_dir(&self.root).map_err(|e| SnapshotError::io(context(), e))? {
                let entry = entry.map_err(|e| SnapshotError::io(context(), e))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let orphan = match dir_id(&name) {
                    Some(id) => !ids.contains(&id),
                    None => name.starts_with(STAGING_PREFIX) && !self.stager.is_live(&name),
                };
                if orphan {
                    doomed.push(entry.path());
                }
            }
            Ok(doomed)
        })?;
        for dir in doomed {
            tracing::info!(dir = %dir.display(), "removing orphaned snapshot directory");
            remove_all(&dir);
        }
        Ok(())
    }

    /// Name of a committed snapshot with label snapshot.ref == target and this parent ("" = none).
    pub fn find_committed(
        &self,
        target: &str,
        parent: &str,
    ) -> Result<Option<String>, SnapshotError> {
        Ok(self
            .meta
            .all()?
            .into_iter()
            .find(|(_, record)| {
                record.kind == Kind::Committed
                    && record.parent == parent
                    && record.labels.get(SNAPSHOT_REF_LABEL).map(String::as_str) == Some(target)
            })
            .map(|(name, _)| name))
    }

    /// A new empty directory (`staging.fs()`) to unpack into, listed nowhere; removed when the
    /// Staging is dropped uncommitted, and by open/Cleanup after a crash.
    pub fn stage(&self) -> Result<Staging, SnapshotError> {
        self.stager.stage(&self.root, false)
    }

    /// Makes `staging` the committed snapshot `name` (parent "" or a committed snapshot), with labels;
    /// AlreadyExists if `name` exists. Atomic: either it is fully there or not at all.
    pub fn commit_staged(
        &self,
        staging: Staging,
        name: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        validate_key(name)?;
        let fs = staging.fs();
        let usage = usage::disk_usage(&fs)
            .map_err(|e| SnapshotError::io(format!("measure {}", fs.display()), e))?;
        self.insert(staging, name, parent, Kind::Committed, labels, usage)?;
        Ok(())
    }

    /// The fs dirs of committed snapshot `name` and its ancestors, nearest
    /// first (what a child's lowerdir lists).
    pub fn lower_dirs(&self, name: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        let chain = self.meta.chain(name)?;
        if chain[0].kind != Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {name} is {}, not committed",
                chain[0].kind.as_str()
            )));
        }
        Ok(chain.iter().map(|record| self.fs_dir(record.id)).collect())
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        validate_key(key)?;
        let staging = self.stager.stage(&self.root, kind == Kind::Active)?;
        let (id, parents) = self.insert(staging, key, parent, kind, labels, Usage::default())?;
        Ok(self.mounts_of(kind, id, &parents))
    }

    /// Records `staging` as snapshot `name` of kind `kind` and renames it
    /// into place, in one transaction; returns its id and its ancestors'
    /// records, nearest first. A snapshot created empty (not committed
    /// from an unpack) takes the owner of its parent's root, as
    /// containerd's overlay snapshotter does.
    fn insert(
        &self,
        mut staging: Staging,
        name: &str,
        parent: &str,
        kind: Kind,
        labels: HashMap<String, String>,
        usage: Usage,
    ) -> Result<(u64, Vec<Record>), SnapshotError> {
        let now = to_nanos(SystemTime::now());
        let inserted = self.meta.write(|tx| {
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.into()));
            }
            let parents = tx.chain(parent).map_err(|e| match e {
                SnapshotError::NotFound(_) => SnapshotError::NotFound(format!("parent {parent}")),
                e => e,
            })?;
            let id = tx.next_id()?;
            if let Some(nearest) = parents.first() {
                if nearest.kind != Kind::Committed {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "parent {parent} is {}, not committed",
                        nearest.kind.as_str()
                    )));
                }
                tx.link(nearest.id, id)?;
                if kind != Kind::Committed {
                    copy_owner(&self.fs_dir(nearest.id), &staging.fs())?;
                }
            }
            tx.put(
                name,
                &Record {
                    id,
                    kind,
                    parent: parent.to_owned(),
                    labels,
                    created_at: now,
                    updated_at: now,
                    usage,
                },
            )?;
            staging.rename_to(self.dir(id))?;
            Ok((id, parents))
        })?;
        staging.keep();
        Ok(inserted)
    }

    fn get(&self, key: &str) -> Result<Record, SnapshotError> {
        self.meta
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.into()))
    }

    fn mounts_of(&self, kind: Kind, id: u64, parents: &[Record]) -> Vec<Mount> {
        let lowers: Vec<PathBuf> = parents.iter().map(|p| self.fs_dir(p.id)).collect();
        mounts::mounts(kind, &self.fs_dir(id), &self.dir(id).join("work"), &lowers)
    }

    fn measure(&self, id: u64) -> Result<Usage, SnapshotError> {
        let fs = self.fs_dir(id);
        usage::disk_usage(&fs)
            .map_err(|e| SnapshotError::io(format!("measure {}", fs.display()), e))
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }
}

fn validate_key(key: &str) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument("empty snapshot key".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(SnapshotError::InvalidArgument(format!(
            "snapshot key of {} bytes is longer than {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

/// Mount options name paths under `root`, separated by `,` and `:`: refuse
/// a root that cannot be spelled in them.
fn check_mountable(root: &Path) -> Result<(), SnapshotError> {
    match root.to_str() {
        Some(path) if !path.contains([',', ':']) => Ok(()),
        _ => Err(SnapshotError::InvalidArgument(format!(
            "{} cannot be named in mount options (not UTF-8, or has ',' or ':')",
            root.display()
        ))),
    }
}

/// The id a snapshot directory is named by: only digits.
fn dir_id(name: &str) -> Option<u64> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

/// Gives `dir` the owner and group of `like`.
fn copy_owner(like: &Path, dir: &Path) -> Result<(), SnapshotError> {
    let owner =
        fs::metadata(like).map_err(|e| SnapshotError::io(format!("stat {}", like.display()), e))?;
    std::os::unix::fs::lchown(dir, Some(owner.uid()), Some(owner.gid()))
        .map_err(|e| SnapshotError::io(format!("chown {}", dir.display()), e))
}

fn info(name: String, record: Record) -> Info {
    Info {
        name,
        parent: record.parent,
        kind: record.kind,
        labels: record.labels,
        created_at: from_nanos(record.created_at),
        updated_at: from_nanos(record.updated_at),
    }
}

#[cfg(test)]
mod tests;
