//! The snapshotter's fast path on a real containerd: a kubelet-style CRI
//! pull of a five-layer image (empty, gzip, gzip, zstd, uncompressed) is
//! unpacked by dfdaemon itself, the image is complete in containerd, and a
//! container started from it with runc reads a file from every layer. A
//! pull cancelled midway stops dfdaemon's work on it, leaves nothing
//! half-made, and a retry resumes where the blobs stopped.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};

use common::netns::TestNet;
use common::{Containerd, Dfdaemon, Registry, Scratch, free_port, sha256_bytes, wait_for};

/// A containerd whose content store and snapshotter are one dfdaemon.
struct FastNode {
    dfdaemon: Dfdaemon,
    containerd: Containerd,
    /// `ip:port` of dfdaemon's metrics.
    metrics: String,
}

impl FastNode {
    fn start(scratch: &Scratch, registry: &Registry) -> Self {
        let (containerd_socket, hosts_dir) = Containerd::paths(scratch, "containerd");
        let snapshot_socket = scratch.join("snapshot.sock");
        let metrics = format!("127.0.0.1:{}", free_port());
        let dfdaemon = Dfdaemon::start_in(
            scratch,
            "dfdaemon",
            None,
            vec![
                "--snapshot-socket".into(),
                snapshot_socket.display().to_string(),
                "--containerd-socket".into(),
                containerd_socket.display().to_string(),
                "--hosts-dir".into(),
                hosts_dir.display().to_string(),
                "--metrics-listen".into(),
                metrics.clone(),
            ],
        );
        let containerd = Containerd::start_with(
            scratch,
            "containerd",
            None,
            &dfdaemon.socket,
            Some(&snapshot_socket),
            &registry.host,
        );
        Self {
            dfdaemon,
            containerd,
            metrics,
        }
    }

    /// A CRI PullImage, as kubelet makes it.
    async fn cri_pull(&self, reference: &str) -> Result<(), tonic::Status> {
        let channel = containerd_client::connect(&self.containerd.socket)
            .await
            .expect("connect to containerd");
        ImageServiceClient::new(channel)
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: reference.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn metrics_text(&self) -> String {
        damselfly::registry::install_crypto_provider();
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("scrape dfdaemon")
            .text()
            .await
            .unwrap()
    }

    /// Runs `ctr` in CRI's namespace; panics unless it succeeds.
    fn k8s(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// dfdaemon's log lines about the fast path and its ingests.
fn fast_path_lines(dfdaemon: &Dfdaemon) -> String {
    dfdaemon
        .log_text()
        .lines()
        .filter(|l| l.contains("fast path") || l.contains("fastpath/layer"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names in dfdaemon's snapshots directory that are snapshots or
/// staging directories (everything but its metadata).
fn snapshot_dirs(data_dir: &Path) -> Vec<String> {
    fs::read_dir(data_dir.join("snapshots"))
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name != "metadata.redb")
                .collect()
        })
        .unwrap_or_default()
}

/// The files of `damselfly/multi:v1`'s non-empty layers, with their sizes
/// (test-images/generate.py).
const FILES: [(&str, u64); 4] = [
    ("/damselfly/multi/tiny.txt", 7),
    ("/damselfly/multi/gzip/notes.txt", 65543),
    ("/damselfly/multi/zstd/notes.txt", 300003),
    ("/damselfly/multi/tar/notes.txt", 500),
];

#[tokio::test(flavor = "multi_thread")]
async fn cri_pull_is_unpacked_by_dfdaemon_and_runs() {
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("small");
    let image = catalog.image("damselfly/multi:v1");
    let node = FastNode::start(&scratch, &registry);
    let reference = format!("{}/{}", registry.host, image.reference);
    node.cri_pull(&reference).await.expect("CRI PullImage");

    let layers: Vec<_> = image
        .amd64_blobs()
        .into_iter()
        .filter(|b| b.kind == "layer")
        .collect();
    let text = node.metrics_text().await;
    let unpacked = format!(
        "damselfly_dfdaemon_unpacked_layers_total{{source=\"registry\"}} {}",
        layers.len()
    );
    assert!(
        text.lines().any(|l| l == unpacked),
        "dfdaemon unpacked every layer itself; metrics:\n{text}\nlog:\n{}",
        node.dfdaemon.log_text()
    );
    assert!(
        !text.contains("fast_path_declined_total{"),
        "no Prepare went containerd's way:\n{text}"
    );

    let check = node.k8s(&["image", "check"]);
    let line = check
        .lines()
        .find(|l| l.starts_with(&reference))
        .expect("the image is listed");
    assert!(line.contains("complete (6/6)"), "{check}");
    for layer in &layers {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(&node.containerd.socket)
            .args(["--namespace", "k8s.io", "content", "get", &layer.digest])
            .output()
            .unwrap();
        assert_eq!(sha256_bytes(&out.stdout), layer.digest, "content get");
    }

    let mut run = vec![
        "run",
        "--rm",
        "--snapshotter",
        "damselfly",
        "--mount",
        "type=bind,src=/bin/busybox,dst=/bin/busybox,options=rbind:ro",
        &reference,
        "fast-path-probe",
        "/bin/busybox",
        "wc",
        "-c",
    ];
    run.extend(FILES.iter().map(|(path, _)| *path));
    let counted = node.k8s(&run);
    for (path, size) in FILES {
        assert!(
            counted
                .lines()
                .any(|l| l.split_whitespace().eq([size.to_string().as_str(), path])),
            "the container reads {path} ({size} bytes): {counted}"
        );
    }
}

/// A CRI pull given up midway (its client went away) stops dfdaemon's work
/// on the image: the registry stops sending, no staging directory or
/// snapshot is left, nothing is committed. Pulled again, each blob resumes
/// where its ingest stopped, so the registry sends about one copy in all.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_pull_stops_its_layers_and_a_retry_resumes_them() {
    let scratch = Scratch::new();
    let net = TestNet::new(&["registry"]);
    let registry = Registry::start_in(&scratch, Some(net.host("registry")));
    let catalog = registry.push("bench256");
    let image = catalog.image("damselfly/bench256:v1");
    let image_bytes: u64 = image.amd64_blobs().iter().map(|b| b.size).sum();
    // 256 MiB at 100 Mbit/s take about 22 s: the pull is caught midway.
    net.host("registry").shape(100);
    let node = FastNode::start(&scratch, &registry);
    let reference = format!("{}/{}", registry.host, image.reference);
    let tx = || net.host("registry").tx_bytes();
    let start_tx = tx();

    let gave_up = tokio::time::timeout(Duration::from_secs(3), node.cri_pull(&reference)).await;
    assert!(gave_up.is_err(), "the pull was still running at 3 s");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !node
        .metrics_text()
        .await
        .contains("damselfly_dfdaemon_fast_path_cancelled_total 1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dfdaemon stopped the image's job; log:\n{}",
            common::tail(node.dfdaemon.log_path(), 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("staging removed", Duration::from_secs(5), || {
        snapshot_dirs(&node.dfdaemon.data_dir).is_empty()
    });
    let stopped_at = tx();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = tx() - start_tx;
    assert!(
        tx() - stopped_at < 1 << 20,
        "the registry stopped sending: {} bytes in 2 s after the job stopped",
        tx() - stopped_at
    );
    assert!(
        sent < image_bytes * 9 / 10,
        "the job stopped midway ({sent} of {image_bytes} bytes sent)"
    );
    assert!(
        node.k8s(&["snapshots", "--snapshotter", "damselfly", "ls"])
            .lines()
            .count()
            <= 1,
        "containerd knows no snapshot of the image"
    );

    tokio::time::timeout(Duration::from_secs(120), node.cri_pull(&reference))
        .await
        .expect("the retry finishes")
        .expect("the retried CRI PullImage");
    let text = node.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l == "damselfly_dfdaemon_unpacked_layers_total{source=\"registry\"} 3"),
        "dfdaemon unpacked the three layers on the retry:\n{text}"
    );
    let total = tx() - start_tx;
    assert!(
        total <= image_bytes * 105 / 100,
        "the retry resumed each blob: the registry sent {total} bytes for {image_bytes}; log:\n{}",
        fast_path_lines(&node.dfdaemon)
    );
    let check = node.k8s(&["image", "check"]);
    assert!(
        check
            .lines()
            .any(|l| l.starts_with(&reference) && l.contains("complete (4/4)")),
        "{check}"
    );
}
