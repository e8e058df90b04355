//! The supernode restarted on the same volume (its data dir, as a
//! StatefulSet's PersistentVolumeClaim keeps it): the repo copied every
//! layer of an image from the node that pulled it; that node goes away and
//! the supernode is killed and started again on the same dir. The next
//! node gets every piece of every layer from the repo (`source="supernode"`),
//! the registry sends no layer, and the repo copies nothing again. (The LRU
//! cap is shown by `supernode::repo`'s unit test on a real store.)

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::mesh::{field, metric, scrape, start_nodes, start_supernode_with, testbed, with_infra};
use common::wait_for;

/// Every piece here has the default size (blobs under 1 GiB).
const PIECE: u64 = damselfly::protocol::piece::DEFAULT_PIECE_SIZE;

#[test]
fn restarted_supernode_serves_its_repo_again_without_refetching() {
    const NODES: [&str; 2] = ["a", "b"];
    let (scratch, _logs, net, registry) = testbed("supernode_repo_restart", &with_infra(&NODES));
    let catalog = registry.push("small");
    let mut supernode =
        start_supernode_with(&scratch, &net, "supernode", &["--repo-max-mib", "64"]);
    let mut nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image("damselfly/multi:v1");
    let layers: Vec<_> = image
        .amd64_blobs()
        .into_iter()
        .filter(|b| b.kind == "layer")
        .collect();
    let stored = |log: &str, digest: &str| {
        log.lines()
            .filter(|l| l.contains("repo: blob stored") && field(l, "digest") == Some(digest))
            .count()
    };

    nodes[0].containerd.pull(&registry.host, &image.reference);
    wait_for(
        "the repo to store every layer",
        Duration::from_secs(30),
        || {
            let log = supernode.log_text();
            layers.iter().all(|l| stored(&log, &l.digest) == 1)
        },
    );
    nodes[0].dfdaemon.kill9();
    supernode.kill9();
    let log_before = supernode.log_text().len();
    supernode.restart();
    let sn = net.host("supernode");
    let metrics_addr = format!("{}:8003", sn.ip());
    wait_for(
        "the repo and b to register again",
        Duration::from_secs(15),
        || metric(&scrape(sn, &metrics_addr), "supernode_hosts") == 2,
    );
    // The restarted supernode elects nobody for three heartbeats (1.5 s).
    std::thread::sleep(Duration::from_secs(2));

    let sent_before = net.host("registry").tx_bytes();
    nodes[1].containerd.pull(&registry.host, &image.reference);
    let sent = net.host("registry").tx_bytes() - sent_before;

    let log = nodes[1].dfdaemon.log_text();
    let mut from: BTreeMap<(String, String), u64> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("downloading piece")) {
        if let (Some(task), Some(source)) = (field(line, "taskID"), field(line, "source")) {
            *from
                .entry((task.to_owned(), source.to_owned()))
                .or_default() += 1;
        }
    }
    for layer in &layers {
        let pieces = layer.size.div_ceil(PIECE);
        assert_eq!(
            from.get(&(layer.digest.clone(), "supernode".to_owned())),
            Some(&pieces),
            "b got every piece of {} from the repo: {from:?}",
            layer.digest
        );
        assert!(
            !from.contains_key(&(layer.digest.clone(), "registry".to_owned())),
            "b fetched {} from the registry",
            layer.digest
        );
        let blob = nodes[1].dfdaemon.blob_path(&layer.digest);
        assert_eq!(common::sha256_file(&blob), layer.digest);
    }
    let layer_bytes: u64 = layers.iter().map(|l| l.size).sum();
    eprintln!("registry sent {sent} bytes for b's pull; the layers are {layer_bytes}");
    assert!(sent < layer_bytes / 10, "the registry sent {sent} bytes");
    let after_restart = &supernode.log_text()[log_before..];
    assert!(
        layers.iter().all(|l| stored(after_restart, &l.digest) == 0),
        "the restarted repo copied a blob again:\n{after_restart}"
    );
}
