//! The wire contract of `proto/flowers/v1`: the generated protobuf and gRPC types ([`v1`]),
//! and the rules both ends of a connection share: the gRPC message limits
//! ([`MAX_MESSAGE_BYTES`], [`CHUNK_BYTES`]), where interim evaluations fall
//! ([`interim_evaluation_after`]), what a run id is ([`run_id`]) and the checkpoint file
//! formats ([`checkpoint_format`]).
//!
//! It must not depend on any other crate of the workspace: they all depend on it.

pub mod run_id;

pub mod v1 {
    tonic::include_proto!("flowers.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("flowers_descriptor");
}

/// Size of the data in each streamed tensor or checkpoint chunk: well under the message limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Largest gRPC message the coordinator and its clients accept or send: a few chunks' worth.
pub const MAX_MESSAGE_BYTES: usize = 4 * CHUNK_BYTES;

/// `__metadata__.format` of the safetensors files that hold model tensors: which writer made a
/// file, and so what it holds.
pub mod checkpoint_format {
    /// The metadata key.
    pub const KEY: &str = "format";
    /// A trainer's checkpoint: every model variable, the optimizer state and the position in
    /// the run.
    pub const TRAINER: &str = "flowers-checkpoint-v1";
    /// The coordinator's average of a sync round: only the tensors workers exchange.
    pub const AVERAGE: &str = "flowers-average-v1";
}

/// Training batches of an epoch that must be trained before interim evaluation `part` of
/// `evaluations_per_epoch` (1 ≤ part < n): `ceil(part * train_batches / n)`. The loader
/// publishes the evaluation's validation batches right after that many training batches,
/// and the coordinator opens its sync round once that many are trained.
pub fn interim_evaluation_after(part: u32, evaluations_per_epoch: u32, train_batches: u32) -> u32 {
    let n = u64::from(evaluations_per_epoch.max(1));
    (u64::from(part) * u64::from(train_batches)).div_ceil(n) as u32
}

#[cfg(test)]
mod tests {
    use super::interim_evaluation_after;

    #[test]
    fn interim_evaluations_split_the_epoch_evenly() {
        let after: Vec<u32> = (1..8).map(|p| interim_evaluation_after(p, 8, 51)).collect();
        assert_eq!(after, [7, 13, 20, 26, 32, 39, 45]);
        assert_eq!(interim_evaluation_after(1, 2, 3), 2);
    }
}
