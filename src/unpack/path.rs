//! Safe resolution of tar entry names under the root, with containerd's
//! `fs.RootPath` semantics.
//!
//! Names are cleaned lexically: a leading `/` is stripped and `.` dropped, as
//! containerd does; a `..` that would climb above the root is refused
//! (containerd clamps it to the root; refusing is stricter and only hits
//! malicious layers). Symlinks among an entry's parents are then followed
//! *inside the root*, as containerd does: an absolute target starts again at
//! the root and `..` stops at it, so a resolved path never leaves the root
//! and names no symlink.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use super::UnpackError;

/// Symlinks followed in one resolution before it is refused as a loop
/// (containerd's limit).
const MAX_LINKS: usize = 255;

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

/// One step of a resolution still to take.
enum Step {
    Root,
    Up,
    Name(OsString),
}

/// `rel` (cleaned) under `root` with every symlink among its existing
/// components followed inside the root; components that do not exist are
/// taken as they are. The result is relative to `root`.
pub fn resolve(root: &Path, rel: &Path) -> Result<PathBuf, UnpackError> {
    let mut steps: VecDeque<Step> = steps_of(rel).collect();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(step) = steps.pop_front() {
        let name = match step {
            Step::Root => {
                resolved.clear();
                continue;
            }
            Step::Up => {
                resolved.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let candidate = resolved.join(&name);
        let at = root.join(&candidate);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(UnpackError::PathEscape {
                        path: rel.to_owned(),
                        why: "too many levels of symlinks",
                    });
                }
                let target = std::fs::read_link(&at)
                    .map_err(UnpackError::io(format!("readlink {}", at.display())))?;
                for step in steps_of(&target).collect::<Vec<_>>().into_iter().rev() {
                    steps.push_front(step);
                }
            }
            Ok(_) => resolved = candidate,
            Err(e) if e.kind() == ErrorKind::NotFound => resolved = candidate,
            Err(e) => return Err(UnpackError::io(format!("lstat {}", at.display()))(e)),
        }
    }
    Ok(resolved)
}

fn steps_of(path: &Path) -> impl Iterator<Item = Step> + '_ {
    path.components().filter_map(|component| match component {
        Component::RootDir => Some(Step::Root),
        Component::ParentDir => Some(Step::Up),
        Component::Normal(name) => Some(Step::Name(name.to_owned())),
        Component::CurDir | Component::Prefix(_) => None,
    })
}
