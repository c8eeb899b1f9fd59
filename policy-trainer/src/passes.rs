//! A micro-batch of preference pairs as forward passes: each pair is one shared-prompt row
//! (the prompt once, then both responses), rows of similar length share a pass so that
//! padding stays small, and the prompts' common prefix (the template's preamble) can go
//! through the policy once for all of them. Training (`train`) and validation (`eval`) build
//! their passes here.

use anyhow::Result;
use dpo_common::data::EncodedPair;
use dpo_common::logprob::{
    prefixed_logprobs_and_logits, shared_prompt_logprobs_and_logits, SharedPrompt,
};
use dpo_common::model::{Llama, PrefixKv};
use dpo_common::prefix::usable_prefix_len;

use crate::loss::PairLogps;
use crate::ref_cache::RefScores;
use crate::stats::MeanLogits;

/// Smallest fraction of real (not padding) tokens in a forward pass: on a CPU a padded
/// position costs as much as a real one. A looser fill (0.5) packs more rows per pass but
/// gains no throughput within the host's noise and raises the peak memory
/// (`docs/performance.md`).
const MIN_FILL: f64 = 0.9;

/// Groups row indices into forward passes, longest first, each pass keeping at least
/// [`MIN_FILL`] of its padded tokens real.
fn packed_passes(lens: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lens[i]), i));
    let mut passes: Vec<Vec<usize>> = Vec::new();
    let mut real = 0;
    for i in order {
        if let Some(pass) = passes.last_mut() {
            let longest = lens[pass[0]];
            if (real + lens[i]) as f64 >= MIN_FILL * (longest * (pass.len() + 1)) as f64 {
                pass.push(i);
                real += lens[i];
                continue;
            }
        }
        passes.push(vec![i]);
        real = lens[i];
    }
    passes
}

/// A pair as one row of the forward pass: the prompt once, then the chosen and the rejected
/// response, each attending to the prompt and to itself (`logprob::SharedPrompt`). On HH
/// with the Alpaca template this is about a quarter fewer tokens than two sequences.
pub fn shared_row(p: &EncodedPair) -> SharedPrompt {
    SharedPrompt {
        prompt: p.prompt_ids.clone(),
        responses: vec![p.chosen_ids.clone(), p.rejected_ids.clone()],
    }
}

/// The forward passes of a micro-batch: its pairs' rows grouped so that padding stays under
/// 10% ([`packed_passes`]).
pub fn row_passes(pairs: &[EncodedPair]) -> (Vec<SharedPrompt>, Vec<Vec<usize>>) {
    let rows: Vec<SharedPrompt> = pairs.iter().map(shared_row).collect();
    let lens: Vec<usize> = rows.iter().map(SharedPrompt::row_len).collect();
    let passes = packed_passes(&lens);
    (rows, passes)
}

/// The longest prompt prefix every pair of `pairs` starts with, leaving each prompt its
/// last token (which predicts the first response token); `None` when shorter than
/// `min_tokens` or when `min_tokens` is 0. With the Alpaca template this is at least the
/// template's preamble, whatever the data: it goes through the policy once per optimizer
/// step (or evaluation) instead of once per pair (`model::backward`'s prefix pass).
pub fn common_prefix(pairs: &[EncodedPair], min_tokens: usize) -> Option<Vec<u32>> {
    let first = &pairs.first()?.prompt_ids;
    let len = usable_prefix_len(first, pairs.iter().map(|p| p.prompt_ids.as_slice()));
    (min_tokens > 0 && len >= min_tokens).then(|| first[..len].to_vec())
}

/// The loss's inputs for `pairs` before the policy has run: each response's token count and
/// the reference scores (`refs[i]` for pair `i`; 0 for a reference-free loss, which reads
/// none), with the policy's log-probs set equal to the reference's until a pass fills them in.
pub fn loss_inputs(pairs: &[EncodedPair], refs: Option<&[RefScores]>) -> Vec<PairLogps> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let r = refs.map_or(RefScores { chosen: 0.0, rejected: 0.0 }, |refs| refs[i]);
            PairLogps {
                policy_chosen: r.chosen,
                policy_rejected: r.rejected,
                ref_chosen: r.chosen,
                ref_rejected: r.rejected,
                chosen_tokens: p.chosen_ids.len(),
                rejected_tokens: p.rejected_ids.len(),
            }
        })
        .collect()
}

/// Policy log-probs of pairs, without gradients (validation, or the scoring pass of a loss
/// that couples a micro-batch): (chosen, rejected) per pair, summed over each response, and
/// the means of the policy's logits over the responses ([`MeanLogits`], for the metrics).
/// With `prefix` (which every pair's prompt must extend), its tokens are not recomputed.
pub fn policy_logprobs(
    policy: &Llama,
    pairs: &[EncodedPair],
    prefix: Option<&PrefixKv>,
) -> Result<(Vec<(f64, f64)>, MeanLogits)> {
    let (rows, passes) = row_passes(pairs);
    let mut out = vec![(0.0, 0.0); pairs.len()];
    let mut logits = MeanLogits::default();
    for pass in &passes {
        let batch: Vec<SharedPrompt> = pass.iter().map(|&i| rows[i].clone()).collect();
        let lp = match prefix {
            Some(prefix) => prefixed_logprobs_and_logits(policy, &batch, prefix)?,
            None => shared_prompt_logprobs_and_logits(policy, &batch)?,
        };
        let sums = lp.sums.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        for (&i, cr) in pass.iter().zip(sums.chunks_exact(2)) {
            out[i] = (cr[0] as f64, cr[1] as f64);
        }
        logits.add(&MeanLogits::of_pairs(&lp)?);
    }
    Ok((out, logits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use dpo_common::logprob::response_logprobs;
    use dpo_common::model::backward;
    use dpo_common::model::Mode;
    use dpo_common::testing::{tiny_config, tiny_weights, TinySpec};

    #[test]
    fn passes_keep_padding_under_ten_percent() {
        let lens = [100, 20, 95, 21, 50, 99, 10];
        let passes = packed_passes(&lens);
        let mut seen: Vec<usize> = passes.concat();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for p in &passes {
            let longest = p.iter().map(|&i| lens[i]).max().unwrap();
            let real: usize = p.iter().map(|&i| lens[i]).sum();
            assert!(real as f64 >= MIN_FILL * (longest * p.len()) as f64, "{p:?}");
        }
        assert_eq!(passes[0], vec![0, 5, 2], "the three long ones share a pass");
        // Two long sequences and many short ones: not all padded to 100.
        assert_eq!(packed_passes(&[100, 100, 2, 2, 2, 2]), vec![vec![0, 1], vec![2, 3, 4, 5]]);
    }

    #[test]
    fn packed_log_probs_and_gradients_equal_one_sequence_at_a_time() {
        let cfg = tiny_config(&TinySpec::default());
        let weights = tiny_weights(&cfg, 9).unwrap();
        let policy =
            Llama::from_weights(cfg, weights, Mode::Trainable, DType::F32, &Device::Cpu).unwrap();
        let pair = |p: usize, c: usize, r: usize| EncodedPair {
            prompt_ids: (1..=p as u32).collect(),
            chosen_ids: (30..30 + c as u32).collect(),
            rejected_ids: (60..60 + r as u32).collect(),
        };
        let pairs = [pair(5, 3, 30), pair(4, 28, 2), pair(6, 4, 5)];
        // The prompts share 4 tokens; the shortest keeps its last one.
        assert_eq!(common_prefix(&pairs, 2), Some(vec![1, 2, 3]));
        assert_eq!(common_prefix(&pairs, 4), None);
        assert_eq!(common_prefix(&pairs, 0), None);
        let prefix_ids = common_prefix(&pairs, 2).unwrap();
        let kv = policy.prefix_kv(&prefix_ids).unwrap();
        // The logits' means, each pair alone in its own pass: packing and the prefix must
        // not change them.
        let mut alone = MeanLogits::default();
        for p in &pairs {
            let row = shared_row(p);
            let lp = shared_prompt_logprobs_and_logits(&policy, &[row]).unwrap();
            alone.add(&MeanLogits::of_pairs(&lp).unwrap());
        }
        assert!(alone.chosen().is_finite() && alone.rejected().is_finite());
        for prefix in [None, Some(&kv)] {
            let (scored, logits) = policy_logprobs(&policy, &pairs, prefix).unwrap();
            for (p, (c, r)) in pairs.iter().zip(scored) {
                let one = |s| response_logprobs(&policy, &[s]).unwrap().sums_vec().unwrap()[0];
                assert!((c - one(p.chosen_sequence())).abs() < 1e-4);
                assert!((r - one(p.rejected_sequence())).abs() < 1e-4);
            }
            assert!((logits.chosen() - alone.chosen()).abs() < 1e-5, "{logits:?} {alone:?}");
            assert!((logits.rejected() - alone.rejected()).abs() < 1e-5, "{logits:?} {alone:?}");
        }
        // Gradients: the shared rows, passes and hand-written backward of a micro-batch give
        // autograd's gradient of Σ (chosen - rejected) over separate sequences, with the
        // step's prefix pass or without.
        let (rows, passes) = row_passes(&pairs);
        assert!(passes.len() > 1, "the test should cover several passes: {passes:?}");
        let mut variants = Vec::new();
        for with_prefix in [false, true] {
            let mut prefix =
                with_prefix.then(|| backward::forward_prefix(&policy, &prefix_ids).unwrap());
            let mut grads = backward::zero_grads(&policy).unwrap();
            for pass in &passes {
                let batch: Vec<_> = pass.iter().map(|&i| rows[i].clone()).collect();
                let dsums: Vec<f32> = pass.iter().flat_map(|_| [1.0, -1.0]).collect();
                match prefix.as_mut() {
                    Some(p) => {
                        let t = backward::forward_shared_after(&policy, &batch, p, false).unwrap();
                        backward::backward_after_prefix(t, &dsums, &mut grads, p).unwrap();
                    }
                    None => {
                        let t = backward::forward_shared(&policy, &batch, false).unwrap();
                        backward::backward(t, &dsums, &mut grads).unwrap();
                    }
                }
            }
            if let Some(p) = prefix {
                backward::prefix_backward(p, &mut grads).unwrap();
            }
            variants.push(grads);
        }
        let mut total: Option<Tensor> = None;
        for p in &pairs {
            for (s, sign) in [(p.chosen_sequence(), 1.0), (p.rejected_sequence(), -1.0)] {
                let v = response_logprobs(&policy, &[s]).unwrap().sums.sum_all().unwrap();
                let v = v.affine(sign, 0.0).unwrap();
                total = Some(match total {
                    Some(t) => (t + v).unwrap(),
                    None => v,
                });
            }
        }
        let g2 = total.unwrap().backward().unwrap();
        for grads in &variants {
            for (var, a) in policy.vars().iter().zip(grads) {
                let b = g2.get(var.as_tensor()).unwrap();
                let diff =
                    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "gradient differs by {diff}");
            }
        }
    }
}
