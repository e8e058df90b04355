//! The tree dfdaemon unpacks is containerd's tree: the same images are
//! pulled through CRI on a stock containerd (its content store, its
//! overlayfs snapshotter and applier) and on one whose content store and
//! snapshotter are dfdaemon (which takes the fast path for every layer), and
//! every layer's own directory and every chain's mounted view are listed
//! (types, modes, owners, contents, links, devices, xattrs, mtimes,
//! hardlinks) and compared.

mod common;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use common::snapshotter_node::SnapshotterNode;
use common::tree::{self, Entry};
use common::{CatalogImage, Containerd, Registry, Scratch};

/// How many differences a failure shows per listing.
const SHOWN: usize = 12;

#[tokio::test(flavor = "multi_thread")]
async fn dfdaemon_unpacks_the_tree_containerd_unpacks() {
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let images = [
        (registry.push("tricky"), "damselfly/tricky:v1"),
        (registry.push("small"), "damselfly/multi:v1"),
    ];
    let stock = Containerd::start_with(&scratch, "stock", None, None, None, &registry.host);
    let node = SnapshotterNode::start(&scratch, registry.upstream(), Vec::new(), Vec::new());
    let ours = &node.containerd;
    let sides = [(&stock, "overlayfs"), (ours, "damselfly")];

    let unpack_started = SystemTime::now();
    let mut layers = 0;
    for (catalog, name) in &images {
        let reference = format!("{}/{name}", registry.host);
        tokio::join!(stock.cri_pull(&reference), ours.cri_pull(&reference));
        layers += chain_ids(catalog.image(name)).len();
    }
    let text = node.metrics_text().await;
    let unpacked =
        format!("damselfly_dfdaemon_unpacked_layers_total{{source=\"registry\"}} {layers}");
    assert!(
        text.lines().any(|l| l == unpacked) && !text.contains("fast_path_declined_total{"),
        "dfdaemon unpacked all {layers} layers itself; metrics:\n{text}\nlog:\n{}",
        node.dfdaemon.log_text()
    );

    let mut differences = Vec::new();
    for (catalog, name) in &images {
        for (index, chain) in chain_ids(catalog.image(name)).iter().enumerate() {
            let [stock_view, our_view] = sides.map(|(containerd, snapshotter)| {
                View::list(containerd, snapshotter, chain, &scratch, unpack_started)
            });
            if *name == "damselfly/tricky:v1" {
                assert_lists_what_is_compared(index, &stock_view);
            }
            let layer = format!("{name} layer {}", index + 1);
            for (what, a, b) in [
                ("its own dir (upper)", &stock_view.upper, &our_view.upper),
                ("the mounted chain", &stock_view.merged, &our_view.merged),
            ] {
                if let Some(diff) = tree::diff(a, b, SHOWN) {
                    differences.push(format!(
                        "{layer}, {what} (- containerd, + dfdaemon):\n{diff}"
                    ));
                }
            }
        }
    }
    assert!(
        differences.is_empty(),
        "dfdaemon's trees differ from containerd's:\n{}",
        differences.join("\n")
    );
}

/// Checks that containerd's listings of tricky show what the comparison is
/// about (so equal listings cannot come from listing too little): the
/// capability, devices, hardlinks and PAX ids in the rootfs, and in the
/// layers' own dirs the whiteout devices and opaque xattrs that a mounted
/// view hides.
fn assert_lists_what_is_compared(index: usize, view: &View) {
    let find = |list: &[Entry], path: &str| {
        list.iter()
            .find(|e| e.path == path)
            .cloned()
            .unwrap_or_else(|| panic!("containerd's tree has {path}"))
    };
    match index {
        1 => {
            let gone = find(&view.upper, "/etc/old.conf");
            assert_eq!((gone.kind, gone.rdev), ('c', Some((0, 0))), "a whiteout");
        }
        2 => {
            let app = find(&view.upper, "/opt/app");
            assert_eq!(
                app.xattrs.get("trusted.overlay.opaque").map(Vec::as_slice),
                Some(&b"y"[..])
            );
        }
        3 => {
            let ping = find(&view.merged, "/bin/ping");
            assert!(ping.xattrs.contains_key("security.capability"), "{ping}");
            assert_eq!(find(&view.merged, "/dev/null").rdev, Some((1, 3)));
            let hard = find(&view.merged, "/data/hard");
            assert_eq!(hard.inode, Some(("/data/hard".to_owned(), 2)), "{hard}");
            assert_eq!(find(&view.merged, "/data/bigid").uid, 3_000_000);
        }
        _ => {}
    }
}

/// Chain IDs of the image's layers, bottom first (OCI image spec: the first
/// is the diff_id, each next one sha256 of "<chain> <diff_id>").
fn chain_ids(image: &CatalogImage) -> Vec<String> {
    let mut chains: Vec<String> = Vec::new();
    for blob in image.amd64_blobs().iter().filter(|b| b.kind == "layer") {
        let diff_id = blob
            .diff_id
            .clone()
            .expect("the catalog names each layer's diff_id");
        let chain = match chains.last() {
            None => diff_id,
            Some(below) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{below} {diff_id}")))
            ),
        };
        chains.push(chain);
    }
    chains
}

/// One committed chain as a snapshotter shows it: its top layer's own
/// directory, and the whole chain mounted (read-only) as a container sees it.
struct View {
    upper: Vec<Entry>,
    merged: Vec<Entry>,
}

/// A mount that is undone on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// A mount as `ctr snapshots view --mounts` prints it (Go field names).
#[derive(Deserialize)]
struct CtrMount {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Source")]
    source: PathBuf,
    #[serde(rename = "Options")]
    options: Vec<String>,
}

impl View {
    /// Makes a view snapshot of `chain` in `snapshotter` and lists it. The
    /// view lives under ctr's own lease, which containerd collects when ctr
    /// exits; its mounts name only committed layer dirs, which stay.
    fn list(
        containerd: &Containerd,
        snapshotter: &str,
        chain: &str,
        scratch: &Scratch,
        fresh_since: SystemTime,
    ) -> Self {
        let key = format!("tree-view-{}", &chain[7..19]);
        let json = containerd.ctr_in_ok(
            "k8s.io",
            &[
                "snapshots",
                "--snapshotter",
                snapshotter,
                "view",
                "--mounts",
                &key,
                chain,
            ],
        );
        let mounts: Vec<CtrMount> = serde_json::from_slice(&json).expect("parse view mounts");
        let [view] = &mounts[..] else {
            panic!(
                "one mount for a view, got {}",
                String::from_utf8_lossy(&json)
            );
        };
        let upper = top_layer_dir(view);
        let target = scratch.join(&format!("{snapshotter}-{key}"));
        std::fs::create_dir_all(&target).unwrap();
        let _mounted = mount_read_only(view, &target);
        Self {
            upper: tree::list(&upper, fresh_since),
            merged: tree::list(&target, fresh_since),
        }
    }
}

/// The directory holding a view's top layer: a bind mount's source, or an
/// overlay's first lowerdir.
fn top_layer_dir(view: &CtrMount) -> PathBuf {
    match view.kind.as_str() {
        "bind" => view.source.clone(),
        "overlay" => view
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .and_then(|lowers| lowers.split(':').next())
            .map(PathBuf::from)
            .expect("an overlay view names its lowerdirs"),
        other => panic!("unexpected view mount type {other}"),
    }
}

fn mount_read_only(view: &CtrMount, target: &Path) -> Mounted {
    let data: Vec<&str> = view
        .options
        .iter()
        .map(String::as_str)
        .filter(|o| !matches!(*o, "ro" | "rw" | "bind" | "rbind"))
        .collect();
    let bind = view.kind == "bind";
    let flags = if bind {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_RDONLY
    };
    mount(
        Some(&view.source),
        target,
        Some(view.kind.as_str()),
        flags,
        (!bind).then(|| data.join(",")).as_deref(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "mount {} on {}: {e}",
            view.source.display(),
            target.display()
        )
    });
    let mounted = Mounted(target.to_path_buf());
    if bind {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("remount {} read-only: {e}", target.display()));
    }
    mounted
}
