//! Directories being made: `new-<n>` under the snapshots directory, listed in
//! no metadata, each owned by a [`Staging`] that removes it unless it was
//! renamed into place. The set of live names tells Cleanup which `new-`
//! directories are in use and which a crash left behind.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::SnapshotError;

/// Prefix of the directories being made.
pub const STAGING_PREFIX: &str = "new-";

/// Hands out staging directories and remembers which are live.
#[derive(Default)]
pub struct Stager {
    next: AtomicU64,
    live: Arc<Mutex<HashSet<String>>>,
}

impl Stager {
    /// A new directory under `root` with an empty `fs` (mode 0755) and,
    /// with `work`, an empty `work` (0711), the layout of a snapshot.
    pub fn stage(&self, root: &Path, work: bool) -> Result<Staging, SnapshotError> {
        let name = format!(
            "{STAGING_PREFIX}{}",
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        self.live.lock().expect("live set").insert(name.clone());
        // From here on, dropping the Staging undoes everything.
        let staging = Staging {
            dir: root.join(&name),
            name,
            live: self.live.clone(),
            kept: false,
        };
        make_dir(&staging.dir, 0o700)?;
        make_dir(&staging.fs(), 0o755)?;
        if work {
            make_dir(&staging.dir.join("work"), 0o711)?;
        }
        Ok(staging)
    }

    /// Whether `name` is the directory of a live [`Staging`].
    pub fn is_live(&self, name: &str) -> bool {
        self.live.lock().expect("live set").contains(name)
    }
}

/// Makes `dir` with exactly `mode`, whatever the umask.
fn make_dir(dir: &Path, mode: u32) -> Result<(), SnapshotError> {
    let context = || format!("create {}", dir.display());
    fs::create_dir(dir).map_err(|e| SnapshotError::io(context(), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| SnapshotError::io(context(), e))
}

/// A directory being made into a snapshot; removed on drop unless kept.
pub struct Staging {
    dir: PathBuf,
    name: String,
    live: Arc<Mutex<HashSet<String>>>,
    kept: bool,
}

impl Staging {
    /// The directory that becomes the snapshot's contents.
    pub fn fs(&self) -> PathBuf {
        self.dir.join("fs")
    }

    /// Moves the directory to `dest`; dropped unkept, it is removed there.
    pub(super) fn rename_to(&mut self, dest: PathBuf) -> Result<(), SnapshotError> {
        fs::rename(&self.dir, &dest).map_err(|e| {
            SnapshotError::io(
                format!("rename {} to {}", self.dir.display(), dest.display()),
                e,
            )
        })?;
        self.dir = dest;
        Ok(())
    }

    /// The directory is in place for good.
    pub(super) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.kept {
            remove_all(&self.dir);
        }
        self.live.lock().expect("live set").remove(&self.name);
    }
}

/// Removes a directory tree; one already gone is fine, a failure is logged
/// (Cleanup tries again).
pub fn remove_all(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_unkept_it_is_removed_and_no_longer_live() {
        let root = tempfile::tempdir().unwrap();
        let stager = Stager::default();
        let staging = stager.stage(root.path(), true).unwrap();
        let dir = staging.dir.clone();
        assert!(stager.is_live(&staging.name));
        let mode = fs::metadata(staging.fs()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(dir.join("work").is_dir());
        let name = staging.name.clone();
        drop(staging);
        assert!(!dir.exists());
        assert!(!stager.is_live(&name));
    }

    #[test]
    fn kept_it_stays_where_it_was_renamed() {
        let root = tempfile::tempdir().unwrap();
        let stager = Stager::default();
        let mut staging = stager.stage(root.path(), false).unwrap();
        let dest = root.path().join("7");
        staging.rename_to(dest.clone()).unwrap();
        staging.keep();
        assert!(dest.join("fs").is_dir());
        assert!(!dest.join("work").exists());
    }
}
