//! The memory model's peak of a training pass against the most bytes a real pass holds at
//! once (counted by `testing::CountingAlloc`; one test in this binary, so that nothing else
//! allocates meanwhile), on tiny random models shaped so that each phase of the backward is
//! the peak in turn: the output head's (large vocabulary) or one layer's (long rows, small
//! vocabulary), with and without checkpointing. `memory.rs` checks what the forward keeps to
//! the byte; this checks the transients on top of it, which are the model's estimate.

use candle_core::{DType, Device};
use dpo_common::logprob::SharedPrompt;
use dpo_common::memory::{predict_peak_bytes, MemoryConfig};
use dpo_common::model::backward::{backward, forward_shared, zero_grads};
use dpo_common::model::{Llama, Mode};
use dpo_common::testing::{tiny_config, tiny_weights, CountingAlloc, TinySpec};

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// `b` rows of `t` tokens below `vocab`: a prompt and two responses of `resp` tokens.
fn rows(b: usize, t: usize, resp: usize, vocab: usize) -> Vec<SharedPrompt> {
    (0..b)
        .map(|i| {
            let ids: Vec<u32> = (0..t).map(|p| ((p * 7 + i * 13) % vocab) as u32).collect();
            let p = t - 2 * resp;
            SharedPrompt {
                prompt: ids[..p].to_vec(),
                responses: vec![ids[p..p + resp].to_vec(), ids[p + resp..].to_vec()],
            }
        })
        .collect()
}

/// Predicted and measured bytes of one forward + backward beyond the weights and the sums.
fn pass_bytes(
    spec: &TinySpec,
    vocab: usize,
    pairs: usize,
    t: usize,
    resp: usize,
    ckpt: bool,
) -> (u64, u64) {
    let mut cfg = tiny_config(spec);
    cfg.vocab_size = vocab;
    let w = tiny_weights(&cfg, 5).unwrap();
    let m = Llama::from_weights(cfg.clone(), w, Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let rows = rows(pairs, t, resp, vocab);
    let mut grads = zero_grads(&m).unwrap();
    let mc = MemoryConfig {
        response_len: 2 * resp,
        ..MemoryConfig::policy(&Device::Cpu, DType::F32, pairs, t, ckpt)
    };
    let plan = predict_peak_bytes(&cfg, &mc);

    let base = CountingAlloc::reset_peak();
    let pass = forward_shared(&m, &rows, ckpt).unwrap();
    let dsums: Vec<f32> = (0..2 * pairs).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    backward(pass, &dsums, &mut grads).unwrap();
    let measured = (CountingAlloc::peak() - base) as u64;
    (plan.activations + plan.logits + plan.workspace, measured)
}

#[test]
fn predicted_pass_peak_matches_the_bytes_held() {
    // Head: 8192-token vocabulary, 4 x 100 response tokens against a 64-wide model.
    let head = TinySpec { hidden: 64, intermediate: 128, ..TinySpec::default() };
    // Layers: 256-token rows, a 128-wide model with 512-wide MLP, the 258-token vocabulary.
    let layers = TinySpec { hidden: 128, intermediate: 512, layers: 3, ..TinySpec::default() };
    let cases = [
        ("head", &head, 8192, 2, 224, 100, false),
        ("head, checkpointing", &head, 8192, 2, 224, 100, true),
        ("layers", &layers, 258, 2, 256, 100, false),
        ("layers, checkpointing", &layers, 258, 2, 256, 100, true),
    ];
    // A first pass of each shape sets up what lives for the whole process (the thread
    // pool, the matrix kernel's per-thread buffers, sized by the largest matrices a thread
    // has packed so far), which no pass's prediction includes. On a loaded host a thread
    // may first take part in a later pass, so every shape is run once before measuring.
    for (_, spec, vocab, pairs, t, resp, ckpt) in cases {
        pass_bytes(spec, vocab, pairs, t, resp, ckpt);
    }
    let mut failures = vec![];
    for (name, spec, vocab, pairs, t, resp, ckpt) in cases {
        let (predicted, measured) = pass_bytes(spec, vocab, pairs, t, resp, ckpt);
        let ratio = predicted as f64 / measured as f64;
        eprintln!("{name}: predicted {predicted} B, held {measured} B, ratio {ratio:.3}");
        if !(0.95..=1.05).contains(&ratio) {
            failures.push(format!("{name}: predicted {predicted} B, held {measured} B"));
        }
    }
    assert!(failures.is_empty(), "off by more than 5%: {failures:?}");
}
