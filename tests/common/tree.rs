//! A filesystem tree as a sorted listing of everything an unpacked layer
//! decides: type, mode (setuid/setgid/sticky included), owner, size, content
//! hash, link target, device number, every xattr (trusted.* and security.*
//! too) and mtime to the nanosecond, plus which entries share an inode. Two
//! listings are compared with [`diff`], which names the first differences.
//! A [`View`] lists a committed snapshot as containerd's snapshotter shows it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::Deserialize;

use super::{Containerd, Scratch, sha256_file};

/// One entry of a tree; `path` is relative to the root, which is `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    /// `d` dir, `f` file, `l` symlink, `c` char dev, `b` block dev, `p` fifo, `s` socket.
    pub kind: char,
    /// Permission bits with setuid, setgid and sticky (no type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of a file or a symlink's target; None for other types (a
    /// directory's size is the filesystem's business).
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub link: Option<String>,
    /// (major, minor) of a device.
    pub rdev: Option<(u64, u64)>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub mtime: Mtime,
    /// For a non-directory with more than one link: the first path (sorted)
    /// of the tree with the same inode, and the inode's link count.
    pub inode: Option<(String, u64)>,
}

/// A modification time, or the mark of one set while unpacking (after the
/// listing's `fresh_since`): containerd leaves such times to the clock
/// (whiteouts, directories that get children after their attributes were
/// copied), so only their freshness can be compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtime {
    Ns(i128),
    Fresh,
}

/// Lists the tree under `root`, sorted by path; mtimes at or after
/// `fresh_since` become [`Mtime::Fresh`].
pub fn list(root: &Path, fresh_since: SystemTime) -> Vec<Entry> {
    let fresh = fresh_since
        .duration_since(UNIX_EPOCH)
        .expect("a time after 1970")
        .as_nanos() as i128;
    let mut found = Vec::new();
    walk(root, "", fresh, &mut found);
    found.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    let mut first_of_inode: HashMap<(u64, u64), String> = HashMap::new();
    found
        .into_iter()
        .map(|(mut entry, dev_ino, nlink)| {
            if entry.kind != 'd' && nlink > 1 {
                let first = first_of_inode
                    .entry(dev_ino)
                    .or_insert_with(|| entry.path.clone());
                entry.inode = Some((first.clone(), nlink));
            }
            entry
        })
        .collect()
}

fn walk(dir: &Path, rel: &str, fresh: i128, out: &mut Vec<(Entry, (u64, u64), u64)>) {
    let path = if rel.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(rel)
    };
    let meta =
        fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let entry = describe(&path, &format!("/{rel}"), &meta, fresh);
    let is_dir = entry.kind == 'd';
    out.push((entry, (meta.dev(), meta.ino()), meta.nlink()));
    if !is_dir {
        return;
    }
    let children =
        fs::read_dir(&path).unwrap_or_else(|e| panic!("read dir {}: {e}", path.display()));
    for child in children {
        let name = child.expect("read dir entry").file_name();
        let name = name.to_str().expect("utf-8 names in test trees");
        let child_rel = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        walk(dir, &child_rel, fresh, out);
    }
}

fn describe(path: &Path, rel: &str, meta: &fs::Metadata, fresh: i128) -> Entry {
    let t = meta.file_type();
    let kind = match () {
        _ if t.is_dir() => 'd',
        _ if t.is_file() => 'f',
        _ if t.is_symlink() => 'l',
        _ if t.is_char_device() => 'c',
        _ if t.is_block_device() => 'b',
        _ if t.is_fifo() => 'p',
        _ => 's',
    };
    let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
    Entry {
        path: rel.to_owned(),
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: matches!(kind, 'f' | 'l').then(|| meta.len()),
        sha256: (kind == 'f').then(|| sha256_file(path)),
        link: (kind == 'l').then(|| {
            fs::read_link(path)
                .expect("readlink")
                .to_string_lossy()
                .into_owned()
        }),
        rdev: matches!(kind, 'c' | 'b').then(|| {
            let rdev = meta.rdev();
            (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
        }),
        xattrs: xattrs(path),
        mtime: if mtime >= fresh {
            Mtime::Fresh
        } else {
            Mtime::Ns(mtime)
        },
        inode: None,
    }
}

/// Every xattr of `path` itself (not following a symlink).
fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let names = xattr::list(path).unwrap_or_else(|e| panic!("listxattr {}: {e}", path.display()));
    names
        .filter_map(|name| {
            let value = xattr::get(path, &name)
                .unwrap_or_else(|e| panic!("getxattr {}: {e}", path.display()))?;
            Some((name.to_string_lossy().into_owned(), value))
        })
        .collect()
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {:04o} {}:{}",
            self.path, self.kind, self.mode, self.uid, self.gid
        )?;
        match self.mtime {
            Mtime::Ns(ns) => write!(f, " mtime={ns}")?,
            Mtime::Fresh => write!(f, " mtime=fresh")?,
        }
        if let Some(size) = self.size {
            write!(f, " size={size}")?;
        }
        if let Some(sha) = &self.sha256 {
            write!(f, " {}", &sha[..19])?;
        }
        if let Some(link) = &self.link {
            write!(f, " -> {link}")?;
        }
        if let Some((major, minor)) = self.rdev {
            write!(f, " dev={major}:{minor}")?;
        }
        for (name, value) in &self.xattrs {
            write!(f, " {name}={}", value.escape_ascii())?;
        }
        if let Some((first, nlink)) = &self.inode {
            write!(f, " inode-of={first} nlink={nlink}")?;
        }
        Ok(())
    }
}

/// None if the listings are equal, else up to `max` differences, each as
/// the entry on both sides (`-` only in `a`, `+` only in `b`).
pub fn diff(a: &[Entry], b: &[Entry], max: usize) -> Option<String> {
    let by_path = |list: &[Entry]| -> BTreeMap<String, Entry> {
        list.iter().map(|e| (e.path.clone(), e.clone())).collect()
    };
    let (a, b) = (by_path(a), by_path(b));
    let mut paths: Vec<&String> = a.keys().chain(b.keys()).collect();
    paths.sort();
    paths.dedup();
    let lines: Vec<String> = paths
        .into_iter()
        .filter_map(|path| match (a.get(path), b.get(path)) {
            (Some(x), Some(y)) if x == y => None,
            (Some(x), Some(y)) => Some(format!("  - {x}\n  + {y}")),
            (Some(x), None) => Some(format!("  - {x}")),
            (None, Some(y)) => Some(format!("  + {y}")),
            (None, None) => unreachable!("path from one of the listings"),
        })
        .collect();
    if lines.is_empty() {
        return None;
    }
    let total = lines.len();
    let mut text: Vec<String> = lines.into_iter().take(max).collect();
    if total > max {
        text.push(format!("  … and {} more", total - max));
    }
    Some(text.join("\n"))
}

/// The entry at `path` (`/`-rooted) of a listing.
pub fn find<'a>(list: &'a [Entry], path: &str) -> Option<&'a Entry> {
    list.iter().find(|e| e.path == path)
}

/// One committed chain as a snapshotter shows it: its top layer's own
/// directory, and the whole chain mounted (read-only) as a container sees it.
pub struct View {
    pub upper: Vec<Entry>,
    pub merged: Vec<Entry>,
}

/// A mount that is undone on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// A mount as `ctr snapshots view --mounts` prints it (Go field names).
#[derive(Deserialize)]
struct CtrMount {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Source")]
    source: PathBuf,
    #[serde(rename = "Options")]
    options: Vec<String>,
}

impl View {
    /// Makes a view snapshot of committed snapshot `name` (a chain ID, for
    /// what containerd unpacked) in `namespace` and `snapshotter`, and lists
    /// it (see [`list`] for `fresh_since`). The view lives under ctr's own
    /// lease, which containerd collects when ctr exits; its mounts name only
    /// committed layer dirs, which stay.
    pub fn list(
        containerd: &Containerd,
        namespace: &str,
        snapshotter: &str,
        name: &str,
        scratch: &Scratch,
        fresh_since: SystemTime,
    ) -> Self {
        static VIEWS: AtomicU32 = AtomicU32::new(0);
        let key = format!("tree-view-{}", VIEWS.fetch_add(1, Ordering::Relaxed));
        let json = containerd.ctr_in_ok(
            namespace,
            &[
                "snapshots",
                "--snapshotter",
                snapshotter,
                "view",
                "--mounts",
                &key,
                name,
            ],
        );
        let mounts: Vec<CtrMount> = serde_json::from_slice(&json).expect("parse view mounts");
        let [view] = &mounts[..] else {
            panic!(
                "one mount for a view, got {}",
                String::from_utf8_lossy(&json)
            );
        };
        let upper = top_layer_dir(view);
        let target = scratch.join(&format!("{snapshotter}-{key}"));
        fs::create_dir_all(&target).unwrap();
        let _mounted = mount_read_only(view, &target);
        Self {
            upper: list(&upper, fresh_since),
            merged: list(&target, fresh_since),
        }
    }
}

/// The directory holding a view's top layer: a bind mount's source, or an
/// overlay's first lowerdir.
fn top_layer_dir(view: &CtrMount) -> PathBuf {
    match view.kind.as_str() {
        "bind" => view.source.clone(),
        "overlay" => view
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .and_then(|lowers| lowers.split(':').next())
            .map(PathBuf::from)
            .expect("an overlay view names its lowerdirs"),
        other => panic!("unexpected view mount type {other}"),
    }
}

fn mount_read_only(view: &CtrMount, target: &Path) -> Mounted {
    let data: Vec<&str> = view
        .options
        .iter()
        .map(String::as_str)
        .filter(|o| !matches!(*o, "ro" | "rw" | "bind" | "rbind"))
        .collect();
    let bind = view.kind == "bind";
    let flags = if bind {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_RDONLY
    };
    mount(
        Some(&view.source),
        target,
        Some(view.kind.as_str()),
        flags,
        (!bind).then(|| data.join(",")).as_deref(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "mount {} on {}: {e}",
            view.source.display(),
            target.display()
        )
    });
    let mounted = Mounted(target.to_path_buf());
    if bind {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("remount {} read-only: {e}", target.display()));
    }
    mounted
}
