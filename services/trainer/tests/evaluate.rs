//! `trainer evaluate` on a generated archive: the report covers exactly the chosen split.

use std::process::Command;

use flowers_dataset::matwriter::{write_mat, MatVar};
use flowers_dataset::tarwriter::write_archive;
use flowers_model::{OptimizerKind, Policy, Variant};
use flowers_trainer::device::Precision;
use flowers_trainer::state::{ModelOptions, TrainState};

/// 12 JPEGs (image_00001..12), label of image k = (k - 1) % 3 + 1, one shade per class.
fn dataset(dir: &std::path::Path) {
    let mut members = Vec::new();
    for number in 1..=12u32 {
        let shade = ((number - 1) % 3 * 80) as u8;
        let img = image::RgbImage::from_fn(40 + number, 36, |x, y| {
            image::Rgb([shade, shade.wrapping_add((x * 3) as u8), (y * 5) as u8])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&img)
            .unwrap();
        members.push((format!("jpg/image_{number:05}.jpg"), jpeg));
    }
    let refs: Vec<(&str, &[u8])> = members
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    write_archive(&dir.join("102flowers.tgz"), &refs, true).unwrap();
    let labels: Vec<f64> = (1..=12).map(|k| f64::from((k - 1) % 3 + 1)).collect();
    write_mat(
        &dir.join("imagelabels.mat"),
        &[MatVar::row("labels", &labels)],
    )
    .unwrap();
    let ids = |r: std::ops::RangeInclusive<u32>| r.map(f64::from).collect::<Vec<_>>();
    let (trn, val, tst) = (ids(1..=4), ids(5..=8), ids(9..=12));
    write_mat(
        &dir.join("setid.mat"),
        &[
            MatVar::row("trnid", &trn),
            MatVar::row("valid", &val),
            MatVar::row("tstid", &tst),
        ],
    )
    .unwrap();
}

#[test]
fn evaluate_reports_the_test_split_and_ends_with_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let opts = ModelOptions {
        device: tch::Device::Cpu,
        precision: Precision::Fp32,
        num_classes: 3,
        variant: Variant::Torchvision,
        label_smoothing: 0.0,
        dropout: 0.5,
        flip: false,
        optimizer: OptimizerKind::adamax(),
        trunk_cache_bytes: 0,
    };
    let checkpoint = dir.path().join("c.safetensors");
    TrainState::new(opts, Policy::Head, 1.0, None)
        .unwrap()
        .save(&checkpoint, 1, 75)
        .unwrap();

    let p = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "evaluate",
            "--checkpoint",
            &p("c.safetensors"),
            "--data",
            &p("102flowers.tgz"),
        ])
        .args([
            "--labels",
            &p("imagelabels.mat"),
            "--setid",
            &p("setid.mat"),
            "--split",
            "test",
        ])
        .args([
            "--img-size",
            "75",
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--cache-dir",
            &p("cache"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "images=4", "tstid holds 4 images:\n{stdout}");
    assert!(
        stdout.contains("top5=1.0000"),
        "3 classes: top-5 holds every label\n{stdout}"
    );
    // Images 9..12 have labels 3, 1, 2, 3: per-class totals 1, 1, 2.
    for (class, total) in [(1, 1), (2, 1), (3, 2)] {
        assert!(
            lines.iter().any(
                |l| l.starts_with(&format!("  {class}: ")) && l.contains(&format!("/{total} "))
            ),
            "class {class} with {total} images:\n{stdout}"
        );
    }
    let last = lines.last().unwrap();
    let acc: f64 = last
        .strip_prefix("accuracy=")
        .expect("last line accuracy=")
        .parse()
        .unwrap();
    assert!((0.0..=1.0).contains(&acc));
}

#[test]
fn evaluate_names_a_missing_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let missing = dir.path().join("nope.safetensors");
    let p = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "evaluate",
            "--checkpoint",
            missing.to_str().unwrap(),
            "--data",
            &p("102flowers.tgz"),
        ])
        .args([
            "--labels",
            &p("imagelabels.mat"),
            "--img-size",
            "75",
            "--cache-dir",
            &p("cache"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.safetensors"), "{stderr}");
}
