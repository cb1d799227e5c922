//! `flowersctl predict`: the most likely flowers in JPEG images under a trained checkpoint.
//!
//! Images go through the training pipeline's own code: `flowers_preprocess::preprocess_files`
//! (decode, centre square crop, bilinear resize: what the loader publishes) and then
//! `flowers_model::Classifier` (the trainer's `to_model_input` without the random flip, and the
//! model). A checkpoint is a trainer's or a coordinator average (what `--run` and `flowersctl
//! download` get; see `flowers_model::CheckpointKind`): an average holds only the synced tensors,
//! the rest comes from `--weights`, and its image size from the run's config (`--run`) or
//! `--img-size`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{ArgGroup, Args};
use flowers_coordinator_client::CoordinatorClient;
use flowers_dataset::ClassNames;
use flowers_model::{CheckpointKind, Classifier, DeviceChoice};
use flowers_preprocess::preprocess_files;
use strum::{EnumMessage, IntoEnumIterator};

/// `cat_to_name.json` of Oxford 102 Flowers (1-based class -> name).
const BUNDLED_CLASS_NAMES: &str = include_str!("../cat_to_name.json");
/// Where `just weights` writes the pretrained backbone.
const DEFAULT_WEIGHTS: &str = "weights/inception_v3_tf2015.safetensors";

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("model").required(true).args(["checkpoint", "run"])))]
pub struct PredictArgs {
    /// JPEG images.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// A checkpoint file: a trainer's, or a coordinator average (`flowersctl download`).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Use this run's best checkpoint (the latest while none is validated), from the coordinator.
    #[arg(long)]
    run: Option<String>,
    /// Pretrained weights under an averaged checkpoint, which holds only the synced tensors:
    /// the run's `--weights` (made by `just weights`).
    #[arg(long, env = "FLOWERS_WEIGHTS", default_value = DEFAULT_WEIGHTS)]
    weights: PathBuf,
    /// Class names as in `cat_to_name.json` (default: the bundled Oxford 102 names).
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// Image side in pixels (default: the size the checkpoint was trained at).
    #[arg(long)]
    img_size: Option<u32>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Where the model runs.
    #[arg(long, default_value = "auto", value_parser = device_values())]
    device: DeviceChoice,
    /// One JSON array: per image its path and top classes (1-based class, name, probability).
    #[arg(long)]
    json: bool,
}

/// `--device`'s names and their help, as [`DeviceChoice`] has them.
fn device_values() -> impl TypedValueParser<Value = DeviceChoice> {
    let values = DeviceChoice::iter()
        .map(|choice| PossibleValue::new(<&'static str>::from(choice)).help(choice.get_message()));
    PossibleValuesParser::new(values).map(|name| {
        name.parse::<DeviceChoice>()
            .expect("every possible value is a DeviceChoice")
    })
}

/// The `k` most likely classes `(0-based class, probability)`, most likely first (ties: lower
/// class first).
fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(k);
    ranked
}

fn class_names(path: Option<&Path>) -> anyhow::Result<ClassNames> {
    Ok(match path {
        Some(p) => ClassNames::from_json_file(p)?,
        None => {
            ClassNames::from_json_str(BUNDLED_CLASS_NAMES, Path::new("bundled cat_to_name.json"))?
        }
    })
}

/// The checkpoint file to use; a downloaded one lives as long as the returned temp file.
struct Resolved {
    path: PathBuf,
    _download: Option<tempfile::NamedTempFile>,
    /// From the run's config, when `--run` named one.
    run_img_size: Option<u32>,
    run_num_classes: Option<u32>,
}

async fn resolve(client: &CoordinatorClient, args: &PredictArgs) -> anyhow::Result<Resolved> {
    if let Some(path) = &args.checkpoint {
        return Ok(Resolved {
            path: path.clone(),
            _download: None,
            run_img_size: None,
            run_num_classes: None,
        });
    }
    let run = args.run.as_deref().context("--checkpoint or --run")?;
    let status = client.get_run(run, false).await?;
    let config = status.config.unwrap_or_default();
    let (info, bytes) = client.get_checkpoint(run, None).await?;
    let file = tempfile::Builder::new()
        .prefix("flowers-predict-")
        .suffix(".safetensors")
        .tempfile()
        .context("creating a temporary file for the checkpoint")?;
    std::fs::write(file.path(), &bytes)
        .with_context(|| format!("writing {}", file.path().display()))?;
    tracing::info!(
        run, checkpoint = %info.checkpoint_id, epoch = info.epoch + 1,
        val_accuracy = info.val_accuracy, best = info.best, "downloaded checkpoint"
    );
    Ok(Resolved {
        path: file.path().to_path_buf(),
        _download: Some(file),
        run_img_size: (config.img_size > 0).then_some(config.img_size),
        run_num_classes: (config.num_classes > 0).then_some(config.num_classes),
    })
}

pub async fn predict(client: &CoordinatorClient, args: PredictArgs) -> anyhow::Result<()> {
    ensure!(args.top > 0, "--top must be at least 1");
    let names = class_names(args.class_names.as_deref())?;
    let resolved = resolve(client, &args).await?;
    let path = resolved.path.as_path();
    // Size first (headers only), so that a bad image fails before the slow model load.
    let kind = CheckpointKind::of(path)?;
    let trained_size = match &kind {
        // 0: the trainer saved before it saw a batch, so it did not know the size.
        CheckpointKind::Trainer(meta) => u32::try_from(meta.img_size).ok().filter(|&s| s > 0),
        CheckpointKind::Average { img_size } => img_size.or(resolved.run_img_size),
    };
    let img_size = match (args.img_size, trained_size) {
        (Some(0), _) => bail!("--img-size must be positive"),
        (Some(given), Some(trained)) if given != trained => {
            tracing::warn!(
                trained,
                given,
                "predicting at another image size than trained"
            );
            given
        }
        (Some(given), _) => given,
        (None, Some(trained)) => trained,
        (None, None) => bail!(
            "{}: the checkpoint does not record its image size; pass --img-size (the run's, \
             see `flowersctl status RUN`)",
            path.display()
        ),
    };
    let pixels = preprocess_files(&args.images, img_size)?;

    let device = args.device.resolve()?;
    let model = match kind {
        CheckpointKind::Trainer(meta) => Classifier::from_checkpoint(path, &meta, device)?,
        CheckpointKind::Average { .. } => Classifier::from_average(
            path,
            &args.weights,
            resolved.run_num_classes.map(i64::from),
            device,
        )
        .with_context(|| {
            format!(
                "{} is an averaged checkpoint (only the tensors workers sync); the rest comes \
                 from --weights {}, which must be the run's pretrained weights (`just weights`)",
                path.display(),
                args.weights.display()
            )
        })?,
    };
    let num_classes = model.num_classes() as usize;
    if names.len() != num_classes {
        tracing::warn!(
            names = names.len(),
            num_classes,
            "the class names do not match the model's class count"
        );
    }
    let probs = model.probabilities(&pixels, img_size)?;
    let results: Vec<(&PathBuf, Vec<(usize, f32)>)> = args
        .images
        .iter()
        .zip(&probs)
        .map(|(image, p)| (image, top_k(p, args.top)))
        .collect();
    if args.json {
        print!("{}", render_json(&results, &names)?);
    } else {
        print!("{}", render_text(&results, &names));
    }
    Ok(())
}

fn class_name(names: &ClassNames, class: usize) -> String {
    names
        .name(class as u32)
        .map_or_else(|| format!("class {}", class + 1), str::to_string)
}

/// Per image: its path, then one line per class: probability, name and 1-based class number.
fn render_text(results: &[(&PathBuf, Vec<(usize, f32)>)], names: &ClassNames) -> String {
    let mut out = String::new();
    for (image, top) in results {
        out.push_str(&format!("{}\n", image.display()));
        for &(class, p) in top {
            out.push_str(&format!(
                "  {p:.4}  {} ({})\n",
                class_name(names, class),
                class + 1
            ));
        }
    }
    out
}

fn render_json(
    results: &[(&PathBuf, Vec<(usize, f32)>)],
    names: &ClassNames,
) -> anyhow::Result<String> {
    let value: Vec<serde_json::Value> = results
        .iter()
        .map(|(image, top)| {
            serde_json::json!({
                "image": image.display().to_string(),
                "top": top.iter().map(|&(class, p)| serde_json::json!({
                    "class": class + 1,
                    "name": class_name(names, class),
                    "probability": p,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(serde_json::to_string_pretty(&value)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowers_model::to_model_input;
    use tch::{Device, Tensor};

    fn jpeg(width: usize, height: usize) -> Vec<u8> {
        let rgb: Vec<u8> = (0..width * height * 3)
            .map(|i| ((i * 7) % 251) as u8)
            .collect();
        flowers_imaging::encode_rgb_jpeg(&rgb, width, height, 90).unwrap()
    }

    /// Predict must see exactly the pixels the loader publishes and the tensor the trainer
    /// feeds: the loader decodes with `JpegPreprocessor::preprocess_into`, the trainer scales
    /// with `to_model_input` (no flip at inference).
    #[test]
    fn input_is_the_training_pipelines() {
        let dir = tempfile::tempdir().unwrap();
        let (wide, tall) = (jpeg(120, 90), jpeg(64, 100));
        let paths = [dir.path().join("wide.jpg"), dir.path().join("tall.jpg")];
        std::fs::write(&paths[0], &wide).unwrap();
        std::fs::write(&paths[1], &tall).unwrap();

        let pixels = preprocess_files(&paths, 75).unwrap();
        let mut loader = flowers_imaging::JpegPreprocessor::new().unwrap();
        let mut want = vec![0u8; 2 * 75 * 75 * 3];
        let (a, b) = want.split_at_mut(75 * 75 * 3);
        loader.preprocess_into(&wide, 75, a).unwrap();
        loader.preprocess_into(&tall, 75, b).unwrap();
        assert_eq!(pixels, want);

        let batch = Tensor::from_slice(&want).view([2, 75, 75, 3]);
        let x = to_model_input(&batch, Device::Cpu, false).unwrap();
        assert_eq!(x.size(), [2, 3, 75, 75]);
        let first = f64::from(want[0]) / 127.5 - 1.0;
        assert!((x.double_value(&[0, 0, 0, 0]) - first).abs() < 1e-6);
    }

    #[test]
    fn top_k_is_sorted_and_truncated() {
        let probs = [0.1, 0.4, 0.05, 0.4, 0.05];
        assert_eq!(top_k(&probs, 3), [(1, 0.4), (3, 0.4), (0, 0.1)]);
        assert_eq!(top_k(&probs, 9).len(), 5);
    }

    #[test]
    fn bundled_names_are_the_102_flowers() {
        let names = class_names(None).unwrap();
        assert_eq!(names.len(), 102);
        assert_eq!(names.name(0), Some("pink primrose"));
        assert_eq!(names.name(101), Some("blackberry lily"));
        assert_eq!(class_name(&names, 102), "class 103");
    }
}
