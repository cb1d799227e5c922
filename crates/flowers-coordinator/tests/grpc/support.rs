//! What the gRPC tests share: a served coordinator, a client with the token, and the
//! configs, steps, tensors and evaluations they send.

use std::path::Path;
use std::time::Duration;

use flowers_coordinator::testing::{
    client_config, f32_safetensors, f32_values, serve_on_free_port,
};
use flowers_coordinator::{CoordinatorConfig, ServerHandle};
use flowers_coordinator_client::{CoordinatorClient, WorkerInfo};
use flowers_proto::v1 as pb;

/// The token every served coordinator requires.
pub const TOKEN: &str = "s3cret";

/// A coordinator on a free port, state in `dir`, opening rounds every `sync_every` steps.
pub async fn start(dir: &Path, sync_every: u32, worker_timeout_ms: u64) -> ServerHandle {
    let config = CoordinatorConfig {
        sync_every,
        worker_timeout: Duration::from_millis(worker_timeout_ms),
        ..CoordinatorConfig::new(dir)
    };
    serve_on_free_port(config, Some(TOKEN)).await.unwrap()
}

/// A client of `server` with the token.
pub fn client(server: &ServerHandle) -> CoordinatorClient {
    CoordinatorClient::connect(&client_config(server, Some(TOKEN))).unwrap()
}

/// A run of `epochs` epochs of `train` training and `val` validation batches of 4 images.
pub fn config(epochs: u32, train: u32, val: u32) -> pb::RunConfig {
    pb::RunConfig {
        dataset: "flowers-test".into(),
        split: "stratified".into(),
        img_size: 32,
        batch_size: 4,
        epochs,
        train_batches_per_epoch: train,
        val_batches_per_epoch: val,
        seed: 7,
        num_classes: 102,
        train_images: train * 4,
        val_images: val * 4,
        evaluations_per_epoch: 1,
    }
}

/// A safetensors upload of f32 tensors `(name, shape, values)`.
pub fn tensors(entries: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    f32_safetensors(entries).unwrap()
}

/// The values of f32 tensor `name` of a safetensors buffer.
pub fn read(bytes: &[u8], name: &str) -> Vec<f32> {
    f32_values(bytes, name).unwrap()
}

/// A step on batch `batch` of `epoch`: 4 images, loss 2, accuracy 0.25.
pub fn step(epoch: u32, batch: u32) -> pb::StepMetrics {
    pb::StepMetrics {
        step: 0,
        epoch,
        batch_index: batch,
        images: 4,
        loss: 2.0,
        accuracy: 0.25,
        images_per_s: 100.0,
        data_wait_s: 0.01,
        step_s: 0.04,
    }
}

/// Registers a worker on `host`; returns its id.
pub async fn worker(c: &CoordinatorClient, run: &str, host: &str) -> String {
    let info = WorkerInfo {
        host: host.into(),
        device: "cpu".into(),
        gpu_name: String::new(),
    };
    c.register_worker(run, &info, None).await.unwrap().worker_id
}

/// A validation batch of 10 images, `correct` of them right.
pub fn evaluation(batch_index: u32, correct: u32) -> pb::BatchEvaluation {
    pb::BatchEvaluation {
        batch_index,
        images: 10,
        correct,
        correct_top5: 10,
        loss_sum: 4.0,
    }
}
