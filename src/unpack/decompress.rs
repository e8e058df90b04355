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
    /// Told by the stream's magic bytes (gzip, zstd, else none), as
    /// containerd does for Docker's `diff.tar` types, which images use for
    /// compressed layers too.
    Detect,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

impl Compression {
    /// From a layer media type, as containerd 1.6 reads them: OCI's and
    /// OCI's non-distributable `tar`, `tar+gzip` and `tar+zstd`, Docker's
    /// (and Docker foreign) `diff.tar.gzip` and `diff.tar`. Error for anything
    /// else (encrypted, unknown).
    pub fn from_media_type(media_type: &str) -> Result<Self, UnpackError> {
        const OCI: &str = "application/vnd.oci.image.layer.v1.tar";
        const OCI_FOREIGN: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
        const DOCKER: &str = "application/vnd.docker.image.rootfs.diff.tar";
        const DOCKER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar";
        let oci = media_type
            .strip_prefix(OCI)
            .or_else(|| media_type.strip_prefix(OCI_FOREIGN));
        match (oci, media_type) {
            (Some(""), _) => Ok(Self::None),
            (Some("+gzip"), _) => Ok(Self::Gzip),
            (Some("+zstd"), _) => Ok(Self::Zstd),
            (None, DOCKER | DOCKER_FOREIGN) => Ok(Self::Detect),
            (None, t)
                if t.strip_suffix(".gzip")
                    .is_some_and(|b| b == DOCKER || b == DOCKER_FOREIGN) =>
            {
                Ok(Self::Gzip)
            }
            _ => Err(UnpackError::UnsupportedMediaType(media_type.to_owned())),
        }
    }

    /// The decompressed stream of `blob`.
    pub(super) fn reader<'a>(self, blob: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        let mut blob = BufReader::with_capacity(BUF, blob);
        Ok(match self {
            Self::None => Box::new(blob),
            Self::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
            Self::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob)?),
            Self::Detect => {
                let mut head = Vec::with_capacity(ZSTD_MAGIC.len());
                (&mut blob)
                    .take(ZSTD_MAGIC.len() as u64)
                    .read_to_end(&mut head)?;
                let detected = if head.starts_with(GZIP_MAGIC) {
                    Self::Gzip
                } else if head.starts_with(ZSTD_MAGIC) {
                    Self::Zstd
                } else {
                    Self::None
                };
                let whole: Box<dyn Read + 'a> = Box::new(io::Cursor::new(head).chain(blob));
                return detected.reader(whole);
            }
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
