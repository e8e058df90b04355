//! The supernode's gRPC service: each RPC of proto/mesh.proto runs the
//! scheduler under a short lock, then logs what happened and counts it.
//! Every call speaks for a host, and is refused unless it comes from that
//! host's IP ([`Scheduler::check_caller`]); a Register is validated and
//! dropped before the lock is taken, so the lock never waits on a large
//! message.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use super::metrics::SupernodeMetrics;
use super::scheduler::{Event, Scheduler, SchedulerConfig, SchedulerError};
use crate::protocol::Digest;
use crate::protocol::api::supernode_server::Supernode;
use crate::protocol::api::{
    AnnounceRequest, AnnounceResponse, HeartbeatRequest, HeartbeatResponse, JoinRequest,
    JoinResponse, LeaveRequest, LeaveResponse, RegisterRequest, RegisterResponse, ReportRequest,
    ReportResponse, ScheduleRequest, ScheduleResponse,
};
use crate::protocol::status::Refusal;
use crate::protocol::wire;

/// The Supernode gRPC service over one shared [`Scheduler`]. Clones share it.
#[derive(Clone)]
pub struct SupernodeService {
    shared: Arc<Shared>,
}

struct Shared {
    config: SchedulerConfig,
    scheduler: Mutex<Scheduler>,
    metrics: SupernodeMetrics,
    /// Told of every blob that gets an ingester (the repo copies them).
    new_blobs: Option<mpsc::UnboundedSender<(Digest, u64)>>,
    /// Bumped by every call that may let a waiting Schedule assign
    /// something: long-polling Schedules wait on it.
    changed: watch::Sender<u64>,
}

/// Longest a Schedule call is held waiting for the task to change.
const MAX_SCHEDULE_WAIT: Duration = Duration::from_secs(2);

impl SupernodeService {
    /// A service with an empty scheduler, counting into `metrics`, and
    /// telling `new_blobs` of each blob the mesh starts fetching.
    pub fn new(
        config: SchedulerConfig,
        metrics: SupernodeMetrics,
        new_blobs: Option<mpsc::UnboundedSender<(Digest, u64)>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                scheduler: Mutex::new(Scheduler::new(config.clone())),
                config,
                metrics,
                new_blobs,
                changed: watch::Sender::new(0),
            }),
        }
    }

    /// Runs [`Scheduler::expire`] every `interval`, forever (spawn it, abort
    /// it on shutdown).
    pub async fn expire_periodically(self, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.run(|scheduler, now| scheduler.expire(now));
            self.changed();
        }
    }

    /// Wakes the long-polling Schedules to look again.
    fn changed(&self) {
        self.shared
            .changed
            .send_modify(|generation| *generation += 1);
    }

    /// Runs `call` on the scheduler at the current time, then (outside the
    /// lock) updates the gauges and logs and counts the events it raised.
    fn run<T>(&self, call: impl FnOnce(&mut Scheduler, Instant) -> T) -> T {
        let (result, events, hosts, tasks) = {
            let mut scheduler = self.lock();
            let result = call(&mut scheduler, Instant::now());
            let events = scheduler.take_events();
            (
                result,
                events,
                scheduler.host_count(),
                scheduler.task_count(),
            )
        };
        let metrics = &self.shared.metrics;
        metrics.set_sizes(hosts, tasks);
        for event in &events {
            metrics.record(event);
            log(event);
            if let (Some(new_blobs), Event::IngesterElected { digest, size, .. }) =
                (&self.shared.new_blobs, event)
            {
                let _ = new_blobs.send((digest.clone(), *size));
            }
        }
        result
    }

    /// [`Self::run`] for a call that speaks for `host_id`, refused unless
    /// the host is at `caller`'s IP.
    fn run_as<T>(
        &self,
        caller: IpAddr,
        host_id: &str,
        call: impl FnOnce(&mut Scheduler, Instant) -> Result<T, SchedulerError>,
    ) -> Result<T, SchedulerError> {
        self.run(|s, now| {
            s.check_caller(host_id, caller)?;
            call(s, now)
        })
    }

    fn lock(&self) -> MutexGuard<'_, Scheduler> {
        let shared = &self.shared;
        shared.scheduler.lock().unwrap_or_else(|poisoned| {
            // A panic mid-update may have left the state inconsistent. It is
            // soft: start over, and daemons register again when told to.
            tracing::error!("the scheduler panicked: its state is reset");
            let mut scheduler = poisoned.into_inner();
            *scheduler = Scheduler::new(shared.config.clone());
            shared.scheduler.clear_poison();
            scheduler
        })
    }
}

#[tonic::async_trait]
impl Supernode for SupernodeService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let caller = caller(&request)?;
        let registration =
            wire::registration(request.get_ref()).map_err(|e| Refusal::Invalid.status(e.0))?;
        drop(request);
        let result = self.run(|s, now| {
            s.check_registration(&registration.host, caller)?;
            s.register_valid(registration, now)
        });
        self.changed();
        answer(result)
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        answer(self.run_as(caller, &request.host_id, |s, now| {
            s.heartbeat(&request, now)
        }))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let result = self.run_as(caller, &request.host_id, |s, now| s.join(&request, now));
        self.changed();
        answer(result)
    }

    async fn announce(
        &self,
        request: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let result = self.run_as(caller, &request.host_id, |s, now| s.announce(&request, now));
        self.changed();
        answer(result)
    }

    async fn schedule(
        &self,
        request: Request<ScheduleRequest>,
    ) -> Result<Response<ScheduleResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let wait = Duration::from_millis(request.wait_ms.into()).min(MAX_SCHEDULE_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = self.shared.changed.subscribe();
        let response = loop {
            changed.mark_unchanged();
            let response =
                self.run_as(caller, &request.host_id, |s, now| s.schedule(&request, now));
            let idle = matches!(&response, Ok(r) if r.assignments.is_empty() && !r.take_over);
            if !idle
                || tokio::time::timeout_at(deadline, changed.changed())
                    .await
                    .is_err()
            {
                break response;
            }
        };
        if let Ok(response) = &response {
            self.shared.metrics.scheduled(response.assignments.len());
        }
        answer(response)
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let result = self.run_as(caller, &request.host_id, |s, now| s.report(&request, now));
        self.changed();
        answer(result)
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let result = self.run_as(caller, &request.host_id, |s, now| s.leave(&request, now));
        self.changed();
        answer(result)
    }
}

/// The IP a call came from (IPv4-mapped addresses as IPv4): without TLS,
/// the only identity a caller shows.
fn caller<T>(request: &Request<T>) -> Result<IpAddr, Status> {
    request
        .remote_addr()
        .map(|addr: SocketAddr| addr.ip().to_canonical())
        .ok_or_else(|| Refusal::Invalid.status("the caller's address is unknown"))
}

/// The gRPC answer for a scheduler result.
fn answer<T>(result: Result<T, SchedulerError>) -> Result<Response<T>, Status> {
    result
        .map(Response::new)
        .map_err(|error| error.refusal().status(error.to_string()))
}

/// One log line per event: how operators follow the mesh.
fn log(event: &Event) {
    match event {
        Event::IngesterElected { digest, host, .. } => {
            tracing::info!(%digest, %host, "ingester elected: fetches the blob from the registry")
        }
        Event::TakeOver {
            digest,
            host,
            contiguous,
        } => tracing::warn!(
            %digest, %host, contiguous,
            "take-over: ingester lost, host resumes the blob from the registry"
        ),
        Event::IngesterGone { digest, host, why } => {
            tracing::info!(%digest, %host, why, "ingester gone")
        }
        Event::HostExpired { host } => {
            tracing::warn!(%host, "host expired: missed its heartbeats; its pieces are dropped")
        }
        Event::BadParent {
            digest,
            parent,
            why,
        } => tracing::warn!(%digest, %parent, why, "bad parent dropped from the task"),
        Event::ParentDropped {
            digest,
            parent,
            reporter,
        } => tracing::info!(
            %digest, %parent, %reporter,
            "parent dropped for one downloader after repeated failures"
        ),
        Event::BlobRejected { digest, host, why } => {
            tracing::warn!(%digest, %host, why, "registered blob ignored")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::api::Host;
    use crate::protocol::status::Refusal;

    /// A request from 127.0.0.1, the address the test hosts register.
    fn local<T>(message: T) -> Request<T> {
        from("127.0.0.1", message)
    }

    fn from<T>(ip: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(SocketAddr::new(ip.parse().unwrap(), 40000)),
            });
        request
    }

    fn service() -> SupernodeService {
        SupernodeService::new(
            SchedulerConfig::default(),
            SupernodeMetrics::default(),
            None,
        )
    }

    fn join(host_id: &str, digest: &str) -> Request<JoinRequest> {
        local(JoinRequest {
            host_id: host_id.into(),
            digest: digest.into(),
            size: 1,
        })
    }

    /// What the caller makes of a failed answer.
    fn meaning<T>(result: Result<T, Status>) -> Refusal {
        Refusal::of(&result.map(|_| ()).unwrap_err())
    }

    #[tokio::test]
    async fn errors_reach_the_caller_with_their_meaning() {
        let service = service();
        let register = RegisterRequest {
            host: Some(Host {
                id: "a".into(),
                ip: "127.0.0.1".into(),
                upload_port: 1,
                supernode: false,
            }),
            blobs: vec![],
        };
        service.register(local(register)).await.unwrap();
        let digest = Digest::of(b"x").to_string();

        assert_eq!(
            meaning(service.join(join("a", "sha256:x")).await),
            Refusal::Invalid
        );
        assert_eq!(
            meaning(service.join(join("b", &digest)).await),
            Refusal::RegisterAgain
        );
        let schedule = ScheduleRequest {
            host_id: "a".into(),
            digest: digest.clone(),
            ..Default::default()
        };
        assert_eq!(
            meaning(service.schedule(local(schedule)).await),
            Refusal::TaskLost
        );
        service.join(join("a", &digest)).await.unwrap();
    }

    /// Calls for a host are refused from any address but the host's own, and
    /// so is a registration of a known id from another address.
    #[tokio::test]
    async fn no_call_speaks_for_a_host_from_another_address() {
        let service = service();
        service.register(register("a")).await.unwrap();
        let digest = Digest::of(b"x").to_string();
        let intruder = "10.9.9.9";
        let hijack = from(intruder, register("a").into_inner());
        assert_eq!(meaning(service.register(hijack).await), Refusal::Invalid);
        let mut elsewhere = register("b").into_inner();
        elsewhere.host.as_mut().unwrap().ip = intruder.into();
        assert_eq!(
            meaning(service.register(local(elsewhere)).await),
            Refusal::Invalid,
            "a host registered for another address"
        );
        let heartbeat = HeartbeatRequest {
            host_id: "a".into(),
            uploads_in_use: 0,
        };
        assert_eq!(
            meaning(service.heartbeat(from(intruder, heartbeat.clone())).await),
            Refusal::Invalid
        );
        let leave = LeaveRequest {
            host_id: "a".into(),
            digest: digest.clone(),
        };
        assert_eq!(
            meaning(service.leave(from(intruder, leave)).await),
            Refusal::Invalid
        );
        assert_eq!(
            meaning(
                service
                    .join(from(intruder, join("a", &digest).into_inner()))
                    .await
            ),
            Refusal::Invalid
        );
        let answer = service.heartbeat(local(heartbeat)).await.unwrap();
        assert!(!answer.into_inner().reregister, "the real host was dropped");
        assert!(
            service
                .register(Request::new(RegisterRequest::default()))
                .await
                .is_err()
        );
    }

    fn register(id: &str) -> Request<RegisterRequest> {
        local(RegisterRequest {
            host: Some(Host {
                id: id.into(),
                ip: "127.0.0.1".into(),
                upload_port: 1,
                supernode: false,
            }),
            blobs: vec![],
        })
    }

    /// A Schedule with nothing to assign is held until a piece is announced,
    /// then answers with it, well before its wait is over.
    #[tokio::test]
    async fn a_waiting_schedule_answers_when_a_piece_appears() {
        let service = service();
        let blob = vec![7u8; 100];
        let digest = Digest::of(&blob).to_string();
        let size = blob.len() as i64;
        for host in ["ingester", "downloader"] {
            service.register(register(host)).await.unwrap();
            let mut request = join(host, &digest);
            request.get_mut().size = size;
            service.join(request).await.unwrap();
        }
        let waiting = {
            let service = service.clone();
            let request = ScheduleRequest {
                host_id: "downloader".into(),
                digest: digest.clone(),
                wanted: vec![0],
                wait_ms: 2000,
                ..Default::default()
            };
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = service.schedule(local(request)).await.unwrap();
                (answer.into_inner(), started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "answered before anything could be assigned"
        );
        let announce = AnnounceRequest {
            host_id: "ingester".into(),
            blob: Some(crate::protocol::api::HeldBlob {
                digest: digest.clone(),
                size,
                piece_size: crate::protocol::piece::piece_size(size as u64),
                pieces: vec![crate::protocol::api::Piece {
                    number: 0,
                    digest: digest.clone(),
                }],
                complete: false,
                ingesting: true,
            }),
        };
        service.announce(local(announce)).await.unwrap();
        let (answer, waited) = waiting.await.unwrap();
        assert_eq!(answer.assignments.len(), 1, "{answer:?}");
        assert!(waited < Duration::from_millis(1500), "held for {waited:?}");
    }
}
