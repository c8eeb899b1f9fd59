//! `ref-server`: the frozen DPO reference model as a gRPC log-prob scoring service.
//!
//! One concern per module: [`config`] (every limit, validated once), [`validation`]
//! (turning a request into checked sequences, each failure naming the item and the limit),
//! [`batcher`] (the thread that owns the model and groups queued rows — a prompt with its
//! responses, so a pair's prompt is computed once — into padded forward passes), [`engine`]
//! (model loading plus validate → look up → batch → answer, shared by the gRPC service and
//! the local scoring CLI), [`store`] (the score store: scores kept on disk across runs, and
//! single flight for concurrent requests), [`auth`], [`message_limit`] (the request-size limit reported as
//! `INVALID_ARGUMENT`), [`service`] (the tonic `Reference` implementation), [`server`]
//! (transport: listen, TLS, health, reflection, shutdown), [`metrics`] (Prometheus metrics
//! of all of the above, and their `--metrics-listen` endpoint), [`score_cli`] (the JSONL
//! scoring command) and [`health_cli`] (the health check, and the wait for a server to be
//! SERVING), with [`connect`] (the connection flags every client command shares, from
//! `dpo_proto`).
//! `main.rs` only parses the command line.

pub mod auth;
pub mod batcher;
pub mod config;
pub mod connect;
pub mod engine;
pub mod eval;
pub mod health_cli;
pub mod message_limit;
pub mod metrics;
pub mod score_cli;
pub mod server;
pub mod service;
pub mod store;
pub mod validation;
