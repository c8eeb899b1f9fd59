//! `dpo-eval`: the benchmarks users compare an SFT and a DPO model on. The model under test
//! runs locally (`dpo_common::generate`, KV cache) or on a `ref-server` (`Generate` and
//! `Score` RPCs), behind [`backend::Backend`]; judging asks a judge model served by another
//! `ref-server` through `Score` (no generation on the judge side).
//!
//! [`backend`] is the model under test, [`data`] reads each benchmark's released format, [`prompts`] holds the handout's prompts
//! and the judge prompts, [`parse`] turns outputs into answers, [`run`] evaluates one
//! benchmark into a [`report::Report`], [`judge`] holds the pairwise/safety judging and the
//! win-rate arithmetic, [`csv`] is the small CSV reader the MMLU and SST files need.

pub mod backend;
pub mod csv;
pub mod data;
pub mod judge;
pub mod parse;
pub mod prompts;
pub mod report;
pub mod run;
