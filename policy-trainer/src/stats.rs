//! What training and validation report about a set of pairs, for every loss: the loss, the
//! implicit rewards, how often they rank the chosen response first, their margin, and the
//! policy's log-probs. Kept as f64 sums, so that micro-batches and validation chunks merge
//! into the statistics of their union ([`LossStats::merge`]).
//!
//! The loss and the rewards come from [`crate::loss::batch_loss`]; this module only counts.

use anyhow::Result;
use dpo_common::logprob::ResponseLogProbs;

use crate::loss::{batch_loss, BatchLoss, LossSpec, PairLogps, PairRewards};
use crate::ref_cache::RefScores;

/// Relative size of a tie: a pair's implicit-reward margin (π_c − ref_c) − (π_r − ref_r),
/// in nats before β, counts as a tie when its magnitude is at most `TIE_RELATIVE ·
/// (|π_c| + |π_r| + |ref_c| + |ref_r|)` ([`is_tie`]), and ties count as wrong.
///
/// Why: the policy's log-probs (the trainer's shared-prompt rows, prefix pass and packing)
/// and the reference's (the server's own batch layout) come from different code paths, so
/// even identical weights — at step 0, policy = reference — give sums that differ in their
/// last bits. Counting those differences as wins makes the step-0 accuracy a coin toss on
/// rounding noise instead of 0.
///
/// Why relative, and this size: each sum adds one f32 log-prob per response token, each
/// with its own rounding error, and the paths add them in different orders; the error of
/// such a sum grows with the magnitude of what is summed (for log-probs, all ≤ 0, that is
/// |sum|), so it grows with the responses' length. An absolute tolerance either lets long
/// responses' noise through or hides short responses' real margins. 64 units of f32
/// roundoff (f32::EPSILON, 1.2e-7) of the four summed magnitudes covers the few-ulp error
/// of each token's log-prob accumulated over hundreds of tokens with room to spare, yet is
/// small next to what training moves: for four sums of 300 nats the tolerance is 0.009
/// nats, while the margins of a policy that has learned something are tenths of a nat and
/// more (before β).
pub const TIE_RELATIVE: f64 = 64.0 * f32::EPSILON as f64;

/// Whether a pair's implicit-reward margin is within rounding noise of 0 ([`TIE_RELATIVE`]).
pub fn is_tie(policy_chosen: f64, policy_rejected: f64, refs: &RefScores) -> bool {
    let margin = (policy_chosen - refs.chosen) - (policy_rejected - refs.rejected);
    let scale =
        policy_chosen.abs() + policy_rejected.abs() + refs.chosen.abs() + refs.rejected.abs();
    margin.abs() <= TIE_RELATIVE * scale
}

/// The tie rule of a reference-free loss, whose implicit reward is `β·π/n` (the average
/// log-prob): a tie when the averages' difference is at most [`TIE_RELATIVE`] of their
/// magnitudes. There is no second code path to disagree with here, but two responses that
/// are the same text up to padding, or that differ by less than the rounding of their sums,
/// should not count as a ranking either way; relative for the reason [`TIE_RELATIVE`] gives.
pub fn is_tie_without_reference(pair: &PairLogps) -> bool {
    let chosen = pair.policy_chosen / pair.chosen_tokens.max(1) as f64;
    let rejected = pair.policy_rejected / pair.rejected_tokens.max(1) as f64;
    (chosen - rejected).abs() <= TIE_RELATIVE * (chosen.abs() + rejected.abs())
}

/// Sums over pairs, kept in f64 so thousands of pairs average without drift. Merge the
/// statistics of micro-batches / validation chunks with [`LossStats::merge`].
///
/// Means of an empty set (`count == 0`) are NaN.
#[derive(Default, Clone, Debug)]
pub struct LossStats {
    /// Number of pairs.
    pub count: usize,
    /// Σ over merged groups of (the group's loss × its pairs).
    loss_sum: f64,
    /// Smallest and largest per-pair loss; `None` when some group's loss does not split into
    /// per-pair losses (a term couples the batch) or no pair was counted.
    pair_loss_range: Option<(f64, f64)>,
    chosen_reward_sum: f64,
    rejected_reward_sum: f64,
    /// Pairs with chosen reward > rejected reward, ties not counted.
    reward_correct: usize,
    /// Pairs with π_c > π_r (ties are wrong).
    logp_correct: usize,
    chosen_logp_sum: f64,
    rejected_logp_sum: f64,
    /// The policy's logits over the responses (TRL's `logits/chosen`, `logits/rejected`),
    /// added by the caller from its forward passes ([`MeanLogits::of_pairs`]).
    pub logits: MeanLogits,
}

/// TRL's `logits/chosen` and `logits/rejected`: at each position that predicts a response
/// token, the mean of the policy's logits over the vocabulary, averaged over all the chosen
/// (rejected) response tokens counted — token-weighted, as TRL averages a batch. (TRL then
/// averages its per-micro-batch values when it logs; here a step's value is over the whole
/// batch, which equals that when the micro-batches hold as many tokens.)
#[derive(Default, Clone, Copy, Debug, PartialEq)]
pub struct MeanLogits {
    chosen_sum: f64,
    chosen_tokens: usize,
    rejected_sum: f64,
    rejected_tokens: usize,
}

impl MeanLogits {
    /// From a pass over pairs laid out as in the trainer's rows (each pair's chosen
    /// response, then its rejected one). A pass that did not compute the logits' means
    /// (the reference server's path) adds nothing.
    pub fn of_pairs(logprobs: &ResponseLogProbs) -> Result<MeanLogits> {
        let mut totals = MeanLogits::default();
        if let Some(sums) = logprobs.mean_logit_sums_vec()? {
            for (s, n) in sums.chunks_exact(2).zip(logprobs.counts.chunks_exact(2)) {
                totals.chosen_sum += s[0];
                totals.chosen_tokens += n[0];
                totals.rejected_sum += s[1];
                totals.rejected_tokens += n[1];
            }
        }
        Ok(totals)
    }

    pub fn add(&mut self, other: &MeanLogits) {
        self.chosen_sum += other.chosen_sum;
        self.chosen_tokens += other.chosen_tokens;
        self.rejected_sum += other.rejected_sum;
        self.rejected_tokens += other.rejected_tokens;
    }

    /// NaN when no chosen token was counted.
    pub fn chosen(&self) -> f64 {
        ratio(self.chosen_sum, self.chosen_tokens)
    }

    /// NaN when no rejected token was counted.
    pub fn rejected(&self) -> f64 {
        ratio(self.rejected_sum, self.rejected_tokens)
    }
}

fn ratio(sum: f64, count: usize) -> f64 {
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

impl LossStats {
    /// The statistics of `pairs`, whose loss under `spec` is `out` (`batch_loss(spec, pairs)`:
    /// the group over which the loss was taken, e.g. a micro-batch).
    pub fn of(spec: &LossSpec, pairs: &[PairLogps], out: &BatchLoss) -> Result<Self> {
        let pair_loss_range = if spec.has_pair_losses() && !pairs.is_empty() {
            let mut range = (f64::INFINITY, f64::NEG_INFINITY);
            for p in pairs {
                let loss = batch_loss(spec, std::slice::from_ref(p))?.loss;
                range = (range.0.min(loss), range.1.max(loss));
            }
            Some(range)
        } else {
            None
        };
        let mut stats = LossStats {
            count: pairs.len(),
            loss_sum: out.loss * pairs.len() as f64,
            pair_loss_range,
            ..LossStats::default()
        };
        let with_reference = spec.needs_reference();
        for (p, r) in pairs.iter().zip(&out.rewards) {
            stats.chosen_reward_sum += r.chosen;
            stats.rejected_reward_sum += r.rejected;
            stats.chosen_logp_sum += p.policy_chosen;
            stats.rejected_logp_sum += p.policy_rejected;
            stats.reward_correct += usize::from(ranks_chosen_first(p, r, with_reference));
            stats.logp_correct += usize::from(p.policy_chosen > p.policy_rejected);
        }
        Ok(stats)
    }

    /// Adds `other`'s pairs to these.
    pub fn merge(&mut self, other: &LossStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        self.count += other.count;
        self.loss_sum += other.loss_sum;
        self.pair_loss_range = match (self.pair_loss_range, other.pair_loss_range) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            _ => None,
        };
        self.chosen_reward_sum += other.chosen_reward_sum;
        self.rejected_reward_sum += other.rejected_reward_sum;
        self.reward_correct += other.reward_correct;
        self.logp_correct += other.logp_correct;
        self.chosen_logp_sum += other.chosen_logp_sum;
        self.rejected_logp_sum += other.rejected_logp_sum;
        self.logits.add(&other.logits);
    }

    fn mean(&self, sum: f64) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            sum / self.count as f64
        }
    }

    /// The loss, weighting each merged group by its pairs (for a loss without coupling, the
    /// mean of the per-pair losses).
    pub fn mean_loss(&self) -> f64 {
        self.mean(self.loss_sum)
    }

    /// Fraction of pairs whose chosen response has the higher implicit reward, by more than
    /// rounding noise ([`is_tie`], [`is_tie_without_reference`]).
    pub fn reward_accuracy(&self) -> f64 {
        self.mean(self.reward_correct as f64)
    }

    /// Fraction of pairs whose chosen response has the strictly higher policy log-prob.
    pub fn logp_accuracy(&self) -> f64 {
        self.mean(self.logp_correct as f64)
    }

    /// Mean implicit reward of the chosen responses.
    pub fn mean_chosen_reward(&self) -> f64 {
        self.mean(self.chosen_reward_sum)
    }

    /// Mean implicit reward of the rejected responses.
    pub fn mean_rejected_reward(&self) -> f64 {
        self.mean(self.rejected_reward_sum)
    }

    /// Mean of chosen reward − rejected reward.
    pub fn mean_margin(&self) -> f64 {
        self.mean(self.chosen_reward_sum - self.rejected_reward_sum)
    }

    /// Mean policy log-prob of the chosen responses (summed over their tokens).
    pub fn mean_chosen_logp(&self) -> f64 {
        self.mean(self.chosen_logp_sum)
    }

    /// Mean policy log-prob of the rejected responses (summed over their tokens).
    pub fn mean_rejected_logp(&self) -> f64 {
        self.mean(self.rejected_logp_sum)
    }

    /// The smallest per-pair loss, where per-pair losses are defined.
    pub fn min_loss(&self) -> Option<f64> {
        self.pair_loss_range.map(|r| r.0)
    }

    /// The largest per-pair loss, where per-pair losses are defined.
    pub fn max_loss(&self) -> Option<f64> {
        self.pair_loss_range.map(|r| r.1)
    }
}

/// Whether the rewards rank the chosen response first, by more than rounding noise.
fn ranks_chosen_first(p: &PairLogps, r: &PairRewards, with_reference: bool) -> bool {
    let tie = if with_reference {
        let refs = RefScores { chosen: p.ref_chosen, rejected: p.ref_rejected };
        is_tie(p.policy_chosen, p.policy_rejected, &refs)
    } else {
        is_tie_without_reference(p)
    };
    r.chosen > r.rejected && !tie
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::LossKind;

    const LN2: f64 = std::f64::consts::LN_2;

    fn pair(pc: f64, pr: f64, rc: f64, rr: f64) -> PairLogps {
        PairLogps {
            policy_chosen: pc,
            policy_rejected: pr,
            ref_chosen: rc,
            ref_rejected: rr,
            chosen_tokens: 4,
            rejected_tokens: 5,
        }
    }

    fn stats(spec: &LossSpec, pairs: &[PairLogps]) -> LossStats {
        LossStats::of(spec, pairs, &batch_loss(spec, pairs).unwrap()).unwrap()
    }

    #[test]
    fn rounding_noise_margins_are_ties_and_real_margins_count() {
        // Long responses (sums of ~300 nats): the tolerance is 64ε·1200 ≈ 9e-3 nats.
        let tol = TIE_RELATIVE * 1200.0;
        assert!((tol - 9.155e-3).abs() < 1e-5, "{tol}");
        let refs = [
            // What two f32 paths give for the same weights: a few ulps of 300 (3e-5 each),
            // above an absolute 1e-4 but rounding noise all the same.
            (-300.0 - 3e-4, -300.0),
            (-300.0 - 2e-3, -300.0 + 2e-3),
            // Real margins, small next to the sums: they count, whichever way they go.
            (-300.0 - 0.05, -300.0),
            (-300.0 - 0.5, -300.0),
            (-300.0 + 0.05, -300.0),
        ];
        let pairs: Vec<_> = refs.iter().map(|&(c, r)| pair(-300.0, -300.0, c, r)).collect();
        let s = stats(&LossSpec::single(LossKind::Sigmoid, 0.1), &pairs);
        assert!((s.reward_accuracy() - 2.0 / 5.0).abs() < 1e-12, "the 0.05 and 0.5 wins");
        let ties: Vec<bool> = refs
            .iter()
            .map(|&(c, r)| is_tie(-300.0, -300.0, &RefScores { chosen: c, rejected: r }))
            .collect();
        assert_eq!(ties, [true, true, false, false, false]);

        // Short responses (sums of ~5 nats): the tolerance shrinks with them (≈1.5e-4), so a
        // 1e-3 margin is real there.
        let short = RefScores { chosen: -5.0 - 1e-3, rejected: -5.0 };
        assert!(!is_tie(-5.0, -5.0, &short));
        assert!(is_tie(-5.0, -5.0, &RefScores { chosen: -5.0 - 1e-5, rejected: -5.0 }));
        // Exactly equal sums, even all zero, are a tie.
        assert!(is_tie(0.0, 0.0, &RefScores { chosen: 0.0, rejected: 0.0 }));
    }

    #[test]
    fn reference_free_ties_compare_average_log_probs() {
        // Averages −2 and −2 (8/4 and 10/5): a tie, whatever the sums.
        assert!(is_tie_without_reference(&pair(-8.0, -10.0, 0.0, 0.0)));
        assert!(!is_tie_without_reference(&pair(-8.0, -10.5, 0.0, 0.0)));
        let simpo = LossSpec::single(LossKind::Simpo, 2.0);
        let s = stats(&simpo, &[pair(-8.0, -10.0, 0.0, 0.0), pair(-8.0, -12.0, 0.0, 0.0)]);
        assert_eq!(s.reward_accuracy(), 0.5, "the tie is wrong, the real win counts");
        // Rewards β·π/n: (−4, −4) and (−4, −4.8).
        assert!((s.mean_margin() - 0.4).abs() < 1e-12, "{}", s.mean_margin());
    }

    #[test]
    fn hand_computed_values_and_stats() {
        // Pair 0: rewards 0.1·(−10+12)=0.2 and 0.1·(−20+19)=−0.1, x = 0.3.
        // Pair 1: rewards 0.1·(−5+4)=−0.1 and 0.1·(−6+8)=0.2, x = −0.3.
        // Pair 2: rewards 0.5 and 0.5 (tie), x = 0; π_c = π_r (tie).
        let pairs = [
            pair(-10.0, -20.0, -12.0, -19.0),
            pair(-5.0, -6.0, -4.0, -8.0),
            pair(-7.0, -7.0, -12.0, -12.0),
        ];
        // −log σ(0.3) = log(1 + e^−0.3) = 0.554355244468527...
        let expected = [0.554_355_244_468_527_3, 0.854_355_244_468_527_3, LN2];
        let s = stats(&LossSpec::single(LossKind::Sigmoid, 0.1), &pairs);
        assert_eq!(s.count, 3);
        assert!((s.mean_loss() - expected.iter().sum::<f64>() / 3.0).abs() < 1e-12);
        assert!((s.reward_accuracy() - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.logp_accuracy() - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.mean_chosen_reward() - (0.2 - 0.1 + 0.5) / 3.0).abs() < 1e-12);
        assert!((s.mean_rejected_reward() - (-0.1 + 0.2 + 0.5) / 3.0).abs() < 1e-12);
        assert!((s.mean_margin() - 0.0).abs() < 1e-12);
        assert!((s.mean_chosen_logp() - (-22.0 / 3.0)).abs() < 1e-12);
        assert!((s.mean_rejected_logp() - (-11.0)).abs() < 1e-12);
        assert!((s.min_loss().unwrap() - expected[0]).abs() < 1e-12);
        assert!((s.max_loss().unwrap() - expected[1]).abs() < 1e-12);
    }

    #[test]
    fn merged_stats_equal_one_batch_and_coupled_losses_have_no_extremes() {
        let pairs = [
            pair(-10.0, -20.0, -12.0, -19.0),
            pair(-5.0, -6.0, -4.0, -8.0),
            pair(-7.0, -7.0, -12.0, -12.0),
            pair(-1.0, -3.0, -1.5, -2.0),
        ];
        let spec = LossSpec::single(LossKind::Ipo, 0.2);
        let whole = stats(&spec, &pairs);
        let mut merged = LossStats::default();
        for (a, b) in [(0, 1), (1, 4)] {
            merged.merge(&stats(&spec, &pairs[a..b]));
        }
        assert_eq!(merged.count, whole.count);
        for (m, w) in [
            (merged.mean_loss(), whole.mean_loss()),
            (merged.reward_accuracy(), whole.reward_accuracy()),
            (merged.logp_accuracy(), whole.logp_accuracy()),
            (merged.mean_margin(), whole.mean_margin()),
            (merged.mean_chosen_logp(), whole.mean_chosen_logp()),
            (merged.min_loss().unwrap(), whole.min_loss().unwrap()),
            (merged.max_loss().unwrap(), whole.max_loss().unwrap()),
        ] {
            assert!((m - w).abs() < 1e-12, "{m} vs {w}");
        }
        // AOT's loss is the batch's: no per-pair extremes, also once merged with a group that
        // has them.
        let aot = stats(&LossSpec::single(LossKind::Aot, 0.2), &pairs);
        assert_eq!((aot.min_loss(), aot.max_loss()), (None, None));
        merged.merge(&aot);
        assert_eq!(merged.min_loss(), None);
    }

    #[test]
    fn empty_stats_are_nan() {
        let s = LossStats::default();
        assert_eq!(s.count, 0);
        assert!(s.mean_loss().is_nan() && s.reward_accuracy().is_nan());
        assert!(s.min_loss().is_none() && s.max_loss().is_none());
        let mut t = LossStats::default();
        t.merge(&s);
        assert_eq!(t.count, 0);
    }
}
