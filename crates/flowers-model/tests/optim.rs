//! Optimizers against torch.optim on the same parameters, gradients and lr sequence.

mod common;

use std::collections::BTreeMap;

use common::{get, max_abs_diff, python_reference, read};
use flowers_model::{Optimizer, OptimizerKind, ParamGroup};
use tch::{Kind, Tensor};

const STEPS: usize = 6;
const BASE_LR: f64 = 0.01;

fn run(kind: OptimizerKind, name: &str, case: &flowers_model::tensor_file::TensorFile) {
    let params: BTreeMap<&str, Tensor> = ["a", "b", "c"]
        .into_iter()
        .map(|k| {
            (
                k,
                get(case, &format!("init.{k}"))
                    .copy()
                    .set_requires_grad(true),
            )
        })
        .collect();
    let named = |ks: &[&str]| -> Vec<(String, Tensor)> {
        ks.iter()
            .map(|k| (k.to_string(), params[k].shallow_clone()))
            .collect()
    };
    let groups = vec![
        ParamGroup::new("main", 1.0, &named(&["a", "b"])),
        ParamGroup::new("slow", 0.1, &named(&["c"])),
    ];
    let mut opt = Optimizer::new(kind, groups);
    for t in 0..STEPS {
        opt.zero_grad();
        // d/dp sum(p * g) = g exactly, which sets each gradient to the reference's.
        let loss = params
            .iter()
            .map(|(k, p)| (p * get(case, &format!("grad.{t}.{k}"))).sum(Kind::Float))
            .fold(Tensor::from(0f32), |a, b| a + b);
        loss.backward();
        opt.step(BASE_LR * (1.0 - 0.1 * t as f64));
    }
    for (k, p) in &params {
        let diff = max_abs_diff(p, get(case, &format!("{name}.final.{k}")));
        assert!(diff < 1e-6, "{name}: param {k} differs by {diff}");
    }
    let state: BTreeMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    let mut compared = 0;
    for (key, want) in &case.tensors {
        let Some(rest) = key.strip_prefix(&format!("{name}.state.")) else {
            continue;
        };
        let got = state
            .get(rest)
            .unwrap_or_else(|| panic!("{name}: our state lacks {rest}"))
            .to_kind(Kind::Float);
        let diff = max_abs_diff(&got, want);
        assert!(diff < 1e-6, "{name}: state {rest} differs by {diff}");
        compared += 1;
    }
    // torch's SGD keeps no step count; ours does (checkpoints record it uniformly).
    let ours = state
        .keys()
        .filter(|k| !(name == "sgd" && k.ends_with(".step")))
        .count();
    assert_eq!(compared, ours, "{name}: state names differ from torch's");
}

#[test]
fn adamax_adam_and_sgd_match_torch_optim() {
    let dir = python_reference("optim");
    let case = read(&dir, "case.safetensors");
    run(
        OptimizerKind::adamax().with_weight_decay(0.01),
        "adamax",
        &case,
    );
    run(OptimizerKind::adam().with_weight_decay(0.01), "adam", &case);
    run(
        OptimizerKind::sgd(0.9).with_weight_decay(0.01),
        "sgd",
        &case,
    );
}
