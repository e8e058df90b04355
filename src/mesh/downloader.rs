//! Fetches a blob's pieces from peers into an ingest: asks the task's
//! supernode for parents, runs several piece transfers at once (see
//! [`super::transfer`]), reports outcomes, and announces what it got so
//! others can fetch from this node. It stops on completion, when elected to
//! take over ingesting, or when no piece arrived for the stall timeout: the
//! caller then lets containerd go to the registry from the verified offset.
//! It also stops when the writer's client goes away: then nobody on this node
//! waits for the blob (see [`DownloadEnd::ClientGone`]).
//!
//! A [`Download`] sleeps until something happens: a transfer finishes, the
//! supernode answers a Schedule (which it holds until it has something to
//! assign, a long-poll), or the stall deadline passes.

use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::{JoinSet, block_in_place};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::Mesh;
use super::supernode_client::{Answer, SupernodeError};
use super::tasks::LocalTask;
use super::transfer::{FailureKind, FetchError, Transfer, fetch};
use crate::protocol::api::{
    Assignment, Outcome, PieceResult, ReportRequest, Role, ScheduleRequest, ScheduleResponse,
};
use crate::protocol::piece::{piece_count, piece_range};
use crate::store::{Digest, Ingest, StoreError};

/// How long the supernode may hold a Schedule that has nothing to assign.
const SCHEDULE_WAIT: Duration = Duration::from_secs(1);
/// Pieces offered to the supernode per free download slot: a wide choice
/// lets it spread downloaders over different pieces (rarest first) instead
/// of all waiting on the same few holders of the next pieces in order.
const WANTED_PER_SLOT: usize = 8;
/// Pause before asking again after a Schedule failed.
const RESCHEDULE: Duration = Duration::from_millis(150);
/// How many stall timeouts a download waits without a piece while it has a
/// reason to: the first piece does not exist yet (the ingester's registry
/// fetch is slow to start under load), transfers are in flight (each fails
/// on its own after 5 s without a byte), or the supernode says every holder
/// of the wanted pieces is at its upload cap (the mesh is busy, not stuck).
/// Still bounded, so a mesh much slower than the registry is left.
const WAITING_PATIENCE: u32 = 4;

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
    /// The client that waited for the blob went away (containerd's pull was
    /// cancelled). The download stops rather than finishing on its own: the
    /// ingest is that client's (its lease keeps it, containerd's GC aborts
    /// it), so nothing on this node would use the rest, and the peers that
    /// want the blob are served by its other holders. What was verified
    /// stays in the ingest for a retry.
    ClientGone,
    /// The supernode says the pieces came by a claim that another node's
    /// blob refuted: the caller must discard them.
    Refuted,
}

/// Downloads `task` into `ingest` until one of [`DownloadEnd`]. The ingest
/// ends at the verified contiguous offset, with nothing unverified after it;
/// `verified`, if given, follows that offset as it grows. `client_gone`
/// completes if the client waiting for the blob goes away.
pub async fn download(
    mesh: &Arc<Mesh>,
    task: &Arc<LocalTask>,
    ingest: &mut Ingest,
    supernode: &str,
    verified: Option<&watch::Sender<u64>>,
    client_gone: impl Future<Output = ()> + Send,
) -> Result<DownloadEnd, StoreError> {
    let file = Arc::new(block_in_place(|| ingest.data_file())?);
    block_in_place(|| ingest.begin_out_of_order())?;
    let announce = Arc::new(Notify::new());
    let done = CancellationToken::new();
    tokio::spawn(
        mesh.clone()
            .announcer(task.clone(), announce.clone(), done.clone()),
    );
    // Dropped on every way out, also when the caller drops this future.
    let _stop_announcer = done.drop_guard();
    let mut download = Download {
        mesh,
        task,
        ingest,
        file,
        supernode,
        announce,
        verified,
        client_gone: pin!(client_gone),
        contiguous: 0,
        transfers: JoinSet::new(),
        in_flight: HashSet::new(),
        schedule: None,
        retry_at: None,
        last_progress: Instant::now(),
        pieces_seen: false,
        parents_busy: false,
    };
    let end = download.run().await;
    // Transfers still in flight write into the ingest file: stop them, and
    // wait until they have stopped, before it is cut back to the verified
    // prefix, so that none writes there while containerd writes the rest.
    download.transfers.shutdown().await;
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

/// What a Schedule call comes back with.
type ScheduleAnswer = Result<Answer<ScheduleResponse>, SupernodeError>;

/// One download in progress: its state between events.
struct Download<'a> {
    mesh: &'a Arc<Mesh>,
    task: &'a Arc<LocalTask>,
    ingest: &'a mut Ingest,
    file: Arc<File>,
    supernode: &'a str,
    /// Wakes the announcer, which tells the supernode of new pieces.
    announce: Arc<Notify>,
    /// Readers that follow the verified prefix as it grows.
    verified: Option<&'a watch::Sender<u64>>,
    /// Completes when the client waiting for the blob went away.
    client_gone: Pin<&'a mut (dyn Future<Output = ()> + Send + 'a)>,
    /// Pieces held from piece 0 without a gap.
    contiguous: u32,
    transfers: JoinSet<(Transfer, Result<(), FetchError>)>,
    in_flight: HashSet<u32>,
    /// The Schedule call in flight, if any.
    schedule: Option<AbortOnDropHandle<ScheduleAnswer>>,
    /// No Schedule before this (the last one failed).
    retry_at: Option<Instant>,
    last_progress: Instant,
    pieces_seen: bool,
    /// The last Schedule assigned nothing because the holders were busy.
    parents_busy: bool,
}

/// What woke the download.
enum Wake {
    Transfer(Transfer, Result<(), FetchError>),
    Answer(ScheduleAnswer),
    Deadline,
    ClientGone,
}

impl Download<'_> {
    async fn run(&mut self) -> Result<DownloadEnd, StoreError> {
        let total = piece_count(self.task.size, self.task.piece_size);
        loop {
            self.advance_verified_prefix()?;
            if self.contiguous == total {
                return Ok(DownloadEnd::Complete);
            }
            if self.stalled() {
                return Ok(DownloadEnd::Stalled);
            }
            self.ask_for_parents();
            let end = match self.next_event().await {
                Wake::Transfer(transfer, result) => {
                    self.transfer_finished(transfer, result);
                    None
                }
                Wake::Answer(answer) => self.answered(answer).await,
                Wake::Deadline => None,
                Wake::ClientGone => {
                    tracing::info!(digest = %self.task.digest, offset = self.ingest.offset(), "the client went away; stopping the download");
                    Some(DownloadEnd::ClientGone)
                }
            };
            if let Some(end) = end {
                return Ok(end);
            }
        }
    }

    /// Moves the ingest's offset (and the crash marker, and the readers of
    /// the prefix) up to the end of the pieces held without a gap.
    fn advance_verified_prefix(&mut self) -> Result<(), StoreError> {
        let task = self.task;
        self.contiguous = task.first_missing_from(self.contiguous);
        let total = piece_count(task.size, task.piece_size);
        let verified = if self.contiguous == total {
            task.size
        } else {
            piece_range(self.contiguous, task.size, task.piece_size).0
        };
        if verified as i64 > self.ingest.offset() {
            let ingest = &mut *self.ingest;
            block_in_place(|| {
                ingest.adopt(verified as i64)?;
                // A daemon killed now resumes from here when it restarts,
                // not from where this download began.
                ingest.begin_out_of_order()
            })?;
        }
        if let Some(prefix) = self.verified {
            prefix.send_if_modified(|prefix| {
                let changed = *prefix != verified;
                *prefix = verified;
                changed
            });
        }
        Ok(())
    }

    /// How long the download may go without a piece: the stall timeout, or
    /// [`WAITING_PATIENCE`] times it before the first piece exists, while
    /// transfers are in flight and while the holders are busy.
    fn patience(&self) -> Duration {
        if self.pieces_seen && !self.parents_busy && self.in_flight.is_empty() {
            self.mesh.config.stall_timeout
        } else {
            self.mesh.config.stall_timeout * WAITING_PATIENCE
        }
    }

    fn stalled(&self) -> bool {
        if self.last_progress.elapsed() <= self.patience() {
            return false;
        }
        self.mesh.stats.stalls.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(digest = %self.task.digest, offset = self.ingest.offset(), "mesh download stalled; falling back to the registry");
        true
    }

    /// Starts a Schedule call for the free download slots, unless one is in
    /// flight, none is free, or the last call failed a moment ago.
    fn ask_for_parents(&mut self) {
        let parallelism = self.mesh.config.download_parallelism.max(1);
        let free = parallelism.saturating_sub(self.in_flight.len());
        if self.schedule.is_some()
            || free == 0
            || self.retry_at.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        let wanted = self.task.missing_from(
            self.contiguous,
            parallelism * WANTED_PER_SLOT,
            &self.in_flight,
        );
        let request = ScheduleRequest {
            host_id: self.mesh.supernodes.host().id.clone(),
            digest: self.task.digest.to_string(),
            wanted,
            contiguous: self.ingest.offset(),
            max_assignments: free as u32,
            // The supernode answers at once when it can assign anything;
            // otherwise it holds the call until a piece appears or a parent
            // frees a slot (this node's own finished transfers included:
            // they are announced, which wakes the call).
            wait_ms: SCHEDULE_WAIT.as_millis() as u32,
        };
        let mesh = self.mesh.clone();
        let digest = self.task.digest.clone();
        self.schedule = Some(AbortOnDropHandle::new(tokio::spawn(async move {
            mesh.call(&digest, "schedule", |mut c| {
                let request = request.clone();
                async move { c.schedule(request).await }
            })
            .await
        })));
    }

    /// Waits for a finished transfer, the Schedule answer, the client's
    /// going away, or the next deadline (the stall timeout, or the retry
    /// after a failed call).
    async fn next_event(&mut self) -> Wake {
        let stall = self.last_progress + self.patience();
        let deadline = self.retry_at.map_or(stall, |at| at.min(stall));
        tokio::select! {
            Some(joined) = self.transfers.join_next(), if !self.transfers.is_empty() => {
                match joined {
                    Ok((transfer, result)) => Wake::Transfer(transfer, result),
                    Err(_) => Wake::Deadline,
                }
            }
            answer = async { self.schedule.as_mut().expect("guarded").await }, if self.schedule.is_some() => {
                self.schedule = None;
                match answer {
                    Ok(answer) => Wake::Answer(answer),
                    Err(_) => Wake::Deadline,
                }
            }
            () = &mut self.client_gone => Wake::ClientGone,
            () = tokio::time::sleep_until(deadline) => {
                if self.retry_at.is_some_and(|at| at <= Instant::now()) {
                    self.retry_at = None;
                }
                Wake::Deadline
            }
        }
    }

    /// Starts the assigned transfers, or ends the download for a take-over.
    async fn answered(&mut self, answer: ScheduleAnswer) -> Option<DownloadEnd> {
        match answer {
            Ok(answer) if answer.value.take_over => {
                return Some(take_over(self.task, self.ingest));
            }
            Ok(answer) if answer.value.discard => return Some(DownloadEnd::Refuted),
            Ok(answer) => {
                self.parents_busy = answer.value.parents_busy;
                if answer.value.assignments.is_empty() {
                    return None;
                }
                if !self.pieces_seen {
                    self.pieces_seen = true;
                    self.last_progress = Instant::now();
                }
                for assignment in answer.value.assignments {
                    self.start_transfer(assignment);
                }
            }
            Err(SupernodeError::UnknownTask { addr }) => {
                // The supernode restarted and nobody told it of this blob
                // yet: join again, as at the start.
                tracing::warn!(digest = %self.task.digest, supernode = %addr, "supernode forgot the blob; joining again");
                let task = self.task;
                if let Some((Role::Ingest, _)) =
                    self.mesh.join(&task.digest, task.size as i64).await
                {
                    return Some(take_over(task, self.ingest));
                }
            }
            Err(e) => {
                tracing::warn!(digest = %self.task.digest, error = %e, "could not schedule pieces");
                self.retry_at = Some(Instant::now() + RESCHEDULE);
            }
        }
        None
    }

    fn start_transfer(&mut self, assignment: Assignment) {
        let parallelism = self.mesh.config.download_parallelism.max(1);
        let Some(transfer) = transfer_for(self.task, assignment) else {
            return;
        };
        if self.in_flight.len() >= parallelism
            || self.task.has(transfer.number)
            || !self.in_flight.insert(transfer.number)
        {
            return;
        }
        let file = self.file.clone();
        self.transfers.spawn(async move {
            let result = fetch(&transfer, &file).await;
            (transfer, result)
        });
    }

    /// Accepts a verified piece, or counts the failure; reports either.
    fn transfer_finished(&mut self, transfer: Transfer, result: Result<(), FetchError>) {
        let (mesh, task) = (self.mesh, self.task);
        self.in_flight.remove(&transfer.number);
        let outcome = match result {
            Ok(()) => {
                task.received(
                    transfer.number,
                    transfer.expected.clone(),
                    &transfer.parent_id,
                );
                self.last_progress = Instant::now();
                mesh.stats.pieces_fetched.fetch_add(1, Ordering::Relaxed);
                let (source, bytes) = if transfer.from_supernode {
                    ("supernode", &mesh.stats.supernode_bytes)
                } else {
                    ("peer", &mesh.stats.peer_bytes)
                };
                bytes.fetch_add(transfer.len, Ordering::Relaxed);
                tracing::info!(
                    taskID = %task.digest, superNode = self.supernode, dstCid = %transfer.parent_id,
                    range = %format!("{}-{}", transfer.start, transfer.start + transfer.len - 1),
                    pieceSize = transfer.len, pieceNum = transfer.number, source,
                    "downloading piece"
                );
                self.announce.notify_one();
                Outcome::Ok
            }
            Err(error) => {
                let kind = error.kind();
                mesh.stats.piece_failure(kind);
                if kind == FailureKind::BadDigest {
                    tracing::warn!(digest = %task.digest, piece = transfer.number, parent = %transfer.parent_id, %error, expected = %transfer.expected, "rejected corrupt piece; reporting the peer");
                    Outcome::BadDigest
                } else {
                    tracing::warn!(digest = %task.digest, piece = transfer.number, parent = %transfer.parent_id, %error, "piece transfer failed");
                    Outcome::Failed
                }
            }
        };
        report(mesh, task, &transfer, outcome);
    }
}

/// This node was elected to continue the blob from the registry.
fn take_over(task: &LocalTask, ingest: &Ingest) -> DownloadEnd {
    tracing::info!(digest = %task.digest, offset = ingest.offset(), "elected to take over ingesting from the registry");
    DownloadEnd::TakeOver
}

/// The transfer an assignment asks for, if it is well-formed.
fn transfer_for(task: &LocalTask, assignment: Assignment) -> Option<Transfer> {
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
