//! Measured peak RSS of one policy forward+backward next to `memory::predict_peak_bytes`.
//! One configuration per process, since `VmHWM` only ever grows:
//!
//!     cargo run -p dpo-common --example measure_memory -- PAIRS MAX_TOKENS [--checkpointing]
//!
//! Loads SmolLM2 (`testing::smollm2_gguf`) trainable in f32 on CPU, takes the first PAIRS HH
//! harmless-base test pairs whose sides fit MAX_TOKENS, and runs `response_logprobs` + backward
//! (or `checkpointed_grads`). Prints the RSS after loading (the baseline the model does not
//! predict: binary, tokenizer, GGUF mapping, allocator) and the peak.

use candle_core::{DType, Device};
use dpo_common::data::hh::read_hh_file;
use dpo_common::logprob::{response_logprobs, Sequence};
use dpo_common::memory::{peak_rss_bytes, predict_peak_bytes, rss_bytes, MemoryConfig};
use dpo_common::model::{checkpointed_grads, load_model, Mode};
use dpo_common::template::Template;
use dpo_common::testing::{shared_data, smollm2_gguf};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const MIB: f64 = (1u64 << 20) as f64;

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pairs: usize = args.first().map_or(Ok(1), |s| s.parse())?;
    let max_tokens: usize = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let checkpointing = args.iter().any(|a| a == "--checkpointing");

    let loaded = load_model(&smollm2_gguf(), Mode::Trainable, DType::F32, &Device::Cpu)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let data = shared_data().join("hh/harmless-base/test.jsonl.gz");
    let (all, _) = read_hh_file(&data, "harmless-base")?;
    let mut seqs: Vec<Sequence> = Vec::new();
    for p in all {
        let prompt = Template::Alpaca.format_prompt(&p.prompt);
        let c = tok.encode_prompt_response(&prompt, &p.chosen)?;
        let r = tok.encode_prompt_response(&prompt, &p.rejected)?;
        // Long pairs only, so that the padded length is close to MAX_TOKENS.
        let fits = |n: usize| n <= max_tokens && n * 3 >= max_tokens;
        if fits(c.ids.len()) && fits(r.ids.len()) {
            seqs.push(c.into());
            seqs.push(r.into());
        }
        if seqs.len() == 2 * pairs {
            break;
        }
    }
    if seqs.len() < 2 * pairs {
        return Err(format!(
            "only {} pairs of {max_tokens}/3..{max_tokens} tokens",
            seqs.len() / 2
        )
        .into());
    }
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let resp: usize = seqs.iter().map(|s| s.response_len()).sum::<usize>() / seqs.len();
    let baseline = rss_bytes().unwrap_or(0);

    let mc = MemoryConfig {
        response_len: resp,
        ..MemoryConfig::policy(&Device::Cpu, DType::F32, pairs, t, checkpointing)
    };
    let plan = predict_peak_bytes(model.config(), &mc);
    // The trainer's optimizer state and gradient accumulator do not exist in this program.
    // (grads = backward's gradients, weight-sized, + the accumulator.)
    let predicted_here = plan.total - plan.optimizer_state - (plan.grads - plan.weights);

    let started = std::time::Instant::now();
    if checkpointing {
        let out = checkpointed_grads(model, &seqs, |s| Ok(s.sum_all()?))?;
        std::hint::black_box(&out.grads);
    } else {
        let lp = response_logprobs(model, &seqs)?;
        let grads = lp.sums.sum_all()?.backward()?;
        std::hint::black_box(&grads);
    }
    let secs = started.elapsed().as_secs_f64();
    let peak = peak_rss_bytes().unwrap_or(0);

    println!("{plan}");
    println!(
        "pairs {pairs} (sequences {}), padded length {t}, mean response {resp}, \
         checkpointing {checkpointing}, {secs:.1} s",
        seqs.len()
    );
    println!(
        "baseline RSS after load {:.0} MiB (weights {:.0} MiB of it)",
        baseline as f64 / MIB,
        plan.weights as f64 / MIB
    );
    let predicted_rss = baseline - plan.weights.min(baseline) + predicted_here;
    println!(
        "predicted peak RSS {:.0} MiB, measured VmHWM {:.0} MiB, ratio {:.3}",
        predicted_rss as f64 / MIB,
        peak as f64 / MIB,
        predicted_rss as f64 / peak as f64
    );
    Ok(())
}
