//! Safe resolution of tar entry names under the root.
//!
//! Names are cleaned lexically: a leading `/` is stripped and `.` dropped, as
//! containerd does; a `..` that would climb above the root is refused
//! (containerd clamps it to the root; refusing is stricter and only hits
//! malicious layers). Parents are resolved component by component with
//! lstat: a symlink among an entry's parents in this layer is refused
//! instead of being followed (containerd follows it, scoped to the root);
//! well-formed layers never write through their own symlinks.

use std::path::{Component, Path, PathBuf};

use super::UnpackError;

/// `name` cleaned to a path relative to the root; empty for the root itself.
pub fn clean(name: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for component in name.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err(UnpackError::PathEscape {
                        path: name.to_owned(),
                        why: "`..` climbs above the root",
                    });
                }
            }
            Component::Prefix(_) => unreachable!("no path prefixes on unix"),
        }
    }
    Ok(out)
}

/// Checks that no existing component of `rel`'s parents under `root` is a
/// symlink or a non-directory; returns the first missing parent (relative),
/// if any, from which the caller creates the rest.
pub fn check_parents(root: &Path, rel: &Path) -> Result<Option<PathBuf>, UnpackError> {
    let Some(parent) = rel.parent() else {
        return Ok(None);
    };
    let mut at = PathBuf::new();
    for component in parent.components() {
        at.push(component);
        match std::fs::symlink_metadata(root.join(&at)) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(UnpackError::PathEscape {
                    path: rel.to_owned(),
                    why: "a parent is a symlink",
                });
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(UnpackError::PathEscape {
                    path: rel.to_owned(),
                    why: "a parent is not a directory",
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(at)),
            Err(e) => return Err(UnpackError::io(format!("lstat {}", at.display()))(e)),
        }
    }
    Ok(None)
}
