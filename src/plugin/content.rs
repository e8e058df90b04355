//! The containerd Content service over the [`Store`], with the semantics of
//! containerd's own content server (status codes included), so that
//! containerd, its clients and its conformance suite cannot tell the difference.

use std::collections::HashMap;
use std::sync::Arc;

use containerd_client::services::v1::{
    AbortRequest, DeleteContentRequest, Info, InfoRequest, InfoResponse, ListContentRequest,
    ListContentResponse, ListStatusesRequest, ListStatusesResponse, ReadContentRequest,
    ReadContentResponse, Status as IngestStatusMsg, StatusRequest, StatusResponse, UpdateRequest,
    UpdateResponse, WriteAction, WriteContentRequest, WriteContentResponse,
};
use std::os::unix::fs::FileExt;
use tokio::sync::mpsc;
use tokio::task::block_in_place;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::content_api::content_server::Content;
use super::{ResponseStream, batched, label_update, parse_filter, timestamp, validate_labels};
use crate::mesh::Mesh;
use crate::mesh::session::BlobSession;
use crate::store::{BlobInfo, Digest, Ingest, IngestStatus, Store, StoreError, is_own_ref};

/// Bytes per Read response message (containerd's server uses the same).
const READ_CHUNK: usize = 1 << 20;
/// A write offset meaning "wherever the ingest is" (containerd's content
/// server appends on any negative offset).
const APPEND: i64 = -1;

/// The Content service; with a mesh, layer writes go through it.
pub struct ContentService {
    store: Arc<Store>,
    mesh: Option<Arc<Mesh>>,
}

impl ContentService {
    pub fn new(store: Arc<Store>, mesh: Option<Arc<Mesh>>) -> Self {
        Self { store, mesh }
    }
}

#[tonic::async_trait]
impl Content for ContentService {
    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let digest = parse_digest(&request.get_ref().digest)?;
        let info = block_in_place(|| self.store.info(&digest))?;
        Ok(Response::new(InfoResponse {
            info: Some(info_message(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateRequest>,
    ) -> Result<Response<UpdateResponse>, Status> {
        let request = request.into_inner();
        let info = request
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let digest = parse_digest(&info.digest)?;
        validate_labels(&info.labels)?;
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let update = label_update(info.labels, &paths, "content info")?;
        let info = block_in_place(|| self.store.update_labels(&digest, update))?;
        Ok(Response::new(UpdateResponse {
            info: Some(info_message(info)),
        }))
    }

    type ListStream = ResponseStream<ListContentResponse>;

    async fn list(
        &self,
        request: Request<ListContentRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filter = parse_filter(&request.get_ref().filters)?;
        // A snapshot: containerd's GC deletes blobs while it reads the list.
        let infos: Vec<Info> = block_in_place(|| self.store.list())?
            .into_iter()
            .filter(|info| filter.matches(|path| blob_field(info, path)))
            .map(info_message)
            .collect();
        Ok(Response::new(batched(&infos, |info| ListContentResponse {
            info,
        })))
    }

    async fn delete(&self, request: Request<DeleteContentRequest>) -> Result<Response<()>, Status> {
        let digest = parse_digest(&request.get_ref().digest)?;
        block_in_place(|| self.store.delete(&digest))?;
        tracing::debug!(%digest, "deleted");
        if let Some(mesh) = &self.mesh {
            mesh.deleted();
        }
        Ok(Response::new(()))
    }

    type ReadStream = ResponseStream<ReadContentResponse>;

    async fn read(
        &self,
        request: Request<ReadContentRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let request = request.into_inner();
        let digest = parse_digest(&request.digest)?;
        let (file, size) = block_in_place(|| self.store.open_blob(&digest))?;
        let offset = request.offset.max(0);
        if offset > size {
            return Err(Status::out_of_range(format!(
                "read at {offset} is beyond the end of {digest} ({size} bytes)"
            )));
        }
        // Like containerd: a missing or too large size reads to the end.
        let len = if request.size <= 0 || offset + request.size > size {
            size - offset
        } else {
            request.size
        };
        // containerd reads through a proxy store 32 KiB at a time, one Read
        // call each: such small reads are answered on the spot, from the page
        // cache, without a channel.
        if len as usize <= READ_CHUNK {
            let chunk = (len > 0)
                .then(|| block_in_place(|| read_chunk(&file, &digest, offset, len as usize)));
            return Ok(Response::new(Box::pin(futures::stream::iter(chunk))));
        }
        let (tx, rx) = mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let mut sent = 0i64;
            while sent < len {
                let n = READ_CHUNK.min((len - sent) as usize);
                let message = read_chunk(&file, &digest, offset + sent, n);
                let failed = message.is_err();
                // A closed channel means the client has read what it wanted.
                if tx.blocking_send(message).is_err() || failed {
                    return;
                }
                sent += n as i64;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let status = block_in_place(|| self.store.status(&request.get_ref().r#ref))?;
        Ok(Response::new(StatusResponse {
            status: Some(status_message(status)),
        }))
    }

    async fn list_statuses(
        &self,
        request: Request<ListStatusesRequest>,
    ) -> Result<Response<ListStatusesResponse>, Status> {
        let filter = parse_filter(&request.get_ref().filters)?;
        let statuses = block_in_place(|| self.store.statuses())?
            .into_iter()
            .filter(|status| !is_own_ref(&status.reference))
            .filter(|status| {
                filter.matches(|path| match path {
                    [field] if field == "ref" => Some(status.reference.as_str()),
                    _ => None,
                })
            })
            .map(status_message)
            .collect();
        Ok(Response::new(ListStatusesResponse { statuses }))
    }

    type WriteStream = ResponseStream<WriteContentResponse>;

    async fn write(
        &self,
        request: Request<Streaming<WriteContentRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        let store = self.store.clone();
        let mesh = self.mesh.clone();
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            // The session (and with it the ref's lock) ends inside
            // `write_session`, before its error is sent: a client that
            // reopens the ref on seeing the error must find it unlocked.
            if let Err(status) = write_session(&store, mesh.as_ref(), &mut requests, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<()>, Status> {
        block_in_place(|| self.store.abort(&request.get_ref().r#ref))?;
        Ok(Response::new(()))
    }
}

/// Reads `len` bytes at `offset` of a blob into one Read response.
fn read_chunk(
    file: &std::fs::File,
    digest: &Digest,
    offset: i64,
    len: usize,
) -> Result<ReadContentResponse, Status> {
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, offset as u64)
        .map_err(|e| StoreError::io(format!("read {digest} at {offset}"), e))?;
    Ok(ReadContentResponse { offset, data })
}

/// One Write stream: opens the writer named by the first message, then
/// answers each message in order with exactly one response, until COMMIT or
/// the client's end of the stream. For a layer blob, the mesh takes part
/// (see [`BlobSession`]): its STATs may be held while peers supply the blob.
async fn write_session(
    store: &Arc<Store>,
    mesh: Option<&Arc<Mesh>>,
    requests: &mut Streaming<WriteContentRequest>,
    responses: &mpsc::Sender<Result<WriteContentResponse, Status>>,
) -> Result<(), Status> {
    let Some(mut request) = requests.message().await? else {
        return Ok(());
    };
    if request.r#ref.is_empty() {
        return Err(Status::invalid_argument(
            "first message must have a reference",
        ));
    }
    let reference = request.r#ref.clone();
    let mut total = request.total;
    let mut expected = parse_optional_digest(&request.expected)?;
    let mut ingest = block_in_place(|| store.writer(&reference, total, expected.clone()))?;
    let mut mesh = mesh.and_then(|mesh| BlobSession::start(mesh, &reference, total));
    let mut negotiated = false;
    // The offset containerd's proxy client believes the ingest is at: that
    // of the negotiation, then of each WRITE response. When the mesh adds
    // bytes behind its back, its next WRITE or COMMIT still names the old
    // offset; that means "at the current offset", not "start over at 0".
    // The client counts the bytes a WRITE took as the response's offset
    // minus the offset it sent, and containerd's content service fails the
    // pull unless that equals the data's length; so a WRITE answered in that
    // case reports the offset in the client's own frame. COMMIT answers the
    // true size, which is what the client checks there.
    let mut client_offset = ingest.offset();
    loop {
        let action = WriteAction::try_from(request.action).map_err(|_| {
            Status::invalid_argument(format!("unknown write action {}", request.action))
        })?;
        if let Some(new) = parse_optional_digest(&request.expected)? {
            if store.blob_path(&new).exists() {
                drop(ingest);
                block_in_place(|| store.abort(&reference))?;
                return Err(StoreError::AlreadyExists(format!("content {new}")).into());
            }
            expected = Some(new);
        }
        if request.total > 0 {
            total = request.total;
        }
        let response = match action {
            WriteAction::Stat => {
                // The first STAT is containerd's negotiation, inside its
                // metadata transaction: it must answer at once.
                if negotiated && let Some(mesh) = mesh.as_mut() {
                    mesh.before_stat(&mut ingest, responses.closed()).await?;
                }
                negotiated = true;
                stat_response(&ingest, total)
            }
            WriteAction::Write | WriteAction::Commit => {
                let before = ingest.offset();
                let stale = request.offset == client_offset && client_offset != before;
                let offset = if stale { APPEND } else { request.offset };
                let client_end = request.offset + request.data.len() as i64;
                block_in_place(|| ingest.write(offset, &request.data))?;
                if let Some(mesh) = mesh.as_mut() {
                    mesh.wrote(before, ingest.offset(), &request.data);
                }
                let mut response = block_in_place(|| {
                    finish_write(
                        &mut ingest,
                        action,
                        request.labels,
                        total,
                        expected.as_ref(),
                    )
                })?;
                if stale && action == WriteAction::Write {
                    response.offset = client_end;
                }
                if action == WriteAction::Commit
                    && let Some(mesh) = &mut mesh
                {
                    mesh.committed();
                }
                client_offset = response.offset;
                response
            }
        };
        if responses.send(Ok(response)).await.is_err() {
            return Ok(());
        }
        if action == WriteAction::Commit {
            return Ok(());
        }
        request = match requests.message().await {
            Ok(Some(request)) => request,
            // End of stream: the client closed its writer. An error: it went away.
            Ok(None) | Err(_) => return Ok(()),
        };
    }
}

fn stat_response(ingest: &Ingest, total: i64) -> WriteContentResponse {
    let status = ingest.status();
    WriteContentResponse {
        action: WriteAction::Stat.into(),
        started_at: timestamp(status.started_at),
        updated_at: timestamp(status.updated_at),
        offset: status.offset,
        total,
        digest: ingest.digest().to_string(),
    }
}

/// Commits (for COMMIT) and builds the response to a WRITE or COMMIT whose
/// data is written.
fn finish_write(
    ingest: &mut Ingest,
    action: WriteAction,
    labels: HashMap<String, String>,
    total: i64,
    expected: Option<&Digest>,
) -> Result<WriteContentResponse, Status> {
    let digest = if action == WriteAction::Commit {
        validate_labels(&labels)?;
        let digest = ingest.commit(total, expected, labels)?;
        tracing::debug!(reference = ingest.reference(), %digest, size = ingest.offset(), "committed");
        digest
    } else {
        ingest.digest()
    };
    let status = ingest.status();
    Ok(WriteContentResponse {
        action: action.into(),
        started_at: timestamp(status.started_at),
        updated_at: timestamp(status.updated_at),
        offset: status.offset,
        total,
        digest: digest.to_string(),
    })
}

/// A field of a blob's info, for filters: `digest` and `labels.<key>`.
fn blob_field<'a>(info: &'a BlobInfo, path: &[String]) -> Option<&'a str> {
    match path {
        [field] if field == "digest" => Some(info.digest.as_str()),
        [field, key @ ..] if field == "labels" && !key.is_empty() => {
            info.labels.get(&key.join(".")).map(String::as_str)
        }
        _ => None,
    }
}

fn parse_digest(digest: &str) -> Result<Digest, Status> {
    digest
        .parse::<Digest>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn parse_optional_digest(digest: &str) -> Result<Option<Digest>, Status> {
    if digest.is_empty() {
        return Ok(None);
    }
    parse_digest(digest).map(Some)
}

fn info_message(info: BlobInfo) -> Info {
    Info {
        digest: info.digest.to_string(),
        size: info.size,
        created_at: timestamp(info.created_at),
        updated_at: timestamp(info.updated_at),
        labels: info.labels,
    }
}

fn status_message(status: IngestStatus) -> IngestStatusMsg {
    IngestStatusMsg {
        started_at: timestamp(status.started_at),
        updated_at: timestamp(status.updated_at),
        r#ref: status.reference,
        offset: status.offset,
        total: status.total,
        expected: status.expected,
    }
}
