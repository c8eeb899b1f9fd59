//! The DPO policy trainer as a library: the binary (`main.rs`) parses flags and drives the
//! training loop over these building blocks.
//!
//! - [`dpo`]: the DPO loss, implicit rewards and batch statistics on candle tensors.
//! - [`optim`]: RMSprop with PyTorch semantics, gradient accumulation and norm clipping.
//! - [`metrics`]: the `metrics.jsonl` log, one JSON object per optimizer step / evaluation.
//! - [`plot`]: the PNG chart of validation accuracy and training loss.

pub mod dpo;
pub mod metrics;
pub mod optim;
pub mod plot;
