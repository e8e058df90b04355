//! `dfget pull IMAGE`: asks containerd's CRI image service to pull an image,
//! as kubelet (and `crictl pull`) do, then reports what damselfly did for
//! it: how many layers dfdaemon unpacked itself and where their bytes came
//! from, or why containerd's own path was taken.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};

use super::stats::Counters;

/// What to pull, and where containerd and dfdaemon listen.
pub struct PullOptions {
    pub image: String,
    pub containerd_socket: PathBuf,
    pub metrics_url: String,
}

/// What a pull did.
pub struct PullReport {
    pub image: String,
    pub image_ref: String,
    pub elapsed: Duration,
    pub layers_by_source: Vec<(String, f64)>,
    /// Uncompressed tar bytes dfdaemon unpacked.
    pub tar_bytes: f64,
    pub declined_by_reason: Vec<(String, f64)>,
    pub bytes_by_source: Vec<(String, f64)>,
}

/// Pulls `options.image` through CRI and measures what dfdaemon did.
pub async fn pull(options: &PullOptions) -> anyhow::Result<PullReport> {
    let before = Counters::fetch(&options.metrics_url).await?;
    let channel = containerd_client::connect(&options.containerd_socket)
        .await
        .with_context(|| {
            format!(
                "connect to containerd at {}",
                options.containerd_socket.display()
            )
        })?;
    let mut cri = ImageServiceClient::new(channel);
    let spinner = ProgressBar::new_spinner().with_message(format!("pulling {}", options.image));
    spinner
        .set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("template"));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let pulled = cri
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: options.image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CRI PullImage {}", options.image));
    let elapsed = started.elapsed();
    spinner.finish_and_clear();
    let image_ref = pulled?.into_inner().image_ref;
    let after = Counters::fetch(&options.metrics_url).await?;
    Ok(PullReport {
        image: options.image.clone(),
        image_ref,
        elapsed,
        layers_by_source: after.growth(&before, "damselfly_dfdaemon_unpacked_layers_total"),
        tar_bytes: after
            .growth(&before, "damselfly_dfdaemon_unpacked_tar_bytes_total")
            .iter()
            .map(|(_, bytes)| bytes)
            .sum(),
        declined_by_reason: after.growth(&before, "damselfly_dfdaemon_fast_path_declined_total"),
        bytes_by_source: after.growth(&before, "damselfly_dfdaemon_received_bytes_total"),
    })
}

const MIB: f64 = (1u64 << 20) as f64;

/// Where bytes came from, in words: dfdaemon's metrics label them `store`,
/// `peers` (`peer`), `registry` and `supernode`.
fn source_words(source: &str) -> &str {
    match source {
        "store" => "dfdaemon's store (already there)",
        "peers" | "peer" => "peers in the mesh",
        "registry" => "the registry",
        "supernode" => "the supernode's repo",
        other => other,
    }
}

impl std::fmt::Display for PullReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "pulled {} in {seconds:.2} s (image ID {})",
            self.image, self.image_ref
        )?;
        let unpacked: f64 = self.layers_by_source.iter().map(|(_, n)| n).sum();
        if unpacked > 0.0 {
            let sources: Vec<String> = self
                .layers_by_source
                .iter()
                .map(|(source, n)| format!("{n} from {}", source_words(source)))
                .collect();
            writeln!(
                f,
                "  dfdaemon fetched and unpacked {unpacked} layers itself: {}",
                sources.join(", ")
            )?;
            writeln!(
                f,
                "  it wrote {:.1} MiB of files from their tars, {:.0} MB/s over the pull",
                self.tar_bytes / MIB,
                self.tar_bytes / 1e6 / seconds.max(1e-9)
            )?;
        } else {
            writeln!(
                f,
                "  dfdaemon unpacked no layer (already unpacked, or containerd's own path)"
            )?;
        }
        for (reason, n) in &self.declined_by_reason {
            writeln!(
                f,
                "  {n} layer(s) went containerd's own way (fetched and applied by containerd): {reason}"
            )?;
        }
        for (source, bytes) in &self.bytes_by_source {
            writeln!(
                f,
                "  {:.1} MiB of blobs came from {}",
                bytes / MIB,
                source_words(source)
            )?;
        }
        Ok(())
    }
}
