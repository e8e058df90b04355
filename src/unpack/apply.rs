//! The applier: reads the tar entries one by one and creates each under the
//! root itself (never through the tar crate's unpack), then sets directory
//! times last and drains the stream so the diff_id covers all of it. Each
//! step follows containerd's `archive.Apply` with its overlay whiteouts (or,
//! for the bottom layer, its removing ones).

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use tar::EntryType;

use super::attrs::{self, Attrs};
use super::decompress::{Compression, Hashing, TAR_BUF};
use super::path;
use super::{Applied, ImplicitDir, UnpackError, Whiteouts};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

pub fn apply(
    blob: impl Read,
    compression: Compression,
    root: &Path,
    parents: &[PathBuf],
    whiteouts: Whiteouts,
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
        whiteouts,
        unpacked: HashSet::new(),
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
    whiteouts: Whiteouts,
    /// What this layer wrote (relative), which an opaque marker keeps when
    /// whiteouts remove (kept only then).
    unpacked: HashSet<PathBuf>,
    entries: u64,
    implicit_dirs: Vec<ImplicitDir>,
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
        let parent = path::resolve(self.root, rel.parent().unwrap_or(Path::new("")))?;
        self.make_parents(&parent)?;
        let base = rel.file_name().unwrap_or_default().to_owned();
        let rel = parent.join(&base);
        let base = base.to_string_lossy();
        if base == OPAQUE {
            return self.opaque(&parent);
        }
        self.written_into(&parent, &rel, kind == EntryType::Directory);
        if let Some(hidden) = base.strip_prefix(WHITEOUT) {
            return self.whiteout(&parent.join(hidden), &attrs);
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
                let source = self.root.join(self.link_source(&link)?);
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
                self.make_node(&target, flag, 0o600, makedev(major.into(), minor.into()))?;
            }
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    path: name,
                    kind: format!("{other:?}"),
                });
            }
        }
        attrs::set_owner_xattrs_mode(&target, &attrs)?;
        if self.whiteouts == Whiteouts::Remove {
            self.unpacked.insert(rel);
        }
        if kind == EntryType::Directory {
            self.dir_times.push((target, attrs.atime, attrs.mtime));
        } else {
            attrs::set_times(&target, attrs.atime, attrs.mtime)?;
        }
        Ok(())
    }

    /// Removes what is at `target` unless both it and the new entry are directories.
    fn replace(&self, target: &Path, is_dir: bool) -> Result<(), UnpackError> {
        match fs::symlink_metadata(target) {
            Ok(meta) if meta.is_dir() && is_dir => Ok(()),
            Ok(_) => remove(target),
            Err(_) => Ok(()),
        }
    }

    fn make_node(
        &self,
        target: &Path,
        flag: SFlag,
        mode: u32,
        dev: nix::libc::dev_t,
    ) -> Result<(), UnpackError> {
        self.replace(target, false)?;
        mknod(target, flag, Mode::from_bits_truncate(mode), dev)
            .map_err(|e| UnpackError::io(format!("mknod {}", target.display()))(e.into()))
    }

    /// A whiteout of `hidden` (relative): over other layers, overlayfs's
    /// 0:0 char device with mode 0 and the entry's owner; in the bottom
    /// layer, the removal of what it names.
    fn whiteout(&self, hidden: &Path, attrs: &Attrs) -> Result<(), UnpackError> {
        let target = self.root.join(hidden);
        if self.whiteouts == Whiteouts::Remove {
            return match fs::symlink_metadata(&target) {
                Ok(_) => remove(&target),
                Err(_) => Ok(()),
            };
        }
        self.make_node(&target, SFlag::S_IFCHR, 0, 0)?;
        nix::unistd::chown(
            &target,
            Some(nix::unistd::Uid::from_raw(attrs.uid)),
            Some(nix::unistd::Gid::from_raw(attrs.gid)),
        )
        .map_err(|e| UnpackError::io(format!("chown {}", target.display()))(e.into()))
    }

    /// An opaque marker in `dir` (relative): over other layers, overlayfs's
    /// opaque xattr; in the bottom layer, the removal of everything below
    /// `dir` this layer has not written.
    fn opaque(&self, dir: &Path) -> Result<(), UnpackError> {
        if self.whiteouts == Whiteouts::Remove {
            return self.remove_unwritten(dir);
        }
        let dir = self.root.join(dir);
        xattr::set(&dir, "trusted.overlay.opaque", b"y")
            .map_err(UnpackError::io(format!("set opaque on {}", dir.display())))
    }

    fn remove_unwritten(&self, dir: &Path) -> Result<(), UnpackError> {
        let at = self.root.join(dir);
        let children =
            fs::read_dir(&at).map_err(UnpackError::io(format!("read {}", at.display())))?;
        for child in children {
            let child = child.map_err(UnpackError::io(format!("read {}", at.display())))?;
            let rel = dir.join(child.file_name());
            if !self.unpacked.contains(&rel) {
                remove(&child.path())?;
            } else if child.file_type().is_ok_and(|t| t.is_dir()) {
                self.remove_unwritten(&rel)?;
            }
        }
        Ok(())
    }

    /// A hardlink's target (relative): its parents resolved inside the
    /// root, its last component not (a hardlink may name a symlink).
    fn link_source(&self, link: &Path) -> Result<PathBuf, UnpackError> {
        let link = path::clean(link)?;
        let Some(base) = link.file_name() else {
            return Err(UnpackError::PathEscape {
                path: link,
                why: "a hardlink to the root",
            });
        };
        Ok(path::resolve(self.root, link.parent().unwrap_or(Path::new("")))?.join(base))
    }

    /// Notes that `rel` is being created in `parent` (both relative): an
    /// implicit `parent` is no longer childless, and an implicit `rel` that
    /// a directory entry names is described.
    fn written_into(&mut self, parent: &Path, rel: &Path, is_dir: bool) {
        for dir in self.implicit_dirs.iter_mut().rev() {
            if dir.path == parent {
                dir.childless = false;
            } else if is_dir && dir.path == rel {
                dir.described = true;
            }
        }
    }

    /// Creates the missing dirs of `parent` (resolved, relative), each with
    /// the attributes of the nearest lower dir that has it, else mode 0755
    /// owned by root.
    fn make_parents(&mut self, parent: &Path) -> Result<(), UnpackError> {
        let mut rel = PathBuf::new();
        for component in parent.components() {
            rel.push(component);
            let dir = self.root.join(&rel);
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => {
                    return Err(UnpackError::PathEscape {
                        path: rel,
                        why: "a parent is not a directory",
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(UnpackError::io(format!("lstat {}", dir.display()))(e)),
            }
            if let Some(above) = rel.parent() {
                self.written_into(above, &rel, false);
            }
            fs::DirBuilder::new()
                .create(&dir)
                .map_err(UnpackError::io(format!("mkdir {}", dir.display())))?;
            // Explicitly: neither the umask nor a setgid parent decides it.
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                .map_err(UnpackError::io(format!("chmod {}", dir.display())))?;
            if let Some(lower) = attrs::nearest_dir(self.parents, &rel)? {
                attrs::copy_dir_attrs(&lower, &dir, attrs::DirAttrs::All)?;
            }
            self.implicit_dirs.push(ImplicitDir {
                path: rel.clone(),
                described: false,
                childless: true,
            });
        }
        Ok(())
    }
}

/// Removes a file, a symlink or a whole directory.
fn remove(target: &Path) -> Result<(), UnpackError> {
    let removed = match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(target),
        _ => fs::remove_file(target),
    };
    removed.map_err(UnpackError::io(format!("remove {}", target.display())))
}

/// The entry's owner, mode, times (PAX fractions included) and PAX xattrs.
fn entry_attrs<R: Read>(entry: &mut tar::Entry<R>) -> Result<Attrs, UnpackError> {
    let header = entry.header();
    let mode = header.mode().map_err(UnpackError::BadTar)?;
    let mut uid = header.uid().map_err(UnpackError::BadTar)? as u32;
    let mut gid = header.gid().map_err(UnpackError::BadTar)? as u32;
    let mut mtime = FileTime::from_unix_time(
        header
            .mtime()
            .map_err(UnpackError::BadTar)?
            .min(i64::MAX as u64) as i64,
        0,
    );
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
            } else if key == "uid" {
                uid = pax_id(key, ext.value_bytes())?;
            } else if key == "gid" {
                gid = pax_id(key, ext.value_bytes())?;
            }
        }
    }
    // containerd sets atime to the later of atime and mtime.
    let atime = atime.map_or(mtime, |a| a.max(mtime));
    Ok(Attrs {
        uid,
        gid,
        mode,
        atime: bound_time(atime),
        mtime: bound_time(mtime),
        xattrs,
    })
}

/// A time before 1970 or past what nanoseconds in an i64 hold (2262) is the
/// epoch, as containerd's `boundTime` makes it.
fn bound_time(time: FileTime) -> FileTime {
    const MAX: (i64, u32) = (i64::MAX / 1_000_000_000, (i64::MAX % 1_000_000_000) as u32);
    if time.unix_seconds() < 0 || (time.unix_seconds(), time.nanoseconds()) > MAX {
        FileTime::zero()
    } else {
        time
    }
}

/// A PAX `uid` or `gid` (ids too big for the ustar header).
fn pax_id(key: &str, value: &[u8]) -> Result<u32, UnpackError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            UnpackError::BadTar(io::Error::other(format!(
                "bad PAX {key} {:?}",
                value.escape_ascii().to_string()
            )))
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
