//! The snapshotter's fast path on a real containerd: a kubelet-style CRI
//! pull of a five-layer image (empty, gzip, gzip, zstd, uncompressed) is
//! unpacked by dfdaemon itself, the image is complete in containerd, and a
//! container started from it with runc reads a file from every layer.

mod common;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};

use common::{Containerd, Dfdaemon, Registry, Scratch, free_port, sha256_bytes};

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
        &dfdaemon.socket,
        Some(&snapshot_socket),
        &registry.host,
    );
    let reference = format!("{}/{}", registry.host, image.reference);

    let channel = containerd_client::connect(&containerd.socket)
        .await
        .expect("connect to containerd");
    ImageServiceClient::new(channel)
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: reference.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("CRI PullImage");

    let layers: Vec<_> = image
        .amd64_blobs()
        .into_iter()
        .filter(|b| b.kind == "layer")
        .collect();
    damselfly::registry::install_crypto_provider();
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .expect("scrape dfdaemon")
        .text()
        .await
        .unwrap();
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
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(&containerd.socket)
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
    };
    let check = k8s(&["image", "check"]);
    let line = check
        .lines()
        .find(|l| l.starts_with(&reference))
        .expect("the image is listed");
    assert!(line.contains("complete (6/6)"), "{check}");
    for layer in &layers {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(&containerd.socket)
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
