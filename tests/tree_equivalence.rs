//! The tree dfdaemon unpacks is containerd's tree: the same images are
//! pulled through CRI on a stock containerd (its content store, its
//! overlayfs snapshotter and applier) and on one whose content store and
//! snapshotter are dfdaemon (which takes the fast path for every layer), and
//! every layer's own directory and every chain's mounted view are listed
//! (types, modes, owners, contents, links, devices, xattrs, mtimes,
//! hardlinks) and compared.

mod common;

use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use common::snapshotter_node::SnapshotterNode;
use common::tree::{self, Entry, View};
use common::{CatalogImage, Containerd, Registry, Scratch};

/// How many differences a failure shows per listing.
const SHOWN: usize = 12;

#[tokio::test(flavor = "multi_thread")]
async fn dfdaemon_unpacks_the_tree_containerd_unpacks() {
    common::require_root!();
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
                View::list(
                    containerd,
                    "k8s.io",
                    snapshotter,
                    chain,
                    &scratch,
                    unpack_started,
                )
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
