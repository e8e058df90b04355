//! The Prometheus metrics of a mesh peer (dfdaemon's, and the supernode
//! repo's): read at scrape time from the counters the mesh keeps anyway (so
//! the hot paths only bump atomics).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Mesh;
use super::transfer::FailureKind;

/// Encodes the mesh's counters and gauges on each scrape.
pub struct MeshCollector {
    mesh: Arc<Mesh>,
    /// What the metric names start with: `dfdaemon` or `supernode_repo`.
    subsystem: &'static str,
}

impl MeshCollector {
    pub fn new(mesh: Arc<Mesh>, subsystem: &'static str) -> Self {
        Self { mesh, subsystem }
    }

    fn name(&self, metric: &str) -> String {
        format!("{}_{metric}", self.subsystem)
    }
}

impl fmt::Debug for MeshCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshCollector")
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One counter with one label taking several values.
fn labelled_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> fmt::Result {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (value, count) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*count).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

impl Collector for MeshCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = &self.mesh.stats;
        let uploads = &self.mesh.piece_server.stats;
        labelled_counter(
            &mut encoder,
            &self.name("received_bytes"),
            "Blob bytes written into this node's store, by where they came from",
            "source",
            &[
                ("registry", load(&stats.registry_bytes)),
                ("peer", load(&stats.peer_bytes)),
                ("supernode", load(&stats.supernode_bytes)),
            ],
        )?;
        counter(
            &mut encoder,
            &self.name("pieces_fetched"),
            "Pieces fetched from peers and verified",
            load(&stats.pieces_fetched),
        )?;
        counter(
            &mut encoder,
            &self.name("pieces_served"),
            "Pieces uploaded to peers",
            load(&uploads.pieces),
        )?;
        counter(
            &mut encoder,
            &self.name("served_bytes"),
            "Bytes uploaded to peers",
            load(&uploads.bytes),
        )?;
        labelled_counter(
            &mut encoder,
            &self.name("failures"),
            "Mesh failures by kind (each one falls back, never fails a pull)",
            "kind",
            &FailureKind::ALL
                .iter()
                .map(|&kind| (kind.label(), load(&stats.piece_failures[kind as usize])))
                .chain([
                    ("stall", load(&stats.stalls)),
                    ("supernode", load(&stats.supernode_failures)),
                    ("upload_busy", load(&uploads.rejected_busy)),
                ])
                .collect::<Vec<_>>(),
        )?;
        labelled_counter(
            &mut encoder,
            &self.name("piece_connections_refused"),
            "Piece-server connections closed at once, by the cap they were over",
            "cap",
            &[
                ("total", load(&uploads.refused_total)),
                ("per_peer", load(&uploads.refused_per_peer)),
            ],
        )?;
        labelled_counter(
            &mut encoder,
            &self.name("piece_timeouts"),
            "Piece-server connections cut, and upload slots given back, by what timed out",
            "kind",
            &[
                ("read", load(&uploads.read_timeouts)),
                ("write", load(&uploads.write_timeouts)),
                ("stalled_slot", load(&uploads.stalled_releases)),
            ],
        )?;
        counter(
            &mut encoder,
            &self.name("piece_accept_errors"),
            "Failed accepts of piece-server connections (e.g. out of file descriptors)",
            load(&uploads.accept_errors),
        )?;
        counter(
            &mut encoder,
            &self.name("piece_range_refused"),
            "Piece requests answered 416: their Range was not within the piece",
            load(&uploads.range_refused),
        )?;
        gauge(
            &mut encoder,
            &self.name("piece_connections"),
            "Piece-server connections open now",
            self.mesh.piece_server.connections_open() as i64,
        )?;
        gauge(
            &mut encoder,
            &self.name("active_tasks"),
            "Blobs this node is writing through the mesh",
            self.mesh.tasks.len() as i64,
        )?;
        gauge(
            &mut encoder,
            &self.name("upload_slots_in_use"),
            "Piece uploads running now",
            self.mesh.piece_server.uploads_in_use() as i64,
        )?;
        Ok(())
    }
}
