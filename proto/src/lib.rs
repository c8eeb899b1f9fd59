//! The `dpo.v1` gRPC API shared by `ref-server` (which serves it) and every client
//! (`policy-trainer`, `ref-server score --server`, `dpo-eval --server`): the client of a
//! reference fleet ([`fleet::RefClient`]: replicas balanced, calls retried through
//! failures and restarts) over connections to single servers ([`client`]), the connection
//! flags every client takes ([`connect`]) and the bearer-token loader ([`token`]). Source
//! of truth: `proto/dpo/v1/*.proto`.

pub mod v1 {
    tonic::include_proto!("dpo.v1");

    /// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dpo_descriptor");
}

pub mod client;
pub mod connect;
pub mod fleet;
pub mod token;
