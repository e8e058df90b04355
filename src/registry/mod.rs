//! The registry client: fetches a blob by digest from the registry an image
//! came from, configured the way containerd's CRI is.
//!
//! - `hosts`: a registry host's endpoints from
//!   `<hosts_dir>/<host>/hosts.toml` (mirrors, then the server), each with
//!   its TLS settings and headers;
//! - `auth`: credentials from a Docker `config.json`, answering Basic and
//!   Bearer challenges (tokens cached per endpoint and repository);
//! - `client`: one endpoint's HTTP client and the Range fetch;
//! - `names`: the validated host and repository names from image labels.
//!
//! [`Registries::open_blob`] tries the endpoints with the pull capability in
//! order and returns the first stream; any failure of one (connect, TLS,
//! timeout, 5xx, also 401/403/404: a mirror may lack the blob) moves on to the
//! next, as containerd does, and the error returned is the last endpoint's,
//! the server's.
//!
//! Why not `oci-client`: its TLS settings (extra roots, skipping
//! verification) are per client, not per endpoint, it has no client
//! certificates, custom headers, API paths (`override_path`) or mirror `ns`
//! parameter, so hosts.toml could not be expressed with it. Transport is
//! `reqwest` with rustls (the `ring` provider, installed as the process
//! default if there is none; roots from the system, as containerd's
//! `SystemCertPool`, plus each endpoint's `ca`); `WWW-Authenticate` is parsed
//! by `http-auth`; hosts.toml by `toml` (in file order, via `indexmap`).
//!
//! Endpoints and clients are built on a host's first fetch and kept: changes
//! to hosts.toml or config.json take effect on restart.

mod auth;
mod client;
mod hosts;
mod names;
mod transport;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use client::BlobStream;

use auth::Credentials;
use client::EndpointClient;
use names::{RegistryHost, Repository};

use crate::store::Digest;

/// Where the registry configuration lives.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// containerd's `config_path`: `<hosts_dir>/<host>/hosts.toml`.
    pub hosts_dir: PathBuf,
    /// A Docker-style `config.json` with credentials (None: anonymous only).
    pub docker_config: Option<PathBuf>,
}

impl Default for RegistryConfig {
    /// `/etc/containerd/certs.d`, and `$DOCKER_CONFIG/config.json` (else
    /// `/root/.docker/config.json`) if that file exists.
    fn default() -> Self {
        let docker_dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root/.docker"));
        let docker_config = Some(docker_dir.join("config.json")).filter(|p| p.is_file());
        Self {
            hosts_dir: PathBuf::from("/etc/containerd/certs.d"),
            docker_config,
        }
    }
}

/// Why a blob could not be fetched. `endpoint` is the API root tried (or the
/// token service) that failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid {0}")]
    InvalidName(String),
    #[error("registry configuration: {0}")]
    Config(String),
    #[error("registry {host}: no endpoint with the pull capability")]
    NoRoute { host: String },
    #[error("{endpoint}: unauthorized (HTTP {status})")]
    Unauthorized { endpoint: String, status: u16 },
    #[error("{endpoint}: {what} not found")]
    NotFound { endpoint: String, what: String },
    #[error("{endpoint}: unexpected HTTP status {status}")]
    Status { endpoint: String, status: u16 },
    #[error("{endpoint}: cannot connect: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("{endpoint}: TLS: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("{endpoint}: timed out")]
    Timeout { endpoint: String },
    #[error("{endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
}

impl RegistryError {
    /// Whether the registry refused the credentials (or their absence).
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::Unauthorized { .. })
    }
}

/// The registries blobs are fetched from; clones share clients and tokens.
#[derive(Clone)]
pub struct Registries {
    inner: Arc<Inner>,
}

struct Inner {
    hosts_dir: PathBuf,
    credentials: Credentials,
    /// The pull endpoints of each host fetched from so far.
    routes: Mutex<HashMap<RegistryHost, Arc<Vec<EndpointClient>>>>,
}

/// Makes ring the process's TLS crypto provider, which every reqwest client
/// of damselfly needs (reqwest is built without a provider of its own, so
/// that aws-lc is not built). Whoever installed a provider first wins.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Registries {
    /// Reads the credentials (the hosts.toml files are read per host, on its
    /// first fetch).
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        install_crypto_provider();
        let credentials = match &config.docker_config {
            Some(path) => Credentials::load(path)?,
            None => Credentials::default(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                hosts_dir: config.hosts_dir,
                credentials,
                routes: Mutex::default(),
            }),
        })
    }

    /// Streams blob `digest` of `repository` on registry `host` (as in the
    /// label `containerd.io/distribution.source.<host>=<repository>`, e.g.
    /// `127.0.0.1:5000`, or `docker.io` for `registry-1.docker.io`), from
    /// byte `offset` on: the stream starts at exactly `offset`.
    ///
    /// Tries the pull endpoints of the host's hosts.toml in order, then its
    /// server; see the module doc for when it moves on.
    pub async fn open_blob(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobStream, RegistryError> {
        let host = RegistryHost::parse(host)?;
        let repository = Repository::parse(repository)?;
        let mut last_error = None;
        // The first fetch from a host reads its hosts.toml and TLS files.
        let route = tokio::task::block_in_place(|| self.route(&host))?;
        for endpoint in route.iter() {
            match endpoint.open_blob(&repository, digest, offset).await {
                Ok(stream) => return Ok(stream),
                Err(error) => {
                    tracing::debug!(%host, %repository, %digest, %error, "endpoint failed, trying the next");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("a route has at least one endpoint"))
    }

    /// The registry host named by containerd's distribution-source label
    /// host `label` (which lacks the port; see [`hosts::label_host`]).
    pub fn source_host(&self, label: &str) -> Result<String, RegistryError> {
        let label = RegistryHost::parse(label)?;
        Ok(hosts::label_host(&self.inner.hosts_dir, &label).to_string())
    }

    /// The pull endpoints of `host`, built on first use.
    fn route(&self, host: &RegistryHost) -> Result<Arc<Vec<EndpointClient>>, RegistryError> {
        let mut routes = self.inner.routes.lock().expect("routes lock");
        if let Some(route) = routes.get(host) {
            return Ok(route.clone());
        }
        let endpoints: Vec<EndpointClient> = hosts::endpoints(&self.inner.hosts_dir, host)?
            .into_iter()
            .filter(|endpoint| endpoint.pull)
            .map(|endpoint| EndpointClient::new(host, endpoint, &self.inner.credentials))
            .collect::<Result<_, _>>()?;
        if endpoints.is_empty() {
            return Err(RegistryError::NoRoute {
                host: host.to_string(),
            });
        }
        let route = Arc::new(endpoints);
        routes.insert(host.clone(), route.clone());
        Ok(route)
    }
}
