//! Model-core throughput on real data, the counterpart of `shared/bench/torch_baseline.py`
//! (same examples: the first N single-turn HH pairs of at most 512 tokens per side, Alpaca
//! template, f32). Prints one JSON line per measurement; `tests/bench/model.sh` runs it next
//! to the PyTorch baseline and prints the ratios.
//!
//!     cargo run --release -p dpo-common --example bench_model -- MODEL HH_JSONL_GZ [N]

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use dpo_common::data::hh::read_hh_file;
use dpo_common::logprob::{response_logprobs, shared_prompt_logprobs, Sequence, SharedPrompt};
use dpo_common::model::backward::{backward, forward_sequences, forward_shared, zero_grads};
use dpo_common::model::backward::{
    backward_after_prefix, forward_prefix, forward_shared_after, prefix_backward,
};
use dpo_common::model::{load_model, Llama, Mode};
use dpo_common::prefix::{usable_prefix_len, PrefixCache, DEFAULT_MIN_PREFIX_TOKENS};
use dpo_common::template::Template;
use dpo_common::tokenizer::LlamaTokenizer;
use serde_json::json;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BoxResult<()> {
    dpo_common::model::ops::fix_thread_count(); // as the binaries do
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_path, data, rest @ ..] = args.as_slice() else {
        return Err("usage: bench_model MODEL HH_JSONL_GZ [N]".into());
    };
    let n: usize = rest.first().map_or(Ok(16), |s| s.parse())?;
    let mut reference = load_model(model_path.as_ref(), Mode::Frozen, DType::F32, &Device::Cpu)?;
    let examples = load_examples(&reference.tokenizer, data.as_ref(), n)?;
    let shared = shared_prompts(&examples);
    let bench = Bench::new(&examples);

    bench_reference(&bench, &mut reference.model, &shared)?;
    bench_prefix_cache(&bench, &reference.model, &shared)?;
    let policy = load_model(model_path.as_ref(), Mode::Trainable, DType::F32, &Device::Cpu)?;
    let mut grads = zero_grads(&policy.model)?;
    bench_policy(&bench, &policy.model, &shared, &mut grads)?;
    bench_dpo(&bench, &reference.model, &policy.model, &shared, &mut grads)?;
    Ok(())
}

/// The first `n` single-turn HH pairs in the Alpaca template whose sides are at most 512
/// tokens each, as (chosen, rejected).
fn load_examples(tok: &LlamaTokenizer, data: &Path, n: usize) -> BoxResult<Vec<[Sequence; 2]>> {
    let (pairs, _) = read_hh_file(data, "hh")?;
    let mut examples: Vec<[Sequence; 2]> = Vec::new();
    for p in pairs {
        let prompt = Template::Alpaca.format_prompt(&p.prompt);
        let c = tok.encode_prompt_response(&prompt, &p.chosen)?;
        let r = tok.encode_prompt_response(&prompt, &p.rejected)?;
        if c.ids.len() <= 512 && r.ids.len() <= 512 {
            examples.push([c.into(), r.into()]);
        }
        if examples.len() == n {
            break;
        }
    }
    if examples.is_empty() {
        return Err("no HH pair fits in 512 tokens per side".into());
    }
    Ok(examples)
}

/// Each pair as one row: the prompt chosen and rejected share, then both responses.
fn shared_prompts(examples: &[[Sequence; 2]]) -> Vec<SharedPrompt> {
    examples
        .iter()
        .map(|[c, r]| SharedPrompt {
            prompt: c.ids[..c.response_start].to_vec(),
            responses: vec![c.ids[c.response_start..].to_vec(), r.ids[r.response_start..].to_vec()],
        })
        .collect()
}

/// The examples every measure runs over, and how a measure is reported.
struct Bench<'a> {
    examples: &'a [[Sequence; 2]],
    /// Every sequence's tokens, prompt included.
    tokens: usize,
}

impl<'a> Bench<'a> {
    fn new(examples: &'a [[Sequence; 2]]) -> Self {
        let tokens = examples.iter().flatten().map(|s| s.ids.len()).sum();
        Bench { examples, tokens }
    }

    /// Prints one JSON line for a measure that took `secs` over all the examples.
    fn report(&self, measure: &str, secs: f64) {
        let (examples, tokens) = (self.examples.len(), self.tokens);
        println!(
            "{}",
            json!({"measure": measure, "examples": examples, "tokens": tokens,
                   "seconds": (secs * 1000.0).round() / 1000.0,
                   "tokens_per_s": (tokens as f64 / secs * 10.0).round() / 10.0,
                   "examples_per_s": (examples as f64 / secs * 1000.0).round() / 1000.0})
        )
    }

    /// Runs `f` and reports its time as `measure`.
    fn time(&self, measure: &str, f: impl FnOnce() -> BoxResult<()>) -> BoxResult<()> {
        let t = Instant::now();
        f()?;
        self.report(measure, t.elapsed().as_secs_f64());
        Ok(())
    }

    /// [`time`](Self::time) for the prefix cache's measures, also printing what it cached.
    fn time_cache(
        &self,
        measure: &str,
        f: impl FnOnce(&mut PrefixCache) -> BoxResult<()>,
    ) -> BoxResult<()> {
        // A fresh cache: finding the prefix is part of the time.
        let mut cache = PrefixCache::new(DEFAULT_MIN_PREFIX_TOKENS);
        self.time(measure, || f(&mut cache))?;
        eprintln!(
            "  {measure}: cached prefixes {:?} tokens, {:?}",
            cache.prefix_lens(),
            cache.stats()
        );
        Ok(())
    }
}

/// The reference model's forward: one sequence at a time (as loaded, then packed), a pair
/// per batch, a pair as one shared-prompt row.
fn bench_reference(bench: &Bench, reference: &mut Llama, shared: &[SharedPrompt]) -> BoxResult<()> {
    let examples = bench.examples;
    // Warm-up: first-touch allocation and thread-pool start are not what we measure.
    response_logprobs(reference, &examples[0])?;
    let score_bs1 = |model: &Llama| -> BoxResult<()> {
        for s in examples.iter().flatten() {
            response_logprobs(model, std::slice::from_ref(s))?;
        }
        Ok(())
    };
    // The weights as loaded (gemm repacks them on every call), then packed once as the
    // reference server and dpo-eval hold them; every later reference measure is packed.
    bench.time("score_forward_bs1_unpacked", || score_bs1(reference))?;
    reference.pack_for_inference()?;
    response_logprobs(reference, &examples[0])?;
    bench.time("score_forward_bs1", || score_bs1(reference))?;
    bench.time("score_forward_pair_batch", || {
        for ex in examples {
            response_logprobs(reference, ex)?;
        }
        Ok(())
    })?;
    // The prompt shared by chosen and rejected goes through the model once.
    bench.time("score_forward_pair_shared", || {
        for g in shared {
            shared_prompt_logprobs(reference, std::slice::from_ref(g))?;
        }
        Ok(())
    })
}

/// The server's path: the prompt template's preamble found across requests and computed
/// once.
fn bench_prefix_cache(bench: &Bench, reference: &Llama, shared: &[SharedPrompt]) -> BoxResult<()> {
    bench.time_cache("score_forward_bs1_prefix_cache", |cache| {
        for s in bench.examples.iter().flatten() {
            cache.score(reference, &[SharedPrompt::from(s)])?;
        }
        Ok(())
    })?;
    bench.time_cache("score_forward_pair_shared_prefix_cache", |cache| {
        for g in shared {
            cache.score(reference, std::slice::from_ref(g))?;
        }
        Ok(())
    })
}

/// The trainer's path: the policy's forward and hand-written backward into f32
/// accumulators (candle's autograd too with `BENCH_AUTOGRAD` set).
fn bench_policy(
    bench: &Bench,
    policy: &Llama,
    shared: &[SharedPrompt],
    grads: &mut [Tensor],
) -> BoxResult<()> {
    if std::env::var_os("BENCH_AUTOGRAD").is_some() {
        bench.time("policy_forward_backward_bs1_autograd", || {
            for s in bench.examples.iter().flatten() {
                let lp = response_logprobs(policy, std::slice::from_ref(s))?;
                lp.sums.sum_all()?.backward()?;
            }
            Ok(())
        })?;
    }
    bench.time("policy_forward_backward_bs1", || {
        for s in bench.examples.iter().flatten() {
            let pass = forward_sequences(policy, std::slice::from_ref(s), false)?;
            backward(pass, &[1.0], grads)?;
        }
        Ok(())
    })?;
    bench.time("policy_forward_backward_pair_shared", || {
        for g in shared {
            let pass = forward_shared(policy, std::slice::from_ref(g), false)?;
            backward(pass, &[1.0, -1.0], grads)?;
        }
        Ok(())
    })
}

/// The single-process DPO pass of torch_baseline.py: reference forward + policy
/// forward/backward per example (the loss's own arithmetic is negligible), here with the
/// prompt shared by both responses on both sides; then with the prompts' common prefix
/// (the template's preamble) through the policy once for the whole accumulation, as the
/// trainer does per optimizer step, and the reference scored by the server's prefix cache.
fn bench_dpo(
    bench: &Bench,
    reference: &Llama,
    policy: &Llama,
    shared: &[SharedPrompt],
    grads: &mut [Tensor],
) -> BoxResult<()> {
    bench.time("dpo_pass_pair_shared", || {
        for g in shared {
            let _ref = shared_prompt_logprobs(reference, std::slice::from_ref(g))?.sums_vec()?;
            let pass = forward_shared(policy, std::slice::from_ref(g), false)?;
            backward(pass, &[1.0, -1.0], grads)?;
        }
        Ok(())
    })?;

    let common = usable_prefix_len(&shared[0].prompt, shared.iter().map(|g| g.prompt.as_slice()));
    eprintln!("  common prompt prefix: {common} tokens");
    bench.time("policy_forward_backward_pair_shared_prefix", || {
        let mut prefix = forward_prefix(policy, &shared[0].prompt[..common])?;
        for g in shared {
            let pass = forward_shared_after(policy, std::slice::from_ref(g), &prefix, false)?;
            backward_after_prefix(pass, &[1.0, -1.0], grads, &mut prefix)?;
        }
        Ok(prefix_backward(prefix, grads)?)
    })?;
    let mut cache = PrefixCache::new(DEFAULT_MIN_PREFIX_TOKENS);
    bench.time("dpo_pass_pair_shared_prefix", || {
        let mut prefix = forward_prefix(policy, &shared[0].prompt[..common])?;
        for g in shared {
            let _ref = cache.score(reference, std::slice::from_ref(g))?.sums_vec()?;
            let pass = forward_shared_after(policy, std::slice::from_ref(g), &prefix, false)?;
            backward_after_prefix(pass, &[1.0, -1.0], grads, &mut prefix)?;
        }
        Ok(prefix_backward(prefix, grads)?)
    })
}
