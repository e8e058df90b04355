//! Real containerd 1.6 with dfdaemon as its content store, pulling from a
//! real registry: pulls, read-back, garbage collection, restarts and crashes.

mod common;

use std::collections::BTreeSet;
use std::thread;
use std::time::Duration;

use common::{Node, Registry, Scratch, sha256_bytes, wait_for};

/// Every image of the small set pulls and unpacks; every blob lands in
/// dfdaemon's store (containerd keeps none of its own) and reads back through
/// containerd with the right digest.
#[test]
fn pulls_every_test_image_through_the_plugin() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("small");
    let node = Node::start(&scratch, &registry);

    let mut expected = BTreeSet::new();
    for image in &catalog.0 {
        node.containerd.pull(&registry.host, &image.reference);
        expected.extend(image.amd64_blobs().into_iter().map(|b| b.digest));
    }
    let stored: BTreeSet<String> = node.dfdaemon.blobs().into_iter().collect();
    assert_eq!(stored, expected, "dfdaemon holds exactly the pulled blobs");
    assert!(
        !node
            .containerd
            .root
            .join("io.containerd.content.v1.content")
            .exists(),
        "containerd must not keep a content store of its own"
    );
    for digest in &expected {
        let bytes = node.containerd.content(digest);
        assert_eq!(
            &sha256_bytes(&bytes),
            digest,
            "read back through containerd"
        );
    }
    node.dfdaemon.assert_blobs_intact();
}

/// `ctr image rm --sync` lets containerd's GC delete the image's blobs from
/// dfdaemon's data dir, freeing the disk; a layer another image still uses stays.
#[test]
fn garbage_collection_frees_unreferenced_blobs() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("small");
    let node = Node::start(&scratch, &registry);
    let multi = catalog.image("damselfly/multi:v1");
    let shared = catalog.image("damselfly/shared:v1");
    node.containerd.pull(&registry.host, &multi.reference);
    node.containerd.pull(&registry.host, &shared.reference);

    let used_by_shared: BTreeSet<String> = shared.blobs.iter().map(|b| b.digest.clone()).collect();
    let only_multi: Vec<_> = multi
        .blobs
        .iter()
        .filter(|b| !used_by_shared.contains(&b.digest))
        .collect();
    let common_layers: Vec<_> = multi
        .blobs
        .iter()
        .filter(|b| used_by_shared.contains(&b.digest))
        .collect();
    assert!(
        !only_multi.is_empty() && !common_layers.is_empty(),
        "test images share a layer"
    );
    let bytes_before = du(&node.dfdaemon);

    let reference = format!("{}/{}", registry.host, multi.reference);
    node.containerd
        .ctr_ok(&["image", "rm", "--sync", &reference]);

    for blob in &only_multi {
        assert!(
            !node.dfdaemon.blob_path(&blob.digest).exists(),
            "{} ({}) should have been collected",
            blob.digest,
            blob.kind
        );
    }
    for blob in &common_layers {
        assert!(
            node.dfdaemon.blob_path(&blob.digest).exists(),
            "shared layer was deleted"
        );
    }
    let freed: u64 = only_multi.iter().map(|b| b.size).sum();
    assert_eq!(bytes_before - du(&node.dfdaemon), freed, "disk freed");
    for blob in &shared.blobs {
        assert_eq!(
            sha256_bytes(&node.containerd.content(&blob.digest)),
            blob.digest
        );
    }
}

/// Restarting dfdaemon and containerd keeps every image and its content.
#[test]
fn images_survive_restarts() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("small");
    let mut node = Node::start(&scratch, &registry);
    let image = catalog.image("damselfly/multi:v1");
    node.containerd.pull(&registry.host, &image.reference);

    node.containerd.stop();
    node.dfdaemon.stop();
    node.dfdaemon.restart();
    node.containerd.restart();

    let listed = String::from_utf8(node.containerd.ctr_ok(&["image", "ls", "-q"])).unwrap();
    assert!(
        listed.contains(&image.reference),
        "image listed after restart: {listed}"
    );
    for blob in &image.blobs {
        assert_eq!(
            sha256_bytes(&node.containerd.content(&blob.digest)),
            blob.digest
        );
    }
    // Unpacked and usable: containerd can check the image's content is complete.
    let reference = format!("{}/{}", registry.host, image.reference);
    let check = String::from_utf8(node.containerd.ctr_ok(&["image", "check"])).unwrap();
    let line = check
        .lines()
        .find(|l| l.starts_with(&reference))
        .expect("image in check");
    assert!(
        line.contains("complete"),
        "image check after restart: {line}"
    );
}

/// dfdaemon killed (-9) in the middle of a 512 MiB layer: no partial blob is
/// visible, and after a restart the pull completes (resuming the ingest) with
/// the correct digest.
#[test]
fn pull_completes_after_dfdaemon_is_killed_mid_layer() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("large");
    let mut node = Node::start(&scratch, &registry);
    let image = catalog.image("damselfly/large:v1");
    let big = image
        .blobs
        .iter()
        .max_by_key(|b| b.size)
        .expect("large image has blobs")
        .clone();

    let reference = format!("{}/{}", registry.host, image.reference);
    let socket = node.containerd.socket.clone();
    let pull = thread::spawn(move || {
        std::process::Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args([
                "--namespace",
                "test",
                "image",
                "pull",
                "--plain-http",
                &reference,
            ])
            .output()
            .expect("run ctr")
    });
    wait_for("half of the large layer", Duration::from_secs(120), || {
        node.dfdaemon.ingest_bytes() > big.size / 2
    });
    node.dfdaemon.kill9();
    let crashed_at = node.dfdaemon.ingest_bytes();
    let first = pull.join().unwrap();
    assert!(
        !first.status.success(),
        "the pull cannot succeed without its store"
    );
    assert!(
        !node.dfdaemon.blob_path(&big.digest).exists(),
        "no partial blob is visible"
    );

    node.dfdaemon.restart();
    node.dfdaemon.assert_blobs_intact();
    node.containerd.wait_for_plugin();
    node.containerd.pull(&registry.host, &image.reference);
    assert_eq!(
        common::sha256_file(&node.dfdaemon.blob_path(&big.digest)),
        big.digest,
        "the resumed layer is intact"
    );
    let log = node.dfdaemon.log_text();
    assert!(
        log.contains("resuming ingest"),
        "the second pull resumed the ingest left at {crashed_at} bytes:\n{}",
        &log[log.len().saturating_sub(4000)..]
    );
    for blob in image.amd64_blobs() {
        assert!(node.dfdaemon.blob_path(&blob.digest).exists());
    }
}

/// Bytes of committed blobs in dfdaemon's data dir.
fn du(daemon: &common::Dfdaemon) -> u64 {
    daemon
        .blobs()
        .iter()
        .map(|d| std::fs::metadata(daemon.blob_path(d)).unwrap().len())
        .sum()
}
