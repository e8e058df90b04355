//! The snapshotter's fast path on a real containerd: a kubelet-style CRI
//! pull of a five-layer image (empty, gzip, gzip, zstd, uncompressed) is
//! unpacked by dfdaemon itself, the image is complete in containerd, and a
//! container started from it with runc reads a file from every layer. A
//! pull cancelled midway stops dfdaemon's work on it, leaves nothing
//! half-made, and a retry resumes where the blobs stopped. An image removed
//! and pulled again at once is unpacked by dfdaemon again.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::netns::TestNet;
use common::snapshotter_node::{CRI_NAMESPACE, MULTI_V1_FILES, SNAPSHOTTER, SnapshotterNode};
use common::{Dfdaemon, Registry, Scratch, sha256_bytes, wait_for};

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

#[tokio::test(flavor = "multi_thread")]
async fn cri_pull_is_unpacked_by_dfdaemon_and_runs() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("small");
    let image = catalog.image("damselfly/multi:v1");
    let node = SnapshotterNode::start(&scratch, registry.upstream(), Vec::new(), Vec::new());
    let reference = format!("{}/{}", registry.host, image.reference);

    node.cri_pull(&reference, None).await;

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

    node.assert_image_complete(&reference, 6);
    for layer in &layers {
        let blob = node
            .containerd
            .ctr_in_ok(CRI_NAMESPACE, &["content", "get", &layer.digest]);
        assert_eq!(sha256_bytes(&blob), layer.digest, "content get");
    }
    node.assert_container_reads(&reference, &MULTI_V1_FILES);
}

/// A CRI pull given up midway (its client went away) stops dfdaemon's work
/// on the image: the registry stops sending, no staging directory or
/// snapshot is left, nothing is committed. Pulled again, each blob resumes
/// where its ingest stopped, so the registry sends about one copy in all.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_pull_stops_its_layers_and_a_retry_resumes_them() {
    common::require_root!();
    let scratch = Scratch::new();
    let net = TestNet::new(&["registry"]);
    let registry = Registry::start_in(&scratch, Some(net.host("registry")));
    let catalog = registry.push("bench256");
    let image = catalog.image("damselfly/bench256:v1");
    let image_bytes: u64 = image.amd64_blobs().iter().map(|b| b.size).sum();
    // 256 MiB at 100 Mbit/s take about 22 s: the pull is caught midway.
    net.host("registry").shape(100);
    let node = SnapshotterNode::start(&scratch, registry.upstream(), Vec::new(), Vec::new());
    let reference = format!("{}/{}", registry.host, image.reference);
    let tx = || net.host("registry").tx_bytes();
    let start_tx = tx();

    let gave_up =
        tokio::time::timeout(Duration::from_secs(3), node.cri_pull(&reference, None)).await;
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
        node.k8s(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])
            .lines()
            .count()
            <= 1,
        "containerd knows no snapshot of the image"
    );

    tokio::time::timeout(Duration::from_secs(120), node.cri_pull(&reference, None))
        .await
        .expect("the retried CRI PullImage finishes");
    // A small layer may have been whole in the store before the job
    // stopped: then the retry unpacks it from there.
    assert_eq!(
        node.unpacked_layers().await,
        3.0,
        "dfdaemon unpacked the three layers on the retry:\n{}",
        node.metrics_text().await
    );
    let total = tx() - start_tx;
    assert!(
        total <= image_bytes * 105 / 100,
        "the retry resumed each blob: the registry sent {total} bytes for {image_bytes}; log:\n{}",
        fast_path_lines(&node.dfdaemon)
    );
    node.assert_image_complete(&reference, 4);
}

/// Removed (images, leases, GC) and pulled again within the minute that
/// dfdaemon keeps a job's layer states: the stale Ready of the first job
/// does not send the layers containerd's way; a new job unpacks them.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_removed_and_pulled_again_is_unpacked_again() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("small");
    let image = catalog.image("damselfly/multi:v1");
    let layers = image
        .amd64_blobs()
        .iter()
        .filter(|b| b.kind == "layer")
        .count();
    let node = SnapshotterNode::start(&scratch, registry.upstream(), Vec::new(), Vec::new());
    let reference = format!("{}/{}", registry.host, image.reference);
    let snapshots = || node.k8s(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);

    node.cri_pull(&reference, None).await;
    assert_eq!(node.unpacked_layers().await, layers as f64);
    for noun in ["leases", "images"] {
        for listed in node.k8s(&[noun, "ls", "-q"]).lines() {
            node.k8s(&[noun, "rm", "--sync", listed]);
        }
    }
    assert_eq!(
        snapshots().lines().count(),
        1,
        "no snapshot left:\n{}",
        snapshots()
    );

    node.cri_pull(&reference, None).await;
    assert_eq!(
        node.unpacked_layers().await,
        2.0 * layers as f64,
        "dfdaemon unpacked every layer again; log:\n{}",
        fast_path_lines(&node.dfdaemon)
    );
    assert_eq!(node.declined("removed").await, 0.0);
    assert_eq!(
        snapshots().lines().count(),
        1 + layers,
        "every layer is a snapshot again:\n{}",
        snapshots()
    );
}
