//! The DPO objective (Rafailov et al., 2023) on candle tensors: the per-pair loss
//! `-log σ(β·((π_c − ref_c) − (π_r − ref_r)))`, differentiable with respect to the policy
//! log-probs, and the batch statistics (implicit rewards, accuracies, margins) that training
//! and validation report.
//!
//! The reference scores arrive from the reference server as plain numbers ([`RefScores`]);
//! they are constants here — only the policy side carries a gradient.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Reference log-probs of one pair's two responses (summed over response tokens, nats).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RefScores {
    pub chosen: f64,
    pub rejected: f64,
}

/// What [`dpo_loss`] returns for a batch of pairs.
#[derive(Debug)]
pub struct DpoOutput {
    /// Per-pair loss, shape `[n]`, f32, carrying the policy log-probs' graph.
    pub losses: Tensor,
    /// The same pairs' statistics, computed in f64 from detached values.
    pub stats: DpoStats,
}

/// DPO loss of `n` pairs.
///
/// `policy_chosen` / `policy_rejected`: `[n]` summed response log-probs under the policy
/// (any float dtype; the loss is computed in f32). `refs[i]` is pair `i`'s reference scores.
/// The implicit reward of a response is `β·(π − ref)`; the loss is
/// `softplus(−β·(margin_π − margin_ref))`, evaluated so that neither huge nor tiny margins
/// overflow.
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    refs: &[RefScores],
    beta: f64,
) -> Result<DpoOutput> {
    ensure!(beta.is_finite() && beta > 0.0, "DPO beta must be a positive number, got {beta}");
    let n = refs.len();
    for (name, t) in [("chosen", policy_chosen), ("rejected", policy_rejected)] {
        ensure!(
            t.dims() == [n],
            "policy {name} log-probs have shape {:?}, expected [{n}] (one per pair with reference scores)",
            t.dims()
        );
    }
    for (i, r) in refs.iter().enumerate() {
        ensure!(
            r.chosen.is_finite() && r.rejected.is_finite(),
            "reference scores of pair {i} are not finite (chosen {}, rejected {})",
            r.chosen,
            r.rejected
        );
    }
    let device = policy_chosen.device();
    let chosen = policy_chosen.to_dtype(DType::F32)?;
    let rejected = policy_rejected.to_dtype(DType::F32)?;

    // Statistics from detached f64 copies (this is also where non-finite policy values are
    // caught: stepping on a NaN loss would poison the weights silently).
    let pc =
        policy_chosen.to_dtype(DType::F64)?.to_vec1::<f64>().context("reading policy log-probs")?;
    let pr = policy_rejected
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()
        .context("reading policy log-probs")?;
    let mut stats = DpoStats::default();
    for (i, ((&c, &r), refs)) in pc.iter().zip(&pr).zip(refs).enumerate() {
        ensure!(
            c.is_finite() && r.is_finite(),
            "policy log-probs of pair {i} are not finite (chosen {c}, rejected {r})"
        );
        stats.push(c, r, refs, beta);
    }

    // logits = β·((π_c − π_r) − (ref_c − ref_r)); the reference difference is taken in f64
    // first so two large, close sums keep their precision.
    let ref_diff: Vec<f32> = refs.iter().map(|r| (r.chosen - r.rejected) as f32).collect();
    let ref_diff = Tensor::from_vec(ref_diff, n, device)?;
    let logits = ((chosen - rejected)? - ref_diff)?.affine(beta, 0.0)?;
    // loss = −log σ(x) = softplus(−x) = relu(y) + log(1 + exp(−|y|)) with y = −x: exp never
    // sees a positive argument, so ±1e4 margins give 0 / 1e4 instead of inf/NaN. The
    // subgradients candle uses at y = 0 (relu' = 1, |y|' = +1) add up to the true derivative
    // σ(0) = ½, which matters: at step 0 the policy equals the reference and y is exactly 0.
    let y = logits.neg()?;
    let losses = (y.relu()? + (y.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(DpoOutput { losses, stats })
}

/// `softplus(−x) = −log σ(x)` in f64 (the statistics' copy of the loss).
fn neg_log_sigmoid(x: f64) -> f64 {
    (-x).max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Sums over pairs, kept in f64 so thousands of pairs average without drift. Merge the
/// statistics of micro-batches / validation chunks with [`DpoStats::merge`].
///
/// Means of an empty set (`count == 0`) are NaN, as are its min and max loss.
#[derive(Default, Clone, Debug)]
pub struct DpoStats {
    /// Number of pairs.
    pub count: usize,
    loss_sum: f64,
    loss_min: f64,
    loss_max: f64,
    chosen_reward_sum: f64,
    rejected_reward_sum: f64,
    /// Pairs with chosen reward > rejected reward, ties ([`is_tie`]) not counted.
    reward_correct: usize,
    /// Pairs with π_c > π_r (ties are wrong).
    logp_correct: usize,
}

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

impl DpoStats {
    /// Adds one pair given its policy log-probs and reference scores.
    fn push(&mut self, policy_chosen: f64, policy_rejected: f64, refs: &RefScores, beta: f64) {
        let chosen_reward = beta * (policy_chosen - refs.chosen);
        let rejected_reward = beta * (policy_rejected - refs.rejected);
        let loss = neg_log_sigmoid(chosen_reward - rejected_reward);
        self.merge(&DpoStats {
            count: 1,
            loss_sum: loss,
            loss_min: loss,
            loss_max: loss,
            chosen_reward_sum: chosen_reward,
            rejected_reward_sum: rejected_reward,
            reward_correct: usize::from(
                chosen_reward > rejected_reward && !is_tie(policy_chosen, policy_rejected, refs),
            ),
            logp_correct: usize::from(policy_chosen > policy_rejected),
        });
    }

    /// Adds `other`'s pairs to these.
    pub fn merge(&mut self, other: &DpoStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        self.count += other.count;
        self.loss_sum += other.loss_sum;
        self.loss_min = self.loss_min.min(other.loss_min);
        self.loss_max = self.loss_max.max(other.loss_max);
        self.chosen_reward_sum += other.chosen_reward_sum;
        self.rejected_reward_sum += other.rejected_reward_sum;
        self.reward_correct += other.reward_correct;
        self.logp_correct += other.logp_correct;
    }

    fn mean(&self, sum: f64) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            sum / self.count as f64
        }
    }

    pub fn mean_loss(&self) -> f64 {
        self.mean(self.loss_sum)
    }

    /// Fraction of pairs whose chosen response has the higher implicit reward, by more than
    /// rounding noise ([`TIE_RELATIVE`]).
    pub fn reward_accuracy(&self) -> f64 {
        self.mean(self.reward_correct as f64)
    }

    /// Fraction of pairs whose chosen response has the strictly higher policy log-prob.
    pub fn logp_accuracy(&self) -> f64 {
        self.mean(self.logp_correct as f64)
    }

    /// Mean of β(π_c − ref_c).
    pub fn mean_chosen_reward(&self) -> f64 {
        self.mean(self.chosen_reward_sum)
    }

    /// Mean of β(π_r − ref_r).
    pub fn mean_rejected_reward(&self) -> f64 {
        self.mean(self.rejected_reward_sum)
    }

    /// Mean of chosen reward − rejected reward.
    pub fn mean_margin(&self) -> f64 {
        self.mean(self.chosen_reward_sum - self.rejected_reward_sum)
    }

    pub fn min_loss(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.loss_min
        }
    }

    pub fn max_loss(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.loss_max
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const LN2: f64 = std::f64::consts::LN_2;

    fn vars(chosen: &[f32], rejected: &[f32]) -> (Var, Var) {
        let c = Var::from_vec(chosen.to_vec(), chosen.len(), &Device::Cpu).unwrap();
        let r = Var::from_vec(rejected.to_vec(), rejected.len(), &Device::Cpu).unwrap();
        (c, r)
    }

    fn losses(out: &DpoOutput) -> Vec<f32> {
        out.losses.to_vec1::<f32>().unwrap()
    }

    /// Reference formula, written the obvious (unstable) way, for moderate inputs.
    fn naive(pc: f64, pr: f64, r: RefScores, beta: f64) -> f64 {
        let x = beta * ((pc - r.chosen) - (pr - r.rejected));
        -(1.0 / (1.0 + (-x).exp())).ln()
    }

    #[test]
    fn rounding_noise_margins_are_ties_and_real_margins_count() {
        // Long responses (sums of ~300 nats): the tolerance is 64ε·1200 ≈ 9e-3 nats.
        let tol = TIE_RELATIVE * 1200.0;
        assert!((tol - 9.155e-3).abs() < 1e-5, "{tol}");
        let (c, r) = vars(&[-300.0; 5], &[-300.0; 5]);
        let refs = [
            // What two f32 paths give for the same weights: a few ulps of 300 (3e-5 each),
            // above an absolute 1e-4 but rounding noise all the same.
            RefScores { chosen: -300.0 - 3e-4, rejected: -300.0 },
            RefScores { chosen: -300.0 - 2e-3, rejected: -300.0 + 2e-3 },
            // Real margins, small next to the sums: they count, whichever way they go.
            RefScores { chosen: -300.0 - 0.05, rejected: -300.0 },
            RefScores { chosen: -300.0 - 0.5, rejected: -300.0 },
            RefScores { chosen: -300.0 + 0.05, rejected: -300.0 },
        ];
        let out = dpo_loss(c.as_tensor(), r.as_tensor(), &refs, 0.1).unwrap();
        assert!((out.stats.reward_accuracy() - 2.0 / 5.0).abs() < 1e-12, "the 0.05 and 0.5 wins");
        let ties: Vec<bool> = refs.iter().map(|r| is_tie(-300.0, -300.0, r)).collect();
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
    fn policy_equal_to_reference_gives_ln2_and_half_gradients() {
        let pc = [-12.5f32, -3.0, -100.25];
        let pr = [-14.0f32, -2.0, -99.0];
        let refs: Vec<RefScores> = pc
            .iter()
            .zip(&pr)
            .map(|(&c, &r)| RefScores { chosen: c as f64, rejected: r as f64 })
            .collect();
        let (c, r) = vars(&pc, &pr);
        let beta = 0.1;
        let out = dpo_loss(c.as_tensor(), r.as_tensor(), &refs, beta).unwrap();
        for l in losses(&out) {
            assert!((l as f64 - LN2).abs() < 1e-6, "{l}");
        }
        assert!((out.stats.mean_loss() - LN2).abs() < 1e-12);
        assert_eq!(out.stats.reward_accuracy(), 0.0, "ties count as wrong");
        assert_eq!(out.stats.mean_margin(), 0.0);
        // dL/dπ_c = −β·σ(−x) = −β/2 at x = 0, dL/dπ_r = +β/2.
        let grads = out.losses.sum_all().unwrap().backward().unwrap();
        for g in grads.get(c.as_tensor()).unwrap().to_vec1::<f32>().unwrap() {
            assert!((g as f64 + beta / 2.0).abs() < 1e-7, "{g}");
        }
        for g in grads.get(r.as_tensor()).unwrap().to_vec1::<f32>().unwrap() {
            assert!((g as f64 - beta / 2.0).abs() < 1e-7, "{g}");
        }
    }

    #[test]
    fn hand_computed_values_and_stats() {
        // Pair 0: rewards 0.1·(−10+12)=0.2 and 0.1·(−20+19)=−0.1, x = 0.3.
        // Pair 1: rewards 0.1·(−5+4)=−0.1 and 0.1·(−6+8)=0.2, x = −0.3.
        // Pair 2: rewards 0.5 and 0.5 (tie), x = 0; π_c = π_r (tie).
        let pc = [-10.0f32, -5.0, -7.0];
        let pr = [-20.0f32, -6.0, -7.0];
        let refs = [
            RefScores { chosen: -12.0, rejected: -19.0 },
            RefScores { chosen: -4.0, rejected: -8.0 },
            RefScores { chosen: -12.0, rejected: -12.0 },
        ];
        let (c, r) = vars(&pc, &pr);
        let out = dpo_loss(c.as_tensor(), r.as_tensor(), &refs, 0.1).unwrap();
        // −log σ(0.3) = log(1 + e^−0.3) = 0.554355244468527...
        let expected = [0.554_355_244_468_527_3, 0.854_355_244_468_527_3, LN2];
        for (l, e) in losses(&out).iter().zip(expected) {
            assert!((*l as f64 - e).abs() < 1e-6, "{l} vs {e}");
        }
        for (i, e) in expected.iter().enumerate() {
            let n = naive(pc[i] as f64, pr[i] as f64, refs[i], 0.1);
            assert!((n - e).abs() < 1e-12, "pair {i}: naive {n} vs {e}");
        }
        let s = &out.stats;
        assert_eq!(s.count, 3);
        assert!((s.mean_loss() - expected.iter().sum::<f64>() / 3.0).abs() < 1e-12);
        assert!((s.reward_accuracy() - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.logp_accuracy() - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.mean_chosen_reward() - (0.2 - 0.1 + 0.5) / 3.0).abs() < 1e-12);
        assert!((s.mean_rejected_reward() - (-0.1 + 0.2 + 0.5) / 3.0).abs() < 1e-12);
        assert!((s.mean_margin() - 0.0).abs() < 1e-12);
        assert!((s.min_loss() - expected[0]).abs() < 1e-12);
        assert!((s.max_loss() - expected[1]).abs() < 1e-12);
    }

    #[test]
    fn merged_stats_equal_one_batch() {
        let pc = [-10.0f32, -5.0, -7.0, -1.0];
        let pr = [-20.0f32, -6.0, -7.0, -3.0];
        let refs = [
            RefScores { chosen: -12.0, rejected: -19.0 },
            RefScores { chosen: -4.0, rejected: -8.0 },
            RefScores { chosen: -12.0, rejected: -12.0 },
            RefScores { chosen: -1.5, rejected: -2.0 },
        ];
        let (c, r) = vars(&pc, &pr);
        let whole = dpo_loss(c.as_tensor(), r.as_tensor(), &refs, 0.2).unwrap().stats;
        let mut merged = DpoStats::default();
        for (a, b) in [(0, 1), (1, 4)] {
            let (c, r) = vars(&pc[a..b], &pr[a..b]);
            merged.merge(&dpo_loss(c.as_tensor(), r.as_tensor(), &refs[a..b], 0.2).unwrap().stats);
        }
        assert_eq!(merged.count, whole.count);
        for (m, w) in [
            (merged.mean_loss(), whole.mean_loss()),
            (merged.reward_accuracy(), whole.reward_accuracy()),
            (merged.logp_accuracy(), whole.logp_accuracy()),
            (merged.mean_margin(), whole.mean_margin()),
            (merged.min_loss(), whole.min_loss()),
            (merged.max_loss(), whole.max_loss()),
        ] {
            assert!((m - w).abs() < 1e-12, "{m} vs {w}");
        }
    }

    #[test]
    fn empty_stats_are_nan() {
        let s = DpoStats::default();
        assert_eq!(s.count, 0);
        assert!(s.mean_loss().is_nan() && s.reward_accuracy().is_nan());
        assert!(s.min_loss().is_nan() && s.max_loss().is_nan());
        let mut t = DpoStats::default();
        t.merge(&s);
        assert_eq!(t.count, 0);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let pc = [-10.0f32, -5.0, -7.0];
        let pr = [-20.0f32, -6.0, -9.5];
        let refs = [
            RefScores { chosen: -12.0, rejected: -19.0 },
            RefScores { chosen: -4.0, rejected: -8.0 },
            RefScores { chosen: -3.0, rejected: -12.0 },
        ];
        let beta = 0.3;
        let (c, r) = vars(&pc, &pr);
        let out = dpo_loss(c.as_tensor(), r.as_tensor(), &refs, beta).unwrap();
        let grads = out.losses.sum_all().unwrap().backward().unwrap();
        let gc = grads.get(c.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let gr = grads.get(r.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-4;
        for i in 0..3 {
            let f = |dc: f64, dr: f64| naive(pc[i] as f64 + dc, pr[i] as f64 + dr, refs[i], beta);
            let fd_c = (f(h, 0.0) - f(-h, 0.0)) / (2.0 * h);
            let fd_r = (f(0.0, h) - f(0.0, -h)) / (2.0 * h);
            assert!((gc[i] as f64 - fd_c).abs() < 1e-5, "pair {i}: {} vs {fd_c}", gc[i]);
            assert!((gr[i] as f64 - fd_r).abs() < 1e-5, "pair {i}: {} vs {fd_r}", gr[i]);
        }
    }

    #[test]
    fn huge_margins_stay_finite() {
        let pc = [0.0f32, 0.0];
        let pr = [0.0f32, 0.0];
        let refs = [
            RefScores { chosen: -1e4, rejected: 1e4 }, // x = +2e4·β: loss → 0
            RefScores { chosen: 1e4, rejected: -1e4 }, // x = −2e4·β: loss → −x
        ];
        let (c, r) = vars(&pc, &pr);
        let beta = 1.0;
        let out = dpo_loss(c.as_tensor(), r.as_tensor(), &refs, beta).unwrap();
        let l = losses(&out);
        assert_eq!(l[0], 0.0);
        assert!((l[1] - 2e4).abs() < 1e-2, "{}", l[1]);
        let grads = out.losses.sum_all().unwrap().backward().unwrap();
        let gc = grads.get(c.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(gc.iter().all(|g| g.is_finite()), "{gc:?}");
        assert!(gc[0].abs() < 1e-30 && (gc[1] + 1.0).abs() < 1e-6, "{gc:?}");
        assert!(out.stats.mean_loss().is_finite() && out.stats.max_loss() == 2e4);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (c, r) = vars(&[0.0, 1.0], &[0.0, 1.0]);
        let one = [RefScores { chosen: 0.0, rejected: 0.0 }];
        let err = dpo_loss(c.as_tensor(), r.as_tensor(), &one, 0.1).unwrap_err();
        assert!(err.to_string().contains("expected [1]"), "{err}");
        let two = [
            RefScores { chosen: 0.0, rejected: 0.0 },
            RefScores { chosen: f64::NAN, rejected: 0.0 },
        ];
        let err = dpo_loss(c.as_tensor(), r.as_tensor(), &two, 0.1).unwrap_err();
        assert!(err.to_string().contains("pair 1"), "{err}");
        let (c, r) = vars(&[f32::NEG_INFINITY], &[0.0]);
        let err = dpo_loss(c.as_tensor(), r.as_tensor(), &one, 0.1).unwrap_err();
        assert!(err.to_string().contains("not finite"), "{err}");
        let (c, r) = vars(&[0.0], &[0.0]);
        assert!(dpo_loss(c.as_tensor(), r.as_tensor(), &one, 0.0).is_err());
    }
}
