//! The supernode's Prometheus metrics (`damselfly_supernode_*`), fed from the
//! scheduler's answers and [`Event`]s; served by [`crate::metrics::serve`].

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::scheduler::Event;

/// Handles on the supernode's metrics (cheap to clone, shared atomics).
#[derive(Debug, Clone, Default)]
pub struct SupernodeMetrics {
    hosts: Gauge,
    tasks: Gauge,
    schedule_requests: Counter,
    assignments: Counter,
    ingesters_elected: Counter,
    take_overs: Counter,
    bad_parents: Counter,
    expirations: Counter,
}

impl SupernodeMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix("damselfly_supernode");
        registry.register("hosts", "Registered live hosts", metrics.hosts.clone());
        registry.register(
            "tasks",
            "Blobs some live host holds, downloads or ingests",
            metrics.tasks.clone(),
        );
        registry.register(
            "schedule_requests",
            "Schedule calls answered",
            metrics.schedule_requests.clone(),
        );
        registry.register(
            "assignments",
            "Pieces assigned a parent",
            metrics.assignments.clone(),
        );
        registry.register(
            "ingesters_elected",
            "Hosts told to fetch a new blob from the registry",
            metrics.ingesters_elected.clone(),
        );
        registry.register(
            "take_overs",
            "Downloaders elected to resume a blob whose ingester was lost",
            metrics.take_overs.clone(),
        );
        registry.register(
            "bad_parents",
            "Parents dropped for corrupt pieces or repeated failures",
            metrics.bad_parents.clone(),
        );
        registry.register(
            "expirations",
            "Hosts dropped for missing their heartbeats",
            metrics.expirations.clone(),
        );
        metrics
    }

    /// Sets the gauges to the scheduler's current sizes.
    pub(crate) fn set_sizes(&self, hosts: usize, tasks: usize) {
        self.hosts.set(hosts as i64);
        self.tasks.set(tasks as i64);
    }

    /// Counts one answered Schedule call and its assignments.
    pub(crate) fn scheduled(&self, assignments: usize) {
        self.schedule_requests.inc();
        self.assignments.inc_by(assignments as u64);
    }

    /// Counts what an event says happened.
    pub(crate) fn record(&self, event: &Event) {
        let counter = match event {
            Event::IngesterElected { .. } => &self.ingesters_elected,
            Event::TakeOver { .. } => &self.take_overs,
            Event::BadParent { .. } | Event::ParentDropped { .. } => &self.bad_parents,
            Event::HostExpired { .. } => &self.expirations,
            Event::IngesterGone { .. } | Event::BlobRejected { .. } => return,
        };
        counter.inc();
    }
}
