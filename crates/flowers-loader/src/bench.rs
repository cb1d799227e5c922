//! Benchmarks behind `loader bench`.

use std::path::Path;
use std::time::Instant;

use flowers_dataset::Labels;
use flowers_preprocess::{run_pipeline, PreprocessError, PreprocessOptions};

/// Throughput of reading, decoding, cropping and resizing an archive.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeBenchReport {
    pub images: usize,
    pub skipped: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// Runs the archive through the same reading and decoding pipeline as
/// [`flowers_preprocess::preprocess_archive`], discarding the pixels instead of storing them.
pub fn decode_bench(
    archive: &Path,
    labels: &Labels,
    opts: &PreprocessOptions,
) -> Result<DecodeBenchReport, PreprocessError> {
    let start = Instant::now();
    let outcome = run_pipeline(archive, labels, opts, |_, pixels| {
        std::hint::black_box(pixels);
        Ok(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let images = outcome.decoded.len();
    Ok(DecodeBenchReport {
        images,
        skipped: outcome.skipped.len(),
        seconds,
        images_per_s: images as f64 / seconds,
    })
}
