//! For tests, here and in the services, that talk to a real coordinator over gRPC: a server on a
//! free loopback port, clients whose retries give up in seconds rather than after the
//! production budget (so that a broken test fails fast), the configs, steps and evaluations
//! tests report, and safetensors buffers of f32 tensors to upload without a tensor library. Behind the `testing` feature: not for
//! production code.

use std::time::Duration;

use flowers_coordinator_client::{Backoff, ClientConfig};
use flowers_proto::v1 as pb;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::{Coordinator, CoordinatorConfig, ServeError, ServeOptions, ServerHandle};

/// Serves a coordinator opened with `config` on a free loopback port, plain HTTP/2, requiring
/// `token` where one is given.
pub async fn serve_on_free_port(
    config: CoordinatorConfig,
    token: Option<&str>,
) -> Result<ServerHandle, ServeError> {
    let options = ServeOptions {
        token: token.map(Into::into),
        tls: None,
    };
    ServerHandle::start(Coordinator::open(config)?, "127.0.0.1:0", options).await
}

/// A client configuration for `server`, with `token`, retrying for 10 s at the most.
pub fn client_config(server: &ServerHandle, token: Option<&str>) -> ClientConfig {
    ClientConfig::new(server.url())
        .token(token.map(Into::into))
        .retry(Backoff {
            initial: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            give_up_after: Duration::from_secs(10),
        })
}

/// A valid run config: `epochs` epochs of `train` training and `val` validation batches of 4
/// images.
pub fn run_config(epochs: u32, train: u32, val: u32) -> pb::RunConfig {
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

/// A training step on batch `batch` of `epoch`: 4 images, loss 2, accuracy 0.25, 100 images/s.
pub fn step_metrics(epoch: u32, batch: u32) -> pb::StepMetrics {
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

/// A validation batch of 10 images, `correct` of them right, loss sum 4.
pub fn batch_evaluation(batch_index: u32, correct: u32) -> pb::BatchEvaluation {
    pb::BatchEvaluation {
        batch_index,
        images: 10,
        correct,
        correct_top5: 10,
        loss_sum: 4.0,
    }
}

/// A safetensors buffer of named f32 tensors `(name, shape, values)`, to build uploads.
pub fn f32_safetensors(
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
) -> std::result::Result<Vec<u8>, safetensors::SafeTensorError> {
    let data: Vec<(&str, &[usize], Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                *n,
                s.as_slice(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = data
        .iter()
        .map(|(n, s, d)| Ok((*n, TensorView::new(Dtype::F32, s.to_vec(), d)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize(views, None)
}

/// The values of the f32 tensor `name` in a safetensors buffer (the reverse of
/// [`f32_safetensors`]).
pub fn f32_values(
    bytes: &[u8],
    name: &str,
) -> std::result::Result<Vec<f32>, safetensors::SafeTensorError> {
    let tensors = SafeTensors::deserialize(bytes)?;
    let view = tensors.tensor(name)?;
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
