//! Writes in progress: one locked, resumable ingest per ref, turned into a
//! committed blob only after its size and digest are verified and its bytes
//! are on disk.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use super::metadata::{BlobMeta, IngestMeta};
use super::{Digest, RefLock, Store, StoreError, from_nanos, to_nanos};

/// Name of the data file inside an ingest directory.
pub(crate) const DATA_FILE: &str = "data";

/// Buffer used to re-hash an ingest's bytes when it is resumed.
const REHASH_CHUNK: usize = 1 << 20;

/// The state of an ingest, as containerd's `Status` message carries it.
#[derive(Clone, Debug, PartialEq)]
pub struct IngestStatus {
    pub reference: String,
    pub offset: i64,
    pub total: i64,
    pub expected: String,
    pub started_at: SystemTime,
    pub updated_at: SystemTime,
}

/// An open writer on one ref; holds the ref's lock until dropped.
pub struct Ingest {
    lock: RefLock,
    /// `None` once committed.
    file: Option<File>,
    hasher: Sha256,
    offset: i64,
    meta: IngestMeta,
    updated_at: SystemTime,
    /// Written since opened: the write time must be recorded on close.
    dirty: bool,
}

impl Ingest {
    /// Resumes the ingest of the locked ref, or starts a new one.
    pub(crate) fn open(
        lock: RefLock,
        total: i64,
        expected: Option<Digest>,
    ) -> Result<Self, StoreError> {
        let store = &lock.store;
        let reference = lock.reference.as_str();
        let dir = store.ingest_dir(reference);
        let data = dir.join(DATA_FILE);
        let expected = expected.map(|d| d.to_string()).unwrap_or_default();
        let (file, mut meta) = match record_with_data(store, reference)? {
            Some(mut meta) => {
                if total > 0 && meta.total > 0 && total != meta.total {
                    return Err(StoreError::FailedPrecondition(format!(
                        "ref {reference}: provided total {total} differs from the ingest's {}",
                        meta.total
                    )));
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&data)
                    .map_err(|e| StoreError::io(format!("open {}", data.display()), e))?;
                if (total > 0 && meta.total == 0)
                    || (!expected.is_empty() && meta.expected != expected)
                {
                    meta.total = meta.total.max(total);
                    if !expected.is_empty() {
                        meta.expected = expected;
                    }
                    rewrite_record(store, reference, &meta)?;
                }
                (file, meta)
            }
            None => {
                super::private_dir(&dir)?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .mode(0o600)
                    .truncate(true)
                    .open(&data)
                    .map_err(|e| StoreError::io(format!("create {}", data.display()), e))?;
                let now = to_nanos(SystemTime::now());
                let meta = IngestMeta {
                    total,
                    expected,
                    started_at: now,
                    updated_at: now,
                    verified_until: None,
                };
                store.meta.put_ingest(reference, &meta)?;
                (file, meta)
            }
        };
        if let Some(verified) = meta.verified_until.take() {
            // A crash interrupted a mesh download: drop every piece written
            // out of order, keep the verified prefix.
            tracing::warn!(%reference, verified, "cutting an interrupted mesh download back to its verified prefix");
            file.set_len(verified as u64)
                .map_err(|e| StoreError::io(format!("truncate {}", data.display()), e))?;
            rewrite_record(store, reference, &meta)?;
        }
        let (mut hasher, mut offset) = rehash(&file, &data)?;
        if let Some(digest) = digest_in_ref(reference)
            && meta.total > 0
            && offset == meta.total
            && Digest::from_hasher(hasher.clone()) != digest
        {
            // Complete but wrong (e.g. bytes lost in a power cut): it could
            // never commit, and containerd would retry it forever.
            tracing::warn!(%reference, "complete ingest does not match the digest in its ref: starting it over");
            file.set_len(0)
                .map_err(|e| StoreError::io(format!("truncate {}", data.display()), e))?;
            (&file)
                .rewind()
                .map_err(|e| StoreError::io(format!("rewind {}", data.display()), e))?;
            (hasher, offset) = (Sha256::new(), 0);
        }
        if offset > 0 {
            tracing::info!(%reference, offset, total = meta.total, "resuming ingest");
        }
        let updated_at = last_write(&data, &meta)?;
        Ok(Self {
            lock,
            file: Some(file),
            hasher,
            offset,
            meta,
            updated_at,
            dirty: false,
        })
    }

    pub fn reference(&self) -> &str {
        &self.lock.reference
    }

    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The digest of the bytes written so far.
    pub fn digest(&self) -> Digest {
        Digest::from_hasher(self.hasher.clone())
    }

    pub fn status(&self) -> IngestStatus {
        IngestStatus {
            reference: self.reference().to_owned(),
            offset: self.offset,
            total: self.meta.total,
            expected: self.meta.expected.clone(),
            started_at: from_nanos(self.meta.started_at),
            updated_at: self.updated_at,
        }
    }

    /// Appends `data` at `offset`, with containerd's rules: a non-zero offset
    /// must be the current one; offset 0 on a non-empty ingest starts it over.
    pub fn write(&mut self, offset: i64, data: &[u8]) -> Result<(), StoreError> {
        if offset > 0 && offset != self.offset {
            return Err(StoreError::OutOfRange(format!(
                "write at {offset} must occur at current offset {}",
                self.offset
            )));
        }
        if offset == 0 && self.offset > 0 {
            self.truncate()?;
        }
        if data.is_empty() {
            return Ok(());
        }
        let hashed = self.offset as u64;
        let file = self.open_file()?;
        if let Err(e) = file.write_all(data) {
            // Leave the file exactly as long as what we have hashed, so the
            // ingest stays resumable (e.g. after ENOSPC).
            let rollback = file
                .set_len(hashed)
                .and_then(|()| file.seek(io::SeekFrom::Start(hashed)));
            let context = format!("write ingest of ref {}", self.reference());
            return match rollback {
                Ok(_) => Err(StoreError::io(context, e)),
                Err(r) => Err(StoreError::io(format!("{context} (and roll back: {r})"), e)),
            };
        }
        self.hasher.update(data);
        self.offset += data.len() as i64;
        self.touch();
        Ok(())
    }

    /// Empties the ingest.
    pub fn truncate(&mut self) -> Result<(), StoreError> {
        let context = format!("truncate ingest of ref {}", self.reference());
        let file = self.open_file()?;
        file.set_len(0).map_err(|e| StoreError::io(&context, e))?;
        file.rewind().map_err(|e| StoreError::io(&context, e))?;
        self.hasher = Sha256::new();
        self.offset = 0;
        self.touch();
        Ok(())
    }

    /// Path of the ingest's data file (it moves when committed).
    pub fn data_path(&self) -> std::path::PathBuf {
        self.lock
            .store
            .ingest_dir(&self.lock.reference)
            .join(DATA_FILE)
    }

    /// The ingest's data file, for writing pieces at their offsets while a
    /// mesh download runs (see [`Ingest::begin_out_of_order`]).
    pub fn data_file(&mut self) -> Result<File, StoreError> {
        let reference = self.reference().to_owned();
        self.open_file()?
            .try_clone()
            .map_err(|e| StoreError::io(format!("reopen ingest of ref {reference}"), e))
    }

    /// Marks the start of out-of-order writes past the current offset: if
    /// the process dies before [`Ingest::end_out_of_order`], reopening the
    /// ingest cuts it back to what was verified.
    pub fn begin_out_of_order(&mut self) -> Result<(), StoreError> {
        self.meta.verified_until = Some(self.offset);
        rewrite_record(&self.lock.store, &self.lock.reference, &self.meta)
    }

    /// Takes the bytes up to `verified` (written through [`Ingest::data_file`]
    /// and verified piece by piece) as the ingest's content.
    pub fn adopt(&mut self, verified: i64) -> Result<(), StoreError> {
        if verified <= self.offset {
            return Ok(());
        }
        let reference = self.reference().to_owned();
        let mut buf = vec![0u8; REHASH_CHUNK];
        let mut at = self.offset;
        let file = self.data_file()?;
        while at < verified {
            let n = REHASH_CHUNK.min((verified - at) as usize);
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf[..n], at as u64)
                .map_err(|e| StoreError::io(format!("read back ingest of ref {reference}"), e))?;
            self.hasher.update(&buf[..n]);
            at += n as i64;
        }
        self.offset = verified;
        self.touch();
        Ok(())
    }

    /// Ends out-of-order writes: drops whatever lies past the verified
    /// offset and clears the crash marker.
    pub fn end_out_of_order(&mut self) -> Result<(), StoreError> {
        let offset = self.offset;
        let reference = self.reference().to_owned();
        let file = self.open_file()?;
        file.set_len(offset as u64)
            .and_then(|()| file.seek(io::SeekFrom::Start(offset as u64)).map(drop))
            .map_err(|e| StoreError::io(format!("cut ingest of ref {reference}"), e))?;
        self.meta.verified_until = None;
        rewrite_record(&self.lock.store, &self.lock.reference, &self.meta)
    }

    fn touch(&mut self) {
        self.updated_at = SystemTime::now();
        self.dirty = true;
    }

    /// Verifies and commits the ingest as a blob with `labels`. `size` (when
    /// positive) and `expected` (when given) must match what was written.
    /// On a mismatch nothing is committed and the ingest stays as it was.
    pub fn commit(
        &mut self,
        size: i64,
        expected: Option<&Digest>,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<Digest, StoreError> {
        if size > 0 && size != self.offset {
            return Err(StoreError::FailedPrecondition(format!(
                "unexpected commit size {}, expected {size}",
                self.offset
            )));
        }
        let digest = self.digest();
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StoreError::FailedPrecondition(format!(
                "unexpected commit digest {digest}, expected {expected}"
            )));
        }
        let store = self.lock.store.clone();
        let reference = self.reference().to_owned();
        if store.meta.ingest(&reference)?.is_none() {
            return Err(StoreError::NotFound(format!("ref {reference} (aborted)")));
        }
        let file = self.open_file()?;
        file.sync_all()
            .map_err(|e| StoreError::io(format!("sync ingest of ref {reference}"), e))?;
        let target = store.blob_path(&digest);
        if target.exists() {
            self.file = None;
            store.remove_ingest(&reference)?;
            return Err(StoreError::AlreadyExists(format!("content {digest}")));
        }
        let data = store.ingest_dir(&reference).join(DATA_FILE);
        fs::set_permissions(&data, Permissions::from_mode(0o400))
            .map_err(|e| StoreError::io(format!("make {} read-only", data.display()), e))?;
        // The record first: a crash before the rename leaves a record without
        // a blob, which nobody sees; the other order could lose the labels.
        let now = to_nanos(SystemTime::now());
        store.meta.put_blob(
            &digest.to_string(),
            &BlobMeta {
                created_at: now,
                updated_at: now,
                labels,
            },
        )?;
        fs::rename(&data, &target).map_err(|e| {
            StoreError::io(
                format!("rename {} to {}", data.display(), target.display()),
                e,
            )
        })?;
        sync_dir(target.parent().expect("blob path has a parent"))?;
        self.file = None;
        store.remove_ingest(&reference)?;
        store.index_committed(&reference, &digest);
        Ok(digest)
    }

    fn open_file(&mut self) -> Result<&mut File, StoreError> {
        let reference = &self.lock.reference;
        self.file.as_mut().ok_or_else(|| {
            StoreError::FailedPrecondition(format!("ref {reference} is already committed"))
        })
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if self.file.is_some() && self.dirty {
            let reference = self.reference();
            if let Err(e) = self
                .lock
                .store
                .meta
                .touch_ingest(reference, to_nanos(self.updated_at))
            {
                tracing::warn!(%reference, error = %e, "could not record the ingest's write time");
            }
        }
    }
}

/// The record of the ingest of `reference`, if it has one and its data file
/// exists. A record without data is dropped here, on first use, so that the
/// ingest starts over instead of failing every open until a restart.
fn record_with_data(store: &Store, reference: &str) -> Result<Option<IngestMeta>, StoreError> {
    let Some(meta) = store.meta.ingest(reference)? else {
        return Ok(None);
    };
    Ok((!store.drop_ingest_without_data(reference)?).then_some(meta))
}

/// Writes an open ingest's record back, unless an abort removed it (and its
/// data) meanwhile: then the ingest is gone, and writing to it fails.
fn rewrite_record(store: &Store, reference: &str, meta: &IngestMeta) -> Result<(), StoreError> {
    if store
        .meta
        .update_ingest(reference, |record| *record = meta.clone())?
    {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!("ref {reference} (aborted)")))
    }
}

/// The digest a containerd ref names, as in `<ns>/<seq>/layer-sha256:<hex>`.
pub fn digest_in_ref(reference: &str) -> Option<Digest> {
    let last = reference.rsplit('/').next()?;
    let start = last.find("sha256:")?;
    last[start..].parse().ok()
}

/// The status of an ingest that may not be open, from its record and file.
pub(crate) fn status_of(
    dir: &Path,
    reference: &str,
    meta: &IngestMeta,
) -> Result<IngestStatus, StoreError> {
    let data = dir.join(DATA_FILE);
    let stat = match fs::metadata(&data) {
        Ok(stat) => stat,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NotFound(format!("ref {reference}")));
        }
        Err(e) => return Err(StoreError::io(format!("stat {}", data.display()), e)),
    };
    Ok(IngestStatus {
        reference: reference.to_owned(),
        offset: stat.len() as i64,
        total: meta.total,
        expected: meta.expected.clone(),
        started_at: from_nanos(meta.started_at),
        updated_at: last_write(&data, meta)?,
    })
}

/// Hashes what an ingest already holds and leaves the file positioned at its
/// end, ready to append.
fn rehash(mut file: &File, path: &Path) -> Result<(Sha256, i64), StoreError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; REHASH_CHUNK];
    let mut offset = 0i64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Ok((hasher, offset));
        }
        hasher.update(&buf[..n]);
        offset += n as i64;
    }
}

/// When an ingest was last written: the recorded time, or the data file's
/// mtime if that is later (writes after the last record, before a crash or
/// while another writer has it open).
fn last_write(data: &Path, meta: &IngestMeta) -> Result<SystemTime, StoreError> {
    let mtime = fs::metadata(data)
        .and_then(|m| m.modified())
        .map_err(|e| StoreError::io(format!("stat {}", data.display()), e))?;
    Ok(from_nanos(meta.updated_at).max(mtime))
}

/// Makes a rename inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("sync {}", dir.display()), e))
}
