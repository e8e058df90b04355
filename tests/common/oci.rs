//! Hand-built OCI images, for tests that need layers no well-behaved tool
//! writes (names that climb out, links to outside, odd entry types, broken
//! streams, lying configs): tar bytes with hand-written ustar headers,
//! optionally gzipped, a config and a manifest, pushed to a registry with
//! its HTTP API; and the files a pushed layer holds, read back from the
//! registry, to check an unpacked tree against.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::sha256_bytes;

const BLOCK: usize = 512;

/// Tar entry type flags (POSIX ustar, plus the PAX global header).
pub const REGULAR: u8 = b'0';
pub const HARDLINK: u8 = b'1';
pub const SYMLINK: u8 = b'2';
pub const DIRECTORY: u8 = b'5';
/// "Contiguous file": reserved, and containerd's applier refuses it.
pub const CONTIGUOUS: u8 = b'7';
pub const GLOBAL_HEADER: u8 = b'g';

/// A tar stream written entry by entry, whatever the names and types.
#[derive(Default)]
pub struct Tar {
    bytes: Vec<u8>,
}

impl Tar {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn dir(self, path: &str) -> Self {
        self.entry(DIRECTORY, path, "", 0o755, b"")
    }

    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.entry(REGULAR, path, "", 0o644, data)
    }

    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.entry(SYMLINK, path, target, 0o777, b"")
    }

    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.entry(HARDLINK, path, target, 0o644, b"")
    }

    /// Any entry: a ustar header with `kind` as its type flag, then `data`
    /// padded to whole blocks. Owner root, mtime 1700000000.
    pub fn entry(mut self, kind: u8, path: &str, link: &str, mode: u32, data: &[u8]) -> Self {
        assert!(
            path.len() < 100 && link.len() < 100,
            "ustar names: < 100 bytes"
        );
        let mut header = [0u8; BLOCK];
        header[..path.len()].copy_from_slice(path.as_bytes());
        octal(&mut header[100..108], mode as u64);
        octal(&mut header[108..116], 0);
        octal(&mut header[116..124], 0);
        octal(&mut header[124..136], data.len() as u64);
        octal(&mut header[136..148], 1_700_000_000);
        header[156] = kind;
        header[157..157 + link.len()].copy_from_slice(link.as_bytes());
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[265..269].copy_from_slice(b"root");
        header[297..301].copy_from_slice(b"root");
        header[148..156].fill(b' ');
        let sum: u64 = header.iter().map(|&b| b as u64).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(data);
        self.bytes
            .resize(self.bytes.len().next_multiple_of(BLOCK), 0);
        self
    }

    /// The stream, ended by two zero blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.resize(self.bytes.len() + 2 * BLOCK, 0);
        self.bytes
    }
}

/// `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    field[..width].copy_from_slice(format!("{value:0width$o}").as_bytes());
    field[width] = 0;
}

/// One layer: its blob, media type, and the diff_id the config will claim.
#[derive(Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: String,
}

impl Layer {
    /// An uncompressed layer.
    pub fn tar(tar: Vec<u8>) -> Self {
        Self {
            diff_id: sha256_bytes(&tar),
            blob: tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// A gzip layer.
    pub fn gzip(tar: Vec<u8>) -> Self {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(&tar).unwrap();
        Self {
            diff_id: sha256_bytes(&tar),
            blob: encoder.finish().unwrap(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }

    pub fn digest(&self) -> String {
        sha256_bytes(&self.blob)
    }
}

/// An image for linux/amd64: config and manifest JSON over its layers.
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl Image {
    pub fn new(layers: Vec<Layer>) -> Self {
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_bytes(&config),
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type,
                "digest": l.digest(),
                "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        Self {
            layers,
            config,
            manifest,
        }
    }

    pub fn digest(&self) -> String {
        sha256_bytes(&self.manifest)
    }

    /// The chain IDs of its layers, as its config claims them.
    pub fn chain_ids(&self) -> Vec<String> {
        chain_ids(self.layers.iter().map(|l| l.diff_id.as_str()))
    }

    /// Pushes blobs and manifest to `registry` (`host:port`, plain HTTP)
    /// as `name:tag`; returns the pullable reference.
    pub async fn push(&self, registry: &str, name: &str, tag: &str) -> String {
        damselfly::registry::install_crypto_provider();
        let client = reqwest::Client::new();
        let base = format!("http://{registry}/v2/{name}");
        for blob in self.layers.iter().map(|l| &l.blob).chain([&self.config]) {
            push_blob(&client, &base, blob).await;
        }
        let response = client
            .put(format!("{base}/manifests/{tag}"))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(self.manifest.clone())
            .send()
            .await
            .expect("PUT manifest");
        assert!(
            response.status().is_success(),
            "PUT manifest: {}",
            response.status()
        );
        format!("{registry}/{name}:{tag}")
    }
}

/// Uploads one blob in a single PUT (POST an upload, PUT ?digest=).
async fn push_blob(client: &reqwest::Client, base: &str, blob: &[u8]) {
    let started = client
        .post(format!("{base}/blobs/uploads/"))
        .send()
        .await
        .expect("POST blob upload");
    assert_eq!(started.status(), 202, "POST blob upload");
    let location = started
        .headers()
        .get("Location")
        .and_then(|l| l.to_str().ok())
        .expect("the upload's Location")
        .to_owned();
    let url = if location.starts_with('/') {
        let origin = base.split("/v2/").next().unwrap();
        format!("{origin}{location}")
    } else {
        location
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    let done = client
        .put(format!("{url}{separator}digest={}", sha256_bytes(blob)))
        .header("Content-Type", "application/octet-stream")
        .body(blob.to_vec())
        .send()
        .await
        .expect("PUT blob");
    assert_eq!(done.status(), 201, "PUT blob");
}

/// Chain IDs of layers with these diff_ids, bottom first (OCI image spec).
pub fn chain_ids<'a>(diff_ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.to_owned(),
            Some(below) => sha256_bytes(format!("{below} {diff_id}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Fetches blob `digest` of repository `name` from `registry` (plain HTTP).
pub async fn fetch_blob(registry: &str, name: &str, digest: &str) -> Vec<u8> {
    damselfly::registry::install_crypto_provider();
    let response = reqwest::get(format!("http://{registry}/v2/{name}/blobs/{digest}"))
        .await
        .expect("GET blob");
    assert!(
        response.status().is_success(),
        "GET blob: {}",
        response.status()
    );
    let blob = response.bytes().await.expect("read blob").to_vec();
    assert_eq!(
        sha256_bytes(&blob),
        digest,
        "the registry served another blob"
    );
    blob
}

/// The regular files of a layer blob (a tar, gzipped or not): path
/// (relative, as in the tar) → size and sha256.
pub fn layer_files(blob: &[u8]) -> BTreeMap<String, (u64, String)> {
    let tar: Box<dyn Read + '_> = if blob.starts_with(&[0x1f, 0x8b]) {
        Box::new(GzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().expect("read the layer's tar") {
        let mut entry = entry.expect("a tar entry");
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut hasher = Sha256::new();
        let size = io::copy(&mut entry, &mut hasher).expect("read a file of the layer");
        let sha256 = format!("sha256:{}", hex::encode(hasher.finalize()));
        files.insert(path.trim_start_matches("./").to_owned(), (size, sha256));
    }
    files
}
