//! Protobuf and gRPC types generated from `proto/flowers/v1`.
//!
//! [`v1`] holds the messages (`Batch`, `RunConfig`, ...), the `Coordinator` service's client
//! and server, and the descriptor set for reflection; [`interim_evaluation_after`] is the one
//! rule the loader and the coordinator must share beyond the messages. Generated code only:
//! it must not depend on any other crate of the workspace.

pub mod v1 {
    tonic::include_proto!("flowers.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("flowers_descriptor");
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
