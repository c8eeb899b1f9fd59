//! The hand-written backward (`model::backward`) against candle's autograd on tiny random
//! models, and shared-prompt rows against separate sequences.
//!
//! Autograd itself is checked against finite differences in `tests/model.rs`, so agreeing
//! with it here (to 1e-10 in f64, where both run the composite ops, and to f32 rounding
//! with the CPU kernels) pins the hand-written gradients to the true ones.

use candle_core::{DType, Device, Tensor};
use dpo_common::logprob::{prefixed_logprobs, prefixed_logprobs_and_logits};
use dpo_common::logprob::{response_logprobs, shared_prompt_logprobs, Sequence, SharedPrompt};
use dpo_common::logprob::{shared_prompt_logprobs_and_logits, ResponseLogProbs};
use dpo_common::model::backward::{backward, forward_sequences, forward_shared, zero_grads};
use dpo_common::model::backward::{
    backward_after_prefix, forward_prefix, forward_shared_after, prefix_backward,
};
use dpo_common::model::{Llama, Mode};
use dpo_common::template::Template;
use dpo_common::testing::{tiny_config, tiny_tokenizer, tiny_weights, TinySpec};

fn pairs() -> Vec<SharedPrompt> {
    pairs_formatted(|p| p.to_string())
}

/// The pairs in the Alpaca template: every prompt starts with its preamble.
fn alpaca_pairs() -> Vec<SharedPrompt> {
    pairs_formatted(|p| Template::Alpaca.format_prompt(p))
}

fn pairs_formatted(format: impl Fn(&str) -> String) -> Vec<SharedPrompt> {
    let tok = tiny_tokenizer();
    [
        ("What is 2+2?", "4", "Five, I think."),
        ("Name a colour.", "A deep shade of blue, like the sea.", "No."),
        ("Hi", "", "Hello there!"),
    ]
    .iter()
    .map(|(p, c, r)| {
        let p = format(p);
        let c = tok.encode_prompt_response(&p, c).unwrap();
        let r = tok.encode_prompt_response(&p, r).unwrap();
        assert_eq!(c.ids[..c.response_start], r.ids[..r.response_start]);
        SharedPrompt {
            prompt: c.ids[..c.response_start].to_vec(),
            responses: vec![c.ids[c.response_start..].to_vec(), r.ids[r.response_start..].to_vec()],
        }
    })
    .collect()
}

/// The pairs as separate sequences, in response order.
fn sequences(groups: &[SharedPrompt]) -> Vec<Sequence> {
    groups
        .iter()
        .flat_map(|g| {
            g.responses.iter().map(|r| Sequence {
                ids: [g.prompt.as_slice(), r].concat(),
                response_start: g.prompt.len(),
            })
        })
        .collect()
}

fn model(spec: &TinySpec, mode: Mode, dtype: DType) -> Llama {
    let cfg = tiny_config(spec);
    let w = tiny_weights(&cfg, spec.seed).unwrap();
    Llama::from_weights(cfg, w, mode, dtype, &Device::Cpu).unwrap()
}

/// Arbitrary output weights, one per response, so every response matters differently.
fn dsums(n: usize) -> Vec<f32> {
    (0..n).map(|i| 0.7 - 0.45 * i as f32).collect()
}

/// Gradients of Σ dsums·logprobs by autograd, in `params()` order.
fn autograd_grads(m: &Llama, seqs: &[Sequence], w: &[f32]) -> Vec<Tensor> {
    let lp = response_logprobs(m, seqs).unwrap();
    let w =
        Tensor::from_slice(w, w.len(), &Device::Cpu).unwrap().to_dtype(lp.sums.dtype()).unwrap();
    let grads = (lp.sums * w).unwrap().sum_all().unwrap().backward().unwrap();
    m.params()
        .iter()
        .map(|(_, p)| grads.get(p).expect("every weight has a gradient").clone())
        .collect()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    (diff / norm.max(1e-300)).sqrt()
}

fn check(spec: TinySpec, dtype: DType, shared: bool, checkpoint: bool, tol: f64) {
    let groups = pairs();
    let seqs = sequences(&groups);
    let w = dsums(seqs.len());
    let reference = autograd_grads(&model(&spec, Mode::Trainable, dtype), &seqs, &w);

    // The hand-written backward runs on either mode (it never builds a graph).
    for mode in [Mode::Trainable, Mode::Frozen] {
        let m = model(&spec, mode, dtype);
        let pass = if shared {
            forward_shared(&m, &groups, checkpoint).unwrap()
        } else {
            forward_sequences(&m, &seqs, checkpoint).unwrap()
        };
        assert!(!pass.logprobs.sums.track_op(), "the training forward built a graph");
        let expected = response_logprobs(&m, &seqs).unwrap().sums_vec().unwrap();
        for (a, b) in pass.logprobs.sums_vec().unwrap().iter().zip(&expected) {
            assert!((a - b).abs() < tol.max(1e-12) * 100.0, "log-prob {a} vs {b}");
        }
        let mut grads = zero_grads(&m).unwrap();
        backward(pass, &w, &mut grads).unwrap();
        for ((name, _), (g, r)) in m.params().iter().zip(grads.iter().zip(&reference)) {
            let e = rel_err(g, r);
            assert!(e < tol, "{name}: relative error {e:e} (dtype {dtype:?}, shared {shared}, checkpoint {checkpoint}, {mode:?})");
        }
    }
}

#[test]
fn matches_autograd_in_f64_through_the_composite_ops() {
    for tied in [false, true] {
        let spec = TinySpec { tied, ..TinySpec::default() };
        check(spec, DType::F64, false, false, 1e-10);
    }
}

#[test]
fn matches_autograd_in_f32_through_the_cpu_kernels() {
    check(TinySpec::default(), DType::F32, false, false, 2e-5);
    check(
        TinySpec { tied: true, kv_heads: 4, ..TinySpec::default() },
        DType::F32,
        false,
        false,
        2e-5,
    );
}

#[test]
fn shared_prompts_give_the_gradients_of_separate_sequences() {
    check(TinySpec::default(), DType::F64, true, false, 1e-10);
    check(TinySpec::default(), DType::F32, true, false, 2e-5);
}

#[test]
fn checkpointing_changes_nothing() {
    check(TinySpec::default(), DType::F64, true, true, 1e-10);
    check(TinySpec::default(), DType::F32, false, true, 2e-5);
}

/// The trainer's prefix path: the preamble once per step, each pair its own pass after it,
/// the prefix's backward last. Same log-probs and gradients as whole rows in one pass.
fn check_prefix(dtype: DType, checkpoint: bool, tol: f64) {
    let m = model(&TinySpec::default(), Mode::Frozen, dtype);
    let groups = alpaca_pairs();
    let w = dsums(2 * groups.len());
    let whole = forward_shared(&m, &groups, false).unwrap();
    let expected = whole.logprobs.sums_vec().unwrap();
    let mut reference = zero_grads(&m).unwrap();
    backward(whole, &w, &mut reference).unwrap();

    let common = groups[0].prompt.iter().zip(&groups[1].prompt).take_while(|(a, b)| a == b).count();
    let mut prefix = forward_prefix(&m, &groups[0].prompt[..common]).unwrap();
    let mut grads = zero_grads(&m).unwrap();
    let mut got = Vec::new();
    for (g, w) in groups.iter().zip(w.chunks(2)) {
        let pass = forward_shared_after(&m, std::slice::from_ref(g), &prefix, checkpoint).unwrap();
        got.extend(pass.logprobs.sums_vec().unwrap());
        // A pass after a prefix is not differentiated as if it had none.
        assert!(backward(
            forward_shared_after(&m, std::slice::from_ref(g), &prefix, false).unwrap(),
            w,
            &mut zero_grads(&m).unwrap()
        )
        .is_err());
        backward_after_prefix(pass, w, &mut grads, &mut prefix).unwrap();
    }
    prefix_backward(prefix, &mut grads).unwrap();
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() < tol.max(1e-12) * 100.0, "log-prob {a} vs {b}");
    }
    for ((name, _), (g, r)) in m.params().iter().zip(grads.iter().zip(&reference)) {
        let e = rel_err(g, r);
        assert!(e < tol, "{name}: relative error {e:e} ({dtype:?}, checkpoint {checkpoint})");
    }
}

#[test]
fn a_shared_prefix_computed_once_gives_the_same_gradients() {
    check_prefix(DType::F64, false, 1e-10);
    check_prefix(DType::F64, true, 1e-10);
    check_prefix(DType::F32, false, 2e-5);
}

#[test]
fn gradients_accumulate_over_passes() {
    let spec = TinySpec::default();
    let m = model(&spec, Mode::Frozen, DType::F64);
    let groups = pairs();
    let w = dsums(2);
    let mut twice = zero_grads(&m).unwrap();
    for _ in 0..2 {
        backward(forward_shared(&m, &groups[..1], false).unwrap(), &w, &mut twice).unwrap();
    }
    let mut once = zero_grads(&m).unwrap();
    backward(forward_shared(&m, &groups[..1], false).unwrap(), &w, &mut once).unwrap();
    for (a, b) in twice.iter().zip(&once) {
        assert!(rel_err(a, &(b * 2.0).unwrap()) < 1e-6);
    }
}

/// bf16 accumulators (the trainer's `--grad-dtype bf16`) hold the f32 sums up to bf16
/// precision: every weight, tied or not (the embedding's rows go through their own add).
#[test]
fn bf16_accumulators_hold_the_f32_sums() {
    for tied in [false, true] {
        let m = model(&TinySpec { tied, ..TinySpec::default() }, Mode::Frozen, DType::F32);
        let groups = pairs();
        let mut f32_sums = zero_grads(&m).unwrap();
        let mut bf16_sums: Vec<Tensor> =
            f32_sums.iter().map(|g| g.to_dtype(DType::BF16).unwrap()).collect();
        for k in 0..6 {
            // Passes of different sizes and output weights.
            let w: Vec<f32> = dsums(6).iter().map(|x| x * (1.0 + k as f32)).collect();
            for sums in [&mut f32_sums, &mut bf16_sums] {
                let pass = forward_shared(&m, &groups, false).unwrap();
                backward(pass, &w, sums).unwrap();
            }
        }
        for ((name, _), (b, f)) in m.params().iter().zip(bf16_sums.iter().zip(&f32_sums)) {
            assert_eq!(b.dtype(), DType::BF16, "{name}");
            let e = rel_err(b, f);
            // bf16 keeps 8 significant bits (2^-9 = 2e-3 per rounding), six adds.
            assert!(e < 1e-2, "{name}: relative error {e:e} (tied {tied})");
        }
    }
}

#[test]
fn shared_prompt_logprobs_equal_separate_sequences() {
    for dtype in [DType::F32, DType::F64] {
        let m = model(&TinySpec::default(), Mode::Frozen, dtype);
        let groups = pairs();
        let shared = shared_prompt_logprobs(&m, &groups).unwrap();
        let separate = response_logprobs(&m, &sequences(&groups)).unwrap();
        assert_eq!(shared.counts, separate.counts);
        for (a, b) in shared.sums_vec().unwrap().iter().zip(separate.sums_vec().unwrap()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // One at a time too (rows of different lengths pad differently).
        for (g, s) in groups.iter().zip(sequences(&groups).chunks(2)) {
            let one = shared_prompt_logprobs(&m, std::slice::from_ref(g)).unwrap();
            let sep = response_logprobs(&m, s).unwrap();
            for (a, b) in one.sums_vec().unwrap().iter().zip(sep.sums_vec().unwrap()) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }
}

#[test]
fn bad_shared_prompts_are_named() {
    let m = model(&TinySpec::default(), Mode::Frozen, DType::F32);
    let err = |g: SharedPrompt| shared_prompt_logprobs(&m, &[g]).err().unwrap().to_string();
    let e = err(SharedPrompt { prompt: vec![1, 2], responses: vec![] });
    assert!(e.contains("without responses"), "{e}");
    let e = err(SharedPrompt { prompt: vec![1, 2], responses: vec![vec![3], vec![]] });
    assert!(e.contains("response 1") && e.contains("no response tokens"), "{e}");
    let e = err(SharedPrompt { prompt: vec![1, 2], responses: vec![vec![3, 100_000]] });
    assert!(e.contains("out of range"), "{e}");
}

/// TRL's `mean_logits` summed over a response, naively: the full forward of the sequence
/// alone, then at each position that predicts a response token the mean of its logits over the
/// vocabulary, summed (in f64).
fn naive_mean_logit_sum(m: &Llama, seq: &Sequence) -> f64 {
    let ids = Tensor::new(seq.ids.as_slice(), m.device()).unwrap().unsqueeze(0).unwrap();
    let logits = m.forward(&ids).unwrap().squeeze(0).unwrap().to_dtype(DType::F64).unwrap();
    let logits = logits.to_vec2::<f64>().unwrap();
    (seq.response_start - 1..seq.ids.len() - 1)
        .map(|p| logits[p].iter().sum::<f64>() / logits[p].len() as f64)
        .sum()
}

/// Every policy pass (the trainer's differentiable ones, with and without a prefix, and the
/// validation ones) returns per response the sum over its positions of the mean logit over the
/// vocabulary, as a full forward gives it; the reference's passes compute none.
#[test]
fn mean_logit_sums_match_a_naive_full_forward() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5), (DType::BF16, 2e-2)] {
        let m = model(&TinySpec::default(), Mode::Frozen, dtype);
        let groups = alpaca_pairs();
        let seqs = sequences(&groups);
        let expected: Vec<f64> = seqs.iter().map(|s| naive_mean_logit_sum(&m, s)).collect();
        let check = |what: &str, lp: &ResponseLogProbs| {
            let got = lp.mean_logit_sums_vec().unwrap().unwrap_or_else(|| panic!("{what}: none"));
            assert_eq!(got.len(), expected.len(), "{what}");
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                let err = (g - e).abs() / e.abs().max(1.0);
                assert!(err < tol, "{what} ({dtype:?}), response {i}: {g} vs {e}");
            }
        };
        check("forward_shared", &forward_shared(&m, &groups, false).unwrap().logprobs);
        check("forward_shared, checkpointed", &forward_shared(&m, &groups, true).unwrap().logprobs);
        check("forward_sequences", &forward_sequences(&m, &seqs, false).unwrap().logprobs);
        check(
            "shared_prompt_logprobs_and_logits",
            &shared_prompt_logprobs_and_logits(&m, &groups).unwrap(),
        );

        let common =
            groups[0].prompt.iter().zip(&groups[1].prompt).take_while(|(a, b)| a == b).count();
        let prefix_ids = &groups[0].prompt[..common];
        let prefix = forward_prefix(&m, prefix_ids).unwrap();
        let after = forward_shared_after(&m, &groups, &prefix, false).unwrap();
        check("forward_shared_after", &after.logprobs);
        let kv = m.prefix_kv(prefix_ids).unwrap();
        check(
            "prefixed_logprobs_and_logits",
            &prefixed_logprobs_and_logits(&m, &groups, &kv).unwrap(),
        );

        // The same log-probs either way; the reference's functions skip the mean.
        let plain = shared_prompt_logprobs(&m, &groups).unwrap();
        assert!(plain.mean_logit_sums.is_none());
        let with = shared_prompt_logprobs_and_logits(&m, &groups).unwrap();
        assert_eq!(plain.sums_vec().unwrap(), with.sums_vec().unwrap());
        assert!(prefixed_logprobs(&m, &groups, &kv).unwrap().mean_logit_sums.is_none());
        assert!(response_logprobs(&m, &seqs).unwrap().mean_logit_sums.is_none());
    }
}
