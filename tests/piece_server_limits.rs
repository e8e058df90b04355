//! A piece server that can't be held (issue 8, "Must be shown" 4): a host
//! of the test net that holds 40 connections which pipeline GETs and never
//! read, and 200 idle ones, against the only node holding an image, does
//! not stop another node's pull through the mesh; the server says so in its
//! metrics, its log stays bounded, and its CPU idles once the attacker is
//! gone. `Range` within a piece gets 206, an absurd one 416.

mod common;

use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::mesh::{metric, scrape, start_nodes, start_supernode, testbed, with_infra};
use common::netns::Host;

/// The attacker: `held` connections that each send 50 GETs of `path` and
/// never read, and `idle` connections that send nothing, all kept open (a
/// connection the server closes is opened again) until killed.
const ATTACKER: &str = r#"
import socket, sys, time
addr, path, held, idle = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
host, port = addr.split(":")
req = ("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode() * 50
def open_one(send):
    try:
        s = socket.create_connection((host, int(port)), timeout=2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if send:
            s.sendall(req)
        s.setblocking(False)
        return s
    except OSError:
        return None
conns = [(open_one(True), True) for _ in range(held)] + [(open_one(False), False) for _ in range(idle)]
while True:
    time.sleep(0.5)
    for i, (s, send) in enumerate(conns):
        closed = s is None
        if not closed:
            try:
                closed = s.recv(1, socket.MSG_PEEK) == b"" if not send else False
            except BlockingIOError:
                pass
            except OSError:
                closed = True
        if closed:
            if s is not None:
                s.close()
            conns[i] = (open_one(send), send)
"#;

struct Attacker(Child);

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn attack(host: &Host, addr: &str, path: &str, held: u32, idle: u32) -> Attacker {
    let child = host
        .command("python3")
        .args([
            "-c",
            ATTACKER,
            addr,
            path,
            &held.to_string(),
            &idle.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the attacker");
    Attacker(child)
}

/// HTTP status of a GET of `url` with header `range`, from inside `host`.
fn status_with_range(host: &Host, url: &str, range: &str) -> String {
    let out = host
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            range,
            url,
        ])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn non_reading_and_idle_connections_do_not_stop_a_pull_through_the_mesh() {
    const NODES: [&str; 2] = ["a", "b"];
    let mut hosts = with_infra(&NODES);
    hosts.push("attacker");
    let (scratch, _logs, net, registry) = testbed("piece_server_limits", &hosts);
    let catalog = registry.push("small");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image("damselfly/multi:v1");
    let reference = format!("{}/{}", registry.host, image.reference);
    nodes[0].containerd.pull(&registry.host, &image.reference);
    let layer = image
        .amd64_blobs()
        .into_iter()
        .max_by_key(|b| b.size)
        .expect("a layer");
    let hex = layer.digest.strip_prefix("sha256:").unwrap().to_owned();
    let a_addr = format!("{}:65002", net.host("a").ip());
    let path = format!("/pieces/sha256/{hex}/0");
    let url = format!("http://{a_addr}{path}");
    let attacker = net.host("attacker");

    assert_eq!(
        status_with_range(attacker, &url, "Range: bytes=0-99"),
        "206"
    );
    assert_eq!(
        status_with_range(attacker, &url, "Range: bytes=99999999999-"),
        "416"
    );

    let a_metrics = || scrape(net.host("a"), "127.0.0.1:65003");
    let a_lines_before = nodes[0].dfdaemon.log_text().lines().count();
    let flood = attack(attacker, &a_addr, &path, 40, 200);
    sleep(Duration::from_secs(2));
    let start = Instant::now();
    let out = nodes[1].containerd.ctr(&[
        "--timeout",
        "120s",
        "image",
        "pull",
        "--plain-http",
        &reference,
    ]);
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "b's pull failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = scrape(net.host("b"), "127.0.0.1:65003");
    let from_peer = metric(&b, r#"dfdaemon_received_bytes_total{source="peer"}"#);
    let from_registry = metric(&b, r#"dfdaemon_received_bytes_total{source="registry"}"#);
    let during = a_metrics();
    let refused = metric(
        &during,
        r#"dfdaemon_piece_connections_refused_total{cap="per_peer"}"#,
    );
    let stalled = metric(
        &during,
        r#"dfdaemon_piece_timeouts_total{kind="stalled_slot"}"#,
    );
    eprintln!(
        "b pulled in {:.2} s under attack: {from_peer} bytes from peers, {from_registry} from the \
         registry; a refused {refused} connections per peer, took back {stalled} stalled slots",
        took.as_secs_f64()
    );
    assert!(from_peer >= layer.size, "b got its layers through the mesh");
    assert!(refused > 0, "the per-peer cap refused connections");
    assert!(stalled > 0, "stalled uploads gave their slots back");

    drop(flood);
    common::wait_for(
        "a to close the attacker's connections",
        Duration::from_secs(30),
        || metric(&a_metrics(), "dfdaemon_piece_connections") == 0,
    );
    let pid = nodes[0].dfdaemon.pid();
    let before = cpu_ticks(pid);
    sleep(Duration::from_secs(1));
    let quiet = cpu_ticks(pid) - before;
    let lines = nodes[0].dfdaemon.log_text().lines().count() - a_lines_before;
    eprintln!("a: {quiet} CPU ticks in a quiet second, {lines} log lines during the attack");
    assert!(
        quiet <= 10,
        "a's CPU idles once the attacker is gone: {quiet} ticks"
    );
    assert!(lines < 1000, "a's log stays bounded: {lines} lines");
}
