//! dfdaemon's registry client (`damselfly::registry::Registries`) against a
//! real docker-registry that serves HTTPS with a certificate from its own CA
//! and wants an htpasswd login: with the CA in hosts.toml and the login in
//! config.json a blob streams whole and from an offset; every other setup
//! fails with an error that says which part is wrong, and quickly.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;

use damselfly::registry::{Registries, RegistryConfig, RegistryError};
use damselfly::store::Digest;

use common::{CatalogBlob, Registry, Scratch, sha256_bytes};

const REPOSITORY: &str = "damselfly/multi";

/// Longer than any answer of a local registry takes, shorter than a hang.
const PROMPT: Duration = Duration::from_secs(20);

/// A secure registry with the `small` set, its biggest layer of
/// `damselfly/multi:v1`, and the registry's password.
fn registry_with_a_layer(scratch: &Scratch) -> (Registry, CatalogBlob, String) {
    let registry = Registry::start_secure(scratch);
    let catalog = registry.push("small");
    let layer = catalog
        .image("damselfly/multi:v1")
        .blobs
        .iter()
        .filter(|b| b.kind == "layer")
        .max_by_key(|b| b.size)
        .expect("a layer")
        .clone();
    let password = registry.secured.as_ref().expect("secure").password.clone();
    (registry, layer, password)
}

/// A client reading `hosts_dir`, with a config.json holding `registry`'s
/// user and `password` for it, or with no login at all.
fn client(
    scratch: &Scratch,
    registry: &Registry,
    hosts_dir: PathBuf,
    password: Option<&str>,
) -> Registries {
    damselfly::registry::install_crypto_provider();
    let docker_config = password.map(|password| {
        let path = scratch.join("config.json");
        let secured = registry.secured.as_ref().expect("a secure registry");
        secured.write_docker_config(&path, &registry.host, password);
        path
    });
    Registries::new(RegistryConfig {
        hosts_dir,
        docker_config,
    })
    .expect("registry client")
}

/// The hosts dir containerd would be given for `registry`: its CA trusted.
fn hosts_dir_with_ca(scratch: &Scratch, registry: &Registry) -> PathBuf {
    let dir = scratch.join("certs.d");
    registry.upstream().write_hosts_toml(&dir);
    dir
}

/// Fetches `digest` from byte `offset` on, within [`PROMPT`].
async fn fetch(
    registries: &Registries,
    registry: &Registry,
    digest: &str,
    offset: u64,
) -> Result<Vec<u8>, RegistryError> {
    let digest: Digest = digest.parse().expect("a digest");
    let fetch = async {
        let mut stream = registries
            .open_blob(&registry.host, REPOSITORY, &digest, offset)
            .await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        Ok(bytes)
    };
    tokio::time::timeout(PROMPT, fetch)
        .await
        .expect("the registry client answers promptly")
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_ca_and_the_login_blobs_stream_whole_and_from_an_offset() {
    let scratch = Scratch::new();
    let (registry, layer, password) = registry_with_a_layer(&scratch);
    let registries = client(
        &scratch,
        &registry,
        hosts_dir_with_ca(&scratch, &registry),
        Some(&password),
    );

    let whole = fetch(&registries, &registry, &layer.digest, 0)
        .await
        .expect("fetch the layer");
    assert_eq!(whole.len() as u64, layer.size);
    assert_eq!(sha256_bytes(&whole), layer.digest);

    let offset = layer.size / 2 + 7;
    let tail = fetch(&registries, &registry, &layer.digest, offset)
        .await
        .expect("fetch the layer's tail");
    assert!(
        tail == whole[offset as usize..],
        "the stream starts at byte {offset}: {} bytes, {} expected",
        tail.len(),
        layer.size - offset
    );

    let unknown = sha256_bytes(b"no such blob");
    let error = fetch(&registries, &registry, &unknown, 0)
        .await
        .expect_err("an unknown blob");
    assert!(
        matches!(error, RegistryError::NotFound { .. }),
        "not found: {error}"
    );
    assert!(error.to_string().contains(&unknown), "{error}");

    assert_eq!(
        registries.source_host("127.0.0.1").expect("a host"),
        registry.host,
        "containerd's port-less distribution-source label names this registry"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_wrong_login_is_an_auth_error() {
    let scratch = Scratch::new();
    let (registry, layer, _) = registry_with_a_layer(&scratch);
    for (what, password) in [("no login", None), ("a wrong password", Some("wrong"))] {
        let hosts_dir = hosts_dir_with_ca(&scratch, &registry);
        let registries = client(&scratch, &registry, hosts_dir, password);
        let error = fetch(&registries, &registry, &layer.digest, 0)
            .await
            .expect_err(what);
        assert!(error.is_auth(), "{what}: an auth error, not {error}");
        assert!(error.to_string().contains("HTTP 401"), "{what}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_ca_it_is_a_tls_error_not_a_hang() {
    let scratch = Scratch::new();
    let (registry, layer, password) = registry_with_a_layer(&scratch);
    let hosts_dir = scratch.join("certs.d-without-ca");
    let dir = hosts_dir.join(&registry.host);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!("server = \"https://{}\"\n", registry.host),
    )
    .unwrap();
    let registries = client(&scratch, &registry, hosts_dir, Some(&password));

    let error = fetch(&registries, &registry, &layer.digest, 0)
        .await
        .expect_err("an untrusted certificate");
    assert!(
        matches!(error, RegistryError::Tls { .. }),
        "a TLS error: {error}"
    );
}
