//! The `dpo.v1` gRPC API shared by `ref-server` (which serves it) and every client
//! (`policy-trainer`, `ref-server score --server`, `dpo-eval --server`): the client
//! ([`client`], with the retries that carry every call through a server restart, in
//! `retry`), the connection flags they all take ([`connect`]) and the bearer-token loader
//! ([`token`]). Source of truth: `proto/dpo/v1/*.proto`.

pub mod v1 {
    tonic::include_proto!("dpo.v1");

    /// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dpo_descriptor");
}

pub mod client;
pub mod connect;
mod retry;
pub mod token;
