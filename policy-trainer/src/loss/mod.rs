//! The preference losses TRL's trainers offer, on plain numbers: from each pair's summed policy
//! and reference log-probs (and token counts), the batch loss, its exact gradient with respect to
//! those log-probs, and the implicit rewards the metrics report.
//!
//! The model side stays with the caller: it backpropagates the returned gradients through the
//! policy's summed log-probs (e.g. as the surrogate `Σᵢ gᵢ·πᵢ`). Keeping the losses in f64 away from
//! the tensor code lets each one be checked against TRL itself (`tests/loss_trl.rs` against a
//! fixture that TRL's own loss code wrote) and by finite differences.
//!
//! - [`spec`]: which loss — the names, the `--loss` mix syntax, the flag checks.
//! - [`terms`]: the formulas and their derivatives.

mod spec;
mod terms;

use std::ops::{Add, Mul};

use anyhow::{ensure, Result};

pub use spec::{
    parse_terms, LossFlags, LossKind, LossSpec, DEFAULT_DISCOPOP_TAU, DEFAULT_GAMMA_BETA_RATIO,
};

/// One pair's log-probs: summed over each response's tokens, in nats, and the token counts.
/// Reference-free losses ignore the reference values.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairLogps {
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

/// The gradient of the batch loss with respect to one pair's four log-probs. The reference
/// entries are for checking (the reference is constant in training); 0 for reference-free losses.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairGrad {
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

impl Add for PairGrad {
    type Output = PairGrad;
    fn add(self, o: PairGrad) -> PairGrad {
        PairGrad {
            policy_chosen: self.policy_chosen + o.policy_chosen,
            policy_rejected: self.policy_rejected + o.policy_rejected,
            ref_chosen: self.ref_chosen + o.ref_chosen,
            ref_rejected: self.ref_rejected + o.ref_rejected,
        }
    }
}

impl Mul<f64> for PairGrad {
    type Output = PairGrad;
    fn mul(self, k: f64) -> PairGrad {
        PairGrad {
            policy_chosen: self.policy_chosen * k,
            policy_rejected: self.policy_rejected * k,
            ref_chosen: self.ref_chosen * k,
            ref_rejected: self.ref_rejected * k,
        }
    }
}

/// One pair's implicit rewards, defined for every loss so that the reward metrics are: with a
/// reference, `β·(π − ref)` (DPO's); for a reference-free spec, `β·π/n`, the β-scaled average
/// log-prob (what TRL's CPO trainer logs for SimPO).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairRewards {
    pub chosen: f64,
    pub rejected: f64,
}

/// What [`batch_loss`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    /// The batch loss: `Σ_terms weight · term`, each term the mean over the batch of its per-pair
    /// loss (TRL's `per_sequence_loss.mean()`; for `sft`, the per-token NLL over the batch).
    pub loss: f64,
    /// Each term's unweighted value, in [`LossSpec::terms`] order (for logging a mix).
    pub term_values: Vec<f64>,
    /// `∂loss/∂(pair i's log-probs)`, one per pair.
    pub grads: Vec<PairGrad>,
    /// One per pair.
    pub rewards: Vec<PairRewards>,
}

/// The loss of a batch of pairs under `spec`, its gradient and the implicit rewards.
///
/// For the losses that couple a batch's pairs ([`LossSpec::couples_batch`]: `aot`,
/// `aot_unpaired`, `sft`) the result depends on which pairs are passed together: TRL computes them
/// per device micro-batch, and so does a caller that passes micro-batches.
pub fn batch_loss(spec: &LossSpec, pairs: &[PairLogps]) -> Result<BatchLoss> {
    spec.validate()?;
    ensure!(!pairs.is_empty(), "the loss of an empty batch is undefined");
    check_pairs(spec, pairs)?;
    let params = terms::Params::of(spec);
    let mut loss = 0.0;
    let mut term_values = Vec::with_capacity(spec.terms.len());
    let mut grads = vec![PairGrad::default(); pairs.len()];
    for &(kind, weight) in &spec.terms {
        let (value, term_grads) = terms::term(kind, params, pairs);
        loss += weight * value;
        term_values.push(value);
        for (g, t) in grads.iter_mut().zip(term_grads) {
            *g = *g + t * weight;
        }
    }
    let rewards = pairs.iter().map(|p| rewards(spec, p)).collect();
    Ok(BatchLoss { loss, term_values, grads, rewards })
}

/// The loss when the policy is the reference (every log-ratio 0), as training starts: the same
/// for every pair and batch for a spec whose terms all read the reference. `None` for `simpo`
/// and `sft`, whose value depends on the policy's own log-probs.
pub fn loss_at_reference(spec: &LossSpec) -> Result<Option<f64>> {
    if spec.terms.iter().any(|(k, _)| !k.needs_reference()) {
        return Ok(None);
    }
    // Any log-probs and token counts do, as long as policy and reference agree.
    let pair = PairLogps {
        policy_chosen: -1.0,
        policy_rejected: -2.0,
        ref_chosen: -1.0,
        ref_rejected: -2.0,
        chosen_tokens: 1,
        rejected_tokens: 1,
    };
    Ok(Some(batch_loss(spec, &[pair])?.loss))
}

fn rewards(spec: &LossSpec, p: &PairLogps) -> PairRewards {
    let beta = spec.beta;
    if spec.needs_reference() {
        PairRewards {
            chosen: beta * (p.policy_chosen - p.ref_chosen),
            rejected: beta * (p.policy_rejected - p.ref_rejected),
        }
    } else {
        PairRewards {
            chosen: beta * p.policy_chosen / p.chosen_tokens.max(1) as f64,
            rejected: beta * p.policy_rejected / p.rejected_tokens.max(1) as f64,
        }
    }
}

/// Non-finite log-probs would make a NaN loss that poisons the weights on the next step; a
/// zero token count would divide by zero in the per-token losses.
fn check_pairs(spec: &LossSpec, pairs: &[PairLogps]) -> Result<()> {
    let needs_reference = spec.needs_reference();
    let counts_tokens = spec.terms.iter().any(|(k, _)| k.uses_token_counts());
    for (i, p) in pairs.iter().enumerate() {
        ensure!(
            p.policy_chosen.is_finite() && p.policy_rejected.is_finite(),
            "policy log-probs of pair {i} are not finite (chosen {}, rejected {})",
            p.policy_chosen,
            p.policy_rejected
        );
        ensure!(
            !needs_reference || (p.ref_chosen.is_finite() && p.ref_rejected.is_finite()),
            "reference log-probs of pair {i} are not finite (chosen {}, rejected {})",
            p.ref_chosen,
            p.ref_rejected
        );
        ensure!(
            !counts_tokens || (p.chosen_tokens > 0 && p.rejected_tokens > 0),
            "pair {i} has a response without tokens (chosen {}, rejected {}), and --loss {spec} \
             divides by token counts",
            p.chosen_tokens,
            p.rejected_tokens
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
