//! Helpers for `deploy/gpu-check.sh`, built into the GPU bundle by `deploy/gpu-bundle.sh`:
//!
//!     gpu_tools random-model OUT_DIR [llama-3.1-8b|tiny-vocab-128k|tiny] [bf16|f32] [SEED]
//!         writes a random-weight Hugging Face checkpoint of that shape (the 8B one: 16 GB in
//!         bf16, written where it runs, since real 8B weights cannot travel). All use the
//!         tiny byte tokenizer; `tiny-vocab-128k` (two tiny layers, the 8B's vocabulary) is
//!         a reference server for the 8B that costs next to nothing
//!     gpu_tools matmul DEVICE [N] [ITERS] [bf16|f32]
//!         measures the device's matrix-product rate (N×N×N, default 8192, 20 timed
//!         products after 3 warm-ups) and prints `matmul_tflops X`: MFU's denominator
//!
//! Both print one `key value` line per result, for the script to read.

use std::time::Instant;

use candle_core::{DType, Tensor};
use dpo_common::device::parse_device;
use dpo_common::model::{parse_dtype, LlamaConfig};
use dpo_common::testing::{llama31_8b_config, tiny_config, write_random_checkpoint, TinySpec};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "usage: gpu_tools random-model OUT_DIR [llama-3.1-8b|tiny-vocab-128k|tiny] \
                     [bf16|f32] [SEED]\n\
                     \x20      gpu_tools matmul DEVICE [N] [ITERS] [bf16|f32]";

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    match args.first().map(String::as_str) {
        Some("random-model") if args.len() >= 2 => {
            let cfg = match arg(2, "llama-3.1-8b").as_str() {
                "llama-3.1-8b" => llama31_8b_config(),
                "tiny-vocab-128k" => LlamaConfig {
                    vocab_size: 128_256,
                    max_position_embeddings: 131_072,
                    ..tiny_config(&TinySpec::default())
                },
                "tiny" => tiny_config(&TinySpec::default()),
                other => return Err(format!("unknown shape {other}\n{USAGE}").into()),
            };
            let dtype = parse_dtype(&arg(3, "bf16"))?;
            let seed: u64 = arg(4, "1").parse()?;
            let started = Instant::now();
            write_random_checkpoint(args[1].as_ref(), &cfg, dtype, seed)?;
            println!("params {}", dpo_common::memory::param_count(&cfg));
            println!("write_seconds {:.1}", started.elapsed().as_secs_f64());
            Ok(())
        }
        Some("matmul") if args.len() >= 2 => {
            let device = parse_device(&args[1])?;
            let n: usize = arg(2, "8192").parse()?;
            let iters: usize = arg(3, "20").parse()?;
            let dtype = parse_dtype(&arg(4, "bf16"))?;
            let a = Tensor::randn(0f32, 1.0, (n, n), &device)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1.0, (n, n), &device)?.to_dtype(dtype)?;
            for _ in 0..3 {
                a.matmul(&b)?;
            }
            device.synchronize()?;
            let started = Instant::now();
            let mut last = None;
            for _ in 0..iters {
                last = Some(a.matmul(&b)?);
            }
            device.synchronize()?;
            let seconds = started.elapsed().as_secs_f64();
            // One value read back: the products really ran (and finished) before the clock.
            if let Some(c) = last {
                let v = c.get(0)?.get(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                if !v.is_finite() {
                    return Err(format!("the {n}×{n} product is not finite ({v})").into());
                }
            }
            let tflops = 2.0 * (n as f64).powi(3) * iters as f64 / seconds / 1e12;
            println!("matmul_n {n}");
            println!("matmul_dtype {dtype:?}");
            // Three significant digits also for a CPU's small rate (the script divides by it).
            let decimals = (2 - tflops.log10().floor() as i64).max(0) as usize;
            println!("matmul_tflops {tflops:.decimals$}");
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}
