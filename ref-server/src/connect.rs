//! The connection flags every client command shares live in [`dpo_proto::connect`]; this
//! re-export keeps `ref_server::connect::ConnectArgs` working for the commands here.

pub use dpo_proto::connect::{ConnectArgs, DEFAULT_SERVER};
