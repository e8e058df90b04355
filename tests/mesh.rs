//! The piece mesh with real processes (issue 3, "Must be shown by tests"):
//! every node is a network namespace of its own with its own containerd and
//! dfdaemon; the registry and the supernodes have namespaces of their own.
//! Registry egress is the registry host's `tx_bytes`; where pieces came from
//! is read from dfdaemon's per-piece log line (`downloading piece taskID=…
//! dstCid=… pieceNum=… source=…`), as an operator would grep it.
//!
//! containerd's client does not give up when its content store goes away:
//! `content.OpenWriter` retries while the store answers Unavailable, so a
//! `ctr image pull` whose dfdaemon is killed waits for it, and continues
//! once it is back. Pulls here run with `ctr --timeout` so that a hang
//! fails the test instead of blocking it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use containerd_client::services::v1::ListStatusesRequest;
use containerd_client::services::v1::content_client::ContentClient;

use common::mesh::{
    BENCH256, field, image_bytes, layer_blobs, lines_with, metric, pull, scrape, start_node,
    start_nodes, start_supernode, start_supernode_with, testbed, with_infra,
};
use common::{
    CatalogImage, Containerd, Dfdaemon, Node, Registry, rendezvous_owner, sha256_file, wait_for,
};

/// Piece size of every blob here (under 1 GiB).
const PIECE: u64 = damselfly::protocol::piece::DEFAULT_PIECE_SIZE;
/// dfdaemon's log message when a node fetches a blob from the registry
/// itself (as the elected ingester, or after a take-over or a stall).
const INGESTING: &str = ": ingesting from the registry ";
/// dfdaemon's log message when a node fetches a blob from peers.
const DOWNLOADING: &str = ": downloading from peers ";

/// ≥ 4 nodes pull a new 256 MiB image of 3 layers at the same moment: each
/// ends with every blob, verified; the registry sent about one copy; each
/// layer was ingested from the registry by one node, and every other node
/// got every piece of it from peers.
#[test]
fn four_nodes_pulling_at_once_fetch_the_image_from_the_registry_once() {
    common::require_root!();
    const NODES: [&str; 4] = ["n1", "n2", "n3", "n4"];
    let (scratch, _logs, net, registry) = testbed("four_nodes", &with_infra(&NODES));
    let catalog = registry.push("bench256");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image(BENCH256);

    let sent_before = net.host("registry").tx_bytes();
    let results = pull_together(&containerds(&nodes), &registry, image);
    let sent = net.host("registry").tx_bytes() - sent_before;

    for (i, result) in results.iter().enumerate() {
        assert_pulled(NODES[i], result, &nodes[i], image);
    }
    let (layers, small) = image_bytes(image);
    eprintln!(
        "registry sent {sent} bytes for an image of {} ({:.3} copies)",
        layers + small,
        sent as f64 / (layers + small) as f64
    );
    assert!(
        sent as f64 <= layers as f64 * 1.1 + (NODES.len() as u64 * small) as f64,
        "the registry sent {sent} bytes: more than 1.1 copies of the layers ({layers}) \
         plus each node's manifest and config ({small})"
    );
    let logs: Vec<String> = nodes.iter().map(|n| n.dfdaemon.log_text()).collect();
    assert_each_layer_ingested_once(&NODES, &logs, image, &[&supernode.addr]);
    for (i, log) in logs.iter().enumerate() {
        let own = format!("{}:65002", net.host(NODES[i]).ip());
        assert!(
            piece_lines(log)
                .iter()
                .filter(|p| p.source == "peer")
                .all(|p| p.dst != own && p.dst != "registry"),
            "{}: pieces from peers name another peer",
            NODES[i]
        );
    }
}

/// The node ingesting the 128 MiB layer from the registry is killed (-9)
/// halfway through it: another node, elected to take over, resumes the
/// layer from the registry at its own verified offset, and the other nodes
/// complete. The killed node, started again (and its pull retried),
/// completes from peers, and the registry sent at most 1.5 copies of the
/// image in all. The
/// registry's link is shaped so that "halfway" lasts long enough to catch.
#[test]
fn ingester_killed_halfway_another_node_takes_over_from_its_own_offset() {
    common::require_root!();
    const NODES: [&str; 3] = ["n1", "n2", "n3"];
    let (scratch, _logs, net, registry) = testbed("ingester_killed", &with_infra(&NODES));
    let catalog = registry.push("bench256");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let mut nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image(BENCH256);
    let big = layer_blobs(image).remove(0);
    net.host("registry").shape(400);

    let sent_before = net.host("registry").tx_bytes();
    let mut killed = None;
    let (containerds, mut dfdaemons) = split(&mut nodes);
    let results = pull_while(&containerds, &registry, image, |finished| {
        let ingester = wait_for_value("a node to ingest the big layer", 60, || {
            dfdaemons
                .iter()
                .position(|d| !lines_with(&d.log_text(), INGESTING, &big.digest).is_empty())
        });
        let offset = wait_for_value("the big layer's ingest to be half written", 60, || {
            let offset = *ingest_offsets(dfdaemons[ingester]).get(&big.digest)?;
            (offset >= big.size / 2).then_some(offset)
        });
        dfdaemons[ingester].kill9();
        let mark = dfdaemons[ingester].log_text().len();
        killed = Some((ingester, offset, mark));
        // The others complete without it; then it is started again.
        wait_for(
            "the other nodes' pulls to end",
            Duration::from_secs(120),
            || (0..NODES.len()).all(|i| i == ingester || finished(i)),
        );
        dfdaemons[ingester].restart();
    });
    // The killed node's pull failed if the kill broke containerd's write
    // stream (it waits for the store only to open a writer): pulled again,
    // as kubelet would, it completes.
    let mut results = results;
    if let Some((ingester, ..)) = killed
        && let Err(e) = &results[ingester]
    {
        eprintln!("{}'s pull failed with its dfdaemon: {e}", NODES[ingester]);
        let reference = format!("{}/{}", registry.host, image.reference);
        results[ingester] = pull(&nodes[ingester].containerd, &reference);
    }
    let sent = net.host("registry").tx_bytes() - sent_before;
    let (ingester, offset, mark) = killed.expect("the ingester was killed");
    eprintln!(
        "killed the ingester {} at {offset} of {} bytes",
        NODES[ingester], big.size
    );
    assert!(
        offset < big.size,
        "the kill came after the ingest was complete"
    );

    for (i, result) in results.iter().enumerate() {
        assert_pulled(NODES[i], result, &nodes[i], image);
    }
    let takers: Vec<usize> = (0..NODES.len())
        .filter(|&i| i != ingester)
        .filter(|&i| {
            !lines_with(
                &nodes[i].dfdaemon.log_text(),
                "elected to take over ingesting from the registry",
                &big.digest,
            )
            .is_empty()
        })
        .collect();
    assert_eq!(takers.len(), 1, "one other node takes over the big layer");
    let taker = takers[0];
    let log = nodes[taker].dfdaemon.log_text();
    let resumed: Vec<u64> = lines_with(&log, INGESTING, &big.digest)
        .iter()
        .map(|l| field(l, "offset").unwrap().parse().unwrap())
        .collect();
    eprintln!("{} took over at {resumed:?}", NODES[taker]);
    assert_eq!(resumed.len(), 1, "the taker ingests the big layer once");
    assert!(
        resumed[0] > 0 && resumed[0].is_multiple_of(PIECE),
        "the taker resumes from its own verified offset, not from 0: {}",
        resumed[0]
    );
    let first_resumed = (resumed[0] / PIECE) as u32;
    let from_registry = pieces_of(&log, &big.digest, "registry");
    assert!(
        !from_registry.is_empty() && from_registry.iter().all(|p| p.number >= first_resumed),
        "the taker fetches from the registry only what it lacked"
    );
    assert!(
        !lines_with(&supernode.log_text(), "take-over", &big.digest).is_empty(),
        "the supernode logs the take-over"
    );
    let restarted = &nodes[ingester].dfdaemon.log_text()[mark..];
    assert!(
        lines_with(restarted, INGESTING, &big.digest).is_empty(),
        "{}, restarted, fetched the big layer from the registry again",
        NODES[ingester]
    );
    let (layers, small) = image_bytes(image);
    let copies = sent as f64 / (layers + small) as f64;
    eprintln!("registry sent {sent} bytes ({copies:.3} copies)");
    assert!(
        sent as f64 <= 1.5 * layers as f64 + (NODES.len() as u64 * small) as f64,
        "the registry sent {copies:.3} copies of the image"
    );
}

/// A peer that serves pieces is killed while two nodes download from it and
/// from another holder: they switch to the other holders and complete, and
/// the registry sends no layer bytes.
#[test]
fn serving_peer_killed_downloaders_switch_to_other_holders() {
    common::require_root!();
    const NODES: [&str; 4] = ["a", "b", "c", "d"];
    let (scratch, _logs, net, registry) = testbed("serving_peer_killed", &with_infra(&NODES));
    let catalog = registry.push("bench256");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let mut nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image(BENCH256);
    for result in pull_together(&containerds(&nodes[..2]), &registry, image) {
        result.expect("the holders a and b pull");
    }
    let holder_addrs: Vec<String> = NODES[..2]
        .iter()
        .map(|name| format!("{}:65002", net.host(name).ip()))
        .collect();
    // Slow the downloaders' links so that the kill lands mid-download.
    for name in ["c", "d"] {
        net.host(name).shape(400);
    }

    let marks: Vec<usize> = nodes.iter().map(|n| n.dfdaemon.log_text().len()).collect();
    let sent_before = net.host("registry").tx_bytes();
    let mut kill_marks = Vec::new();
    let mut killed = 0;
    let (containerds, mut dfdaemons) = split(&mut nodes);
    let results = pull_while(&containerds[2..], &registry, image, |_| {
        // The scheduler picks parents by load, so which holder serves both
        // downloaders first is not fixed: the one that does is killed.
        let serving_both = || {
            (0..2).find(|&h| {
                (2..4).all(|i| {
                    piece_lines(&dfdaemons[i].log_text()[marks[i]..])
                        .iter()
                        .filter(|p| p.dst == holder_addrs[h])
                        .count()
                        >= 3
                })
            })
        };
        wait_for(
            "a holder to serve pieces to both downloaders",
            Duration::from_secs(60),
            || serving_both().is_some(),
        );
        killed = serving_both().expect("a holder served both");
        dfdaemons[killed].kill9();
        kill_marks = dfdaemons.iter().map(|d| d.log_text().len()).collect();
    });
    let sent = net.host("registry").tx_bytes() - sent_before;

    for (i, result) in (2..4).zip(results) {
        assert_pulled(NODES[i], &result, &nodes[i], image);
        let log = nodes[i].dfdaemon.log_text();
        assert!(
            !log[marks[i]..].contains(INGESTING),
            "{} fell back to the registry",
            NODES[i]
        );
        let before = piece_lines(&log[marks[i]..kill_marks[i]]);
        let after = piece_lines(&log[kill_marks[i]..]);
        let killed_addr = &holder_addrs[killed];
        eprintln!(
            "{}: {} pieces before the kill ({} from {}), {} after",
            NODES[i],
            before.len(),
            before.iter().filter(|p| &p.dst == killed_addr).count(),
            NODES[killed],
            after.len()
        );
        assert!(
            after
                .iter()
                .any(|p| p.source == "peer" && &p.dst != killed_addr),
            "{} got pieces from other holders after {} was killed",
            NODES[i],
            NODES[killed]
        );
    }
    let (_, small) = image_bytes(image);
    eprintln!(
        "registry sent {sent} bytes while {} was killed",
        NODES[killed]
    );
    assert!(
        sent < 2 * small + PIECE,
        "the registry sent {sent} bytes: downloaders went to the registry"
    );
}

/// A peer serving corrupted pieces (DAMSELFLY_FAULT_CORRUPT_PIECES) holds
/// the image; two nodes then pull it: no piece from it is accepted (every
/// one they check is rejected), the supernode drops it from each task, and
/// both nodes end with the right content (from the registry once, through
/// a take-over, and from each other).
#[test]
fn corrupt_peer_is_rejected_and_dropped_and_content_stays_correct() {
    common::require_root!();
    const NODES: [&str; 3] = ["bad", "x", "y"];
    let (scratch, _logs, net, registry) = testbed("corrupt_peer", &with_infra(&NODES));
    let catalog = registry.push("bench256");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let bad = start_node(
        &scratch,
        net.host("bad"),
        &registry,
        &[&supernode.addr],
        &[("DAMSELFLY_FAULT_CORRUPT_PIECES", "1")],
    );
    let good = start_nodes(&scratch, &net, &registry, &NODES[1..], &[&supernode]);
    let image = catalog.image(BENCH256);
    pull(
        &bad.containerd,
        &format!("{}/{}", registry.host, image.reference),
    )
    .expect("bad pulls alone");
    let bad_addr = format!("{}:65002", net.host("bad").ip());

    for (i, result) in pull_together(&containerds(&good), &registry, image)
        .into_iter()
        .enumerate()
    {
        assert_pulled(NODES[i + 1], &result, &good[i], image);
    }
    assert_holds_image("bad", &bad.dfdaemon, image);

    let logs: Vec<String> = good.iter().map(|n| n.dfdaemon.log_text()).collect();
    let supernode_log = supernode.log_text();
    let bad_log = bad.dfdaemon.log_text();
    for layer in layer_blobs(image) {
        let rejected: usize = logs
            .iter()
            .map(|log| {
                lines_with(log, "rejected corrupt piece", &layer.digest)
                    .iter()
                    .filter(|l| field(l, "parent") == Some(bad_addr.as_str()))
                    .count()
            })
            .sum();
        let served = lines_with(&bad_log, "uploaded piece", &layer.digest).len();
        let count = piece_count(layer.size);
        eprintln!(
            "{}: bad served {served} of {count} pieces, {rejected} rejected, the rest abandoned \
             at the take-over",
            layer.digest
        );
        assert!(
            rejected > 0,
            "pieces of {} from bad were rejected",
            layer.digest
        );
        for (name, log) in NODES[1..].iter().zip(&logs) {
            assert!(
                pieces_of(log, &layer.digest, "peer")
                    .iter()
                    .all(|p| p.dst != bad_addr),
                "{name} accepted a piece of {} from bad",
                layer.digest
            );
        }
        assert!(
            lines_with(
                &supernode_log,
                "bad parent dropped from the task",
                &layer.digest
            )
            .iter()
            .any(|l| field(l, "parent") == Some(bad_addr.as_str())),
            "the supernode drops bad from the task of {}",
            layer.digest
        );
        if count > 16 {
            assert!(
                (served as u32) < count / 2,
                "bad was asked for {served} of the {count} pieces of {}: it was not dropped",
                layer.digest
            );
        }
    }
}

/// With the supernode down (nothing listening at its address) or its
/// machine gone (an address nobody has), dfdaemon pulls straight from the
/// registry, at most a few seconds slower than a dfdaemon without a mesh.
#[test]
fn supernode_down_before_a_pull_pulls_directly() {
    common::require_root!();
    const NODES: [&str; 3] = ["plain", "down", "gone"];
    let (scratch, _logs, net, registry) = testbed("supernode_down", &with_infra(&NODES));
    let catalog = registry.push("small");
    let image = catalog.image("damselfly/multi:v1");
    let reference = format!("{}/{}", registry.host, image.reference);
    let plain = Node::start_in(&scratch, net.host("plain"), &registry, Vec::new());
    // Nothing listens on the supernode host; nobody has address .200.
    let down_addr = format!("{}:8002", net.host("supernode").ip());
    let gone_addr = net.subnet().replace(".0/24", ".200:8002");
    let down = start_node(&scratch, net.host("down"), &registry, &[&down_addr], &[]);
    let gone = start_node(&scratch, net.host("gone"), &registry, &[&gone_addr], &[]);

    let plain_time = pull(&plain.containerd, &reference).expect("plain pull");
    eprintln!("without a mesh: {:.1} s", plain_time.as_secs_f64());
    for (name, node) in [("down", &down), ("gone", &gone)] {
        let time = pull(&node.containerd, &reference).unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("supernode {name}: {:.1} s", time.as_secs_f64());
        assert_holds_image(name, &node.dfdaemon, image);
        assert!(
            time < plain_time + Duration::from_secs(6),
            "with the supernode {name}, the pull took {:.1} s, {:.1} s without a mesh",
            time.as_secs_f64(),
            plain_time.as_secs_f64()
        );
        let log = node.dfdaemon.log_text();
        for layer in layer_blobs(image) {
            assert!(
                !lines_with(&log, "pulling from the registry", &layer.digest).is_empty(),
                "{name} pulls {} directly",
                layer.digest
            );
        }
    }
}

/// The supernode is killed (-9) while three nodes pull and restarted a
/// second later: every pull completes without leaving the mesh (the daemons
/// register again with what they hold and whom they ingest for, downloaders
/// join again, nobody stalls or takes over, the registry sends one copy),
/// and the next image goes through the mesh too (each layer ingested once,
/// the other nodes served by peers).
#[test]
fn supernode_restarted_during_pulls_the_mesh_works_again() {
    common::require_root!();
    const NODES: [&str; 3] = ["n1", "n2", "n3"];
    let (scratch, _logs, net, registry) = testbed("supernode_restarted", &with_infra(&NODES));
    let catalog = registry.push("bench256");
    let second = registry.push("small");
    let mut supernode = start_supernode(&scratch, &net, "supernode");
    let nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image(BENCH256);

    let sent_before = net.host("registry").tx_bytes();
    let results = pull_while(&containerds(&nodes), &registry, image, |_| {
        wait_for("a piece from a peer", Duration::from_secs(60), || {
            nodes.iter().any(|n| {
                piece_lines(&n.dfdaemon.log_text())
                    .iter()
                    .any(|p| p.source == "peer")
            })
        });
        supernode.kill9();
        thread::sleep(Duration::from_secs(1));
        supernode.restart();
    });
    for (i, result) in results.iter().enumerate() {
        assert_pulled(NODES[i], result, &nodes[i], image);
        let log = nodes[i].dfdaemon.log_text();
        for gave_up in ["mesh download stalled", "elected to take over"] {
            assert!(!log.contains(gave_up), "{}: {gave_up}", NODES[i]);
        }
    }
    let sent = net.host("registry").tx_bytes() - sent_before;
    let (layers, small) = image_bytes(image);
    eprintln!(
        "registry sent {sent} bytes ({:.3} copies)",
        sent as f64 / (layers + small) as f64
    );
    assert!(
        sent as f64 <= layers as f64 * 1.1 + (NODES.len() as u64 * small) as f64,
        "the registry sent {sent} bytes for {layers} bytes of layers"
    );
    for (i, node) in nodes.iter().enumerate() {
        wait_for(
            &format!("{} to register again", NODES[i]),
            Duration::from_secs(10),
            || {
                node.dfdaemon
                    .log_text()
                    .matches("registered with supernode")
                    .count()
                    >= 2
            },
        );
    }

    let next = second.image("damselfly/multi:v1");
    let marks: Vec<usize> = nodes.iter().map(|n| n.dfdaemon.log_text().len()).collect();
    for (i, result) in pull_together(&containerds(&nodes), &registry, next)
        .iter()
        .enumerate()
    {
        result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", NODES[i]));
        assert_holds_image(NODES[i], &nodes[i].dfdaemon, next);
    }
    let logs = logs_since(&nodes, &marks);
    assert_each_layer_ingested_once(&NODES, &logs, next, &[&supernode.addr]);
}

/// Two supernodes share the tasks by rendezvous hashing of the digest. With
/// both up, each layer goes to its owner; after the owner of some of the
/// next image's layers is killed, those tasks go to the other supernode and
/// the image still goes through the mesh.
#[test]
fn two_supernodes_one_killed_its_tasks_move_to_the_other() {
    common::require_root!();
    const NODES: [&str; 3] = ["n1", "n2", "n3"];
    let (scratch, _logs, net, registry) = testbed(
        "two_supernodes",
        &["registry", "sn1", "sn2", "n1", "n2", "n3"],
    );
    let catalog = registry.push("small");
    let mut supernodes = [
        start_supernode(&scratch, &net, "sn1"),
        start_supernode(&scratch, &net, "sn2"),
    ];
    let nodes = start_nodes(
        &scratch,
        &net,
        &registry,
        &NODES,
        &[&supernodes[0], &supernodes[1]],
    );
    let addrs = [supernodes[0].addr.clone(), supernodes[1].addr.clone()];

    // Both up: every layer of the first image goes to its owner.
    let first = catalog.image("damselfly/shared:v1");
    for (i, result) in pull_together(&containerds(&nodes), &registry, first)
        .iter()
        .enumerate()
    {
        result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", NODES[i]));
    }
    let logs: Vec<String> = nodes.iter().map(|n| n.dfdaemon.log_text()).collect();
    for layer in layer_blobs(first) {
        let owner = rendezvous_owner(&layer.digest, &addrs);
        assert_each_layer_ingested_once(&NODES, &logs, &only(first, &[&layer.digest]), &[owner]);
    }

    // Kill the owner of the next image's largest new layer.
    let next = catalog.image("damselfly/multi:v1");
    let seen: BTreeSet<&str> = first.blobs.iter().map(|b| b.digest.as_str()).collect();
    let new: Vec<&str> = next
        .blobs
        .iter()
        .map(|b| b.digest.as_str())
        .filter(|d| !seen.contains(d))
        .collect();
    let new_layers = layer_blobs(&only(next, &new));
    let victim = rendezvous_owner(&new_layers[0].digest, &addrs).to_owned();
    let survivor = addrs.iter().find(|a| **a != victim).unwrap().clone();
    let moved = new_layers
        .iter()
        .filter(|l| rendezvous_owner(&l.digest, &addrs) == victim)
        .count();
    eprintln!(
        "killing {victim}, owner of {moved} of {} new layers",
        new_layers.len()
    );
    supernodes
        .iter_mut()
        .find(|s| s.addr == victim)
        .unwrap()
        .kill9();

    let marks: Vec<usize> = nodes.iter().map(|n| n.dfdaemon.log_text().len()).collect();
    for (i, result) in pull_together(&containerds(&nodes), &registry, next)
        .iter()
        .enumerate()
    {
        result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", NODES[i]));
        assert_holds_image(NODES[i], &nodes[i].dfdaemon, next);
    }
    let logs = logs_since(&nodes, &marks);
    assert_each_layer_ingested_once(&NODES, &logs, &only(next, &new), &[&survivor]);
}

/// A node downloading the image from the only holder, s, has its dfdaemon
/// killed (-9) halfway through the big layer; s dies too; the dfdaemon is
/// started again. Its pull (which waited) completes, resuming from the
/// verified offset the store kept: none of the pieces it held is fetched
/// again. A third node pulling meanwhile gets those pieces from it.
#[test]
fn daemon_restarted_mid_pull_resumes_and_serves_what_it_holds() {
    common::require_root!();
    const NODES: [&str; 3] = ["s", "d", "f"];
    let (scratch, _logs, net, registry) = testbed("daemon_restarted", &with_infra(&NODES));
    let catalog = registry.push("bench256");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let mut nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image(BENCH256);
    let reference = format!("{}/{}", registry.host, image.reference);
    let big = layer_blobs(image).remove(0);
    pull(&nodes[0].containerd, &reference).expect("s pulls alone");
    let s_id = format!("{}:65002", net.host("s").ip());
    let d_addr = format!("{}:65002", net.host("d").ip());

    // d downloads from s over a slow link.
    net.host("d").shape(400);
    let mut held_before = 0;
    let mut mark = 0;
    let mut f_result = None;
    let mut d_again = None;
    let (containerds, mut dfdaemons) = split(&mut nodes);
    let d_first = pull_while(&containerds[1..2], &registry, image, |finished| {
        let d = &mut dfdaemons[1];
        wait_for(
            "d to hold half the big layer",
            Duration::from_secs(60),
            || {
                let pieces = pieces_of(&d.log_text(), &big.digest, "peer");
                pieces.len() as u32 >= piece_count(big.size) / 2
                    && contiguous(pieces.iter().rev().skip(1).map(|p| p.number)) >= 4
            },
        );
        d.kill9();
        // The downloader makes a verified piece part of the ingest's prefix
        // (and stores that) before it handles the next one: every piece
        // logged but the last is in the prefix the store kept.
        let pieces = pieces_of(&d.log_text(), &big.digest, "peer");
        held_before = contiguous(pieces.iter().rev().skip(1).map(|p| p.number));
        // s dies too: what d holds of the big layer is its only copy.
        dfdaemons[0].kill9();
        wait_for("the supernode to drop s", Duration::from_secs(10), || {
            supernode
                .log_text()
                .lines()
                .any(|l| l.contains("host expired") && field(l, "host") == Some(s_id.as_str()))
        });
        let d = &mut dfdaemons[1];
        mark = d.log_text().len();
        d.restart();
        net.host("d").unshape();
        let resumed = || {
            let log = d.log_text();
            !lines_with(&log[mark..], INGESTING, &big.digest).is_empty()
                || !lines_with(&log[mark..], DOWNLOADING, &big.digest).is_empty()
        };
        wait_for(
            "d to resume the big layer, or its pull to end",
            Duration::from_secs(60),
            || finished(0) || resumed(),
        );
        thread::scope(|scope| {
            // containerd's client waits for its store only while it opens a
            // writer: if the kill broke a write stream, d's pull failed.
            // Pulled again, as kubelet would, it resumes.
            let again = finished(0).then(|| scope.spawn(|| pull(containerds[1], &reference)));
            // Once d is back at the big layer, f pulls.
            wait_for(
                "d to resume the big layer",
                Duration::from_secs(60),
                resumed,
            );
            f_result = Some(pull(containerds[2], &reference));
            d_again = again.map(|pull| pull.join().unwrap());
        });
    });
    let d_result = match d_again {
        Some(again) => {
            if let Err(e) = &d_first[0] {
                eprintln!("d's first pull failed with its dfdaemon: {e}");
            }
            again
        }
        None => d_first.into_iter().next().unwrap(),
    };
    eprintln!("d had stored {held_before} pieces of the big layer from its start at the kill");
    for (i, result) in [(1, &d_result), (2, f_result.as_ref().unwrap())] {
        assert_pulled(NODES[i], result, &nodes[i], image);
    }
    let kept = (u64::from(held_before) * PIECE).min(big.size);
    let d_log = nodes[1].dfdaemon.log_text();
    // Where d's session for the big layer started after the restart (if the
    // kill came after the last piece was stored, there was none: complete).
    let resumed = lines_with(&d_log[mark..], " offset=", &big.digest)
        .first()
        .map_or(big.size, |l| field(l, "offset").unwrap().parse().unwrap());
    eprintln!("d resumed the big layer at {resumed}");
    assert!(
        resumed >= kept && resumed > 0,
        "d resumes from its verified offset ({kept} or more), not from {resumed}"
    );
    let first_missing = resumed.div_ceil(PIECE) as u32;
    let refetched: Vec<u32> = piece_lines(&d_log[mark..])
        .into_iter()
        .filter(|p| p.task == big.digest && p.number < first_missing)
        .map(|p| p.number)
        .collect();
    assert!(
        refetched.is_empty(),
        "d fetched pieces it held before the restart again: {refetched:?}"
    );
    let from_d: BTreeSet<u32> = pieces_of(&nodes[2].dfdaemon.log_text(), &big.digest, "peer")
        .into_iter()
        .filter(|p| p.dst == d_addr)
        .map(|p| p.number)
        .collect();
    assert!(
        (0..first_missing).all(|n| from_d.contains(&n)),
        "f got the pieces d held before its restart from d: {from_d:?}"
    );
}

/// A daemon restarted after a pull still serves the blobs it committed: once
/// it is back (after the supernode dropped it), the next node gets every
/// layer from it, none from the registry.
#[test]
fn restarted_daemon_serves_the_blobs_it_committed() {
    common::require_root!();
    const NODES: [&str; 2] = ["a", "b"];
    let (scratch, _logs, net, registry) =
        testbed("restarted_serves_committed", &with_infra(&NODES));
    let catalog = registry.push("small");
    let supernode = start_supernode(&scratch, &net, "supernode");
    let mut nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image("damselfly/multi:v1");
    let reference = format!("{}/{}", registry.host, image.reference);
    pull(&nodes[0].containerd, &reference).expect("a pulls");
    let a_addr = format!("{}:65002", net.host("a").ip());
    let a = &mut nodes[0].dfdaemon;
    a.kill9();
    wait_for("the supernode to drop a", Duration::from_secs(10), || {
        supernode
            .log_text()
            .lines()
            .any(|l| l.contains("host expired") && field(l, "host") == Some(a_addr.as_str()))
    });
    a.restart();
    wait_for("a to register again", Duration::from_secs(10), || {
        a.log_text().matches("registered with supernode").count() >= 2
    });

    pull(&nodes[1].containerd, &reference).expect("b pulls");
    assert_holds_image("b", &nodes[1].dfdaemon, image);
    let log = nodes[1].dfdaemon.log_text();
    for layer in layer_blobs(image) {
        assert!(
            lines_with(&log, INGESTING, &layer.digest).is_empty(),
            "b fetched {} from the registry: a did not offer it after its restart",
            layer.digest
        );
        assert!(
            pieces_of(&log, &layer.digest, "peer")
                .iter()
                .all(|p| p.dst == a_addr),
            "b got {} from a",
            layer.digest
        );
    }
}

/// The supernode's repo copies each new layer from the peers as it is
/// pulled; once the only node that pulled the image is gone, the next node
/// gets every layer from the repo (logged `source="supernode"`), and the
/// registry sends no layer bytes.
#[test]
fn supernode_repo_serves_blobs_after_the_nodes_that_had_them_are_gone() {
    common::require_root!();
    const NODES: [&str; 2] = ["a", "b"];
    let (scratch, _logs, net, registry) = testbed("supernode_repo", &with_infra(&NODES));
    let catalog = registry.push("small");
    let supernode = start_supernode_with(&scratch, &net, "supernode", &["--repo-max-mib", "64"]);
    let mut nodes = start_nodes(&scratch, &net, &registry, &NODES, &[&supernode]);
    let image = catalog.image("damselfly/multi:v1");
    let reference = format!("{}/{}", registry.host, image.reference);
    let layers = layer_blobs(image);

    pull(&nodes[0].containerd, &reference).expect("a pulls");
    wait_for(
        "the repo to store every layer",
        Duration::from_secs(30),
        || {
            let log = supernode.log_text();
            layers
                .iter()
                .all(|l| !lines_with(&log, "repo: blob stored", &l.digest).is_empty())
        },
    );
    let a_id = format!("{}:65002", net.host("a").ip());
    nodes[0].dfdaemon.kill9();
    wait_for("the supernode to drop a", Duration::from_secs(10), || {
        supernode
            .log_text()
            .lines()
            .any(|l| l.contains("host expired") && field(l, "host") == Some(a_id.as_str()))
    });

    let sent_before = net.host("registry").tx_bytes();
    pull(&nodes[1].containerd, &reference).expect("b pulls");
    let sent = net.host("registry").tx_bytes() - sent_before;
    assert_holds_image("b", &nodes[1].dfdaemon, image);
    let repo = format!("{}:8001", net.host("supernode").ip());
    let log = nodes[1].dfdaemon.log_text();
    for layer in &layers {
        assert!(
            lines_with(&log, INGESTING, &layer.digest).is_empty(),
            "b fetched {} from the registry",
            layer.digest
        );
        let pieces = pieces_of(&log, &layer.digest, "supernode");
        assert_eq!(
            pieces.len() as u32,
            piece_count(layer.size),
            "b got every piece of {} from the repo",
            layer.digest
        );
        assert!(pieces.iter().all(|p| p.dst == repo));
    }
    let (layer_bytes, small) = image_bytes(image);
    eprintln!("registry sent {sent} bytes; the layers are {layer_bytes}");
    assert!(
        sent < small + (layer_bytes / 10),
        "the registry sent {sent} bytes: layers came from it"
    );
    // The metrics tell the same story on both sides.
    let sn = net.host("supernode");
    let repo_metrics = scrape(sn, &format!("{}:8003", sn.ip()));
    let b_metrics = scrape(net.host("b"), "127.0.0.1:65003");
    let served = metric(&repo_metrics, "supernode_repo_served_bytes_total");
    let received = metric(
        &b_metrics,
        r#"dfdaemon_received_bytes_total{source="supernode"}"#,
    );
    eprintln!("repo served {served} bytes; b received {received} from it");
    assert_eq!(received, layer_bytes, "b's bytes from the supernode");
    assert!(served >= layer_bytes, "the repo's served bytes");
}

// ---------------------------------------------------------------------------
// Helpers.

fn containerds(nodes: &[Node]) -> Vec<&Containerd> {
    nodes.iter().map(|n| &n.containerd).collect()
}

/// The nodes' containerds (for pulls on other threads) and dfdaemons (to
/// kill and restart meanwhile).
fn split(nodes: &mut [Node]) -> (Vec<&Containerd>, Vec<&mut Dfdaemon>) {
    nodes
        .iter_mut()
        .map(|n| (&n.containerd, &mut n.dfdaemon))
        .unzip()
}

/// `ctr image pull` of `image` on every node, all started at the same moment;
/// each pull's time, or its error.
fn pull_together(
    nodes: &[&Containerd],
    registry: &Registry,
    image: &CatalogImage,
) -> Vec<Result<Duration, String>> {
    pull_while(nodes, registry, image, |_| {})
}

/// Pulls `image` on every node at the same moment while `during` runs on
/// this thread (it is told whether pull `i` has ended); each pull's time, or
/// its error.
fn pull_while(
    nodes: &[&Containerd],
    registry: &Registry,
    image: &CatalogImage,
    during: impl FnOnce(&dyn Fn(usize) -> bool),
) -> Vec<Result<Duration, String>> {
    let reference = format!("{}/{}", registry.host, image.reference);
    let barrier = Barrier::new(nodes.len() + 1);
    thread::scope(|scope| {
        let pulls: Vec<_> = nodes
            .iter()
            .map(|node| {
                let (barrier, reference) = (&barrier, &reference);
                scope.spawn(move || {
                    barrier.wait();
                    pull(node, reference)
                })
            })
            .collect();
        barrier.wait();
        during(&|i| pulls[i].is_finished());
        pulls.into_iter().map(|p| p.join().unwrap()).collect()
    })
}

/// Each node's log from its mark on.
fn logs_since(nodes: &[Node], marks: &[usize]) -> Vec<String> {
    nodes
        .iter()
        .zip(marks)
        .map(|(n, &mark)| n.dfdaemon.log_text()[mark..].to_owned())
        .collect()
}

/// Polls `value` every 10 ms until it is `Some`, for at most `seconds`.
fn wait_for_value<T>(what: &str, seconds: u64, mut value: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(v) = value() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Every blob of the image's linux/amd64 pull is committed in the dfdaemon's
/// store and hashes to its digest.
/// `name`'s pull succeeded (its time is printed) and its dfdaemon holds
/// every blob of `image`.
fn assert_pulled(name: &str, result: &Result<Duration, String>, node: &Node, image: &CatalogImage) {
    let time = result.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name} pulled in {:.1} s", time.as_secs_f64());
    assert_holds_image(name, &node.dfdaemon, image);
}

fn assert_holds_image(name: &str, dfdaemon: &Dfdaemon, image: &CatalogImage) {
    for blob in image.amd64_blobs() {
        let path = dfdaemon.blob_path(&blob.digest);
        assert!(
            path.exists(),
            "{name} lacks {} ({}); its log tail:\n{}",
            blob.digest,
            blob.kind,
            common::tail(dfdaemon.log_path(), 40)
        );
        assert_eq!(
            sha256_file(&path),
            blob.digest,
            "{name}: a blob does not hash to its digest"
        );
    }
}

/// The image with only the blobs in `digests`.
fn only(image: &CatalogImage, digests: &[&str]) -> CatalogImage {
    CatalogImage {
        reference: image.reference.clone(),
        digest: image.digest.clone(),
        blobs: image
            .blobs
            .iter()
            .filter(|b| digests.contains(&b.digest.as_str()))
            .cloned()
            .collect(),
    }
}

fn piece_count(size: u64) -> u32 {
    size.div_ceil(PIECE) as u32
}

/// How many pieces from 0 on are among `numbers`.
fn contiguous(numbers: impl Iterator<Item = u32>) -> u32 {
    let held: BTreeSet<u32> = numbers.collect();
    (0..).find(|n| !held.contains(n)).unwrap()
}

/// Each layer of `image` was ingested from the registry by exactly one node,
/// every log line about it names one of `supernodes`, and every other node
/// got every piece of it from peers. `logs` are the nodes' logs of the pull.
fn assert_each_layer_ingested_once(
    names: &[&str],
    logs: &[String],
    image: &CatalogImage,
    supernodes: &[&str],
) {
    for layer in layer_blobs(image) {
        let ingesters: Vec<usize> = (0..logs.len())
            .filter(|&i| !lines_with(&logs[i], INGESTING, &layer.digest).is_empty())
            .collect();
        assert_eq!(
            ingesters.len(),
            1,
            "exactly one node ingests {} from the registry (ingesters: {:?})",
            layer.digest,
            ingesters.iter().map(|&i| names[i]).collect::<Vec<_>>()
        );
        for (i, log) in logs.iter().enumerate() {
            for line in log.lines().filter(|l| l.contains(&layer.digest)) {
                let Some(used) = field(line, "supernode").or_else(|| field(line, "superNode"))
                else {
                    continue;
                };
                assert!(
                    supernodes.contains(&used),
                    "{}: {} went through supernode {used}, not {supernodes:?}",
                    names[i],
                    layer.digest
                );
            }
            let pieces = pieces_of(log, &layer.digest, "");
            let numbers: BTreeSet<u32> = pieces.iter().map(|p| p.number).collect();
            let source = if i == ingesters[0] {
                "registry"
            } else {
                "peer"
            };
            assert_eq!(
                numbers,
                (0..piece_count(layer.size)).collect(),
                "{} logs every piece of {}",
                names[i],
                layer.digest
            );
            assert!(
                pieces.iter().all(|p| p.source == source),
                "{} got every piece of {} from the {source}",
                names[i],
                layer.digest
            );
        }
    }
}

/// One `downloading piece` log line.
#[derive(Debug, Clone)]
struct PieceLine {
    task: String,
    dst: String,
    number: u32,
    source: String,
}

fn piece_lines(log: &str) -> Vec<PieceLine> {
    log.lines()
        .filter(|l| l.contains("downloading piece"))
        .map(|l| {
            let get = |key| {
                field(l, key)
                    .unwrap_or_else(|| panic!("no {key} in {l:?}"))
                    .to_owned()
            };
            PieceLine {
                task: get("taskID"),
                dst: get("dstCid"),
                number: get("pieceNum").parse().expect("pieceNum"),
                source: get("source"),
            }
        })
        .collect()
}

/// The pieces of `digest` the log says came from `source` (`peer`,
/// `registry`, or "" for any).
fn pieces_of(log: &str, digest: &str, source: &str) -> Vec<PieceLine> {
    piece_lines(log)
        .into_iter()
        .filter(|p| p.task == digest && (source.is_empty() || p.source == source))
        .collect()
}

/// Offsets of the ingests in progress on a dfdaemon, by the digest in their
/// ref (asked of the daemon's content socket directly).
fn ingest_offsets(daemon: &Dfdaemon) -> BTreeMap<String, u64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let Ok(channel) = containerd_client::connect(&daemon.socket).await else {
            return BTreeMap::new();
        };
        let Ok(response) = ContentClient::new(channel)
            .list_statuses(ListStatusesRequest { filters: vec![] })
            .await
        else {
            return BTreeMap::new();
        };
        response
            .into_inner()
            .statuses
            .into_iter()
            .filter_map(|s| {
                let digest = s.r#ref.rsplit_once("-sha256:")?.1;
                Some((format!("sha256:{digest}"), s.offset as u64))
            })
            .collect()
    })
}
