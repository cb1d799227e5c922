//! Protobuf and gRPC types generated from `proto/flowers/v1`.

pub mod v1 {
    tonic::include_proto!("flowers.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("flowers_descriptor");
}
