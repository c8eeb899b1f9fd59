//! The preference training loop: data → policy log-probs (with gradients) and reference
//! log-probs (from the server, prefetched and cached; none for a reference-free loss) →
//! the `--loss` ([`crate::loss`]) → gradient accumulation over `--batch-size` pairs → one
//! RMSprop step; validation every `--eval-every` steps, `best/` on each new best validation
//! metric, `last/` every `--save-every` steps.
//!
//! A run is a pure function of (starting model, data, flags): the data order comes from
//! the seed and the epoch, so `--resume` from `last/` replays exactly the steps an
//! uninterrupted run would have taken.
//!
//! [`run`] reads as its steps: [`Trainer::setup`] (data, policy, reference, split,
//! optimizer), then [`Trainer::step`] and [`Trainer::evaluate`] in turn, then
//! [`Trainer::finish`].

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use dpo_common::data::{self, EncodedPair, PreferencePair};
use dpo_common::device::parse_device;
use dpo_common::logprob::SharedPrompt;
use dpo_common::memory;
use dpo_common::model::backward::{self, PrefixPass};
use dpo_common::model::lora::{self, LoraAdapters, LoraTarget};
use dpo_common::model::{grad_ops, load_model, parse_dtype, Llama, LoadedModel, Mode};
use dpo_common::sround::update_seed;
use dpo_common::tokenizer::LlamaTokenizer;
use sha2::{Digest, Sha256};

use crate::args::{TrainArgs, NO_REFERENCE};
use crate::checkpoint::{self, BestMeta, TrainerState};
use crate::eval::evaluate;
use crate::loss::{batch_loss, loss_at_reference, LossSpec};
use crate::metrics::{EvalRecord, EvalResult, MetricsLog, TrainRecord, METRICS_FILE};
use crate::optim::{clip_grad_norm, GradAccumulator, RmsProp, RmsPropConfig};
use crate::passes::{common_prefix, loss_inputs, policy_logprobs, row_passes, shared_row};
use crate::plot;
use crate::progress::Progress;
use crate::ref_cache::{RefCache, RefScores};
use crate::ref_client::{ReferenceScorer, ScorerOptions};
use crate::stats::{LossStats, MeanLogits};
pub use crate::summary::{RunOutputs, RunSummary};

/// Trains as the flags say and returns what to print.
pub fn run(args: TrainArgs) -> Result<RunSummary> {
    let mut trainer = Trainer::setup(args)?;
    if trainer.state.step == 0 {
        // The starting point of the curve: policy == reference, so for a loss that reads the
        // reference, the value `loss_at_reference` printed at start-up (ln 2 for DPO).
        trainer.evaluate(false)?;
    }
    while !trainer.done() {
        trainer.step()?;
        let (step, last_step) = (trainer.state.step, trainer.done());
        if step % trainer.args.eval_every == 0 || last_step {
            trainer.evaluate(true)?;
        }
        if step % trainer.args.save_every == 0 || last_step {
            trainer.save_last()?;
        }
    }
    trainer.finish()
}

/// A run in progress: the policy, its reference, the data, and what each step changes.
pub struct Trainer {
    args: TrainArgs,
    loss: LossSpec,
    policy: Llama,
    tokenizer: LlamaTokenizer,
    /// `None` for a reference-free loss: no server, no cache.
    scorer: Option<ReferenceScorer>,
    train_set: Vec<EncodedPair>,
    val_set: Vec<EncodedPair>,
    optimizer: RmsProp,
    /// The gradient sums, made at the first step: the step-0 evaluation runs without them.
    accumulator: Option<GradAccumulator>,
    state: TrainerState,
    /// The current epoch's order of `train_set`.
    order: Vec<usize>,
    total_steps: usize,
    metrics: MetricsLog,
    progress: Progress,
    last_eval: Option<EvalResult>,
}

impl Trainer {
    /// Everything before the first step: the data, the policy (from `last/` on `--resume`),
    /// the reference server (unless the loss is reference-free), the tokenized split, the
    /// memory check, the optimizer and the trainer state (restored on `--resume`), the
    /// metrics log.
    pub fn setup(args: TrainArgs) -> Result<Self> {
        // Every flag, the loss's included, before anything loads.
        args.validate()?;
        let loss = args.loss_spec()?;
        describe_loss(&loss)?;
        // The data first: a wrong path or a malformed file fails in a second, not after the
        // model has loaded and the server answered.
        let pairs = load_pairs(&args)?;
        check_out_dir(&args)?;
        let resumed =
            if args.resume { Some(checkpoint::read_trainer_state(&args.out)?) } else { None };

        let device = parse_device(&args.device)?;
        let dtype = parse_dtype(&args.dtype)?;
        let (policy, tokenizer, fingerprint) =
            load_policy(&args, resumed.as_ref(), dtype, &device)?;
        let start_fingerprint =
            resumed.as_ref().map(|s| s.start_fingerprint.clone()).unwrap_or(fingerprint);
        let scorer = if loss.needs_reference() {
            Some(connect_reference(&args, &policy, &start_fingerprint)?)
        } else {
            announce_reference_free(&args, &loss);
            None
        };
        // The server's limit per pair; without a server, --max-length alone.
        let max_tokens =
            scorer.as_ref().map_or(usize::MAX, |s| s.info().max_tokens_per_item as usize);
        let (train_set, val_set) = encode_and_split(&args, &tokenizer, &pairs, max_tokens)?;
        check_memory(&args, &policy, &device, dtype, &train_set, &val_set)?;

        let mut optimizer = RmsProp::new(policy.vars(), rmsprop_config(&args))?;
        let data_fp = data_fingerprint(&train_set, &val_set, args.seed);
        let state = match resumed {
            Some(state) => restore(&args, state, &data_fp, &loss, &mut optimizer)?,
            None => TrainerState {
                step: 0,
                epoch: 0,
                epoch_position: 0,
                examples_seen: 0,
                num_tokens: 0,
                best_value: None,
                best_step: None,
                seed: args.seed,
                start_fingerprint,
                data_fingerprint: data_fp,
                loss: loss.to_string(),
            },
        };
        let metrics =
            MetricsLog::open(&args.out.join(METRICS_FILE), args.resume.then_some(state.step))?
                .report_to(args.report_to)?;

        let steps_per_epoch = train_set.len().div_ceil(args.batch_size);
        let total_steps = (steps_per_epoch * args.epochs).min(args.max_steps.unwrap_or(usize::MAX));
        let progress = Progress::new(total_steps, state.step, args.no_progress);
        let order = data::epoch_order(train_set.len(), args.seed, state.epoch as u64);
        Ok(Trainer {
            args,
            loss,
            policy,
            tokenizer,
            scorer,
            train_set,
            val_set,
            optimizer,
            accumulator: None,
            state,
            order,
            total_steps,
            metrics,
            progress,
            last_eval: None,
        })
    }

    /// True once the run has taken all its steps.
    pub fn done(&self) -> bool {
        self.state.step >= self.total_steps
    }

    /// One optimizer step on the next batch: its gradients, the update, and its record in
    /// the metrics log.
    pub fn step(&mut self) -> Result<TrainRecord> {
        let started = Instant::now();
        let (batch, end) = self.next_batch();
        let accumulator = match &mut self.accumulator {
            Some(accumulator) => accumulator,
            slot => {
                slot.insert(GradAccumulator::new(self.policy.vars(), self.args.grad_dtype.dtype())?)
            }
        };
        let scorer = self.scorer.as_ref();
        let step = StepInputs {
            args: &self.args,
            loss: &self.loss,
            policy: &self.policy,
            reference: &|pairs: &[EncodedPair]| reference_scores(scorer, pairs),
        };
        let stats = batch_grads(&step, &batch, self.state.step, accumulator)?;
        let grad_norm = clip_grad_norm(accumulator, self.args.max_grad_norm)?;
        // The passes' activations are freed, but glibc keeps their pages resident; hand
        // them back before the step writes the optimizer state, which on the first step
        // becomes resident for the first time.
        memory::release_free_memory();
        self.optimizer.step(accumulator)?;
        accumulator.zero()?;

        self.state.step += 1;
        self.state.epoch_position = end;
        self.state.examples_seen += batch.len();
        self.state.num_tokens += batch.iter().map(trl_input_tokens).sum::<u64>();
        let record = TrainRecord {
            step: self.state.step,
            epoch: self.state.epoch,
            examples_seen: self.state.examples_seen,
            loss: stats.mean_loss(),
            reward_accuracy: stats.reward_accuracy(),
            margin: stats.mean_margin(),
            grad_norm,
            lr: self.args.lr,
            examples_per_second: batch.len() as f64 / started.elapsed().as_secs_f64(),
            loss_type: self.loss.to_string(),
            rewards_chosen: stats.mean_chosen_reward(),
            rewards_rejected: stats.mean_rejected_reward(),
            rewards_accuracies: stats.reward_accuracy(),
            rewards_margins: stats.mean_margin(),
            logps_chosen: stats.mean_chosen_logp(),
            logps_rejected: stats.mean_rejected_logp(),
            logits_chosen: stats.logits.chosen(),
            logits_rejected: stats.logits.rejected(),
            learning_rate: self.args.lr,
            num_tokens: self.state.num_tokens,
        };
        self.metrics.log_train(&record)?;
        self.progress.step(&record);
        crash_if_asked(self.state.step);
        pause_if_asked(self.state.step);
        Ok(record)
    }

    /// The next batch (starting the next epoch when this one is used up), sorted by length,
    /// with its reference scores and those of what follows requested from the server; and
    /// the epoch position after it.
    fn next_batch(&mut self) -> (Vec<EncodedPair>, usize) {
        let (args, train_set, state) = (&self.args, &self.train_set, &mut self.state);
        if state.epoch_position >= train_set.len() {
            state.epoch += 1;
            state.epoch_position = 0;
            self.order = data::epoch_order(train_set.len(), args.seed, state.epoch as u64);
        }
        let order = &self.order;
        let end = (state.epoch_position + args.batch_size).min(train_set.len());
        let mut batch: Vec<EncodedPair> =
            order[state.epoch_position..end].iter().map(|&i| train_set[i].clone()).collect();
        // Pairs of similar length share micro-batches (less padding); the gradient is a sum
        // over the batch, so the order within it changes nothing else.
        batch.sort_by_key(EncodedPair::max_len);
        // Keep the server busy with what comes next while the policy works on this batch.
        // The batch itself goes first (cached pairs are skipped): the server answers roughly
        // in request order, and this batch is what the policy waits on now.
        if let Some(scorer) = &self.scorer {
            let ahead_end = (end + args.ref_prefetch).min(train_set.len());
            scorer.prefetch(order[state.epoch_position..ahead_end].iter().map(|&i| &train_set[i]));
        }
        (batch, end)
    }

    /// Validates, logs, saves `best/` on a new best (`eligible` is false for the step-0
    /// evaluation: the starting model is not a training result) and redraws the chart.
    pub fn evaluate(&mut self, eligible: bool) -> Result<()> {
        if self.val_set.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let args = &self.args;
        let chunk = args.micro_batch.max(4);
        let result = evaluate(
            &self.policy,
            self.scorer.as_ref(),
            &self.val_set,
            &self.loss,
            chunk,
            args.prefix_min_tokens,
        )?;
        let record = EvalRecord::new(
            self.state.step,
            self.state.examples_seen,
            result,
            started.elapsed().as_secs_f64(),
            self.loss.to_string(),
        );
        self.metrics.log_eval(&record)?;
        self.last_eval = Some(result);
        let saved = eligible && self.save_if_best(&record)?;
        let note = if saved { " — new best, saved best/" } else { "" };
        let e = &result;
        self.progress.println(format!(
            "step {:>5} eval: loss ({}) {:.4}  reward acc {:.3}  logp acc {:.3}  margin {:+.4}{note}",
            record.step, record.loss_type, e.loss, e.reward_accuracy, e.logp_accuracy, e.margin
        ));
        self.redraw_chart();
        Ok(())
    }

    /// Saves `best/` if `record` improves on the best value so far; true if it did.
    fn save_if_best(&mut self, record: &EvalRecord) -> Result<bool> {
        let metric = self.args.select_metric;
        let value = metric.value(&record.result);
        if !metric.improves(value, self.state.best_value) {
            return Ok(false);
        }
        self.state.best_value = Some(value);
        self.state.best_step = Some(self.state.step);
        let meta = BestMeta {
            step: self.state.step,
            examples_seen: self.state.examples_seen,
            select_metric: metric.name().to_string(),
            value,
            eval: serde_json::to_value(record)?,
        };
        checkpoint::save_best(&self.args.out, &self.policy, &self.tokenizer, self.base(), &meta)?;
        Ok(true)
    }

    /// Redraws the chart from the metrics log; a failure is logged, not fatal.
    fn redraw_chart(&self) {
        let chart = self.args.out.join(plot::CHART_FILE);
        if let Err(err) = plot::render_from_file(self.metrics.path(), &chart) {
            // A chart is a convenience; never stop training over it.
            tracing::warn!("could not draw {}: {err:#}", chart.display());
        }
    }

    /// `--model`, the base a LoRA policy adapts: the model the run started from.
    fn base(&self) -> checkpoint::Base<'_> {
        checkpoint::Base { path: &self.args.model, fingerprint: &self.state.start_fingerprint }
    }

    /// Writes `last/` (model, optimizer and trainer state) and the reference-score cache.
    pub fn save_last(&self) -> Result<()> {
        if let Some(scorer) = &self.scorer {
            scorer.flush_cache()?;
        }
        checkpoint::save_last(
            &self.args.out,
            &self.policy,
            &self.tokenizer,
            self.base(),
            &self.optimizer,
            &self.state,
        )?;
        Ok(())
    }

    /// Ends the run: the cache flushed, the reference's statistics logged, `merged/` written
    /// if asked, the summary.
    pub fn finish(self) -> Result<RunSummary> {
        self.progress.finish();
        if self.args.save_merged {
            self.save_merged()?;
        }
        let reference = match &self.scorer {
            Some(scorer) => {
                scorer.flush_cache()?;
                let s = scorer.stats().describe();
                tracing::info!("reference: {s}, {} cached", scorer.cached());
                Some(s)
            }
            None => None,
        };
        let state = &self.state;
        Ok(RunSummary {
            loss: self.loss.to_string(),
            reference_free: self.scorer.is_none(),
            reference,
            steps: state.step,
            examples_seen: state.examples_seen,
            best: state
                .best_step
                .zip(state.best_value)
                .map(|(step, v)| (step, v, self.args.select_metric.name().to_string())),
            final_eval: self.last_eval,
            outputs: RunOutputs::found_in(&self.args.out),
        })
    }
}

impl Trainer {
    /// `--save-merged`: the base with the best adapter (from `best/`; the current one if no
    /// evaluation saved any) merged into its weights, as `OUT/merged/`.
    fn save_merged(&self) -> Result<()> {
        let best = checkpoint::best_dir(&self.args.out);
        let policy = if checkpoint::holds_adapter(&best) {
            let (cfg, dtype, device) =
                (self.policy.config(), self.policy.dtype(), self.policy.device());
            let adapters = lora::load_peft(&best, cfg, dtype, device)?;
            self.policy.without_lora().with_lora(adapters)?
        } else {
            self.policy.clone()
        };
        let dir = checkpoint::save_merged(&self.args.out, &policy, &self.tokenizer)?;
        eprintln!("merged the adapter into the base: {}", dir.display());
        Ok(())
    }
}

/// Mixed into `--seed` for the LoRA dropout masks, so that they are not the other random
/// streams drawn from the same seed.
const LORA_DROPOUT_STREAM: u64 = 0x4C6F_5241_4472_6F70;

/// The reference log-probs of a step's pairs: `None` for a reference-free loss.
type ReferenceFn<'a> = dyn Fn(&[EncodedPair]) -> Result<Option<Vec<RefScores>>> + 'a;

/// What every micro-batch of a step reads.
struct StepInputs<'a> {
    args: &'a TrainArgs,
    loss: &'a LossSpec,
    policy: &'a Llama,
    reference: &'a ReferenceFn<'a>,
}

/// The scores of `pairs` from the server (waiting for those still in flight); none without one.
fn reference_scores(
    scorer: Option<&ReferenceScorer>,
    pairs: &[EncodedPair],
) -> Result<Option<Vec<RefScores>>> {
    scorer.map(|s| s.scores(pairs)).transpose()
}

/// Adds the gradients of a batch's mean loss into `accumulator` and returns the batch's
/// statistics. The prompts' common prefix, when there is one, goes through the policy once
/// for the whole batch.
fn batch_grads(
    step: &StepInputs<'_>,
    batch: &[EncodedPair],
    step_index: usize,
    accumulator: &mut GradAccumulator,
) -> Result<LossStats> {
    let args = step.args;
    // bf16 sums round stochastically at each add; seeded per step, a resumed run adds
    // with the same random bits as the uninterrupted one.
    grad_ops::set_rounding_seed(update_seed(args.seed, step_index as u64, u64::MAX));
    let mut stats = LossStats::default();
    // LoRA dropout: each pass draws its masks from its own seed, a function of the step
    // (a resumed run drops what the uninterrupted one dropped).
    let dropout_seed =
        |pass: u64| update_seed(args.seed ^ LORA_DROPOUT_STREAM, step_index as u64, pass);
    let mut prefix = match common_prefix(batch, args.prefix_min_tokens) {
        Some(ids) => {
            let policy = step.policy.with_lora_dropout(dropout_seed(u64::MAX));
            Some(backward::forward_prefix(&policy, &ids)?)
        }
        None => None,
    };
    // A loss whose gradient for one pair reads the others' log-probs (AOT sorts them) scores
    // each micro-batch without gradients first, through a no-graph view of the weights.
    let scoring_view = match step.loss.gradient_couples_batch() {
        true => Some(step.policy.frozen_view()?),
        false => None,
    };
    for (k, micro) in batch.chunks(args.micro_batch).enumerate() {
        // Mean over the whole batch: each micro-batch adds its share of the sum.
        let micro_stats = accumulator.add_with(|grads| {
            let n = batch.len() as f64;
            let scoring = scoring_view.as_ref();
            let seed = dropout_seed(k as u64);
            micro_batch_grads(step, scoring, micro, n, grads, prefix.as_mut(), seed)
        })?;
        stats.merge(&micro_stats);
    }
    if let Some(prefix) = prefix {
        accumulator.add_with(|grads| Ok(backward::prefix_backward(prefix, grads)?))?;
    }
    Ok(stats)
}

/// Trains on a micro-batch: adds the gradients of its loss × its pairs / `divisor` into
/// `grads` (one per parameter, `Llama::params()` order) and returns its statistics.
///
/// The loss is the micro-batch's, as TRL computes it per device batch (which matters only
/// for the terms that couple pairs: `aot`, `aot_unpaired`, `sft`). The reference scores are
/// taken first (prefetched, so normally ready), which lets each forward pass be followed at
/// once by its backward: only one pass's activations exist at a time. That works whenever a
/// pair's gradient depends on its own log-probs alone, or, for `sft`, on the micro-batch's
/// token counts, known before any pass: the pairs not yet computed hold placeholders that
/// their gradients, unread, do not depend on. For AOT, whose gradients depend on every
/// pair's log-probs, `scoring` (a no-graph view of the policy) scores the micro-batch first:
/// one extra forward without activations kept, about a third more compute per step.
///
/// The policy side is `model::backward` (hand-written, gradients added in place); the loss's
/// gradient with respect to each summed log-prob comes from [`batch_loss`]. With `prefix`,
/// the passes start from the step's prefix pass and add its gradients into it. Under LoRA
/// with dropout, pass `i` drops with the seed `update_seed(dropout_seed, i, 0)`.
fn micro_batch_grads(
    step: &StepInputs<'_>,
    scoring: Option<&Llama>,
    micro: &[EncodedPair],
    divisor: f64,
    grads: &mut [Tensor],
    mut prefix: Option<&mut PrefixPass>,
    dropout_seed: u64,
) -> Result<LossStats> {
    let (args, policy) = (step.args, step.policy);
    let refs = (step.reference)(micro)?;
    let mut pairs = loss_inputs(micro, refs.as_deref());
    if let Some(view) = scoring {
        // The logits' means come from the training passes below.
        let (scored, _) = policy_logprobs(view, micro, prefix.as_deref().map(PrefixPass::kv))?;
        for (p, (chosen, rejected)) in pairs.iter_mut().zip(scored) {
            (p.policy_chosen, p.policy_rejected) = (chosen, rejected);
        }
    }
    // `batch_loss` is the mean over the micro-batch; the step's loss is the mean over the batch.
    let scale = micro.len() as f64 / divisor;
    let (rows, passes) = row_passes(micro);
    let mut logits = MeanLogits::default();
    for (k, pass) in passes.iter().enumerate() {
        let batch: Vec<SharedPrompt> = pass.iter().map(|&i| rows[i].clone()).collect();
        let policy = &policy.with_lora_dropout(update_seed(dropout_seed, k as u64, 0));
        let training = match prefix.as_deref() {
            Some(p) => backward::forward_shared_after(policy, &batch, p, args.grad_checkpointing)?,
            None => backward::forward_shared(policy, &batch, args.grad_checkpointing)?,
        };
        logits.add(&MeanLogits::of_pairs(&training.logprobs)?);
        if scoring.is_none() {
            let sums = training.logprobs.sums.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for (&i, cr) in pass.iter().zip(sums.chunks_exact(2)) {
                (pairs[i].policy_chosen, pairs[i].policy_rejected) = (cr[0] as f64, cr[1] as f64);
            }
        }
        let out = batch_loss(step.loss, &pairs)?;
        let dsums: Vec<f32> = pass
            .iter()
            .flat_map(|&i| {
                let g = out.grads[i];
                [(g.policy_chosen * scale) as f32, (g.policy_rejected * scale) as f32]
            })
            .collect();
        match prefix.as_deref_mut() {
            Some(p) => backward::backward_after_prefix(training, &dsums, grads, p)?,
            None => backward::backward(training, &dsums, grads)?,
        }
    }
    let out = batch_loss(step.loss, &pairs)?;
    let mut stats = LossStats::of(step.loss, &pairs, &out)?;
    stats.logits = logits;
    Ok(stats)
}

/// A pair's input tokens as TRL counts them: each response fed with its own copy of the prompt.
fn trl_input_tokens(p: &EncodedPair) -> u64 {
    (2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len()) as u64
}

/// Prints the loss in use and, where it does not depend on the data, its value at step 0
/// (the policy is the reference then).
fn describe_loss(loss: &LossSpec) -> Result<()> {
    let params = [
        Some(format!("β {}", loss.beta)),
        loss.label_smoothing.map(|e| format!("label smoothing {e}")),
        loss.discopop_tau.map(|t| format!("DiscoPOP τ {t}")),
        loss.gamma_beta_ratio.map(|g| format!("γ/β {g}")),
    ];
    let params: Vec<String> = params.into_iter().flatten().collect();
    match loss_at_reference(loss)? {
        Some(value) => eprintln!(
            "loss {loss} ({}): {value:.6} at step 0, where the policy is the reference",
            params.join(", ")
        ),
        None => eprintln!(
            "loss {loss} ({}): reads the policy's own log-probs, so its step-0 value depends on the data",
            params.join(", ")
        ),
    }
    Ok(())
}

/// Says that a reference-free run uses no server, and that a server named anyway is unused.
fn announce_reference_free(args: &TrainArgs, loss: &LossSpec) {
    eprintln!(
        "--loss {loss} is reference-free: no reference server, no reference cache, and no \
         check that a server holds the starting model"
    );
    if let Some(url) = args.ref_server_flag().filter(|url| *url != NO_REFERENCE) {
        tracing::warn!("--ref-server {url} is not used: --loss {loss} reads no reference");
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

/// Loads the policy: from `--model` on a fresh start, from `last/` on resume; under LoRA
/// the base from `--model` with fresh adapters, or those of `last/` on resume. Returns it
/// with its tokenizer and fingerprint (under LoRA, the base's: what the reference must hold).
fn load_policy(
    args: &TrainArgs,
    resumed: Option<&TrainerState>,
    dtype: DType,
    device: &Device,
) -> Result<(Llama, LlamaTokenizer, String)> {
    let last = checkpoint::last_dir(&args.out);
    let lora = args.lora_config()?;
    if resumed.is_some() {
        match (&lora, checkpoint::holds_adapter(&last)) {
            (Some(_), false) => bail!(
                "--resume with --lora-rank {}: {} holds a full fine-tuning run, not LoRA \
                 adapters; resume it without --lora-rank",
                args.lora_rank,
                last.display()
            ),
            (None, true) => bail!(
                "--resume: {} holds LoRA adapters; resume with the run's --lora-rank (and \
                 --lora-alpha, --lora-targets)",
                last.display()
            ),
            _ => {}
        }
    }
    let Some(lora) = lora else {
        let path = if resumed.is_some() { last } else { args.model.clone() };
        tracing::info!("loading the policy from {}", path.display());
        let LoadedModel { model, tokenizer, fingerprint, .. } =
            load_model(&path, Mode::Trainable, dtype, device)
                .with_context(|| format!("cannot load the policy from {}", path.display()))?;
        return Ok((model, tokenizer, fingerprint));
    };

    tracing::info!("loading the frozen base from {}", args.model.display());
    let LoadedModel { model: base, tokenizer, fingerprint, .. } =
        load_model(&args.model, Mode::Frozen, dtype, device)
            .with_context(|| format!("cannot load the base model from {}", args.model.display()))?;
    lora.validate(base.config())
        .with_context(|| format!("--lora-rank / --lora-targets on {}", args.model.display()))?;
    let adapters = match resumed {
        None => LoraAdapters::init(base.config(), lora.clone(), args.seed, dtype, device)?,
        Some(state) => {
            anyhow::ensure!(
                state.start_fingerprint == fingerprint,
                "--resume: --model {} ({fingerprint}) is not the base the run in {} started \
                 from ({})",
                args.model.display(),
                args.out.display(),
                state.start_fingerprint
            );
            let adapters = lora::load_peft(&last, base.config(), dtype, device)
                .with_context(|| format!("cannot load the adapters from {}", last.display()))?;
            let saved = adapters.config();
            anyhow::ensure!(
                (saved.rank, saved.alpha, &saved.targets) == (lora.rank, lora.alpha, &lora.targets),
                "--resume: the adapters in {} have rank {}, alpha {} and targets {}, the flags \
                 ask for rank {}, alpha {} and targets {}",
                last.display(),
                saved.rank,
                saved.alpha,
                target_names(&saved.targets),
                lora.rank,
                lora.alpha,
                target_names(&lora.targets)
            );
            adapters
        }
    };
    let trainable: usize = adapters.vars().iter().map(|v| v.elem_count()).sum();
    eprintln!(
        "LoRA: rank {}, alpha {} (scale {}), on {}: {trainable} trainable parameters, the base \
         frozen",
        lora.rank,
        lora.alpha,
        lora.scale(),
        target_names(&lora.targets)
    );
    Ok((base.with_lora(adapters)?, tokenizer, fingerprint))
}

fn target_names(targets: &[LoraTarget]) -> String {
    targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(",")
}

/// Connects to the reference server and checks that it holds the model the policy started
/// from (unless `--allow-different-reference`), with the policy's vocabulary.
fn connect_reference(
    args: &TrainArgs,
    policy: &Llama,
    start_fingerprint: &str,
) -> Result<ReferenceScorer> {
    let cache = RefCache::open(&args.ref_cache_path())?;
    let url = args.ref_server_url().unwrap_or(NO_REFERENCE);
    let scorer = ReferenceScorer::connect(
        ScorerOptions {
            client: args.client_options()?,
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
            url,
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
    Ok(scorer)
}

/// Tokenizes the pairs, applies the length policy (at most `max_tokens`, the server's
/// limit, per pair) and splits off the validation set.
fn encode_and_split(
    args: &TrainArgs,
    tokenizer: &LlamaTokenizer,
    pairs: &[PreferencePair],
    max_tokens: usize,
) -> Result<(Vec<EncodedPair>, Vec<EncodedPair>)> {
    let (encoded, length_report) = data::encode_pairs(
        tokenizer,
        args.template,
        pairs,
        args.max_length.min(max_tokens),
        args.length_policy.into(),
    )?;
    eprintln!("{length_report}");
    let (train_set, val_set) = data::split_validation(encoded, args.val_size, args.seed)?;
    anyhow::ensure!(!train_set.is_empty(), "no training pairs left after the validation split");
    eprintln!(
        "{} training pairs, {} validation pairs; batch {} (micro-batch {}), {} epoch(s)",
        train_set.len(),
        val_set.len(),
        args.batch_size,
        args.micro_batch,
        args.epochs
    );
    Ok((train_set, val_set))
}

fn rmsprop_config(args: &TrainArgs) -> RmsPropConfig {
    RmsPropConfig {
        lr: args.lr,
        weight_decay: args.weight_decay,
        rounding_seed: args.seed,
        state_dtype: args.optim_state_dtype.dtype(),
        ..RmsPropConfig::default()
    }
}

/// Continues the run saved in `last/`: its state, once the data is known to be the same,
/// and the optimizer's.
fn restore(
    args: &TrainArgs,
    state: TrainerState,
    data_fp: &str,
    loss: &LossSpec,
    optimizer: &mut RmsProp,
) -> Result<TrainerState> {
    anyhow::ensure!(
        state.data_fingerprint == data_fp,
        "--resume: the data, split or seed differ from the run in {} (its data \
         fingerprint {}, now {data_fp})",
        args.out.display(),
        state.data_fingerprint
    );
    // Another loss would continue the run as a different experiment under the same name.
    let loss = loss.to_string();
    anyhow::ensure!(
        state.loss.is_empty() || state.loss == loss,
        "--resume: the run in {} trains with --loss {}, not {loss}; resume it with its \
         own loss, or start a new run in another --out",
        args.out.display(),
        state.loss
    );
    let path = checkpoint::last_dir(&args.out).join(checkpoint::OPTIMIZER_STATE);
    optimizer
        .load(&path)
        .with_context(|| format!("cannot restore the optimizer from {}", path.display()))?;
    eprintln!(
        "resuming at step {} (epoch {}, pair {})",
        state.step, state.epoch, state.epoch_position
    );
    Ok(state)
}

/// Prints the memory model's prediction for this run's peak and refuses, before any
/// training step, a run that cannot fit in the memory the device has free.
fn check_memory(
    args: &TrainArgs,
    policy: &Llama,
    device: &Device,
    dtype: DType,
    train: &[EncodedPair],
    val: &[EncodedPair],
) -> Result<()> {
    // A pair is one row: prompt, chosen, rejected.
    let longest = train.iter().chain(val).map(|p| shared_row(p).row_len()).max().unwrap_or(0);
    let mut config = memory_config(args, device, dtype, longest);
    config.adapters = policy.lora().map(|l| memory::adapter_sizes(policy.config(), l.config()));
    let plan = memory::predict_peak_bytes(policy.config(), &config);
    let trains =
        if config.adapters.is_some() { "LoRA adapters on a frozen base" } else { "every weight" };
    eprintln!(
        "policy, micro-batch {} of {longest}-token pair rows ({trains}; gradients {:?}, \
         RMSprop state {:?}): {plan}",
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
    device: &Device,
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

/// A pause for the reference-restart tests: `DPO_TEST_PAUSE_AFTER_STEP=N:MILLIS` sleeps
/// that long right after step N is logged, so that a test can stop the reference server
/// while the run is known to be still going (a tiny model's run is over in a blink).
fn pause_if_asked(step: usize) {
    let Ok(v) = std::env::var("DPO_TEST_PAUSE_AFTER_STEP") else { return };
    if let Some((at, millis)) = v.split_once(':') {
        if at.parse() == Ok(step) {
            if let Ok(millis) = millis.parse() {
                std::thread::sleep(std::time::Duration::from_millis(millis));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use dpo_common::logprob::response_logprobs;
    use dpo_common::testing::{tiny_config, tiny_weights, TinySpec};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn parse_args(extra: &[&str]) -> TrainArgs {
        let mut argv = vec!["t", "--model", "m", "--data", "d.jsonl"];
        argv.extend(extra);
        Cli::try_parse_from(argv).unwrap().train
    }

    /// The trainer's accumulated gradient for one optimizer step — micro-batches, packed
    /// passes, the shared prefix pass, the placeholders of not yet computed pairs, AOT's
    /// scoring pass — equals an independent computation: autograd through each response
    /// scored as its own sequence, of `Σ_m (|m|/|B|)·Σ_i ∂L_m/∂π_i · π_i` with `L_m` the loss of
    /// micro-batch `m` and its gradient from the loss module (itself checked against TRL and by
    /// finite differences). For a pair-local loss (sigmoid with label smoothing), a loss
    /// coupled through token counts only (a mix with sft), and one coupled through log-probs
    /// (aot).
    #[test]
    fn accumulated_gradients_equal_an_independent_computation() {
        let cfg = tiny_config(&TinySpec::default());
        let policy = Llama::from_weights(
            cfg.clone(),
            tiny_weights(&cfg, 11).unwrap(),
            Mode::Trainable,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let pair = |p: usize, c: usize, r: usize, k: u32| EncodedPair {
            prompt_ids: (1..=p as u32).map(|t| if t > 3 { t + k } else { t }).collect(),
            chosen_ids: (30 + k..30 + k + c as u32).collect(),
            rejected_ids: (60 + k..60 + k + r as u32).collect(),
        };
        let batch = [
            pair(5, 3, 30, 0),
            pair(4, 28, 2, 1),
            pair(6, 4, 5, 2),
            pair(5, 9, 7, 3),
            pair(7, 2, 3, 4),
            pair(4, 12, 11, 5),
        ];
        // Reference scores a few nats off the policy's own, differently per pair, so that
        // margins (and AOT's sorted ones) are distinct.
        let frozen = policy.frozen_view().unwrap();
        let (own, _) = policy_logprobs(&frozen, &batch, None).unwrap();
        let refs: Vec<RefScores> = own
            .iter()
            .enumerate()
            .map(|(i, &(c, r))| RefScores {
                chosen: c + 0.7 * i as f64 - 1.3,
                rejected: r - 0.45 * (i as f64 - 2.5),
            })
            .collect();
        let reference = |pairs: &[EncodedPair]| -> Result<Option<Vec<RefScores>>> {
            let at = |p: &EncodedPair| batch.iter().position(|b| b == p).unwrap();
            Ok(Some(pairs.iter().map(|p| refs[at(p)]).collect()))
        };
        let args =
            parse_args(&["--batch-size", "6", "--micro-batch", "3", "--prefix-min-tokens", "2"]);
        for (loss, beta, eps) in
            [("sigmoid", 0.5, Some(0.1)), ("sigmoid:1,sft:0.5", 0.5, None), ("aot", 0.5, None)]
        {
            let spec = LossSpec::from_flags(&crate::loss::LossFlags {
                loss,
                beta,
                label_smoothing: eps,
                discopop_tau: None,
                gamma_beta_ratio: None,
                sft_weight: None,
            })
            .unwrap();
            let step =
                StepInputs { args: &args, loss: &spec, policy: &policy, reference: &reference };
            let mut acc = GradAccumulator::new(policy.vars(), DType::F32).unwrap();
            assert!(common_prefix(&batch, 2).is_some(), "the test should cover the prefix pass");
            let stats = batch_grads(&step, &batch, 0, &mut acc).unwrap();

            // The independent computation.
            let mut surrogate: Option<Tensor> = None;
            let mut loss_sum = 0.0;
            for micro in batch.chunks(3) {
                let mut sums = Vec::new();
                let mut inputs = loss_inputs(micro, Some(&reference(micro).unwrap().unwrap()));
                for (p, input) in micro.iter().zip(&mut inputs) {
                    let seqs = [p.chosen_sequence(), p.rejected_sequence()];
                    let lp = response_logprobs(&policy, &seqs).unwrap();
                    let v = lp.sums_vec().unwrap();
                    (input.policy_chosen, input.policy_rejected) = (v[0], v[1]);
                    sums.push(lp.sums);
                }
                let out = batch_loss(&spec, &inputs).unwrap();
                loss_sum += out.loss * micro.len() as f64;
                let scale = micro.len() as f64 / batch.len() as f64;
                for (s, g) in sums.iter().zip(&out.grads) {
                    let w = [(g.policy_chosen * scale) as f32, (g.policy_rejected * scale) as f32];
                    let w = Tensor::new(&w, &Device::Cpu).unwrap();
                    let term = (s.to_dtype(DType::F32).unwrap() * w).unwrap().sum_all().unwrap();
                    surrogate = Some(match surrogate {
                        Some(t) => (t + term).unwrap(),
                        None => term,
                    });
                }
            }
            let expected = surrogate.unwrap().backward().unwrap();
            let mut largest = 0f32;
            for (var, got) in policy.vars().iter().zip(acc.grads()) {
                let want = expected.get(var.as_tensor()).unwrap();
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                let size = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                largest = largest.max(size);
                assert!(diff < 1e-4, "{loss}: gradient differs by {diff} (entries up to {size})");
            }
            assert!(largest > 1e-3, "{loss}: the gradient should not be trivially zero");
            let want = loss_sum / batch.len() as f64;
            assert!(
                (stats.mean_loss() - want).abs() < 1e-5,
                "{loss}: {} vs {want}",
                stats.mean_loss()
            );
            assert_eq!(stats.count, batch.len());
        }
    }

    /// LoRA in the memory model: Llama 3.1 8B with r = 16 adapters on every projection, bf16
    /// weights, on one 24 GB GPU (23 GiB: a 24 GB card's 23.99 GiB less the CUDA context),
    /// micro-batch 1 of 1,024-token rows: the adapters' gradients and RMSprop state are
    /// tens of MB, the bf16 base 15 GiB, and the run fits with checkpointing.
    #[test]
    fn eight_b_lora_fits_a_24_gb_gpu() {
        let cfg = dpo_common::testing::llama31_8b_config();
        let args = parse_args(&["--lora-rank", "16", "--dtype", "bf16"]);
        let lora = args.lora_config().unwrap().unwrap();
        assert_eq!(lora.alpha, 32.0, "the default alpha is 2 × rank");
        let sizes = memory::adapter_sizes(&cfg, &lora);
        // PEFT's count for this config (print_trainable_parameters): 41,943,040.
        assert_eq!(sizes.params, 41_943_040);
        let card = 23u64 << 30;
        let mut fits = Vec::new();
        for checkpointing in [false, true] {
            let gpu = memory::MemoryConfig {
                cpu: false,
                in_place_optimizer: false,
                adapters: Some(sizes),
                ..memory::MemoryConfig::policy(&Device::Cpu, DType::BF16, 1, 1024, checkpointing)
            };
            let plan = memory::predict_peak_bytes(&cfg, &gpu);
            eprintln!(
                "8B LoRA r=16, bf16, one 24 GB GPU, micro-batch 1 of 1024-token rows, \
                 checkpointing {checkpointing}: {plan}"
            );
            assert!(plan.grads + plan.optimizer_state < 400 << 20, "{plan}");
            fits.push(memory::check_fits(&plan, card).is_ok());
        }
        assert!(fits[1], "with checkpointing 8B LoRA must fit a 24 GB GPU");
    }

    /// `--grad-dtype` and `--optim-state-dtype` reach the memory model: Llama 3.1 8B with
    /// bf16 weights, bf16 sums, bf16 RMSprop state and checkpointing is predicted to fit an
    /// 80 GB card (79 GiB: what an H100 80GB reports, less the CUDA context), with room to
    /// spare; with the f32 defaults it cannot.
    #[test]
    fn eight_b_fits_an_80_gb_card_with_the_bf16_flags() {
        let args = |extra: &[&str]| parse_args(&[&["--grad-checkpointing"], extra].concat());
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
}
