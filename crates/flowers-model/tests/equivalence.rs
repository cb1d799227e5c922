//! Our InceptionV3 against PyTorch on the same weights and input.

mod common;

use common::{get, max_abs, max_abs_diff, python_reference, read};
use flowers_model::{build_model, InceptionV3, ModelConfig, Policy, Variant};
use tch::nn::VarStore;
use tch::Device;

#[test]
fn tf2015_features_match_the_torchscript() {
    tch::set_num_threads(2);
    let dir = python_reference("tf2015");
    let case = read(&dir, "case.safetensors");
    let (x, want) = (get(&case, "input"), get(&case, "features"));
    let weights = common::file(&dir, "weights.safetensors");

    let vs = VarStore::new(Device::Cpu);
    // The variant comes from the file, whatever the config says.
    let config = ModelConfig::new(102, Variant::Torchvision, Policy::Head);
    let (model, info) = build_model(&vs, config, Some(&weights)).unwrap();
    let info = info.unwrap();
    assert_eq!(info.variant, Variant::Tf2015);
    assert_eq!(model.config().variant, Variant::Tf2015);
    assert_eq!(
        info.kept_initial,
        vec!["fc.bias".to_string(), "fc.weight".to_string()]
    );
    assert_eq!(info.loaded, 94 * 5);

    let got = model.features(x);
    let (diff, scale) = (max_abs_diff(&got, want), max_abs(want));
    eprintln!("tf2015 features: max |diff| {diff:.3e}, scale {scale:.3}");
    assert!(diff < 1e-3 * scale, "max |diff| {diff} vs scale {scale}");

    // The pooling differences are real: the torchvision variant on the same weights is off.
    let vs_tv = VarStore::new(Device::Cpu);
    let tv = InceptionV3::new(
        &vs_tv.root(),
        ModelConfig::new(102, Variant::Torchvision, Policy::Head),
    );
    flowers_model::load_pretrained(&vs_tv, &weights).unwrap();
    let off = max_abs_diff(&tv.features(x), want);
    assert!(
        off > 1e-2 * scale,
        "torchvision pooling should differ, diff {off}"
    );
}

#[test]
fn torchvision_logits_and_bn_updates_match_torchvision() {
    tch::set_num_threads(2);
    let dir = python_reference("torchvision");
    let case = read(&dir, "case.safetensors");
    let x = get(&case, "input");
    let weights = common::file(&dir, "weights.safetensors");

    let vs = VarStore::new(Device::Cpu);
    let mut config = ModelConfig::new(102, Variant::Tf2015, Policy::All);
    config.dropout = 0.0; // the reference ran with dropout 0 to compare training-mode logits
    let (model, info) = build_model(&vs, config, Some(&weights)).unwrap();
    let info = info.unwrap();
    assert_eq!(info.variant, Variant::Torchvision);
    assert!(
        info.kept_initial.is_empty(),
        "102-class fc must load: {:?}",
        info.kept_initial
    );

    // Returns max |diff| after checking it against the reference's scale.
    let check = |what: &str, got: &tch::Tensor, want: &tch::Tensor| {
        let (diff, scale) = (max_abs_diff(got, want), max_abs(want));
        assert!(
            diff < 1e-4 * scale.max(1.0),
            "{what}: max |diff| {diff} vs scale {scale}"
        );
        diff
    };
    tch::no_grad(|| {
        let d = check(
            "eval logits",
            &model.forward_t(x, false),
            get(&case, "logits_eval"),
        );
        eprintln!("torchvision eval logits: max |diff| {d:.3e}");
        let d = check(
            "train logits",
            &model.forward_t(x, true),
            get(&case, "logits_train"),
        );
        eprintln!("torchvision train logits: max |diff| {d:.3e}");
    });
    let vars = vs.variables();
    let mut stats = 0;
    let mut worst = 0f64;
    for (name, want) in &case.tensors {
        if let Some(var) = name.strip_prefix("after_train.") {
            worst = worst.max(check(var, &vars[var], want));
            stats += 1;
        }
    }
    eprintln!("torchvision running stats after a train pass: max |diff| {worst:.3e}");
    assert_eq!(stats, 94 * 2);
}
