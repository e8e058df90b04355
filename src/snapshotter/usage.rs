//! Disk usage of a snapshot's `fs` directory: bytes allocated and inodes,
//! each inode counted once however many hard links it has.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Resources a snapshot takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated on disk.
    pub size: i64,
    pub inodes: i64,
}

/// Walks `dir` (not following symlinks) and adds up what it takes.
pub fn disk_usage(dir: &Path) -> io::Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut pending: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path)?;
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += (meta.blocks() * 512) as i64;
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_inodes_once_and_allocated_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let empty = disk_usage(dir.path()).unwrap();
        assert_eq!(empty.inodes, 1);
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/f"), vec![1u8; 64 << 10]).unwrap();
        fs::hard_link(dir.path().join("d/f"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/nowhere", dir.path().join("sym")).unwrap();
        let usage = disk_usage(dir.path()).unwrap();
        assert_eq!(usage.inodes, 4, "root, d, f (twice linked), sym");
        assert!(usage.size >= empty.size + (64 << 10), "{usage:?}");
    }
}
