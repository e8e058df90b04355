//! The snapshotter's fast path on a real containerd: a kubelet-style CRI
//! pull of a five-layer image (empty, gzip, gzip, zstd, uncompressed) is
//! unpacked by dfdaemon itself, the image is complete in containerd, and a
//! container started from it with runc reads a file from every layer.

mod common;

use common::fast_path::{CRI_NAMESPACE, FastPathNode, SNAPSHOTTER};
use common::{Registry, Scratch, sha256_bytes};

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
    let node = FastPathNode::start(&scratch, &registry);
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
        let out = node
            .containerd
            .ctr_ok_in(CRI_NAMESPACE, &["content", "get", &layer.digest]);
        assert_eq!(sha256_bytes(&out), layer.digest, "content get");
    }

    let mut run = vec![
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
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
