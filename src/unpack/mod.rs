//! The layer applier: applies one OCI layer (a tar stream, gzip, zstd or
//! uncompressed) to an empty overlay upper directory, with the result
//! containerd's overlay applier produces, without ever writing outside it.
//!
//! - [`decompress`]: media types and the hashing, decompressing reader;
//! - [`path`]: safe resolution of entry paths under the root;
//! - [`attrs`]: ownership, modes, times and xattrs;
//! - [`apply`]: the entry-by-entry applier.

mod apply;
mod attrs;
mod decompress;
mod path;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use decompress::Compression;

/// What applying a layer did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// sha256 of the uncompressed tar stream, read to its end.
    pub diff_id: crate::store::Digest,
    pub tar_bytes: u64,
    pub entries: u64,
    /// Directories created implicitly (not in the tar) because an entry's parent was missing;
    /// their attributes were copied from `parents` where a parent held them.
    pub implicit_dirs: Vec<ImplicitDir>,
}

/// A directory a layer created because an entry's parent was missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImplicitDir {
    /// Relative to the root.
    pub path: PathBuf,
    /// A later entry of the layer described the directory itself: its own
    /// owner, mode and times won; of a lower dir's, only xattrs it lacks stay.
    pub described: bool,
    /// Nothing was created in it (it holds only an opaque marker), so it
    /// keeps a lower dir's times too.
    pub childless: bool,
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entry {path:?} would escape the root: {why}")]
    PathEscape { path: PathBuf, why: &'static str },
    #[error("entry {path:?} has an unsupported type {kind}")]
    UnsupportedEntry { path: PathBuf, kind: String },
    #[error("bad tar stream: {0}")]
    BadTar(std::io::Error),
    #[error("bad {compression:?} stream: {source}")]
    BadCompression {
        compression: Compression,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
}

impl UnpackError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| UnpackError::Io { context, source }
    }
}

/// What whiteouts do, which containerd decides by the layer's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// A layer over others: a whiteout becomes overlayfs's 0:0 char device,
    /// an opaque marker its `trusted.overlay.opaque` xattr.
    Overlay,
    /// The bottom layer (containerd applies it through a bind mount): a
    /// whiteout removes what it names, an opaque marker removes what this
    /// layer has not written in its directory.
    Remove,
}

impl Whiteouts {
    /// For a layer at chain `chain_id` with `diff_id`: only the bottom
    /// layer's chain ID is its diff_id.
    pub fn for_layer(chain_id: &crate::store::Digest, diff_id: &crate::store::Digest) -> Self {
        if chain_id == diff_id {
            Self::Remove
        } else {
            Self::Overlay
        }
    }
}

/// Applies one layer read from `blob` to `root` (an empty overlay upper dir), with `parents`
/// (the lower dirs, nearest first) for the attributes of implicitly created parent directories.
/// Blocking; call from spawn_blocking.
pub fn apply_layer(
    blob: impl Read,
    compression: Compression,
    root: &Path,
    parents: &[PathBuf],
    whiteouts: Whiteouts,
) -> Result<Applied, UnpackError> {
    apply::apply(blob, compression, root, parents, whiteouts)
}

/// For a layer applied before its parents existed (layers unpacked in parallel): copies the
/// attributes of each implicit dir from the nearest parent that has it, leaving what
/// apply_layer would have left: owner, mode and xattrs, times only for a childless dir, and
/// only missing xattrs for a dir a later entry described.
pub fn inherit_implicit_dirs(
    root: &Path,
    implicit_dirs: &[ImplicitDir],
    parents: &[PathBuf],
) -> Result<(), UnpackError> {
    for dir in implicit_dirs {
        if let Some(lower) = attrs::nearest_dir(parents, &dir.path)? {
            let which = match (dir.described, dir.childless) {
                (true, _) => attrs::DirAttrs::MissingXattrs,
                (false, true) => attrs::DirAttrs::All,
                (false, false) => attrs::DirAttrs::AllButTimes,
            };
            attrs::copy_dir_attrs(&lower, &root.join(&dir.path), which)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
