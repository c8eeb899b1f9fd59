//! Each loss as TRL 1.16 computes it (`DPOTrainer._compute_loss`; SimPO from `CPOTrainer.cpo_loss`),
//! with its exact derivative, in f64.
//!
//! Notation: for a pair, the log-ratios are `lr_c = π_c − ref_c` and `lr_r = π_r − ref_r`, the
//! margin `Δ = lr_c − lr_r` and `z = β·Δ`; `n_c`, `n_r` are the responses' token counts. Every
//! loss is written through `softplus(x) = log(1 + eˣ)` and `σ` evaluated so that no intermediate
//! overflows: margins of ±1e4 nats give finite values and gradients wherever the loss itself is
//! finite.

use super::{LossKind, LossSpec, PairGrad, PairLogps};

/// `log(1 + eˣ)`, exact for large |x| of either sign.
pub(crate) fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `σ(x) = 1 / (1 + e⁻ˣ)`, never forming e to a large positive power.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log σ(x) = −softplus(−x)`.
fn log_sigmoid(x: f64) -> f64 {
    -softplus(-x)
}

/// `σ'(x) = σ(x)·σ(−x)`.
fn sigmoid_slope(x: f64) -> f64 {
    sigmoid(x) * sigmoid(-x)
}

/// A scalar function's value and derivative at one point.
#[derive(Debug, Clone, Copy)]
struct Dual {
    value: f64,
    slope: f64,
}

/// The parameters every term reads, with defaults applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    beta: f64,
    epsilon: f64,
    tau: f64,
    gamma_beta_ratio: f64,
}

impl Params {
    pub(crate) fn of(spec: &LossSpec) -> Self {
        Params {
            beta: spec.beta,
            epsilon: spec.label_smoothing(),
            tau: spec.discopop_tau(),
            gamma_beta_ratio: spec.gamma_beta_ratio(),
        }
    }
}

/// One term's value over the batch (the mean of its per-pair losses, as TRL's
/// `per_sequence_loss.mean()`) and that value's gradient for each pair.
pub(crate) fn term(kind: LossKind, p: Params, pairs: &[PairLogps]) -> (f64, Vec<PairGrad>) {
    match kind {
        LossKind::Aot => aot_paired(p, pairs),
        LossKind::AotUnpaired => aot_unpaired(p, pairs),
        LossKind::Sft => sft(pairs),
        _ => {
            let n = pairs.len() as f64;
            let mut total = 0.0;
            let grads = pairs
                .iter()
                .map(|pair| {
                    let (loss, grad) = pair_term(kind, p, pair);
                    total += loss;
                    grad * (1.0 / n)
                })
                .collect();
            (total / n, grads)
        }
    }
}

/// The directions in which the scores used by the losses move with the four log-probs.
impl PairGrad {
    const fn new(
        policy_chosen: f64,
        policy_rejected: f64,
        ref_chosen: f64,
        ref_rejected: f64,
    ) -> Self {
        PairGrad { policy_chosen, policy_rejected, ref_chosen, ref_rejected }
    }
    /// ∂Δ: the margin `lr_c − lr_r`.
    const MARGIN: PairGrad = PairGrad::new(1.0, -1.0, -1.0, 1.0);
    /// ∂lr_c.
    const CHOSEN_RATIO: PairGrad = PairGrad::new(1.0, 0.0, -1.0, 0.0);
    /// ∂lr_r.
    const REJECTED_RATIO: PairGrad = PairGrad::new(0.0, 1.0, 0.0, -1.0);
}

/// ∂ of the per-token margin `lr_c/n_c − lr_r/n_r` (IPO, sigmoid_norm).
fn per_token_margin_grad(pair: &PairLogps) -> PairGrad {
    let (c, r) = (1.0 / pair.chosen_tokens as f64, 1.0 / pair.rejected_tokens as f64);
    PairGrad::new(c, -r, -c, r)
}

/// A pair-local loss and its gradient.
fn pair_term(kind: LossKind, p: Params, pair: &PairLogps) -> (f64, PairGrad) {
    let beta = p.beta;
    let lr_c = pair.policy_chosen - pair.ref_chosen;
    let lr_r = pair.policy_rejected - pair.ref_rejected;
    // The margin from the two differences of like quantities: two large, close sums keep their
    // precision that way.
    let margin =
        (pair.policy_chosen - pair.policy_rejected) - (pair.ref_chosen - pair.ref_rejected);
    let z = beta * margin;
    // A loss f(z) of the DPO margin z = β·Δ.
    let of_margin = |f: Dual| (f.value, PairGrad::MARGIN * (f.slope * beta));
    // A loss g(r_c, r_r) of the implicit rewards r = β·lr, given ∂g/∂r_c and ∂g/∂r_r.
    let of_rewards = |value: f64, d_chosen: f64, d_rejected: f64| {
        let grad = PairGrad::CHOSEN_RATIO * (d_chosen * beta)
            + PairGrad::REJECTED_RATIO * (d_rejected * beta);
        (value, grad)
    };
    let (r_c, r_r) = (beta * lr_c, beta * lr_r);
    match kind {
        LossKind::Sigmoid => of_margin(conservative_logistic(z, p.epsilon)),
        LossKind::Robust => of_margin(robust(z, p.epsilon)),
        LossKind::Hinge => of_margin(hinge(z)),
        LossKind::ExoPair => of_margin(exo(z, p.epsilon)),
        LossKind::Discopop => of_margin(discopop(z, p.tau)),
        LossKind::NcaPair => of_rewards(
            softplus(-r_c) + 0.5 * softplus(r_c) + 0.5 * softplus(r_r),
            -sigmoid(-r_c) + 0.5 * sigmoid(r_c),
            0.5 * sigmoid(r_r),
        ),
        // TRL 1.16's bco_pair has no running mean of the rewards (the BCO paper's δ): the rewards
        // are compared with 0.
        LossKind::BcoPair => {
            of_rewards(softplus(-r_c) + softplus(r_r), -sigmoid(-r_c), sigmoid(r_r))
        }
        LossKind::ApoZero => {
            of_rewards(sigmoid(-r_c) + sigmoid(r_r), -sigmoid_slope(r_c), sigmoid_slope(r_r))
        }
        LossKind::ApoDown => {
            let (value, grad) = of_rewards(sigmoid(r_c), sigmoid_slope(r_c), 0.0);
            let value = value + sigmoid(-z);
            (value, grad + PairGrad::MARGIN * (-sigmoid_slope(z) * beta))
        }
        LossKind::SppoHard => {
            // Squared distances of the log-ratios (not scaled by β) from ±1/(2β).
            let (a, b) = (lr_c - 0.5 / beta, lr_r + 0.5 / beta);
            (
                a * a + b * b,
                PairGrad::CHOSEN_RATIO * (2.0 * a) + PairGrad::REJECTED_RATIO * (2.0 * b),
            )
        }
        LossKind::Ipo => {
            let d = lr_c / pair.chosen_tokens as f64 - lr_r / pair.rejected_tokens as f64;
            let gap = d - 0.5 / beta;
            (gap * gap, per_token_margin_grad(pair) * (2.0 * gap))
        }
        LossKind::SigmoidNorm => {
            let d = lr_c / pair.chosen_tokens as f64 - lr_r / pair.rejected_tokens as f64;
            (softplus(-beta * d), per_token_margin_grad(pair) * (-beta * sigmoid(-beta * d)))
        }
        LossKind::Simpo => {
            let (n_c, n_r) = (pair.chosen_tokens as f64, pair.rejected_tokens as f64);
            let u =
                beta * (pair.policy_chosen / n_c - pair.policy_rejected / n_r - p.gamma_beta_ratio);
            let f = conservative_logistic(u, p.epsilon);
            (f.value, PairGrad::new(f.slope * beta / n_c, -f.slope * beta / n_r, 0.0, 0.0))
        }
        LossKind::Aot | LossKind::AotUnpaired | LossKind::Sft => {
            unreachable!("{kind} is a batch term, computed by `term`")
        }
    }
}

/// `−(1−ε)·log σ(x) − ε·log σ(−x)`: DPO's loss (ε = 0), conservative DPO, AOT's and SimPO's.
fn conservative_logistic(x: f64, eps: f64) -> Dual {
    Dual {
        value: (1.0 - eps) * softplus(-x) + eps * softplus(x),
        slope: -(1.0 - eps) * sigmoid(-x) + eps * sigmoid(x),
    }
}

/// Robust DPO: `[−(1−ε)·log σ(z) + ε·log σ(−z)] / (1 − 2ε)`.
fn robust(z: f64, eps: f64) -> Dual {
    let scale = 1.0 / (1.0 - 2.0 * eps);
    Dual {
        value: ((1.0 - eps) * softplus(-z) - eps * softplus(z)) * scale,
        slope: (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)) * scale,
    }
}

/// `max(0, 1 − z)`; the slope at the kink is 0, as torch's relu takes it.
fn hinge(z: f64) -> Dual {
    let active = 1.0 - z > 0.0;
    Dual { value: (1.0 - z).max(0.0), slope: if active { -1.0 } else { 0.0 } }
}

/// EXO: KL(q ‖ p) with q = (σ(z), σ(−z)) the model's and p = (1−ε, ε) the target distribution
/// over (chosen, rejected). Its derivative simplifies to `σ(z)σ(−z)·(z − log((1−ε)/ε))`.
fn exo(z: f64, eps: f64) -> Dual {
    let (q_w, q_l) = (sigmoid(z), sigmoid(-z));
    let value = q_w * (log_sigmoid(z) - (-eps).ln_1p()) + q_l * (log_sigmoid(-z) - eps.ln());
    let slope = q_w * q_l * (z - ((-eps).ln_1p() - eps.ln()));
    Dual { value, slope }
}

/// DiscoPOP: `(1−m)·(−log σ(z)) + m·e⁻ᶻ` with `m = σ(z/τ)`. The exponential only ever appears
/// multiplied by m, and `e⁻ᶻ·σ(z/τ) = exp(−z + log σ(z/τ))` stays finite for very negative z
/// whenever τ < 1 (where the product itself is tiny).
fn discopop(z: f64, tau: f64) -> Dual {
    let (m, one_minus_m) = (sigmoid(z / tau), sigmoid(-z / tau));
    let log_m = log_sigmoid(z / tau);
    let exp_m = (-z + log_m).exp(); // e⁻ᶻ·m
    let exp_dm = (-z + log_m + log_sigmoid(-z / tau)).exp() / tau; // e⁻ᶻ·m'
    let dm = m * one_minus_m / tau;
    let logistic = softplus(-z);
    Dual {
        value: logistic * one_minus_m + exp_m,
        slope: -sigmoid(-z) * one_minus_m - logistic * dm - exp_m + exp_dm,
    }
}

/// Indices of `values` in ascending order; ties keep their batch order (the sort is stable).
fn ascending(values: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order
}

/// AOT, paired: the k-th smallest policy margin `π_c − π_r` against the k-th smallest reference
/// margin `ref_c − ref_r`, each compared through the conservative logistic loss. The sort makes
/// the loss (and the gradient) a function of the whole batch; at exact ties the gradient is
/// one of the one-sided ones (TRL's sort picks another, with the same loss).
fn aot_paired(p: Params, pairs: &[PairLogps]) -> (f64, Vec<PairGrad>) {
    let policy: Vec<f64> = pairs.iter().map(|x| x.policy_chosen - x.policy_rejected).collect();
    let reference: Vec<f64> = pairs.iter().map(|x| x.ref_chosen - x.ref_rejected).collect();
    let wrt_policy = PairGrad::new(1.0, -1.0, 0.0, 0.0);
    let wrt_reference = PairGrad::new(0.0, 0.0, 1.0, -1.0);
    sorted_logistic(p, &policy, &reference, wrt_policy, wrt_reference)
}

/// AOT, unpaired: the k-th smallest chosen log-ratio against the k-th smallest rejected one.
fn aot_unpaired(p: Params, pairs: &[PairLogps]) -> (f64, Vec<PairGrad>) {
    let chosen: Vec<f64> = pairs.iter().map(|x| x.policy_chosen - x.ref_chosen).collect();
    let rejected: Vec<f64> = pairs.iter().map(|x| x.policy_rejected - x.ref_rejected).collect();
    sorted_logistic(p, &chosen, &rejected, PairGrad::CHOSEN_RATIO, PairGrad::REJECTED_RATIO)
}

/// Mean over ranks k of `conservative_logistic(β·(a₍ₖ₎ − b₍ₖ₎))` for the sorted `a` and `b`;
/// `da` / `db` are the gradients of one pair's `a` / `b` with respect to its four log-probs.
fn sorted_logistic(
    p: Params,
    a: &[f64],
    b: &[f64],
    da: PairGrad,
    db: PairGrad,
) -> (f64, Vec<PairGrad>) {
    let n = a.len() as f64;
    let mut grads = vec![PairGrad::default(); a.len()];
    let mut total = 0.0;
    for (i, j) in ascending(a).into_iter().zip(ascending(b)) {
        let f = conservative_logistic(p.beta * (a[i] - b[j]), p.epsilon);
        total += f.value;
        let slope = f.slope * p.beta / n;
        grads[i] = grads[i] + da * slope;
        grads[j] = grads[j] + db * (-slope);
    }
    (total / n, grads)
}

/// SFT: the chosen responses' negative log-likelihood per token over the batch,
/// `−Σ π_c / Σ n_c` (TRL takes the mean over all chosen tokens of the batch, so longer responses
/// weigh more; the value is the same for every pair, hence also its mean).
fn sft(pairs: &[PairLogps]) -> (f64, Vec<PairGrad>) {
    let tokens: f64 = pairs.iter().map(|x| x.chosen_tokens as f64).sum();
    let logps: f64 = pairs.iter().map(|x| x.policy_chosen).sum();
    let grad = PairGrad::new(-1.0 / tokens, 0.0, 0.0, 0.0);
    (-logps / tokens, vec![grad; pairs.len()])
}
