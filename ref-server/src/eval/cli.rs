//! The `dpo-eval` command line: one subcommand per benchmark, the flags that say which model
//! is evaluated (loaded here with --model, or a running server with --server) and how it is
//! prompted and decoded, and the judge's flags. Parsed by the binary, executed by
//! [`super::run`].

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use dpo_common::generate::GenerateParams;

use super::prompts::EvalTemplate;
use crate::connect::ConnectArgs;

#[derive(Parser)]
#[command(
    name = "dpo-eval",
    version,
    about = "Evaluate a checkpoint on GSM8K, MMLU, AlpacaEval and SimpleSafetyTests"
)]
pub struct Cli {
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand)]
pub(super) enum Command {
    /// GSM8K (JSON lines `question`/`answer`, gold after `####`): accuracy of the last
    /// number of the output.
    Gsm8k(ModelArgs),
    /// MMLU (Hendrycks CSV per subject, or a directory of them): accuracy overall and per
    /// subject, by generation-and-parse or --by-logprob.
    Mmlu {
        #[command(flatten)]
        args: ModelArgs,
        /// Pick the letter whose answer sentence ("The correct answer is X") has the highest
        /// log-prob instead of generating.
        #[arg(long)]
        by_logprob: bool,
        /// Keep only the first N questions of each subject (before --limit): a small
        /// sample that still covers every subject.
        #[arg(long)]
        per_subject: Option<usize>,
    },
    /// AlpacaEval (JSON list with `instruction`): outputs for the official `alpaca_eval`,
    /// and with --judge-server a local pairwise win rate vs --reference-outputs.
    Alpacaeval {
        #[command(flatten)]
        args: ModelArgs,
        /// Where the outputs JSON goes (default: `outputs.json` beside --out).
        #[arg(long)]
        outputs: Option<PathBuf>,
        /// `generator` name in the outputs (default: the model's file or directory name; with
        /// --server, that of the path the server loaded).
        #[arg(long)]
        generator: Option<String>,
        /// AlpacaEval-format file with the reference outputs to judge against (the
        /// released set carries GPT-4 Turbo's); needed with --judge-server.
        #[arg(long, requires = "judge_server")]
        reference_outputs: Option<PathBuf>,
        #[command(flatten)]
        judge: JudgeArgs,
    },
    /// SimpleSafetyTests (CSV with `prompts_final`): outputs as JSON lines, and with
    /// --judge-server the fraction judged safe.
    Safety {
        #[command(flatten)]
        args: ModelArgs,
        /// Where the outputs JSON lines go (default: `safety_outputs.jsonl` beside --out).
        #[arg(long)]
        outputs: Option<PathBuf>,
        #[command(flatten)]
        judge: JudgeArgs,
    },
    /// Print two reports side by side (e.g. SFT vs DPO).
    Compare {
        /// The first report (e.g. the starting model's).
        a: PathBuf,
        /// The second report (e.g. the DPO model's).
        b: PathBuf,
    },
}

/// Help heading of the flags that only matter with --server.
const CONNECTION: &str = "Connection (with --server)";

// `--server` and its connection flags are the other clients' (`ref_server::connect`),
// without the default URL: exactly one of --model and --server says what is evaluated.
#[derive(clap::Args)]
#[command(
    group(clap::ArgGroup::new("under_test").args(["model", "server"]).required(true)),
    mut_arg("server", |a| a
        .default_value(None::<&str>)
        .help("Or evaluate the model a running ref-server holds: generation through its \
               Generate RPC, MMLU --by-logprob through Score")
        .help_heading(CONNECTION)),
    mut_arg("tls_ca", |a| a.conflicts_with("model").help_heading(CONNECTION)),
    mut_arg("tls_domain", |a| a.conflicts_with("model").help_heading(CONNECTION)),
    mut_arg("auth_token_file", |a| a.conflicts_with("model").help_heading(CONNECTION)),
    mut_arg("connect_timeout", |a| a.help_heading(CONNECTION)),
)]
pub(super) struct ModelArgs {
    /// Model under test, loaded here: a Hugging Face directory (e.g. a trainer's `best/`)
    /// or a .gguf. Either this or --server.
    #[arg(long, value_name = "PATH")]
    pub(super) model: Option<PathBuf>,
    /// With --model: a LoRA adapter in PEFT's format (a LoRA run's `best/`), added into
    /// --model's weights before evaluating (base + adapter, as `--save-merged` writes it).
    #[arg(long, value_name = "DIR", requires = "model")]
    pub(super) adapter: Option<PathBuf>,
    /// The benchmark file in its released format (`.gz` is read too).
    #[arg(long)]
    pub(super) input: PathBuf,
    /// Evaluate only the first N examples.
    #[arg(long)]
    pub(super) limit: Option<usize>,
    /// Largest number of generated tokens per example.
    #[arg(long, default_value_t = 256)]
    pub(super) max_new_tokens: usize,
    /// Prompt template: `alpaca` (as the trainer trains), `raw`, or `zero-shot` (the
    /// course's evaluation system prompt).
    #[arg(long, default_value = "alpaca")]
    pub(super) template: EvalTemplate,
    /// Sampling temperature; 0 = greedy (the handout's setting).
    #[arg(long, default_value_t = 0.0)]
    pub(super) temperature: f64,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    pub(super) top_p: f64,
    /// Sampling seed (example i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// Stop sequence (repeatable); default: the template's (alpaca: "\n### ", zero-shot:
    /// "# Query:" and "```", raw: none).
    #[arg(long)]
    pub(super) stop: Vec<String>,
    /// Prompts generated together (left-padded batch); with --server, questions per Score
    /// request for MMLU --by-logprob.
    #[arg(long, default_value_t = 8)]
    pub(super) batch_size: usize,
    /// With --model: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub(super) device: String,
    /// With --model: compute dtype, f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub(super) dtype: String,
    /// The JSON report.
    #[arg(long, default_value = "report.json")]
    pub(super) out: PathBuf,
    #[command(flatten)]
    pub(super) connect: ConnectArgs,
    /// Requests kept in flight. The server runs one generation at a time
    /// (the others wait there), so more than 2 only pays off for MMLU --by-logprob scoring.
    #[arg(long, default_value_t = 2, help_heading = CONNECTION)]
    pub(super) in_flight: usize,
}

#[derive(clap::Args)]
pub(super) struct JudgeArgs {
    /// A ref-server serving the judge model (http://HOST:PORT or https://…).
    #[arg(long)]
    pub(super) judge_server: Option<String>,
    /// Bearer token file for the judge (else env DPO_AUTH_TOKEN).
    #[arg(long)]
    pub(super) judge_token_file: Option<PathBuf>,
    /// PEM CA certificate for an https:// judge.
    #[arg(long)]
    pub(super) judge_tls_ca: Option<PathBuf>,
    /// Judge prompt file replacing the built-in one (placeholders: {instruction}, and
    /// {output_1}/{output_2} for AlpacaEval or {output} for safety; the answers compared
    /// are " A"/" B" and " safe"/" unsafe").
    #[arg(long)]
    pub(super) judge_prompt: Option<PathBuf>,
    /// Judge prompts per Score request.
    #[arg(long, default_value_t = 8)]
    pub(super) judge_batch: usize,
}

impl ModelArgs {
    /// The decoding settings, checked before anything is loaded or connected.
    pub(super) fn params(&self) -> Result<GenerateParams> {
        let stop =
            if self.stop.is_empty() { self.template.default_stops() } else { self.stop.clone() };
        let params = GenerateParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop,
            stop_at_eos: true,
        };
        params.validate()?;
        Ok(params)
    }
}
