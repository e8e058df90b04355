//! A kubelet-style pull: CRI `runtime.v1.ImageService/PullImage` on a real
//! containerd, whose content store is dfdaemon.

mod common;

use std::collections::BTreeSet;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ImageStatusRequest, PullImageRequest};

use common::{Node, Registry, Scratch, sha256_bytes};

#[tokio::test(flavor = "multi_thread")]
async fn cri_pull_image_goes_through_the_plugin() {
    common::require_root!();
    let scratch = Scratch::new();
    let registry = Registry::start(&scratch);
    let catalog = registry.push("small");
    let node = Node::start(&scratch, &registry);
    let image = catalog.image("damselfly/multiarch:v1");
    let reference = format!("{}/{}", registry.host, image.reference);

    let channel = containerd_client::connect(&node.containerd.socket)
        .await
        .expect("connect to containerd");
    let mut cri = ImageServiceClient::new(channel);
    let spec = ImageSpec {
        image: reference.clone(),
        ..Default::default()
    };
    let pulled = cri
        .pull_image(PullImageRequest {
            image: Some(spec.clone()),
            ..Default::default()
        })
        .await
        .expect("CRI PullImage")
        .into_inner();
    let config = image
        .amd64_blobs()
        .into_iter()
        .find(|b| b.kind == "config")
        .expect("amd64 config");
    assert_eq!(
        pulled.image_ref, config.digest,
        "CRI names the image by its config digest"
    );

    let status = cri
        .image_status(ImageStatusRequest {
            image: Some(spec),
            verbose: false,
        })
        .await
        .expect("CRI ImageStatus")
        .into_inner();
    let found = status.image.expect("image known to CRI");
    assert!(
        found.repo_tags.contains(&reference),
        "{:?}",
        found.repo_tags
    );

    let expected: BTreeSet<String> = image.amd64_blobs().into_iter().map(|b| b.digest).collect();
    let stored: BTreeSet<String> = node.dfdaemon.blobs().into_iter().collect();
    assert_eq!(
        stored, expected,
        "the CRI pull stored its blobs in dfdaemon"
    );
    for digest in &expected {
        assert_eq!(
            &sha256_bytes(&std::fs::read(node.dfdaemon.blob_path(digest)).unwrap()),
            digest
        );
    }
}
