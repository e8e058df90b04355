//! The snapshotter's fast path on a real containerd: a kubelet-style CRI
//! pull of a five-layer image (empty, gzip, gzip, zstd, uncompressed) is
//! unpacked by dfdaemon itself, the image is complete in containerd, and a
//! container started from it with runc reads a file from every layer; an
//! image removed and pulled again at once is unpacked by dfdaemon again.

mod common;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};

use common::{CatalogBlob, Containerd, Dfdaemon, Registry, Scratch, free_port, sha256_bytes};

/// The files of `damselfly/multi:v1`'s non-empty layers, with their sizes
/// (test-images/generate.py).
const FILES: [(&str, u64); 4] = [
    ("/damselfly/multi/tiny.txt", 7),
    ("/damselfly/multi/gzip/notes.txt", 65543),
    ("/damselfly/multi/zstd/notes.txt", 300003),
    ("/damselfly/multi/tar/notes.txt", 500),
];

/// One node: a registry holding the `small` set, dfdaemon as containerd's
/// content store and CRI's snapshotter. Fields drop in order: containerd
/// before the dfdaemon it talks to, the scratch dir last.
struct Node {
    containerd: Containerd,
    dfdaemon: Dfdaemon,
    metrics: String,
    reference: String,
    layers: Vec<CatalogBlob>,
    _registry: Registry,
    _scratch: Scratch,
}

impl Node {
    fn start() -> Self {
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
        Self {
            reference: format!("{}/{}", registry.host, image.reference),
            layers: image
                .amd64_blobs()
                .into_iter()
                .filter(|b| b.kind == "layer")
                .collect(),
            containerd,
            dfdaemon,
            metrics,
            _registry: registry,
            _scratch: scratch,
        }
    }

    /// Pulls the image through CRI, as kubelet does.
    async fn cri_pull(&self) {
        let channel = containerd_client::connect(&self.containerd.socket)
            .await
            .expect("connect to containerd");
        ImageServiceClient::new(channel)
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: self.reference.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("CRI PullImage");
    }

    /// Asserts that dfdaemon has unpacked `layers` layers itself, all from
    /// the registry, and that no Prepare went containerd's way.
    async fn assert_unpacked_by_dfdaemon(&self, layers: usize) {
        damselfly::registry::install_crypto_provider();
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("scrape dfdaemon")
            .text()
            .await
            .unwrap();
        let unpacked =
            format!("damselfly_dfdaemon_unpacked_layers_total{{source=\"registry\"}} {layers}");
        assert!(
            text.lines().any(|l| l == unpacked),
            "dfdaemon unpacked every layer itself; metrics:\n{text}\nlog:\n{}",
            self.dfdaemon.log_text()
        );
        assert!(
            !text.contains("fast_path_declined_total{"),
            "no Prepare went containerd's way:\n{text}\nlog:\n{}",
            self.dfdaemon.log_text()
        );
    }

    /// Runs `ctr` in CRI's namespace, panicking on failure; its stdout.
    fn k8s_bytes(&self, args: &[&str]) -> Vec<u8> {
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
        out.stdout
    }

    fn k8s(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.k8s_bytes(args)).into_owned()
    }

    /// Lists what `ctr NOUN ls -q` lists in CRI's namespace.
    fn k8s_list(&self, noun: &str) -> Vec<String> {
        self.k8s(&[noun, "ls", "-q"])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_pull_is_unpacked_by_dfdaemon_and_runs() {
    let node = Node::start();
    node.cri_pull().await;
    node.assert_unpacked_by_dfdaemon(node.layers.len()).await;

    let check = node.k8s(&["image", "check"]);
    let line = check
        .lines()
        .find(|l| l.starts_with(&node.reference))
        .expect("the image is listed");
    assert!(line.contains("complete (6/6)"), "{check}");
    for layer in &node.layers {
        let blob = node.k8s_bytes(&["content", "get", &layer.digest]);
        assert_eq!(sha256_bytes(&blob), layer.digest, "content get");
    }

    let mut run = vec![
        "run",
        "--rm",
        "--snapshotter",
        "damselfly",
        "--mount",
        "type=bind,src=/bin/busybox,dst=/bin/busybox,options=rbind:ro",
        &node.reference,
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

/// A removed image's layers are gone from the snapshotter, while the fast
/// path still remembers its job for a minute: a pull right after must
/// unpack them again rather than send containerd its own way.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_removed_and_pulled_again_is_unpacked_again() {
    let node = Node::start();
    node.cri_pull().await;
    node.assert_unpacked_by_dfdaemon(node.layers.len()).await;

    // dfdaemon's own leases hold the layers for a minute: drop them too.
    let leases = node.k8s_list("leases");
    if !leases.is_empty() {
        let mut rm = vec!["leases", "rm"];
        rm.extend(leases.iter().map(String::as_str));
        node.k8s(&rm);
    }
    let images = node.k8s_list("images");
    let mut rm = vec!["images", "rm", "--sync"];
    rm.extend(images.iter().map(String::as_str));
    node.k8s(&rm);
    let snapshots = node.k8s(&["snapshots", "--snapshotter", "damselfly", "ls"]);
    assert_eq!(
        snapshots.lines().count(),
        1,
        "no snapshot left:\n{snapshots}"
    );

    node.cri_pull().await;
    node.assert_unpacked_by_dfdaemon(2 * node.layers.len())
        .await;
    let snapshots = node.k8s(&["snapshots", "--snapshotter", "damselfly", "ls"]);
    assert_eq!(
        snapshots.lines().count(),
        1 + node.layers.len(),
        "every layer is a snapshot again:\n{snapshots}"
    );
}
