//! A node whose dfdaemon is containerd's snapshotter as well as its content
//! store, with the fast path on, and the kubelet-side of a test against it:
//! a CRI pull, dfdaemon's metrics, `ctr` in CRI's namespace, dfdaemon's own
//! snapshot list and staging dirs, a snapshot's tree, and a container run
//! from the pulled image.

use std::fs;
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{Info, Kind, ListSnapshotsRequest};

use super::tree::{Entry, View};
use super::{Containerd, Dfdaemon, Scratch, Upstream, free_port, scrape, snapshotter_args};

/// The namespace CRI pulls into.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// What containerd calls dfdaemon's snapshotter.
pub const SNAPSHOTTER: &str = "damselfly";

/// Whether a backend snapshot is committed.
pub fn is_committed(info: &Info) -> bool {
    info.kind == Kind::Committed as i32
}

/// The files of `damselfly/multi:v1`'s non-empty layers, with their sizes
/// (test-images/generate.py).
pub const MULTI_V1_FILES: [(&str, u64); 4] = [
    ("/damselfly/multi/tiny.txt", 7),
    ("/damselfly/multi/gzip/notes.txt", 65543),
    ("/damselfly/multi/zstd/notes.txt", 300003),
    ("/damselfly/multi/tar/notes.txt", 500),
];

/// A dfdaemon (named `dfdaemon` in the scratch dir) told containerd's
/// socket and hosts dir, and the containerd (`containerd`) that uses it as
/// its content store and CRI's snapshotter `damselfly`.
pub struct SnapshotterNode {
    pub containerd: Containerd,
    pub dfdaemon: Dfdaemon,
    /// dfdaemon's metrics address, `127.0.0.1:<port>`.
    pub metrics: String,
    pub snapshot_socket: PathBuf,
}

impl SnapshotterNode {
    /// Starts the pair for `registry`, dfdaemon with `dfdaemon_args` after
    /// its own and environment `env`.
    pub fn start(
        scratch: &Scratch,
        registry: Upstream<'_>,
        dfdaemon_args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Self {
        let snapshot_socket = scratch.join("snapshot.sock");
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut args = snapshotter_args(scratch, "containerd", &snapshot_socket);
        args.extend(["--metrics-listen".to_owned(), metrics.clone()]);
        args.extend(dfdaemon_args);
        let dfdaemon = Dfdaemon::start_in_with_env(scratch, "dfdaemon", None, args, env);
        let containerd = Containerd::start_with(
            scratch,
            "containerd",
            None,
            Some(&dfdaemon.socket),
            Some(&snapshot_socket),
            registry,
        );
        Self {
            containerd,
            dfdaemon,
            metrics,
            snapshot_socket,
        }
    }

    /// Pulls `reference` through CRI, as kubelet does, with a login if given;
    /// panics (with dfdaemon's log) on failure.
    pub async fn cri_pull(&self, reference: &str, login: Option<(&str, &str)>) {
        self.containerd
            .try_cri_pull(reference, login)
            .await
            .unwrap_or_else(|status| {
                panic!(
                    "CRI PullImage {reference}: {status}\ndfdaemon log:\n{}",
                    self.dfdaemon.log_text()
                )
            });
    }

    /// dfdaemon's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        scrape(&self.metrics).await
    }

    /// Runs `ctr` in CRI's namespace; its stdout as text, panicking on failure.
    pub fn k8s(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.containerd.ctr_in_ok(CRI_NAMESPACE, args)).into_owned()
    }

    /// The value of one series (`name{labels}` as exposed), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().expect("a metric value"))
    }

    /// Layers dfdaemon unpacked itself so far, whatever their bytes came from.
    pub async fn unpacked_layers(&self) -> f64 {
        let mut total = 0.0;
        for source in ["registry", "peers", "store"] {
            total += self
                .metric(&format!(
                    "damselfly_dfdaemon_unpacked_layers_total{{source=\"{source}\"}}"
                ))
                .await;
        }
        total
    }

    /// Prepares that went containerd's way for reason `reason` so far.
    pub async fn declined(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "damselfly_dfdaemon_fast_path_declined_total{{reason=\"{reason}\"}}"
        ))
        .await
    }

    /// dfdaemon's own snapshots (backend names), asked on its snapshot socket.
    pub async fn backend_snapshots(&self) -> Vec<Info> {
        let channel = containerd_client::connect(&self.snapshot_socket)
            .await
            .expect("connect to dfdaemon's snapshot socket");
        let mut stream = SnapshotsClient::new(channel)
            .list(ListSnapshotsRequest {
                snapshotter: SNAPSHOTTER.into(),
                filters: Vec::new(),
            })
            .await
            .expect("list dfdaemon's snapshots")
            .into_inner();
        let mut out = Vec::new();
        while let Some(page) = stream.message().await.expect("list page") {
            out.extend(page.info);
        }
        out
    }

    /// The staging dirs (`new-…`) in dfdaemon's snapshots dir: being made,
    /// or left by a crash.
    pub fn staging_dirs(&self) -> Vec<String> {
        fs::read_dir(self.dfdaemon.data_dir.join("snapshots"))
            .expect("list the snapshots dir")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("new-"))
            .collect()
    }

    /// The tree of committed snapshot `name` (containerd's name, in
    /// `namespace`, of `snapshotter`) as a container sees it, times left out.
    pub fn snapshot_tree(
        &self,
        scratch: &Scratch,
        namespace: &str,
        snapshotter: &str,
        name: &str,
    ) -> Vec<Entry> {
        View::list(
            &self.containerd,
            namespace,
            snapshotter,
            name,
            scratch,
            UNIX_EPOCH,
        )
        .merged
    }

    /// Checks that `ctr image check` finds every one of the `blobs` of
    /// image `reference`.
    pub fn assert_image_complete(&self, reference: &str, blobs: usize) {
        self.containerd
            .assert_image_complete(CRI_NAMESPACE, reference, blobs);
    }

    /// Runs a container of image `reference` on the `damselfly` snapshotter
    /// and checks that it reads each of `files` with its size.
    pub fn assert_container_reads(&self, reference: &str, files: &[(&str, u64)]) {
        self.containerd
            .assert_container_reads(CRI_NAMESPACE, SNAPSHOTTER, reference, files);
    }
}
