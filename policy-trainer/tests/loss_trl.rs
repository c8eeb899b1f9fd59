//! The trainer's losses against TRL's own loss code: `tests/fixtures/trl_losses.json`, written by
//! `tests/conformance/make_loss_fixture.py` from TRL's `DPOTrainer._compute_loss` and
//! `CPOTrainer.cpo_loss`, holds for each case the loss spec, the pairs, TRL's batch-mean loss
//! and its gradient with respect to each pair's four log-probs.
//!
//! Tolerance: `|ours − TRL| ≤ 1e-6·max(1, |TRL|)`, i.e. absolute below magnitude 1 and relative
//! above it (the IPO and SPPO losses reach tens).

use policy_trainer::loss::{batch_loss, LossFlags, LossSpec, PairGrad, PairLogps};
use serde::Deserialize;

const TOLERANCE: f64 = 1e-6;

#[derive(Deserialize)]
struct Fixture {
    trl_version: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    loss: String,
    beta: f64,
    label_smoothing: Option<f64>,
    discopop_tau: Option<f64>,
    gamma_beta_ratio: Option<f64>,
    pairs: Vec<Pair>,
    loss_value: f64,
    grads: Vec<Grad>,
}

#[derive(Deserialize)]
struct Pair {
    policy_chosen: f64,
    policy_rejected: f64,
    ref_chosen: f64,
    ref_rejected: f64,
    chosen_tokens: usize,
    rejected_tokens: usize,
}

#[derive(Deserialize)]
struct Grad {
    policy_chosen: f64,
    policy_rejected: f64,
    ref_chosen: f64,
    ref_rejected: f64,
}

fn load() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/trl_losses.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"))
}

/// The deviation in units of the tolerance's scale (≤ 1e-6 passes).
fn deviation(ours: f64, trl: f64) -> f64 {
    (ours - trl).abs() / trl.abs().max(1.0)
}

#[test]
fn losses_and_gradients_match_trl() {
    let fixture = load();
    assert!(fixture.cases.len() >= 150, "fixture has only {} cases", fixture.cases.len());
    let mut worst = (0.0, String::new());
    let mut failures = Vec::new();
    for case in &fixture.cases {
        let spec = LossSpec::from_flags(&LossFlags {
            loss: &case.loss,
            beta: case.beta,
            label_smoothing: case.label_smoothing,
            discopop_tau: case.discopop_tau,
            gamma_beta_ratio: case.gamma_beta_ratio,
            sft_weight: None,
        })
        .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let pairs: Vec<PairLogps> = case
            .pairs
            .iter()
            .map(|p| PairLogps {
                policy_chosen: p.policy_chosen,
                policy_rejected: p.policy_rejected,
                ref_chosen: p.ref_chosen,
                ref_rejected: p.ref_rejected,
                chosen_tokens: p.chosen_tokens,
                rejected_tokens: p.rejected_tokens,
            })
            .collect();
        let out = batch_loss(&spec, &pairs).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let mut compare = |what: String, ours: f64, trl: f64| {
            let d = deviation(ours, trl);
            if d > worst.0 {
                worst = (d, format!("{}: {what}", case.name));
            }
            if d > TOLERANCE {
                failures.push(format!("{}: {what}: ours {ours} vs TRL {trl}", case.name));
            }
        };
        compare("loss".into(), out.loss, case.loss_value);
        assert_eq!(out.grads.len(), case.grads.len(), "{}", case.name);
        for (i, (ours, trl)) in out.grads.iter().zip(&case.grads).enumerate() {
            let PairGrad { policy_chosen, policy_rejected, ref_chosen, ref_rejected } = *ours;
            compare(format!("pair {i} ∂π_c"), policy_chosen, trl.policy_chosen);
            compare(format!("pair {i} ∂π_r"), policy_rejected, trl.policy_rejected);
            compare(format!("pair {i} ∂ref_c"), ref_chosen, trl.ref_chosen);
            compare(format!("pair {i} ∂ref_r"), ref_rejected, trl.ref_rejected);
        }
    }
    println!(
        "{} cases against TRL {}: largest deviation {:.2e} ({})",
        fixture.cases.len(),
        fixture.trl_version,
        worst.0,
        worst.1
    );
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// Every loss name appears in the fixture, so a new loss cannot go unchecked against TRL.
#[test]
fn fixture_covers_every_loss() {
    let fixture = load();
    for kind in policy_trainer::loss::LossKind::ALL {
        assert!(
            fixture
                .cases
                .iter()
                .any(|c| c.loss.split(',').any(|t| t.split(':').next() == Some(kind.name()))),
            "no fixture case for {kind}"
        );
    }
}
