//! Applies one layer blob to a directory and prints the rate, to measure the
//! layer applier against `tar -x`: `apply_layer BLOB none|gzip|zstd ROOT`.

use std::time::Instant;

use damselfly::unpack::{Compression, Whiteouts, apply_layer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, blob, compression, root] = &args[..] else {
        anyhow::bail!("usage: apply_layer BLOB none|gzip|zstd ROOT");
    };
    let compression = match compression.as_str() {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "zstd" => Compression::Zstd,
        other => anyhow::bail!("unknown compression {other}"),
    };
    std::fs::create_dir_all(root)?;
    let start = Instant::now();
    let applied = apply_layer(
        std::fs::File::open(blob)?,
        compression,
        root.as_ref(),
        &[],
        Whiteouts::Overlay,
    )?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} entries, {} tar bytes in {secs:.2}s: {:.0} MB/s, diff_id {}",
        applied.entries,
        applied.tar_bytes,
        applied.tar_bytes as f64 / secs / 1e6,
        applied.diff_id.as_str()
    );
    Ok(())
}
