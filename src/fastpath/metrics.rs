//! The fast path's Prometheus metrics: layers dfdaemon unpacked itself (by
//! where their bytes came from), the tar bytes it wrote, Prepares that went
//! containerd's ordinary way (by reason), and jobs stopped because their
//! pull was cancelled.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
pub struct FastPathStats {
    layers: Family<Labels, Counter>,
    tar_bytes: Counter,
    declined: Family<Labels, Counter>,
    cancelled: Counter,
}

impl FastPathStats {
    /// A layer was unpacked and committed; its bytes came from `origin`.
    pub fn unpacked(&self, origin: &str, tar_bytes: u64) {
        self.layers
            .get_or_create(&vec![("source", origin.to_owned())])
            .inc();
        self.tar_bytes.inc_by(tar_bytes);
    }

    /// A Prepare went the ordinary way for a reason of this kind.
    pub fn declined(&self, kind: &'static str) {
        self.declined
            .get_or_create(&vec![("reason", kind.to_owned())])
            .inc();
    }

    /// An image's job was stopped: no pull waited for it any more.
    pub fn cancelled(&self) {
        self.cancelled.inc();
    }

    /// Layers unpacked so far from `origin` (for tests and the demo).
    pub fn layers_from(&self, origin: &str) -> u64 {
        self.layers
            .get_or_create(&vec![("source", origin.to_owned())])
            .get()
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "dfdaemon_unpacked_layers",
            "Layers dfdaemon fetched and unpacked itself (snapshotter fast path), by where their bytes came from",
            self.layers.clone(),
        );
        registry.register(
            "dfdaemon_unpacked_tar_bytes",
            "Uncompressed tar bytes dfdaemon unpacked on the fast path",
            self.tar_bytes.clone(),
        );
        registry.register(
            "dfdaemon_fast_path_declined",
            "Remote-snapshot Prepares that went containerd's ordinary way, by reason",
            self.declined.clone(),
        );
        registry.register(
            "dfdaemon_fast_path_cancelled",
            "Fast-path image jobs stopped before their end because no pull waited for them any more",
            self.cancelled.clone(),
        );
    }
}
