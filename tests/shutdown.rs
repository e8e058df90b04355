//! A daemon stops cleanly: a real dfdaemon (both plugin sockets, in the mesh
//! of a real supernode with its repo) and that supernode exit 0 within
//! seconds of SIGTERM, leave no socket behind and free their ports; and in
//! one process, cancelling a supernode's and a node's shutdown handles ends
//! every task they spawned (piece server and its connections, heartbeats,
//! expiry, listeners) while their runtimes live on.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::loopback::{LoopNode, LoopSupernode, blob, block_on_fresh};
use common::{Proc, Scratch, free_port, require_root, scrape, wait_for};

/// Longer than STOP_WITHIN (5 s): a daemon that waited for a stuck task
/// and gave up still exits in this time, but not with 0.
const EXIT_WITHIN: Duration = Duration::from_secs(8);
const STARTUP: Duration = Duration::from_secs(30);

/// Whether a listener could be bound on `addr` now.
fn bindable(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The value of sample `name` on the `/metrics` page at `addr` (0 if absent).
fn metric(addr: SocketAddr, name: &str) -> u64 {
    let text = block_on_fresh(scrape(&addr.to_string()));
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().expect("a number") as u64)
}

/// Sends SIGTERM and checks the process exits 0 in [`EXIT_WITHIN`].
fn assert_stops_cleanly(proc: &mut Proc, what: &str) {
    let asked = Instant::now();
    let status = proc.terminate_within(EXIT_WITHIN);
    let log = proc.log_text();
    let status = status.unwrap_or_else(|| {
        panic!("{what} still runs {EXIT_WITHIN:?} after SIGTERM; its log:\n{log}")
    });
    assert!(
        status.success(),
        "{what} exited with {status}; its log:\n{log}"
    );
    eprintln!("{what} exited 0, {:?} after SIGTERM", asked.elapsed());
}

#[test]
fn dfdaemon_and_supernode_exit_0_on_sigterm_and_free_their_sockets_and_ports() {
    require_root!();
    let scratch = Scratch::new();
    let (grpc, supernode_metrics, repo_port) = (free_port(), free_port(), free_port());
    let mut supernode = Proc::spawn(
        "supernode",
        Command::new(env!("CARGO_BIN_EXE_supernode"))
            .arg("--data-dir")
            .arg(scratch.join("supernode-data"))
            .arg("--listen")
            .arg(local(grpc).to_string())
            .args(["--advertise-ip", "127.0.0.1", "--heartbeat-ms", "200"])
            .arg("--metrics-listen")
            .arg(local(supernode_metrics).to_string())
            .arg("--upload-port")
            .arg(repo_port.to_string())
            .env("RUST_LOG", "info"),
        scratch.join("supernode.log"),
    );
    wait_for("the supernode's API", STARTUP, || {
        TcpStream::connect(local(grpc)).is_ok()
    });

    let (content, snapshot) = (scratch.join("content.sock"), scratch.join("snapshot.sock"));
    let (upload, daemon_metrics) = (free_port(), free_port());
    let mut dfdaemon = Proc::spawn(
        "dfdaemon",
        Command::new(env!("CARGO_BIN_EXE_dfdaemon"))
            .arg("--data-dir")
            .arg(scratch.join("dfdaemon-data"))
            .arg("--content-socket")
            .arg(&content)
            .arg("--snapshot-socket")
            .arg(&snapshot)
            .arg("--supernode")
            .arg(local(grpc).to_string())
            .args(["--advertise-ip", "127.0.0.1"])
            .arg("--upload-port")
            .arg(upload.to_string())
            .arg("--metrics-listen")
            .arg(local(daemon_metrics).to_string())
            .arg("--containerd-socket")
            .arg(scratch.join("no-containerd.sock"))
            .env("RUST_LOG", "info"),
        scratch.join("dfdaemon.log"),
    );
    let serving = |socket: &Path| std::os::unix::net::UnixStream::connect(socket).is_ok();
    wait_for("dfdaemon's plugin sockets", STARTUP, || {
        serving(&content) && serving(&snapshot)
    });
    // Both the daemon and the repo registered: their heartbeats run.
    wait_for("two hosts on the supernode", STARTUP, || {
        metric(local(supernode_metrics), "damselfly_supernode_hosts") == 2
    });
    let daemon_ports = [local(upload), local(daemon_metrics)];
    assert!(
        daemon_ports.iter().all(|&addr| !bindable(addr)),
        "dfdaemon listens on its ports"
    );
    // An idle peer connection to the piece server does not hold it up.
    let _peer = TcpStream::connect(local(upload)).expect("connect to the piece server");

    assert_stops_cleanly(&mut dfdaemon, "dfdaemon");
    for socket in [&content, &snapshot] {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
    for addr in daemon_ports {
        assert!(
            bindable(addr),
            "{addr} is still taken after dfdaemon exited"
        );
    }

    assert_stops_cleanly(&mut supernode, "supernode");
    for addr in [local(grpc), local(supernode_metrics), local(repo_port)] {
        assert!(
            bindable(addr),
            "{addr} is still taken after the supernode exited"
        );
    }
}

#[test]
fn cancelling_the_handles_ends_every_task_of_an_in_process_supernode_and_node() {
    let mut supernode = LoopSupernode::start(Ipv4Addr::new(127, 0, 0, 41), 0);
    let long = Duration::from_secs(30);
    let ingester = LoopNode::start(42, &[&supernode.addr], long);
    let downloader = LoopNode::start(43, &[&supernode.addr], long);
    let data = blob(5 << 20, 41);
    ingester.ingest(&data);
    let mut write = downloader.open(&data);
    assert_eq!(
        downloader.settle(&mut write),
        data.len() as i64,
        "from the peer"
    );
    downloader.commit(write);
    assert_eq!(supernode.metric("damselfly_supernode_hosts"), 2);
    let piece_server = ingester.addr();
    assert!(!bindable(piece_server), "the piece server listens");
    // A kept-alive connection the piece server would hold for its idle
    // timeout (10 s) if its task outlived the shutdown.
    let mut idle = TcpStream::connect(piece_server).expect("connect to the piece server");
    wait_for("the piece server to take the connection", long, || {
        ingester.mesh.piece_server.connections_open() == 1
    });

    let stopping = Instant::now();
    ingester.stop().expect("the node's tasks all end");
    assert_eq!(ingester.shutdown.running(), 0);
    assert!(bindable(piece_server), "the piece server's port is free");
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    let closed = idle.read(&mut byte);
    assert!(
        matches!(closed, Ok(0))
            || closed
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the idle connection was closed by the shutdown: {closed:?}"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "stopped in {:?}",
        stopping.elapsed()
    );
    // Its heartbeats stopped: the supernode drops it after three missed ones.
    wait_for(
        "the stopped node to expire",
        Duration::from_secs(10),
        || supernode.metric("damselfly_supernode_hosts") == 1,
    );

    downloader.stop().expect("the other node's tasks all end");
    let (grpc, metrics): (SocketAddr, SocketAddr) = (
        supernode.addr.parse().unwrap(),
        supernode.metrics.parse().unwrap(),
    );
    supernode
        .stop()
        .expect("serve returns Ok once its tasks ended");
    assert_eq!(supernode.shutdown.running(), 0);
    assert!(
        bindable(grpc) && bindable(metrics),
        "the supernode's ports are free"
    );
}
