//! A node on the snapshotter fast path: a dfdaemon that is containerd's
//! content store and snapshotter (CRI's default one), and what tests ask of
//! it: kubelet-style CRI pulls, `ctr` in CRI's namespace, dfdaemon's
//! metrics, dfdaemon's own list of snapshots (the backend names, under
//! containerd's), and the tree a snapshot holds, read through a mounted view.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{Info, Kind, ListSnapshotsRequest};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};
use nix::mount::{MntFlags, MsFlags};
use serde::Deserialize;

use super::{Containerd, Dfdaemon, Registry, Scratch, free_port, sha256_file};

/// The namespace CRI pulls into.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// What containerd calls dfdaemon's snapshotter.
pub const SNAPSHOTTER: &str = "damselfly";

/// dfdaemon as containerd's content store and snapshotter.
pub struct FastPathNode {
    // Declared first, so dropped first: containerd stops before dfdaemon.
    pub containerd: Containerd,
    pub dfdaemon: Dfdaemon,
    /// `ip:port` of dfdaemon's metrics.
    pub metrics: String,
    pub snapshot_socket: PathBuf,
}

impl FastPathNode {
    /// Starts dfdaemon (fast path on: it knows containerd's socket and
    /// hosts dir) and a containerd that uses it for content and snapshots.
    pub fn start(scratch: &Scratch, registry: &Registry) -> Self {
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
            containerd,
            dfdaemon,
            metrics,
            snapshot_socket,
        }
    }

    /// A kubelet-style CRI PullImage of `reference`.
    pub async fn cri_pull(&self, reference: &str) -> Result<(), tonic::Status> {
        cri_pull(&self.containerd.socket, reference).await
    }

    /// `ctr` in CRI's namespace, panicking on failure; its stdout.
    pub fn k8s(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.containerd.ctr_ok_in(CRI_NAMESPACE, args)).into_owned()
    }

    /// dfdaemon's metrics, as exposed.
    pub async fn metrics_text(&self) -> String {
        damselfly::registry::install_crypto_provider();
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("scrape dfdaemon")
            .text()
            .await
            .expect("read dfdaemon's metrics")
    }

    /// The value of one series (`name{labels}` as exposed), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().expect("a metric value"))
    }

    /// Prepares that went containerd's way for reason `reason` so far.
    pub async fn declined(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "damselfly_dfdaemon_fast_path_declined_total{{reason=\"{reason}\"}}"
        ))
        .await
    }

    /// dfdaemon's own snapshots, asked on its snapshot socket.
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
    /// `namespace`, of `snapshotter`), read through a view mounted under
    /// `scratch`, then unmounted and removed.
    pub fn snapshot_tree(
        &self,
        scratch: &Scratch,
        namespace: &str,
        snapshotter: &str,
        name: &str,
    ) -> Tree {
        let key = format!("tree-view-{}", free_port());
        let ctr = |args: &[&str]| {
            let mut full = vec!["snapshots", "--snapshotter", snapshotter];
            full.extend(args);
            self.containerd.ctr_ok_in(namespace, &full)
        };
        let mounts: Vec<MountSpec> =
            serde_json::from_slice(&ctr(&["view", "--mounts", &key, name]))
                .expect("the view's mounts as JSON");
        let target = scratch.join(&key);
        fs::create_dir(&target).unwrap();
        for spec in &mounts {
            spec.mount(&target);
        }
        let tree = Tree::read(&target);
        nix::mount::umount2(&target, MntFlags::MNT_DETACH).expect("unmount the view");
        // ctr made the view under a lease of its own, so containerd's GC
        // may have removed it already.
        let removed = self.containerd.ctr_in(
            namespace,
            &["snapshots", "--snapshotter", snapshotter, "rm", &key],
        );
        let stderr = String::from_utf8_lossy(&removed.stderr);
        assert!(
            removed.status.success() || stderr.contains("not found"),
            "remove view {key}: {stderr}"
        );
        tree
    }
}

/// A kubelet-style CRI PullImage of `reference` from the containerd at `socket`.
pub async fn cri_pull(socket: &Path, reference: &str) -> Result<(), tonic::Status> {
    let channel = containerd_client::connect(socket)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect to containerd: {e}")))?;
    ImageServiceClient::new(channel)
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: reference.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(drop)
}

/// Whether a backend snapshot is committed.
pub fn is_committed(info: &Info) -> bool {
    info.kind == Kind::Committed as i32
}

/// One mount of a view, as `ctr snapshots view --mounts` prints it.
#[derive(Deserialize)]
struct MountSpec {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Source")]
    source: String,
    #[serde(rename = "Options", default)]
    options: Vec<String>,
}

impl MountSpec {
    fn mount(&self, target: &Path) {
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for option in &self.options {
            match option.as_str() {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                "bind" => flags |= MsFlags::MS_BIND,
                other => data.push(other),
            }
        }
        let kind = (!flags.contains(MsFlags::MS_BIND)).then_some(self.kind.as_str());
        nix::mount::mount(
            Some(self.source.as_str()),
            target,
            kind,
            flags,
            Some(data.join(",").as_str()),
        )
        .unwrap_or_else(|e| panic!("mount {} on {}: {e}", self.source, target.display()));
    }
}

/// A file tree: per path (relative, `/`-separated), what is there.
#[derive(Debug, PartialEq, Eq)]
pub struct Tree(pub BTreeMap<String, Node>);

/// One entry of a [`Tree`]; times are left out (implicit directories get
/// the time they were made).
#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        sha256: String,
        links: u64,
    },
    Symlink {
        target: PathBuf,
    },
    Other {
        mode: u32,
    },
}

impl Tree {
    pub fn read(root: &Path) -> Self {
        let mut tree = BTreeMap::new();
        walk(root, Path::new(""), &mut tree);
        Self(tree)
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        self.0.get(path)
    }
}

fn walk(root: &Path, rel: &Path, tree: &mut BTreeMap<String, Node>) {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
        let entry = entry.unwrap();
        let rel = rel.join(entry.file_name());
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode();
        let (uid, gid) = (meta.uid(), meta.gid());
        let node = if meta.file_type().is_symlink() {
            Node::Symlink {
                target: fs::read_link(&path).unwrap(),
            }
        } else if meta.is_dir() {
            walk(root, &rel, tree);
            Node::Dir { mode, uid, gid }
        } else if meta.is_file() {
            Node::File {
                mode,
                uid,
                gid,
                size: meta.len(),
                sha256: sha256_file(&path),
                links: meta.nlink(),
            }
        } else {
            Node::Other { mode }
        };
        tree.insert(rel.to_string_lossy().into_owned(), node);
    }
}
