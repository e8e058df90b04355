//! `dfdaemon import-content`: brings the blobs of containerd's built-in
//! content store (`<containerd root>/io.containerd.content.v1.content/blobs/sha256/<hex>`)
//! into dfdaemon's store before containerd is switched to it, so every
//! image on the node stays complete. Each blob is hard-linked where the file
//! systems allow (no bytes copied, no space used twice) and copied
//! otherwise, and its digest is verified either way ([`Store::import_blob`]).
//! Only names that parse as SHA-256 digests become paths; anything else in
//! the directory (other algorithms, temp files, symlinks) is skipped and
//! counted.
//!
//! containerd keeps its images' records and snapshots: the old overlayfs
//! snapshots keep serving the containers that run on them, and new
//! containers are unpacked into dfdaemon's snapshotter from the imported
//! blobs. Ingests in progress in the old store are not imported (a pull
//! then in flight is retried by its client).

use std::fs;
use std::path::Path;

use anyhow::Context;

use crate::store::{Digest, Imported, Store};

/// The built-in content store under containerd's default root.
pub const CONTAINERD_CONTENT: &str = "/var/lib/containerd/io.containerd.content.v1.content";

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub linked: usize,
    pub copied: usize,
    /// Already in dfdaemon's store.
    pub present: usize,
    /// Entries that are not SHA-256 blob files.
    pub skipped: usize,
    /// Bytes of the blobs linked or copied.
    pub bytes: u64,
}

/// Imports every blob of the content store at `from` (the directory that
/// holds `blobs/`) into `store`. A blob whose bytes do not match its name
/// fails the import: containerd's store is damaged, and the switch should
/// not go on as if every image were complete.
pub fn import_content(from: &Path, store: &Store) -> anyhow::Result<ImportReport> {
    let mut report = ImportReport::default();
    let blobs = from.join("blobs");
    let algorithms = match fs::read_dir(&blobs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(e).with_context(|| format!("list {}", blobs.display())),
    };
    for algorithm in algorithms {
        let algorithm = algorithm.with_context(|| format!("list {}", blobs.display()))?;
        if algorithm.file_name() != "sha256" {
            tracing::warn!(path = %algorithm.path().display(), "not a sha256 dir: skipped");
            report.skipped += 1;
            continue;
        }
        let dir = algorithm.path();
        for entry in fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
            let entry = entry.with_context(|| format!("list {}", dir.display()))?;
            let path = entry.path();
            let digest = entry
                .file_name()
                .to_str()
                .and_then(|name| format!("sha256:{name}").parse::<Digest>().ok());
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            let Some(digest) = digest.filter(|_| is_file) else {
                tracing::warn!(path = %path.display(), "not a blob file: skipped");
                report.skipped += 1;
                continue;
            };
            let how = store
                .import_blob(&digest, &path)
                .with_context(|| format!("import {}", path.display()))?;
            let size = || fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match how {
                Imported::Linked => {
                    report.linked += 1;
                    report.bytes += size();
                }
                Imported::Copied => {
                    report.copied += 1;
                    report.bytes += size();
                }
                Imported::Present => report.present += 1,
            }
            tracing::debug!(%digest, ?how, "imported");
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_blobs_and_skips_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("content");
        let sha = from.join("blobs/sha256");
        fs::create_dir_all(&sha).unwrap();
        fs::create_dir_all(from.join("blobs/sha512")).unwrap();
        let digest = Digest::of(b"layer");
        fs::write(sha.join(digest.hex()), b"layer").unwrap();
        fs::write(sha.join("../../x"), b"outside").unwrap();
        fs::write(sha.join("not-a-digest"), b"junk").unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();

        let report = import_content(&from, &store).unwrap();
        assert_eq!((report.linked, report.skipped, report.bytes), (1, 2, 5));
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(import_content(&from, &store).unwrap().present, 1);

        fs::write(sha.join(Digest::of(b"claimed").hex()), b"actual").unwrap();
        let err = format!("{:#}", import_content(&from, &store).unwrap_err());
        assert!(err.contains("not sha256:"), "{err}");
    }
}
