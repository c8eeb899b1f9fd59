//! `dpo-eval`: the benchmarks users compare an SFT and a DPO model on. Generation runs the
//! model locally (`dpo_common::generate`, KV cache); judging asks a judge model served by
//! another `ref-server` through `Score` (no generation on the judge side).
//!
//! [`data`] reads each benchmark's released format, [`prompts`] holds the handout's prompts
//! and the judge prompts, [`parse`] turns outputs into answers, [`run`] evaluates one
//! benchmark into a [`report::Report`], [`judge`] holds the pairwise/safety judging and the
//! win-rate arithmetic, [`csv`] is the small CSV reader the MMLU and SST files need.

pub mod csv;
pub mod data;
pub mod judge;
pub mod parse;
pub mod prompts;
pub mod report;
pub mod run;
