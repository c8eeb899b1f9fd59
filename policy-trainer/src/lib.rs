//! The preference-tuning (DPO and its family) policy trainer as a library: the binary
//! (`main.rs`) parses flags and drives the training loop over these building blocks.
//!
//! - [`args`]: the `train` flags and their checks.
//! - [`train`]: the loop itself ([`train::Trainer`]: setup, step, evaluate, finish);
//!   [`eval`]: validation passes; [`passes`]: pairs as shared-prompt rows packed into
//!   forward passes, for both.
//! - [`ref_client`]: the reference server connection (prefetch, retries, timeout) over the
//!   [`ref_cache`] of reference scores (in memory and on disk).
//! - [`loss`]: the preference losses (TRL's `loss_type`s and SimPO), their gradients and
//!   implicit rewards; [`stats`]: what training and validation report about them.
//! - [`optim`]: RMSprop with PyTorch semantics, gradient accumulation and norm clipping.
//! - [`checkpoint`]: `best/` and `last/` (model, trainer state, optimizer state).
//! - [`metrics`]: the [`metrics::METRICS_FILE`] log, one JSON object per optimizer step /
//!   evaluation.
//! - [`plot`]: the PNG chart of validation accuracy and training loss.
//! - [`progress`]: the progress bar; [`summary`]: what a finished run prints.

pub mod args;
pub mod checkpoint;
pub mod eval;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod passes;
pub mod plot;
pub mod progress;
pub mod ref_cache;
pub mod ref_client;
pub mod stats;
pub mod summary;
pub mod tensorboard;
pub mod train;
