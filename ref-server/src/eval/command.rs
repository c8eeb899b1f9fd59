//! Executing a parsed command line: read the benchmark, load the model under test or
//! connect to the server holding it (and to the judge), run the benchmark and write what it
//! produced.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dpo_common::model::{load_model, parse_dtype, Mode};
use dpo_proto::client::ClientOptions;
use dpo_proto::token::load_token;

use super::backend::{Backend, Local, Remote};
use super::benchmarks::{self, take, Evaluated};
use super::cli::{Cli, Command, JudgeArgs, ModelArgs};
use super::data;
use super::judge::Judge;
use super::report::{compare, Report};

impl JudgeArgs {
    /// The judge named by --judge-server, connected and checked; `None` without one.
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
    /// Loads the model (--model) or connects to the server holding it (--server).
    async fn load(&self) -> Result<Evaluated> {
        let params = self.params()?;
        let backend = match (&self.model, &self.connect.server) {
            (Some(path), None) => {
                let device = dpo_common::device::parse_device(&self.device)?;
                let dtype = parse_dtype(&self.dtype)?;
                let mut loaded = load_model(path, Mode::Frozen, dtype, &device)
                    .with_context(|| format!("loading {}", path.display()))?;
                if let Some(dir) = &self.adapter {
                    loaded = crate::engine::with_adapter(loaded, dir, dtype, &device)?;
                }
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

/// `name` in the directory of `out`.
fn beside(out: &Path, name: &str) -> PathBuf {
    out.parent().filter(|d| !d.as_os_str().is_empty()).map(|d| d.join(name)).unwrap_or(name.into())
}

/// Writes the report and prints its table.
fn finish(report: &Report, out: &Path) -> Result<()> {
    report.write(out)?;
    print!("{}", report.table());
    println!("report: {}", out.display());
    Ok(())
}

/// Runs one `dpo-eval` command: reads the benchmark, loads or connects to the model under
/// test, evaluates, writes the report (and the outputs) and prints the table.
pub fn run(cli: Cli) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Gsm8k(args) => {
            let examples = take(data::read_gsm8k(&args.input)?, args.limit)?;
            let ev = rt.block_on(args.load())?;
            finish(&rt.block_on(benchmarks::gsm8k(&ev, &examples))?, &args.out)
        }
        Command::Mmlu { args, by_logprob, per_subject } => {
            let mut examples = data::read_mmlu(&args.input)?;
            if let Some(k) = per_subject {
                data::keep_first_per_subject(&mut examples, k);
            }
            let examples = take(examples, args.limit)?;
            let ev = rt.block_on(args.load())?;
            finish(&rt.block_on(benchmarks::mmlu(&ev, &examples, by_logprob))?, &args.out)
        }
        Command::Alpacaeval { args, outputs, generator, reference_outputs, judge } => {
            let examples = take(data::read_alpaca_eval(&args.input)?, args.limit)?;
            let refs = match &reference_outputs {
                Some(p) => Some(data::read_alpaca_eval(p)?),
                None if judge.judge_server.is_some() => {
                    bail!("--judge-server needs --reference-outputs to compare against")
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
            let report =
                rt.block_on(benchmarks::alpacaeval(&ev, &examples, &generator, &outputs, j))?;
            println!("outputs: {}", outputs.display());
            finish(&report, &args.out)
        }
        Command::Safety { args, outputs, judge } => {
            let examples = take(data::read_safety(&args.input)?, args.limit)?;
            let judge = rt.block_on(judge.connect())?;
            let ev = rt.block_on(args.load())?;
            let outputs = outputs.unwrap_or_else(|| beside(&args.out, "safety_outputs.jsonl"));
            let report =
                rt.block_on(benchmarks::safety(&ev, &examples, &outputs, judge.as_ref()))?;
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
