//! Validation: the loss (`--loss`) and implicit-reward statistics of the current policy on
//! the held-out pairs, against the (cached) reference scores, or without any for a
//! reference-free loss.

use anyhow::Result;
use dpo_common::data::EncodedPair;
use dpo_common::model::Llama;

use crate::loss::{batch_loss, LossSpec};
use crate::metrics::EvalResult;
use crate::passes::{common_prefix, loss_inputs, policy_logprobs};
use crate::ref_client::ReferenceScorer;
use crate::stats::LossStats;

/// Scores `val` with the policy in chunks of `chunk` pairs, without gradients. A loss that
/// couples pairs (`aot`, `sft`) is taken per chunk, as training takes it per micro-batch.
/// `scorer` is `None` for a reference-free loss.
pub fn evaluate(
    policy: &Llama,
    scorer: Option<&ReferenceScorer>,
    val: &[EncodedPair],
    loss: &LossSpec,
    chunk: usize,
    prefix_min_tokens: usize,
) -> Result<EvalResult> {
    if let Some(scorer) = scorer {
        scorer.prefetch(val);
    }
    // The policy's current weights (shared storage), without an autograd graph: a
    // validation pass needs no more memory than the reference's forward.
    let policy = &policy.frozen_view()?;
    // The prompts' common prefix (the template's preamble) once for the whole set.
    let prefix = match common_prefix(val, prefix_min_tokens) {
        Some(ids) => Some(policy.prefix_kv(&ids)?),
        None => None,
    };
    let mut totals = LossStats::default();
    for pairs in val.chunks(chunk.max(1)) {
        let (scored, logits) = policy_logprobs(policy, pairs, prefix.as_ref())?;
        let refs = scorer.map(|s| s.scores(pairs)).transpose()?;
        let mut inputs = loss_inputs(pairs, refs.as_deref());
        for (p, (chosen, rejected)) in inputs.iter_mut().zip(scored) {
            (p.policy_chosen, p.policy_rejected) = (chosen, rejected);
        }
        let out = batch_loss(loss, &inputs)?;
        let mut chunk_stats = LossStats::of(loss, &inputs, &out)?;
        chunk_stats.logits = logits;
        totals.merge(&chunk_stats);
    }
    Ok(EvalResult {
        loss: totals.mean_loss(),
        loss_min: totals.min_loss(),
        loss_max: totals.max_loss(),
        reward_accuracy: totals.reward_accuracy(),
        logp_accuracy: totals.logp_accuracy(),
        chosen_reward: totals.mean_chosen_reward(),
        rejected_reward: totals.mean_rejected_reward(),
        margin: totals.mean_margin(),
        pairs: totals.count,
        chosen_logp: totals.mean_chosen_logp(),
        rejected_logp: totals.mean_rejected_logp(),
        chosen_logits: totals.logits.chosen(),
        rejected_logits: totals.logits.rejected(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use dpo_common::logprob::{response_logprobs, Sequence};
    use dpo_common::model::ops::is_tracked;
    use dpo_common::model::Mode;
    use dpo_common::testing::{tiny_config, tiny_weights, TinySpec};

    #[test]
    fn the_frozen_view_scores_like_the_policy_without_a_graph() {
        let cfg = tiny_config(&TinySpec::default());
        let weights = tiny_weights(&cfg, 5).unwrap();
        let policy =
            Llama::from_weights(cfg, weights, Mode::Trainable, DType::F32, &Device::Cpu).unwrap();
        let seqs = [
            Sequence { ids: vec![1, 2, 3, 4, 5], response_start: 2 },
            Sequence { ids: vec![7, 8, 9], response_start: 1 },
        ];
        let tracked = response_logprobs(&policy, &seqs).unwrap();
        let view = policy.frozen_view().unwrap();
        let free = response_logprobs(&view, &seqs).unwrap();
        assert!(is_tracked(&tracked.sums) && !is_tracked(&free.sums));
        assert_eq!(tracked.sums_vec().unwrap(), free.sums_vec().unwrap());
    }
}
