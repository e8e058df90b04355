//! A real supernode process on loopback against an unregistered attacker at
//! another 127.0.0.x address: a Register of 40,000 fake ingesting blobs is
//! refused, one at the limits is accepted, and meanwhile the supernode's RSS
//! (from /proc) stays below 64 MiB and a real host's Heartbeat, Join and
//! Schedule answer within 100 ms; re-registering the real host's id from the
//! attacker's address is refused and the real host stays registered.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, Scratch, free_port, wait_for};
use damselfly::protocol::api::supernode_client::SupernodeClient;
use damselfly::protocol::api::{
    HeartbeatRequest, HeldBlob, Host, JoinRequest, RegisterRequest, ScheduleRequest,
};
use damselfly::protocol::piece::piece_size;
use damselfly::store::Digest;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const SUPERNODE_IP: &str = "127.0.83.1";
const NODE_IP: &str = "127.0.83.2";
const ATTACKER_IP: &str = "127.0.83.3";
const MAX_RSS: u64 = 64 << 20;
const MAX_ANSWER: Duration = Duration::from_millis(100);

/// A gRPC client calling from `source`.
async fn client(addr: &str, source: &str) -> SupernodeClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(Some(source.parse::<IpAddr>().unwrap()));
    SupernodeClient::new(endpoint.connect().await.unwrap())
}

fn register(id: &str, ip: &str, blobs: Vec<HeldBlob>) -> RegisterRequest {
    RegisterRequest {
        host: Some(Host {
            id: id.into(),
            ip: ip.into(),
            upload_port: 65002,
            supernode: false,
        }),
        blobs,
    }
}

/// `count` fake blobs of `size` bytes, each claimed as being ingested.
fn fake_blobs(count: u32, size: i64) -> Vec<HeldBlob> {
    (0..count)
        .map(|n| HeldBlob {
            digest: Digest::of(&n.to_le_bytes()).to_string(),
            size,
            piece_size: piece_size(size as u64),
            pieces: vec![],
            complete: false,
            ingesting: true,
        })
        .collect()
}

/// Resident set size of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_register_is_refused_and_the_supernode_stays_small_and_responsive() {
    let scratch = Scratch::new();
    let addr = format!("{SUPERNODE_IP}:{}", free_port());
    let mut command = Command::new(env!("CARGO_BIN_EXE_supernode"));
    command
        .arg("--data-dir")
        .arg(scratch.join("supernode-data"))
        .args(["--listen", &addr, "--advertise-ip", SUPERNODE_IP])
        .args([
            "--metrics-listen",
            &format!("{SUPERNODE_IP}:{}", free_port()),
        ])
        .args(["--repo-max-mib", "0"])
        .env("RUST_LOG", "info");
    let supernode = Proc::spawn("supernode", &mut command, scratch.join("supernode.log"));
    wait_for("the supernode listens", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let pid = supernode.pid();

    let node_id = format!("{NODE_IP}:65002");
    let mut node = client(&addr, NODE_IP).await;
    node.register(register(&node_id, NODE_IP, vec![]))
        .await
        .expect("the real node registers");
    let digest = Digest::of(b"a real layer").to_string();
    node.join(JoinRequest {
        host_id: node_id.clone(),
        digest: digest.clone(),
        size: 10 << 20,
    })
    .await
    .expect("the real node joins");

    let attack = tokio::spawn({
        let addr = addr.clone();
        async move {
            let mut attacker = client(&addr, ATTACKER_IP).await;
            let id = format!("{ATTACKER_IP}:65002");
            let mut huge = Vec::new();
            for _ in 0..5 {
                let request = register(&id, ATTACKER_IP, fake_blobs(40_000, 1 << 30));
                huge.push(attacker.register(request).await.map(|_| ()));
            }
            // At the limits: 256 blobs of 4 GiB, 1024 pieces each.
            let at_limits = register(&id, ATTACKER_IP, fake_blobs(256, 4 << 30));
            (huge, attacker.register(at_limits).await.map(|_| ()))
        }
    });

    let mut slowest = Duration::ZERO;
    let mut max_rss = 0;
    while !attack.is_finished() {
        let started = Instant::now();
        node.heartbeat(HeartbeatRequest {
            host_id: node_id.clone(),
            uploads_in_use: 0,
        })
        .await
        .expect("heartbeat");
        node.schedule(ScheduleRequest {
            host_id: node_id.clone(),
            digest: digest.clone(),
            wanted: vec![0],
            ..Default::default()
        })
        .await
        .expect("schedule");
        slowest = slowest.max(started.elapsed());
        max_rss = max_rss.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (huge, at_limits) = attack.await.unwrap();
    max_rss = max_rss.max(rss(pid));
    println!(
        "supernode RSS at most {} KiB; slowest Heartbeat + Schedule {slowest:?}",
        max_rss >> 10
    );
    for answer in huge {
        let status = answer.expect_err("a Register of 40,000 blobs was accepted");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    at_limits.expect("a Register at the limits is accepted");
    assert!(max_rss < MAX_RSS, "supernode RSS reached {max_rss} bytes");
    assert!(slowest < MAX_ANSWER, "a real host's calls took {slowest:?}");

    let mut attacker = client(&addr, ATTACKER_IP).await;
    for ip in [ATTACKER_IP, NODE_IP] {
        let hijack = attacker.register(register(&node_id, ip, vec![])).await;
        let status = hijack.expect_err("the node's id was re-registered from elsewhere");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let heartbeat = attacker
        .heartbeat(HeartbeatRequest {
            host_id: node_id.clone(),
            uploads_in_use: 1000,
        })
        .await;
    assert!(
        heartbeat.is_err(),
        "a heartbeat for the node from elsewhere"
    );
    let answer = node
        .heartbeat(HeartbeatRequest {
            host_id: node_id,
            uploads_in_use: 0,
        })
        .await
        .unwrap();
    assert!(
        !answer.into_inner().reregister,
        "the real node lost its registration"
    );
}
