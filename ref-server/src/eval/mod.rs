//! `dpo-eval`: the benchmarks users compare an SFT and a DPO model on. The model under test
//! runs locally (`dpo_common::generate`, KV cache) or on a `ref-server` (`Generate` and
//! `Score` RPCs), behind one backend; judging asks a judge model served by another
//! `ref-server` through `Score` (no generation on the judge side).
//!
//! The entry point is [`run`] with a parsed [`Cli`]. Inside, files import downward only:
//! `cli` (the flags) and `command` (executing them: load, evaluate, write) on top;
//! `benchmarks` evaluates one benchmark into a `report::Report`; below it `backend` (the
//! model under test), `judge` (pairwise/safety judging and the win-rate arithmetic),
//! `prompts` (the handout's prompts and the judge prompts), `data` (each benchmark's
//! released format), `parse` (outputs into answers) and `csv` (the small CSV reader the
//! MMLU and SST files need).

mod backend;
mod benchmarks;
mod cli;
mod command;
mod csv;
mod data;
mod judge;
mod parse;
mod prompts;
mod report;

pub use cli::Cli;
pub use command::run;
pub use judge::win_rate;
