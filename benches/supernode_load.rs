//! Supernode load benchmark: 10,000 simulated daemons fetch one 1 GiB blob
//! (1024 pieces of 1 MiB) through the supernode. One seeds the whole blob; the
//! others repeatedly Schedule a window of the pieces they miss and, one pass
//! over all daemons later (the transfers stay in flight meanwhile, so upload
//! caps bind), Report each transfer OK and Announce what they got, until all
//! are complete.
//!
//! It runs twice: against the scheduler alone, in-process (its own cost), then
//! against the real gRPC service on a loopback port, many requests in flight
//! over a few shared channels (scheduler + transport). For each it prints
//! Schedule calls/s, assignments/s, the Schedule latency p50/p99 and the
//! process's peak RSS (VmHWM; the gRPC run includes the simulated clients).
//! Last, it measures how many Heartbeats/s the service answers.
//!
//! `cargo bench --bench supernode_load`; `SUPERNODE_LOAD_HOSTS=N` and
//! `SUPERNODE_LOAD_WINDOW=N` change the number of hosts and the window.
//! Simulated daemons do not heartbeat during the fetch: the heartbeat
//! interval is set long enough that none expires.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use damselfly::protocol::api::supernode_client::SupernodeClient;
use damselfly::protocol::api::{
    AnnounceRequest, Assignment, HeartbeatRequest, HeldBlob, Host, JoinRequest, Outcome, Piece,
    PieceResult, RegisterRequest, ReportRequest, Role, ScheduleRequest,
};
use damselfly::protocol::piece::{piece_count, piece_size};
use damselfly::store::Digest;
use damselfly::supernode::scheduler::{Scheduler, SchedulerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};

const BLOB_SIZE: u64 = 1 << 30;
/// Pieces a daemon asks parents for at once (the first ones it misses); the
/// default, 256, is all of them: the plugin path needs the whole blob before
/// it answers containerd.
const WINDOW: usize = 256;
/// Requests in flight at once in the gRPC run.
const IN_FLIGHT: usize = 64;
/// gRPC channels (HTTP/2 connections) the simulated daemons share.
const CHANNELS: usize = 4;
/// A run stops here even if some daemons are not complete.
const TIME_LIMIT: Duration = Duration::from_secs(50);
/// How long the Heartbeat throughput is measured.
const HEARTBEAT_RUN: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let hosts = env_or("SUPERNODE_LOAD_HOSTS", 10_000)?;
    let config = SchedulerConfig {
        heartbeat_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let blob = Arc::new(Workload::new(env_or("SUPERNODE_LOAD_WINDOW", WINDOW)?));
    println!(
        "supernode load: {hosts} hosts, one {} MiB blob of {} pieces of {} MiB, \
         window {}, upload cap {}",
        BLOB_SIZE >> 20,
        blob.pieces.len(),
        blob.piece_size >> 20,
        blob.window,
        config.upload_cap
    );

    let state = state_size(&config, &blob, hosts);
    println!("scheduler state with {hosts} hosts holding the whole blob: {state}");

    reset_peak_rss();
    let local = Mesh::Local(Box::new(Mutex::new(Scheduler::new(config.clone()))));
    let stats = simulate(Arc::new(local), &blob, hosts, 1).await;
    stats.print("scheduler alone, in-process, 1 request at a time");

    reset_peak_rss();
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let metrics = TcpListener::bind("127.0.0.1:0").await?;
    let (grpc_addr, metrics_addr) = (grpc.local_addr()?, metrics.local_addr()?);
    let shutdown = damselfly::shutdown::Shutdown::new();
    let server = tokio::spawn(damselfly::supernode::serve(
        config,
        grpc,
        metrics,
        None,
        shutdown.clone(),
    ));
    let clients = connect(&format!("http://{grpc_addr}")).await?;
    let mesh = Arc::new(Mesh::Grpc(clients));
    let stats = simulate(mesh.clone(), &blob, hosts, IN_FLIGHT).await;
    stats.print(&format!(
        "gRPC on loopback, {IN_FLIGHT} requests in flight over {CHANNELS} channels"
    ));
    println!("  supernode's own count: {}", scrape(metrics_addr).await?);
    let heartbeats = heartbeat_rate(&mesh, hosts).await;
    println!("heartbeats: {heartbeats:.0}/s answered ({IN_FLIGHT} in flight)");

    shutdown.cancel();
    server.await??;
    Ok(())
}

/// The blob every simulated daemon fetches, and how.
struct Workload {
    digest: String,
    piece_size: u64,
    /// The digest of each piece.
    pieces: Vec<String>,
    /// Pieces asked for per Schedule call.
    window: usize,
}

impl Workload {
    fn new(window: usize) -> Self {
        let piece_size = piece_size(BLOB_SIZE);
        let count = piece_count(BLOB_SIZE, piece_size);
        Self {
            digest: Digest::of(b"a 1 GiB layer").to_string(),
            piece_size,
            pieces: (0..count)
                .map(|n| Digest::of(&n.to_le_bytes()).to_string())
                .collect(),
            window,
        }
    }

    fn held(&self, numbers: impl IntoIterator<Item = u32>, complete: bool) -> HeldBlob {
        HeldBlob {
            digest: self.digest.clone(),
            size: BLOB_SIZE as i64,
            piece_size: self.piece_size,
            pieces: numbers
                .into_iter()
                .map(|number| Piece {
                    number,
                    digest: self.pieces[number as usize].clone(),
                })
                .collect(),
            complete,
            ingesting: false,
        }
    }
}

/// Where the simulated daemons send their requests.
enum Mesh {
    /// Straight into a scheduler.
    Local(Box<Mutex<Scheduler>>),
    /// Through gRPC clients, one per channel.
    Grpc(Vec<SupernodeClient<Channel>>),
}

/// Calls one RPC on either kind of [`Mesh`], `$i` picking the channel.
macro_rules! call {
    ($mesh:expr, $i:expr, $rpc:ident, $request:expr) => {
        match $mesh {
            Mesh::Local(scheduler) => {
                let mut scheduler = scheduler.lock().unwrap();
                scheduler.$rpc(&$request, Instant::now()).unwrap()
            }
            Mesh::Grpc(clients) => {
                let mut client = clients[$i % clients.len()].clone();
                client.$rpc($request).await.unwrap().into_inner()
            }
        }
    };
}

/// One simulated daemon.
struct Daemon {
    index: usize,
    id: String,
    have: Vec<bool>,
    missing: usize,
    /// Assigned in the last round, not reported yet.
    in_flight: Vec<Assignment>,
}

impl Daemon {
    fn new(index: usize, pieces: usize) -> Self {
        Self {
            index,
            id: format!("node-{index:05}"),
            have: vec![false; pieces],
            missing: pieces,
            in_flight: Vec::new(),
        }
    }

    /// Registers and joins; the first daemon becomes the ingester and
    /// announces the whole blob at once.
    async fn start(&mut self, mesh: &Mesh, blob: &Workload) {
        let register = RegisterRequest {
            host: Some(Host {
                id: self.id.clone(),
                ip: "10.0.0.1".into(),
                upload_port: 65002,
                supernode: false,
            }),
            blobs: vec![],
        };
        call!(mesh, self.index, register, register);
        let join = JoinRequest {
            host_id: self.id.clone(),
            digest: blob.digest.clone(),
            size: BLOB_SIZE as i64,
        };
        let role = call!(mesh, self.index, join, join).role();
        if role == Role::Ingest {
            let all = 0..blob.pieces.len() as u32;
            let announce = AnnounceRequest {
                host_id: self.id.clone(),
                blob: Some(blob.held(all, true)),
            };
            call!(mesh, self.index, announce, announce);
            self.have.fill(true);
            self.missing = 0;
        }
    }

    /// One round: Report and Announce the transfers assigned in the previous
    /// round (a transfer lasts one pass over all daemons, so uploads really
    /// are in flight meanwhile), then Schedule the next window. Returns the
    /// Schedule call's latency and assignment count, or None when complete.
    async fn round(&mut self, mesh: &Mesh, blob: &Workload) -> Option<(Duration, usize)> {
        if !self.in_flight.is_empty() {
            self.finish_transfers(mesh, blob).await;
        }
        if self.missing == 0 {
            return None;
        }
        let contiguous = self.have.iter().take_while(|&&h| h).count() as u64 * blob.piece_size;
        let schedule = ScheduleRequest {
            host_id: self.id.clone(),
            digest: blob.digest.clone(),
            wanted: (0..self.have.len() as u32)
                .filter(|&n| !self.have[n as usize])
                .take(blob.window)
                .collect(),
            contiguous: contiguous.min(BLOB_SIZE) as i64,
            // It starts every transfer it is given.
            max_assignments: 0,
            wait_ms: 0,
        };
        let started = Instant::now();
        let response = call!(mesh, self.index, schedule, schedule);
        let latency = started.elapsed();
        self.in_flight = response.assignments;
        Some((latency, self.in_flight.len()))
    }

    /// Reports the transfers in flight as OK and announces their pieces.
    async fn finish_transfers(&mut self, mesh: &Mesh, blob: &Workload) {
        let done = std::mem::take(&mut self.in_flight);
        let report = ReportRequest {
            host_id: self.id.clone(),
            digest: blob.digest.clone(),
            results: done
                .iter()
                .map(|a| PieceResult {
                    number: a.number,
                    parent_id: a.parent.as_ref().unwrap().host_id.clone(),
                    outcome: Outcome::Ok.into(),
                })
                .collect(),
        };
        call!(mesh, self.index, report, report);
        for assignment in &done {
            self.have[assignment.number as usize] = true;
        }
        self.missing -= done.len();
        let announce = AnnounceRequest {
            host_id: self.id.clone(),
            blob: Some(blob.held(done.iter().map(|a| a.number), self.missing == 0)),
        };
        call!(mesh, self.index, announce, announce);
    }
}

/// What one run measured.
#[derive(Default)]
struct Stats {
    hosts: usize,
    complete: usize,
    setup: Duration,
    elapsed: Duration,
    schedules: usize,
    assignments: usize,
    latencies: Vec<Duration>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.complete += other.complete;
        self.schedules += other.schedules;
        self.assignments += other.assignments;
        self.latencies.extend(other.latencies);
    }

    fn print(mut self, title: &str) {
        self.latencies.sort_unstable();
        let quantile = |q: f64| {
            let index = ((self.latencies.len() as f64 * q) as usize).min(self.latencies.len() - 1);
            self.latencies[index]
        };
        let seconds = self.elapsed.as_secs_f64();
        println!("[{title}]");
        println!(
            "  setup: {} registers + joins in {:.2} s ({:.0}/s)",
            self.hosts,
            self.setup.as_secs_f64(),
            self.hosts as f64 / self.setup.as_secs_f64()
        );
        println!(
            "  fetch: {}/{} hosts complete in {seconds:.2} s",
            self.complete, self.hosts
        );
        println!(
            "  Schedule: {} calls ({:.0}/s), {} assignments ({:.0}/s)",
            self.schedules,
            self.schedules as f64 / seconds,
            self.assignments,
            self.assignments as f64 / seconds
        );
        let total: Duration = self.latencies.iter().sum();
        println!(
            "  Schedule latency: mean {:?}, p50 {:?}, p99 {:?}, max {:?}",
            total / self.latencies.len() as u32,
            quantile(0.50),
            quantile(0.99),
            quantile(1.0)
        );
        println!("  peak RSS (VmHWM): {}", peak_rss());
    }
}

/// Registers `hosts` daemons and runs rounds, `workers` requests in flight,
/// until every daemon is complete or [`TIME_LIMIT`].
async fn simulate(mesh: Arc<Mesh>, blob: &Arc<Workload>, hosts: usize, workers: usize) -> Stats {
    let pieces = blob.pieces.len();
    let mut seed = Daemon::new(0, pieces);
    let started = Instant::now();
    seed.start(&mesh, blob).await;
    let mut groups: Vec<Vec<Daemon>> = (0..workers).map(|_| Vec::new()).collect();
    for index in 1..hosts {
        groups[index % workers].push(Daemon::new(index, pieces));
    }
    let groups = in_parallel(groups, |mut daemons| {
        let (mesh, blob) = (mesh.clone(), blob.clone());
        async move {
            for daemon in &mut daemons {
                daemon.start(&mesh, &blob).await;
            }
            daemons
        }
    })
    .await;
    let setup = started.elapsed();

    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    let results = in_parallel(groups, |daemons| {
        let (mesh, blob) = (mesh.clone(), blob.clone());
        fetch(mesh, blob, daemons, deadline)
    })
    .await;
    let mut stats = Stats {
        hosts,
        complete: 1,
        setup,
        elapsed: started.elapsed(),
        ..Default::default()
    };
    for result in results {
        stats.merge(result);
    }
    stats
}

/// Runs rounds for `daemons`, one at a time in turn, until all are complete
/// or `deadline`.
async fn fetch(
    mesh: Arc<Mesh>,
    blob: Arc<Workload>,
    daemons: Vec<Daemon>,
    deadline: Instant,
) -> Stats {
    let mut stats = Stats::default();
    let mut pending = daemons;
    while !pending.is_empty() && Instant::now() < deadline {
        for daemon in &mut pending {
            if let Some((latency, assigned)) = daemon.round(&mesh, &blob).await {
                stats.schedules += 1;
                stats.assignments += assigned;
                stats.latencies.push(latency);
            }
        }
        let before = pending.len();
        pending.retain(|d| d.missing > 0);
        stats.complete += before - pending.len();
    }
    stats
}

/// Runs `work` on each group as its own task and collects the results in order.
async fn in_parallel<G, T, F>(groups: Vec<G>, work: impl Fn(G) -> F) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = groups.into_iter().map(|g| tokio::spawn(work(g))).collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("simulated daemons panicked"));
    }
    results
}

/// Heartbeats answered per second, [`IN_FLIGHT`] at a time, for
/// [`HEARTBEAT_RUN`].
async fn heartbeat_rate(mesh: &Arc<Mesh>, hosts: usize) -> f64 {
    let started = Instant::now();
    let counts = in_parallel((0..IN_FLIGHT).collect(), |worker| {
        let mesh = mesh.clone();
        async move {
            let mut sent = 0usize;
            while started.elapsed() < HEARTBEAT_RUN {
                let heartbeat = HeartbeatRequest {
                    host_id: format!("node-{:05}", (worker + sent * IN_FLIGHT) % hosts),
                    uploads_in_use: 0,
                };
                let response = call!(&*mesh, worker, heartbeat, heartbeat);
                assert!(!response.reregister);
                sent += 1;
            }
            sent
        }
    })
    .await;
    counts.iter().sum::<usize>() as f64 / started.elapsed().as_secs_f64()
}

async fn connect(url: &str) -> anyhow::Result<Vec<SupernodeClient<Channel>>> {
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        let channel = Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect to {url}"))?;
        clients.push(SupernodeClient::new(channel));
    }
    Ok(clients)
}

/// The supernode's schedule and assignment counters, read from `/metrics`.
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let counters: Vec<&str> = answer
        .lines()
        .filter(|l| {
            l.starts_with("damselfly_supernode_schedule_requests_total")
                || l.starts_with("damselfly_supernode_assignments_total")
        })
        .collect();
    Ok(counters.join(", "))
}

/// The number in environment variable `name`, or `default`.
fn env_or(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(value) => value.parse().with_context(|| format!("{name}={value:?}")),
        Err(_) => Ok(default),
    }
}

/// Resets the process's VmHWM to its current RSS, so that each run reports
/// its own peak.
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        println!("(could not reset the peak RSS: {e})");
    }
}

fn peak_rss() -> String {
    status_kib("VmHWM:").map_or_else(|| "unknown".into(), |kib| format!("{} MiB", kib / 1024))
}

/// How much the RSS grows when a scheduler learns that `hosts` hosts hold the
/// whole blob: its largest state for this workload.
fn state_size(config: &SchedulerConfig, blob: &Workload, hosts: usize) -> String {
    let before = status_kib("VmRSS:");
    let mut scheduler = Scheduler::new(config.clone());
    let all = 0..blob.pieces.len() as u32;
    for index in 0..hosts {
        let register = RegisterRequest {
            host: Some(Host {
                id: format!("node-{index:05}"),
                ip: "10.0.0.1".into(),
                upload_port: 65002,
                supernode: false,
            }),
            blobs: vec![blob.held(all.clone(), true)],
        };
        scheduler.register(&register, Instant::now()).unwrap();
    }
    let after = status_kib("VmRSS:");
    drop(scheduler);
    match (before, after) {
        (Some(before), Some(after)) => format!("+{} MiB RSS", after.saturating_sub(before) / 1024),
        _ => "unknown".into(),
    }
}

/// A `kB` field of /proc/self/status.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
