//! The DPO training loop: data → policy log-probs (with gradients) and reference
//! log-probs (from the server, prefetched and cached) → DPO loss → gradient accumulation
//! over `--batch-size` pairs → one RMSprop step; validation every `--eval-every` steps,
//! `best/` on each new best validation metric, `last/` every `--save-every` steps.
//!
//! A run is a pure function of (starting model, data, flags): the data order comes from
//! the seed and the epoch, so `--resume` from `last/` replays exactly the steps an
//! uninterrupted run would have taken.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use dpo_common::data::{self, EncodedPair, PreferencePair};
use dpo_common::device::parse_device;
use dpo_common::logprob::{prefixed_logprobs, shared_prompt_logprobs, SharedPrompt};
use dpo_common::memory;
use dpo_common::model::backward::{self, PrefixPass};
use dpo_common::model::{grad_ops, load_model, parse_dtype, Llama, LoadedModel, Mode, PrefixKv};
use dpo_common::prefix::usable_prefix_len;
use dpo_common::sround::update_seed;
use dpo_proto::client::ClientOptions;
use dpo_proto::token::load_token;
use sha2::{Digest, Sha256};

use crate::args::TrainArgs;
use crate::checkpoint::{self, BestMeta, TrainerState};
use crate::dpo;
use crate::eval::{evaluate, EvalResult};
use crate::metrics::{EvalRecord, MetricsLog, TrainRecord};
use crate::optim::{clip_grad_norm, GradAccumulator, RmsProp, RmsPropConfig};
use crate::plot;
use crate::ref_cache::RefCache;
use crate::ref_client::{ReferenceScorer, ScorerOptions};

/// Smallest fraction of real (not padding) tokens in a forward pass: on a CPU a padded
/// position costs as much as a real one. Measured on SmolLM2 with tests/bench/train.sh
/// (16 HH pairs, same invocation as the baselines): 0.9 vs 0.5 gave micro-batch 1 0.330 vs
/// 0.337 examples/s (within this machine's run-to-run noise of ±15%) and micro-batch 4
/// 0.361 vs 0.316 examples/s at 5.2 vs 8.6 GB peak RSS.
const MIN_FILL: f64 = 0.9;

/// Groups row indices into forward passes, longest first, each pass keeping at least
/// [`MIN_FILL`] of its padded tokens real.
fn packed_passes(lens: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lens[i]), i));
    let mut passes: Vec<Vec<usize>> = Vec::new();
    let mut real = 0;
    for i in order {
        if let Some(pass) = passes.last_mut() {
            let longest = lens[pass[0]];
            if (real + lens[i]) as f64 >= MIN_FILL * (longest * (pass.len() + 1)) as f64 {
                pass.push(i);
                real += lens[i];
                continue;
            }
        }
        passes.push(vec![i]);
        real = lens[i];
    }
    passes
}

/// A pair as one row of the forward pass: the prompt once, then the chosen and the rejected
/// response, each attending to the prompt and to itself (`logprob::SharedPrompt`). On HH
/// with the Alpaca template this is about a quarter fewer tokens than two sequences.
pub fn shared_row(p: &EncodedPair) -> SharedPrompt {
    SharedPrompt {
        prompt: p.prompt_ids.clone(),
        responses: vec![p.chosen_ids.clone(), p.rejected_ids.clone()],
    }
}

/// The forward passes of a micro-batch: its pairs' rows grouped so that padding stays under
/// 10% ([`packed_passes`]).
fn row_passes(pairs: &[EncodedPair]) -> (Vec<SharedPrompt>, Vec<Vec<usize>>) {
    let rows: Vec<SharedPrompt> = pairs.iter().map(shared_row).collect();
    let lens: Vec<usize> = rows.iter().map(SharedPrompt::row_len).collect();
    let passes = packed_passes(&lens);
    (rows, passes)
}

/// The longest prompt prefix every pair of `pairs` starts with, leaving each prompt its
/// last token (which predicts the first response token); `None` when shorter than
/// `min_tokens` or when `min_tokens` is 0. With the Alpaca template this is at least the
/// template's preamble, whatever the data: it goes through the policy once per optimizer
/// step (or evaluation) instead of once per pair (`model::backward`'s prefix pass).
pub fn common_prefix(pairs: &[EncodedPair], min_tokens: usize) -> Option<Vec<u32>> {
    let first = &pairs.first()?.prompt_ids;
    let len = usable_prefix_len(first, pairs.iter().map(|p| p.prompt_ids.as_slice()));
    (min_tokens > 0 && len >= min_tokens).then(|| first[..len].to_vec())
}

/// Policy log-probs of pairs, without gradients (validation): (chosen [m], rejected [m]).
/// With `prefix` (which every pair's prompt must extend), its tokens are not recomputed.
pub fn policy_logprobs(
    policy: &Llama,
    pairs: &[EncodedPair],
    prefix: Option<&PrefixKv>,
) -> Result<(Tensor, Tensor)> {
    let (rows, passes) = row_passes(pairs);
    let mut chosen = vec![0f32; pairs.len()];
    let mut rejected = vec![0f32; pairs.len()];
    for pass in &passes {
        let batch: Vec<SharedPrompt> = pass.iter().map(|&i| rows[i].clone()).collect();
        let lp = match prefix {
            Some(prefix) => prefixed_logprobs(policy, &batch, prefix)?,
            None => shared_prompt_logprobs(policy, &batch)?,
        };
        let sums = lp.sums.to_vec1::<f32>()?;
        for (k, &i) in pass.iter().enumerate() {
            chosen[i] = sums[2 * k];
            rejected[i] = sums[2 * k + 1];
        }
    }
    let device = policy.device();
    Ok((Tensor::new(chosen, device)?, Tensor::new(rejected, device)?))
}

/// Trains on a micro-batch: adds the gradients of its summed DPO loss / `divisor` into
/// `grads` (one per parameter, `Llama::params()` order) and returns its statistics.
///
/// The reference scores are taken first (prefetched, so normally ready), which lets each
/// forward pass be followed at once by its backward: only one pass's activations exist at
/// a time. The policy side is `model::backward` (hand-written, gradients added in place);
/// the loss's gradient with respect to each log-prob comes from candle's autograd on the
/// few numbers of [`dpo::dpo_loss`], so the loss is written once. With `prefix`, the
/// passes start from the step's prefix pass and add its gradients into it.
fn micro_batch_grads(
    args: &TrainArgs,
    policy: &Llama,
    scorer: &ReferenceScorer,
    micro: &[EncodedPair],
    divisor: f64,
    grads: &mut [Tensor],
    mut prefix: Option<&mut PrefixPass>,
) -> Result<dpo::DpoStats> {
    let refs = scorer.scores(micro)?;
    let (rows, passes) = row_passes(micro);
    let mut stats = dpo::DpoStats::default();
    for pass in &passes {
        let batch: Vec<SharedPrompt> = pass.iter().map(|&i| rows[i].clone()).collect();
        let training = match prefix.as_deref() {
            Some(p) => backward::forward_shared_after(policy, &batch, p, args.grad_checkpointing)?,
            None => backward::forward_shared(policy, &batch, args.grad_checkpointing)?,
        };
        let sums = training.logprobs.sums.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (chosen, rejected): (Vec<f32>, Vec<f32>) =
            sums.chunks_exact(2).map(|cr| (cr[0], cr[1])).unzip();
        let device = policy.device();
        let chosen = Var::from_tensor(&Tensor::new(chosen, device)?)?;
        let rejected = Var::from_tensor(&Tensor::new(rejected, device)?)?;
        let pass_refs: Vec<dpo::RefScores> = pass.iter().map(|&i| refs[i]).collect();
        let out = dpo::dpo_loss(chosen.as_tensor(), rejected.as_tensor(), &pass_refs, args.beta)?;
        stats.merge(&out.stats);
        let loss_grads = (out.losses.sum_all()? / divisor)?.backward()?;
        let d = |v: &Var| -> Result<Vec<f32>> {
            let g = loss_grads.get(v.as_tensor()).context("the DPO loss has no gradient")?;
            Ok(g.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        let (dc, dr) = (d(&chosen)?, d(&rejected)?);
        let dsums: Vec<f32> = dc.iter().zip(&dr).flat_map(|(&c, &r)| [c, r]).collect();
        match prefix.as_deref_mut() {
            Some(p) => backward::backward_after_prefix(training, &dsums, grads, p)?,
            None => backward::backward(training, &dsums, grads)?,
        }
    }
    Ok(stats)
}

/// What a finished run prints.
pub struct RunSummary {
    pub out: PathBuf,
    pub steps: usize,
    pub examples_seen: usize,
    pub best: Option<(usize, f64, String)>,
    pub final_eval: Option<EvalResult>,
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "trained {} steps ({} examples)", self.steps, self.examples_seen)?;
        if let Some(e) = &self.final_eval {
            writeln!(
                f,
                "final validation: loss {:.4}, reward accuracy {:.3}, log-prob accuracy {:.3}, margin {:.4}",
                e.loss, e.reward_accuracy, e.logp_accuracy, e.margin
            )?;
        }
        match &self.best {
            Some((step, value, metric)) => writeln!(
                f,
                "best:    {} (step {step}, {metric} {value:.4})",
                self.out.join(checkpoint::BEST_DIR).display()
            )?,
            None => writeln!(f, "best:    none saved (no evaluation after step 0)")?,
        }
        writeln!(f, "resume:  {}", self.out.join(checkpoint::LAST_DIR).display())?;
        writeln!(f, "metrics: {}", self.out.join("metrics.jsonl").display())?;
        write!(f, "chart:   {}", self.out.join(plot::CHART_FILE).display())?;
        if let Some(peak) = dpo_common::memory::peak_rss_bytes() {
            write!(f, "\npeak memory (RSS): {:.2} GiB", peak as f64 / (1u64 << 30) as f64)?;
        }
        Ok(())
    }
}

/// Loads the preference pairs the flags name, printing what was kept and dropped.
fn load_pairs(args: &TrainArgs) -> Result<Vec<PreferencePair>> {
    if let Some(dir) = &args.hh_dir {
        let (pairs, reports) = data::read_hh_dir(dir, &args.hh_split, &args.hh_subsets)?;
        for r in &reports {
            eprintln!("{r}");
        }
        Ok(pairs)
    } else if let Some(path) = &args.data {
        let (pairs, report) = data::read_preference_jsonl(path)?;
        eprintln!("{report}");
        Ok(pairs)
    } else {
        bail!("no training data: pass --data FILE.jsonl or --hh-dir DIR")
    }
}

/// Identity of the tokenized data, split and order seed: a resume on anything else would
/// silently train a different run.
fn data_fingerprint(train: &[EncodedPair], val: &[EncodedPair], seed: u64) -> String {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    for (tag, set) in [(0u8, train), (1u8, val)] {
        h.update([tag]);
        h.update((set.len() as u64).to_le_bytes());
        for p in set {
            for ids in [&p.prompt_ids, &p.chosen_ids, &p.rejected_ids] {
                h.update((ids.len() as u64).to_le_bytes());
                for id in ids.iter() {
                    h.update(id.to_le_bytes());
                }
            }
        }
    }
    let digest: [u8; 32] = h.finalize().into();
    format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Refuses an output directory that holds another run, so nothing is overwritten.
fn check_out_dir(args: &TrainArgs) -> Result<()> {
    let last = checkpoint::last_dir(&args.out);
    let best = checkpoint::best_dir(&args.out);
    if !args.resume && (last.exists() || best.exists()) {
        bail!(
            "{} already holds a run (best/ or last/ exist); pass --resume to continue it, or \
             choose another --out",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output directory {}", args.out.display()))?;
    for dir in checkpoint::sweep_stale_temp_dirs(&args.out)? {
        tracing::info!("removed {}, left by a save that was cut short", dir.display());
    }
    Ok(())
}

pub fn run(args: TrainArgs) -> Result<RunSummary> {
    args.validate()?;
    // The data first: a wrong path or a malformed file fails in a second, not after the
    // model has loaded and the server answered.
    let pairs = load_pairs(&args)?;
    check_out_dir(&args)?;
    let resume_state =
        if args.resume { Some(checkpoint::read_trainer_state(&args.out)?) } else { None };

    // The policy: from --model on a fresh start, from last/ on resume.
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let policy_path =
        if resume_state.is_some() { checkpoint::last_dir(&args.out) } else { args.model.clone() };
    tracing::info!("loading the policy from {}", policy_path.display());
    let LoadedModel { model: policy, tokenizer, fingerprint, .. } =
        load_model(&policy_path, Mode::Trainable, dtype, &device)
            .with_context(|| format!("cannot load the policy from {}", policy_path.display()))?;
    let start_fingerprint =
        resume_state.as_ref().map(|s| s.start_fingerprint.clone()).unwrap_or(fingerprint);

    // The reference: same model as the policy started from, unless told otherwise.
    let cache = RefCache::open(&args.ref_cache_path())?;
    let scorer = ReferenceScorer::connect(
        ScorerOptions {
            client: ClientOptions {
                url: args.ref_server.clone(),
                token: load_token(args.auth_token_file.as_deref())?,
                ca_cert: args.tls_ca.clone(),
                tls_domain: args.tls_domain.clone(),
                ..ClientOptions::default()
            },
            timeout: args.ref_timeout(),
            pairs_per_request: args.ref_batch,
            max_requests_in_flight: 4,
        },
        cache,
    )?;
    let info = scorer.info();
    if info.fingerprint != start_fingerprint {
        let msg = format!(
            "the reference server {} holds a different model ({} from {}) than the policy \
             starts from ({} from {})",
            args.ref_server,
            info.fingerprint,
            info.source,
            start_fingerprint,
            args.model.display()
        );
        if !args.allow_different_reference {
            bail!("{msg}; start the server on the same checkpoint, or pass --allow-different-reference");
        }
        tracing::warn!("{msg}; continuing because of --allow-different-reference");
    }
    anyhow::ensure!(
        info.vocab_size as usize == policy.config().vocab_size,
        "the reference's vocabulary ({}) differs from the policy's ({}): their log-probs are not comparable",
        info.vocab_size,
        policy.config().vocab_size
    );

    // Data: tokenize, apply the length policy, split off validation.
    let (encoded, length_report) = data::encode_pairs(
        &tokenizer,
        args.template,
        &pairs,
        args.max_length.min(info.max_tokens_per_item as usize),
        args.length_policy.into(),
    )?;
    eprintln!("{length_report}");
    let (train_set, val_set) = data::split_validation(encoded, args.val_size, args.seed)?;
    anyhow::ensure!(!train_set.is_empty(), "no training pairs left after the validation split");
    let data_fp = data_fingerprint(&train_set, &val_set, args.seed);
    eprintln!(
        "{} training pairs, {} validation pairs; batch {} (micro-batch {}), {} epoch(s)",
        train_set.len(),
        val_set.len(),
        args.batch_size,
        args.micro_batch,
        args.epochs
    );

    check_memory(&args, &policy, &device, dtype, &train_set, &val_set)?;

    let mut optimizer = RmsProp::new(
        policy.vars(),
        RmsPropConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            rounding_seed: args.seed,
            state_dtype: args.optim_state_dtype.dtype(),
            ..RmsPropConfig::default()
        },
    )?;
    let mut state = match resume_state {
        Some(state) => {
            anyhow::ensure!(
                state.data_fingerprint == data_fp,
                "--resume: the data, split or seed differ from the run in {} (its data \
                 fingerprint {}, now {data_fp})",
                args.out.display(),
                state.data_fingerprint
            );
            let path = checkpoint::last_dir(&args.out).join(checkpoint::OPTIMIZER_STATE);
            optimizer
                .load(&path)
                .with_context(|| format!("cannot restore the optimizer from {}", path.display()))?;
            eprintln!(
                "resuming at step {} (epoch {}, pair {})",
                state.step, state.epoch, state.epoch_position
            );
            state
        }
        None => TrainerState {
            step: 0,
            epoch: 0,
            epoch_position: 0,
            examples_seen: 0,
            best_value: None,
            best_step: None,
            seed: args.seed,
            start_fingerprint: start_fingerprint.clone(),
            data_fingerprint: data_fp,
        },
    };
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics = MetricsLog::open(&metrics_path, args.resume.then_some(state.step))?;
    let chart_path = args.out.join(plot::CHART_FILE);

    let steps_per_epoch = train_set.len().div_ceil(args.batch_size);
    let total_steps = (steps_per_epoch * args.epochs).min(args.max_steps.unwrap_or(usize::MAX));
    let progress = Progress::new(total_steps, state.step, args.no_progress);
    let mut run = Run {
        args: &args,
        policy: &policy,
        tokenizer: &tokenizer,
        scorer: &scorer,
        val_set: &val_set,
        metrics: &mut metrics,
        chart_path: &chart_path,
        progress: &progress,
        last_eval: None,
    };

    if state.step == 0 {
        // The starting point of the curve; policy == reference, so the loss is ln 2.
        run.evaluate(&mut state, false)?;
    }
    let mut accumulator = GradAccumulator::new(policy.vars(), args.grad_dtype.dtype())?;
    let mut order = data::epoch_order(train_set.len(), args.seed, state.epoch as u64);
    while state.step < total_steps {
        if state.epoch_position >= train_set.len() {
            state.epoch += 1;
            state.epoch_position = 0;
            order = data::epoch_order(train_set.len(), args.seed, state.epoch as u64);
        }
        let started = Instant::now();
        let end = (state.epoch_position + args.batch_size).min(train_set.len());
        let mut batch: Vec<EncodedPair> =
            order[state.epoch_position..end].iter().map(|&i| train_set[i].clone()).collect();
        // Pairs of similar length share micro-batches (less padding); the gradient is a sum
        // over the batch, so the order within it changes nothing else.
        batch.sort_by_key(EncodedPair::max_len);
        // Keep the server busy with what comes next while the policy works on this batch.
        // The batch itself goes first (cached pairs are skipped): the server answers roughly
        // in request order, and this batch is what the policy waits on now.
        let ahead_end = (end + args.ref_prefetch).min(train_set.len());
        scorer.prefetch(order[state.epoch_position..ahead_end].iter().map(|&i| &train_set[i]));

        // bf16 sums round stochastically at each add; seeded per step, a resumed run adds
        // with the same random bits as the uninterrupted one.
        grad_ops::set_rounding_seed(update_seed(args.seed, state.step as u64, u64::MAX));
        let mut stats = dpo::DpoStats::default();
        let mut prefix = match common_prefix(&batch, args.prefix_min_tokens) {
            Some(ids) => Some(backward::forward_prefix(&policy, &ids)?),
            None => None,
        };
        for micro in batch.chunks(args.micro_batch) {
            // Mean over the whole batch: each micro-batch adds its share of the sum.
            let micro_stats = accumulator.add_with(|grads| {
                let n = batch.len() as f64;
                micro_batch_grads(&args, &policy, &scorer, micro, n, grads, prefix.as_mut())
            })?;
            stats.merge(&micro_stats);
        }
        if let Some(prefix) = prefix {
            accumulator.add_with(|grads| Ok(backward::prefix_backward(prefix, grads)?))?;
        }
        let grad_norm = clip_grad_norm(&mut accumulator, args.max_grad_norm)?;
        // The passes' activations are freed, but glibc keeps their pages resident (a few
        // hundred MB on SmolLM2); hand them back before the step writes the optimizer
        // state, which on the first step becomes resident for the first time.
        memory::release_free_memory();
        optimizer.step(&accumulator)?;
        accumulator.zero()?;

        state.step += 1;
        state.epoch_position = end;
        state.examples_seen += batch.len();
        let seconds = started.elapsed().as_secs_f64();
        let record = TrainRecord {
            step: state.step,
            epoch: state.epoch,
            examples_seen: state.examples_seen,
            loss: stats.mean_loss(),
            reward_accuracy: stats.reward_accuracy(),
            margin: stats.mean_margin(),
            grad_norm,
            lr: args.lr,
            examples_per_second: batch.len() as f64 / seconds,
        };
        run.metrics.log_train(&record)?;
        progress.step(&record);
        crash_if_asked(state.step);

        let last_step = state.step == total_steps;
        if state.step % args.eval_every == 0 || last_step {
            run.evaluate(&mut state, true)?;
        }
        if state.step % args.save_every == 0 || last_step {
            scorer.flush_cache()?;
            checkpoint::save_last(&args.out, &policy, &tokenizer, &optimizer, &state)?;
        }
    }
    progress.finish();
    scorer.flush_cache()?;
    let s = scorer.stats();
    tracing::info!(
        "reference: {} pairs in {} requests ({} retries), {} cached",
        s.pairs_requested,
        s.requests,
        s.retries,
        scorer.cached()
    );
    Ok(RunSummary {
        out: args.out.clone(),
        steps: state.step,
        examples_seen: state.examples_seen,
        best: state
            .best_step
            .zip(state.best_value)
            .map(|(step, v)| (step, v, args.select_metric.name().to_string())),
        final_eval: run.last_eval,
    })
}

/// Prints the memory model's prediction for this run's peak and refuses, before any
/// training step, a run that cannot fit in the memory the device has free.
fn check_memory(
    args: &TrainArgs,
    policy: &Llama,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    train: &[EncodedPair],
    val: &[EncodedPair],
) -> Result<()> {
    // A pair is one row: prompt, chosen, rejected.
    let longest = train.iter().chain(val).map(|p| shared_row(p).row_len()).max().unwrap_or(0);
    let config = memory_config(args, device, dtype, longest);
    let plan = memory::predict_peak_bytes(policy.config(), &config);
    eprintln!(
        "policy, micro-batch {} of {longest}-token pair rows (gradients {:?}, RMSprop state \
         {:?}): {plan}",
        args.micro_batch, config.grad_dtype, config.optim_state_dtype
    );
    if let Some(free) = memory::available_bytes(device) {
        // The weights are loaded already: they are in the plan but no longer in `free`.
        // (On a GPU, exactly the weights; on a CPU, whatever the process holds.)
        let held = if device.is_cpu() { memory::rss_bytes().unwrap_or(0) } else { plan.weights };
        memory::check_fits(&plan, free + held.min(plan.total))
            .context("the policy would run out of memory")?;
    }
    Ok(())
}

/// The memory model's view of this run's policy, for rows of `row_len` tokens.
fn memory_config(
    args: &TrainArgs,
    device: &candle_core::Device,
    dtype: DType,
    row_len: usize,
) -> memory::MemoryConfig {
    let base = memory::MemoryConfig::policy(
        device,
        dtype,
        args.micro_batch,
        row_len,
        args.grad_checkpointing,
    );
    let (grad_dtype, optim_state_dtype) = (args.grad_dtype.dtype(), args.optim_state_dtype.dtype());
    memory::MemoryConfig {
        grad_dtype,
        optim_state_dtype,
        // The fused RMSprop step runs on f32 state only (a bf16 sum is read in f32 first,
        // a transient the step's temporaries cover).
        in_place_optimizer: base.in_place_optimizer && optim_state_dtype == DType::F32,
        ..base
    }
}

/// Crash injection for the resume tests: `DPO_TEST_CRASH_AFTER_STEP=N` aborts the process
/// (no unwinding, no flushing beyond what is already on disk) right after step N is logged,
/// as a kill or power loss would.
fn crash_if_asked(step: usize) {
    if std::env::var("DPO_TEST_CRASH_AFTER_STEP").ok().and_then(|v| v.parse().ok()) == Some(step) {
        eprintln!("DPO_TEST_CRASH_AFTER_STEP={step}: aborting");
        std::process::abort();
    }
}

/// What an evaluation needs, bundled so the loop reads plainly.
struct Run<'a> {
    args: &'a TrainArgs,
    policy: &'a Llama,
    tokenizer: &'a dpo_common::tokenizer::LlamaTokenizer,
    scorer: &'a ReferenceScorer,
    val_set: &'a [EncodedPair],
    metrics: &'a mut MetricsLog,
    chart_path: &'a Path,
    progress: &'a Progress,
    last_eval: Option<EvalResult>,
}

impl Run<'_> {
    /// Validates, logs, redraws the chart and saves `best/` on a new best (`eligible` is
    /// false for the step-0 evaluation: the starting model is not a training result).
    fn evaluate(&mut self, state: &mut TrainerState, eligible: bool) -> Result<()> {
        if self.val_set.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let chunk = self.args.micro_batch.max(4);
        let e = evaluate(
            self.policy,
            self.scorer,
            self.val_set,
            self.args.beta,
            chunk,
            self.args.prefix_min_tokens,
        )?;
        let record = EvalRecord {
            step: state.step,
            examples_seen: state.examples_seen,
            loss: e.loss,
            loss_min: e.loss_min,
            loss_max: e.loss_max,
            reward_accuracy: e.reward_accuracy,
            logp_accuracy: e.logp_accuracy,
            chosen_reward: e.chosen_reward,
            rejected_reward: e.rejected_reward,
            margin: e.margin,
            pairs: e.pairs,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.metrics.log_eval(&record)?;
        self.last_eval = Some(e);
        let value = match self.args.select_metric {
            crate::args::SelectMetric::RewardAccuracy => e.reward_accuracy,
            crate::args::SelectMetric::LogpAccuracy => e.logp_accuracy,
            crate::args::SelectMetric::Loss => e.loss,
        };
        let mut note = String::new();
        if eligible && self.args.select_metric.improves(value, state.best_value) {
            state.best_value = Some(value);
            state.best_step = Some(state.step);
            let meta = BestMeta {
                step: state.step,
                examples_seen: state.examples_seen,
                select_metric: self.args.select_metric.name().to_string(),
                value,
                eval: serde_json::to_value(record)?,
            };
            checkpoint::save_best(&self.args.out, self.policy, self.tokenizer, &meta)?;
            note = " — new best, saved best/".into();
        }
        self.progress.println(format!(
            "step {:>5} eval: loss {:.4}  reward acc {:.3}  logp acc {:.3}  margin {:+.4}{note}",
            state.step, e.loss, e.reward_accuracy, e.logp_accuracy, e.margin
        ));
        if let Err(err) = plot::render_from_file(&self.metrics_path(), self.chart_path) {
            // A chart is a convenience; never stop training over it.
            tracing::warn!("could not draw {}: {err:#}", self.chart_path.display());
        }
        Ok(())
    }

    fn metrics_path(&self) -> PathBuf {
        self.args.out.join("metrics.jsonl")
    }
}

/// The progress bar (or plain log lines without a terminal).
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(total: usize, done: usize, hidden: bool) -> Self {
        let bar = if hidden {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total as u64)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_position(done as u64);
        Progress { bar }
    }

    fn step(&self, r: &TrainRecord) {
        self.bar.set_position(r.step as u64);
        self.bar.set_message(format!(
            "loss {:.4} acc {:.2} {:.2} ex/s",
            r.loss, r.reward_accuracy, r.examples_per_second
        ));
        if self.bar.is_hidden() {
            tracing::info!(
                "step {} loss {:.4} reward acc {:.3} grad norm {:.3e} {:.2} ex/s",
                r.step,
                r.loss,
                r.reward_accuracy,
                r.grad_norm,
                r.examples_per_second
            );
        }
    }

    fn println(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use dpo_common::logprob::response_logprobs;
    use dpo_common::model::Mode;
    use dpo_common::testing::{tiny_config, tiny_weights, TinySpec};

    /// `--grad-dtype` and `--optim-state-dtype` reach the memory model: Llama 3.1 8B with
    /// bf16 weights, bf16 sums, bf16 RMSprop state and checkpointing is predicted to fit an
    /// 80 GB card (79 GiB: what an H100 80GB reports, less the CUDA context), with room to
    /// spare; with the f32 defaults it cannot.
    #[test]
    fn eight_b_fits_an_80_gb_card_with_the_bf16_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            train: TrainArgs,
        }
        let args = |extra: &[&str]| {
            let mut argv = vec!["t", "--model", "m", "--data", "d.jsonl", "--grad-checkpointing"];
            argv.extend(extra);
            Cli::try_parse_from(argv).unwrap().train
        };
        let cfg = dpo_common::testing::llama31_8b_config();
        assert_eq!(memory::param_count(&cfg), 8_030_261_248);
        let card = 79u64 << 30;
        let lean_flags = ["--grad-dtype", "bf16", "--optim-state-dtype", "bf16"];
        // The README's HH run (micro-batch 1; a pair row of at most ~1024 tokens) and a
        // heavier one (4 rows of 2048 tokens).
        for (micro, row) in [("1", 1024), ("4", 2048)] {
            let lean = args(&[&lean_flags[..], &["--micro-batch", micro]].concat());
            let mc = memory_config(&lean, &Device::Cpu, DType::BF16, row);
            assert_eq!((mc.grad_dtype, mc.optim_state_dtype), (DType::BF16, DType::BF16));
            assert_eq!(mc.micro_batch.to_string(), micro);
            let plan = memory::predict_peak_bytes(&cfg, &mc);
            eprintln!("8B, bf16 flags, micro-batch {micro} of {row}-token rows: {plan}");
            assert!(memory::check_fits(&plan, card).is_ok(), "{plan}");
            let fat = args(&["--micro-batch", micro]);
            let mc = memory_config(&fat, &Device::Cpu, DType::BF16, row);
            assert_eq!((mc.grad_dtype, mc.optim_state_dtype), (DType::F32, DType::F32));
            let plan = memory::predict_peak_bytes(&cfg, &mc);
            eprintln!("8B, f32 defaults, micro-batch {micro} of {row}-token rows: {plan}");
            assert!(memory::check_fits(&plan, card).is_err(), "{plan}");
        }
        // The fused (in-place) RMSprop step is only planned for f32 state.
        let cpu_f32 = memory_config(&args(&[]), &Device::Cpu, DType::F32, 64);
        assert!(cpu_f32.in_place_optimizer);
        let cpu_bf16_state =
            memory_config(&args(&["--optim-state-dtype", "bf16"]), &Device::Cpu, DType::F32, 64);
        assert!(!cpu_bf16_state.in_place_optimizer);
    }

    #[test]
    fn passes_keep_padding_under_ten_percent() {
        let lens = [100, 20, 95, 21, 50, 99, 10];
        let passes = packed_passes(&lens);
        let mut seen: Vec<usize> = passes.concat();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for p in &passes {
            let longest = p.iter().map(|&i| lens[i]).max().unwrap();
            let real: usize = p.iter().map(|&i| lens[i]).sum();
            assert!(real as f64 >= MIN_FILL * (longest * p.len()) as f64, "{p:?}");
        }
        assert_eq!(passes[0], vec![0, 5, 2], "the three long ones share a pass");
        // Two long sequences and many short ones: not all padded to 100.
        assert_eq!(packed_passes(&[100, 100, 2, 2, 2, 2]), vec![vec![0, 1], vec![2, 3, 4, 5]]);
    }

    #[test]
    fn packed_log_probs_and_gradients_equal_one_sequence_at_a_time() {
        let cfg = tiny_config(&TinySpec::default());
        let weights = tiny_weights(&cfg, 9).unwrap();
        let policy =
            Llama::from_weights(cfg, weights, Mode::Trainable, DType::F32, &Device::Cpu).unwrap();
        let pair = |p: usize, c: usize, r: usize| EncodedPair {
            prompt_ids: (1..=p as u32).collect(),
            chosen_ids: (30..30 + c as u32).collect(),
            rejected_ids: (60..60 + r as u32).collect(),
        };
        let pairs = [pair(5, 3, 30), pair(4, 28, 2), pair(6, 4, 5)];
        // The prompts share 4 tokens; the shortest keeps its last one.
        assert_eq!(common_prefix(&pairs, 2), Some(vec![1, 2, 3]));
        assert_eq!(common_prefix(&pairs, 4), None);
        assert_eq!(common_prefix(&pairs, 0), None);
        let prefix_ids = common_prefix(&pairs, 2).unwrap();
        let kv = policy.prefix_kv(&prefix_ids).unwrap();
        for prefix in [None, Some(&kv)] {
            let (c, r) = policy_logprobs(&policy, &pairs, prefix).unwrap();
            let (c, r) = (c.to_vec1::<f32>().unwrap(), r.to_vec1::<f32>().unwrap());
            for (i, p) in pairs.iter().enumerate() {
                let one = |s| response_logprobs(&policy, &[s]).unwrap().sums_vec().unwrap()[0];
                assert!((c[i] as f64 - one(p.chosen_sequence())).abs() < 1e-4);
                assert!((r[i] as f64 - one(p.rejected_sequence())).abs() < 1e-4);
            }
        }
        // Gradients: the shared rows, passes and hand-written backward of a micro-batch give
        // autograd's gradient of Σ (chosen - rejected) over separate sequences, with the
        // step's prefix pass or without.
        let (rows, passes) = row_passes(&pairs);
        assert!(passes.len() > 1, "the test should cover several passes: {passes:?}");
        let mut variants = Vec::new();
        for with_prefix in [false, true] {
            let mut prefix =
                with_prefix.then(|| backward::forward_prefix(&policy, &prefix_ids).unwrap());
            let mut grads = backward::zero_grads(&policy).unwrap();
            for pass in &passes {
                let batch: Vec<_> = pass.iter().map(|&i| rows[i].clone()).collect();
                let dsums: Vec<f32> = pass.iter().flat_map(|_| [1.0, -1.0]).collect();
                match prefix.as_mut() {
                    Some(p) => {
                        let t = backward::forward_shared_after(&policy, &batch, p, false).unwrap();
                        backward::backward_after_prefix(t, &dsums, &mut grads, p).unwrap();
                    }
                    None => {
                        let t = backward::forward_shared(&policy, &batch, false).unwrap();
                        backward::backward(t, &dsums, &mut grads).unwrap();
                    }
                }
            }
            if let Some(p) = prefix {
                backward::prefix_backward(p, &mut grads).unwrap();
            }
            variants.push(grads);
        }
        let mut total: Option<Tensor> = None;
        for p in &pairs {
            for (s, sign) in [(p.chosen_sequence(), 1.0), (p.rejected_sequence(), -1.0)] {
                let v = response_logprobs(&policy, &[s]).unwrap().sums.sum_all().unwrap();
                let v = v.affine(sign, 0.0).unwrap();
                total = Some(match total {
                    Some(t) => (t + v).unwrap(),
                    None => v,
                });
            }
        }
        let g2 = total.unwrap().backward().unwrap();
        for grads in &variants {
            for (var, a) in policy.vars().iter().zip(grads) {
                let b = g2.get(var.as_tensor()).unwrap();
                let diff =
                    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "gradient differs by {diff}");
            }
        }
    }
}
