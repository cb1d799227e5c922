//! Prints the time of one training step (forward, backward, Adamax) per policy on the CPU.
//! Usage: cargo run --release -p flowers-model --example step_time -- [img_size] [batch] [threads]

use std::time::Instant;

use flowers_model::{
    to_model_input, InceptionV3, ModelConfig, Optimizer, OptimizerKind, Policy, Variant,
};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn main() {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("numeric arguments: img_size batch threads")
        })
        .collect();
    let (size, batch, threads) = (
        args.first().copied().unwrap_or(150),
        args.get(1).copied().unwrap_or(8),
        args.get(2).copied().unwrap_or(2),
    );
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let pixels = Tensor::randint(256, [batch, size, size, 3], (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Uint8);
    let labels = Tensor::randint(102, [batch], (Kind::Int64, Device::Cpu));
    for policy in [Policy::Head, Policy::Top, Policy::Reference, Policy::All] {
        let vs = VarStore::new(Device::Cpu);
        let model = InceptionV3::new(&vs.root(), ModelConfig::new(102, Variant::Tf2015, policy));
        let mut opt = Optimizer::new(OptimizerKind::adamax(), model.param_groups(1.0));
        // Seconds spent in forward, backward and the optimizer step.
        let mut step = || {
            let t0 = Instant::now();
            let x = to_model_input(&pixels, Device::Cpu, true).unwrap();
            let loss = model.forward_t(&x, true).cross_entropy_for_logits(&labels);
            let t1 = Instant::now();
            opt.zero_grad();
            loss.backward();
            let t2 = Instant::now();
            opt.step(1e-3);
            let t3 = Instant::now();
            [t1 - t0, t2 - t1, t3 - t2].map(|d| d.as_secs_f64())
        };
        step(); // warm-up
        let n = 3;
        let mut sum = [0f64; 3];
        for _ in 0..n {
            for (s, t) in sum.iter_mut().zip(step()) {
                *s += t / n as f64;
            }
        }
        let total: f64 = sum.iter().sum();
        println!(
            "policy {policy:9} {size}px batch {batch} threads {threads}: {total:.3} s/step \
             (forward {:.3}, backward {:.3}, optimizer {:.3}), {:.1} img/s",
            sum[0],
            sum[1],
            sum[2],
            batch as f64 / total
        );
    }
}
