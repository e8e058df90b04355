//! Crash safety of the snapshotter fast path, and containerd's GC over what
//! it made: dfdaemon killed (-9) while it unpacks a 512 MiB layer leaves no
//! partial snapshot and no staging directory behind, the retried CRI pull
//! completes with every file of every layer right, and removing the image
//! frees every snapshot, blob and byte again. And containerd's GC while a
//! layer streams keeps the image on the fast path.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::snapshotter_node::{CRI_NAMESPACE, SNAPSHOTTER, SnapshotterNode, is_committed};
use common::{Registry, Scratch, oci, try_cri_pull};

/// The big file of `damselfly/large:v1`'s first layer (test-images/generate.py).
const DATA_FILE: &str = "damselfly/large/data.bin";
/// Its size.
const DATA_SIZE: u64 = (512 << 20) + 4093;
/// How long the CRI pull may take to reach the unpack, and the retry to
/// succeed once dfdaemon is back (containerd reconnects with a backoff).
const PATIENCE: Duration = Duration::from_secs(120);
/// The two tests here run one at a time: each pushes the 512 MiB `large` set
/// into a registry of its own and pulls it, about 2 GiB of disk and both of
/// CI's cores each, and side by side they ran CI's /tmp out of space.
static ONE_LARGE_PULL_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_unpack_leaves_nothing_half_made_and_gc_frees_it_all() {
    common::require_root!();
    let _turn = ONE_LARGE_PULL_AT_A_TIME.lock().await;
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("large");
    let image = catalog.image("damselfly/large:v1");
    let blobs = image.amd64_blobs();
    let layers: Vec<_> = blobs.iter().filter(|b| b.kind == "layer").collect();
    let chains = oci::chain_ids(
        layers
            .iter()
            .map(|l| l.diff_id.as_deref().expect("diff_id")),
    );
    let name = image.reference.split(':').next().unwrap();
    let mut files = BTreeMap::new();
    for layer in &layers {
        files.extend(oci::layer_files(
            &oci::fetch_blob(&registry.host, name, &layer.digest).await,
        ));
    }
    let mut node = SnapshotterNode::start(&scratch, registry.upstream(), Vec::new(), Vec::new());
    let snapshots_dir = node.dfdaemon.data_dir.join("snapshots");
    let empty_usage = disk_usage(&snapshots_dir);
    let reference = format!("{}/{}", registry.host, image.reference);

    // 1. Kill dfdaemon while the fast path writes the big file.
    let first_pull = tokio::spawn({
        let (socket, reference) = (node.containerd.socket.clone(), reference.clone());
        async move { try_cri_pull(&socket, &reference, None).await }
    });
    assert_eq!(files[DATA_FILE].0, DATA_SIZE);
    let (caught, written) = mid_unpack(&node, DATA_SIZE).await;
    node.dfdaemon.kill9();
    let first = tokio::time::timeout(PATIENCE, first_pull)
        .await
        .expect("the first pull ends once dfdaemon is gone")
        .unwrap();
    eprintln!(
        "killed with {written} bytes of {DATA_SIZE} in {}; first pull: {first:?}",
        caught.display()
    );
    node.dfdaemon.restart();

    // Layers are committed in order, and the first was half unpacked: there
    // is nothing to list, and open() removed the staging dirs.
    assert_eq!(
        node.staging_dirs(),
        Vec::<String>::new(),
        "staging dirs left"
    );
    assert!(!caught.exists(), "the half-unpacked file is gone");
    let listed = node.backend_snapshots().await;
    assert!(listed.is_empty(), "no snapshot after the crash: {listed:?}");
    assert_eq!(snapshot_dirs(&snapshots_dir), 0, "no orphaned snapshot dir");

    // 2. The retried pull completes, on the fast path again.
    retry_pull(&node, &reference).await;
    let mut fast_path: Vec<(String, String)> = node
        .backend_snapshots()
        .await
        .into_iter()
        .map(|info| {
            assert!(is_committed(&info), "only committed snapshots: {info:?}");
            let chain = info.labels["containerd.io/snapshot.ref"].clone();
            (info.name, chain)
        })
        .collect();
    fast_path.sort_by_key(|(_, chain)| chains.iter().position(|c| c == chain));
    let expected: Vec<(String, String)> = chains
        .iter()
        .map(|c| (format!("{CRI_NAMESPACE}/damselfly/{c}"), c.clone()))
        .collect();
    assert_eq!(fast_path, expected, "one fast-path snapshot per layer");
    let listed_by_containerd = node.k8s(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    for line in listed_by_containerd.lines().skip(1) {
        let kind = line.split_whitespace().last();
        assert_eq!(kind, Some("Committed"), "{listed_by_containerd}");
    }
    let check = node.k8s(&["image", "check"]);
    // `ctr image check` counts the config and layers, not the manifest.
    let complete = format!("complete ({0}/{0})", layers.len() + 1);
    assert!(
        check
            .lines()
            .any(|l| l.starts_with(&reference) && l.contains(&complete)),
        "{check}"
    );
    check_files(&node, &reference, &files);

    // 3. Removing the image and the leases lets containerd's GC free it all.
    for listed in node.k8s(&["image", "ls", "-q"]).lines() {
        node.k8s(&["image", "rm", "--sync", listed]);
    }
    for lease in node.k8s(&["leases", "ls", "-q"]).lines() {
        node.k8s(&["leases", "rm", "--sync", lease]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.backend_snapshots().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        node.backend_snapshots().await,
        Vec::new(),
        "GC removed every snapshot"
    );
    let kept: Vec<_> = blobs
        .iter()
        .filter(|b| node.dfdaemon.blobs().contains(&b.digest))
        .collect();
    assert!(kept.is_empty(), "GC removed the image's blobs: {kept:?}");
    assert_eq!(node.dfdaemon.ingest_bytes(), 0, "no ingest is left");
    let freed = disk_usage(&snapshots_dir);
    assert!(
        freed <= empty_usage + (1 << 20),
        "snapshots dir back to {empty_usage} bytes, not {freed}"
    );
}

/// containerd's content GC aborts every ingest it did not open, and the
/// fast path's (`damselfly/fastpath/layer-…`) is dfdaemon's own: a GC while
/// a layer streams (here: an unrelated image removed, as kubelet's image GC
/// does) must not knock the image off the fast path.
#[tokio::test(flavor = "multi_thread")]
async fn gc_while_a_layer_streams_keeps_it_on_the_fast_path() {
    common::require_root!();
    let _turn = ONE_LARGE_PULL_AT_A_TIME.lock().await;
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("large");
    let image = catalog.image("damselfly/large:v1");
    let node = SnapshotterNode::start(&scratch, registry.upstream(), Vec::new(), Vec::new());
    let other = oci::Image::new(vec![oci::Layer::gzip(
        oci::Tar::new().file("other.txt", b"other\n").finish(),
    )]);
    let other = other.push(&registry.host, "other/image", "v1").await;
    node.containerd
        .try_cri_pull(&other, None)
        .await
        .expect("pull the other image");
    let reference = format!("{}/{}", registry.host, image.reference);

    let pull = tokio::spawn({
        let (socket, reference) = (node.containerd.socket.clone(), reference.clone());
        async move { try_cri_pull(&socket, &reference, None).await }
    });
    mid_unpack(&node, DATA_SIZE).await;
    for listed in node.k8s(&["image", "ls", "-q"]).lines() {
        if !listed.contains("damselfly/large") {
            node.k8s(&["image", "rm", "--sync", listed]);
        }
    }
    pull.await.unwrap().expect("the pull completes");
    let declined = node.declined("store").await + node.declined("lower_layer").await;
    assert_eq!(declined, 0.0, "log:\n{}", node.dfdaemon.log_text());
}

/// Waits until the fast path has written a good part, not all, of the file
/// of `size` bytes at [`DATA_FILE`] in a staging dir; its path and length.
async fn mid_unpack(node: &SnapshotterNode, size: u64) -> (PathBuf, u64) {
    let snapshots = node.dfdaemon.data_dir.join("snapshots");
    let deadline = Instant::now() + PATIENCE;
    loop {
        for staging in node.staging_dirs() {
            let file = snapshots.join(staging).join("fs").join(DATA_FILE);
            if let Ok(meta) = fs::metadata(&file)
                && meta.len() >= size / 16
                && meta.len() < size
            {
                return (file, meta.len());
            }
        }
        assert!(
            Instant::now() < deadline,
            "dfdaemon never unpacked {DATA_FILE}; its log:\n{}",
            node.dfdaemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Pulls until a pull succeeds: containerd reconnects to a restarted
/// dfdaemon with a backoff, and fails calls meanwhile.
async fn retry_pull(node: &SnapshotterNode, reference: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match node.containerd.try_cri_pull(reference, None).await {
            Ok(()) => return,
            Err(status) if Instant::now() < deadline => {
                eprintln!("retrying the pull: {status}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(status) => panic!(
                "the retried pull never succeeded: {status}\ndfdaemon log:\n{}",
                node.dfdaemon.log_text()
            ),
        }
    }
}

/// Reads every file of the image in a container on dfdaemon's snapshots
/// and checks its size and sha256.
fn check_files(node: &SnapshotterNode, reference: &str, files: &BTreeMap<String, (u64, String)>) {
    let paths: Vec<String> = files.keys().map(|p| format!("/{p}")).collect();
    let script = format!(
        "/bin/busybox wc -c {0}; /bin/busybox sha256sum {0}",
        paths.join(" ")
    );
    let out = node.k8s(&[
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        "--mount",
        "type=bind,src=/bin/busybox,dst=/bin/busybox,options=rbind:ro",
        reference,
        "fast-path-crash-probe",
        "/bin/busybox",
        "sh",
        "-c",
        &script,
    ]);
    for (path, (size, sha256)) in files {
        let path = format!("/{path}");
        let hex = sha256.strip_prefix("sha256:").unwrap();
        for expected in [[size.to_string().as_str(), &path], [hex, &path]] {
            assert!(
                out.lines().any(|l| l.split_whitespace().eq(expected)),
                "the container reads {path} ({size} bytes, {sha256}):\n{out}"
            );
        }
    }
}

/// Snapshot directories (named by id) in `dir`.
fn snapshot_dirs(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().bytes().all(|b| b.is_ascii_digit())
        })
        .count()
}

/// Bytes of disk the tree at `dir` takes.
fn disk_usage(dir: &Path) -> u64 {
    let meta = fs::symlink_metadata(dir).unwrap();
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(dir).unwrap() {
            total += disk_usage(&entry.unwrap().path());
        }
    }
    total
}
