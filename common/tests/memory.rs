//! The memory model against the tensors a real forward pass keeps: the storages reachable from
//! the autograd graph of `response_logprobs` on tiny random models (counted by walking the
//! graph, independently of the model's op-by-op inventory), for every kernel path the CPU
//! can run (fused f32, composite f64, composite bf16 layers with the fused f32 head).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use dpo_common::logprob::{response_logprobs, Sequence};
use dpo_common::memory::{
    head_saved_tensors, layer_saved_tensors, predict_peak_bytes, Kernels, MemoryConfig,
};
use dpo_common::model::{Llama, LlamaConfig, Mode};
use dpo_common::testing::{tiny_config, tiny_weights, TinySpec};

/// Bytes of every distinct storage reachable from `root`'s graph, the weights' excluded
/// (also when reached through a view such as `w.t()`).
fn graph_bytes(root: &Tensor) -> u64 {
    let nodes = root.sorted_nodes();
    let key = |t: &Tensor| &*t.storage_and_layout().0 as *const _ as usize;
    let weights: std::collections::HashSet<usize> =
        nodes.iter().filter(|n| n.is_variable()).map(|n| key(n)).collect();
    let mut extent: HashMap<usize, u64> = HashMap::new();
    for node in nodes {
        let key = key(node);
        if weights.contains(&key) {
            continue;
        }
        let layout = node.layout();
        let last: usize = layout
            .dims()
            .iter()
            .zip(layout.stride())
            .map(|(&d, &s)| d.saturating_sub(1) * s)
            .sum::<usize>()
            + layout.start_offset()
            + 1;
        let bytes = (last * node.dtype().size_in_bytes()) as u64;
        let e = extent.entry(key).or_default();
        *e = (*e).max(bytes);
    }
    extent.values().sum()
}

/// `b` sequences of exactly `t` tokens with `resp` response tokens each (no padding, so the
/// prediction's `seq_len` is exact).
fn batch(b: usize, t: usize, resp: usize) -> Vec<Sequence> {
    (0..b)
        .map(|i| Sequence {
            ids: (0..t).map(|p| ((p * 7 + i * 13) % 250) as u32).collect(),
            response_start: t - resp,
        })
        .collect()
}

fn model(cfg: &LlamaConfig, dtype: DType) -> Llama {
    let w = tiny_weights(cfg, 3).unwrap();
    Llama::from_weights(cfg.clone(), w, Mode::Trainable, dtype, &Device::Cpu).unwrap()
}

fn check(spec: TinySpec, dtype: DType, pairs: usize, t: usize, resp: usize) {
    let cfg = tiny_config(&spec);
    let m = model(&cfg, dtype);
    let seqs = batch(2 * pairs, t, resp);
    let lp = response_logprobs(&m, &seqs).unwrap();
    let measured = graph_bytes(&lp.sums);

    let k = Kernels::for_device(&Device::Cpu, dtype);
    let b = 2 * pairs;
    let layer: u64 = layer_saved_tensors(&cfg, b, t, dtype, k).iter().map(|s| s.bytes).sum();
    let head: u64 =
        head_saved_tensors(&cfg, b, t, b * resp, dtype, k).iter().map(|s| s.bytes).sum();
    let embedding = (b * t * cfg.hidden_size * dtype.size_in_bytes()) as u64;
    let inventory = embedding + cfg.num_hidden_layers as u64 * layer + head;

    // And through the public entry point: activations + logits are the same sum.
    let mc = MemoryConfig {
        response_len: resp,
        ..MemoryConfig::policy(&Device::Cpu, dtype, pairs, t, false)
    };
    let plan = predict_peak_bytes(&cfg, &mc);
    assert_eq!(plan.activations + plan.logits, inventory);

    let rel = (inventory as f64 - measured as f64) / measured as f64;
    eprintln!(
        "{dtype:?} {k:?} b={b} t={t} resp={resp}: graph holds {measured} B, the model \
         predicts {inventory} B ({:+.3}%)",
        rel * 100.0
    );
    // Every tensor is accounted for, to the byte.
    assert_eq!(inventory, measured, "predicted {inventory} B, the graph holds {measured} B");
}

#[test]
fn fused_f32_inventory_matches_the_graph() {
    check(TinySpec::default(), DType::F32, 2, 24, 10);
    // GQA with more query heads per KV head, tied embeddings, full-length responses.
    let spec = TinySpec { heads: 8, kv_heads: 2, hidden: 64, tied: true, ..TinySpec::default() };
    check(spec, DType::F32, 1, 40, 39);
}

#[test]
fn composite_f64_inventory_matches_the_graph() {
    check(TinySpec::default(), DType::F64, 2, 24, 10);
}

#[test]
fn composite_bf16_inventory_matches_the_graph() {
    check(TinySpec { tied: true, ..TinySpec::default() }, DType::BF16, 2, 24, 10);
}
