//! Cancellation as an outcome of its own (issue 8, item 5): a pull cancelled
//! while its node downloads a layer from peers stops that download, frees
//! the ref and leaves the task; containerd's GC then aborts the ingest, and
//! the same pull on that node works again at once.
//!
//! Not shown yet: that a third node pulling meanwhile never stalls on the
//! cancelled one (it still may: announces and reports in flight can land
//! after the Leave).

mod common;

use std::process::Stdio;
use std::thread;
use std::time::Duration;

use common::mesh::{
    BENCH256, field, layer_blobs, lines_with, pull, start_nodes, start_supernode, testbed,
    with_infra,
};
use common::{Containerd, sha256_file, wait_for};

/// n1 ingests the image from a slow registry; n2's pull is killed while n2
/// downloads the big layer from n1, then containerd's GC on n2 removes the
/// pull's lease (and aborts its ingests). n3 pulls meanwhile; n2's second
/// pull of the same image succeeds.
#[test]
fn cancelled_pull_then_gc_then_the_same_pull_succeeds() {
    common::require_root!();
    const NODES: [&str; 3] = ["n1", "n2", "n3"];
    let (scratch, _logs, net, registry) = testbed("cancelled_pull", &with_infra(&NODES));
    let catalog = registry.push("bench256");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image(BENCH256);
    let reference = format!("{}/{}", registry.host, image.reference);
    let big = layer_blobs(image).remove(0);
    net.host("registry").shape(200);

    thread::scope(|scope| {
        let first = scope.spawn(|| pull(&nodes[0].containerd, &reference));
        wait_for(
            "n1 to ingest the big layer",
            Duration::from_secs(60),
            || {
                !lines_with(
                    &nodes[0].dfdaemon.log_text(),
                    ": ingesting from the registry ",
                    &big.digest,
                )
                .is_empty()
            },
        );
        let mut cancelled = net
            .host("n2")
            .command("ctr")
            .arg("--address")
            .arg(&nodes[1].containerd.socket)
            .args(["--namespace", "test", "image", "pull", "--plain-http"])
            .arg(&reference)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run ctr");
        wait_for(
            "n2 to get pieces of the big layer from peers",
            Duration::from_secs(60),
            || peer_pieces(&nodes[1].dfdaemon.log_text(), &big.digest) >= 4,
        );
        cancelled.kill().expect("kill ctr");
        cancelled.wait().expect("reap ctr");
        let held = peer_pieces(&nodes[1].dfdaemon.log_text(), &big.digest);
        eprintln!("killed n2's pull with {held} pieces of the big layer");
        wait_for(
            "n2 to stop the download and leave the task",
            Duration::from_secs(10),
            || {
                !lines_with(
                    &nodes[1].dfdaemon.log_text(),
                    "abandoning the blob; leaving the task",
                    &big.digest,
                )
                .is_empty()
            },
        );
        let after = peer_pieces(&nodes[1].dfdaemon.log_text(), &big.digest);
        assert!(
            after < (big.size / damselfly::protocol::piece::DEFAULT_PIECE_SIZE) as usize,
            "n2 downloaded the whole layer after its pull was cancelled"
        );

        let third = scope.spawn(|| pull(&nodes[2].containerd, &reference));
        collect_garbage(&nodes[1].containerd);
        let active = nodes[1].containerd.ctr(&["content", "active"]);
        let active = String::from_utf8_lossy(&active.stdout);
        assert!(
            !active.contains(&big.digest),
            "the GC left the big layer's ingest on n2:\n{active}"
        );

        let again = pull(&nodes[1].containerd, &reference);
        for (name, result) in [
            ("n1", first.join().unwrap()),
            ("n2, again", again),
            ("n3", third.join().unwrap()),
        ] {
            let time = result.unwrap_or_else(|e| panic!("{name}: {e}"));
            eprintln!("{name} pulled in {:.1} s", time.as_secs_f64());
        }
    });
    for (i, node) in nodes.iter().enumerate() {
        for blob in image.amd64_blobs() {
            let path = node.dfdaemon.blob_path(&blob.digest);
            assert!(path.exists(), "{} lacks {}", NODES[i], blob.digest);
            assert_eq!(sha256_file(&path), blob.digest, "{}: a bad blob", NODES[i]);
        }
    }
    assert!(
        lines_with(
            &nodes[1].dfdaemon.log_text(),
            "No such file or directory",
            ""
        )
        .is_empty(),
        "n2 met an ingest record without data"
    );
}

/// Pieces of `digest` the log says came from peers.
fn peer_pieces(log: &str, digest: &str) -> usize {
    lines_with(log, "downloading piece", digest)
        .iter()
        .filter(|l| field(l, "source") == Some("peer"))
        .count()
}

/// Removes every lease (a killed `ctr` leaves its own behind) with a
/// synchronous GC, which aborts the ingests nothing references any more.
fn collect_garbage(containerd: &Containerd) {
    let leases = containerd.ctr_ok(&["leases", "ls", "-q"]);
    for lease in String::from_utf8_lossy(&leases).split_whitespace() {
        containerd.ctr_ok(&["leases", "rm", "--sync", lease]);
    }
}
