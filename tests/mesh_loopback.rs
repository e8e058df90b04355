//! The mesh in one process on loopback, as any user: a supernode (or two)
//! and three daemons' meshes on 127.0.0.x, blobs written through the
//! content plugin's session path. Covers peer downloads with verified
//! pieces, host expiry, stall and take-over when the ingester dies, and the
//! supernode client's rendezvous order and status handling. Asserts on mesh
//! stats, supernode metrics and typed answers.

mod common;

use std::time::Duration;

use common::loopback::{LoopNode, LoopSupernode, blob};
use common::{rendezvous_owner, wait_for};
use damselfly::mesh::supernode_client::SupernodeError;
use damselfly::mesh::transfer::FailureKind;
use damselfly::protocol::api::{JoinRequest, Role};
use damselfly::store::Digest;

const MIB: usize = 1 << 20;
const PIECE: usize = damselfly::protocol::piece::DEFAULT_PIECE_SIZE as usize;
/// Three pieces, the last one short.
const SIZE: usize = 2 * PIECE + PIECE / 4;
const LONG: Duration = Duration::from_secs(30);

#[test]
fn a_blob_ingested_on_one_node_is_downloaded_by_two_others_from_peers() {
    let supernode = LoopSupernode::start([127, 0, 0, 1].into(), 0);
    let nodes: Vec<LoopNode> = (2..=4)
        .map(|n| LoopNode::start(n, &[&supernode.addr], LONG))
        .collect();
    let data = blob(SIZE, 1);

    let digest = nodes[0].ingest(&data);
    assert_eq!(digest, Digest::of(&data));
    assert_eq!(nodes[0].stat(|s| &s.registry_bytes), SIZE as u64);

    let mut writes: Vec<_> = nodes[1..].iter().map(|n| n.open(&data)).collect();
    std::thread::scope(|scope| {
        for (node, write) in nodes[1..].iter().zip(writes.iter_mut()) {
            scope.spawn(move || {
                assert_eq!(node.settle(write), SIZE as i64, "downloaded whole");
            });
        }
    });
    for (node, write) in nodes[1..].iter().zip(writes) {
        assert_eq!(node.commit(write), digest);
        assert_eq!(
            node.stat(|s| &s.registry_bytes),
            0,
            "nothing from the registry"
        );
        assert_eq!(node.stat(|s| &s.peer_bytes), SIZE as u64);
        assert_eq!(node.stat(|s| &s.pieces_fetched), 3);
        assert_eq!(
            node.stat(|s| &s.piece_failures[FailureKind::BadDigest as usize]),
            0
        );
        let (mut file, size) = node.store.open_blob(&digest).unwrap();
        let mut copy = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut copy).unwrap();
        assert_eq!((size, copy == data), (SIZE as i64, true));
    }
    assert_eq!(
        supernode.metric("damselfly_supernode_ingesters_elected_total"),
        1
    );
    assert_eq!(supernode.metric("damselfly_supernode_hosts"), 3);
}

#[test]
fn a_silent_host_expires_after_missed_heartbeats() {
    let supernode = LoopSupernode::start([127, 0, 0, 1].into(), 0);
    let a = LoopNode::start(2, &[&supernode.addr], LONG);
    let b = LoopNode::start(3, &[&supernode.addr], LONG);
    a.ingest(&blob(MIB, 2));
    b.ingest(&blob(MIB, 3));
    wait_for("both hosts registered", LONG, || {
        supernode.metric("damselfly_supernode_hosts") == 2
    });

    drop(a);
    wait_for("the silent host to expire", LONG, || {
        supernode.metric("damselfly_supernode_hosts") == 1
    });
    assert_eq!(supernode.metric("damselfly_supernode_expirations_total"), 1);
    std::thread::sleep(common::loopback::HEARTBEAT * 5);
    assert_eq!(
        supernode.metric("damselfly_supernode_hosts"),
        1,
        "the live host stays"
    );
}

#[test]
fn when_the_ingester_dies_a_downloader_takes_over_from_its_verified_offset() {
    let supernode = LoopSupernode::start([127, 0, 0, 1].into(), 0);
    let ingester = LoopNode::start(2, &[&supernode.addr], LONG);
    let downloader = LoopNode::start(3, &[&supernode.addr], Duration::from_secs(3));
    let data = blob(SIZE, 4);

    let mut ingesting = ingester.open(&data);
    assert_eq!(ingester.settle(&mut ingesting), 0);
    ingester.write_from_registry(&mut ingesting, &data, PIECE + 1);
    let mut downloading = downloader.open(&data);
    let offset = std::thread::scope(|scope| {
        let settled = scope.spawn(|| downloader.settle(&mut downloading));
        wait_for("the first piece to reach the downloader", LONG, || {
            downloader.stat(|s| &s.pieces_fetched) >= 1
        });
        drop(ingester); // a crash: piece server and heartbeats stop
        settled.join().unwrap()
    });
    drop(ingesting);

    assert_eq!(offset, PIECE as i64, "resumes after the piece it verified");
    assert_eq!(downloader.stat(|s| &s.peer_bytes), PIECE as u64);
    let take_overs = supernode.metric("damselfly_supernode_take_overs_total");
    let stalls = downloader.stat(|s| &s.stalls);
    assert!(
        take_overs + stalls >= 1,
        "elected to take over ({take_overs}) or stalled ({stalls})"
    );
    downloader.write_from_registry(&mut downloading, &data, SIZE);
    assert_eq!(downloader.commit(downloading), Digest::of(&data));
    assert_eq!(
        downloader.stat(|s| &s.registry_bytes),
        (SIZE - PIECE) as u64
    );
}

#[test]
fn tasks_go_to_their_rendezvous_owner_and_to_the_next_when_it_is_down() {
    let supernodes: Vec<LoopSupernode> = [1, 5]
        .into_iter()
        .map(|n| LoopSupernode::start([127, 0, 0, n].into(), 0))
        .collect();
    let addrs: Vec<String> = supernodes.iter().map(|s| s.addr.clone()).collect();
    let node = LoopNode::start(2, &[&addrs[0], &addrs[1]], LONG);
    // One digest each supernode owns.
    let candidates: Vec<Digest> = (0u32..64).map(|i| Digest::of(&i.to_le_bytes())).collect();
    let digests: Vec<Digest> = addrs
        .iter()
        .map(|addr| {
            candidates
                .iter()
                .find(|d| rendezvous_owner(d.as_str(), &addrs) == addr)
                .expect("a digest this supernode owns")
                .clone()
        })
        .collect();
    for digest in &digests {
        let (role, answered) = node
            .runtime
            .block_on(node.mesh.join(digest, 10))
            .expect("an answer");
        assert_eq!(role, Role::Ingest);
        assert_eq!(answered, rendezvous_owner(digest.as_str(), &addrs));
    }

    let mut supernodes = supernodes;
    let owner = rendezvous_owner(digests[0].as_str(), &addrs).to_owned();
    let down = supernodes.iter().position(|s| s.addr == owner).unwrap();
    drop(supernodes.remove(down));
    let other = &supernodes[0];
    let (_, answered) = node
        .runtime
        .block_on(node.mesh.join(&digests[0], 10))
        .expect("the other supernode answers");
    assert_eq!(answered, other.addr);
}

#[test]
fn a_restarted_supernode_gets_a_registration_and_refusals_are_typed() {
    let supernode = LoopSupernode::start([127, 0, 0, 1].into(), 0);
    let addr = supernode.addr.clone();
    let node = LoopNode::start(2, &[&addr], LONG);
    let digest = Digest::of(b"first");
    assert!(node.runtime.block_on(node.mesh.join(&digest, 10)).is_some());

    // Restarted with empty state, it refuses the node's heartbeat or call
    // with "register again", and the node registers. (While it was down a
    // heartbeat may have marked it down: calls skip it until a heartbeat
    // gets through, so wait for that.)
    drop(supernode);
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    let supernode = LoopSupernode::start([127, 0, 0, 1].into(), port);
    wait_for("the node to register again", LONG, || {
        supernode.metric("damselfly_supernode_hosts") == 1
    });
    let (role, answered) = node
        .runtime
        .block_on(node.mesh.join(&Digest::of(b"second"), 10))
        .expect("joined after registering again");
    assert_eq!((role, answered.as_str()), (Role::Ingest, addr.as_str()));
    assert_eq!(supernode.metric("damselfly_supernode_hosts"), 1);

    let call = |digest: Digest, size: i64| {
        let request = JoinRequest {
            host_id: node.mesh.supernodes.host().id.clone(),
            digest: digest.to_string(),
            size,
        };
        node.runtime
            .block_on(node.mesh.call(&digest, "join", |mut c| {
                let request = request.clone();
                async move { c.join(request).await }
            }))
    };
    let invalid = call(Digest::of(b"third"), -1);
    assert!(
        matches!(invalid, Err(SupernodeError::Refused { what: "join", .. })),
        "a negative size is refused, not retried elsewhere"
    );
    let lost = node.runtime.block_on(node.mesh.call(
        &Digest::of(b"never joined"),
        "schedule",
        |mut c| {
            let request = damselfly::protocol::api::ScheduleRequest {
                host_id: node.mesh.supernodes.host().id.clone(),
                digest: Digest::of(b"never joined").to_string(),
                ..Default::default()
            };
            async move { c.schedule(request).await }
        },
    ));
    assert!(matches!(lost, Err(SupernodeError::UnknownTask { .. })));
}

#[test]
fn a_fake_claim_of_zero_filled_pieces_costs_a_registry_copy_per_victim_and_bans_only_the_faker() {
    let supernode = LoopSupernode::start([127, 0, 0, 1].into(), 0);
    let nodes: Vec<LoopNode> = (2..=5)
        .map(|n| LoopNode::start(n, &[&supernode.addr], LONG))
        .collect();
    let data = blob(SIZE, 7);
    let zeros = vec![0u8; SIZE];
    // The faker joins first and "ingests" zeros under the layer's digest:
    // it announces the zero pieces' digests and serves zeros (it never
    // commits, and keeps its Write open so as not to leave).
    let mut fake = nodes[0].open(&data);
    assert_eq!(nodes[0].settle(&mut fake), 0);
    nodes[0].write_from_registry(&mut fake, &zeros, SIZE);

    // Two honest nodes at once download the zeros (they match the claim);
    // the blob fails its digest (or the supernode says the other's did):
    // the bytes are discarded, the registry gives them all from 0, and they
    // commit the right blob.
    let downloaders = [&nodes[1], &nodes[3]];
    let mut writes: Vec<_> = downloaders.iter().map(|n| n.open(&data)).collect();
    std::thread::scope(|scope| {
        for (node, write) in downloaders.iter().zip(writes.iter_mut()) {
            scope.spawn(move || assert_eq!(node.settle(write), 0, "mesh bytes discarded"));
        }
    });
    for (node, mut write) in downloaders.into_iter().zip(writes) {
        assert!(
            node.stat(|s| &s.peer_bytes) > 0,
            "it got zeros from the faker"
        );
        node.write_from_registry(&mut write, &data, SIZE);
        assert_eq!(node.commit(write), Digest::of(&data));
    }
    wait_for("the faker banned", LONG, || {
        supernode.metric("damselfly_supernode_bad_parents_total") == 1
    });

    // The next node is fed by the honest claim: all from peers, nothing
    // from the registry, no bad piece; the honest node is not banned.
    let mut write = nodes[2].open(&data);
    assert_eq!(nodes[2].settle(&mut write), SIZE as i64);
    assert_eq!(nodes[2].commit(write), Digest::of(&data));
    assert_eq!(nodes[2].stat(|s| &s.registry_bytes), 0);
    assert_eq!(nodes[2].stat(|s| &s.peer_bytes), SIZE as u64);
    assert_eq!(
        supernode.metric("damselfly_supernode_bad_parents_total"),
        1,
        "only the faker was banned"
    );
    println!(
        "registry bytes: honest downloaders {} and {}, the later node {} (blob {SIZE})",
        nodes[1].stat(|s| &s.registry_bytes),
        nodes[3].stat(|s| &s.registry_bytes),
        nodes[2].stat(|s| &s.registry_bytes)
    );
    drop(fake);
}
