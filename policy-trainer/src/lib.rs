//! The DPO policy trainer as a library: the binary (`main.rs`) parses flags and drives the
//! training loop over these building blocks.
//!
//! - [`args`]: the `train` flags and their checks.
//! - [`train`]: the loop itself; [`eval`]: validation passes.
//! - [`ref_client`]: the reference server connection (prefetch, retries, timeout) over the
//!   [`ref_cache`] of reference scores (in memory and on disk).
//! - [`dpo`]: the DPO loss, implicit rewards and batch statistics on candle tensors.
//! - [`optim`]: RMSprop with PyTorch semantics, gradient accumulation and norm clipping.
//! - [`checkpoint`]: `best/` and `last/` (model, trainer state, optimizer state).
//! - [`metrics`]: the `metrics.jsonl` log, one JSON object per optimizer step / evaluation.
//! - [`plot`]: the PNG chart of validation accuracy and training loss.

pub mod args;
pub mod checkpoint;
pub mod dpo;
pub mod eval;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod ref_cache;
pub mod ref_client;
pub mod train;
