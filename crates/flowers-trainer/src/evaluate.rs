//! `trainer evaluate`: a checkpoint's accuracy on images of an archive (e.g. the official test
//! split), with the loader's own preprocessing.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use flowers_dataset::{ClassNames, Labels, SetIds, SetName};
use flowers_model::read_checkpoint_meta;
use flowers_preprocess::{preprocess_archive, PreprocessOptions};
use tch::Device;
use tracing::{info, warn};

use crate::batch::BatchView;
use crate::device::Precision;
use crate::metrics::EvalTally;
use crate::state::{ModelOptions, TrainState};
use crate::TrainError;

#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    pub checkpoint: PathBuf,
    /// `102flowers.tgz` (or a tar/tgz with `jpg/image_NNNNN.jpg` members).
    pub data: PathBuf,
    pub labels: PathBuf,
    /// `setid.mat` and the split to take from it; `None`: every image of the archive.
    pub split: Option<(PathBuf, SetName)>,
    /// Class names for the report (`cat_to_name.json`).
    pub class_names: Option<PathBuf>,
    pub img_size: u32,
    pub batch_size: usize,
    pub threads: usize,
    /// Where the preprocessed pixel store goes (large: images x img_size^2 x 3 bytes).
    pub cache_dir: PathBuf,
    pub device: Device,
    pub precision: Precision,
}

/// `test`, `valid` or `train` (or setid.mat's own names `tstid`, `trnid`).
pub fn parse_split(s: &str) -> Result<SetName, TrainError> {
    match s {
        "test" => Ok(SetName::Tstid),
        "train" => Ok(SetName::Trnid),
        other => other.parse().map_err(TrainError::Usage),
    }
}

/// The finished evaluation and its printable report.
#[derive(Debug)]
pub struct Evaluation {
    pub tally: EvalTally,
    pub report: String,
}

/// Preprocesses the archive, runs the checkpoint over the chosen images and reports top-1,
/// top-5, per-class accuracy and the most confused pairs; the report's last line is
/// `accuracy=<top-1>`.
pub fn evaluate(opts: &EvaluateOptions) -> Result<Evaluation, TrainError> {
    // First the cheap checks of every input file, then the slow preprocessing.
    let meta = read_checkpoint_meta(&opts.checkpoint)?;
    let labels = Labels::from_mat_file(&opts.labels)?;
    let names = opts
        .class_names
        .as_deref()
        .map(ClassNames::from_json_file)
        .transpose()?;
    let wanted: Option<std::collections::HashSet<u32>> = match &opts.split {
        Some((setid, set)) => Some(
            SetIds::from_mat_file(setid)?
                .get(*set)
                .iter()
                .copied()
                .collect(),
        ),
        None => None,
    };
    std::fs::create_dir_all(&opts.cache_dir).map_err(|e| TrainError::io(&opts.cache_dir, e))?;
    let pre = preprocess_archive(
        &opts.data,
        &labels,
        &PreprocessOptions {
            img_size: opts.img_size,
            threads: opts.threads,
            ..PreprocessOptions::default()
        },
        &opts.cache_dir,
    )?;
    for s in &pre.skipped {
        warn!(file = %s.file_name, reason = %s.reason, "image skipped");
    }
    let images: Vec<_> = pre
        .images
        .iter()
        .filter(|i| wanted.as_ref().is_none_or(|w| w.contains(&i.number)))
        .collect();
    if let Some(w) = &wanted {
        if images.len() < w.len() {
            warn!(
                found = images.len(),
                listed = w.len(),
                archive = %opts.data.display(),
                "the archive lacks some images of the split"
            );
        }
    }
    if images.is_empty() {
        return Err(TrainError::NoImages {
            archive: opts.data.clone(),
            split: opts.split.as_ref().map(|s| s.1),
        });
    }

    if meta.img_size > 0 && meta.img_size != i64::from(opts.img_size) {
        warn!(
            trained = meta.img_size,
            evaluating = opts.img_size,
            "evaluating at another image size than trained"
        );
    }
    let optimizer = meta
        .optimizer
        .as_deref()
        .unwrap_or("adamax")
        .parse()
        .map_err(TrainError::Model)?;
    let model_opts = ModelOptions {
        device: opts.device,
        precision: opts.precision,
        num_classes: meta.num_classes,
        variant: meta.variant,
        label_smoothing: 0.0,
        dropout: 0.5,
        flip: false,
        optimizer,
        trunk_cache_bytes: 0,
    };
    let mut state = TrainState::resume(model_opts, 1.0, &opts.checkpoint)?;

    let started = Instant::now();
    let mut tally = EvalTally::new(meta.num_classes as usize);
    let image_bytes = pre.store.image_bytes();
    let size = i64::from(opts.img_size);
    let mut pixels = Vec::new();
    for chunk in images.chunks(opts.batch_size.max(1)) {
        pixels.resize(chunk.len() * image_bytes, 0);
        for (img, out) in chunk.iter().zip(pixels.chunks_exact_mut(image_bytes)) {
            pre.store.copy_into(img.number, out)?;
        }
        let batch_labels: Vec<u32> = chunk.iter().map(|i| i.label).collect();
        let view = BatchView {
            pixels: &pixels,
            shape: [chunk.len() as i64, size, size, 3],
            labels: &batch_labels,
            names: None,
        };
        state.evaluate(view, &mut tally)?;
    }
    info!(
        images = tally.images(),
        seconds = started.elapsed().as_secs_f64(),
        "evaluated"
    );
    let report = report(&tally, names.as_ref());
    Ok(Evaluation { tally, report })
}

fn class_name(names: Option<&ClassNames>, class: usize) -> String {
    match names.and_then(|n| n.name(class as u32)) {
        Some(name) => format!("{} ({name})", class + 1),
        None => format!("{}", class + 1),
    }
}

/// The printable report of a tally; classes are shown 1-based as in `imagelabels.mat`.
pub fn report(tally: &EvalTally, names: Option<&ClassNames>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "images={}", tally.images());
    let _ = writeln!(out, "top1={:.4}", tally.top1());
    let _ = writeln!(out, "top5={:.4}", tally.top5());
    let _ = writeln!(out, "mean_loss={:.4}", tally.mean_loss());
    let _ = writeln!(
        out,
        "per-class accuracy (label, correct/total, accuracy), worst first:"
    );
    let mut per_class = tally.per_class();
    per_class.sort_by(|a, b| {
        let (ra, rb) = (a.1 as f64 / a.2 as f64, b.1 as f64 / b.2 as f64);
        ra.total_cmp(&rb).then(a.0.cmp(&b.0))
    });
    for (class, correct, total) in per_class {
        let _ = writeln!(
            out,
            "  {}: {correct}/{total} {:.3}",
            class_name(names, class),
            correct as f64 / total as f64
        );
    }
    let _ = writeln!(out, "most confused (true -> predicted: images):");
    for pair in tally.most_confused(10) {
        let _ = writeln!(
            out,
            "  {} -> {}: {}",
            class_name(names, pair.actual),
            class_name(names, pair.predicted),
            pair.count
        );
    }
    let _ = write!(out, "accuracy={:.4}", tally.top1());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_ends_with_accuracy_and_lists_confusions() {
        let mut t = EvalTally::new(3);
        t.add(0, &[0, 1, 2], 0.1);
        t.add(1, &[2, 1, 0], 0.9);
        t.add(1, &[1, 2, 0], 0.2);
        let r = report(&t, None);
        assert!(r.ends_with("accuracy=0.6667"), "{r}");
        assert!(r.contains("top5=1.0000"));
        assert!(r.contains("  2 -> 3: 1"), "{r}");
        assert!(r.contains("  2: 1/2 0.500"), "{r}");
    }
}
