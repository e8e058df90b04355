//! The supernode's gRPC service: each RPC of proto/mesh.proto runs the
//! scheduler under a short lock, then logs what happened and counts it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
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
}

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
        }
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
        answer(self.run(|s, now| s.register(&request, now)))
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
        answer(self.run(|s, now| s.join(&request, now)))
    }

    async fn announce(
        &self,
        request: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let request = request.into_inner();
        answer(self.run(|s, now| s.announce(&request, now)))
    }

    async fn schedule(
        &self,
        request: Request<ScheduleRequest>,
    ) -> Result<Response<ScheduleResponse>, Status> {
        let request = request.into_inner();
        let response = self.run(|s, now| s.schedule(&request, now));
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
        answer(self.run(|s, now| s.report(&request, now)))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let request = request.into_inner();
        answer(self.run(|s, now| s.leave(&request, now)))
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
}
