//! Ownership, modes, times and extended attributes, applied in containerd's
//! order: lchown, then xattrs (chown drops `security.capability`), then chmod
//! (chown clears setuid/setgid; never through a symlink), then times.
//! `trusted.*` xattrs are never taken from an archive or copied from a lower
//! layer, as containerd does: they are overlayfs's own (opaque dirs).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;
use nix::unistd::{Gid, Uid};

use super::{UnpackError, path};

const TRUSTED: &str = "trusted.";

/// The attributes of one entry.
pub struct Attrs {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub atime: FileTime,
    pub mtime: FileTime,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Sets owner, xattrs and mode (not on a symlink, which is checked with
/// lstat: a hardlink may name one) of `path`; times are set by
/// [`set_times`], for directories after their children.
pub fn set_owner_xattrs_mode(path: &Path, a: &Attrs) -> Result<(), UnpackError> {
    let ctx = || path.display().to_string();
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(a.uid)),
        Some(Gid::from_raw(a.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| UnpackError::io(format!("lchown {}", ctx()))(e.into()))?;
    for (name, value) in a
        .xattrs
        .iter()
        .filter(|(name, _)| !name.starts_with(TRUSTED))
    {
        match xattr::set(path, name, value) {
            Ok(()) => {}
            // As containerd: skip xattrs the filesystem does not support, and
            // user.* ones on what is neither a file nor a directory.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTSUP as i32) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied
                    && name.starts_with("user.")
                    && !is_file_or_dir(path) => {}
            Err(e) => return Err(UnpackError::io(format!("setxattr {name} on {}", ctx()))(e)),
        }
    }
    let meta = fs::symlink_metadata(path).map_err(UnpackError::io(format!("lstat {}", ctx())))?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(path, fs::Permissions::from_mode(a.mode & 0o7777))
            .map_err(UnpackError::io(format!("chmod {}", ctx())))?;
    }
    Ok(())
}

/// lutimes: sets times without following a symlink.
pub fn set_times(path: &Path, atime: FileTime, mtime: FileTime) -> Result<(), UnpackError> {
    filetime::set_symlink_file_times(path, atime, mtime)
        .map_err(UnpackError::io(format!("lutimes {}", path.display())))
}

/// The nearest of `parents` holding `rel` (resolved inside each parent, as
/// containerd does), if that is a directory: a nearer parent that replaced
/// it with another type hides the farther ones.
pub fn nearest_dir(parents: &[PathBuf], rel: &Path) -> Result<Option<PathBuf>, UnpackError> {
    for parent in parents {
        let path = parent.join(path::resolve(parent, rel)?);
        match fs::symlink_metadata(&path) {
            Ok(meta) => return Ok(meta.is_dir().then_some(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(UnpackError::io(format!("lstat {}", path.display()))(e)),
        }
    }
    Ok(None)
}

/// What [`copy_dir_attrs`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirAttrs {
    /// Owner, xattrs, mode and times (containerd's copy into a new implicit dir).
    All,
    /// The same but times: creating an entry inside has since set the clock's.
    AllButTimes,
    /// Only the xattrs `to` lacks (containerd copies without replacing).
    MissingXattrs,
}

/// Copies attributes of directory `from` onto `to` (`trusted.*` never).
pub fn copy_dir_attrs(from: &Path, to: &Path, which: DirAttrs) -> Result<(), UnpackError> {
    let meta =
        fs::symlink_metadata(from).map_err(UnpackError::io(format!("lstat {}", from.display())))?;
    let mut xattrs = Vec::new();
    let names =
        xattr::list(from).map_err(UnpackError::io(format!("listxattr {}", from.display())))?;
    for name in names {
        if let Some(value) = xattr::get(from, &name)
            .map_err(UnpackError::io(format!("getxattr {}", from.display())))?
        {
            xattrs.push((name.to_string_lossy().into_owned(), value));
        }
    }
    let attrs = Attrs {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode(),
        atime: FileTime::from_last_access_time(&meta),
        mtime: FileTime::from_last_modification_time(&meta),
        xattrs,
    };
    if which == DirAttrs::MissingXattrs {
        return set_missing_xattrs(to, &attrs.xattrs);
    }
    set_owner_xattrs_mode(to, &attrs)?;
    if which == DirAttrs::All {
        set_times(to, attrs.atime, attrs.mtime)?;
    }
    Ok(())
}

fn set_missing_xattrs(to: &Path, xattrs: &[(String, Vec<u8>)]) -> Result<(), UnpackError> {
    for (name, value) in xattrs.iter().filter(|(name, _)| !name.starts_with(TRUSTED)) {
        let present = xattr::get(to, name).map_err(UnpackError::io(format!(
            "getxattr {name} on {}",
            to.display()
        )))?;
        if present.is_none() {
            xattr::set(to, name, value).map_err(UnpackError::io(format!(
                "setxattr {name} on {}",
                to.display()
            )))?;
        }
    }
    Ok(())
}

fn is_file_or_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_file() || m.is_dir())
}
