//! The multi-host test bed (tests/common/netns.rs) works: hosts in their own
//! network namespaces reach each other and the root namespace over a bridge,
//! a registry and nodes run inside hosts, link shaping applies in both
//! directions, byte counters measure a host's traffic, and nothing is left
//! behind, even after a panic or a crashed run.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::netns::{Host, TestNet, cleanup_stale, pick_subnet};
use common::{Node, Proc, Registry, Scratch, wait_for};

const MIB: u64 = 1024 * 1024;

/// A registry inside one host serves `damselfly/multi:v1` to nodes inside
/// two others: the test pushes through the bridge from the root namespace,
/// each node's blobs land in its own dfdaemon, and the registry host's
/// `tx_bytes` counts both copies (the measurement the mesh tests use), which
/// reached each node over its own link.
#[test]
fn registry_in_one_host_serves_nodes_in_two_others() {
    common::require_root!();
    let scratch = Scratch::new();
    let net = TestNet::new(&["registry", "node1", "node2"]);
    let registry = Registry::start_in(&scratch, Some(net.host("registry")));
    let catalog = registry.push("small");
    let nodes: Vec<Node> = ["node1", "node2"]
        .iter()
        .map(|name| Node::start_in(&scratch, net.host(name), &registry, Vec::new()))
        .collect();
    let image = catalog.image("damselfly/multi:v1");
    let blobs = image.amd64_blobs();
    let size: u64 = blobs.iter().map(|b| b.size).sum();
    let expected: BTreeSet<String> = blobs.into_iter().map(|b| b.digest).collect();

    let sent_before = net.host("registry").tx_bytes();
    let received_before: Vec<u64> = node_hosts(&net).map(Host::rx_bytes).collect();
    for node in &nodes {
        node.containerd.pull(&registry.host, &image.reference);
    }
    let sent = net.host("registry").tx_bytes() - sent_before;
    let received: Vec<u64> = node_hosts(&net)
        .zip(received_before)
        .map(|(host, before)| host.rx_bytes() - before)
        .collect();

    for node in &nodes {
        let stored: BTreeSet<String> = node.dfdaemon.blobs().into_iter().collect();
        assert_eq!(stored, expected, "each dfdaemon holds the image's blobs");
        node.dfdaemon.assert_blobs_intact();
    }
    assert!(
        sent >= 2 * size,
        "the registry host sent {sent} bytes; two copies of the image are {}",
        2 * size
    );
    for (host, bytes) in node_hosts(&net).zip(received) {
        assert!(
            bytes >= size,
            "{} received {bytes} bytes over its link, less than the image ({size})",
            host.name()
        );
    }
}

fn node_hosts(net: &TestNet) -> impl Iterator<Item = &Host> {
    ["node1", "node2"].into_iter().map(|name| net.host(name))
}

/// With host `a` shaped to 50 Mbit/s, a file moves from `a` to `b` (a's
/// upload) and from `b` to `a` (a's download) no faster than the rate
/// allows, while the same transfer before shaping is far quicker.
#[test]
fn shaping_limits_both_directions_of_a_link() {
    common::require_root!();
    const MBIT: u32 = 50;
    const SIZE: u64 = 8 * MIB;
    let scratch = Scratch::new();
    let files = scratch.join("www");
    fs::create_dir_all(&files).unwrap();
    fs::write(files.join("blob"), vec![0x5a; SIZE as usize]).unwrap();
    let net = TestNet::new(&["a", "b"]);
    let (a, b) = (net.host("a"), net.host("b"));
    let _servers = [a, b].map(|host| serve_files(&scratch, host, &files));
    // Within a token bucket's burst the link is unshaped.
    let burst = 128 * 1024;
    let at_rate = (SIZE - burst) as f64 * 8.0 / (f64::from(MBIT) * 1e6);

    let unshaped = fetch_seconds(b, a, SIZE);
    assert!(
        unshaped < at_rate / 2.0,
        "unshaped, {SIZE} bytes took {unshaped:.2} s: too slow to tell shaping from noise"
    );
    a.shape(MBIT);
    for (from, to, direction) in [(a, b, "upload"), (b, a, "download")] {
        let seconds = fetch_seconds(to, from, SIZE);
        eprintln!(
            "{direction} of a shaped to {MBIT} Mbit/s: {seconds:.2} s (rate allows {at_rate:.2} s)"
        );
        assert!(
            seconds >= at_rate * 0.98,
            "{direction} of a: {SIZE} bytes in {seconds:.2} s, faster than {MBIT} Mbit/s"
        );
        assert!(
            seconds < at_rate * 3.0,
            "{direction} of a: {SIZE} bytes in {seconds:.2} s, far below {MBIT} Mbit/s"
        );
    }
}

/// An HTTP server for `dir` on port 8000 of `host`, ready when it returns.
fn serve_files(scratch: &Scratch, host: &Host, dir: &std::path::Path) -> Proc {
    let addr = format!("{}:8000", host.ip());
    let mut command = host.command("python3");
    command
        .args(["-m", "http.server", "8000", "--bind"])
        .arg(host.ip().to_string())
        .arg("--directory")
        .arg(dir);
    let log = scratch.join(&format!("http-{}.log", host.name()));
    let server = Proc::spawn("http.server", &mut command, log);
    wait_for("the HTTP server", Duration::from_secs(10), || {
        TcpStream::connect(&addr).is_ok()
    });
    server
}

/// Seconds `client` takes to GET `server`'s file of `size` bytes, by curl
/// inside `client`'s namespace.
fn fetch_seconds(client: &Host, server: &Host, size: u64) -> f64 {
    let url = format!("http://{}:8000/blob", server.ip());
    let out = client
        .command("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
        ])
        .arg(&url)
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl {url} in {}: {}",
        client.netns(),
        String::from_utf8_lossy(&out.stderr)
    );
    let (bytes, seconds) = stdout.split_once(' ').expect("curl -w output");
    assert_eq!(bytes.parse::<u64>().unwrap(), size, "curl fetched the file");
    seconds.parse().unwrap()
}

/// `Host::command` runs the program itself (its pid is the program's, as
/// `ip netns exec` execs it) inside the host's network namespace.
#[test]
fn host_command_runs_the_program_itself_in_the_namespace() {
    common::require_root!();
    let net = TestNet::new(&["a"]);
    let host = net.host("a");
    let mut child = spawn_sleep(host);
    let pid = child.id();
    wait_for("sleep to exec", Duration::from_secs(5), || {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    let child_netns = fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let host_netns = fs::metadata(format!("/run/netns/{}", host.netns()))
        .unwrap()
        .ino();
    assert_eq!(
        child_netns.to_string_lossy(),
        format!("net:[{host_netns}]"),
        "the child is in the host's namespace"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

fn spawn_sleep(host: &Host) -> Child {
    host.command("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep")
}

/// A test that panics with a `TestNet` and a process still running inside
/// it leaves no namespace, no uplink and no process behind.
#[test]
fn nothing_is_left_behind_when_a_test_panics() {
    common::require_root!();
    let left = Mutex::new(None);
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let net = TestNet::new(&["a", "b"]);
        let child = spawn_sleep(net.host("b"));
        let names = (net.namespaces().to_vec(), net.uplink().to_owned());
        *left.lock().unwrap() = Some((names, child));
        panic!("a test fails while its test net is up");
    }));
    assert!(outcome.is_err(), "the closure panicked");
    let ((namespaces, uplink), mut child) = left.into_inner().unwrap().expect("net was up");

    assert_eq!(namespaces.len(), 3, "the switch and two hosts");
    let listed = run_ok(Command::new("ip").args(["netns", "list"]));
    for netns in &namespaces {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(netns)),
            "{netns} is left: {listed}"
        );
    }
    let links = run_ok(Command::new("ip").args(["-o", "link", "show"]));
    assert!(
        !links.contains(&format!(" {uplink}:")) && !links.contains(&format!(" {uplink}@")),
        "{uplink} is left: {links}"
    );
    let status = child.try_wait().unwrap();
    assert!(
        status.is_some(),
        "the process inside the namespace still runs"
    );
}

/// The namespace of a run whose process is gone, with a process still
/// inside, is removed by `cleanup_stale` (which every `TestNet::new` runs).
#[test]
fn stale_namespaces_of_a_dead_run_are_removed() {
    common::require_root!();
    let mut exited = Command::new("true").spawn().unwrap();
    exited.wait().unwrap();
    let netns = format!("dfly-{}.zz-stale", exited.id());
    run_ok(Command::new("ip").args(["netns", "add", &netns]));
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &netns, "sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "sleep to enter the namespace",
        Duration::from_secs(5),
        || !run_ok(Command::new("ip").args(["netns", "pids", &netns])).is_empty(),
    );

    cleanup_stale();

    let listed = run_ok(Command::new("ip").args(["netns", "list"]));
    let left = listed
        .lines()
        .any(|l| l.split_whitespace().next() == Some(&netns));
    if left {
        let _ = orphan.kill();
        let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    }
    assert!(!left, "{netns} is left: {listed}");
    assert!(
        orphan.try_wait().unwrap().is_some(),
        "the process inside the stale namespace still runs"
    );
}

/// The subnet is a /24 in 10.200–10.254 that overlaps no existing route:
/// not a wider one, not a host route inside it.
#[test]
fn the_subnet_avoids_the_machines_routes() {
    let net = |a: u8, b: u8, len: u8| (Ipv4Addr::new(10, a, b, 0), len);
    let first = pick_subnet("1.0", &[]);
    let [ten, a, _, zero] = first.octets();
    assert!(
        ten == 10 && (200..=254).contains(&a) && zero == 0,
        "{first}"
    );
    assert_ne!(pick_subnet("1.0", &[(first, 24)]), first);
    let host_route = (Ipv4Addr::from(u32::from(first) + 7), 32);
    assert_ne!(pick_subnet("1.0", &[host_route]), first);
    // Everything from 10.200 to 10.253 is taken: only 10.254.x is left.
    let wide = [
        net(200, 0, 13),
        net(208, 0, 12),
        net(224, 0, 12),
        net(240, 0, 13),
    ];
    let wide = [&wide[..], &[net(248, 0, 14), net(252, 0, 15)]].concat();
    for id in ["1.0", "2.0", "3.1"] {
        assert_eq!(pick_subnet(id, &wide).octets()[..2], [10, 254], "{id}");
    }
    let all = panic::catch_unwind(|| pick_subnet("1.0", &[net(0, 0, 8)]));
    assert!(all.is_err(), "no subnet is free under 10.0.0.0/8");
}

/// Runs a command; its stdout, or a panic with its stderr.
fn run_ok(command: &mut Command) -> String {
    let out = command.output().expect("run command");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
