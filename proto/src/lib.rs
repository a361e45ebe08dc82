//! scope's gRPC API, package `scope.v1`, generated from `proto/scope/v1/*.proto` at build
//! time. Never edit generated code: change the `.proto` and rebuild.

/// The `scope.v1` package.
pub mod v1 {
    // `allow`, not `expect`: whether the generated code trips a lint depends on the proto.
    #![allow(clippy::all, reason = "generated code")]
    tonic::include_proto!("scope.v1");

    /// The encoded `FileDescriptorSet` of `scope.v1`, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/scope_v1_descriptor.bin"));
}
