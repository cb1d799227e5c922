//! What the gRPC tests share: a served coordinator, a client with the token, and the
//! configs, steps, tensors and evaluations they send.

use std::path::Path;
use std::time::Duration;

pub use flowers_coordinator::testing::{
    batch_evaluation as evaluation, run_config as config, step_metrics as step,
};
use flowers_coordinator::testing::{
    client_config, f32_safetensors, f32_values, serve_on_free_port,
};
use flowers_coordinator::{CoordinatorConfig, ServerHandle};
use flowers_coordinator_client::{CoordinatorClient, WorkerInfo};

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

/// A safetensors upload of f32 tensors `(name, shape, values)`.
pub fn tensors(entries: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    f32_safetensors(entries).unwrap()
}

/// The values of f32 tensor `name` of a safetensors buffer.
pub fn read(bytes: &[u8], name: &str) -> Vec<f32> {
    f32_values(bytes, name).unwrap()
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
