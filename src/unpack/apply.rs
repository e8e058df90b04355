//! The applier: reads the tar entries one by one and creates each under the
//! root itself (never through the tar crate's unpack), then sets directory
//! times last and drains the stream so the diff_id covers all of it.

use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use tar::EntryType;

use super::attrs::{self, Attrs};
use super::decompress::{Compression, Hashing, TAR_BUF};
use super::path;
use super::{Applied, UnpackError};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

pub fn apply(
    blob: impl Read,
    compression: Compression,
    root: &Path,
    parents: &[PathBuf],
) -> Result<Applied, UnpackError> {
    let decompressed = compression
        .reader(blob)
        .map_err(|source| UnpackError::BadCompression {
            compression,
            source,
        })?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(
        TAR_BUF,
        Hashing::new(decompressed),
    ));
    let mut layer = Layer {
        root,
        parents,
        entries: 0,
        implicit_dirs: Vec::new(),
        dir_times: Vec::new(),
    };
    let result = layer.entries(&mut archive);
    let mut rest = archive.into_inner();
    let drained =
        result.and_then(|()| io::copy(&mut rest, &mut io::sink()).map_err(UnpackError::BadTar));
    let hashing = rest.into_inner();
    if let Err(err) = drained {
        return Err(match hashing.failed {
            Some(_) => UnpackError::BadCompression {
                compression,
                source: io::Error::other(err.to_string()),
            },
            None => err,
        });
    }
    for (dir, atime, mtime) in layer.dir_times.iter().rev() {
        attrs::set_times(dir, *atime, *mtime)?;
    }
    Ok(Applied {
        diff_id: crate::store::Digest::from_hasher(hashing.hasher),
        tar_bytes: hashing.bytes,
        entries: layer.entries,
        implicit_dirs: layer.implicit_dirs,
    })
}

struct Layer<'a> {
    root: &'a Path,
    parents: &'a [PathBuf],
    entries: u64,
    implicit_dirs: Vec<PathBuf>,
    dir_times: Vec<(PathBuf, FileTime, FileTime)>,
}

impl Layer<'_> {
    fn entries<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), UnpackError> {
        for entry in archive.entries().map_err(UnpackError::BadTar)? {
            let mut entry = entry.map_err(UnpackError::BadTar)?;
            self.entries += 1;
            self.entry(&mut entry)?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        let name = entry.path().map_err(UnpackError::BadTar)?.into_owned();
        let rel = path::clean(&name)?;
        if rel.as_os_str().is_empty() {
            // The root itself ("./"): containerd ignores it, so the upper dir keeps its attributes.
            return Ok(());
        }
        let attrs = entry_attrs(entry)?;
        if let Some(missing) = path::check_parents(self.root, &rel)? {
            self.make_parents(&missing, rel.parent().unwrap_or(Path::new("")))?;
        }
        let base = rel
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        if base == OPAQUE {
            let dir = self.root.join(rel.parent().unwrap_or(Path::new("")));
            return xattr::set(&dir, "trusted.overlay.opaque", b"y")
                .map_err(UnpackError::io(format!("set opaque on {}", dir.display())));
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT) {
            let target = self.root.join(rel.with_file_name(hidden));
            self.make_node(&target, SFlag::S_IFCHR, 0, 0)?;
            return attrs::set_owner_xattrs_mode(
                &target,
                &Attrs {
                    mode: 0,
                    xattrs: Vec::new(),
                    ..attrs
                },
                true,
            );
        }
        let target = self.root.join(&rel);
        self.replace(&target, kind == EntryType::Directory)?;
        match kind {
            EntryType::Regular => {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(UnpackError::io(format!("create {}", target.display())))?;
                io::copy(entry, &mut file).map_err(UnpackError::BadTar)?;
            }
            EntryType::Directory => {
                if !target.is_dir() {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&target)
                        .map_err(UnpackError::io(format!("mkdir {}", target.display())))?;
                }
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::BadTar)?
                    .unwrap_or_default();
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(UnpackError::io(format!("symlink {}", target.display())))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::BadTar)?
                    .unwrap_or_default();
                let source = self.root.join(path::clean(&link)?);
                path::check_parents(self.root, &path::clean(&link)?)?;
                fs::hard_link(&source, &target).map_err(UnpackError::io(format!(
                    "link {} to {}",
                    target.display(),
                    source.display()
                )))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let flag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                self.make_node(&target, flag, major, minor)?;
            }
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    path: name,
                    kind: format!("{other:?}"),
                });
            }
        }
        let symlink = kind == EntryType::Symlink;
        attrs::set_owner_xattrs_mode(&target, &attrs, symlink)?;
        if kind == EntryType::Directory {
            self.dir_times.push((target, attrs.atime, attrs.mtime));
        } else {
            attrs::set_times(&target, attrs.atime, attrs.mtime)?;
        }
        Ok(())
    }

    /// Removes what is at `target` unless both it and the new entry are directories.
    fn replace(&self, target: &Path, is_dir: bool) -> Result<(), UnpackError> {
        let Ok(meta) = fs::symlink_metadata(target) else {
            return Ok(());
        };
        let removed = match (meta.is_dir(), is_dir) {
            (true, true) => return Ok(()),
            (true, false) => fs::remove_dir_all(target),
            _ => fs::remove_file(target),
        };
        removed.map_err(UnpackError::io(format!("remove {}", target.display())))
    }

    fn make_node(
        &self,
        target: &Path,
        flag: SFlag,
        major: u32,
        minor: u32,
    ) -> Result<(), UnpackError> {
        self.replace(target, false)?;
        mknod(
            target,
            flag,
            Mode::from_bits_truncate(0o600),
            makedev(major.into(), minor.into()),
        )
        .map_err(|e| UnpackError::io(format!("mknod {}", target.display()))(e.into()))
    }

    /// Creates `parent` from `first_missing` down, each with the attributes of
    /// the nearest lower dir that has it, else mode 0755 owned by root.
    fn make_parents(&mut self, first_missing: &Path, parent: &Path) -> Result<(), UnpackError> {
        let skip = first_missing.components().count() - 1;
        let mut rel = first_missing
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for component in parent.components().skip(skip) {
            rel.push(component);
            let dir = self.root.join(&rel);
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .map_err(UnpackError::io(format!("mkdir {}", dir.display())))?;
            if let Some(lower) = attrs::nearest_dir(self.parents, &rel) {
                attrs::copy_dir_attrs(&lower, &dir)?;
            }
            self.implicit_dirs.push(rel.clone());
        }
        Ok(())
    }
}

/// The entry's owner, mode, times (PAX fractions included) and PAX xattrs.
fn entry_attrs<R: Read>(entry: &mut tar::Entry<R>) -> Result<Attrs, UnpackError> {
    let header = entry.header();
    let mode = header.mode().map_err(UnpackError::BadTar)?;
    let uid = header.uid().map_err(UnpackError::BadTar)? as u32;
    let gid = header.gid().map_err(UnpackError::BadTar)? as u32;
    let mut mtime =
        FileTime::from_unix_time(header.mtime().map_err(UnpackError::BadTar)? as i64, 0);
    let mut atime = None;
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(UnpackError::BadTar)? {
        for ext in pax {
            let ext = ext.map_err(UnpackError::BadTar)?;
            let key = ext
                .key()
                .map_err(|e| UnpackError::BadTar(io::Error::other(e)))?;
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((name.to_owned(), ext.value_bytes().to_vec()));
            } else if key == "mtime" {
                mtime = pax_time(ext.value_bytes()).unwrap_or(mtime);
            } else if key == "atime" {
                atime = pax_time(ext.value_bytes());
            }
        }
    }
    // containerd sets atime to the later of atime and mtime.
    let atime = atime.map_or(mtime, |a| a.max(mtime));
    Ok(Attrs {
        uid,
        gid,
        mode,
        atime,
        mtime,
        xattrs,
    })
}

/// A PAX time, `seconds[.fraction]`.
fn pax_time(value: &[u8]) -> Option<FileTime> {
    let text = std::str::from_utf8(value).ok()?;
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    Some(FileTime::from_unix_time(
        secs.parse().ok()?,
        digits.parse().ok()?,
    ))
}
