//! The mounts that make up a snapshot, as containerd's overlay snapshotter
//! describes them: a bind mount when there is a single directory to show,
//! overlayfs over the parents' `fs` directories otherwise.

use std::path::{Path, PathBuf};

use super::Kind;

/// One mount, in the terms of containerd's `Mount` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The mounts of a snapshot whose own directories are `fs` (and `work`, for
/// an active one) and whose parents' `fs` directories are `lowers`, nearest
/// first. Paths are those of [`super::Snapshotter`], checked to be UTF-8
/// without `,` or `:` when it opened.
pub fn mounts(kind: Kind, fs: &Path, work: &Path, lowers: &[PathBuf]) -> Vec<Mount> {
    let read_only = kind != Kind::Active;
    match lowers {
        [] => vec![bind(fs, read_only)],
        // Overlayfs needs two lower directories when there is no upper one.
        [only] if read_only => vec![bind(only, true)],
        _ => {
            let mut options = Vec::new();
            if !read_only {
                options.push(format!("workdir={}", work.display()));
                options.push(format!("upperdir={}", fs.display()));
            }
            let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
            options.push(format!("lowerdir={}", lowers.join(":")));
            vec![Mount {
                fs_type: "overlay".into(),
                source: "overlay".into(),
                options,
            }]
        }
    }
}

fn bind(dir: &Path, read_only: bool) -> Mount {
    Mount {
        fs_type: "bind".into(),
        source: dir.display().to_string(),
        options: vec![if read_only { "ro" } else { "rw" }.into(), "rbind".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn without_parents_a_bind_mount_of_its_own_fs() {
        let active = mounts(
            Kind::Active,
            Path::new("/s/1/fs"),
            Path::new("/s/1/work"),
            &[],
        );
        assert_eq!(active, vec![bind(Path::new("/s/1/fs"), false)]);
        assert_eq!(active[0].options, ["rw", "rbind"]);
        let view = mounts(
            Kind::View,
            Path::new("/s/1/fs"),
            Path::new("/s/1/work"),
            &[],
        );
        assert_eq!(view[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn a_view_of_one_parent_binds_the_parent_read_only() {
        let view = mounts(
            Kind::View,
            Path::new("/s/2/fs"),
            Path::new("/s/2/work"),
            &paths(&["/s/1/fs"]),
        );
        assert_eq!(view, vec![bind(Path::new("/s/1/fs"), true)]);
    }

    #[test]
    fn overlay_with_the_lower_chain_nearest_first() {
        let lowers = paths(&["/s/2/fs", "/s/1/fs"]);
        let active = mounts(
            Kind::Active,
            Path::new("/s/3/fs"),
            Path::new("/s/3/work"),
            &lowers,
        );
        assert_eq!(active[0].fs_type, "overlay");
        assert_eq!(
            active[0].options,
            [
                "workdir=/s/3/work",
                "upperdir=/s/3/fs",
                "lowerdir=/s/2/fs:/s/1/fs"
            ]
        );
        let view = mounts(
            Kind::View,
            Path::new("/s/3/fs"),
            Path::new("/s/3/work"),
            &lowers,
        );
        assert_eq!(view[0].options, ["lowerdir=/s/2/fs:/s/1/fs"]);
    }
}
