//! Measured peak RSS of one policy forward+backward next to `memory::predict_peak_bytes`.
//! One configuration per process, since `VmHWM` only ever grows:
//!
//!     cargo run -p dpo-common --example measure_memory -- PAIRS MAX_TOKENS [--checkpointing]
//!
//! Loads SmolLM2 (`testing::smollm2_gguf`) in f32 on CPU, takes the first PAIRS HH
//! harmless-base test pairs whose rows (prompt + chosen + rejected) fit MAX_TOKENS, and runs
//! the trainer's pass: `model::backward`'s forward over shared-prompt rows and its backward
//! into an f32 accumulator. Prints the RSS after loading (the baseline the model does not
//! predict: binary, tokenizer, GGUF mapping, allocator) and the peak.

use candle_core::{DType, Device};
use dpo_common::data::hh::read_hh_file;
use dpo_common::logprob::SharedPrompt;
use dpo_common::memory::{peak_rss_bytes, predict_peak_bytes, rss_bytes, MemoryConfig};
use dpo_common::model::backward::{backward, forward_shared, zero_grads};
use dpo_common::model::{load_model, Mode};
use dpo_common::template::Template;
use dpo_common::testing::{shared_data, smollm2_gguf};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const MIB: f64 = (1u64 << 20) as f64;

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pairs: usize = args.first().map_or(Ok(1), |s| s.parse())?;
    let max_tokens: usize = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let checkpointing = args.iter().any(|a| a == "--checkpointing");

    let loaded = load_model(&smollm2_gguf(), Mode::Frozen, DType::F32, &Device::Cpu)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let data = shared_data().join("hh/harmless-base/test.jsonl.gz");
    let (all, _) = read_hh_file(&data, "harmless-base")?;
    let mut rows: Vec<SharedPrompt> = Vec::new();
    for p in all {
        let prompt = Template::Alpaca.format_prompt(&p.prompt);
        let c = tok.encode_prompt_response(&prompt, &p.chosen)?;
        let r = tok.encode_prompt_response(&prompt, &p.rejected)?;
        let row = SharedPrompt {
            prompt: c.ids[..c.response_start].to_vec(),
            responses: vec![c.ids[c.response_start..].to_vec(), r.ids[r.response_start..].to_vec()],
        };
        // Long rows only, so that the padded length is close to MAX_TOKENS.
        let n = row.row_len();
        if n <= max_tokens && n * 3 >= max_tokens {
            rows.push(row);
        }
        if rows.len() == pairs {
            break;
        }
    }
    if rows.len() < pairs {
        return Err(
            format!("only {} pairs of {max_tokens}/3..{max_tokens} tokens", rows.len()).into()
        );
    }
    let t = rows.iter().map(SharedPrompt::row_len).max().unwrap_or(0);
    let resp: usize =
        rows.iter().map(|r| r.responses.iter().map(Vec::len).sum::<usize>()).sum::<usize>()
            / rows.len();
    let baseline = rss_bytes().unwrap_or(0);
    // The trainer's gradient accumulator (zeros are not resident until first written).
    let mut grads = zero_grads(model)?;

    let mc = MemoryConfig {
        response_len: resp,
        ..MemoryConfig::policy(&Device::Cpu, DType::F32, pairs, t, checkpointing)
    };
    let plan = predict_peak_bytes(model.config(), &mc);
    // The optimizer (state and step) does not exist in this program.
    let predicted_here =
        plan.weights + plan.grads + plan.activations + plan.logits + plan.workspace;

    let started = std::time::Instant::now();
    let pass = forward_shared(model, &rows, checkpointing)?;
    let dsums: Vec<f32> =
        (0..2 * rows.len()).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    backward(pass, &dsums, &mut grads)?;
    std::hint::black_box(&grads);
    let secs = started.elapsed().as_secs_f64();
    let peak = peak_rss_bytes().unwrap_or(0);

    println!("{plan}");
    println!(
        "pairs {pairs}, padded row length {t}, mean response tokens per row {resp}, \
         checkpointing {checkpointing}, {secs:.1} s"
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
