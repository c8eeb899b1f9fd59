//! The `policy-trainer train` flags: every knob of a run, with its default, in one place.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use candle_core::DType;
use clap::{Args, ValueEnum};
use dpo_common::model::lora::{parse_targets, LoraConfig};
use dpo_common::template::Template;
use dpo_proto::client::ClientOptions;
use dpo_proto::connect::ConnectArgs;

use crate::loss::{LossFlags, LossSpec};
use crate::metrics::{EvalResult, ReportTo};

/// `--ref-server none`: no reference server, for a reference-free loss.
pub const NO_REFERENCE: &str = "none";

/// The reference server when `--ref-server` is not given.
pub const DEFAULT_REF_SERVER: &str = "http://127.0.0.1:50051";

/// Which validation number picks the `best/` checkpoint.
/// `--length-policy`, mapped onto the data layer's [`dpo_common::data::LengthPolicy`]
/// (`common` has no CLI dependency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LengthPolicyArg {
    /// Cut the prompt from the left first, then the responses from the right.
    Truncate,
    /// Leave over-long pairs out.
    Drop,
}

impl From<LengthPolicyArg> for dpo_common::data::LengthPolicy {
    fn from(p: LengthPolicyArg) -> Self {
        match p {
            LengthPolicyArg::Truncate => dpo_common::data::LengthPolicy::Truncate,
            LengthPolicyArg::Drop => dpo_common::data::LengthPolicy::Drop,
        }
    }
}

/// Dtype of what the trainer keeps per parameter besides the weights: the gradient
/// accumulator (`--grad-dtype`) and RMSprop's square averages (`--optim-state-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateDtype {
    /// 4 bytes per parameter, as PyTorch keeps them.
    F32,
    /// 2 bytes per parameter, rounded stochastically at every update.
    Bf16,
}

impl StateDtype {
    pub fn dtype(self) -> DType {
        match self {
            StateDtype::F32 => DType::F32,
            StateDtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SelectMetric {
    /// Fraction of pairs whose implicit reward (β(π−ref); β·π/n without a reference) is
    /// higher for the chosen response.
    RewardAccuracy,
    /// Fraction of pairs where the policy gives the chosen response the higher log-prob.
    LogpAccuracy,
    /// Validation loss, of the --loss in use (lower is better).
    Loss,
}

impl SelectMetric {
    pub fn name(self) -> &'static str {
        match self {
            SelectMetric::RewardAccuracy => "reward_accuracy",
            SelectMetric::LogpAccuracy => "logp_accuracy",
            SelectMetric::Loss => "loss",
        }
    }

    /// This metric's value in a validation result.
    pub fn value(self, e: &EvalResult) -> f64 {
        match self {
            SelectMetric::RewardAccuracy => e.reward_accuracy,
            SelectMetric::LogpAccuracy => e.logp_accuracy,
            SelectMetric::Loss => e.loss,
        }
    }

    /// True when `new` beats `old`.
    pub fn improves(self, new: f64, old: Option<f64>) -> bool {
        match (self, old) {
            (_, None) => true,
            (SelectMetric::Loss, Some(old)) => new < old,
            (_, Some(old)) => new > old,
        }
    }
}

// The reference server's connection flags are every client's (`dpo_proto::connect`),
// spelled `--ref-server` and `--ref-timeout` here: `--ref-server` has no default value in
// clap so that "not given" (the default URL) and `none` can be told apart, and the timeout
// is the whole patience of a run with a server that is down, not one connection attempt.
#[derive(Debug, Clone, Args)]
#[command(
    mut_arg("server", |a| a
        .long("ref-server")
        .default_value(None::<&str>)
        .help(concat!(
            "The reference server (http://HOST:PORT, or https:// with TLS) [default: ",
            "http://127.0.0.1:50051]. `none` for a reference-free --loss (simpo, sft): no ",
            "server, no reference cache. A reference-free loss never contacts a server; one ",
            "given anyway is reported as unused"
        ))),
    mut_arg("connect_timeout", |a| a
        .long("ref-timeout")
        .default_value("300")
        .help("Seconds the reference server may be unreachable or still loading before the \
               run gives up")),
)]
pub struct TrainArgs {
    /// The starting model: a Hugging Face directory or a .gguf file. It must be the model
    /// the reference server holds (checked through the fingerprints).
    #[arg(long)]
    pub model: PathBuf,

    /// How to reach the reference server: `--ref-server`, `--ref-timeout`, TLS and token.
    #[command(flatten)]
    pub reference: ConnectArgs,

    /// Preference data as JSONL lines {"prompt","chosen","rejected"}.
    #[arg(long, conflicts_with = "hh_dir", required_unless_present = "hh_dir")]
    pub data: Option<PathBuf>,

    /// Anthropic HH directory ({subset}/{split}.jsonl.gz); single-turn pairs of the
    /// subsets below are used.
    #[arg(long)]
    pub hh_dir: Option<PathBuf>,

    /// HH subsets to combine.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "harmless-base,helpful-base,helpful-online,helpful-rejection-sampled"
    )]
    pub hh_subsets: Vec<String>,

    /// HH split file to read (train or test).
    #[arg(long, default_value = "train")]
    pub hh_split: String,

    /// Where best/, last/, metrics.jsonl and the chart go.
    #[arg(long, default_value = "runs/dpo")]
    pub out: PathBuf,

    /// Continue the run in --out from last/ (same data and flags).
    #[arg(long)]
    pub resume: bool,

    /// Where the metrics go besides OUT/metrics.jsonl: none, or tensorboard (event files in
    /// OUT, tagged as Hugging Face's Trainer tags them, for `tensorboard --logdir`).
    #[arg(long, value_enum, default_value = "none")]
    pub report_to: ReportTo,

    /// Prompt template: alpaca (the prompt is an instruction) or raw.
    #[arg(long, default_value = "alpaca")]
    pub template: Template,

    /// Longest prompt + response in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,

    /// Over-long pairs: truncate (prompt from the left first, then the responses) or drop.
    #[arg(long, value_enum, default_value = "truncate")]
    pub length_policy: LengthPolicyArg,

    /// Held-out validation pairs.
    #[arg(long, default_value_t = 200)]
    pub val_size: usize,

    /// Seed of the validation split and the per-epoch shuffles.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// The preference loss, as TRL names it: sigmoid (DPO), robust, ipo, hinge, exo_pair,
    /// nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop,
    /// sigmoid_norm, simpo (reference-free), sft (NLL of the chosen response); or a weighted
    /// mix, e.g. `sigmoid:1,sft:0.5` (docs/training.md#losses).
    #[arg(long, default_value = "sigmoid")]
    pub loss: String,

    /// The temperature β of every loss (IPO's τ, SimPO's β).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,

    /// ε, the assumed rate of flipped labels: conservative DPO (sigmoid), robust, exo_pair
    /// (needed there), aot, aot_unpaired, simpo [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,

    /// DiscoPOP's τ (discopop only) [default: 0.05].
    #[arg(long)]
    pub discopop_tau: Option<f64>,

    /// SimPO's target margin γ in units of β (simpo only) [default: 0.25].
    #[arg(long)]
    pub gamma_beta_ratio: Option<f64>,

    /// Adds the NLL of the chosen response with this weight (RPO; the same as `,sft:W` in
    /// --loss).
    #[arg(long)]
    pub sft_weight: Option<f64>,

    /// RMSprop learning rate.
    #[arg(long, default_value_t = 1e-6)]
    pub lr: f64,

    /// Pairs per optimizer step (gradients are averaged over them).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,

    /// Pairs per forward/backward pass (gradient accumulation covers the rest).
    #[arg(long, default_value_t = 1)]
    pub micro_batch: usize,

    /// Clip the global gradient norm to this (0 = no clipping).
    #[arg(long, default_value_t = 0.0)]
    pub max_grad_norm: f64,

    /// RMSprop weight decay (L2, PyTorch semantics).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,

    /// Passes over the training set.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,

    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,

    /// Evaluate every this many steps (and at step 0 and at the end).
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,

    /// Save last/ (for --resume) every this many steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: usize,

    /// Validation metric that selects best/.
    #[arg(long, value_enum, default_value = "reward-accuracy")]
    pub select_metric: SelectMetric,

    /// Pairs of upcoming work kept in flight at the reference server.
    #[arg(long, default_value_t = 256)]
    pub ref_prefetch: usize,

    /// Pairs per Score request.
    #[arg(long, default_value_t = 8)]
    pub ref_batch: usize,

    /// Persistent reference-score cache (default: OUT/ref_cache.jsonl).
    #[arg(long)]
    pub ref_cache: Option<PathBuf>,

    /// Train even if the server's model fingerprint differs from the starting model's.
    #[arg(long)]
    pub allow_different_reference: bool,

    /// Device of the policy: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Compute dtype of the policy: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// Dtype of the gradient accumulator (the sum of the micro-batches' gradients). f32
    /// sums exactly as PyTorch does. bf16 halves its memory (Llama 3.1 8B: 16 GB instead of
    /// 32): with bf16 weights and --optim-state-dtype bf16 that fits 8B on one 80 GB GPU
    /// (the memory model's peak at micro-batch 1: 57 GiB). Each add is rounded
    /// stochastically, so small gradients are kept on average, at a noise of about one bf16
    /// spacing (2^-8 relative) of each sum. On a CPU, keep f32: memory is rarely the limit
    /// there and the bf16 adds are slower than f32's.
    #[arg(long, value_enum, default_value = "f32")]
    pub grad_dtype: StateDtype,

    /// Dtype of RMSprop's square averages. f32 as PyTorch; bf16 halves them (8B: 16 GB
    /// instead of 32). Each step is computed in f32 and the stored average rounded
    /// stochastically: the averages carry noise of up to 1-2% (the step sizes 1/sqrt(v)
    /// half that), unbiased and small next to their own sampling noise. On a CPU,
    /// keep f32 (the in-place RMSprop step needs f32 state and f32 weights). --resume needs
    /// the dtype the run was started with.
    #[arg(long, value_enum, default_value = "f32")]
    pub optim_state_dtype: StateDtype,

    /// Per-layer activation checkpointing: keep only each layer's input during the forward
    /// and recompute the layer in the backward (one more forward per micro-batch; the memory
    /// of one layer's activations instead of all).
    #[arg(long)]
    pub grad_checkpointing: bool,

    /// A prompt prefix at least this long that every pair of an optimizer step shares (the
    /// template's preamble) goes through the policy once per step instead of once per pair,
    /// with the same gradients up to float rounding; 0 turns this off.
    #[arg(long, default_value_t = dpo_common::prefix::DEFAULT_MIN_PREFIX_TOKENS)]
    pub prefix_min_tokens: usize,

    /// LoRA: train rank-r adapters on a frozen base instead of every weight (0 = full
    /// fine-tuning). The adapters are initialised as PEFT does (B = 0), so step 0 is the
    /// base model exactly; best/ and last/ hold them in PEFT's format
    /// (docs/training.md#lora---lora-rank).
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,

    /// LoRA's alpha: the adapters' output is scaled by alpha / rank [default: 2 × rank,
    /// a scale of 2, as TRL's examples use (r 16, alpha 32)].
    #[arg(long)]
    pub lora_alpha: Option<f64>,

    /// Dropout on the adapters' input during training passes (PEFT's lora_dropout; never
    /// in validation).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,

    /// The projections that carry adapters, as PEFT names them (comma-separated), or all.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    pub lora_targets: String,

    /// With --lora-rank: also write OUT/merged/, the base with the best adapter (the last
    /// one if no evaluation ran) added into its weights, a plain Hugging Face checkpoint.
    #[arg(long)]
    pub save_merged: bool,

    /// No progress bar (log lines only), e.g. when stderr is a file.
    #[arg(long)]
    pub no_progress: bool,
}

impl TrainArgs {
    /// The loss the flags choose, checked (every error names its flag).
    pub fn loss_spec(&self) -> anyhow::Result<LossSpec> {
        LossSpec::from_flags(&LossFlags {
            loss: &self.loss,
            beta: self.beta,
            label_smoothing: self.label_smoothing,
            discopop_tau: self.discopop_tau,
            gamma_beta_ratio: self.gamma_beta_ratio,
            sft_weight: self.sft_weight,
        })
    }

    /// The reference server's URL; `None` for `--ref-server none`.
    pub fn ref_server_url(&self) -> Option<&str> {
        match self.reference.server.as_deref() {
            Some(NO_REFERENCE) => None,
            Some(url) => Some(url),
            None => Some(DEFAULT_REF_SERVER),
        }
    }

    /// The `--ref-server` given on the command line, if any (`none` included).
    pub fn ref_server_flag(&self) -> Option<&str> {
        self.reference.server.as_deref()
    }

    /// How to reach the reference server: its URL, bearer token and TLS settings.
    pub fn client_options(&self) -> anyhow::Result<ClientOptions> {
        let url = self.ref_server_url().context("--ref-server none: there is no server")?;
        let with_url = ConnectArgs { server: Some(url.to_string()), ..self.reference.clone() };
        let mut options = with_url.options()?;
        // `--ref-timeout` is the run's whole patience ([`TrainArgs::ref_timeout`]); one
        // connection attempt keeps the clients' usual limit, so that retries keep coming.
        options.connect_timeout = ClientOptions::default().connect_timeout.min(self.ref_timeout());
        Ok(options)
    }

    pub fn ref_timeout(&self) -> Duration {
        Duration::from_secs(self.reference.connect_timeout)
    }

    pub fn ref_cache_path(&self) -> PathBuf {
        self.ref_cache.clone().unwrap_or_else(|| self.out.join("ref_cache.jsonl"))
    }

    /// The LoRA configuration the flags ask for; `None` for full fine-tuning
    /// (`--lora-rank 0`). Every error names its flag; the rank is checked against the
    /// model's dimensions once it is loaded ([`LoraConfig::validate`]).
    pub fn lora_config(&self) -> anyhow::Result<Option<LoraConfig>> {
        if self.lora_rank == 0 {
            return Ok(None);
        }
        let targets = parse_targets(&self.lora_targets).context("--lora-targets")?;
        let alpha = self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f64);
        anyhow::ensure!(
            alpha.is_finite() && alpha > 0.0,
            "--lora-alpha must be positive, not {alpha}"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.lora_dropout),
            "--lora-dropout must be in [0, 1), not {}",
            self.lora_dropout
        );
        Ok(Some(LoraConfig { rank: self.lora_rank, alpha, dropout: self.lora_dropout, targets }))
    }

    /// Flag combinations that cannot work, caught before anything loads.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        anyhow::ensure!(self.micro_batch > 0, "--micro-batch must be at least 1");
        anyhow::ensure!(
            self.batch_size.is_multiple_of(self.micro_batch),
            "--batch-size {} is not a multiple of --micro-batch {}",
            self.batch_size,
            self.micro_batch
        );
        anyhow::ensure!(self.eval_every > 0, "--eval-every must be at least 1");
        anyhow::ensure!(self.save_every > 0, "--save-every must be at least 1");
        anyhow::ensure!(self.epochs > 0, "--epochs must be at least 1");
        anyhow::ensure!(self.beta > 0.0, "--beta must be positive");
        let spec = self.loss_spec()?;
        anyhow::ensure!(
            !spec.needs_reference() || self.ref_server_url().is_some(),
            "--loss {spec} needs a reference model, but --ref-server is none; give the \
             reference server's URL (only reference-free losses train without one: simpo, \
             sft, or a mix of them)"
        );
        anyhow::ensure!(self.lr >= 0.0, "--lr must not be negative");
        anyhow::ensure!(self.max_length >= 2, "--max-length must be at least 2");
        anyhow::ensure!(self.max_grad_norm >= 0.0, "--max-grad-norm must not be negative");
        let lora = self.lora_config()?;
        anyhow::ensure!(
            self.lora_dropout == 0.0 || !spec.gradient_couples_batch(),
            "--lora-dropout with --loss {spec}: this loss scores each micro-batch in a separate \
             pass first, which would see no dropout; use --lora-dropout 0"
        );
        anyhow::ensure!(
            lora.is_some() || !self.save_merged,
            "--save-merged merges LoRA adapters into the base: it needs --lora-rank"
        );
        anyhow::ensure!(
            lora.is_some() || self.lora_alpha.is_none(),
            "--lora-alpha is given without --lora-rank (0 means full fine-tuning)"
        );
        Ok(())
    }
}
