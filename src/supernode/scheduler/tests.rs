//! Unit tests of the scheduler: a simulated clock and a handful of hosts.

use std::collections::HashMap;

use super::*;
use crate::protocol::api::{self, HeldBlob, PieceResult};

/// Pieces of the test blob.
const PIECES: u32 = 64;
const PIECE: i64 = crate::protocol::piece::DEFAULT_PIECE_SIZE as i64;
const SIZE: i64 = PIECES as i64 * PIECE;

fn blob() -> Digest {
    Digest::of(b"the test blob")
}

fn piece_digest(number: u32) -> String {
    Digest::of(&number.to_le_bytes()).to_string()
}

fn held(pieces: impl IntoIterator<Item = u32>, complete: bool) -> HeldBlob {
    HeldBlob {
        digest: blob().to_string(),
        size: SIZE,
        piece_size: PIECE as u64,
        pieces: pieces
            .into_iter()
            .map(|number| api::Piece {
                number,
                digest: piece_digest(number),
            })
            .collect(),
        complete,
        ingesting: false,
    }
}

fn invalid<T: std::fmt::Debug>(result: Result<T, SchedulerError>) -> bool {
    matches!(result, Err(SchedulerError::InvalidArgument(_)))
}

/// A scheduler and a clock.
struct Mesh {
    scheduler: Scheduler,
    now: Instant,
}

impl Mesh {
    fn new() -> Self {
        Self::with_cap(SchedulerConfig::default().upload_cap)
    }

    fn with_cap(upload_cap: u32) -> Self {
        Self::with_config(SchedulerConfig {
            upload_cap,
            ..Default::default()
        })
    }

    fn with_config(config: SchedulerConfig) -> Self {
        Self {
            scheduler: Scheduler::new(config),
            now: Instant::now(),
        }
    }

    fn register(&mut self, id: &str, blobs: Vec<HeldBlob>) {
        self.register_at(id, "10.0.0.1", blobs);
    }

    fn register_at(&mut self, id: &str, ip: &str, blobs: Vec<HeldBlob>) {
        let request = RegisterRequest {
            host: Some(api::Host {
                id: id.into(),
                ip: ip.into(),
                upload_port: 65002,
                supernode: false,
            }),
            blobs,
        };
        let response = self.scheduler.register(&request, self.now).unwrap();
        assert_eq!(response.heartbeat_ms, 1000);
    }

    /// Registers `id` as a supernode's repo, holding nothing.
    fn register_repo(&mut self, id: &str) {
        let request = RegisterRequest {
            host: Some(api::Host {
                id: id.into(),
                ip: "10.0.0.9".into(),
                upload_port: 8001,
                supernode: true,
            }),
            blobs: vec![],
        };
        self.scheduler.register(&request, self.now).unwrap();
    }

    /// Registers hosts that hold the whole blob.
    fn seeds(&mut self, ids: &[&str]) {
        for id in ids {
            self.register(id, vec![held(0..PIECES, true)]);
        }
    }

    /// Registers hosts that hold nothing and has each join the blob.
    fn joiners(&mut self, ids: &[&str]) {
        for id in ids {
            self.register(id, vec![]);
            self.join(id);
        }
    }

    fn join(&mut self, id: &str) -> Role {
        let request = JoinRequest {
            host_id: id.into(),
            digest: blob().to_string(),
            size: SIZE,
        };
        let response = self.scheduler.join(&request, self.now).unwrap();
        assert_eq!(response.piece_size, PIECE as u64);
        response.role()
    }

    fn announce(&mut self, id: &str, blob: HeldBlob) -> Result<(), SchedulerError> {
        let request = AnnounceRequest {
            host_id: id.into(),
            blob: Some(blob),
        };
        self.scheduler.announce(&request, self.now).map(|_| ())
    }

    fn schedule(&mut self, id: &str, wanted: impl IntoIterator<Item = u32>) -> ScheduleResponse {
        self.schedule_at(id, wanted, 0)
    }

    fn schedule_at(
        &mut self,
        id: &str,
        wanted: impl IntoIterator<Item = u32>,
        contiguous: i64,
    ) -> ScheduleResponse {
        let request = ScheduleRequest {
            host_id: id.into(),
            digest: blob().to_string(),
            wanted: wanted.into_iter().collect(),
            contiguous,
            max_assignments: 0,
            wait_ms: 0,
        };
        let response = self.scheduler.schedule(&request, self.now).unwrap();
        assert_eq!(response.total_pieces, PIECES);
        response
    }

    fn report(&mut self, id: &str, results: &[(u32, &str, Outcome)]) {
        let request = ReportRequest {
            host_id: id.into(),
            digest: blob().to_string(),
            results: results
                .iter()
                .map(|&(number, parent, outcome)| PieceResult {
                    number,
                    parent_id: parent.into(),
                    outcome: outcome.into(),
                })
                .collect(),
        };
        self.scheduler.report(&request, self.now).unwrap();
    }

    /// Reports every assignment of `response` with `outcome`.
    fn report_all(&mut self, id: &str, response: &ScheduleResponse, outcome: Outcome) {
        let results: Vec<_> = response
            .assignments
            .iter()
            .map(|a| (a.number, parent_of(a), outcome))
            .collect();
        self.report(id, &results);
    }

    fn leave(&mut self, id: &str) {
        let request = LeaveRequest {
            host_id: id.into(),
            digest: blob().to_string(),
        };
        self.scheduler.leave(&request, self.now).unwrap();
    }

    /// Heartbeats; true if the supernode asks to register again.
    fn heartbeat(&mut self, id: &str, uploads_in_use: u32) -> bool {
        let request = HeartbeatRequest {
            host_id: id.into(),
            uploads_in_use,
        };
        self.scheduler
            .heartbeat(&request, self.now)
            .unwrap()
            .reregister
    }

    /// Lets `seconds` pass while `alive` heartbeat every second.
    fn pass(&mut self, seconds: u64, alive: &[&str]) {
        for _ in 0..seconds {
            self.now += Duration::from_secs(1);
            for id in alive {
                assert!(!self.heartbeat(id, 0));
            }
            self.scheduler.expire(self.now);
        }
    }

    fn events(&mut self) -> Vec<Event> {
        self.scheduler.take_events()
    }
}

fn parent_of(assignment: &Assignment) -> &str {
    &assignment.parent.as_ref().unwrap().host_id
}

fn numbers(response: &ScheduleResponse) -> Vec<u32> {
    response.assignments.iter().map(|a| a.number).collect()
}

fn parents(response: &ScheduleResponse) -> Vec<&str> {
    response.assignments.iter().map(parent_of).collect()
}

fn per_parent(response: &ScheduleResponse) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for parent in parents(response) {
        *counts.entry(parent).or_default() += 1;
    }
    counts
}

#[test]
fn first_joiner_ingests_later_ones_download_and_a_restarted_ingester_ingests_again() {
    let mut mesh = Mesh::new();
    mesh.register("a", vec![]);
    mesh.register("b", vec![]);
    assert_eq!(mesh.join("a"), Role::Ingest);
    assert_eq!(mesh.join("b"), Role::Download);
    // The ingester restarted and asks again: it still ingests.
    mesh.register("a", vec![]);
    assert_eq!(mesh.join("a"), Role::Ingest);
    assert_eq!(
        mesh.events(),
        [Event::IngesterElected {
            digest: blob(),
            size: SIZE as u64,
            host: "a".into()
        }]
    );
}

#[test]
fn joiners_download_when_pieces_exist_without_an_ingester() {
    let mut mesh = Mesh::new();
    mesh.register("holder", vec![held(0..3, false)]);
    mesh.register("b", vec![]);
    assert_eq!(mesh.join("b"), Role::Download);
    // Its own pieces do not count: a host alone with its pieces ingests.
    assert_eq!(mesh.join("holder"), Role::Ingest);
}

#[test]
fn requests_are_validated() {
    let mut mesh = Mesh::new();
    mesh.register("a", vec![]);
    mesh.join("a");
    let now = mesh.now;
    let s = &mut mesh.scheduler;
    let join = |id: &str, digest: String, size| JoinRequest {
        host_id: id.into(),
        digest,
        size,
    };
    assert_eq!(
        s.join(&join("ghost", blob().to_string(), SIZE), now),
        Err(SchedulerError::UnknownHost("ghost".into()))
    );
    assert!(invalid(s.join(&join("", blob().to_string(), SIZE), now)));
    assert!(invalid(
        s.join(&join(&"x".repeat(129), blob().to_string(), SIZE), now)
    ));
    assert!(invalid(s.join(&join("a", "sha256:abc".into(), SIZE), now)));
    assert!(invalid(s.join(&join("a", blob().to_string(), -1), now)));
    // First writer wins: the task's size is fixed.
    assert!(invalid(
        s.join(&join("a", blob().to_string(), SIZE + 1), now)
    ));

    let schedule = |wanted: Vec<u32>, contiguous, digest: &Digest| ScheduleRequest {
        host_id: "a".into(),
        digest: digest.to_string(),
        wanted,
        contiguous,
        max_assignments: 0,
        wait_ms: 0,
    };
    assert!(invalid(
        s.schedule(&schedule(vec![PIECES], 0, &blob()), now)
    ));
    assert!(invalid(s.schedule(&schedule(vec![0], -1, &blob()), now)));
    assert!(invalid(
        s.schedule(&schedule(vec![0], SIZE + 1, &blob()), now)
    ));
    let other = Digest::of(b"other");
    assert_eq!(
        s.schedule(&schedule(vec![0], 0, &other), now),
        Err(SchedulerError::UnknownTask(other))
    );

    let report = |number, outcome: i32| ReportRequest {
        host_id: "a".into(),
        digest: blob().to_string(),
        results: vec![PieceResult {
            number,
            parent_id: "b".into(),
            outcome,
        }],
    };
    assert!(invalid(s.report(&report(0, 0), now)));
    assert!(invalid(s.report(&report(PIECES, Outcome::Ok.into()), now)));

    let register = |ip: &str, port| RegisterRequest {
        host: Some(api::Host {
            id: "c".into(),
            ip: ip.into(),
            upload_port: port,
            supernode: false,
        }),
        blobs: vec![],
    };
    assert!(invalid(s.register(&register("not-an-ip", 1), now)));
    assert!(invalid(s.register(&register("10.0.0.3", 0), now)));
    assert!(invalid(s.register(&RegisterRequest::default(), now)));
    assert_eq!(s.host_count(), 1);
}

#[test]
fn register_is_idempotent_and_replaces_what_the_host_holds() {
    let mut mesh = Mesh::new();
    mesh.register("a", vec![held(0..4, false)]);
    mesh.register("a", vec![held([5], false)]);
    assert_eq!(mesh.scheduler.host_count(), 1);
    mesh.register("b", vec![]);
    mesh.join("b");
    assert_eq!(parents(&mesh.schedule("b", [5])), ["a"]);
    // Nobody holds piece 0 any more (and nobody ingests): b takes over.
    assert!(mesh.schedule("b", [0]).take_over);
    // Registering with nothing drops the host from the task.
    mesh.register("a", vec![]);
    mesh.leave("b");
    assert_eq!(mesh.scheduler.task_count(), 0);
}

#[test]
fn unknown_hosts_are_asked_to_register_again() {
    let mut mesh = Mesh::new();
    assert!(mesh.heartbeat("a", 0));
    mesh.register("a", vec![]);
    assert!(!mesh.heartbeat("a", 0));
}

#[test]
fn announcements_must_agree_with_the_task() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a"]);
    mesh.register("b", vec![]);

    let mut wrong_size = held([0], false);
    wrong_size.size = SIZE - 1;
    wrong_size.piece_size = PIECE as u64;
    assert!(invalid(mesh.announce("b", wrong_size)));
    assert!(invalid(mesh.announce("b", held([PIECES], false))));
}

/// `held`, with zero-filled pieces' digests: a fake host's claim.
fn forged(pieces: impl IntoIterator<Item = u32>, complete: bool) -> HeldBlob {
    let mut blob = held(pieces, complete);
    for piece in &mut blob.pieces {
        piece.digest = Digest::of(&[0u8; 16]).to_string();
    }
    blob
}

fn banned(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::BadParent { parent, .. } => Some(parent.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn conflicting_claims_ban_nobody_and_a_refuted_claim_bans_only_its_authors() {
    let mut mesh = Mesh::new();
    // The fake host registers first, claiming the whole blob.
    mesh.register("fake", vec![forged(0..PIECES, true)]);
    mesh.register("ingester", vec![]);
    mesh.register("x", vec![]);
    mesh.register("y", vec![]);
    assert_eq!(mesh.join("x"), Role::Download);
    assert_eq!(mesh.join("y"), Role::Download);
    // x and y are fed by the only claim there is: the fake one.
    let response = mesh.schedule("x", 0..8);
    assert_eq!(parents(&response), ["fake"; 8]);
    assert_eq!(
        response.assignments[0].piece_digest,
        forged([0], false).pieces[0].digest
    );
    mesh.report_all("x", &response, Outcome::Ok);
    let response = mesh.schedule("y", 0..4);
    mesh.report_all("y", &response, Outcome::Ok);
    // The ingester's true digests conflict with the fake ones: a claim of
    // its own, nobody banned.
    mesh.announce("ingester", held(0..4, false)).unwrap();
    assert!(banned(&mesh.events()).is_empty());
    assert_eq!(
        mesh.scheduler.tasks.values().next().unwrap().claims.len(),
        2
    );
    // x's blob fails its digest: the fake claim is refuted, its author
    // banned, and y, which follows it too, is told to discard its pieces.
    mesh.report("x", &[(0, "fake", Outcome::BadBlob)]);
    assert_eq!(banned(&mesh.events()), ["fake"]);
    let response = mesh.schedule("y", 0..PIECES);
    assert!(response.discard && response.assignments.is_empty());
    // Its stale announcement of the fake pieces is ignored: no new claim.
    mesh.announce("y", forged(0..4, false)).unwrap();
    mesh.report("y", &[(0, "fake", Outcome::BadBlob)]);
    assert!(banned(&mesh.events()).is_empty());
    // Both are now fed by the ingester's claim, with its digests.
    for id in ["x", "y"] {
        let response = mesh.schedule(id, 0..4);
        assert!(!response.discard);
        assert_eq!(response.assignments.len(), 4);
        for assignment in &response.assignments {
            assert_ne!(parent_of(assignment), "fake");
            assert_eq!(assignment.piece_digest, piece_digest(assignment.number));
        }
        mesh.report_all(id, &response, Outcome::Ok);
    }
    check_invariants(&mesh.scheduler);
}

#[test]
fn a_confirmed_claim_is_not_refuted_by_one_host_and_a_fake_claim_ends_with_its_host() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a"]);
    mesh.joiners(&["b", "liar"]);
    // b downloads the whole blob by a's claim and commits it: confirmed.
    let response = mesh.schedule("b", 0..PIECES);
    mesh.report_all("b", &response, Outcome::Ok);
    let response = mesh.schedule("b", 0..PIECES);
    mesh.report_all("b", &response, Outcome::Ok);
    mesh.announce("b", held(0..PIECES, true)).unwrap();
    // A host that says the blob by it failed stops being fed by it; nobody
    // is banned, and other downloaders still are fed.
    let response = mesh.schedule("liar", [0]);
    mesh.report_all("liar", &response, Outcome::Ok);
    mesh.report(
        "liar",
        &[(0, parent_of(&response.assignments[0]), Outcome::BadBlob)],
    );
    assert!(banned(&mesh.events()).is_empty());
    assert!(mesh.schedule("liar", 0..PIECES).assignments.is_empty());
    mesh.joiners(&["c"]);
    assert!(!mesh.schedule("c", 0..PIECES).assignments.is_empty());

    // A fake claim is gone once its only host expires.
    let mut mesh = Mesh::new();
    mesh.register("fake", vec![forged(0..PIECES, true)]);
    mesh.joiners(&["x"]);
    assert!(!mesh.schedule("x", 0..PIECES).assignments.is_empty());
    mesh.pass(4, &["x"]);
    // Nobody holds a piece any more: x takes over from the registry.
    let response = mesh.schedule("x", 0..PIECES);
    assert!(response.take_over && response.assignments.is_empty());
    check_invariants(&mesh.scheduler);
}

#[test]
fn a_complete_announcement_needs_every_piece_digest() {
    let mut mesh = Mesh::new();
    mesh.register("a", vec![]);
    mesh.join("a");
    assert!(invalid(mesh.announce("a", held(0..PIECES - 1, true))));
    mesh.announce("a", held(0..PIECES - 1, false)).unwrap();
    mesh.announce("a", held([PIECES - 1], true)).unwrap();
    mesh.register("b", vec![]);
    assert_eq!(mesh.join("b"), Role::Download);
    assert_eq!(mesh.schedule("b", 0..PIECES).assignments.len(), 8);
}

#[test]
fn rarest_pieces_are_scheduled_first_and_at_most_32_per_call() {
    let mut mesh = Mesh::with_cap(100);
    mesh.seeds(&["a"]);
    mesh.register("b", vec![held(0..10, false)]);
    mesh.register("c", vec![held(0..5, false)]);
    mesh.register("d", vec![]);
    mesh.join("d");
    let response = mesh.schedule("d", 0..PIECES);
    // Pieces 10.. have one holder, 5..10 two, 0..5 three.
    assert_eq!(numbers(&response), (10..42).collect::<Vec<_>>());
    let response = mesh.schedule("d", (0..10).rev());
    assert_eq!(numbers(&response), [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]);
    for assignment in &response.assignments {
        assert_eq!(assignment.piece_digest, piece_digest(assignment.number));
    }
}

#[test]
fn a_parent_at_the_upload_cap_gets_no_more_until_reports_free_it() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a"]);
    mesh.register("b", vec![]);
    mesh.join("b");
    // Alone, b may take all of a's slots.
    let first = mesh.schedule("b", 0..20);
    assert_eq!(first.assignments.len(), 8);
    mesh.register("c", vec![]);
    mesh.join("c");
    let none = mesh.schedule("c", 0..20);
    assert!(none.assignments.is_empty() && !none.take_over);

    let freed = ScheduleResponse {
        assignments: first.assignments[..3].to_vec(),
        ..Default::default()
    };
    mesh.report_all("b", &freed, Outcome::Ok);
    // (Pieces 0..3 are b's now; c asks for those only a holds.)
    assert_eq!(mesh.schedule("c", 3..20).assignments.len(), 3);
    assert!(mesh.schedule("c", 20..40).assignments.is_empty());
}

#[test]
fn while_others_wait_with_nothing_a_call_gets_few_assignments() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a"]);
    mesh.joiners(&["w", "x"]);
    let first = mesh.schedule("w", 0..PIECES);
    assert_eq!(first.assignments.len(), 8);
    assert!(mesh.schedule("x", 0..PIECES).assignments.is_empty());
    mesh.report_all("w", &first, Outcome::Ok);
    // x waits with nothing: w gets only a few of the freed slots...
    let second = mesh.schedule("w", 8..PIECES);
    assert_eq!(second.assignments.len(), MAX_ASSIGNMENTS_WHILE_OTHERS_WAIT);
    // ...and x the rest (of a's slots: it asks for what only a holds).
    assert_eq!(mesh.schedule("x", 8..PIECES).assignments.len(), 4);
}

#[test]
fn an_empty_answer_says_whether_the_holders_are_busy() {
    let mut mesh = Mesh::new();
    mesh.joiners(&["i", "w", "x"]);
    // Nobody holds a piece yet: nothing to wait for but the ingester.
    let nothing = mesh.schedule("w", 0..PIECES);
    assert!(nothing.assignments.is_empty() && !nothing.parents_busy);
    mesh.seeds(&["a"]);
    let first = mesh.schedule("w", 0..PIECES);
    assert!(!first.assignments.is_empty() && !first.parents_busy);
    // a's upload slots all went to w: x waits on a busy holder.
    let starved = mesh.schedule("x", 0..PIECES);
    assert!(starved.assignments.is_empty() && starved.parents_busy);
    mesh.report_all("w", &first, Outcome::Ok);
    let freed = mesh.schedule("x", 0..PIECES);
    assert!(!freed.assignments.is_empty() && !freed.parents_busy);
}

#[test]
fn pieces_on_their_way_count_towards_rarity() {
    let mut mesh = Mesh::with_cap(100);
    mesh.seeds(&["a"]);
    mesh.joiners(&["x", "y"]);
    assert_eq!(
        numbers(&mesh.schedule("x", 0..PIECES)),
        (0..32).collect::<Vec<_>>()
    );
    // Pieces 0..32 are on their way to x: y gets the others first.
    assert_eq!(
        numbers(&mesh.schedule("y", 0..PIECES)),
        (32..64).collect::<Vec<_>>()
    );
}

#[test]
fn load_spreads_over_the_least_loaded_holders() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a", "b", "c", "d"]);
    mesh.register("x", vec![]);
    mesh.join("x");
    let response = mesh.schedule("x", 0..16);
    let counts = per_parent(&response);
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|&n| n == 4), "{counts:?}");

    // One piece at a time, freed at once: ties rotate over all holders.
    mesh.report_all("x", &response, Outcome::Ok);
    let mut seen = Vec::new();
    for _ in 0..8 {
        let response = mesh.schedule("x", [0]);
        seen.push(parent_of(&response.assignments[0]).to_owned());
        mesh.report_all("x", &response, Outcome::Ok);
    }
    assert_eq!(seen[..4], seen[4..]);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4);
}

#[test]
fn reported_uploads_count_as_load() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a", "b"]);
    mesh.register("x", vec![]);
    mesh.join("x");
    mesh.heartbeat("a", 8);
    let response = mesh.schedule("x", 0..6);
    assert_eq!(per_parent(&response), HashMap::from([("b", 6)]));
    mesh.report_all("x", &response, Outcome::Ok);
    mesh.heartbeat("a", 0);
    mesh.heartbeat("b", 3);
    let response = mesh.schedule("x", 0..6);
    assert_eq!(per_parent(&response), HashMap::from([("a", 4), ("b", 2)]));
}

#[test]
fn a_bad_digest_drops_the_parent_for_the_reporter_and_two_ban_it_for_everyone() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a", "b"]);
    mesh.joiners(&["x", "y"]);
    let response = mesh.schedule("x", [0]);
    let bad = parent_of(&response.assignments[0]).to_owned();
    mesh.report("x", &[(0, &bad, Outcome::BadDigest)]);
    assert!(mesh.events().is_empty(), "one host's word banned a parent");
    let response = mesh.schedule("x", 0..PIECES);
    assert!(parents(&response).iter().all(|&p| p != bad));
    mesh.report_all("x", &response, Outcome::Ok);
    let response = mesh.schedule("y", 0..PIECES);
    let number = response
        .assignments
        .iter()
        .find(|a| parent_of(a) == bad)
        .expect("the other downloader still gets the accused parent")
        .number;
    mesh.report_all("y", &response, Outcome::Ok);
    mesh.events();
    mesh.report("y", &[(number, &bad, Outcome::BadDigest)]);
    assert!(matches!(
        mesh.events().as_slice(),
        [Event::BadParent { parent, .. }] if *parent == bad
    ));
    for id in ["x", "y"] {
        let response = mesh.schedule(id, 0..4);
        assert!(!response.assignments.is_empty());
        assert!(parents(&response).iter().all(|&p| p != bad));
        mesh.report_all(id, &response, Outcome::Ok);
    }
    // Its later announcements are ignored.
    mesh.announce(&bad, held(0..PIECES, true)).unwrap();
    mesh.register("z", vec![]);
    mesh.join("z");
    assert!(
        parents(&mesh.schedule("z", 0..PIECES))
            .iter()
            .all(|&p| p != bad)
    );
}

#[test]
fn repeated_failures_drop_the_parent_for_that_downloader_only() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a"]);
    mesh.joiners(&["x", "y"]);
    for _ in 0..FAILURES_TO_DROP {
        assert_eq!(parents(&mesh.schedule("x", [0])), ["a"]);
        mesh.report("x", &[(0, "a", Outcome::Failed)]);
    }
    assert!(matches!(
        mesh.events().as_slice(),
        [Event::ParentDropped { parent, reporter, .. }] if parent == "a" && reporter == "x"
    ));
    let response = mesh.schedule("x", [0]);
    assert!(response.assignments.is_empty() && !response.take_over);
    assert_eq!(parents(&mesh.schedule("y", [0])), ["a"]);
}

#[test]
fn silent_hosts_expire_with_their_pieces_uploads_and_ingester_role() {
    let mut mesh = Mesh::with_cap(1);
    mesh.register("a", vec![]);
    mesh.register("b", vec![]);
    mesh.register("c", vec![]);
    assert_eq!(mesh.join("a"), Role::Ingest);
    mesh.announce("a", held(0..2, false)).unwrap();
    mesh.join("b");
    mesh.join("c");
    mesh.events();
    assert_eq!(parents(&mesh.schedule("b", [0])), ["a"]);

    // Three intervals without a heartbeat are tolerated, not more.
    mesh.pass(3, &["b", "c"]);
    assert_eq!(mesh.scheduler.host_count(), 3);
    mesh.pass(1, &["b", "c"]);
    assert_eq!(mesh.scheduler.host_count(), 2);
    assert_eq!(
        mesh.events(),
        [
            Event::HostExpired { host: "a".into() },
            Event::IngesterGone {
                digest: blob(),
                host: "a".into(),
                why: "expired"
            }
        ]
    );
    assert!(
        mesh.heartbeat("a", 0),
        "an expired host must register again"
    );

    // Its pieces went with it: nobody holds piece 0, so b takes over.
    let response = mesh.schedule("b", [0, 1]);
    assert!(response.take_over && response.assignments.is_empty());
    // b's upload slot (cap 1) is not held by a dead assignment.
    mesh.announce("b", held([0], false)).unwrap();
    assert_eq!(parents(&mesh.schedule("c", [0])), ["b"]);
}

#[test]
fn the_downloader_with_the_most_contiguous_bytes_takes_over_alone() {
    let mut mesh = Mesh::new();
    mesh.joiners(&["a", "b", "c"]);
    mesh.announce("a", held(0..2, false)).unwrap();
    // b and c got piece 0 and 0..2; c is furthest.
    mesh.announce("b", held([0], false)).unwrap();
    mesh.announce("c", held(0..2, false)).unwrap();
    // Piece 1 comes from c, not from the ingester a.
    let first = mesh.schedule_at("b", [1, 2], PIECE);
    assert!(!first.take_over);
    assert_eq!(parents(&first), ["c"]);
    assert!(!mesh.schedule_at("c", [2, 3], 2 * PIECE).take_over);
    mesh.events();

    mesh.pass(4, &["b", "c"]);
    // b asks first but c holds more: b is told nothing and waits.
    let wait = mesh.schedule_at("b", [1, 2], PIECE);
    assert!(!wait.take_over);
    let wait = mesh.schedule_at("b", [2], PIECE);
    assert!(!wait.take_over && wait.assignments.is_empty());
    assert!(mesh.schedule_at("c", [2, 3], 2 * PIECE).take_over);
    // There is an ingester again: nobody else takes over.
    assert!(!mesh.schedule_at("b", [2], PIECE).take_over);
    let takeovers: Vec<_> = mesh
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::TakeOver { .. }))
        .collect();
    assert_eq!(
        takeovers,
        [Event::TakeOver {
            digest: blob(),
            host: "c".into(),
            contiguous: 2 * PIECE as u64
        }]
    );
}

#[test]
fn no_take_over_while_the_wanted_pieces_or_the_blob_exist() {
    let mut mesh = Mesh::new();
    mesh.joiners(&["a", "b"]);
    mesh.announce("a", held(0..2, false)).unwrap();
    mesh.joiners(&["d"]);
    mesh.announce("d", held(0..2, false)).unwrap();
    mesh.leave("a");
    assert!(matches!(
        mesh.events().last(),
        Some(Event::IngesterGone { why: "left", .. })
    ));
    let response = mesh.schedule("b", [0, 1]);
    assert!(!response.take_over && response.assignments.len() == 2);

    mesh.seeds(&["c"]);
    let response = mesh.schedule("b", [5]);
    assert!(!response.take_over && parents(&response) == ["c"]);
    mesh.register("c", vec![]); // It deleted the blob.
    assert!(mesh.schedule("b", [5]).take_over);
}

#[test]
fn leaving_without_the_whole_blob_withdraws_its_pieces() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["s"]);
    mesh.joiners(&["a", "b"]);
    mesh.announce("a", held(0..2, false)).unwrap();
    mesh.leave("a");
    let response = mesh.schedule("b", [0, 1]);
    assert_eq!(parents(&response), ["s", "s"], "a left and serves nothing");
}

#[test]
fn leaving_keeps_the_whole_blob_offered() {
    let mut mesh = Mesh::new();
    mesh.seeds(&["a"]);
    mesh.register("b", vec![]);
    mesh.join("b");
    mesh.leave("a");
    assert_eq!(parents(&mesh.schedule("b", [0])), ["a"]);
    // A daemon that deleted the blob registers again without it.
    mesh.register("a", vec![]);
    let response = mesh.schedule("b", [1]);
    assert!(response.assignments.is_empty() && response.take_over);
}

#[test]
fn assignments_time_out_after_30_seconds() {
    let mut mesh = Mesh::with_cap(1);
    mesh.seeds(&["a"]);
    mesh.joiners(&["b", "c"]);
    assert_eq!(mesh.schedule("b", [0]).assignments.len(), 1);
    assert!(mesh.schedule("c", [0]).assignments.is_empty());
    mesh.pass(ASSIGNMENT_TIMEOUT.as_secs() - 1, &["a", "b", "c"]);
    assert!(mesh.schedule("c", [0]).assignments.is_empty());
    mesh.pass(1, &["a", "b", "c"]);
    assert_eq!(parents(&mesh.schedule("c", [0])), ["a"]);
}

#[test]
fn banned_hosts_never_ingest() {
    let mut mesh = Mesh::new();
    for id in ["a", "b", "c"] {
        mesh.register(id, vec![]);
    }
    // b's claim is refuted by a's blob: b is banned.
    mesh.register("b", vec![forged(0..PIECES, true)]);
    assert_eq!(mesh.join("a"), Role::Download);
    let response = mesh.schedule("a", [0]);
    mesh.report(
        "a",
        &[(0, parent_of(&response.assignments[0]), Outcome::BadBlob)],
    );
    assert_eq!(banned(&mesh.events()), ["b"]);
    mesh.leave("a");
    assert_eq!(mesh.join("b"), Role::Download);
    assert!(!mesh.schedule("b", [0]).take_over);
    // The next joiner ingests in its place.
    assert_eq!(mesh.join("c"), Role::Ingest);
}

#[test]
fn a_restarted_supernode_is_rebuilt_from_registrations() {
    let mut mesh = Mesh::new();
    // The daemons find the new supernode empty and register what they hold.
    assert!(mesh.heartbeat("a", 0));
    mesh.register("a", vec![held(0..4, false)]);
    mesh.register("b", vec![held(0..2, false)]);
    assert_eq!(mesh.scheduler.task_count(), 1);
    // b resumes without joining again.
    assert_eq!(parents(&mesh.schedule("b", [2, 3])), ["a", "a"]);
    mesh.register("c", vec![]);
    assert_eq!(mesh.join("c"), Role::Download);
    let response = mesh.schedule("c", 0..4);
    // Pieces 2 and 3 are on their way to b from their one holder: c waits
    // for them to spread; 0 and 1 come from the least loaded holder, b.
    assert_eq!(numbers(&response), [0, 1]);
    assert_eq!(parents(&response), ["b", "b"]);
}

#[test]
fn a_piece_is_on_its_way_to_at_most_as_many_downloaders_as_hold_it() {
    let mut mesh = Mesh::with_cap(100);
    mesh.register("ingester", vec![held(0..1, false)]);
    for id in ["b", "c", "d"] {
        mesh.register(id, vec![]);
        assert_eq!(mesh.join(id), Role::Download);
    }
    // The ingester's new piece leaves it once; the others wait for a copy.
    assert_eq!(parents(&mesh.schedule("b", [0])), ["ingester"]);
    assert!(mesh.schedule("c", [0]).assignments.is_empty());
    mesh.report("b", &[(0, "ingester", Outcome::Ok)]);
    mesh.announce("b", held(0..1, false)).unwrap();
    // Two copies: two transfers at once, one from each.
    let c = mesh.schedule("c", [0]);
    let d = mesh.schedule("d", [0]);
    let mut from = [parents(&c), parents(&d)].concat();
    from.sort_unstable();
    assert_eq!(from, ["b", "ingester"]);
}

#[test]
fn expired_downloaders_free_their_parents_upload_slots() {
    let mut mesh = Mesh::with_cap(1);
    mesh.seeds(&["a"]);
    mesh.joiners(&["b", "c"]);
    assert_eq!(mesh.schedule("b", [0]).assignments.len(), 1);
    mesh.pass(4, &["a", "c"]);
    assert_eq!(mesh.scheduler.host_count(), 2);
    assert_eq!(parents(&mesh.schedule("c", [0])), ["a"]);
}

/// Checks that every index and counter agrees with the state it summarizes.
fn check_invariants(s: &Scheduler) {
    let cap = s.hosts.by_load.len() as u32;
    for (slot, host) in s.hosts.slots.iter().enumerate() {
        let slot = slot as u32;
        for (level, hosts) in s.hosts.by_load.iter().enumerate() {
            let expected = host.as_ref().is_some_and(|h| h.load() == level as u32);
            assert_eq!(
                hosts.contains(slot),
                expected,
                "slot {slot} at load {level}"
            );
        }
        let Some(host) = host else { continue };
        assert_eq!(s.hosts.by_id[&host.id], slot);
        for task_id in &host.tasks {
            assert!(s.tasks[task_id].members.contains_key(&slot));
        }
        assert!(host.uploads.len() as u32 <= cap.max(host.reported_uploads));
    }
    for (&task_id, task) in &s.tasks {
        assert_eq!(s.task_ids[&task.digest], task_id);
        assert!(!task.members.is_empty());
        let mut downloaders = BTreeSet::new();
        let mut waiting = 0;
        let mut complete = 0;
        for (&slot, member) in &task.members {
            assert!(s.hosts.get(slot).tasks.contains(&task_id));
            if let Some(contiguous) = member.downloading
                && !member.banned
            {
                downloaders.insert((contiguous, slot));
            }
            assert!(!member.waiting || member.downloading.is_some());
            waiting += u32::from(member.waiting);
            complete += u32::from(member.complete);
            for number in member.pieces.iter() {
                assert!(task.pieces[number as usize].holders.contains(slot));
                let claim = member.claim.and_then(|c| task.claims.get(c));
                assert!(
                    claim
                        .expect("a holder follows a claim")
                        .digest(number)
                        .is_some()
                );
            }
            if let Some(claim) = member.claim {
                assert!(task.claims.get(claim).unwrap().members.contains(slot));
            }
        }
        assert_eq!(task.downloaders, downloaders);
        for (id, claim) in task.claims.iter() {
            assert!(!claim.members.is_empty(), "claim {id} followed by nobody");
            for slot in claim.members.iter() {
                assert_eq!(task.members[&slot].claim, Some(id));
            }
        }
        assert_eq!(task.waiting, waiting);
        assert_eq!(task.complete_holders, complete);
        if let Some(ingester) = task.ingester {
            assert!(task.members.contains_key(&ingester));
        }
        for (number, piece) in task.pieces.iter().enumerate() {
            let holders: Vec<u32> = piece.holders.iter().collect();
            assert_eq!(piece.holder_count as usize, holders.len());
            for slot in holders {
                assert!(task.members[&slot].pieces.contains(number as u32));
            }
            let in_flight = s
                .hosts
                .slots
                .iter()
                .flatten()
                .flat_map(|h| &h.uploads)
                .filter(|u| u.task == task_id && u.piece == number as u32)
                .count();
            assert_eq!(piece.in_flight as usize, in_flight, "piece {number}");
        }
    }
}

/// A small deterministic pseudo-random sequence (xorshift).
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[test]
fn random_operations_keep_the_state_consistent() {
    let mut mesh = Mesh::with_cap(3);
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
    let ids: Vec<String> = (0..12).map(|i| format!("h{i}")).collect();
    let mut last: HashMap<usize, ScheduleResponse> = HashMap::new();
    let mut seen = HashSet::new();
    for _ in 0..20_000 {
        let id = dice.below(ids.len());
        let host = ids[id].as_str();
        let piece = dice.below(PIECES as usize) as u32;
        if mesh.heartbeat(host, 0) {
            mesh.register(host, vec![]);
        }
        match dice.below(10) {
            0 => mesh.register(host, vec![held(0..dice.below(8) as u32, false)]),
            1 => {
                mesh.join(host);
            }
            2 => {
                // May be refused (nothing joined): that is fine here.
                // Some hosts announce forged digests: a claim of their own.
                let complete = dice.below(20) == 0;
                let blob = if id.is_multiple_of(4) {
                    forged([piece], complete)
                } else {
                    held([piece], complete)
                };
                let _ = mesh.announce(host, blob);
            }
            3 | 4 => {
                let request = ScheduleRequest {
                    host_id: host.into(),
                    digest: blob().to_string(),
                    wanted: (piece..PIECES.min(piece + 8)).collect(),
                    contiguous: 0,
                    max_assignments: 0,
                    wait_ms: 0,
                };
                if let Ok(response) = mesh.scheduler.schedule(&request, mesh.now) {
                    last.insert(id, response);
                }
            }
            5 | 6 => {
                if let Some(response) = last.remove(&id) {
                    let outcomes = [
                        Outcome::Ok,
                        Outcome::Failed,
                        Outcome::BadDigest,
                        Outcome::BadBlob,
                    ];
                    let outcome = outcomes[dice.below(outcomes.len())];
                    mesh.report_all(host, &response, outcome);
                }
            }
            7 => mesh.leave(host),
            8 => {
                mesh.heartbeat(host, dice.below(5) as u32);
            }
            _ => {
                mesh.now += Duration::from_millis(dice.below(4000) as u64);
                mesh.scheduler.expire(mesh.now);
            }
        }
        for event in mesh.events() {
            seen.insert(std::mem::discriminant(&event));
        }
        check_invariants(&mesh.scheduler);
    }
    // Every kind of event but BlobRejected happened.
    assert_eq!(seen.len(), 6, "{seen:?}");
}

#[test]
fn a_call_gets_no_more_assignments_than_it_can_start() {
    let mut mesh = Mesh::with_cap(100);
    mesh.seeds(&["a"]);
    mesh.register("x", vec![]);
    mesh.join("x");
    let request = ScheduleRequest {
        host_id: "x".into(),
        digest: blob().to_string(),
        wanted: (0..16).collect(),
        contiguous: 0,
        max_assignments: 3,
        wait_ms: 0,
    };
    let response = mesh.scheduler.schedule(&request, mesh.now).unwrap();
    assert_eq!(numbers(&response), [0, 1, 2]);
}

#[test]
fn a_restarted_supernode_learns_the_ingester_from_its_registration() {
    let mut mesh = Mesh::new();
    let mut ingesting = held(0..2, false);
    ingesting.ingesting = true;
    mesh.register("a", vec![ingesting]);
    mesh.register("b", vec![]);
    assert_eq!(mesh.join("b"), Role::Download);
    // Piece 3 exists nowhere yet, but a is streaming it: no take-over.
    let response = mesh.schedule("b", [3]);
    assert!(!response.take_over && response.assignments.is_empty());
    assert_eq!(mesh.join("a"), Role::Ingest);
}

#[test]
fn a_freshly_started_scheduler_elects_no_ingester_during_recovery() {
    let mut mesh = Mesh::with_config(SchedulerConfig {
        recovery: Duration::from_secs(3),
        ..Default::default()
    });
    mesh.register("a", vec![]);
    // Someone may be streaming the blob and not have registered yet.
    assert_eq!(mesh.join("a"), Role::Download);
    assert!(!mesh.schedule("a", [0]).take_over);
    mesh.pass(3, &["a"]);
    assert!(mesh.schedule("a", [0]).take_over);
}

#[test]
fn a_late_ingesting_announcement_does_not_make_a_complete_host_the_ingester() {
    let mut mesh = Mesh::new();
    mesh.register("a", vec![]);
    assert_eq!(mesh.join("a"), Role::Ingest);
    mesh.announce("a", held(0..PIECES, true)).unwrap();
    // Sent while a still ingested, received after it said complete.
    let mut late = held(0..PIECES - 1, false);
    late.ingesting = true;
    mesh.announce("a", late).unwrap();
    // The repo copies only from hosts that are not ingesting: it gets every
    // piece from a, one per call.
    mesh.register_repo("repo");
    mesh.join("repo");
    let mut copied = Vec::new();
    while copied.len() < PIECES as usize {
        let response = mesh.schedule("repo", (0..PIECES).filter(|n| !copied.contains(n)));
        assert_eq!(response.assignments.len(), 1, "after {copied:?}");
        mesh.report_all("repo", &response, Outcome::Ok);
        copied.extend(numbers(&response));
    }
}

#[test]
fn a_supernode_repo_never_ingests_and_is_named_as_such_to_downloaders() {
    let mut mesh = Mesh::new();
    mesh.register_repo("repo");
    // First to want the blob, yet no registry fetch, now or as a take-over.
    assert_eq!(mesh.join("repo"), Role::Download);
    assert!(!mesh.schedule("repo", [0]).take_over);
    // The next node to want it is elected.
    mesh.register("a", vec![]);
    assert_eq!(mesh.join("a"), Role::Ingest);

    mesh.register("b", vec![]);
    mesh.join("b");
    mesh.announce("repo", held(0..PIECES, true)).unwrap();
    let response = mesh.schedule("b", [0]);
    let parent = response.assignments[0].parent.as_ref().unwrap();
    assert_eq!(parent.host_id, "repo");
    assert!(parent.supernode);
}

/// Registers `id` and has it join first, so it is the blob's ingester, with
/// `pieces` announced.
fn ingester(mesh: &mut Mesh, id: &str, pieces: std::ops::Range<u32>) {
    mesh.register(id, vec![]);
    assert_eq!(mesh.join(id), Role::Ingest);
    mesh.announce(id, held(pieces, false)).unwrap();
}

#[test]
fn a_verified_piece_counts_as_held_from_its_report_on() {
    let mut mesh = Mesh::new();
    ingester(&mut mesh, "a", 0..1);
    mesh.joiners(&["b", "c"]);
    assert_eq!(parents(&mesh.schedule("b", [0])), ["a"]);
    // b's Announce has not come yet: its report alone makes it a holder, so
    // the piece is not sent by the ingester a second time.
    mesh.report("b", &[(0, "a", Outcome::Ok)]);
    assert_eq!(parents(&mesh.schedule("c", [0])), ["b"]);
}

#[test]
fn the_ingesters_uplink_is_kept_for_the_pieces_only_it_holds() {
    let mut mesh = Mesh::with_cap(1);
    ingester(&mut mesh, "a", 0..2);
    mesh.joiners(&["b", "c", "d"]);
    mesh.announce("b", held(0..1, false)).unwrap();
    let c = mesh.schedule("c", [0, 1]);
    let mut got: Vec<_> = c
        .assignments
        .iter()
        .map(|a| (a.number, parent_of(a)))
        .collect();
    got.sort_unstable();
    assert_eq!(got, [(0, "b"), (1, "a")]);
    // b is busy and a is idle again, yet d waits for b rather than take
    // piece 0 from the ingester.
    mesh.report("c", &[(1, "a", Outcome::Ok)]);
    assert!(mesh.schedule("d", [0]).assignments.is_empty());
    // Once the ingest is complete, the former ingester is a holder like any.
    mesh.announce("a", held(0..PIECES, true)).unwrap();
    assert_eq!(parents(&mesh.schedule("d", [0])), ["a"]);
}

#[test]
fn the_repo_copies_only_from_idle_hosts_other_than_the_ingester() {
    let mut mesh = Mesh::new();
    ingester(&mut mesh, "a", 0..4);
    mesh.joiners(&["b", "c"]);
    mesh.announce("b", held(0..1, false)).unwrap();
    assert_eq!(parents(&mesh.schedule("c", [0])), ["b"]);
    mesh.register_repo("repo");
    assert_eq!(mesh.join("repo"), Role::Download);
    // b is uploading and a ingests: the repo's background copy waits.
    assert!(mesh.schedule("repo", [0, 1, 2, 3]).assignments.is_empty());
    // b and c (which holds piece 0 from its report on) are idle: one piece
    // from either, none of the ingester's.
    mesh.report("c", &[(0, "b", Outcome::Ok)]);
    let response = mesh.schedule("repo", [0, 1, 2, 3]);
    assert_eq!(numbers(&response), [0]);
    let from = parents(&response);
    assert!(from == ["b"] || from == ["c"], "{from:?}");
}

#[test]
fn a_host_speaks_only_from_its_own_address() {
    let mut mesh = Mesh::new();
    mesh.register_at("a", "10.0.0.1", vec![]);
    let own: IpAddr = "10.0.0.1".parse().unwrap();
    let other: IpAddr = "10.0.0.66".parse().unwrap();
    assert!(mesh.scheduler.check_caller("a", own).is_ok());
    assert!(matches!(
        mesh.scheduler.check_caller("a", other),
        Err(SchedulerError::NotTheCaller { .. })
    ));
    assert!(mesh.scheduler.check_caller("unknown", other).is_ok());
    let info = |id: &str, ip: &str| HostInfo {
        id: id.into(),
        ip: ip.parse().unwrap(),
        addr: format!("{ip}:65002"),
        supernode: false,
    };
    assert!(
        mesh.scheduler
            .check_registration(&info("a", "10.0.0.1"), own)
            .is_ok()
    );
    assert!(
        mesh.scheduler
            .check_registration(&info("a", "10.0.0.66"), other)
            .is_err(),
        "id hijacked from another address"
    );
    assert!(
        mesh.scheduler
            .check_registration(&info("b", "10.0.0.1"), other)
            .is_err(),
        "registered another address than the caller's"
    );
}

#[test]
fn a_heartbeats_load_counts_up_to_the_upload_cap() {
    let mut mesh = Mesh::with_cap(4);
    mesh.seeds(&["a"]);
    mesh.heartbeat("a", 1000);
    let slot = mesh.scheduler.hosts.slot_of("a").unwrap();
    assert_eq!(mesh.scheduler.hosts.get(slot).load(), 4);
}

#[test]
fn loopback_parents_are_offered_only_to_loopback_callers() {
    let mut mesh = Mesh::new();
    mesh.register_at("local", "127.0.0.1", vec![held(0..PIECES, true)]);
    mesh.register_at("remote", "10.0.0.2", vec![]);
    mesh.join("remote");
    assert!(mesh.schedule("remote", 0..4).assignments.is_empty());
    mesh.register_at("neighbour", "127.0.0.2", vec![]);
    mesh.join("neighbour");
    assert_eq!(parents(&mesh.schedule("neighbour", 0..4)), ["local"; 4]);
}

#[test]
fn hosts_and_their_tasks_are_bounded() {
    let mut mesh = Mesh::new();
    mesh.register("greedy", vec![]);
    for n in 0..MAX_TASKS_PER_HOST as u32 {
        let request = JoinRequest {
            host_id: "greedy".into(),
            digest: Digest::of(&n.to_le_bytes()).to_string(),
            size: 1,
        };
        mesh.scheduler.join(&request, mesh.now).unwrap();
    }
    let tasks = mesh.scheduler.task_count();
    let one_more = JoinRequest {
        host_id: "greedy".into(),
        digest: blob().to_string(),
        size: SIZE,
    };
    assert!(invalid(mesh.scheduler.join(&one_more, mesh.now)));
    assert_eq!(
        mesh.scheduler.task_count(),
        tasks,
        "a task past the cap was kept"
    );
    check_invariants(&mesh.scheduler);
    for n in mesh.scheduler.host_count()..MAX_HOSTS {
        mesh.register(&format!("host-{n}"), vec![]);
    }
    let request = RegisterRequest {
        host: Some(api::Host {
            id: "one-too-many".into(),
            ip: "10.0.0.1".into(),
            upload_port: 65002,
            supernode: false,
        }),
        blobs: vec![],
    };
    assert!(invalid(mesh.scheduler.register(&request, mesh.now)));
    mesh.register("greedy", vec![]);
}
