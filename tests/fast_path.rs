//! The snapshotter's fast path on a real containerd: a kubelet-style CRI
//! pull of a five-layer image (empty, gzip, gzip, zstd, uncompressed) is
//! unpacked by dfdaemon itself, the image is complete in containerd, and a
//! container started from it with runc reads a file from every layer.

mod common;

use common::{Containerd, Dfdaemon, Registry, Scratch, free_port, scrape, sha256_bytes};

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
    let (containerd_socket, hosts_dir) = Containerd::paths(&scratch, "containerd");
    let snapshot_socket = scratch.join("snapshot.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let dfdaemon = Dfdaemon::start_in(
        &scratch,
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
        &scratch,
        "containerd",
        None,
        Some(&dfdaemon.socket),
        Some(&snapshot_socket),
        &registry.host,
    );
    let reference = format!("{}/{}", registry.host, image.reference);

    containerd.cri_pull(&reference).await;

    let layers: Vec<_> = image
        .amd64_blobs()
        .into_iter()
        .filter(|b| b.kind == "layer")
        .collect();
    let text = scrape(&metrics).await;
    let unpacked = format!(
        "damselfly_dfdaemon_unpacked_layers_total{{source=\"registry\"}} {}",
        layers.len()
    );
    assert!(
        text.lines().any(|l| l == unpacked),
        "dfdaemon unpacked every layer itself; metrics:\n{text}\nlog:\n{}",
        dfdaemon.log_text()
    );
    assert!(
        !text.contains("fast_path_declined_total{"),
        "no Prepare went containerd's way:\n{text}"
    );

    let k8s = |args: &[&str]| {
        String::from_utf8(containerd.ctr_in_ok("k8s.io", args)).expect("utf-8 from ctr")
    };
    let check = k8s(&["image", "check"]);
    let line = check
        .lines()
        .find(|l| l.starts_with(&reference))
        .expect("the image is listed");
    assert!(line.contains("complete (6/6)"), "{check}");
    for layer in &layers {
        let blob = containerd.ctr_in_ok("k8s.io", &["content", "get", &layer.digest]);
        assert_eq!(sha256_bytes(&blob), layer.digest, "content get");
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
    let counted = k8s(&run);
    for (path, size) in FILES {
        assert!(
            counted
                .lines()
                .any(|l| l.split_whitespace().eq([size.to_string().as_str(), path])),
            "the container reads {path} ({size} bytes): {counted}"
        );
    }
}
