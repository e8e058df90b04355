//! A node whose dfdaemon is containerd's snapshotter as well as its content
//! store, with the fast path on, and the kubelet-side of a test against it:
//! a CRI pull, dfdaemon's metrics, `ctr` in CRI's namespace, and a container
//! run from the pulled image.

use super::{Containerd, Dfdaemon, Scratch, Upstream, free_port, scrape, snapshotter_args};

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

    /// Runs `ctr` in CRI's namespace `k8s.io`; its stdout, panicking on failure.
    pub fn k8s(&self, args: &[&str]) -> Vec<u8> {
        self.containerd.ctr_in_ok("k8s.io", args)
    }

    /// Checks that `ctr image check` finds every one of the `blobs` of
    /// image `reference`.
    pub fn assert_image_complete(&self, reference: &str, blobs: usize) {
        let check = String::from_utf8_lossy(&self.k8s(&["image", "check"])).into_owned();
        let line = check
            .lines()
            .find(|l| l.starts_with(reference))
            .unwrap_or_else(|| panic!("{reference} is not listed:\n{check}"));
        assert!(
            line.contains(&format!("complete ({blobs}/{blobs})")),
            "{check}"
        );
    }

    /// Runs a container of image `reference` on the `damselfly` snapshotter
    /// (with runc, busybox bound in) and checks that it reads each of
    /// `files` with its size.
    pub fn assert_container_reads(&self, reference: &str, files: &[(&str, u64)]) {
        let mut run = vec![
            "run",
            "--rm",
            "--snapshotter",
            "damselfly",
            "--mount",
            "type=bind,src=/bin/busybox,dst=/bin/busybox,options=rbind:ro",
            reference,
            "damselfly-probe",
            "/bin/busybox",
            "wc",
            "-c",
        ];
        run.extend(files.iter().map(|(path, _)| *path));
        let counted = String::from_utf8_lossy(&self.k8s(&run)).into_owned();
        for (path, size) in files {
            assert!(
                counted
                    .lines()
                    .any(|l| l.split_whitespace().eq([size.to_string().as_str(), path])),
                "the container reads {path} ({size} bytes): {counted}"
            );
        }
    }
}
