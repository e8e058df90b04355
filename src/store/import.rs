//! Taking a blob file from outside into the store (containerd's built-in
//! content store, when a node switches to dfdaemon): hard-linked where the
//! file system allows, copied otherwise, its digest verified before it is
//! renamed into `blobs/sha256/` like any committed blob.

use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use nix::errno::Errno;
use sha2::{Digest as _, Sha256};

use super::metadata::BlobMeta;
use super::{Digest, Store, StoreError, ingest, to_nanos};

/// How a blob came into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    /// A second name for the same file: no bytes copied.
    Linked,
    /// Copied (the source is on another file system, or linking is not allowed).
    Copied,
    /// The store already had it.
    Present,
}

impl Store {
    /// Imports the file `source` as blob `digest`, verified: a file whose
    /// bytes do not hash to `digest` is refused with [`StoreError::Corrupt`]
    /// and nothing is kept.
    pub fn import_blob(&self, digest: &Digest, source: &Path) -> Result<Imported, StoreError> {
        let target = self.blob_path(digest);
        if target.exists() {
            return Ok(Imported::Present);
        }
        // Under ingest/ without a record: a crash leaves it for the next
        // open to remove.
        let dir = self
            .root
            .join("ingest")
            .join(format!("import-{}", digest.hex()));
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("remove {}", dir.display()), e)),
        }
        fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        let data = dir.join(ingest::DATA_FILE);
        let result = self.place(digest, source, &data, &target);
        let _ = fs::remove_dir_all(&dir);
        result
    }

    fn place(
        &self,
        digest: &Digest,
        source: &Path,
        data: &Path,
        target: &Path,
    ) -> Result<Imported, StoreError> {
        let how = match fs::hard_link(source, data) {
            Ok(()) => Imported::Linked,
            // Another file system, or fs.protected_hardlinks, or too many links.
            Err(e)
                if [Errno::EXDEV, Errno::EPERM, Errno::EMLINK]
                    .iter()
                    .any(|n| e.raw_os_error() == Some(*n as i32)) =>
            {
                copy(source, data)?;
                Imported::Copied
            }
            Err(e) => {
                return Err(StoreError::io(
                    format!("link {} to {}", source.display(), data.display()),
                    e,
                ));
            }
        };
        let actual = hash_file(data)?;
        if actual != *digest {
            return Err(StoreError::Corrupt(format!(
                "{} holds {actual}, not {digest}",
                source.display()
            )));
        }
        if how == Imported::Copied {
            fs::set_permissions(data, Permissions::from_mode(0o444))
                .map_err(|e| StoreError::io(format!("make {} read-only", data.display()), e))?;
        }
        let now = to_nanos(SystemTime::now());
        self.meta.put_blob(
            &digest.to_string(),
            &BlobMeta {
                created_at: now,
                updated_at: now,
                labels: Default::default(),
            },
        )?;
        fs::rename(data, target).map_err(|e| {
            StoreError::io(
                format!("rename {} to {}", data.display(), target.display()),
                e,
            )
        })?;
        File::open(target.parent().expect("blob path has a parent"))
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io("sync blobs/sha256", e))?;
        Ok(how)
    }
}

fn copy(source: &Path, data: &Path) -> Result<(), StoreError> {
    let mut from =
        File::open(source).map_err(|e| StoreError::io(format!("open {}", source.display()), e))?;
    let mut to =
        File::create(data).map_err(|e| StoreError::io(format!("create {}", data.display()), e))?;
    io::copy(&mut from, &mut to)
        .and_then(|_| to.flush())
        .and_then(|()| to.sync_all())
        .map_err(|e| {
            StoreError::io(
                format!("copy {} to {}", source.display(), data.display()),
                e,
            )
        })
}

fn hash_file(path: &Path) -> Result<Digest, StoreError> {
    let mut file =
        File::open(path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Ok(Digest::from_hasher(hasher));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_verified_blobs_and_refuses_wrong_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let source = dir.path().join("blob");
        fs::write(&source, b"hello").unwrap();
        let digest = Digest::of(b"hello");
        assert_eq!(
            store.import_blob(&digest, &source).unwrap(),
            Imported::Linked
        );
        assert_eq!(
            store.import_blob(&digest, &source).unwrap(),
            Imported::Present
        );
        assert_eq!(fs::read(store.blob_path(&digest)).unwrap(), b"hello");
        assert_eq!(store.info(&digest).unwrap().size, 5);

        let wrong = Digest::of(b"other");
        assert!(matches!(
            store.import_blob(&wrong, &source),
            Err(StoreError::Corrupt(_))
        ));
        assert!(!store.blob_path(&wrong).exists());
        assert_eq!(
            fs::read_dir(dir.path().join("store/ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
