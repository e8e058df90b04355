//! What the fast path asks of containerd itself, through its own API: where
//! an image came from (the `distribution.source` labels containerd put on
//! its manifest), and recording a layer blob dfdaemon fetched in the pulling
//! namespace, so that the image is complete and containerd's GC stays the
//! one GC.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{
    CreateRequest, DeleteRequest, InfoRequest, WriteAction, WriteContentRequest,
};
use tokio::sync::OnceCell;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::store::Digest;

/// Label prefix containerd puts on fetched manifests: `<prefix><host>=<repository>[,…]`.
const SOURCE_LABEL: &str = "containerd.io/distribution.source.";
/// How long dfdaemon keeps the lease that holds a recorded layer: the pull's
/// own lease holds its manifest, and the manifest's `gc.ref` labels hold
/// the layer, so this only bridges the moment between the record and
/// containerd's next look at the image. Keeping it longer would keep a
/// removed image's layers on disk.
const LEASE_HOLD: Duration = Duration::from_secs(60);
/// The lease's own expiry, in case dfdaemon dies before it deletes it.
const LEASE_TTL: Duration = Duration::from_secs(3600);

/// A lazily connected client of containerd's API socket.
pub struct Containerd {
    socket: PathBuf,
    channel: OnceCell<Channel>,
}

/// Why containerd could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("connect to containerd at {socket}: {source}")]
    Connect {
        socket: String,
        source: tonic::transport::Error,
    },
    #[error("containerd {what}: {status}")]
    Call {
        what: &'static str,
        status: tonic::Status,
    },
    #[error("namespace {0:?} is not a valid gRPC header value")]
    Namespace(String),
}

impl Containerd {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            channel: OnceCell::new(),
        }
    }

    async fn channel(&self) -> Result<Channel, ContainerdError> {
        self.channel
            .get_or_try_init(|| async {
                containerd_client::connect(&self.socket)
                    .await
                    .map_err(|source| ContainerdError::Connect {
                        socket: self.socket.display().to_string(),
                        source,
                    })
            })
            .await
            .cloned()
    }

    /// The registries and repositories blob `digest` was fetched from, in
    /// `namespace`, from containerd's labels on it.
    pub async fn sources(
        &self,
        namespace: &str,
        digest: &Digest,
    ) -> Result<Vec<(String, String)>, ContainerdError> {
        let mut client = ContentClient::new(self.channel().await?);
        let request = in_namespace(
            InfoRequest {
                digest: digest.to_string(),
            },
            namespace,
        )?;
        let info = client
            .info(request)
            .await
            .map_err(failed("content info"))?
            .into_inner()
            .info
            .unwrap_or_default();
        Ok(sources_in_labels(&info.labels))
    }

    /// Records committed blob `digest` of `size` bytes in `namespace`,
    /// under a lease held for [`LEASE_HOLD`]. With containerd's
    /// default (shared) content policy, a Write for a blob its backend
    /// (dfdaemon) already holds opens a writer with nothing to write, and
    /// its COMMIT adds the blob to the namespace; AlreadyExists means the
    /// namespace had it.
    pub async fn record_blob(
        &self,
        namespace: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<(), ContainerdError> {
        let lease = self.create_lease(namespace).await?;
        let mut client = ContentClient::new(self.channel().await?);
        // The COMMIT names the offset the STAT answers (the whole size): an
        // offset below it would make containerd truncate, and copy, the blob.
        let message = |action: WriteAction| WriteContentRequest {
            action: action.into(),
            offset: if action == WriteAction::Commit {
                size as i64
            } else {
                0
            },
            r#ref: format!("damselfly-record-{}", digest.hex()),
            total: size as i64,
            expected: digest.to_string(),
            ..Default::default()
        };
        let messages = [message(WriteAction::Stat), message(WriteAction::Commit)];
        let mut request = in_namespace(futures::stream::iter(messages), namespace)?;
        request.metadata_mut().insert(
            "containerd-lease",
            header(&lease).ok_or_else(|| ContainerdError::Namespace(lease.clone()))?,
        );
        let call_error = failed("content write");
        let answers = async {
            let mut stream = client.write(request).await?.into_inner();
            let mut committed = false;
            while let Some(answer) = stream.message().await? {
                committed |= answer.action == i32::from(WriteAction::Commit);
            }
            Ok::<_, tonic::Status>(committed)
        };
        let recorded = answers.await;
        self.release_later(namespace, lease);
        match recorded {
            Ok(true) => Ok(()),
            Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(status) => Err(call_error(status)),
            Ok(false) => Err(call_error(tonic::Status::unknown(
                "containerd closed the write without committing",
            ))),
        }
    }

    /// Deletes `lease` after [`LEASE_HOLD`], in the background.
    fn release_later(&self, namespace: &str, lease: String) {
        let Some(channel) = self.channel.get().cloned() else {
            return;
        };
        let Ok(request) = in_namespace(
            DeleteRequest {
                id: lease.clone(),
                sync: false,
            },
            namespace,
        ) else {
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep(LEASE_HOLD).await;
            if let Err(status) = LeasesClient::new(channel).delete(request).await {
                tracing::debug!(%lease, error = %status, "could not delete a layer's lease");
            }
        });
    }

    async fn create_lease(&self, namespace: &str) -> Result<String, ContainerdError> {
        let mut client = LeasesClient::new(self.channel().await?);
        let expire = humantime::format_rfc3339_seconds(SystemTime::now() + LEASE_TTL).to_string();
        let request = in_namespace(
            CreateRequest {
                id: format!(
                    "damselfly-{}",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos()
                ),
                labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]),
            },
            namespace,
        )?;
        let lease = client
            .create(request)
            .await
            .map_err(failed("lease create"))?
            .into_inner()
            .lease
            .unwrap_or_default();
        Ok(lease.id)
    }
}

/// Turns a failed call's status into an error naming the call.
fn failed(what: &'static str) -> impl Fn(tonic::Status) -> ContainerdError {
    move |status| ContainerdError::Call { what, status }
}

fn header(value: &str) -> Option<MetadataValue<tonic::metadata::Ascii>> {
    value.parse().ok()
}

fn in_namespace<T>(message: T, namespace: &str) -> Result<Request<T>, ContainerdError> {
    let mut request = Request::new(message);
    let value = header(namespace).ok_or_else(|| ContainerdError::Namespace(namespace.into()))?;
    request.metadata_mut().insert("containerd-namespace", value);
    Ok(request)
}

/// `(host, repository)` pairs from containerd's distribution-source labels.
fn sources_in_labels(labels: &HashMap<String, String>) -> Vec<(String, String)> {
    let mut sources: Vec<(String, String)> = labels
        .iter()
        .filter_map(|(key, value)| Some((key.strip_prefix(SOURCE_LABEL)?, value)))
        .flat_map(|(host, repositories)| {
            repositories
                .split(',')
                .filter(|r| !r.is_empty())
                .map(move |r| (host.to_owned(), r.to_owned()))
        })
        .collect();
    sources.sort();
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_come_from_distribution_labels_only() {
        let labels = HashMap::from([
            (
                "containerd.io/distribution.source.127.0.0.1:5000".to_owned(),
                "damselfly/multi,damselfly/shared".to_owned(),
            ),
            (
                "containerd.io/gc.ref.content.l.0".to_owned(),
                "x".to_owned(),
            ),
        ]);
        assert_eq!(
            sources_in_labels(&labels),
            vec![
                ("127.0.0.1:5000".to_owned(), "damselfly/multi".to_owned()),
                ("127.0.0.1:5000".to_owned(), "damselfly/shared".to_owned()),
            ]
        );
    }
}
