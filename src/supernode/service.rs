//! The supernode's gRPC service: each RPC of proto/mesh.proto runs the
//! scheduler under a short lock, then logs what happened and counts it.

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
        let request = request.into_inner();
        let result = self.run(|s, now| s.register(&request, now));
        self.changed();
        answer(result)
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let request = request.into_inner();
        answer(self.run(|s, now| s.heartbeat(&request, now)))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let request = request.into_inner();
        let result = self.run(|s, now| s.join(&request, now));
        self.changed();
        answer(result)
    }

    async fn announce(
        &self,
        request: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let request = request.into_inner();
        let result = self.run(|s, now| s.announce(&request, now));
        self.changed();
        answer(result)
    }

    async fn schedule(
        &self,
        request: Request<ScheduleRequest>,
    ) -> Result<Response<ScheduleResponse>, Status> {
        let request = request.into_inner();
        let wait = Duration::from_millis(request.wait_ms.into()).min(MAX_SCHEDULE_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = self.shared.changed.subscribe();
        let response = loop {
            changed.mark_unchanged();
            let response = self.run(|s, now| s.schedule(&request, now));
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
        let request = request.into_inner();
        let result = self.run(|s, now| s.report(&request, now));
        self.changed();
        answer(result)
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let request = request.into_inner();
        let result = self.run(|s, now| s.leave(&request, now));
        self.changed();
        answer(result)
    }
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

    fn service() -> SupernodeService {
        SupernodeService::new(
            SchedulerConfig::default(),
            SupernodeMetrics::default(),
            None,
        )
    }

    fn join(host_id: &str, digest: &str) -> Request<JoinRequest> {
        Request::new(JoinRequest {
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
        service.register(Request::new(register)).await.unwrap();
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
            meaning(service.schedule(Request::new(schedule)).await),
            Refusal::TaskLost
        );
        service.join(join("a", &digest)).await.unwrap();
    }

    fn register(id: &str) -> Request<RegisterRequest> {
        Request::new(RegisterRequest {
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
                let answer = service.schedule(Request::new(request)).await.unwrap();
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
        service.announce(Request::new(announce)).await.unwrap();
        let (answer, waited) = waiting.await.unwrap();
        assert_eq!(answer.assignments.len(), 1, "{answer:?}");
        assert!(waited < Duration::from_millis(1500), "held for {waited:?}");
    }
}
