//! One endpoint of a registry: an HTTP client with the endpoint's own TLS
//! settings, its cached authorizations, and the blob fetch with a Range.

use std::collections::HashMap;
use std::fs;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, RANGE};
use reqwest::{Certificate, Identity, Response, StatusCode, Url};

use super::RegistryError;
use super::auth::{Authorization, Challenge, Credential, Credentials, authorize};
use super::hosts::{Endpoint, TlsFiles};
use super::names::{RegistryHost, Repository};
use super::transport::{chain, transport_error};
use crate::store::Digest;

/// How long connecting (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a response may stall (no byte of headers or body) before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An endpoint ready to fetch from.
pub struct EndpointClient {
    /// The registry host the content belongs to (sent as `ns` to mirrors).
    registry: RegistryHost,
    endpoint: Endpoint,
    http: reqwest::Client,
    credential: Option<Credential>,
    /// The last authorization that worked, per repository.
    authorizations: Mutex<HashMap<Repository, Authorization>>,
}

impl EndpointClient {
    pub fn new(
        registry: &RegistryHost,
        endpoint: Endpoint,
        credentials: &Credentials,
    ) -> Result<Self, RegistryError> {
        let http = http_client(&endpoint.tls)?;
        let credential = credentials.for_host(&authority(&endpoint.api)).cloned();
        Ok(Self {
            registry: registry.clone(),
            endpoint,
            http,
            credential,
            authorizations: Mutex::default(),
        })
    }

    /// The endpoint's API root, for logs and errors.
    pub fn name(&self) -> &str {
        self.endpoint.api.as_str()
    }

    /// Opens blob `digest` of `repository`, its stream starting at `offset`.
    pub async fn open_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobStream, RegistryError> {
        let url = self.blob_url(repository, digest);
        let mut response = self
            .get(&url, offset, self.authorization(repository))
            .await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let authorization = self.answer(&response, repository).await?;
            self.authorizations
                .lock()
                .expect("authorizations lock")
                .insert(repository.clone(), authorization.clone());
            response = self.get(&url, offset, Some(authorization)).await?;
        }
        let status = response.status();
        match status {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(RegistryError::Unauthorized {
                    endpoint: self.name().to_owned(),
                    status: status.as_u16(),
                });
            }
            StatusCode::NOT_FOUND => {
                return Err(RegistryError::NotFound {
                    endpoint: self.name().to_owned(),
                    what: format!("blob {digest} of {repository}"),
                });
            }
            _ => {
                return Err(RegistryError::Status {
                    endpoint: self.name().to_owned(),
                    status: status.as_u16(),
                });
            }
        }
        BlobStream::new(response, offset, self.name())
    }

    /// `<api>/<repository>/blobs/<digest>`, with `?ns=<registry>` when this
    /// endpoint is a mirror (as containerd tells mirrors whose content it wants).
    fn blob_url(&self, repository: &Repository, digest: &Digest) -> Url {
        let mut url = self.endpoint.api.clone();
        let path = format!("{}/{repository}/blobs/{digest}", url.path());
        url.set_path(&path);
        if self.is_mirror() {
            url.query_pairs_mut()
                .append_pair("ns", self.registry.as_str());
        }
        url
    }

    fn is_mirror(&self) -> bool {
        let host = authority(&self.endpoint.api);
        let registry = self.registry.as_str();
        host != registry && !(registry == "docker.io" && host == "registry-1.docker.io")
    }

    fn authorization(&self, repository: &Repository) -> Option<Authorization> {
        let authorizations = self.authorizations.lock().expect("authorizations lock");
        authorizations
            .get(repository)
            .filter(|a| a.is_fresh())
            .cloned()
    }

    /// The authorization that answers the challenge of a 401.
    async fn answer(
        &self,
        response: &Response,
        repository: &Repository,
    ) -> Result<Authorization, RegistryError> {
        let unauthorized = || RegistryError::Unauthorized {
            endpoint: self.name().to_owned(),
            status: StatusCode::UNAUTHORIZED.as_u16(),
        };
        let challenge = Challenge::from_headers(response.headers()).map_err(|reason| {
            RegistryError::Protocol {
                endpoint: self.name().to_owned(),
                reason,
            }
        })?;
        let Some(challenge) = challenge else {
            return Err(unauthorized());
        };
        authorize(&self.http, &challenge, repository, self.credential.as_ref())
            .await?
            .ok_or_else(unauthorized)
    }

    async fn get(
        &self,
        url: &Url,
        offset: u64,
        authorization: Option<Authorization>,
    ) -> Result<Response, RegistryError> {
        let mut request = self
            .http
            .get(url.clone())
            .headers(self.endpoint.headers.clone());
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization.header);
        }
        request
            .send()
            .await
            .map_err(|e| transport_error(self.name(), e))
    }
}

/// `host[:port]` of a URL, as registries and config.json name hosts.
fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// A client that trusts the system roots plus the endpoint's CAs (or nothing
/// at all with `skip_verify`), presenting its client certificate if any.
fn http_client(tls: &TlsFiles) -> Result<reqwest::Client, RegistryError> {
    let read = |path: &std::path::Path| {
        fs::read(path).map_err(|e| RegistryError::Config(format!("read {}: {e}", path.display())))
    };
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .tls_danger_accept_invalid_certs(tls.skip_verify);
    for path in &tls.ca {
        let certs = Certificate::from_pem_bundle(&read(path)?)
            .map_err(|e| RegistryError::Config(format!("CA {}: {}", path.display(), chain(&e))))?;
        builder = builder.tls_certs_merge(certs);
    }
    if let Some(pair) = &tls.client {
        let mut pem = read(&pair.cert)?;
        if let Some(key) = &pair.key {
            pem.push(b'\n');
            pem.extend(read(key)?);
        }
        let identity = Identity::from_pem(&pem).map_err(|e| {
            RegistryError::Config(format!(
                "client certificate {}: {}",
                pair.cert.display(),
                chain(&e)
            ))
        })?;
        builder = builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| RegistryError::Config(format!("HTTP client: {}", chain(&e))))
}

/// The bytes of a blob from an offset on, as an endpoint serves them.
pub struct BlobStream {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    /// Bytes still to drop before the offset: a registry that ignores the
    /// Range header (200 instead of 206) sends the blob from its start.
    skip: u64,
    endpoint: String,
}

impl BlobStream {
    fn new(response: Response, offset: u64, endpoint: &str) -> Result<Self, RegistryError> {
        let protocol = |reason: String| RegistryError::Protocol {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let skip = match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !range.starts_with(&format!("bytes {offset}-")) {
                    return Err(protocol(format!(
                        "asked for bytes from {offset}, got Content-Range {range:?}"
                    )));
                }
                0
            }
            _ => {
                if offset > 0 {
                    tracing::debug!(
                        endpoint,
                        offset,
                        "Range ignored: dropping the bytes before the offset"
                    );
                }
                offset
            }
        };
        Ok(Self {
            body: Box::pin(response.bytes_stream()),
            skip,
            endpoint: endpoint.to_owned(),
        })
    }

    /// The endpoint (API root) that serves this blob.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let chunk = match ready!(self.body.as_mut().poll_next(cx)) {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Poll::Ready(Some(Err(transport_error(&self.endpoint, e)))),
                None if self.skip > 0 => {
                    let reason = format!("blob ended {} bytes before the offset", self.skip);
                    self.skip = 0;
                    return Poll::Ready(Some(Err(RegistryError::Protocol {
                        endpoint: self.endpoint.clone(),
                        reason,
                    })));
                }
                None => return Poll::Ready(None),
            };
            let len = chunk.len() as u64;
            if self.skip >= len {
                self.skip -= len;
                continue;
            }
            let start = self.skip as usize;
            self.skip = 0;
            return Poll::Ready(Some(Ok(chunk.slice(start..))));
        }
    }
}
