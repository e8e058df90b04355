//! The piece mesh on a node: the supernode client, the piece server, the
//! blobs in flight, and what the content plugin does with them for one
//! blob (see [`session`]).

pub mod downloader;
pub mod limits;
pub mod metrics;
pub mod piece_server;
pub mod session;
pub mod supernode_client;
pub mod tasks;
pub mod transfer;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::block_in_place;
use tokio_util::sync::CancellationToken;

use crate::protocol::api::{self, HeldBlob, Host, JoinRequest, Piece, Role};
use crate::protocol::piece::piece_count;
use crate::shutdown::Shutdown;
use crate::store::{Digest, PieceRecord, Store};
use piece_server::PieceServer;
use supernode_client::{Answer, SupernodeError, Supernodes};
use tasks::{LocalTask, LocalTasks};
use transfer::FailureKind;

/// How long a Join may take before the node just pulls from the registry.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How a node takes part in the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Supernode addresses ("ip:port"), in the seed's `nodes:` order.
    pub supernodes: Vec<String>,
    /// The address peers reach this node's piece server at.
    pub advertise_ip: IpAddr,
    pub upload_port: u16,
    /// Concurrent piece uploads served.
    pub upload_slots: usize,
    /// Concurrent piece downloads per blob.
    pub download_parallelism: usize,
    /// A download that makes no progress for this long falls back to the
    /// registry from its verified offset.
    pub stall_timeout: Duration,
    /// This node is a supernode's repo: it never fetches from a registry.
    pub supernode: bool,
}

/// Bytes and pieces by where they came from, and failures by kind.
#[derive(Default)]
pub struct MeshStats {
    pub registry_bytes: AtomicU64,
    pub peer_bytes: AtomicU64,
    pub supernode_bytes: AtomicU64,
    pub pieces_fetched: AtomicU64,
    /// Failed piece transfers, indexed by [`FailureKind`].
    pub piece_failures: [AtomicU64; FailureKind::ALL.len()],
    pub stalls: AtomicU64,
    pub supernode_failures: AtomicU64,
}

impl MeshStats {
    /// Counts a failed piece transfer by kind.
    pub fn piece_failure(&self, kind: FailureKind) {
        self.piece_failures[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The mesh as one node sees it.
pub struct Mesh {
    pub config: MeshConfig,
    store: Arc<Store>,
    pub supernodes: Arc<Supernodes>,
    pub tasks: Arc<LocalTasks>,
    pub piece_server: Arc<PieceServer>,
    pub stats: MeshStats,
}

impl Mesh {
    /// Binds the piece server and starts heartbeats to the supernodes, both
    /// until `shutdown` is cancelled.
    pub async fn start(
        config: MeshConfig,
        store: Arc<Store>,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Arc<Self>> {
        crate::store::require_blocking_runtime()?;
        let host = Host {
            id: format!("{}:{}", config.advertise_ip, config.upload_port),
            ip: config.advertise_ip.to_string(),
            upload_port: u32::from(config.upload_port),
            supernode: config.supernode,
        };
        let supernodes = Supernodes::new(host, &config.supernodes)?;
        let tasks = Arc::new(LocalTasks::default());
        let piece_server = PieceServer::new(store.clone(), tasks.clone(), config.upload_slots);
        let listen = SocketAddr::new(config.advertise_ip, config.upload_port);
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen for piece uploads on {listen}"))?;
        tracing::info!(%listen, supernodes = ?config.supernodes, "mesh enabled; piece server listening");
        shutdown.spawn(piece_server.clone().serve(listener, shutdown.clone()));
        let mesh = Arc::new(Self {
            config,
            store,
            supernodes: supernodes.clone(),
            tasks,
            piece_server,
            stats: MeshStats::default(),
        });
        let held = {
            let mesh = Arc::downgrade(&mesh);
            Arc::new(move || mesh.upgrade().map(|m| m.held()).unwrap_or_default())
        };
        let uploads = {
            let server = mesh.piece_server.clone();
            Arc::new(move || server.uploads_in_use() as u32)
        };
        shutdown.spawn(supernodes.heartbeats(held, uploads));
        Ok(mesh)
    }

    /// What this node holds, for (re-)registration: the verified pieces of
    /// blobs in flight, and every committed blob whose piece digests are
    /// recorded (so a restarted daemon, or a restarted supernode, offers
    /// them again).
    pub fn held(&self) -> Vec<HeldBlob> {
        let in_flight = self.tasks.all();
        let mut held: Vec<HeldBlob> = in_flight.iter().map(|t| held_blob(t, false)).collect();
        match block_in_place(|| self.store.piece_records()) {
            Ok(records) => held.extend(
                records
                    .into_iter()
                    .filter(|(digest, _)| in_flight.iter().all(|t| t.digest != *digest))
                    .map(|(digest, record)| committed_blob(&digest, record)),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot list the blobs to offer"),
        }
        held
    }

    /// `task`'s blob was committed: remembers its piece digests (when all
    /// are known) for later registrations, then tells the supernode this
    /// node holds all of it.
    pub async fn committed(&self, task: &LocalTask) {
        let digests: Vec<Digest> = task.held().into_iter().map(|(_, d)| d).collect();
        if digests.len() == piece_count(task.size, task.piece_size) as usize {
            let record = PieceRecord {
                size: task.size,
                piece_size: task.piece_size,
                digests,
            };
            if let Err(e) = block_in_place(|| self.store.record_pieces(&task.digest, &record)) {
                tracing::warn!(digest = %task.digest, error = %e, "cannot record piece digests");
            }
        }
        self.announce(task, true).await;
    }

    /// A committed blob was deleted: the supernodes learn it at the next
    /// heartbeat, when this node registers again with what it still holds.
    pub fn deleted(&self) {
        self.supernodes.holdings_changed();
    }

    /// Calls the supernode that owns `digest`'s task.
    pub async fn call<T, F, Fut>(
        &self,
        digest: &Digest,
        what: &'static str,
        call: F,
    ) -> Result<Answer<T>, SupernodeError>
    where
        F: Fn(api::supernode_client::SupernodeClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let result = self
            .supernodes
            .call(digest, what, &|| self.held(), call)
            .await;
        if result.is_err() {
            self.stats
                .supernode_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Asks the task's supernode for this node's role in it, and which
    /// supernode answered; `None` if no supernode answered in time.
    pub async fn join(&self, digest: &Digest, size: i64) -> Option<(Role, String)> {
        let request = JoinRequest {
            host_id: self.supernodes.host().id.clone(),
            digest: digest.to_string(),
            size,
        };
        let call = self.call(digest, "join", |mut c| {
            let request = request.clone();
            async move { c.join(request).await }
        });
        match tokio::time::timeout(JOIN_TIMEOUT, call).await {
            Ok(Ok(answer)) => {
                let role = Role::try_from(answer.value.role).ok()?;
                Some((role, answer.addr))
            }
            Ok(Err(e)) => {
                tracing::warn!(%digest, error = %e, "no supernode: pulling from the registry");
                None
            }
            Err(_) => {
                tracing::warn!(%digest, "supernode join timed out: pulling from the registry");
                None
            }
        }
    }

    /// Tells the task's supernode this node no longer takes part in
    /// `digest`'s task (it gave up on the blob without committing it).
    pub async fn leave(&self, digest: &Digest) {
        let request = api::LeaveRequest {
            host_id: self.supernodes.host().id.clone(),
            digest: digest.to_string(),
        };
        let answer = self
            .call(digest, "leave", |mut c| {
                let request = request.clone();
                async move { c.leave(request).await }
            })
            .await;
        match answer {
            Ok(_) => tracing::info!(%digest, "left the mesh task: the blob was not committed"),
            Err(e) => tracing::warn!(%digest, error = %e, "could not leave the mesh task"),
        }
    }

    /// Tells the task's supernode that the blob assembled from peers'
    /// pieces failed its digest (this node discarded them), naming the
    /// peers that sent them.
    pub async fn blob_failed(&self, task: &LocalTask) {
        let results = task
            .take_sources()
            .into_iter()
            .map(|parent_id| api::PieceResult {
                number: 0,
                parent_id,
                outcome: api::Outcome::BadBlob.into(),
            })
            .collect();
        let request = api::ReportRequest {
            host_id: self.supernodes.host().id.clone(),
            digest: task.digest.to_string(),
            results,
        };
        let answer = self
            .call(&task.digest, "report", |mut c| {
                let request = request.clone();
                async move { c.report(request).await }
            })
            .await;
        if let Err(e) = answer {
            tracing::warn!(digest = %task.digest, error = %e, "could not report the bad blob");
        }
    }

    /// Tells the task's supernode which pieces this node holds.
    pub async fn announce(&self, task: &LocalTask, complete: bool) {
        let blob = held_blob(task, complete);
        let answer = self
            .call(&task.digest, "announce", |mut c| {
                let request = api::AnnounceRequest {
                    host_id: self.supernodes.host().id.clone(),
                    blob: Some(blob.clone()),
                };
                async move { c.announce(request).await }
            })
            .await;
        if let Err(e) = answer {
            tracing::warn!(digest = %task.digest, error = %e, "could not announce pieces");
        }
    }

    /// Keeps the supernode up to date with `task`'s pieces: announces after
    /// every `dirty` notification (batched), until `done` is cancelled.
    pub async fn announcer(
        self: Arc<Self>,
        task: Arc<LocalTask>,
        dirty: Arc<Notify>,
        done: CancellationToken,
    ) {
        /// Batch announcements of pieces completing in quick succession.
        const BATCH: Duration = Duration::from_millis(50);
        loop {
            tokio::select! {
                () = dirty.notified() => {
                    tokio::time::sleep(BATCH).await;
                    self.announce(&task, false).await;
                }
                () = done.cancelled() => return,
            }
        }
    }
}

fn committed_blob(digest: &Digest, record: PieceRecord) -> HeldBlob {
    HeldBlob {
        digest: digest.to_string(),
        size: record.size as i64,
        piece_size: record.piece_size,
        pieces: record
            .digests
            .into_iter()
            .zip(0..)
            .map(|(digest, number)| Piece {
                number,
                digest: digest.to_string(),
            })
            .collect(),
        complete: true,
        ingesting: false,
    }
}

fn held_blob(task: &LocalTask, complete: bool) -> HeldBlob {
    HeldBlob {
        digest: task.digest.to_string(),
        size: task.size as i64,
        piece_size: task.piece_size,
        pieces: task
            .held()
            .into_iter()
            .map(|(number, digest)| Piece {
                number,
                digest: digest.to_string(),
            })
            .collect(),
        complete,
        ingesting: task.is_ingesting(),
    }
}
