//! `dpo-eval`: command-line parsing only; the benchmarks live in `ref-server/src/eval/`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dpo_common::generate::GenerateParams;
use dpo_common::model::{load_model, parse_dtype, Mode};
use dpo_proto::client::ClientOptions;
use dpo_proto::token::load_token;
use ref_server::connect::ConnectArgs;

#[path = "../eval/mod.rs"]
mod eval;

use eval::backend::{Backend, Local, Remote};
use eval::data;
use eval::judge::Judge;
use eval::prompts::EvalTemplate;
use eval::report::{compare, Report};
use eval::run::{self, take, Evaluated};

#[derive(Parser)]
#[command(
    name = "dpo-eval",
    version,
    about = "Evaluate a checkpoint on GSM8K, MMLU, AlpacaEval and SimpleSafetyTests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
struct ModelArgs {
    /// Model under test, loaded here: a Hugging Face directory (e.g. a trainer's `best/`)
    /// or a .gguf. Either this or --server.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// The benchmark file in its released format (`.gz` is read too).
    #[arg(long)]
    input: PathBuf,
    /// Evaluate only the first N examples.
    #[arg(long)]
    limit: Option<usize>,
    /// Largest number of generated tokens per example.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Prompt template: `alpaca` (as the trainer trains), `raw`, or `zero-shot` (the
    /// course's evaluation system prompt).
    #[arg(long, default_value = "alpaca")]
    template: EvalTemplate,
    /// Sampling temperature; 0 = greedy (the handout's setting).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed (example i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop sequence (repeatable); default: the template's (alpaca: "\n### ", zero-shot:
    /// "# Query:" and "```", raw: none).
    #[arg(long)]
    stop: Vec<String>,
    /// Prompts generated together (left-padded batch); with --server, questions per Score
    /// request for MMLU --by-logprob.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// With --model: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With --model: compute dtype, f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The JSON report.
    #[arg(long, default_value = "report.json")]
    out: PathBuf,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Requests kept in flight. The server runs one generation at a time
    /// (the others wait there), so more than 2 only pays off for MMLU --by-logprob scoring.
    #[arg(long, default_value_t = 2, help_heading = CONNECTION)]
    in_flight: usize,
}

#[derive(clap::Args)]
struct JudgeArgs {
    /// A ref-server serving the judge model (http://HOST:PORT or https://…).
    #[arg(long)]
    judge_server: Option<String>,
    /// Bearer token file for the judge (else env DPO_AUTH_TOKEN).
    #[arg(long)]
    judge_token_file: Option<PathBuf>,
    /// PEM CA certificate for an https:// judge.
    #[arg(long)]
    judge_tls_ca: Option<PathBuf>,
    /// Judge prompt file replacing the built-in one (placeholders: {instruction}, and
    /// {output_1}/{output_2} for AlpacaEval or {output} for safety; the answers compared
    /// are " A"/" B" and " safe"/" unsafe").
    #[arg(long)]
    judge_prompt: Option<PathBuf>,
    /// Judge prompts per Score request.
    #[arg(long, default_value_t = 8)]
    judge_batch: usize,
}

impl JudgeArgs {
    async fn connect(&self) -> Result<Option<Judge>> {
        let Some(url) = &self.judge_server else { return Ok(None) };
        let opts = ClientOptions {
            url: url.clone(),
            token: load_token(self.judge_token_file.as_deref())?,
            ca_cert: self.judge_tls_ca.clone(),
            connect_timeout: Duration::from_secs(30),
            ..ClientOptions::default()
        };
        let mut judge = Judge::connect(&opts).await?;
        judge.batch = self.judge_batch;
        if let Some(p) = &self.judge_prompt {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the judge prompt {}", p.display()))?;
            judge.pairwise_prompt = text.clone();
            judge.safety_prompt = text;
        }
        Ok(Some(judge))
    }
}

impl ModelArgs {
    /// The decoding settings, checked before anything is loaded or connected.
    fn params(&self) -> Result<GenerateParams> {
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

    /// Loads the model (--model) or connects to the server holding it (--server).
    async fn load(&self) -> Result<Evaluated> {
        let params = self.params()?;
        let backend = match (&self.model, &self.connect.server) {
            (Some(path), None) => {
                let device = dpo_common::device::parse_device(&self.device)?;
                let dtype = parse_dtype(&self.dtype)?;
                let mut loaded = load_model(path, Mode::Frozen, dtype, &device)
                    .with_context(|| format!("loading {}", path.display()))?;
                loaded.model.pack_for_inference()?;
                Backend::Local(Box::new(Local { loaded, model_arg: path.display().to_string() }))
            }
            (None, Some(_)) => {
                let opts = self.connect.options()?;
                Backend::Remote(Box::new(Remote::connect(&opts, self.in_flight).await?))
            }
            // clap's `under_test` group makes these unreachable; say so plainly anyway.
            _ => bail!("give exactly one of --model PATH (load it here) or --server URL"),
        };
        Ok(Evaluated {
            backend,
            template: self.template,
            params,
            batch_size: self.batch_size,
            input: self.input.display().to_string(),
            limit: self.limit,
        })
    }
}

fn beside(out: &Path, name: &str) -> PathBuf {
    out.parent().filter(|d| !d.as_os_str().is_empty()).map(|d| d.join(name)).unwrap_or(name.into())
}

fn finish(report: &Report, out: &Path) -> Result<()> {
    report.write(out)?;
    print!("{}", report.table());
    println!("report: {}", out.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Gsm8k(args) => {
            let examples = take(data::read_gsm8k(&args.input)?, args.limit)?;
            let ev = rt.block_on(args.load())?;
            finish(&rt.block_on(run::gsm8k(&ev, &examples))?, &args.out)
        }
        Command::Mmlu { args, by_logprob, per_subject } => {
            let mut examples = data::read_mmlu(&args.input)?;
            if let Some(k) = per_subject {
                let mut seen = std::collections::HashMap::<String, usize>::new();
                examples.retain(|e| {
                    let c = seen.entry(e.subject.clone()).or_default();
                    *c += 1;
                    *c <= k
                });
            }
            let examples = take(examples, args.limit)?;
            let ev = rt.block_on(args.load())?;
            finish(&rt.block_on(run::mmlu(&ev, &examples, by_logprob))?, &args.out)
        }
        Command::Alpacaeval { args, outputs, generator, reference_outputs, judge } => {
            let examples = take(data::read_alpaca_eval(&args.input)?, args.limit)?;
            let refs = match &reference_outputs {
                Some(p) => Some(data::read_alpaca_eval(p)?),
                None if judge.judge_server.is_some() => {
                    anyhow::bail!("--judge-server needs --reference-outputs to compare against")
                }
                None => None,
            };
            // Connect first: a wrong judge URL should fail before minutes of generation.
            let judge = rt.block_on(judge.connect())?;
            let ev = rt.block_on(args.load())?;
            let outputs = outputs.unwrap_or_else(|| beside(&args.out, "outputs.json"));
            let generator = generator.unwrap_or_else(|| {
                let model = PathBuf::from(ev.backend.identity().model);
                model
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or("model".into())
            });
            let j = judge.as_ref().zip(refs.as_deref());
            let report = rt.block_on(run::alpacaeval(&ev, &examples, &generator, &outputs, j))?;
            println!("outputs: {}", outputs.display());
            finish(&report, &args.out)
        }
        Command::Safety { args, outputs, judge } => {
            let examples = take(data::read_safety(&args.input)?, args.limit)?;
            let judge = rt.block_on(judge.connect())?;
            let ev = rt.block_on(args.load())?;
            let outputs = outputs.unwrap_or_else(|| beside(&args.out, "safety_outputs.jsonl"));
            let report = rt.block_on(run::safety(&ev, &examples, &outputs, judge.as_ref()))?;
            println!("outputs: {}", outputs.display());
            finish(&report, &args.out)
        }
        Command::Compare { a, b } => {
            let (ra, rb) = (Report::read(&a)?, Report::read(&b)?);
            let name = |p: &Path| {
                p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
            };
            print!("{}", compare(&ra, &rb, &name(&a), &name(&b)));
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    dpo_common::model::ops::fix_thread_count(); // before any other thread exists
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
