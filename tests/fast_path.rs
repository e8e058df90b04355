//! The snapshotter's fast path on a real containerd: a kubelet-style CRI
//! pull of a five-layer image (empty, gzip, gzip, zstd, uncompressed) is
//! unpacked by dfdaemon itself, the image is complete in containerd, and a
//! container started from it with runc reads a file from every layer.

mod common;

use common::snapshotter_node::{MULTI_V1_FILES, SnapshotterNode};
use common::{Registry, Scratch, sha256_bytes};

#[tokio::test(flavor = "multi_thread")]
async fn cri_pull_is_unpacked_by_dfdaemon_and_runs() {
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
        let blob = node.k8s(&["content", "get", &layer.digest]);
        assert_eq!(sha256_bytes(&blob), layer.digest, "content get");
    }
    node.assert_container_reads(&reference, &MULTI_V1_FILES);
}
