//! The memory model against what a real training pass keeps: the distinct storages held by
//! `model::backward`'s `TrainingPass` on tiny random models, compared with
//! `memory::layer_kept_tensors` × layers + `memory::head_kept_tensors`, to the byte.

use candle_core::{DType, Device};
use dpo_common::logprob::SharedPrompt;
use dpo_common::memory::{head_kept_tensors, layer_kept_tensors, predict_peak_bytes, MemoryConfig};
use dpo_common::model::backward::forward_shared;
use dpo_common::model::{Llama, Mode};
use dpo_common::testing::{tiny_config, tiny_weights, TinySpec};

/// `b` rows of exactly `t` tokens: a prompt and two responses of `resp` tokens each (no
/// padding, so the prediction's `row_len` is exact).
fn rows(b: usize, t: usize, resp: usize) -> Vec<SharedPrompt> {
    (0..b)
        .map(|i| {
            let ids: Vec<u32> = (0..t).map(|p| ((p * 7 + i * 13) % 250) as u32).collect();
            let p = t - 2 * resp;
            SharedPrompt {
                prompt: ids[..p].to_vec(),
                responses: vec![ids[p..p + resp].to_vec(), ids[p + resp..].to_vec()],
            }
        })
        .collect()
}

fn check(spec: TinySpec, dtype: DType, pairs: usize, t: usize, resp: usize, checkpoint: bool) {
    let cfg = tiny_config(&spec);
    let w = tiny_weights(&cfg, 3).unwrap();
    let m = Llama::from_weights(cfg.clone(), w, Mode::Frozen, dtype, &Device::Cpu).unwrap();
    let pass = forward_shared(&m, &rows(pairs, t, resp), checkpoint).unwrap();
    let measured = pass.kept_bytes();

    let r = pairs * 2 * resp;
    let layer: u64 = layer_kept_tensors(&cfg, pairs, t, dtype).iter().map(|s| s.bytes).sum();
    let head: u64 =
        head_kept_tensors(&cfg, pairs, t, r, 2 * pairs, true, dtype).iter().map(|s| s.bytes).sum();
    let layers = cfg.num_hidden_layers as u64;
    let input = (pairs * t * cfg.hidden_size * dtype.size_in_bytes()) as u64;
    let inventory = head + if checkpoint { layers * input } else { layers * layer };
    assert_eq!(inventory, measured, "predicted {inventory} B, the pass keeps {measured} B");

    // The public entry point: activations + logits are what the forward keeps (a layer
    // recomputed during a checkpointed backward is part of the workspace).
    let mc = MemoryConfig {
        response_len: 2 * resp,
        ..MemoryConfig::policy(&Device::Cpu, dtype, pairs, t, checkpoint)
    };
    let plan = predict_peak_bytes(&cfg, &mc);
    assert_eq!(plan.activations + plan.logits, inventory);
}

#[test]
fn inventory_matches_the_kept_tensors() {
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        check(TinySpec::default(), dtype, 2, 24, 5, false);
    }
    // GQA with more query heads per KV head, tied embeddings.
    let spec = TinySpec { heads: 8, kv_heads: 2, hidden: 64, tied: true, ..TinySpec::default() };
    check(spec, DType::F32, 1, 40, 19, false);
}

#[test]
fn checkpointed_inventory_matches_the_kept_tensors() {
    check(TinySpec::default(), DType::F32, 2, 24, 5, true);
}
