//! The image index: which layer of which image a snapshot chain ID names.
//!
//! containerd's unpacker asks the snapshotter for a layer by its chain ID
//! (`containerd.io/snapshot.ref`), not by the layer's blob digest. Every
//! manifest and config the store commits is parsed here, so that dfdaemon can
//! map a chain ID back to the image's layers (blob digest, size, media type,
//! diff_id) without any CRI annotation. Records are small JSON values in the
//! store's database; a record whose blob was deleted is forgotten with it.

use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Digest, StoreError};

/// Manifests and configs larger than this are not indexed (nor plausible).
pub const MAX_INDEXED_BYTES: u64 = 4 << 20;

/// What kind of image metadata a containerd ref names, from its
/// `manifest-`/`config-` prefix (containerd's `remotes.MakeRefKey`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexedKind {
    Manifest,
    Config,
}

impl IndexedKind {
    pub fn of_ref(reference: &str) -> Option<Self> {
        let last = reference.rsplit('/').next()?;
        if last.starts_with("manifest-") {
            Some(Self::Manifest)
        } else if last.starts_with("config-") {
            Some(Self::Config)
        } else {
            None
        }
    }
}

/// A layer as an image manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestLayer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

/// What the index keeps of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub config: String,
    pub layers: Vec<ManifestLayer>,
}

/// What the index keeps of a config: its layers' diff_ids, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    pub diff_ids: Vec<String>,
}

/// One layer of an image, everything the fast path needs to fetch, unpack
/// and check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayer {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub diff_id: Digest,
    pub chain_id: Digest,
}

/// An image whose layer `position` has the chain ID that was looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayers {
    pub manifest: Digest,
    pub config: Digest,
    pub layers: Vec<ImageLayer>,
    pub position: usize,
}

/// Parses a manifest for the index; `None` for anything that is not an
/// image manifest with valid digests (an index, a foreign document).
pub fn parse_manifest(bytes: &[u8]) -> Option<ManifestRecord> {
    let manifest: ImageManifest = serde_json::from_slice(bytes).ok()?;
    let config: Digest = manifest.config().digest().to_string().parse().ok()?;
    let layers = manifest
        .layers()
        .iter()
        .map(|layer| {
            let digest: Digest = layer.digest().to_string().parse().ok()?;
            Some(ManifestLayer {
                digest: digest.to_string(),
                size: layer.size(),
                media_type: layer.media_type().to_string(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(ManifestRecord {
        config: config.to_string(),
        layers,
    })
}

/// Parses an image config for the index; `None` unless every diff_id is a
/// valid sha256 digest.
pub fn parse_config(bytes: &[u8]) -> Option<ConfigRecord> {
    let config: ImageConfiguration = serde_json::from_slice(bytes).ok()?;
    let diff_ids = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| d.parse::<Digest>().ok().map(|d| d.to_string()))
        .collect::<Option<Vec<_>>>()?;
    Some(ConfigRecord { diff_ids })
}

/// The chain IDs of a stack of layers (the OCI image spec's definition):
/// the first is its diff_id, each next one the sha256 of "<previous> <diff_id>".
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chain: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(previous) => {
                Digest::from_hasher(Sha256::new_with_prefix(format!("{previous} {diff_id}")))
            }
        };
        chain.push(next);
    }
    chain
}

/// Joins a manifest and its config into the image's layer list; `None` when
/// they disagree on the number of layers.
pub fn image_layers(
    manifest: &ManifestRecord,
    config: &ConfigRecord,
) -> Result<Option<Vec<ImageLayer>>, StoreError> {
    if manifest.layers.len() != config.diff_ids.len() {
        return Ok(None);
    }
    let diff_ids = config
        .diff_ids
        .iter()
        .map(|d| d.parse())
        .collect::<Result<Vec<Digest>, _>>()?;
    let chains = chain_ids(&diff_ids);
    manifest
        .layers
        .iter()
        .zip(diff_ids)
        .zip(chains)
        .map(|((layer, diff_id), chain_id)| {
            Ok(ImageLayer {
                digest: layer.digest.parse()?,
                size: layer.size,
                media_type: layer.media_type.clone(),
                diff_id,
                chain_id,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let (a, b, c) = (digest('a'), digest('b'), digest('c'));
        let chain = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(chain[0], a);
        let ab = Digest::of(format!("{a} {b}").as_bytes());
        assert_eq!(chain[1], ab);
        assert_eq!(chain[2], Digest::of(format!("{ab} {c}").as_bytes()));
    }

    #[test]
    fn parses_oci_and_docker_manifests_and_rejects_others() {
        let (config, layer) = (digest('c'), digest('1'));
        for (manifest_type, layer_type) in [
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
        ] {
            let json = format!(
                r#"{{"schemaVersion":2,"mediaType":"{manifest_type}",
                "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":7}},
                "layers":[{{"mediaType":"{layer_type}","digest":"{layer}","size":42}}]}}"#
            );
            let record = parse_manifest(json.as_bytes()).expect("a manifest");
            assert_eq!(record.config, config.to_string());
            assert_eq!(
                record.layers,
                vec![ManifestLayer {
                    digest: layer.to_string(),
                    size: 42,
                    media_type: layer_type.into()
                }]
            );
        }
        let index = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(parse_manifest(index.as_bytes()), None);
        let bad_digest = r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:../../x","size":1},"layers":[]}"#;
        assert_eq!(parse_manifest(bad_digest.as_bytes()), None);
    }

    #[test]
    fn parses_config_diff_ids() {
        let (a, b) = (digest('a'), digest('b'));
        let json = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{a}","{b}"]}}}}"#
        );
        assert_eq!(
            parse_config(json.as_bytes()),
            Some(ConfigRecord {
                diff_ids: vec![a.to_string(), b.to_string()]
            })
        );
        let short = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:abc"]}}"#;
        assert_eq!(parse_config(short.as_bytes()), None);
    }

    #[test]
    fn layers_join_manifest_and_config_or_nothing() {
        let manifest = ManifestRecord {
            config: digest('c').to_string(),
            layers: vec![ManifestLayer {
                digest: digest('1').to_string(),
                size: 5,
                media_type: "m".into(),
            }],
        };
        let config = ConfigRecord {
            diff_ids: vec![digest('a').to_string()],
        };
        let layers = image_layers(&manifest, &config).unwrap().unwrap();
        assert_eq!(layers[0].chain_id, digest('a'));
        assert_eq!(layers[0].digest, digest('1'));
        let two = ConfigRecord {
            diff_ids: vec![digest('a').to_string(), digest('b').to_string()],
        };
        assert_eq!(image_layers(&manifest, &two).unwrap(), None);
    }
}
