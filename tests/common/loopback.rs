//! The in-process mesh on loopback: supernodes and daemons' meshes on
//! 127.0.0.x ports, each on a tokio runtime of its own, so that dropping a
//! runtime stops that node at once (its piece server and heartbeats), as a
//! crash would; `stop` stops one cleanly, through its shutdown handle. No
//! root, no processes, seconds. Blobs enter and leave a node's store the way
//! the content plugin moves them: a [`BlobSession`] around the ingest of a
//! `layer-` ref.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use damselfly::mesh::session::BlobSession;
use damselfly::mesh::{Mesh, MeshConfig};
use damselfly::shutdown::{STOP_WITHIN, Shutdown, Unfinished};
use damselfly::store::{Digest, Ingest, Store};
use damselfly::supernode::scheduler::SchedulerConfig;
use tokio::runtime::Runtime;

/// Heartbeats the supernodes ask for: a silent host is dropped after three
/// missed ones, well under a second.
pub const HEARTBEAT: Duration = Duration::from_millis(200);

/// A fresh multi-threaded runtime (the store is reached with
/// `block_in_place`, which needs one).
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime")
}

/// A free TCP port on `ip`.
fn free_port_on(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A supernode served by [`damselfly::supernode::serve`] (no repo) on its
/// own runtime; dropping it stops it.
pub struct LoopSupernode {
    /// `ip:port` of its gRPC API, what daemons are configured with.
    pub addr: String,
    /// `ip:port` of its `/metrics`.
    pub metrics: String,
    pub shutdown: Shutdown,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    runtime: Runtime,
}

impl LoopSupernode {
    /// Serves a supernode on `ip`, on `port` (0: any free one).
    pub fn start(ip: Ipv4Addr, port: u16) -> Self {
        let runtime = runtime();
        let (grpc, metrics) = runtime.block_on(async {
            let grpc = tokio::net::TcpListener::bind((ip, port)).await;
            let metrics = tokio::net::TcpListener::bind((ip, 0)).await;
            (grpc.expect("bind gRPC"), metrics.expect("bind metrics"))
        });
        let addr = grpc.local_addr().unwrap().to_string();
        let metrics_addr = metrics.local_addr().unwrap().to_string();
        let config = SchedulerConfig {
            heartbeat_interval: HEARTBEAT,
            ..SchedulerConfig::default()
        };
        let shutdown = Shutdown::new();
        let served = runtime.spawn(damselfly::supernode::serve(
            config,
            grpc,
            metrics,
            None,
            shutdown.clone(),
        ));
        Self {
            addr,
            metrics: metrics_addr,
            shutdown,
            served: Some(served),
            runtime,
        }
    }

    /// Cancels its shutdown handle and waits for `serve` to return (it
    /// waits for its own tasks), keeping the runtime: what `serve` says.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let served = self.served.take().expect("stopped once");
        self.runtime.block_on(async {
            tokio::time::timeout(STOP_WITHIN * 2, served)
                .await
                .map_err(|_| anyhow::anyhow!("serve did not return"))?
                .map_err(|e| anyhow::anyhow!("serve panicked: {e}"))?
        })
    }

    /// The value of the sample `name` on its metrics page (0 if absent).
    pub fn metric(&self, name: &str) -> u64 {
        let text = block_on_fresh(super::scrape(&self.metrics));
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse::<f64>().expect("a number") as u64)
    }
}

/// Runs `future` on a runtime of its own (for calls made from a test's own
/// thread, outside every node's runtime).
pub fn block_on_fresh<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a runtime")
        .block_on(future)
}

/// One daemon's store and mesh on its own address 127.0.0.`n`, on its own
/// runtime; dropping it stops its piece server and heartbeats.
pub struct LoopNode {
    pub mesh: Arc<Mesh>,
    pub store: Arc<Store>,
    pub shutdown: Shutdown,
    pub runtime: Runtime,
    _dir: tempfile::TempDir,
}

impl LoopNode {
    /// A node on 127.0.0.`n` using `supernodes`, whose downloads fall back
    /// to the registry after `stall_timeout` without progress.
    pub fn start(n: u8, supernodes: &[&str], stall_timeout: Duration) -> Self {
        let dir = tempfile::tempdir().expect("create a data dir");
        let store = Store::open(dir.path()).expect("open the store");
        let ip = Ipv4Addr::new(127, 0, 0, n);
        let config = MeshConfig {
            supernodes: supernodes.iter().map(|s| (*s).to_owned()).collect(),
            advertise_ip: IpAddr::V4(ip),
            upload_port: free_port_on(ip),
            upload_slots: 4,
            download_parallelism: 4,
            stall_timeout,
            supernode: false,
        };
        let runtime = runtime();
        let shutdown = Shutdown::new();
        let mesh = runtime
            .block_on(Mesh::start(config, store.clone(), &shutdown))
            .expect("start the mesh");
        Self {
            mesh,
            store,
            shutdown,
            runtime,
            _dir: dir,
        }
    }

    /// Stops its piece server and heartbeats through its shutdown handle,
    /// keeping the runtime: whether they all ended in time.
    pub fn stop(&self) -> Result<(), Unfinished> {
        self.runtime.block_on(self.shutdown.stop(STOP_WITHIN))
    }

    /// The address peers know this node by (its host id).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.mesh.config.advertise_ip, self.mesh.config.upload_port)
    }

    /// Opens a Write for `blob` as the content plugin does: the ingest of
    /// its `layer-` ref and the mesh session that joins its task.
    pub fn open(&self, blob: &[u8]) -> Write {
        let digest = Digest::of(blob);
        let reference = format!("test/1/layer-{digest}");
        let total = blob.len() as i64;
        let _guard = self.runtime.enter();
        let session = BlobSession::start(&self.mesh, &reference, total).expect("a layer session");
        let ingest = self
            .store
            .writer(&reference, total, Some(digest.clone()))
            .expect("open the ingest");
        Write {
            session,
            ingest,
            digest,
            total,
        }
    }

    /// The second STAT of a Write: settles the role, and for a downloader
    /// downloads from peers until complete, taken over or stalled. Returns
    /// the ingest's offset then (the size: complete).
    pub fn settle(&self, write: &mut Write) -> i64 {
        self.runtime.block_on(async {
            write
                .session
                .before_stat(&mut write.ingest, std::future::pending())
                .await
                .expect("settle the role");
        });
        write.ingest.offset()
    }

    /// containerd streams `blob` from the registry into the ingest, from its
    /// offset up to `end`, in 64 KiB writes.
    pub fn write_from_registry(&self, write: &mut Write, blob: &[u8], end: usize) {
        let _guard = self.runtime.enter();
        let mut offset = write.ingest.offset() as usize;
        while offset < end {
            let chunk = &blob[offset..end.min(offset + (64 << 10))];
            write
                .ingest
                .write(offset as i64, chunk)
                .expect("write the ingest");
            let after = write.ingest.offset();
            write.session.wrote(offset as i64, after, chunk);
            offset = after as usize;
        }
    }

    /// Commits the Write (checked against its digest) and tells the mesh.
    pub fn commit(&self, mut write: Write) -> Digest {
        let _guard = self.runtime.enter();
        let digest = write
            .ingest
            .commit(write.total, Some(&write.digest), HashMap::new())
            .expect("commit");
        write.session.committed();
        digest
    }

    /// Ingests `blob` as the registry's node: open, settle (it must be told
    /// to ingest), stream all of it, commit.
    pub fn ingest(&self, blob: &[u8]) -> Digest {
        let mut write = self.open(blob);
        assert_eq!(self.settle(&mut write), 0, "a new blob starts from 0");
        self.write_from_registry(&mut write, blob, blob.len());
        self.commit(write)
    }

    /// A counter of this node's mesh stats.
    pub fn stat(
        &self,
        pick: impl Fn(&damselfly::mesh::MeshStats) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        pick(&self.mesh.stats).load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One containerd Write in progress on a [`LoopNode`].
pub struct Write {
    pub session: BlobSession,
    pub ingest: Ingest,
    pub digest: Digest,
    total: i64,
}

/// `len` bytes that differ from piece to piece (so a misplaced piece shows).
pub fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}
