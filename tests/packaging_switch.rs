//! The switch of a node that already has images (issue 11): a stock
//! containerd (built-in content store, overlayfs) pulls two images and runs
//! a container from one; then, as the installer does, its blobs are
//! imported into dfdaemon's store (`dfdaemon import-content`), dfdaemon is
//! started, `dfdaemon containerd-config install` edits containerd's config
//! and containerd is restarted on it. Both images are complete (`ctr image
//! check`), readable, and a new container starts from each on the
//! `damselfly` snapshotter; a new image pulls through dfdaemon (CRI). After
//! `containerd-config uninstall` and a restart the two images are still
//! complete in the built-in store and run again.

mod common;

use std::path::Path;
use std::process::Command;

use common::snapshotter_node::{CRI_NAMESPACE, MULTI_V1_FILES, SNAPSHOTTER};
use common::{Containerd, Dfdaemon, Registry, Scratch, free_port, snapshotter_args};

const SHARED_V1_FILES: [(&str, u64); 2] = [
    ("/damselfly/shared/random.bin", 200001),
    ("/damselfly/multi/gzip/notes.txt", 65543),
];

fn dfdaemon_cmd(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dfdaemon"))
        .args(args)
        .output()
        .expect("run dfdaemon");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dfdaemon {args:?}: {text}");
    text
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread")]
async fn images_stay_complete_through_install_and_uninstall() {
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("small");
    let multi = format!("{}/damselfly/multi:v1", registry.host);
    let shared = format!("{}/damselfly/shared:v1", registry.host);
    let blobs = |image: &str| catalog.image(image).amd64_blobs().len();
    let (multi_blobs, shared_blobs) = (blobs("damselfly/multi:v1"), blobs("damselfly/shared:v1"));
    // What `ctr image check` counts: the config and the layers.
    let (multi_checked, shared_checked) = (multi_blobs - 1, shared_blobs - 1);

    // Before: containerd's own store and snapshotter.
    let mut containerd =
        Containerd::start_with(&scratch, "containerd", None, None, None, &registry.host);
    for image in [&multi, &shared] {
        containerd.ctr_in_ok(CRI_NAMESPACE, &["image", "pull", "--plain-http", image]);
    }
    containerd.assert_container_reads(CRI_NAMESPACE, "overlayfs", &multi, &MULTI_V1_FILES);
    let builtin = containerd.root.join("io.containerd.content.v1.content");
    let builtin_blobs = std::fs::read_dir(builtin.join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(
        builtin_blobs,
        multi_blobs + shared_blobs - 1,
        "one layer is shared"
    );

    // The switch, in the installer's order.
    containerd.stop();
    let data_dir = scratch.join("dfdaemon-data");
    let imported = dfdaemon_cmd(&[
        "import-content",
        "--from",
        path(&builtin),
        "--data-dir",
        path(&data_dir),
    ]);
    assert!(
        imported.contains(&format!("{builtin_blobs} linked, 0 copied")),
        "{imported}"
    );
    let snapshot_socket = scratch.join("snapshot.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = snapshotter_args(&scratch, "containerd", &snapshot_socket);
    args.extend(["--metrics-listen".to_owned(), metrics.clone()]);
    let dfdaemon = Dfdaemon::start_in(&scratch, "dfdaemon", None, args);
    assert_eq!(dfdaemon.blobs().len(), builtin_blobs);
    dfdaemon.assert_blobs_intact();
    let config = scratch.join("containerd/config.toml");
    let original = std::fs::read(&config).unwrap();
    dfdaemon_cmd(&[
        "containerd-config",
        "install",
        "--config",
        path(&config),
        "--content-socket",
        path(&dfdaemon.socket),
        "--snapshot-socket",
        path(&snapshot_socket),
    ]);
    containerd.restart();

    let plugins = String::from_utf8_lossy(&containerd.ctr_ok(&["plugins", "ls"])).into_owned();
    let content: Vec<&str> = plugins
        .lines()
        .filter(|l| l.starts_with("io.containerd.content.v1"))
        .collect();
    assert_eq!(content.len(), 1, "{plugins}");
    assert!(
        content[0].contains("damselfly-content") && content[0].trim_end().ends_with("ok"),
        "{plugins}"
    );
    containerd.assert_image_complete(CRI_NAMESPACE, &multi, multi_checked);
    containerd.assert_image_complete(CRI_NAMESPACE, &shared, shared_checked);
    containerd.assert_container_reads(CRI_NAMESPACE, SNAPSHOTTER, &multi, &MULTI_V1_FILES);
    containerd.assert_container_reads(CRI_NAMESPACE, SNAPSHOTTER, &shared, &SHARED_V1_FILES);

    // A new image pulls through dfdaemon, as kubelet pulls.
    let multiarch = catalog.image("damselfly/multiarch:v1");
    containerd
        .cri_pull(&format!("{}/{}", registry.host, multiarch.reference))
        .await;
    for blob in multiarch.amd64_blobs() {
        assert!(
            dfdaemon.blob_path(&blob.digest).exists(),
            "{} is not in dfdaemon's store",
            blob.digest
        );
        let hex = blob.digest.trim_start_matches("sha256:");
        assert!(!builtin.join("blobs/sha256").join(hex).exists());
    }
    damselfly::registry::install_crypto_provider();
    let ready = reqwest::get(format!("http://{metrics}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "dfdaemon's /readyz");

    // And back. The image pulled meanwhile is only in dfdaemon's store
    // (the node installer's uninstall links such blobs back; here it goes).
    let config_digest = multiarch
        .amd64_blobs()
        .into_iter()
        .find(|b| b.kind == "config")
        .expect("amd64 config")
        .digest;
    let names = containerd.ctr_in_ok(CRI_NAMESPACE, &["image", "ls", "-q"]);
    for name in String::from_utf8_lossy(&names).lines() {
        if name.contains("damselfly/multiarch") || name == config_digest {
            containerd.ctr_in_ok(CRI_NAMESPACE, &["image", "rm", name]);
        }
    }
    let said = dfdaemon_cmd(&["containerd-config", "uninstall", "--config", path(&config)]);
    assert!(said.contains(": changed"), "{said}");
    assert_eq!(std::fs::read(&config).unwrap(), original);
    containerd.stop();
    containerd.restart();
    containerd.assert_image_complete(CRI_NAMESPACE, &multi, multi_checked);
    containerd.assert_image_complete(CRI_NAMESPACE, &shared, shared_checked);
    containerd.assert_container_reads(CRI_NAMESPACE, "overlayfs", &multi, &MULTI_V1_FILES);
    containerd.assert_container_reads(CRI_NAMESPACE, "overlayfs", &shared, &SHARED_V1_FILES);
}
