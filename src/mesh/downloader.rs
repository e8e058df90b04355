//! Fetches a blob's pieces from peers into an ingest: asks the task's
//! supernode for parents, runs several piece transfers at once, verifies
//! every piece against its published sha256 before accepting it, reports
//! outcomes, and announces what it got so others can fetch from this node.
//! It stops on completion, when elected to take over ingesting, or when no
//! piece arrived for the stall timeout: the caller then lets containerd go
//! to the registry from the verified offset.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::task::{JoinSet, block_in_place};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::Mesh;
use super::supernode_client::SupernodeError;
use super::tasks::LocalTask;
use crate::protocol::api::{Outcome, PieceResult, ReportRequest, Role, ScheduleRequest};
use crate::protocol::piece::{piece_count, piece_range};
use crate::store::{Digest, Ingest, StoreError};

/// How long to wait for a connection to a peer.
const PEER_CONNECT: Duration = Duration::from_secs(2);
/// How long a peer may stay silent in the middle of a piece.
const PEER_IDLE: Duration = Duration::from_secs(5);
/// Pause before asking the supernode again when nothing could be scheduled.
const RESCHEDULE: Duration = Duration::from_millis(150);
/// How many stall timeouts a download waits for the first piece to exist.
const FIRST_PIECE_PATIENCE: u32 = 4;
/// Read buffer per transfer.
const CHUNK: usize = 256 << 10;

/// Why a download stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum DownloadEnd {
    /// Every piece is in the ingest, verified.
    Complete,
    /// The ingester is gone and this node was elected to continue from the
    /// registry.
    TakeOver,
    /// No progress for the stall timeout, or the supernode is unreachable.
    Stalled,
}

/// Why one piece transfer failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("piece digest mismatch: got {got}")]
    BadDigest { got: Digest },
    #[error("{0}")]
    Failed(String),
}

/// One piece to fetch from one parent.
struct Transfer {
    blob: Digest,
    number: u32,
    expected: Digest,
    parent_id: String,
    parent_addr: String,
    /// The parent is a supernode's repo.
    from_supernode: bool,
    start: u64,
    len: u64,
}

/// Who hears of a download's progress.
struct Progress<'a> {
    /// The announcer, which tells the supernode of new pieces.
    announce: Arc<Notify>,
    /// Readers that follow the verified prefix as it grows.
    verified: Option<&'a watch::Sender<u64>>,
}

/// Downloads `task` into `ingest` until one of [`DownloadEnd`]. The ingest
/// ends at the verified contiguous offset, with nothing unverified after it;
/// `verified`, if given, follows that offset as it grows.
pub async fn download(
    mesh: &Arc<Mesh>,
    task: &Arc<LocalTask>,
    ingest: &mut Ingest,
    supernode: &str,
    verified: Option<&watch::Sender<u64>>,
) -> Result<DownloadEnd, StoreError> {
    let file = Arc::new(ingest.data_file()?);
    block_in_place(|| ingest.begin_out_of_order())?;
    let dirty = Arc::new(Notify::new());
    let done = CancellationToken::new();
    tokio::spawn(
        mesh.clone()
            .announcer(task.clone(), dirty.clone(), done.clone()),
    );
    // Dropped on every way out, also when the caller drops this future.
    let _stop_announcer = done.drop_guard();
    let mut transfers = JoinSet::new();
    let progress = Progress {
        announce: dirty,
        verified,
    };
    let end = run(
        mesh,
        task,
        ingest,
        &file,
        &progress,
        supernode,
        &mut transfers,
    )
    .await;
    // Transfers still in flight write into the ingest file: stop them, and
    // wait until they have stopped, before it is cut back to the verified
    // prefix, so that none writes there while containerd writes the rest.
    transfers.shutdown().await;
    block_in_place(|| ingest.end_out_of_order())?;
    // Pieces past the verified prefix were cut off with it. A complete blob
    // keeps them all: its last piece may be short, so the offset divided by
    // the piece size would drop it, and peers the supernode sends here for
    // it would get 404 until containerd commits.
    let offset = ingest.offset() as u64;
    if offset < task.size {
        task.forget_from((offset / task.piece_size) as u32);
    }
    end
}

async fn run(
    mesh: &Arc<Mesh>,
    task: &Arc<LocalTask>,
    ingest: &mut Ingest,
    file: &Arc<File>,
    progress: &Progress<'_>,
    supernode: &str,
    transfers: &mut JoinSet<(Transfer, Result<(), FetchError>)>,
) -> Result<DownloadEnd, StoreError> {
    let total = piece_count(task.size, task.piece_size);
    let parallelism = mesh.config.download_parallelism.max(1);
    let mut in_flight = HashSet::new();
    let mut last_progress = Instant::now();
    let mut pieces_seen = false;
    let mut next_schedule = Instant::now();
    loop {
        let contiguous = (0..total).find(|&n| !task.has(n)).unwrap_or(total);
        let verified = piece_range(contiguous, task.size, task.piece_size).0;
        let verified = if contiguous == total {
            task.size
        } else {
            verified
        };
        if verified as i64 > ingest.offset() {
            block_in_place(|| {
                ingest.adopt(verified as i64)?;
                // Move the crash marker up with the verified prefix: a
                // daemon killed now resumes from here when it restarts, not
                // from where this download began.
                ingest.begin_out_of_order()
            })?;
        }
        if let Some(prefix) = progress.verified {
            prefix.send_if_modified(|prefix| {
                let changed = *prefix != verified;
                *prefix = verified;
                changed
            });
        }
        if contiguous == total {
            return Ok(DownloadEnd::Complete);
        }
        // Until some peer has a piece, the wait is for the ingester's first
        // piece from the registry (slow to start under load): allow longer,
        // but still bounded; after that, the stall timeout between pieces.
        let patience = if pieces_seen {
            mesh.config.stall_timeout
        } else {
            mesh.config.stall_timeout * FIRST_PIECE_PATIENCE
        };
        if last_progress.elapsed() > patience {
            mesh.stats.stalls.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(digest = %task.digest, verified, "mesh download stalled; falling back to the registry");
            return Ok(DownloadEnd::Stalled);
        }
        if in_flight.len() < parallelism && Instant::now() >= next_schedule {
            let free = parallelism - in_flight.len();
            let wanted: Vec<u32> = (contiguous..total)
                .filter(|n| !task.has(*n) && !in_flight.contains(n))
                .take(parallelism * 2)
                .collect();
            let request = ScheduleRequest {
                host_id: mesh.supernodes.host().id.clone(),
                digest: task.digest.to_string(),
                wanted,
                contiguous: ingest.offset(),
                max_assignments: free as u32,
            };
            let mut started = 0;
            match mesh
                .call(&task.digest, "schedule", |mut c| {
                    let request = request.clone();
                    async move { c.schedule(request).await }
                })
                .await
            {
                Ok(answer) if answer.value.take_over => return Ok(take_over(task, ingest)),
                Ok(answer) => {
                    if !pieces_seen && !answer.value.assignments.is_empty() {
                        pieces_seen = true;
                        last_progress = Instant::now();
                    }
                    for assignment in answer.value.assignments {
                        if in_flight.len() >= parallelism {
                            break;
                        }
                        let Some(transfer) = transfer_for(task, assignment) else {
                            continue;
                        };
                        if task.has(transfer.number) || !in_flight.insert(transfer.number) {
                            continue;
                        }
                        let file = file.clone();
                        transfers.spawn(async move {
                            let result = fetch(&transfer, &file).await;
                            (transfer, result)
                        });
                        started += 1;
                    }
                }
                Err(SupernodeError::UnknownTask { addr }) => {
                    // The supernode restarted and nobody told it of this
                    // blob yet: join again, as at the start.
                    tracing::warn!(digest = %task.digest, supernode = %addr, "supernode forgot the blob; joining again");
                    if let Some((Role::Ingest, _)) = mesh.join(&task.digest, task.size as i64).await
                    {
                        return Ok(take_over(task, ingest));
                    }
                }
                Err(e) => {
                    tracing::warn!(digest = %task.digest, error = %e, "could not schedule pieces")
                }
            }
            if started == 0 {
                next_schedule = Instant::now() + RESCHEDULE;
            }
        }
        let wake = tokio::time::Instant::from_std(
            next_schedule.max(Instant::now() + Duration::from_millis(10)),
        );
        tokio::select! {
            Some(joined) = transfers.join_next(), if !transfers.is_empty() => {
                let Ok((transfer, result)) = joined else { continue };
                in_flight.remove(&transfer.number);
                let outcome = match result {
                    Ok(()) => {
                        task.verified(transfer.number, transfer.expected.clone());
                        last_progress = Instant::now();
                        mesh.stats.pieces_fetched.fetch_add(1, Ordering::Relaxed);
                        let (source, bytes) = if transfer.from_supernode {
                            ("supernode", &mesh.stats.supernode_bytes)
                        } else {
                            ("peer", &mesh.stats.peer_bytes)
                        };
                        bytes.fetch_add(transfer.len, Ordering::Relaxed);
                        tracing::info!(
                            taskID = %task.digest, superNode = supernode, dstCid = %transfer.parent_id,
                            range = %format!("{}-{}", transfer.start, transfer.start + transfer.len - 1),
                            pieceSize = transfer.len, pieceNum = transfer.number, source,
                            "downloading piece"
                        );
                        progress.announce.notify_one();
                        Outcome::Ok
                    }
                    Err(FetchError::BadDigest { got }) => {
                        mesh.stats.bad_pieces.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(digest = %task.digest, piece = transfer.number, parent = %transfer.parent_id, %got, expected = %transfer.expected, "rejected corrupt piece; reporting the peer");
                        Outcome::BadDigest
                    }
                    Err(FetchError::Failed(why)) => {
                        mesh.stats.failed_pieces.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(digest = %task.digest, piece = transfer.number, parent = %transfer.parent_id, error = %why, "piece transfer failed");
                        Outcome::Failed
                    }
                };
                report(mesh, task, &transfer, outcome);
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// This node was elected to continue the blob from the registry.
fn take_over(task: &LocalTask, ingest: &Ingest) -> DownloadEnd {
    tracing::info!(digest = %task.digest, offset = ingest.offset(), "elected to take over ingesting from the registry");
    DownloadEnd::TakeOver
}

/// The transfer an assignment asks for, if it is well-formed.
fn transfer_for(task: &LocalTask, assignment: super::api::Assignment) -> Option<Transfer> {
    let parent = assignment.parent?;
    let expected: Digest = assignment.piece_digest.parse().ok()?;
    if assignment.number >= piece_count(task.size, task.piece_size)
        || parent.addr.parse::<std::net::SocketAddr>().is_err()
    {
        return None;
    }
    let (start, end) = piece_range(assignment.number, task.size, task.piece_size);
    Some(Transfer {
        blob: task.digest.clone(),
        number: assignment.number,
        expected,
        parent_id: parent.host_id,
        parent_addr: parent.addr,
        from_supernode: parent.supernode,
        start,
        len: end - start,
    })
}

/// Tells the supernode how a transfer went, without waiting for it.
fn report(mesh: &Arc<Mesh>, task: &LocalTask, transfer: &Transfer, outcome: Outcome) {
    let mesh = mesh.clone();
    let digest = task.digest.clone();
    let request = ReportRequest {
        host_id: mesh.supernodes.host().id.clone(),
        digest: digest.to_string(),
        results: vec![PieceResult {
            number: transfer.number,
            parent_id: transfer.parent_id.clone(),
            outcome: outcome.into(),
        }],
    };
    tokio::spawn(async move {
        let _ = mesh
            .call(&digest, "report", |mut c| {
                let request = request.clone();
                async move { c.report(request).await }
            })
            .await;
    });
}

/// Fetches one piece from its parent into `file` at its offset, hashing as
/// it goes; the piece counts only if its sha256 is the published one.
async fn fetch(transfer: &Transfer, file: &File) -> Result<(), FetchError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        FetchError::Failed(format!("{what} {}: {e}", transfer.parent_addr))
    };
    let mut stream = timeout(PEER_CONNECT, TcpStream::connect(&transfer.parent_addr))
        .await
        .map_err(|e| failed("connect to", &e))?
        .map_err(|e| failed("connect to", &e))?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET /pieces/sha256/{}/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        transfer.blob.hex(),
        transfer.number,
        transfer.parent_addr
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| failed("send to", &e))?;
    // What came with the head is the start of the body.
    let mut pending = read_response_head(&mut stream, transfer).await?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if !pending.is_empty() {
            let take = pending.len().min((transfer.len - written) as usize);
            hasher.update(&pending[..take]);
            file.write_all_at(&pending[..take], transfer.start + written)
                .map_err(|e| failed("write piece from", &e))?;
            written += take as u64;
            pending.clear();
        }
        if written >= transfer.len {
            break;
        }
        let n = timeout(PEER_IDLE, stream.read(&mut buf))
            .await
            .map_err(|e| failed("read from", &e))?
            .map_err(|e| failed("read from", &e))?;
        if n == 0 {
            return Err(failed(
                "short piece from",
                &format!("{written} of {} bytes", transfer.len),
            ));
        }
        pending.extend_from_slice(&buf[..n]);
    }
    let got = Digest::from_hasher(hasher);
    if got != transfer.expected {
        return Err(FetchError::BadDigest { got });
    }
    Ok(())
}

/// Reads and checks the response head; returns the body bytes read with it.
async fn read_response_head(
    stream: &mut TcpStream,
    transfer: &Transfer,
) -> Result<Vec<u8>, FetchError> {
    let failed = |what: &str| FetchError::Failed(format!("{what} from {}", transfer.parent_addr));
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > 8 << 10 {
            return Err(failed("oversized response head"));
        }
        let n = timeout(PEER_IDLE, stream.read(&mut chunk))
            .await
            .map_err(|_| failed("timeout reading response"))?
            .map_err(|_| failed("error reading response"))?;
        if n == 0 {
            return Err(failed("connection closed before response"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    if !matches!(
        response.parse(&buf[..head_end]),
        Ok(httparse::Status::Complete(_))
    ) {
        return Err(failed("malformed response"));
    }
    if response.code != Some(200) {
        return Err(FetchError::Failed(format!(
            "{} answered {} for piece {}",
            transfer.parent_addr,
            response.code.unwrap_or(0),
            transfer.number
        )));
    }
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        });
    if length != Some(transfer.len) {
        return Err(failed("wrong piece length"));
    }
    Ok(buf.split_off(head_end))
}
