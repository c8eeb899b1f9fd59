//! Gradients against finite differences, the loss of an untrained policy (policy = reference)
//! against each loss's closed form, numerical range, and bad input. The values themselves are
//! checked against TRL in `tests/loss_trl.rs`.

use super::*;

const LN2: f64 = std::f64::consts::LN_2;

fn pair(pc: f64, pr: f64, rc: f64, rr: f64, nc: usize, nr: usize) -> PairLogps {
    PairLogps {
        policy_chosen: pc,
        policy_rejected: pr,
        ref_chosen: rc,
        ref_rejected: rr,
        chosen_tokens: nc,
        rejected_tokens: nr,
    }
}

/// Four pairs with margins of both signs and one at zero, and no ties in any quantity the AOT
/// losses sort (so they are differentiable here).
fn batch() -> Vec<PairLogps> {
    vec![
        pair(-15.0, -17.0, -15.5, -16.0, 6, 8),
        pair(-27.25, -19.5, -26.0, -21.0, 10, 7),
        pair(-10.0, -14.0, -10.0, -14.0, 3, 5),
        pair(-55.0, -60.5, -58.0, -57.0, 20, 24),
    ]
}

/// A valid spec of one loss, with ε = 0.1 where the loss takes it (exo_pair needs it).
fn spec_of(kind: LossKind, beta: f64) -> LossSpec {
    let mut spec = LossSpec::single(kind, beta);
    if kind.takes_label_smoothing() {
        spec.label_smoothing = Some(0.1);
    }
    spec
}

fn get(p: &mut PairLogps, k: usize) -> &mut f64 {
    match k {
        0 => &mut p.policy_chosen,
        1 => &mut p.policy_rejected,
        2 => &mut p.ref_chosen,
        _ => &mut p.ref_rejected,
    }
}

fn grad_entry(g: &PairGrad, k: usize) -> f64 {
    [g.policy_chosen, g.policy_rejected, g.ref_chosen, g.ref_rejected][k]
}

/// Central differences of the batch loss for every pair and log-prob, against the analytic
/// gradient.
fn check_gradient(spec: &LossSpec, pairs: &[PairLogps]) {
    let analytic = batch_loss(spec, pairs).unwrap();
    let h = 1e-5;
    for i in 0..pairs.len() {
        for k in 0..4 {
            let mut plus = pairs.to_vec();
            *get(&mut plus[i], k) += h;
            let mut minus = pairs.to_vec();
            *get(&mut minus[i], k) -= h;
            let numeric = (batch_loss(spec, &plus).unwrap().loss
                - batch_loss(spec, &minus).unwrap().loss)
                / (2.0 * h);
            let exact = grad_entry(&analytic.grads[i], k);
            let tol = 1e-6 * exact.abs().max(1.0);
            assert!(
                (numeric - exact).abs() <= tol,
                "{spec} β={}: pair {i} entry {k}: analytic {exact} vs finite difference {numeric}",
                spec.beta
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for beta in [0.1, 0.5] {
        for kind in LossKind::ALL {
            check_gradient(&spec_of(kind, beta), &batch());
        }
        let mut discopop = spec_of(LossKind::Discopop, beta);
        discopop.discopop_tau = Some(0.5);
        check_gradient(&discopop, &batch());
    }
    // Mixes, and the label-smoothed variants at ε = 0 (the default).
    for loss in
        ["sigmoid:1,sft:0.5", "ipo,sft", "sigmoid:1,hinge:0.5,apo_zero:0.25,aot:2", "simpo,sft:0.3"]
    {
        let flags = LossFlags {
            loss,
            beta: 0.3,
            label_smoothing: None,
            discopop_tau: None,
            gamma_beta_ratio: None,
            sft_weight: None,
        };
        check_gradient(&LossSpec::from_flags(&flags).unwrap(), &batch());
    }
    // AOT couples the batch: moving one pair's log-probs re-pairs the sorted ranks.
    let mut aot = spec_of(LossKind::AotUnpaired, 0.5);
    aot.label_smoothing = None;
    check_gradient(&aot, &batch());
    check_gradient(&aot, &batch()[..1]);
}

/// The loss of each kind when the policy is the reference (every log-ratio 0), as training
/// starts: printed (`cargo test -- --nocapture`) and checked against the closed form.
#[test]
fn loss_at_step_zero() {
    let (beta, eps): (f64, f64) = (0.1, 0.1);
    let at_reference = [pair(-20.0, -18.5, -20.0, -18.5, 6, 4), pair(-7.0, -9.0, -7.0, -9.0, 3, 5)];
    for kind in LossKind::ALL {
        let spec = spec_of(kind, beta);
        let expected = match kind {
            // (1−ε)·ln 2 + ε·ln 2, and for robust ((1−ε) − ε)·ln 2 / (1 − 2ε).
            LossKind::Sigmoid | LossKind::Robust | LossKind::Aot | LossKind::AotUnpaired => LN2,
            LossKind::SigmoidNorm => LN2,
            LossKind::Hinge => 1.0,
            LossKind::Ipo => 1.0 / (4.0 * beta * beta),
            LossKind::SppoHard => 2.0 * (0.5 / beta) * (0.5 / beta),
            LossKind::ExoPair => -LN2 - 0.5 * (eps * (1.0 - eps)).ln(),
            LossKind::NcaPair | LossKind::BcoPair => 2.0 * LN2,
            LossKind::ApoZero | LossKind::ApoDown => 1.0,
            // m = σ(0) = ½ between −log σ(0) = ln 2 and e⁰ = 1.
            LossKind::Discopop => 0.5 * (LN2 + 1.0),
            // Reference-free: the chosen NLL per token over the batch…
            LossKind::Sft => 27.0 / 9.0,
            // …and SimPO at average log-probs −20/6 vs −4.625, −7/3 vs −1.8, margin γ/β = 0.25.
            LossKind::Simpo => {
                let x = |pc: f64, nc: f64, pr: f64, nr: f64| beta * (pc / nc - pr / nr - 0.25);
                let f = |x: f64| (1.0 - eps) * terms::softplus(-x) + eps * terms::softplus(x);
                0.5 * (f(x(-20.0, 6.0, -18.5, 4.0)) + f(x(-7.0, 3.0, -9.0, 5.0)))
            }
        };
        let out = batch_loss(&spec, &at_reference).unwrap();
        println!("step-0 loss {kind:>12} (β {beta}, ε {eps} where taken): {:.9}", out.loss);
        assert!(
            (out.loss - expected).abs() < 1e-12,
            "{kind}: {} vs closed form {expected}",
            out.loss
        );
        // What the trainer prints before its first step: the same value, data-independent
        // where every term reads the reference.
        match loss_at_reference(&spec).unwrap() {
            Some(value) => assert!((value - expected).abs() < 1e-12, "{kind}: {value}"),
            None => assert!(matches!(kind, LossKind::Simpo | LossKind::Sft), "{kind}"),
        }
    }
    // A mix: the weighted sum of its terms' step-0 values; with sft, data-dependent.
    let mix = |loss| {
        let flags = LossFlags {
            loss,
            beta,
            label_smoothing: None,
            discopop_tau: None,
            gamma_beta_ratio: None,
            sft_weight: None,
        };
        loss_at_reference(&LossSpec::from_flags(&flags).unwrap()).unwrap()
    };
    let value = mix("sigmoid:2,hinge:0.5").unwrap();
    assert!((value - (2.0 * LN2 + 0.5)).abs() < 1e-12, "{value}");
    assert_eq!(mix("sigmoid,sft:0.5"), None);
}

/// Only AOT's gradients need the other pairs' log-probs; sft's needs their token counts only.
#[test]
fn which_gradients_couple_the_batch() {
    for kind in LossKind::ALL {
        let spec = spec_of(kind, 0.1);
        assert_eq!(
            spec.gradient_couples_batch(),
            matches!(kind, LossKind::Aot | LossKind::AotUnpaired),
            "{kind}"
        );
        assert_eq!(spec.has_pair_losses(), !kind.couples_batch(), "{kind}");
    }
    // sft: moving another pair's log-probs leaves a pair's gradient unchanged.
    let spec = LossSpec::single(LossKind::Sft, 0.1);
    let mut moved = batch();
    moved[1].policy_chosen -= 3.0;
    assert_eq!(
        batch_loss(&spec, &batch()).unwrap().grads,
        batch_loss(&spec, &moved).unwrap().grads
    );
}

/// Margins of ±1e4 nats (a diverged run, or a bad reference) must not produce inf or NaN where
/// the loss itself is finite.
#[test]
fn huge_margins_stay_finite() {
    let extreme = [pair(-1.0, -1e4, -5e3, -5e3, 10, 10), pair(-1e4, -1.0, -5e3, -5e3, 10, 10)];
    for kind in LossKind::ALL {
        for beta in [0.1, 2.0] {
            let out = batch_loss(&spec_of(kind, beta), &extreme).unwrap();
            assert!(out.loss.is_finite(), "{kind} β={beta}: loss {}", out.loss);
            for g in &out.grads {
                for k in 0..4 {
                    assert!(grad_entry(g, k).is_finite(), "{kind} β={beta}: gradient {g:?}");
                }
            }
        }
    }
    // Saturated DPO: the loss is the margin itself on the wrong side and 0 on the right one.
    let out = batch_loss(&LossSpec::single(LossKind::Sigmoid, 1.0), &extreme[..1]).unwrap();
    assert_eq!(out.loss, 0.0);
    let out = batch_loss(&LossSpec::single(LossKind::Sigmoid, 1.0), &extreme[1..]).unwrap();
    assert!((out.loss - 9999.0).abs() < 1e-9, "{}", out.loss);
}

#[test]
fn mix_is_the_weighted_sum_of_its_terms() {
    let flags = LossFlags {
        loss: "sigmoid:1,sft:0.5",
        beta: 0.1,
        label_smoothing: None,
        discopop_tau: None,
        gamma_beta_ratio: None,
        sft_weight: None,
    };
    let mix = batch_loss(&LossSpec::from_flags(&flags).unwrap(), &batch()).unwrap();
    let sigmoid = batch_loss(&LossSpec::single(LossKind::Sigmoid, 0.1), &batch()).unwrap();
    let sft = batch_loss(&LossSpec::single(LossKind::Sft, 0.1), &batch()).unwrap();
    assert!((mix.loss - (sigmoid.loss + 0.5 * sft.loss)).abs() < 1e-12);
    assert_eq!(mix.term_values, vec![sigmoid.loss, sft.loss]);
    let g = mix.grads[1];
    let expected = sigmoid.grads[1].policy_chosen + 0.5 * sft.grads[1].policy_chosen;
    assert!((g.policy_chosen - expected).abs() < 1e-15);
}

#[test]
fn rewards_with_and_without_reference() {
    let p = [pair(-12.0, -15.0, -13.0, -14.0, 4, 6)];
    let out = batch_loss(&LossSpec::single(LossKind::Ipo, 0.5), &p).unwrap();
    assert_eq!(out.rewards[0], PairRewards { chosen: 0.5, rejected: -0.5 });
    let out = batch_loss(&LossSpec::single(LossKind::Simpo, 2.0), &p).unwrap();
    assert_eq!(out.rewards[0], PairRewards { chosen: -6.0, rejected: -5.0 });
    assert_eq!(out.grads[0].ref_chosen, 0.0);
}

#[test]
fn bad_batches_are_errors() {
    let sigmoid = LossSpec::single(LossKind::Sigmoid, 0.1);
    assert!(batch_loss(&sigmoid, &[]).unwrap_err().to_string().contains("empty"));
    let e = batch_loss(&sigmoid, &[pair(f64::NAN, -1.0, -1.0, -1.0, 1, 1)]).unwrap_err();
    assert!(e.to_string().contains("policy log-probs of pair 0"), "{e}");
    let e = batch_loss(&sigmoid, &[pair(-1.0, -1.0, f64::INFINITY, -1.0, 1, 1)]).unwrap_err();
    assert!(e.to_string().contains("reference log-probs"), "{e}");
    // Reference-free losses do not read the reference, so a missing one (NaN) is fine.
    let simpo = LossSpec::single(LossKind::Simpo, 2.0);
    batch_loss(&simpo, &[pair(-1.0, -2.0, f64::NAN, f64::NAN, 1, 1)]).unwrap();
    let e = batch_loss(&simpo, &[pair(-1.0, -2.0, 0.0, 0.0, 0, 1)]).unwrap_err();
    assert!(e.to_string().contains("without tokens"), "{e}");
    // Token counts are not read by the summed-log-prob losses.
    batch_loss(&sigmoid, &[pair(-1.0, -2.0, -1.0, -2.0, 0, 0)]).unwrap();
    // A hand-built spec is validated too.
    let mut bad = LossSpec::single(LossKind::Hinge, 0.1);
    bad.label_smoothing = Some(0.1);
    assert!(batch_loss(&bad, &batch()).unwrap_err().to_string().contains("--label-smoothing"));
}
