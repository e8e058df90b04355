//! The snapshotter's fast path across a mesh (issue 7, test 4): four nodes,
//! each a network namespace whose containerd uses its dfdaemon as content
//! store and snapshotter, pull one 256 MiB image through CRI at the same
//! moment. Every node unpacks every layer itself (its dfdaemon's fast-path
//! metrics say so, and no Prepare went containerd's way), the registry
//! sends about one copy of the image, and each layer reaches at most one
//! node from the registry: the others get it from peers.
//!
//! The registry's link is shaped so that the four pulls overlap. Where a
//! node's layer came from is read from its dfdaemon's metrics and from its
//! per-layer log line (`fast path: layer fetched and unpacked digest=…
//! source=…`); how dfdaemon fetches and unpacks a layer is not looked at.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};

use common::mesh::{field, scrape, start_nodes_with, start_supernode, testbed, with_infra};
use common::{CatalogBlob, Containerd, Plugins};

/// 3 uncompressed layers of 128, 96 and 32 MiB.
const IMAGE: &str = "damselfly/bench256:v1";
/// The registry's link: one copy of the image takes ~11 s over it.
const REGISTRY_MBIT: u32 = 200;
/// Far above a pull here (~30 s), so only a hang reaches it.
const PULL_TIMEOUT: Duration = Duration::from_secs(80);
/// The counter of layers dfdaemon unpacked itself, by `source`.
const UNPACKED: &str = "damselfly_dfdaemon_unpacked_layers_total{source=";
/// The counter of Prepares that went containerd's own way.
const DECLINED: &str = "damselfly_dfdaemon_fast_path_declined_total{";
/// dfdaemon's log line for each layer it fetched and unpacked.
const LAYER_DONE: &str = "fast path: layer fetched and unpacked";

#[tokio::test(flavor = "multi_thread")]
async fn four_nodes_pulling_through_cri_each_unpack_every_layer_from_one_registry_copy() {
    common::require_root!();
    const NODES: [&str; 4] = ["n1", "n2", "n3", "n4"];
    let (scratch, _logs, net, registry) = testbed("fast_path_mesh", &with_infra(&NODES));
    let catalog = registry.push("bench256");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let nodes = start_nodes_with(
        &scratch,
        &net,
        &registry,
        &NODES,
        &[&supernode],
        Plugins::ContentAndSnapshots,
    );
    let image = catalog.image(IMAGE);
    let blobs = image.amd64_blobs();
    let layers: Vec<&CatalogBlob> = blobs.iter().filter(|b| b.kind == "layer").collect();
    let reference = format!("{}/{}", registry.host, image.reference);
    let registry_host = net.host("registry");
    registry_host.shape(REGISTRY_MBIT);

    let sent_before = registry_host.tx_bytes();
    let pulls = nodes.iter().map(|n| cri_pull(&n.containerd, &reference));
    let results = futures::future::join_all(pulls).await;
    let sent = registry_host.tx_bytes() - sent_before;

    for (i, result) in results.iter().enumerate() {
        let time = result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", NODES[i]));
        eprintln!("{} pulled in {:.1} s", NODES[i], time.as_secs_f64());
        assert_image_complete(NODES[i], &nodes[i].containerd, &reference, layers.len());
        for layer in &layers {
            let path = nodes[i].dfdaemon.blob_path(&layer.digest);
            let size = std::fs::metadata(&path).map(|m| m.len()).ok();
            assert_eq!(
                size,
                Some(layer.size),
                "{} holds {} in its store",
                NODES[i],
                layer.digest
            );
        }
    }

    let image_bytes: u64 = blobs.iter().map(|b| b.size).sum();
    let copies = sent as f64 / image_bytes as f64;
    eprintln!("registry sent {sent} bytes for an image of {image_bytes} ({copies:.3} copies)");
    assert!(
        copies <= 1.05,
        "the registry sent {copies:.3} copies of the image"
    );

    let mut from_registry = 0;
    for (i, name) in NODES.iter().enumerate() {
        let text = scrape(net.host(name), "127.0.0.1:65003");
        let unpacked = unpacked_by_source(&text);
        eprintln!("{name} unpacked, by source: {unpacked:?}");
        assert_eq!(
            unpacked.values().sum::<u64>(),
            layers.len() as u64,
            "{name}'s dfdaemon unpacked every layer itself: {unpacked:?}\nlog tail:\n{}",
            common::tail(nodes[i].dfdaemon.log_path(), 30)
        );
        assert!(
            !text.contains(DECLINED),
            "{name}: no Prepare went containerd's way:\n{text}"
        );
        from_registry += unpacked.get("registry").copied().unwrap_or(0);
    }
    assert!(
        from_registry <= layers.len() as u64,
        "{from_registry} layers came from the registry, over all nodes, for {} layers",
        layers.len()
    );

    let logs: Vec<String> = nodes.iter().map(|n| n.dfdaemon.log_text()).collect();
    for layer in &layers {
        let sources: Vec<&str> = logs
            .iter()
            .enumerate()
            .map(|(i, log)| {
                layer_source(log, &layer.digest).unwrap_or_else(|| {
                    panic!("{} logs no fast-path unpack of {}", NODES[i], layer.digest)
                })
            })
            .collect();
        eprintln!(
            "{} ({} bytes) came from {sources:?}",
            layer.digest, layer.size
        );
        assert!(
            sources.iter().filter(|&&s| s == "registry").count() <= 1,
            "{} came from the registry to at most one node: {sources:?}",
            layer.digest
        );
        assert!(
            sources
                .iter()
                .all(|s| ["registry", "peers", "store"].contains(s)),
            "{}: unknown sources {sources:?}",
            layer.digest
        );
    }
}

/// A kubelet-style CRI PullImage of `reference` on `containerd`: its time,
/// or why it failed.
async fn cri_pull(containerd: &Containerd, reference: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let channel = containerd_client::connect(&containerd.socket)
        .await
        .map_err(|e| format!("connect to containerd: {e}"))?;
    let request = PullImageRequest {
        image: Some(ImageSpec {
            image: reference.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut client = ImageServiceClient::new(channel);
    match tokio::time::timeout(PULL_TIMEOUT, client.pull_image(request)).await {
        Ok(Ok(_)) => Ok(start.elapsed()),
        Ok(Err(status)) => Err(format!(
            "CRI PullImage failed after {:.1} s: {status}",
            start.elapsed().as_secs_f64()
        )),
        Err(_) => Err(format!("CRI PullImage took over {PULL_TIMEOUT:?}")),
    }
}

/// containerd (namespace `k8s.io`) holds the image's config and every layer.
fn assert_image_complete(name: &str, containerd: &Containerd, reference: &str, layers: usize) {
    let out = containerd.ctr_in("k8s.io", &["image", "check"]);
    let check = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name}: ctr image check: {out:?}");
    let line = check
        .lines()
        .find(|l| l.starts_with(reference))
        .unwrap_or_else(|| panic!("{name} lists the image: {check}"));
    let complete = format!("complete ({0}/{0})", layers + 1);
    assert!(line.contains(&complete), "{name}: {line}");
}

/// The fast path's unpacked-layer counters of a `/metrics` text, by source.
fn unpacked_by_source(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(UNPACKED))
        .map(|l| {
            let (source, value) = l.split_once("} ").expect("a labelled sample");
            let value = value.trim().parse().expect("a counter value");
            (source.trim_matches('"').to_owned(), value)
        })
        .collect()
}

/// Where `digest`'s bytes came from on the node of `log`, as its fast-path
/// unpack logged it.
fn layer_source<'a>(log: &'a str, digest: &str) -> Option<&'a str> {
    log.lines()
        .filter(|l| l.contains(LAYER_DONE))
        .find(|l| field(l, "digest") == Some(digest))
        .and_then(|l| field(l, "source"))
}
