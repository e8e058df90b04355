//! The supernode's scheduler: the whole mesh state (hosts, tasks, which host
//! holds which verified piece, who ingests, which uploads are in flight) as a
//! pure state machine. No I/O, no clock: every call is given `now`. One method
//! per RPC of proto/mesh.proto, plus [`Scheduler::expire`]; what an operator
//! should hear about is queued as [`Event`]s for the caller to log and count.
//!
//! Representation, sized for 10,000 hosts × 1,024 pieces per task: hosts live
//! in numbered slots; per task, every piece has a bitset of the slots holding
//! it and every member a bitset of the pieces it holds; and for every load `l`
//! below the upload cap, one bitset holds the hosts whose load is `l`. A
//! Schedule call ORs those into the set of parents eligible for the caller;
//! picking the least-loaded eligible holder of a piece is then a word-wise AND
//! of two bitsets (and of the lower load levels only when the first holder
//! found is busy), resumed round-robin from where the previous pick of that
//! piece stopped: O(wanted × hosts/64) word operations at worst, never a walk
//! over hosts × pieces.
//!
//! Policy beyond the plain rules: rarity counts the transfers of a piece in
//! flight (so that callers in a row do not all get the same rare piece); a
//! piece is on its way to at most as many downloaders as hold it (a new
//! piece leaves the ingester once, then spreads from its copies, doubling:
//! without this, every downloader that caught up took each new piece from the
//! ingester, whose uplink then carried several copies of the blob and paced
//! the whole rollout); a downloader that reports a piece received holds it
//! from that report on (its Announce comes a moment later, and meanwhile the
//! piece would have been sent again); the ingester's uplink is kept for the
//! pieces only it holds (anything someone else has comes from them); the
//! supernode's repo copies in the background, one piece at a time from an
//! idle holder other than the ingester, never taking a slot a node could
//! use; and while some downloaders of a task wait with nothing, each call
//! gets only [`MAX_ASSIGNMENTS_WHILE_OTHERS_WAIT`] assignments. Any request from a host
//! counts as a sign of life, like a heartbeat.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::bits::Bits;
use crate::protocol::Digest;
use crate::protocol::api::{
    AnnounceRequest, AnnounceResponse, Assignment, HeartbeatRequest, HeartbeatResponse,
    JoinRequest, JoinResponse, LeaveRequest, LeaveResponse, Outcome, Parent, RegisterRequest,
    RegisterResponse, ReportRequest, ReportResponse, Role, ScheduleRequest, ScheduleResponse,
};
use crate::protocol::piece::{piece_count, piece_size};
use crate::protocol::status::Refusal;
use crate::protocol::wire::{self, Blob, HostInfo, Registration};
use claims::{ClaimId, Claims};

/// Heartbeat intervals a host may miss before it is dropped.
pub const MISSED_HEARTBEATS: u32 = 3;
/// How long an assignment counts as an upload in flight without a report.
pub const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most assignments one Schedule call hands out.
pub const MAX_ASSIGNMENTS: usize = 32;
/// Most assignments one Schedule call hands out while other downloaders of
/// the task wait (their last call got nothing: every holder of their wanted
/// pieces was busy). Scarce upload slots then go to many downloaders, each of
/// which soon serves others, rather than to the few that happen to ask first:
/// in the load benchmark this turns a linear ramp-up into a doubling one.
pub const MAX_ASSIGNMENTS_WHILE_OTHERS_WAIT: usize = 4;
/// Failed transfers from one parent after which a downloader stops getting it.
pub const FAILURES_TO_DROP: u32 = 2;
/// Distinct live hosts that must report a bad digest from one parent
/// before it is banned from the task for everyone: a single (fake) host's
/// word never bans an honest one.
pub const BAD_DIGEST_REPORTERS: usize = 2;
/// Most hosts registered at once: a new host beyond it is refused.
pub const MAX_HOSTS: usize = 20_000;
/// Most tasks one host is a member of: a Join, Announce or registered blob
/// beyond it is refused (a host's memory at the supernode is bounded).
pub const MAX_TASKS_PER_HOST: usize = 4096;
/// Claims a downloader remembers having refuted (it is not fed by them
/// again); older ones are forgotten.
const MAX_REJECTED_CLAIMS: usize = 16;

/// Tunables of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How often daemons send heartbeats (told to them at Register).
    pub heartbeat_interval: Duration,
    /// Most concurrent piece uploads asked of one host (at least 1).
    pub upload_cap: u32,
    /// After its first request, how long the scheduler elects no ingester
    /// (Join answers Download, no take-over): time for the daemons of a
    /// restarted supernode to register again and say who ingests what, so
    /// that a second node does not fetch a blob one is already streaming.
    /// [`crate::supernode::run`] drops it on a first start in a data dir.
    pub recovery: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(1000),
            upload_cap: 8,
            recovery: Duration::ZERO,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerError {
    /// Malformed, out of range, or contradicting what the task already knows.
    #[error("{0}")]
    InvalidArgument(String),
    /// The host is not registered (the supernode restarted or the host
    /// expired): it must register again.
    #[error("host {0:?} is not registered: register again")]
    UnknownHost(String),
    /// Nobody joined this blob (or everyone left it).
    #[error("no task for {0}: join it first")]
    UnknownTask(Digest),
    /// The caller speaks for a host whose address is not the caller's.
    #[error("host {id:?} is at {registered}, not at the caller's address {caller}")]
    NotTheCaller {
        id: String,
        registered: IpAddr,
        caller: IpAddr,
    },
}

impl From<wire::InvalidMessage> for SchedulerError {
    fn from(error: wire::InvalidMessage) -> Self {
        Self::InvalidArgument(error.0)
    }
}

impl SchedulerError {
    /// What the error tells the caller to do, in the protocol's terms.
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::InvalidArgument(_) | Self::NotTheCaller { .. } => Refusal::Invalid,
            Self::UnknownHost(_) => Refusal::RegisterAgain,
            Self::UnknownTask(_) => Refusal::TaskLost,
        }
    }
}

/// Something an operator should see, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `host` was the first to want `digest` (a blob of `size` bytes): it
    /// fetches it from the registry.
    IngesterElected {
        digest: Digest,
        size: u64,
        host: String,
    },
    /// The ingester of `digest` is gone and `host` resumes the blob from the
    /// registry at byte `contiguous`.
    TakeOver {
        digest: Digest,
        host: String,
        contiguous: u64,
    },
    /// `host` no longer ingests `digest` (`why`: left, expired, banned).
    IngesterGone {
        digest: Digest,
        host: String,
        why: &'static str,
    },
    /// `host` missed its heartbeats and was dropped with all it held.
    HostExpired { host: String },
    /// `parent` served or announced corrupt pieces of `digest`: it is dropped
    /// from the task for every downloader.
    BadParent {
        digest: Digest,
        parent: String,
        why: String,
    },
    /// Transfers of `digest` from `parent` to `reporter` failed repeatedly:
    /// `reporter` stops getting `parent` as a parent.
    ParentDropped {
        digest: Digest,
        parent: String,
        reporter: String,
    },
    /// What `host` registered of `digest` contradicts the task: ignored.
    BlobRejected {
        digest: Digest,
        host: String,
        why: String,
    },
}

/// The mesh state. See the module documentation.
pub struct Scheduler {
    config: SchedulerConfig,
    hosts: Hosts,
    tasks: HashMap<TaskId, Task>,
    task_ids: HashMap<Digest, TaskId>,
    next_task_id: TaskId,
    events: Vec<Event>,
    /// Time of the first request: the recovery window starts there.
    started: Option<Instant>,
}

impl Scheduler {
    /// An empty scheduler.
    ///
    /// # Panics
    /// If `config.upload_cap` is 0.
    pub fn new(config: SchedulerConfig) -> Self {
        assert!(config.upload_cap > 0, "the upload cap must be at least 1");
        Self {
            hosts: Hosts::new(config.upload_cap),
            config,
            tasks: HashMap::new(),
            task_ids: HashMap::new(),
            next_task_id: 0,
            events: Vec::new(),
            started: None,
        }
    }

    /// Hosts registered and alive.
    pub fn host_count(&self) -> usize {
        self.hosts.by_id.len()
    }

    /// Blobs some live host holds, downloads or ingests.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// The events queued since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Register: adds the host, or refreshes it, and replaces what it holds
    /// with the request's blobs (a blob contradicting its task is skipped with
    /// [`Event::BlobRejected`]). Roles (ingester, downloader) are kept.
    pub fn register(
        &mut self,
        request: &RegisterRequest,
        now: Instant,
    ) -> Result<RegisterResponse, SchedulerError> {
        let registration = wire::registration(request)?;
        self.register_valid(registration, now)
    }

    /// [`Self::register`] of a registration already validated (the service
    /// validates outside the scheduler's lock).
    pub fn register_valid(
        &mut self,
        registration: Registration,
        now: Instant,
    ) -> Result<RegisterResponse, SchedulerError> {
        self.started.get_or_insert(now);
        let Registration { host: info, blobs } = registration;
        let host_id = info.id.clone();
        if self.hosts.slot_of(&host_id).is_none() && self.host_count() >= MAX_HOSTS {
            return Err(SchedulerError::InvalidArgument(format!(
                "{MAX_HOSTS} hosts are registered: {host_id:?} is refused"
            )));
        }
        let slot = self.hosts.upsert(info, now);
        self.forget_holdings(slot);
        for blob in blobs {
            let digest = blob.digest.clone();
            if let Err(e) = self.record_blob(slot, blob) {
                self.events.push(Event::BlobRejected {
                    digest,
                    host: host_id.clone(),
                    why: e.to_string(),
                });
            }
        }
        let heartbeat_ms = u32::try_from(self.config.heartbeat_interval.as_millis());
        Ok(RegisterResponse {
            heartbeat_ms: heartbeat_ms.unwrap_or(u32::MAX),
        })
    }

    /// Fails unless a host registered as `id` (if any) is at `caller`'s IP:
    /// without TLS, the caller's address is the only identity it shows, so
    /// no one speaks for a host from another address. A host whose IP
    /// changed registers again once its old entry expired.
    pub fn check_caller(&self, id: &str, caller: IpAddr) -> Result<(), SchedulerError> {
        let Some(slot) = self.hosts.slot_of(id) else {
            return Ok(());
        };
        let registered = self.hosts.get(slot).ip;
        if registered != caller {
            return Err(SchedulerError::NotTheCaller {
                id: id.to_owned(),
                registered,
                caller,
            });
        }
        Ok(())
    }

    /// Fails unless `caller` may register `host`: the host's IP is the
    /// caller's, and the id is not registered at another IP (no id hijack).
    pub fn check_registration(
        &self,
        host: &HostInfo,
        caller: IpAddr,
    ) -> Result<(), SchedulerError> {
        if host.ip != caller {
            return Err(SchedulerError::NotTheCaller {
                id: host.id.clone(),
                registered: host.ip,
                caller,
            });
        }
        self.check_caller(&host.id, caller)
    }

    /// Heartbeat: keeps the host alive and records its upload load; an
    /// unknown host is told to register again.
    pub fn heartbeat(
        &mut self,
        request: &HeartbeatRequest,
        now: Instant,
    ) -> Result<HeartbeatResponse, SchedulerError> {
        self.started.get_or_insert(now);
        let id = wire::host_id(&request.host_id)?;
        let Some(slot) = self.hosts.slot_of(id) else {
            return Ok(HeartbeatResponse { reregister: true });
        };
        // A host's word on its own load counts up to the cap: more would
        // take nothing more from it, and at most it keeps itself busy.
        let reported = request.uploads_in_use.min(self.config.upload_cap);
        self.hosts.update_load(slot, |host| {
            host.last_seen = now;
            host.reported_uploads = reported;
        });
        Ok(HeartbeatResponse { reregister: false })
    }

    /// Join: the caller ingests the blob if no other live host holds any of
    /// it or ingests it (or if it already is the ingester); else it downloads.
    /// A host banned from the task never ingests it.
    pub fn join(
        &mut self,
        request: &JoinRequest,
        now: Instant,
    ) -> Result<JoinResponse, SchedulerError> {
        let slot = self.touch(&request.host_id, now)?;
        let digest = wire::digest(&request.digest)?;
        let size = wire::blob_size(request.size)?;
        let recovering = self.recovering(now);
        let task_id = self.task_for(&digest, size)?;
        self.enroll_or_tidy(task_id, slot)?;
        let task = self.tasks.get_mut(&task_id).expect("task just found");
        let role = if task.ingester == Some(slot) {
            Role::Ingest
        } else if task.ingester.is_some()
            || task.others_hold_pieces(slot)
            || task.members[&slot].banned
            || recovering
            || self.hosts.get(slot).supernode
        {
            let contiguous = task.members[&slot].downloading.unwrap_or(0);
            task.set_downloading(slot, contiguous);
            Role::Download
        } else {
            task.ingester = Some(slot);
            task.stop_downloading(slot);
            self.events.push(Event::IngesterElected {
                digest,
                size,
                host: self.hosts.get(slot).id.clone(),
            });
            Role::Ingest
        };
        Ok(JoinResponse {
            role: role.into(),
            piece_size: task.piece_size,
        })
    }

    /// Announce: records the pieces (or the whole blob) the host verified,
    /// by the claim they fit (see [`claims`]): digests that conflict with
    /// other hosts' make another claim, and ban nobody. A complete blob
    /// clears its holder's ingester role (the ingest is over), and confirms
    /// the claim when its holder downloaded it.
    pub fn announce(
        &mut self,
        request: &AnnounceRequest,
        now: Instant,
    ) -> Result<AnnounceResponse, SchedulerError> {
        let slot = self.touch(&request.host_id, now)?;
        let blob = wire::blob(request.blob.as_ref())?;
        self.record_blob(slot, blob)?;
        Ok(AnnounceResponse {})
    }

    /// Schedule: a parent for each wanted piece that has an eligible one,
    /// rarest pieces first, at most [`MAX_ASSIGNMENTS`] (or
    /// [`MAX_ASSIGNMENTS_WHILE_OTHERS_WAIT`]); or, when the task has lost its
    /// ingester and a wanted piece exists nowhere, `take_over` for the one
    /// downloader that holds the most contiguous bytes.
    pub fn schedule(
        &mut self,
        request: &ScheduleRequest,
        now: Instant,
    ) -> Result<ScheduleResponse, SchedulerError> {
        let slot = self.touch(&request.host_id, now)?;
        let digest = wire::digest(&request.digest)?;
        let task_id = *self
            .task_ids
            .get(&digest)
            .ok_or(SchedulerError::UnknownTask(digest))?;
        let task = &self.tasks[&task_id];
        let contiguous = wire::size(request.contiguous, "contiguous offset")?;
        if contiguous > task.size {
            return Err(SchedulerError::InvalidArgument(format!(
                "contiguous offset {contiguous} past the end of a blob of {} bytes",
                task.size
            )));
        }
        let wanted = wire::piece_numbers(&request.wanted, task.piece_count())?;
        self.enroll(task_id, slot)?;
        let recovering = self.recovering(now);

        let Self {
            hosts,
            tasks,
            events,
            ..
        } = self;
        let task = tasks.get_mut(&task_id).expect("task just found");
        if task.ingester != Some(slot) {
            task.set_downloading(slot, contiguous);
        }
        let mut response = ScheduleResponse {
            total_pieces: task.piece_count(),
            ..Default::default()
        };
        if task.members[&slot].discredited {
            response.discard = true;
            return Ok(response);
        }
        let may_ingest = !recovering && !hosts.get(slot).supernode;
        if may_ingest && task.should_take_over(slot, contiguous, &wanted) {
            task.ingester = Some(slot);
            task.stop_downloading(slot);
            events.push(Event::TakeOver {
                digest: task.digest.clone(),
                host: hosts.get(slot).id.clone(),
                contiguous,
            });
            response.take_over = true;
        } else {
            let mut limit = if task.others_wait(slot) {
                MAX_ASSIGNMENTS_WHILE_OTHERS_WAIT
            } else {
                MAX_ASSIGNMENTS
            };
            if request.max_assignments > 0 {
                limit = limit.min(request.max_assignments as usize);
            }
            let servable = wanted
                .iter()
                .any(|&n| task.pieces[n as usize].holder_count > 0);
            response.assignments = assign(hosts, task, slot, wanted, limit, now);
            // A downloader starved by busy parents, not by pieces nobody has.
            let downloading = task.ingester != Some(slot);
            let starved = response.assignments.is_empty();
            response.parents_busy = downloading && servable && starved;
            task.set_waiting(slot, response.parents_busy);
        }
        Ok(response)
    }

    /// Report: each outcome frees its upload slot. A bad digest drops the
    /// parent for the reporter at once, and bans it from the task for
    /// everyone once [`BAD_DIGEST_REPORTERS`] hosts reported one;
    /// [`FAILURES_TO_DROP`] failures drop the parent for this reporter only;
    /// a bad blob refutes the reporter's claim (see [`Self::blob_refuted`]).
    /// Reports on a task that no longer exists are accepted and ignored.
    pub fn report(
        &mut self,
        request: &ReportRequest,
        now: Instant,
    ) -> Result<ReportResponse, SchedulerError> {
        let slot = self.touch(&request.host_id, now)?;
        let digest = wire::digest(&request.digest)?;
        let results = request
            .results
            .iter()
            .map(|r| {
                Ok((
                    r.number,
                    wire::host_id(&r.parent_id)?,
                    wire::outcome(r.outcome)?,
                ))
            })
            .collect::<Result<Vec<_>, SchedulerError>>()?;
        let Some(&task_id) = self.task_ids.get(&digest) else {
            return Ok(ReportResponse {});
        };
        let count = self.tasks[&task_id].piece_count();
        for &(number, _, _) in &results {
            wire::check_piece(number, count)?;
        }
        self.enroll(task_id, slot)?;
        if results.iter().any(|&(_, _, o)| o == Outcome::BadBlob) {
            self.blob_refuted(task_id, slot);
        }
        let reporter = self.hosts.reference(slot);
        for (number, parent_id, outcome) in results {
            let Some(parent) = self.hosts.slot_of(parent_id) else {
                continue; // Expired: its uploads went with it.
            };
            let assigned = self.hosts.finish_upload(parent, task_id, reporter, number);
            if assigned {
                let task = self.tasks.get_mut(&task_id).expect("live task");
                task.pieces[number as usize].transfer_ended();
            }
            match outcome {
                Outcome::BadDigest if self.tasks[&task_id].holds(parent, number) => {
                    self.bad_digest_reported(task_id, slot, parent, number);
                }
                Outcome::Failed => self.count_failure(task_id, slot, parent),
                // The reporter verified the assigned piece and serves it
                // from now on: counting it as a holder at once (its Announce
                // follows a moment later) keeps the piece from being sent
                // again meanwhile by the parent, often the ingester.
                Outcome::Ok if assigned => {
                    let task = self.tasks.get_mut(&task_id).expect("live task");
                    if task.follows_with_digest(slot, number) {
                        task.add_piece(slot, number);
                    }
                }
                _ => {}
            }
        }
        self.tidy(task_id, slot);
        Ok(ReportResponse {})
    }

    /// Leave: the host stops downloading or ingesting the blob. A daemon
    /// leaves only a blob it did not commit, and then stops serving it, so
    /// the pieces it announced are no longer offered (peers sent there would
    /// get 404 and stall). A host that announced the whole blob keeps it
    /// offered: it serves it from its store; one that deleted it says so by
    /// registering again (Register replaces what a host holds).
    pub fn leave(
        &mut self,
        request: &LeaveRequest,
        now: Instant,
    ) -> Result<LeaveResponse, SchedulerError> {
        let slot = self.touch(&request.host_id, now)?;
        let digest = wire::digest(&request.digest)?;
        let Some(&task_id) = self.task_ids.get(&digest) else {
            return Ok(LeaveResponse {});
        };
        let task = self.tasks.get_mut(&task_id).expect("task just found");
        task.stop_downloading(slot);
        if task.members.get(&slot).is_some_and(|m| !m.complete) {
            task.drop_holdings(slot);
        }
        if task.ingester == Some(slot) {
            task.ingester = None;
            self.events.push(Event::IngesterGone {
                digest,
                host: self.hosts.get(slot).id.clone(),
                why: "left",
            });
        }
        self.tidy(task_id, slot);
        Ok(LeaveResponse {})
    }

    /// Drops the hosts silent for [`MISSED_HEARTBEATS`] intervals (with their
    /// pieces, uploads and ingester roles) and frees upload slots whose
    /// assignment is older than [`ASSIGNMENT_TIMEOUT`] or whose downloader is
    /// gone. Call it about once per heartbeat interval.
    pub fn expire(&mut self, now: Instant) {
        let silence = self.config.heartbeat_interval * MISSED_HEARTBEATS;
        for slot in self.hosts.silent(now, silence) {
            self.remove_host(slot);
        }
        let ended = self.hosts.sweep_uploads(now);
        self.uploads_ended(ended);
    }

    /// Whether `now` is inside the recovery window (see
    /// [`SchedulerConfig::recovery`]).
    fn recovering(&mut self, now: Instant) -> bool {
        let started = *self.started.get_or_insert(now);
        now < started + self.config.recovery
    }

    /// The slot of registered host `id`, marked alive at `now`: any request
    /// from a host shows it is alive.
    fn touch(&mut self, id: &str, now: Instant) -> Result<u32, SchedulerError> {
        let id = wire::host_id(id)?;
        let slot = self
            .hosts
            .slot_of(id)
            .ok_or_else(|| SchedulerError::UnknownHost(id.to_owned()))?;
        self.hosts.get_mut(slot).last_seen = now;
        Ok(slot)
    }

    /// The task of `digest`, created if new; its size must be `size` (the
    /// first to name a digest sets its size).
    fn task_for(&mut self, digest: &Digest, size: u64) -> Result<TaskId, SchedulerError> {
        if let Some(&id) = self.task_ids.get(digest) {
            let known = self.tasks[&id].size;
            if known != size {
                return Err(SchedulerError::InvalidArgument(format!(
                    "{digest} is a blob of {known} bytes, not {size}"
                )));
            }
            return Ok(id);
        }
        let id = self.next_task_id;
        self.next_task_id += 1;
        self.tasks.insert(id, Task::new(id, digest.clone(), size));
        self.task_ids.insert(digest.clone(), id);
        Ok(id)
    }

    /// Makes the host a member of the task (idempotent), unless it is a
    /// member of [`MAX_TASKS_PER_HOST`] others already.
    fn enroll(&mut self, task_id: TaskId, slot: u32) -> Result<(), SchedulerError> {
        let host = self.hosts.get_mut(slot);
        if !host.tasks.contains(&task_id) && host.tasks.len() >= MAX_TASKS_PER_HOST {
            return Err(SchedulerError::InvalidArgument(format!(
                "host {:?} is in {MAX_TASKS_PER_HOST} tasks already",
                host.id
            )));
        }
        host.tasks.insert(task_id);
        let task = self.tasks.get_mut(&task_id).expect("live task");
        task.members.entry(slot).or_default();
        Ok(())
    }

    /// [`Self::enroll`]; on refusal, a task just created for it is dropped.
    fn enroll_or_tidy(&mut self, task_id: TaskId, slot: u32) -> Result<(), SchedulerError> {
        self.enroll(task_id, slot)
            .inspect_err(|_| self.tidy(task_id, slot))
    }

    /// Removes the host from the task if nothing ties it to it any more, and
    /// the task if nothing is left of it.
    fn tidy(&mut self, task_id: TaskId, slot: u32) {
        let task = self.tasks.get_mut(&task_id).expect("live task");
        let idle = task.members.get(&slot).is_some_and(Member::is_idle);
        if idle && task.ingester != Some(slot) {
            task.drop_holdings(slot); // Only the claim it follows is left.
            task.members.remove(&slot);
            self.hosts.get_mut(slot).tasks.remove(&task_id);
        }
        if task.members.is_empty() {
            let task = self.tasks.remove(&task_id).expect("live task");
            self.task_ids.remove(&task.digest);
        }
    }

    /// Forgets every piece the host announced (roles stay).
    fn forget_holdings(&mut self, slot: u32) {
        let task_ids: Vec<TaskId> = self.hosts.get(slot).tasks.iter().copied().collect();
        for task_id in task_ids {
            self.tasks
                .get_mut(&task_id)
                .expect("member of a live task")
                .drop_holdings(slot);
            self.tidy(task_id, slot);
        }
    }

    /// Records what the host holds of one blob (Register, Announce).
    fn record_blob(&mut self, slot: u32, blob: Blob) -> Result<(), SchedulerError> {
        let task_id = self.task_for(&blob.digest, blob.size)?;
        self.enroll_or_tidy(task_id, slot)?;
        let result = self.apply_blob(task_id, slot, blob);
        self.tidy(task_id, slot);
        result
    }

    /// The checks and updates of [`Self::record_blob`] on an existing task.
    /// The pieces go to the host's claim if they fit it, else to the claim
    /// they fit (the host's other pieces are forgotten: a host follows one).
    fn apply_blob(&mut self, task_id: TaskId, slot: u32, blob: Blob) -> Result<(), SchedulerError> {
        let task = self.tasks.get_mut(&task_id).expect("live task");
        let member = &task.members[&slot];
        if member.banned || member.discredited {
            return Ok(()); // Its pieces are not offered any more.
        }
        let ingester = task.ingester == Some(slot) || blob.ingesting;
        let current = member
            .claim
            .filter(|&c| task.claims.fits(c, slot, ingester, &blob.pieces));
        // None: a new claim (or none at all, for no pieces).
        let target = current.or_else(|| task.claims.find(&blob.pieces));
        if blob.complete
            && let Some(number) = task
                .claims
                .missing(target, &blob.pieces, task.piece_count())
        {
            return Err(SchedulerError::InvalidArgument(format!(
                "{}: complete, but no digest known for piece {number}",
                blob.digest
            )));
        }
        let claim = match (current, target) {
            (Some(claim), _) => claim,
            _ if blob.pieces.is_empty() => return Ok(()),
            (None, target) => {
                task.drop_holdings(slot);
                target.unwrap_or_else(|| task.claims.create(task.pieces.len()))
            }
        };
        task.follow(slot, claim, &blob.pieces);
        for &(number, _) in &blob.pieces {
            task.add_piece(slot, number);
        }
        if blob.complete {
            let downloaded = task.members[&slot].downloading.is_some();
            let claim = task.claims.get_mut(claim).expect("live claim");
            if downloaded && !claim.authors.contains(slot) {
                claim.confirmed = true;
            }
            task.mark_complete(slot);
        }
        // A host that holds the blob whole ingests it no more: an
        // announcement sent while it ingested may arrive after the one that
        // said complete, and must not make it the ingester again (the repo
        // never copies from the ingester, so its last pieces would wait for
        // it forever).
        if blob.ingesting && task.ingester.is_none() && !task.members[&slot].complete {
            task.ingester = Some(slot);
            task.stop_downloading(slot);
        }
        Ok(())
    }

    /// `reporter` assembled the blob from the pieces it got by its claim and
    /// the blob failed its digest; it discarded them. The claim no longer
    /// feeds it. An unconfirmed claim is refuted for everyone: its authors
    /// (who published the digests) are banned from the task, and its other
    /// followers, who hold its pieces too, are told to discard them (Schedule
    /// answers `discard`) and are not heard on the blob until they report
    /// the bad blob themselves. A confirmed claim (a downloader committed a
    /// blob by it) is not refuted by one host's word.
    fn blob_refuted(&mut self, task_id: TaskId, reporter: u32) {
        let task = self.tasks.get_mut(&task_id).expect("live task");
        let member = task.members.get_mut(&reporter).expect("enrolled reporter");
        member.discredited = false;
        let Some(id) = member.claim else {
            task.drop_holdings(reporter);
            return;
        };
        if member.rejected.len() == MAX_REJECTED_CLAIMS {
            member.rejected.remove(0);
        }
        member.rejected.push(id);
        task.drop_holdings(reporter);
        let refuted = task.claims.get(id).is_some_and(|claim| !claim.confirmed);
        let Some(claim) = refuted.then(|| task.claims.remove(id)).flatten() else {
            return;
        };
        for slot in claim.members.iter() {
            task.drop_holdings(slot);
            let member = task.members.get_mut(&slot).expect("a follower is a member");
            member.discredited = true;
        }
        let why = format!(
            "its piece digests do not make up the blob (refuted by {})",
            self.hosts.get(reporter).id
        );
        for author in claim.authors.iter() {
            self.ban(task_id, author, why.clone());
        }
    }

    /// Drops the host from the task as a source: its pieces are no longer
    /// offered, later announcements are ignored, it cannot ingest.
    fn ban(&mut self, task_id: TaskId, slot: u32, why: String) {
        let host = self.hosts.get(slot).id.clone();
        let task = self.tasks.get_mut(&task_id).expect("live task");
        task.ban(slot);
        if task.ingester == Some(slot) {
            task.ingester = None;
            self.events.push(Event::IngesterGone {
                digest: task.digest.clone(),
                host: host.clone(),
                why: "banned",
            });
        }
        self.events.push(Event::BadParent {
            digest: task.digest.clone(),
            parent: host,
            why,
        });
    }

    /// `reporter` received piece `number` from `parent` with a wrong digest:
    /// it stops getting that parent, and the parent is banned from the task
    /// when [`BAD_DIGEST_REPORTERS`] live hosts said so.
    fn bad_digest_reported(&mut self, task_id: TaskId, reporter: u32, parent: u32, number: u32) {
        let reporter_ref = self.hosts.reference(reporter);
        let parent_ref = self.hosts.reference(parent);
        let task = self.tasks.get_mut(&task_id).expect("live task");
        let member = task.members.get_mut(&reporter).expect("enrolled reporter");
        if !member.bad_parents.contains(&parent_ref) {
            member.bad_parents.push(parent_ref);
        }
        let accused = task.members.get_mut(&parent).expect("a holder is a member");
        if !accused.accusers.contains(&reporter_ref) {
            accused.accusers.push(reporter_ref);
        }
        let hosts = &self.hosts;
        accused.accusers.retain(|&r| hosts.is_live(r));
        if accused.accusers.len() >= BAD_DIGEST_REPORTERS {
            let why = format!(
                "{} hosts received pieces with a wrong digest (the last: piece {number} by {})",
                accused.accusers.len(),
                hosts.get(reporter).id
            );
            self.ban(task_id, parent, why);
        }
    }

    /// Counts a failed transfer from `parent` to `reporter`; at
    /// [`FAILURES_TO_DROP`] the reporter stops getting that parent.
    fn count_failure(&mut self, task_id: TaskId, reporter: u32, parent: u32) {
        let parent_ref = self.hosts.reference(parent);
        let task = self.tasks.get_mut(&task_id).expect("live task");
        let member = task.members.get_mut(&reporter).expect("enrolled reporter");
        let failures = match member.failures.iter_mut().find(|(p, _)| *p == parent_ref) {
            Some((_, count)) => {
                *count += 1;
                *count
            }
            None => {
                member.failures.push((parent_ref, 1));
                1
            }
        };
        if failures == FAILURES_TO_DROP {
            member.bad_parents.push(parent_ref);
            self.events.push(Event::ParentDropped {
                digest: task.digest.clone(),
                parent: self.hosts.get(parent).id.clone(),
                reporter: self.hosts.get(reporter).id.clone(),
            });
        }
    }

    /// Drops an expired host and everything it held or did.
    fn remove_host(&mut self, slot: u32) {
        let mut host = self.hosts.remove(slot);
        self.events.push(Event::HostExpired {
            host: host.id.clone(),
        });
        self.uploads_ended(std::mem::take(&mut host.uploads));
        for task_id in host.tasks {
            let task = self.tasks.get_mut(&task_id).expect("member of a live task");
            if task.ingester == Some(slot) {
                self.events.push(Event::IngesterGone {
                    digest: task.digest.clone(),
                    host: host.id.clone(),
                    why: "expired",
                });
            }
            task.remove_member(slot);
            if task.members.is_empty() {
                let task = self.tasks.remove(&task_id).expect("live task");
                self.task_ids.remove(&task.digest);
            }
        }
    }

    /// Uploads that will not be reported any more: their pieces are no
    /// longer on their way.
    fn uploads_ended(&mut self, uploads: impl IntoIterator<Item = Upload>) {
        for upload in uploads {
            if let Some(task) = self.tasks.get_mut(&upload.task) {
                task.pieces[upload.piece as usize].transfer_ended();
            }
        }
    }
}

/// Picks parents for at most `limit` of the caller's wanted pieces, rarest
/// first, among the followers of one claim (the caller's, or the one
/// [`Claims::choose`] picks, which the caller then follows), and counts each
/// assignment as an upload in flight for its parent.
fn assign(
    hosts: &mut Hosts,
    task: &mut Task,
    caller: u32,
    mut wanted: Vec<u32>,
    limit: usize,
    now: Instant,
) -> Vec<Assignment> {
    wanted.retain(|&n| task.pieces[n as usize].holder_count > 0);
    wanted.sort_unstable_by_key(|&n| (task.pieces[n as usize].rarity(), n));
    let downloader = hosts.reference(caller);
    let member = &task.members[&caller];
    let mut assignments = Vec::new();
    let pieces = &task.pieces;
    let serves = |claim: &claims::Claim| {
        wanted.iter().any(|&n| {
            let holders = &pieces[n as usize].holders;
            claim.digest(n).is_some() && holders.next_common(&claim.members, 0, |_| true).is_some()
        })
    };
    let chosen = task
        .claims
        .choose(member.claim, &member.pieces, &member.rejected, serves);
    let Some(claim_id) = chosen else {
        return assignments;
    };
    let claim = task.claims.get(claim_id).expect("a followed claim is live");
    let mut eligible = hosts.eligible_parents(caller, &member.bad_parents);
    eligible.intersect_with(&claim.members);
    // The ingester's uplink is kept for the pieces only it holds: a piece
    // someone else has is fetched from them.
    let mut beside_ingester = eligible.clone();
    if let Some(ingester) = task.ingester {
        beside_ingester.remove(ingester);
    }
    // The repo copies in the background: only from idle hosts, never the
    // ingester.
    let background = hosts.get(caller).supernode;
    if background {
        beside_ingester.intersect_with(hosts.idle());
        eligible = beside_ingester.clone();
    }
    if eligible.is_empty() {
        return assignments;
    }
    for number in wanted {
        if assignments.len() == limit {
            break;
        }
        let piece = &mut task.pieces[number as usize];
        let Some(digest) = claim.digest(number) else {
            continue;
        };
        if piece.in_flight >= piece.holder_count {
            continue;
        }
        let only_ingester =
            task.ingester.is_some_and(|i| piece.holders.contains(i)) && piece.holder_count == 1;
        let parents = if only_ingester {
            &eligible
        } else {
            &beside_ingester
        };
        let Some(parent) = hosts.least_loaded(&piece.holders, piece.cursor, parents) else {
            continue;
        };
        piece.cursor = parent + 1;
        piece.in_flight += 1;
        hosts.update_load(parent, |host| {
            host.uploads.push(Upload {
                task: task.id,
                downloader,
                piece: number,
                deadline: now + ASSIGNMENT_TIMEOUT,
            })
        });
        let parent_host = hosts.get(parent);
        assignments.push(Assignment {
            number,
            piece_digest: digest.to_string(),
            parent: Some(Parent {
                host_id: parent_host.id.clone(),
                addr: parent_host.addr.clone(),
                supernode: parent_host.supernode,
            }),
        });
        if background || hosts.at_cap(parent) {
            eligible.remove(parent);
            beside_ingester.remove(parent);
            if eligible.is_empty() {
                break;
            }
        }
    }
    if !assignments.is_empty() && member.claim != Some(claim_id) {
        // What it holds agrees with the new claim: it keeps its pieces.
        if let Some(old) = member.claim {
            task.claims.leave(old, caller);
        }
        task.follow(caller, claim_id, &[]);
    }
    assignments
}

/// Tasks are numbered, never reusing a number, so that a stale upload of a
/// deleted task can never match a new task of the same blob.
type TaskId = u64;

/// One incarnation of a host slot: stays valid only while the host that had
/// the slot when it was taken is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostRef {
    slot: u32,
    generation: u32,
}

/// A registered daemon.
struct Host {
    id: String,
    /// The IP it registered from (that of its piece server).
    ip: IpAddr,
    /// `ip:port` of its piece server.
    addr: String,
    /// A supernode's seeding peer: never an ingester.
    supernode: bool,
    last_seen: Instant,
    /// Uploads it said (Heartbeat) it serves.
    reported_uploads: u32,
    /// Assignments to it not yet reported or timed out.
    uploads: Vec<Upload>,
    /// Tasks it is a member of.
    tasks: HashSet<TaskId>,
}

impl Host {
    /// Its load: the assignments in flight, or the uploads it reported if
    /// more (the report includes those assignments, so the two are not added).
    fn load(&self) -> u32 {
        (self.uploads.len() as u32).max(self.reported_uploads)
    }
}

/// An assignment in flight: `downloader` fetches `piece` of `task`.
struct Upload {
    task: TaskId,
    downloader: HostRef,
    piece: u32,
    deadline: Instant,
}

/// All hosts, in reusable slots, indexed by id and by load.
struct Hosts {
    slots: Vec<Option<Host>>,
    /// Bumped when a slot is vacated: see [`HostRef`].
    generations: Vec<u32>,
    free: Vec<u32>,
    by_id: HashMap<String, u32>,
    /// `by_load[l]`: the hosts whose load is `l`, for every `l` below the cap.
    by_load: Vec<Bits>,
    /// The hosts at a loopback address: parents only for each other (they
    /// run on the supernode's machine, and no other host can reach them).
    loopback: Bits,
}

impl Hosts {
    fn new(upload_cap: u32) -> Self {
        Self {
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            by_load: vec![Bits::default(); upload_cap as usize],
            loopback: Bits::default(),
        }
    }

    fn slot_of(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    fn get(&self, slot: u32) -> &Host {
        self.slots[slot as usize].as_ref().expect("live host slot")
    }

    fn get_mut(&mut self, slot: u32) -> &mut Host {
        self.slots[slot as usize].as_mut().expect("live host slot")
    }

    fn reference(&self, slot: u32) -> HostRef {
        HostRef {
            slot,
            generation: self.generations[slot as usize],
        }
    }

    /// Whether the host `host` was taken from is still alive.
    fn is_live(&self, host: HostRef) -> bool {
        self.generations[host.slot as usize] == host.generation
    }

    /// Updates a registered host's address, or adds a new host.
    fn upsert(&mut self, info: HostInfo, now: Instant) -> u32 {
        if let Some(slot) = self.slot_of(&info.id) {
            self.set_loopback(slot, info.ip);
            let host = self.get_mut(slot);
            host.ip = info.ip;
            host.addr = info.addr;
            host.supernode = info.supernode;
            host.last_seen = now;
            return slot;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.generations.push(0);
            (self.slots.len() - 1) as u32
        });
        self.by_id.insert(info.id.clone(), slot);
        self.by_load[0].insert(slot);
        self.set_loopback(slot, info.ip);
        self.slots[slot as usize] = Some(Host {
            id: info.id,
            ip: info.ip,
            addr: info.addr,
            supernode: info.supernode,
            last_seen: now,
            reported_uploads: 0,
            uploads: Vec::new(),
            tasks: HashSet::new(),
        });
        slot
    }

    fn set_loopback(&mut self, slot: u32, ip: IpAddr) {
        if ip.is_loopback() {
            self.loopback.insert(slot);
        } else {
            self.loopback.remove(slot);
        }
    }

    /// Vacates a slot; every [`HostRef`] to it goes stale.
    fn remove(&mut self, slot: u32) -> Host {
        let host = self.slots[slot as usize].take().expect("live host slot");
        self.loopback.remove(slot);
        self.by_id.remove(&host.id);
        relevel(&mut self.by_load, slot, host.load(), u32::MAX);
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        self.free.push(slot);
        host
    }

    /// Applies `change` to a host and files it under its new load.
    fn update_load(&mut self, slot: u32, change: impl FnOnce(&mut Host)) {
        let host = self.slots[slot as usize].as_mut().expect("live host slot");
        let before = host.load();
        change(host);
        let after = host.load();
        relevel(&mut self.by_load, slot, before, after);
    }

    /// Frees the upload slot of an assignment; false if it was not in flight
    /// (any more).
    fn finish_upload(
        &mut self,
        parent: u32,
        task: TaskId,
        downloader: HostRef,
        piece: u32,
    ) -> bool {
        let mut found = false;
        self.update_load(parent, |host| {
            let index = host
                .uploads
                .iter()
                .position(|u| u.task == task && u.downloader == downloader && u.piece == piece);
            if let Some(index) = index {
                host.uploads.swap_remove(index);
                found = true;
            }
        });
        found
    }

    fn at_cap(&self, slot: u32) -> bool {
        self.get(slot).load() as usize >= self.by_load.len()
    }

    /// The hosts `caller` may get as parents: below the upload cap, neither
    /// itself nor one of its `bad_parents`, and at a loopback address only
    /// for a caller at one. (A parent at the caller's own IP registered from
    /// that IP: it is a daemon on the caller's machine.)
    fn eligible_parents(&self, caller: u32, bad_parents: &[HostRef]) -> Bits {
        let mut eligible = Bits::default();
        for level in &self.by_load {
            eligible.union_with(level);
        }
        eligible.remove(caller);
        if !self.loopback.contains(caller) {
            for slot in self.loopback.iter() {
                eligible.remove(slot);
            }
        }
        for &bad in bad_parents {
            if self.is_live(bad) {
                eligible.remove(bad.slot);
            }
        }
        eligible
    }

    /// The hosts that serve no upload now.
    fn idle(&self) -> &Bits {
        &self.by_load[0]
    }

    /// The least-loaded `eligible` holder, the first from `start` on
    /// (round-robin) among equally loaded ones. One pass over the words finds
    /// whether there is any (most often there is none, or it is idle); only
    /// then are the load levels below its load searched.
    fn least_loaded(&self, holders: &Bits, start: u32, eligible: &Bits) -> Option<u32> {
        let first = holders.next_common(eligible, start, |_| true)?;
        let lower_levels = &self.by_load[..self.get(first).load() as usize];
        let lower = lower_levels
            .iter()
            .find_map(|level| holders.next_common(level, start, |slot| eligible.contains(slot)));
        Some(lower.unwrap_or(first))
    }

    /// Hosts not heard from for longer than `silence`.
    fn silent(&self, now: Instant, silence: Duration) -> Vec<u32> {
        let is_silent = |host: &Host| now.saturating_duration_since(host.last_seen) > silence;
        (0..self.slots.len() as u32)
            .filter(|&slot| self.slots[slot as usize].as_ref().is_some_and(is_silent))
            .collect()
    }

    /// Frees the uploads past their deadline or whose downloader is gone,
    /// and returns them.
    fn sweep_uploads(&mut self, now: Instant) -> Vec<Upload> {
        let Self {
            slots,
            generations,
            by_load,
            ..
        } = self;
        let live = |host: HostRef| generations[host.slot as usize] == host.generation;
        let mut ended = Vec::new();
        for (slot, host) in slots.iter_mut().enumerate() {
            let Some(host) = host else { continue };
            let before = host.load();
            ended.extend(
                host.uploads
                    .extract_if(.., |u| u.deadline <= now || !live(u.downloader)),
            );
            relevel(by_load, slot as u32, before, host.load());
        }
        ended
    }
}

/// Moves `slot` from load level `before` to `after` (levels at or above the
/// cap are not indexed).
fn relevel(by_load: &mut [Bits], slot: u32, before: u32, after: u32) {
    if before == after {
        return;
    }
    if let Some(level) = by_load.get_mut(before as usize) {
        level.remove(slot);
    }
    if let Some(level) = by_load.get_mut(after as usize) {
        level.insert(slot);
    }
}

/// One blob and who holds, downloads or ingests it.
struct Task {
    id: TaskId,
    digest: Digest,
    size: u64,
    piece_size: u64,
    pieces: Vec<PieceState>,
    /// The accounts of the piece digests its holders gave.
    claims: Claims,
    /// Hosts holding, downloading, ingesting or banned from the blob.
    members: HashMap<u32, Member>,
    ingester: Option<u32>,
    /// Members holding the whole blob.
    complete_holders: u32,
    /// Downloaders (not banned) by the contiguous bytes they last reported:
    /// the last one is who takes over.
    downloaders: BTreeSet<(u64, u32)>,
    /// Downloaders whose last Schedule call got nothing although some
    /// wanted piece had holders: all of them were busy.
    waiting: u32,
}

/// One piece of a task.
#[derive(Default)]
struct PieceState {
    /// The hosts holding it, whatever claim they follow.
    holders: Bits,
    holder_count: u32,
    /// Transfers of it assigned and not reported or timed out yet.
    in_flight: u32,
    /// Where the next search for a parent starts (round-robin).
    cursor: u32,
}

impl PieceState {
    /// How common the piece is: its holders, plus the hosts it is on its way
    /// to (so that callers in a row do not all get the same rare piece).
    fn rarity(&self) -> u32 {
        self.holder_count + self.in_flight
    }

    fn transfer_ended(&mut self) {
        debug_assert!(self.in_flight > 0, "more transfers ended than started");
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

/// One host's part in a task.
#[derive(Default)]
struct Member {
    pieces: Bits,
    complete: bool,
    /// While it downloads the blob: the contiguous bytes it last reported.
    downloading: Option<u64>,
    /// Served or announced a corrupt piece: dropped as a source.
    banned: bool,
    /// Downloads, and its last Schedule call got nothing although some
    /// wanted piece had holders.
    waiting: bool,
    /// Parents it does not get any more (failed too often, or sent it a
    /// piece with a wrong digest).
    bad_parents: Vec<HostRef>,
    /// Hosts that reported a wrong digest from it.
    accusers: Vec<HostRef>,
    /// Failed transfers from each parent.
    failures: Vec<(HostRef, u32)>,
    /// The claim its pieces follow (see [`claims`]).
    claim: Option<ClaimId>,
    /// Claims it refuted (its blob by them failed): they do not feed it.
    rejected: Vec<ClaimId>,
    /// It holds pieces of a claim refuted by another host: until it reports
    /// its own bad blob, it gets no parents and its announcements are
    /// ignored.
    discredited: bool,
}

impl Member {
    /// Nothing ties the host to the task (the ingester role aside).
    fn is_idle(&self) -> bool {
        !self.complete
            && !self.banned
            && !self.discredited
            && self.downloading.is_none()
            && self.pieces.is_empty()
    }
}

impl Task {
    fn new(id: TaskId, digest: Digest, size: u64) -> Self {
        let piece_size = piece_size(size);
        let count = piece_count(size, piece_size) as usize;
        Self {
            id,
            digest,
            size,
            piece_size,
            pieces: (0..count).map(|_| PieceState::default()).collect(),
            claims: Claims::default(),
            members: HashMap::new(),
            ingester: None,
            complete_holders: 0,
            downloaders: BTreeSet::new(),
            waiting: 0,
        }
    }

    fn piece_count(&self) -> u32 {
        self.pieces.len() as u32
    }

    fn holds(&self, slot: u32, number: u32) -> bool {
        self.pieces[number as usize].holders.contains(slot)
    }

    /// Whether another host holds or ingests some of the blob.
    fn others_hold_pieces(&self, slot: u32) -> bool {
        let own = &self.members[&slot];
        self.complete_holders > u32::from(own.complete)
            || (0..self.piece_count())
                .any(|n| self.pieces[n as usize].holder_count > u32::from(own.pieces.contains(n)))
    }

    /// Whether the caller must take over ingesting: no ingester, the blob
    /// complete nowhere, a wanted piece held by nobody, and no other
    /// downloader holding more contiguous bytes.
    fn should_take_over(&self, slot: u32, contiguous: u64, wanted: &[u32]) -> bool {
        self.ingester.is_none()
            && self.complete_holders == 0
            && !self.members[&slot].banned
            && wanted
                .iter()
                .any(|&n| self.pieces[n as usize].holder_count == 0)
            && self
                .downloaders
                .last()
                .is_none_or(|&(best, _)| best <= contiguous)
    }

    /// Records that the member holds piece `number`.
    fn add_piece(&mut self, slot: u32, number: u32) {
        let member = self.members.get_mut(&slot).expect("member");
        if member.pieces.insert(number) {
            let piece = &mut self.pieces[number as usize];
            piece.holders.insert(slot);
            piece.holder_count += 1;
        }
    }

    /// Records that the member holds the whole blob: it no longer downloads
    /// it, and no longer ingests it.
    fn mark_complete(&mut self, slot: u32) {
        for number in 0..self.piece_count() {
            self.add_piece(slot, number);
        }
        let member = self.members.get_mut(&slot).expect("member");
        if !std::mem::replace(&mut member.complete, true) {
            self.complete_holders += 1;
        }
        self.stop_downloading(slot);
        if self.ingester == Some(slot) {
            self.ingester = None;
        }
    }

    /// Whether the member follows a claim that has piece `number`'s digest
    /// (a piece it holds must have one).
    fn follows_with_digest(&self, slot: u32, number: u32) -> bool {
        let claim = self.members[&slot].claim.and_then(|c| self.claims.get(c));
        claim.is_some_and(|claim| claim.digest(number).is_some())
    }

    /// Records that the member follows `claim` and holds `pieces` by it.
    fn follow(&mut self, slot: u32, claim: ClaimId, pieces: &[(u32, Digest)]) {
        self.claims.record(claim, slot, pieces);
        self.members.get_mut(&slot).expect("member").claim = Some(claim);
    }

    /// Forgets the pieces the member holds, and the claim it follows.
    fn drop_holdings(&mut self, slot: u32) {
        let Some(member) = self.members.get_mut(&slot) else {
            return;
        };
        if let Some(claim) = member.claim.take() {
            self.claims.leave(claim, slot);
        }
        for number in member.pieces.iter() {
            let piece = &mut self.pieces[number as usize];
            piece.holders.remove(slot);
            piece.holder_count -= 1;
        }
        member.pieces = Bits::default();
        if std::mem::take(&mut member.complete) {
            self.complete_holders -= 1;
        }
    }

    fn set_downloading(&mut self, slot: u32, contiguous: u64) {
        let member = self.members.get_mut(&slot).expect("member");
        if let Some(old) = member.downloading.replace(contiguous) {
            self.downloaders.remove(&(old, slot));
        }
        if !member.banned {
            self.downloaders.insert((contiguous, slot));
        }
    }

    fn stop_downloading(&mut self, slot: u32) {
        let Some(member) = self.members.get_mut(&slot) else {
            return;
        };
        if let Some(old) = member.downloading.take() {
            self.downloaders.remove(&(old, slot));
        }
        self.set_waiting(slot, false);
    }

    /// Whether downloaders other than `slot` wait with nothing.
    fn others_wait(&self, slot: u32) -> bool {
        self.waiting > u32::from(self.members[&slot].waiting)
    }

    /// Records whether the member waits (see [`Task::waiting`]).
    fn set_waiting(&mut self, slot: u32, waiting: bool) {
        let member = self.members.get_mut(&slot).expect("member");
        if std::mem::replace(&mut member.waiting, waiting) != waiting {
            if waiting {
                self.waiting += 1;
            } else {
                self.waiting -= 1;
            }
        }
    }

    /// Drops the member as a source (it may still download).
    fn ban(&mut self, slot: u32) {
        self.drop_holdings(slot);
        let member = self.members.get_mut(&slot).expect("member");
        member.banned = true;
        if let Some(contiguous) = member.downloading {
            self.downloaders.remove(&(contiguous, slot));
        }
    }

    /// Drops the member with everything it held or did.
    fn remove_member(&mut self, slot: u32) {
        self.drop_holdings(slot);
        self.stop_downloading(slot);
        if self.ingester == Some(slot) {
            self.ingester = None;
        }
        self.members.remove(&slot);
    }
}

#[cfg(test)]
mod tests;

mod claims;
