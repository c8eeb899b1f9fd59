//! Measured peak memory of one policy forward+backward next to `memory::predict_peak_bytes`:
//!
//!     cargo run --release -p dpo-common --example measure_memory -- PAIRS MAX_TOKENS \
//!         [--checkpointing] [--bf16]
//!
//! Loads SmolLM2 (`testing::smollm2_gguf`) on CPU (f32, or bf16 weights with `--bf16`), takes
//! the first PAIRS HH harmless-base test pairs whose rows (prompt + chosen + rejected) fit
//! MAX_TOKENS, and runs the trainer's pass: `model::backward`'s forward over shared-prompt
//! rows and its backward into an f32 accumulator.
//!
//! The process is set up as the trainer is in its steady state: one malloc arena
//! (`memory::use_one_malloc_arena`), the gradient sums written (resident; fresh zeros would
//! only become resident as the backward reaches them, which the trainer's sums are not
//! after their first micro-batch) and the allocator's free memory handed back before the
//! pass. Then the base (weights, sums, binary, tokenizer, data) is measured, `VmHWM` reset
//! to it, and the pass run. Two measures of the pass's peak, next to the predicted
//! activations + logits + workspace:
//!
//! - the peak RSS (`VmHWM`), which is what the memory model is for: base + predicted pass
//!   against the measured peak;
//! - the peak of the bytes live in Rust's allocator (every tensor's storage), counted by
//!   `testing::CountingAlloc`: exact, where RSS also holds what glibc keeps of freed memory
//!   and misses what is allocated but not yet written.

use candle_core::{DType, Device};
use dpo_common::data::hh::read_hh_file;
use dpo_common::logprob::SharedPrompt;
use dpo_common::memory::{
    peak_rss_bytes, predict_peak_bytes, release_free_memory, rss_bytes, use_one_malloc_arena,
    MemoryConfig,
};
use dpo_common::model::backward::{backward, forward_shared, zero_grads};
use dpo_common::model::{load_model, Mode};
use dpo_common::template::Template;
use dpo_common::testing::{shared_data, smollm2_gguf, CountingAlloc};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const MIB: f64 = (1u64 << 20) as f64;

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

fn main() -> BoxResult<()> {
    dpo_common::model::ops::fix_thread_count(); // as the trainer does
    use_one_malloc_arena();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pairs: usize = args.first().map_or(Ok(1), |s| s.parse())?;
    let max_tokens: usize = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let checkpointing = args.iter().any(|a| a == "--checkpointing");
    let dtype = if args.iter().any(|a| a == "--bf16") { DType::BF16 } else { DType::F32 };

    let loaded = load_model(&smollm2_gguf(), Mode::Frozen, dtype, &Device::Cpu)?;
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
    let mut grads = zero_grads(model)?
        .iter()
        .map(|g| g.affine(1.0, 0.0))
        .collect::<candle_core::Result<Vec<_>>>()?;

    let mc = MemoryConfig {
        response_len: resp,
        ..MemoryConfig::policy(&Device::Cpu, dtype, pairs, t, checkpointing)
    };
    let plan = predict_peak_bytes(model.config(), &mc);
    // What the pass adds to weights and sums (the optimizer does not exist here).
    let predicted_pass = plan.activations + plan.logits + plan.workspace;

    release_free_memory();
    let base_rss = rss_bytes().unwrap_or(0);
    // VmHWM back to the current RSS (Linux: "5" in clear_refs), so the peak is the pass's.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let base_live = CountingAlloc::reset_peak();

    let started = std::time::Instant::now();
    let pass = forward_shared(model, &rows, checkpointing)?;
    let dsums: Vec<f32> =
        (0..2 * rows.len()).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    backward(pass, &dsums, &mut grads)?;
    std::hint::black_box(&grads);
    let secs = started.elapsed().as_secs_f64();
    let peak_rss = peak_rss_bytes().unwrap_or(0);
    let peak_live = CountingAlloc::peak();

    println!("{plan}");
    println!(
        "pairs {pairs}, padded row length {t}, mean response tokens per row {resp}, \
         checkpointing {checkpointing}, {dtype:?} weights, {secs:.1} s"
    );
    let mib = |b: u64| b as f64 / MIB;
    println!(
        "base RSS {:.0} MiB (weights {:.0} MiB and gradient sums {:.0} MiB of it)",
        mib(base_rss),
        mib(plan.weights),
        mib(plan.grads)
    );
    let live_pass = (peak_live - base_live) as u64;
    println!(
        "the pass: predicted {:.0} MiB, measured {:.0} MiB live in the allocator (ratio {:.3}), \
         {:.0} MiB of RSS",
        mib(predicted_pass),
        mib(live_pass),
        predicted_pass as f64 / live_pass as f64,
        mib(peak_rss.saturating_sub(base_rss))
    );
    let predicted_rss = base_rss + predicted_pass;
    println!(
        "predicted peak RSS {:.0} MiB, measured VmHWM {:.0} MiB, ratio {:.3}",
        mib(predicted_rss),
        mib(peak_rss),
        predicted_rss as f64 / peak_rss as f64
    );
    Ok(())
}
