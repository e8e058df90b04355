//! Layer media types, and the reader chain blob → decompressor → sha256 of
//! the uncompressed tar stream (containerd's diff_id).

use std::io::{self, BufReader, Read};

use sha2::{Digest as _, Sha256};

use super::UnpackError;

const BUF: usize = 1 << 20;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From an OCI/Docker layer media type (…tar, …tar+gzip, …tar.gzip, …tar+zstd, docker
    /// rootfs.diff.tar.gzip); error for anything else (e.g. encrypted, foreign).
    pub fn from_media_type(media_type: &str) -> Result<Self, UnpackError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar" => Ok(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Self::Zstd),
            other => Err(UnpackError::UnsupportedMediaType(other.to_owned())),
        }
    }

    /// The decompressed stream of `blob`.
    pub(super) fn reader<'a>(self, blob: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        let blob = BufReader::with_capacity(BUF, blob);
        Ok(match self {
            Self::None => Box::new(blob),
            Self::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
            Self::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob)?),
        })
    }
}

/// Hashes and counts what it reads, and remembers whether the inner
/// (decompressing) reader failed, so a broken stream is told from a bad tar.
pub(super) struct Hashing<R> {
    inner: R,
    pub hasher: Sha256,
    pub bytes: u64,
    pub failed: Option<io::ErrorKind>,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            failed: None,
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.failed = Some(e.kind());
                Err(e)
            }
        }
    }
}

/// The buffer size between the hasher and the tar parser.
pub(super) const TAR_BUF: usize = BUF;
