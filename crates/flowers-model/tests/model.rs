//! Policies, BatchNorm modes, checkpoints and a few training steps (no Python needed).

use std::collections::BTreeSet;

use flowers_model::{
    is_trunk_variable, load_checkpoint, read_checkpoint_meta, save_checkpoint, to_model_input,
    CheckpointMeta, InceptionV3, ModelConfig, Optimizer, OptimizerKind, Policy, Variant,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const CONVS: usize = 94;

fn model(policy: Policy) -> (VarStore, InceptionV3) {
    let vs = VarStore::new(Device::Cpu);
    let mut config = ModelConfig::new(102, Variant::Tf2015, policy);
    config.dropout = 0.0;
    let m = InceptionV3::new(&vs.root(), config);
    (vs, m)
}

fn input(n: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::rand([n, 3, 75, 75], (Kind::Float, Device::Cpu)) * 2 - 1
}

#[test]
fn policies_mark_exactly_the_intended_parameters() {
    tch::set_num_threads(2);
    for (policy, params, stats) in [
        (Policy::All, CONVS * 3 + 2, CONVS * 2),
        (Policy::Head, 2, 0),
        (Policy::Reference, 12 + CONVS + 2, CONVS * 2),
        (Policy::Top, 12 + 2, 0),
    ] {
        let (vs, m) = model(policy);
        assert_eq!(vs.variables().len(), CONVS * 5 + 2);
        let names: BTreeSet<String> = m.trainable_names().into_iter().collect();
        assert_eq!(names.len(), params, "{policy}");
        assert_eq!(m.trained_bn_stats().len(), stats, "{policy}");
        assert_eq!(m.sync_tensor_names().len(), params + stats, "{policy}");
        // requires_grad agrees with the policy for every variable.
        for (name, t) in vs.variables() {
            assert_eq!(t.requires_grad(), names.contains(&name), "{policy}: {name}");
        }
        assert!(names.contains("fc.weight") && names.contains("fc.bias"));
        let groups = m.param_groups(0.1);
        let head = groups.iter().find(|g| g.name == "head").unwrap();
        assert_eq!(head.params.len(), 2);
        assert_eq!(groups.iter().map(|g| g.params.len()).sum::<usize>(), params);
    }
    let (_, m) = model(Policy::Reference);
    let names: BTreeSet<String> = m.trainable_names().into_iter().collect();
    for yes in [
        "Mixed_7b.branch1x1.conv.weight",
        "Mixed_7b.branch3x3dbl_3b.conv.weight",
        "Mixed_7b.branch_pool.conv.weight",
        "Mixed_7c.branch3x3dbl_2.conv.weight",
        "Mixed_7c.branch_pool.conv.weight",
        "Conv2d_1a_3x3.bn.bias",
        "Mixed_6e.branch7x7dbl_5.bn.bias",
    ] {
        assert!(names.contains(yes), "reference should train {yes}");
    }
    for no in [
        "Mixed_7b.branch3x3dbl_3a.conv.weight",
        "Mixed_7b.branch3x3_2b.conv.weight",
        "Mixed_7a.branch3x3_2.conv.weight",
        "Mixed_7c.branch1x1.bn.weight",
        "Conv2d_1a_3x3.conv.weight",
    ] {
        assert!(!names.contains(no), "reference should freeze {no}");
    }
    let convs = names.iter().filter(|n| n.ends_with(".conv.weight")).count();
    assert_eq!(convs, 12);
    // `top` trains the same convolutions as `reference` and the head, no BatchNorm parameter.
    let (_, top) = model(Policy::Top);
    let top_names: BTreeSet<String> = top.trainable_names().into_iter().collect();
    let expected: BTreeSet<String> = names
        .iter()
        .filter(|n| n.ends_with(".conv.weight") || n.starts_with("fc."))
        .cloned()
        .collect();
    assert_eq!(top_names, expected);
    assert_eq!(top.sync_tensor_names(), top.trainable_names());
    for p in ["top", "reference", "head", "all"] {
        assert_eq!(p.parse::<Policy>().unwrap().to_string(), p);
    }
    assert!("bottom"
        .parse::<Policy>()
        .unwrap_err()
        .to_string()
        .contains("top"));
}

#[test]
fn frozen_batchnorms_stay_in_eval_mode() {
    tch::set_num_threads(2);
    let x = input(2, 1);
    for policy in [Policy::Head, Policy::Top] {
        let (vs, m) = model(policy);
        let before: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let train = tch::no_grad(|| m.forward_t(&x, true));
        let eval = tch::no_grad(|| m.forward_t(&x, false));
        // Dropout is 0 here, so a model with frozen BatchNorms computes the same in both modes...
        assert_eq!(
            (&train - &eval).abs().max().double_value(&[]),
            0.0,
            "{policy}"
        );
        // ...and no running statistic moved.
        let after = vs.variables();
        for (name, t) in &before {
            assert!(t.equal(&after[name]), "{policy}: {name} changed");
        }
    }
    // Training BatchNorms do use batch statistics and update their running stats.
    let (_, all) = model(Policy::All);
    let (name, mean) = &all.trained_bn_stats()[0];
    let mean0 = mean.copy();
    let train = tch::no_grad(|| all.forward_t(&x, true));
    let eval = tch::no_grad(|| all.forward_t(&x, false));
    assert!(!mean.equal(&mean0), "{name} should have been updated");
    assert!((&train - &eval).abs().max().double_value(&[]) > 0.0);
}

#[test]
fn the_trunk_is_frozen_exactly_where_the_policy_says_and_splits_the_forward() {
    tch::set_num_threads(2);
    let x = input(2, 4);
    for (policy, frozen) in [
        (Policy::Head, true),
        (Policy::Top, true),
        (Policy::Reference, false),
        (Policy::All, false),
    ] {
        let (vs, m) = model(policy);
        assert_eq!(m.trunk_is_frozen(), frozen, "{policy}");
        let trunk_vars: Vec<String> = vs
            .variables()
            .into_keys()
            .filter(|n| is_trunk_variable(n))
            .collect();
        // The stem (5), Mixed_5b-d (3 x 7), Mixed_6a (4), Mixed_6b-e (4 x 10), Mixed_7a (6)
        // convolutions, 5 variables each.
        assert_eq!(trunk_vars.len(), (5 + 21 + 4 + 40 + 6) * 5);
        let trains_trunk = m.sync_tensor_names().iter().any(|n| is_trunk_variable(n));
        assert_eq!(trains_trunk, !frozen, "{policy}");
        // Logits through the split equal the whole forward, bit for bit.
        let whole = tch::no_grad(|| m.forward_t(&x, false));
        let split = tch::no_grad(|| m.forward_from_trunk(&m.trunk(&x, false), false));
        assert!(whole.equal(&split), "{policy}");
    }
    assert!(is_trunk_variable("Mixed_7a.branch3x3_2.conv.weight"));
    assert!(!is_trunk_variable("Mixed_7b.branch1x1.conv.weight"));
    assert!(!is_trunk_variable("fc.weight"));
}

fn batch(seed: i64) -> (Tensor, Tensor) {
    // Four 75x75 images of distinct solid colours plus noise: separable in a few steps.
    tch::manual_seed(seed);
    let noise = Tensor::randint(40, [4, 75, 75, 3], (Kind::Int64, Device::Cpu));
    let base = Tensor::from_slice(&[200i64, 20, 20, 20, 200, 20, 20, 20, 200, 200, 200, 20])
        .view([4, 1, 1, 3]);
    let pixels = (base + noise).to_kind(Kind::Uint8);
    (pixels, Tensor::from_slice(&[0i64, 1, 2, 3]))
}

fn train_steps(m: &InceptionV3, opt: &mut Optimizer, steps: usize, lr: f64) -> Vec<f64> {
    let (pixels, labels) = batch(7);
    (0..steps)
        .map(|_| {
            let x = to_model_input(&pixels, Device::Cpu, true).unwrap();
            let loss = m.forward_t(&x, true).cross_entropy_for_logits(&labels);
            opt.zero_grad();
            loss.backward();
            opt.step(lr);
            loss.double_value(&[])
        })
        .collect()
}

#[test]
fn a_few_steps_lower_the_loss() {
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let (_vs, m) = model(Policy::All);
    let mut opt = Optimizer::new(OptimizerKind::adamax(), m.param_groups(1.0));
    let losses = train_steps(&m, &mut opt, 8, 2e-3);
    eprintln!("losses: {losses:?}");
    let last = losses[losses.len() - 1];
    assert!(last < 0.5 * losses[0], "loss did not fall: {losses:?}");
}

#[test]
fn checkpoints_round_trip_exactly() {
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let (vs, m) = model(Policy::Reference);
    let mut opt = Optimizer::new(OptimizerKind::adamax(), m.param_groups(0.1));
    train_steps(&m, &mut opt, 1, 1e-3);
    let meta = CheckpointMeta {
        step: 1,
        epoch: 0,
        policy: Policy::Reference,
        variant: Variant::Tf2015,
        num_classes: 102,
        img_size: 75,
        optimizer: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    save_checkpoint(&path, &vs, Some(&opt), &meta).unwrap();

    let read = read_checkpoint_meta(&path).unwrap();
    assert_eq!(read.optimizer.as_deref(), Some("adamax"));
    assert_eq!(
        CheckpointMeta {
            optimizer: None,
            ..read
        },
        meta
    );
    // A checkpoint doubles as a weights file.
    assert_eq!(flowers_model::read_variant(&path).unwrap(), Variant::Tf2015);

    tch::manual_seed(99); // different initial values
    let (vs2, m2) = model(Policy::Reference);
    let mut opt2 = Optimizer::new(OptimizerKind::adamax(), m2.param_groups(0.1));
    let loaded = load_checkpoint(&path, &vs2, Some(&mut opt2)).unwrap();
    assert_eq!(loaded.step, 1);
    let (a, b) = (vs.variables(), vs2.variables());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(
            t.equal(&b[name]),
            "variable {name} differs after the round trip"
        );
    }
    let (sa, sb) = (opt.state_tensors(), opt2.state_tensors());
    assert_eq!(sa.len(), (12 + CONVS + 2) * 3);
    assert_eq!(sa.len(), sb.len());
    for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb);
        assert!(
            ta.equal(tb),
            "optimizer state {na} differs after the round trip"
        );
    }

    // The wrong optimizer kind is refused with the file named.
    let mut sgd = Optimizer::new(OptimizerKind::sgd(0.9), m2.param_groups(0.1));
    let err = load_checkpoint(&path, &vs2, Some(&mut sgd))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ckpt.safetensors") && err.contains("adamax"),
        "{err}"
    );
}
