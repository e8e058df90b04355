//! The fast path against a registry that serves HTTPS (its own CA, given to
//! containerd and dfdaemon in hosts.toml) and wants a login (htpasswd),
//! which kubelet gives to CRI only, in the PullImageRequest. Without the
//! login of its own dfdaemon cannot fetch, declines, says why once, and
//! containerd pulls and unpacks the image itself; with the login in a
//! Docker config.json, dfdaemon unpacks every layer.

mod common;

use common::snapshotter_node::{MULTI_V1_FILES, SnapshotterNode};
use common::{Registry, Scratch};

const IMAGE: &str = "damselfly/multi:v1";
/// Layers of `IMAGE`.
const LAYERS: usize = 5;
/// What `ctr image check` counts of it: the config and the layers.
const CHECKED: usize = LAYERS + 1;

/// The value of each line of metric family `name` (e.g.
/// `damselfly_dfdaemon_fast_path_declined_total`), by its labels.
fn samples<'a>(metrics: &'a str, name: &str) -> Vec<(&'a str, u64)> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_login_dfdaemon_declines_once_and_containerd_pulls() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start_secure(&scratch);
    registry.push("small");
    let secured = registry.secured.as_ref().expect("a secure registry");
    // An empty DOCKER_CONFIG dir: dfdaemon has no login from anywhere.
    let no_docker_config = scratch.join("no-docker-config");
    std::fs::create_dir(&no_docker_config).unwrap();
    let node = SnapshotterNode::start(
        &scratch,
        registry.upstream(),
        Vec::new(),
        vec![(
            "DOCKER_CONFIG".into(),
            no_docker_config.display().to_string(),
        )],
    );
    let reference = format!("{}/{IMAGE}", registry.host);

    node.cri_pull(&reference, Some((&secured.username, &secured.password)))
        .await;

    node.assert_image_complete(&reference, CHECKED);
    node.assert_container_reads(&reference, &MULTI_V1_FILES);
    let log = node.dfdaemon.log_text();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fast path not taken"))
        .collect();
    assert_eq!(
        why.len(),
        1,
        "the reason is logged once for the image:\n{log}"
    );
    assert!(
        why[0].contains("unauthorized (HTTP 401)"),
        "the log says the registry refused: {}",
        why[0]
    );
    let metrics = node.metrics_text().await;
    let declined = samples(&metrics, "damselfly_dfdaemon_fast_path_declined_total");
    assert!(
        declined.contains(&("reason=\"unauthorized\"", 1)),
        "the first layer's Prepare was declined as unauthorized:\n{metrics}"
    );
    assert!(
        declined.iter().all(
            |(reason, _)| ["reason=\"unauthorized\"", "reason=\"lower_layer\""].contains(reason)
        ),
        "no other reason:\n{metrics}"
    );
    assert_eq!(
        declined.iter().map(|(_, n)| n).sum::<u64>(),
        LAYERS as u64,
        "every layer's Prepare went containerd's way:\n{metrics}"
    );
    assert_eq!(
        samples(&metrics, "damselfly_dfdaemon_unpacked_layers_total"),
        [],
        "dfdaemon unpacked nothing:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_login_in_config_json_dfdaemon_unpacks_every_layer() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start_secure(&scratch);
    registry.push("small");
    let secured = registry.secured.as_ref().expect("a secure registry");
    let docker_config = scratch.join("config.json");
    secured.write_docker_config(&docker_config, &registry.host, &secured.password);
    let node = SnapshotterNode::start(
        &scratch,
        registry.upstream(),
        vec![
            "--docker-config".into(),
            docker_config.display().to_string(),
        ],
        Vec::new(),
    );
    let reference = format!("{}/{IMAGE}", registry.host);

    node.cri_pull(&reference, Some((&secured.username, &secured.password)))
        .await;

    let metrics = node.metrics_text().await;
    assert_eq!(
        samples(&metrics, "damselfly_dfdaemon_unpacked_layers_total"),
        [("source=\"registry\"", LAYERS as u64)],
        "dfdaemon fetched and unpacked every layer; metrics:\n{metrics}\nlog:\n{}",
        node.dfdaemon.log_text()
    );
    assert_eq!(
        samples(&metrics, "damselfly_dfdaemon_fast_path_declined_total"),
        [],
        "no Prepare went containerd's way:\n{metrics}"
    );
    node.assert_image_complete(&reference, CHECKED);
    node.assert_container_reads(&reference, &MULTI_V1_FILES);
}
