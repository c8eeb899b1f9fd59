//! Model-core throughput on real data, the counterpart of `shared/bench/torch_baseline.py`
//! (same examples: the first N single-turn HH pairs of at most 512 tokens per side, Alpaca
//! template, f32). Prints one JSON line per measurement; `tests/bench/model.sh` runs it next
//! to the PyTorch baseline and prints the ratios.
//!
//!     cargo run --release -p dpo-common --example bench_model -- MODEL HH_JSONL_GZ [N]

use std::time::Instant;

use candle_core::{DType, Device};
use dpo_common::data::hh::read_hh_file;
use dpo_common::logprob::{response_logprobs, shared_prompt_logprobs, Sequence, SharedPrompt};
use dpo_common::model::backward::{backward, forward_sequences, forward_shared, zero_grads};
use dpo_common::model::backward::{
    backward_after_prefix, forward_prefix, forward_shared_after, prefix_backward,
};
use dpo_common::model::{load_model, Llama, Mode};
use dpo_common::prefix::{usable_prefix_len, PrefixCache, DEFAULT_MIN_PREFIX_TOKENS};
use dpo_common::template::Template;
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
    let tok = &reference.tokenizer;

    let (pairs, _) = read_hh_file(data.as_ref(), "hh")?;
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
    let tokens: usize = examples.iter().flatten().map(|s| s.ids.len()).sum();
    let report = |measure: &str, secs: f64| {
        println!(
            "{}",
            json!({"measure": measure, "examples": examples.len(), "tokens": tokens,
                   "seconds": (secs * 1000.0).round() / 1000.0,
                   "tokens_per_s": (tokens as f64 / secs * 10.0).round() / 10.0,
                   "examples_per_s": (examples.len() as f64 / secs * 1000.0).round() / 1000.0})
        )
    };

    // Warm-up: first-touch allocation and thread-pool start are not what we measure.
    response_logprobs(&reference.model, &examples[0])?;
    let score_bs1 = |model: &Llama| -> BoxResult<f64> {
        let t = Instant::now();
        for ex in &examples {
            for s in ex {
                response_logprobs(model, std::slice::from_ref(s))?;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    };
    // The weights as loaded (gemm repacks them on every call), then packed once as the
    // reference server and dpo-eval hold them; every later reference measure is packed.
    report("score_forward_bs1_unpacked", score_bs1(&reference.model)?);
    reference.model.pack_for_inference()?;
    response_logprobs(&reference.model, &examples[0])?;
    report("score_forward_bs1", score_bs1(&reference.model)?);

    let t = Instant::now();
    for ex in &examples {
        response_logprobs(&reference.model, ex)?;
    }
    report("score_forward_pair_batch", t.elapsed().as_secs_f64());

    // The prompt shared by chosen and rejected goes through the model once.
    let shared: Vec<SharedPrompt> = examples
        .iter()
        .map(|[c, r]| SharedPrompt {
            prompt: c.ids[..c.response_start].to_vec(),
            responses: vec![c.ids[c.response_start..].to_vec(), r.ids[r.response_start..].to_vec()],
        })
        .collect();
    let t = Instant::now();
    for g in &shared {
        shared_prompt_logprobs(&reference.model, std::slice::from_ref(g))?;
    }
    report("score_forward_pair_shared", t.elapsed().as_secs_f64());

    // The server's path: the prompt template's preamble found across requests and computed
    // once (a fresh cache: finding it is part of the time).
    let prefix_report = |measure: &str, secs: f64, cache: &PrefixCache| {
        report(measure, secs);
        eprintln!(
            "  {measure}: cached prefixes {:?} tokens, {:?}",
            cache.prefix_lens(),
            cache.stats()
        );
    };
    let mut cache = PrefixCache::new(DEFAULT_MIN_PREFIX_TOKENS);
    let t = Instant::now();
    for ex in &examples {
        for s in ex {
            cache.score(&reference.model, &[SharedPrompt::from(s)])?;
        }
    }
    prefix_report("score_forward_bs1_prefix_cache", t.elapsed().as_secs_f64(), &cache);
    let mut cache = PrefixCache::new(DEFAULT_MIN_PREFIX_TOKENS);
    let t = Instant::now();
    for g in &shared {
        cache.score(&reference.model, std::slice::from_ref(g))?;
    }
    prefix_report("score_forward_pair_shared_prefix_cache", t.elapsed().as_secs_f64(), &cache);

    let policy = load_model(model_path.as_ref(), Mode::Trainable, DType::F32, &Device::Cpu)?;
    if std::env::var_os("BENCH_AUTOGRAD").is_some() {
        let t = Instant::now();
        for ex in &examples {
            for s in ex {
                let lp = response_logprobs(&policy.model, std::slice::from_ref(s))?;
                lp.sums.sum_all()?.backward()?;
            }
        }
        report("policy_forward_backward_bs1_autograd", t.elapsed().as_secs_f64());
    }

    // The trainer's path: hand-written backward into f32 accumulators.
    let mut grads = zero_grads(&policy.model)?;
    let t = Instant::now();
    for ex in &examples {
        for s in ex {
            let pass = forward_sequences(&policy.model, std::slice::from_ref(s), false)?;
            backward(pass, &[1.0], &mut grads)?;
        }
    }
    report("policy_forward_backward_bs1", t.elapsed().as_secs_f64());

    let t = Instant::now();
    for g in &shared {
        let pass = forward_shared(&policy.model, std::slice::from_ref(g), false)?;
        backward(pass, &[1.0, -1.0], &mut grads)?;
    }
    report("policy_forward_backward_pair_shared", t.elapsed().as_secs_f64());

    // The single-process DPO pass of torch_baseline.py: reference forward + policy
    // forward/backward per example (the loss's own arithmetic is negligible), here with the
    // prompt shared by both responses on both sides.
    let t = Instant::now();
    for g in &shared {
        let _ref = shared_prompt_logprobs(&reference.model, std::slice::from_ref(g))?.sums_vec()?;
        let pass = forward_shared(&policy.model, std::slice::from_ref(g), false)?;
        backward(pass, &[1.0, -1.0], &mut grads)?;
    }
    report("dpo_pass_pair_shared", t.elapsed().as_secs_f64());

    // The same with the prompts' common prefix (the template's preamble) through the
    // policy once for the whole accumulation, as the trainer does per optimizer step, and
    // the reference scored by the server's prefix cache.
    let common = usable_prefix_len(&shared[0].prompt, shared.iter().map(|g| g.prompt.as_slice()));
    eprintln!("  common prompt prefix: {common} tokens");
    let t = Instant::now();
    let mut prefix = forward_prefix(&policy.model, &shared[0].prompt[..common])?;
    for g in &shared {
        let pass = forward_shared_after(&policy.model, std::slice::from_ref(g), &prefix, false)?;
        backward_after_prefix(pass, &[1.0, -1.0], &mut grads, &mut prefix)?;
    }
    prefix_backward(prefix, &mut grads)?;
    report("policy_forward_backward_pair_shared_prefix", t.elapsed().as_secs_f64());

    let mut cache = PrefixCache::new(DEFAULT_MIN_PREFIX_TOKENS);
    let t = Instant::now();
    let mut prefix = forward_prefix(&policy.model, &shared[0].prompt[..common])?;
    for g in &shared {
        let _ref = cache.score(&reference.model, std::slice::from_ref(g))?.sums_vec()?;
        let pass = forward_shared_after(&policy.model, std::slice::from_ref(g), &prefix, false)?;
        backward_after_prefix(pass, &[1.0, -1.0], &mut grads, &mut prefix)?;
    }
    prefix_backward(prefix, &mut grads)?;
    report("dpo_pass_pair_shared_prefix", t.elapsed().as_secs_f64());
    Ok(())
}
