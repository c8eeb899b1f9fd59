//! Which loss to train with: the loss names (TRL's), the `--loss` string that mixes them, and the
//! checks that turn a mistyped or contradictory choice into an error naming the flag, before
//! anything loads.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Result};

/// One preference loss, named as TRL's `DPOConfig.loss_type` names it (`simpo` as TRL's CPO
/// trainer does). The formulas are in [`super::terms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossKind {
    /// DPO (Rafailov et al., 2023); with label smoothing ε, conservative DPO.
    Sigmoid,
    /// Robust DPO (Chowdhury et al., 2024): unbiased under labels flipped with probability ε.
    Robust,
    /// IPO (Azar et al., 2023) on per-token (length-normalised) log-ratios, as TRL computes it.
    Ipo,
    /// SLiC's hinge on the DPO margin.
    Hinge,
    /// EXO-pref (Ji et al., 2024), needing ε > 0.
    ExoPair,
    /// NCA (Chen et al., 2024), pairwise form.
    NcaPair,
    /// BCO on pairs (Jung et al., 2024), without the running reward mean of the paper.
    BcoPair,
    /// SPPO with hard (0/1) win probabilities (Wu et al., 2024).
    SppoHard,
    /// AOT (Melnyk et al., 2024), paired: the batch's policy and reference margins are each
    /// sorted before they are compared, so the loss couples the pairs of a batch.
    Aot,
    /// AOT, unpaired: chosen and rejected log-ratios sorted separately.
    AotUnpaired,
    /// APO-zero (D'Oosterlinck et al., 2024): chosen better than the model's own output.
    ApoZero,
    /// APO-down: chosen worse than the model's own output.
    ApoDown,
    /// DiscoPOP (Chan et al., 2024): log-ratio-modulated blend of logistic and exponential losses.
    Discopop,
    /// NLL of the chosen response per token over the batch (RPO's term), reference-free.
    Sft,
    /// DPO on per-token (length-normalised) log-ratios.
    SigmoidNorm,
    /// SimPO (Meng et al., 2024): reference-free, on average log-probs, with margin γ.
    Simpo,
}

impl LossKind {
    /// Every loss, in the order error messages list them.
    pub const ALL: [LossKind; 16] = [
        LossKind::Sigmoid,
        LossKind::Robust,
        LossKind::Ipo,
        LossKind::Hinge,
        LossKind::ExoPair,
        LossKind::NcaPair,
        LossKind::BcoPair,
        LossKind::SppoHard,
        LossKind::Aot,
        LossKind::AotUnpaired,
        LossKind::ApoZero,
        LossKind::ApoDown,
        LossKind::Discopop,
        LossKind::Sft,
        LossKind::SigmoidNorm,
        LossKind::Simpo,
    ];

    /// The name `--loss` takes (TRL's).
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Sigmoid => "sigmoid",
            LossKind::Robust => "robust",
            LossKind::Ipo => "ipo",
            LossKind::Hinge => "hinge",
            LossKind::ExoPair => "exo_pair",
            LossKind::NcaPair => "nca_pair",
            LossKind::BcoPair => "bco_pair",
            LossKind::SppoHard => "sppo_hard",
            LossKind::Aot => "aot",
            LossKind::AotUnpaired => "aot_unpaired",
            LossKind::ApoZero => "apo_zero",
            LossKind::ApoDown => "apo_down",
            LossKind::Discopop => "discopop",
            LossKind::Sft => "sft",
            LossKind::SigmoidNorm => "sigmoid_norm",
            LossKind::Simpo => "simpo",
        }
    }

    /// Whether the loss reads the reference log-probs.
    pub fn needs_reference(self) -> bool {
        !matches!(self, LossKind::Sft | LossKind::Simpo)
    }

    /// Whether the loss takes `--label-smoothing`.
    pub fn takes_label_smoothing(self) -> bool {
        matches!(
            self,
            LossKind::Sigmoid
                | LossKind::Robust
                | LossKind::ExoPair
                | LossKind::Aot
                | LossKind::AotUnpaired
                | LossKind::Simpo
        )
    }

    /// Whether the loss divides by the responses' token counts (which must then be positive).
    pub fn uses_token_counts(self) -> bool {
        matches!(self, LossKind::Ipo | LossKind::SigmoidNorm | LossKind::Simpo | LossKind::Sft)
    }

    /// Whether a pair's loss depends on the other pairs of its batch (sorting, or a token-weighted
    /// batch mean): such a loss over micro-batches differs from the loss over their union.
    pub fn couples_batch(self) -> bool {
        matches!(self, LossKind::Aot | LossKind::AotUnpaired | LossKind::Sft)
    }

    /// Whether a pair's gradient depends on the other pairs' log-probs (AOT's sorts). `sft`
    /// couples the batch only through its token count: its gradient, `−1/Σ n_c`, is known
    /// before any log-prob is.
    pub fn gradient_couples_batch(self) -> bool {
        matches!(self, LossKind::Aot | LossKind::AotUnpaired)
    }
}

impl fmt::Display for LossKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for LossKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match LossKind::ALL.into_iter().find(|k| k.name() == s) {
            Some(kind) => Ok(kind),
            None => bail!("--loss: unknown loss `{s}`; the losses are {}", names(&LossKind::ALL)),
        }
    }
}

fn names(kinds: &[LossKind]) -> String {
    kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

/// DiscoPOP's τ when `--discopop-tau` is not given (the paper's and TRL's default).
pub const DEFAULT_DISCOPOP_TAU: f64 = 0.05;
/// SimPO's γ/β when `--gamma-beta-ratio` is not given (the SimPO reference trainer's default).
pub const DEFAULT_GAMMA_BETA_RATIO: f64 = 0.25;

/// The training loss: a weighted sum of [`LossKind`] terms and their parameters.
///
/// Parameters are `Option`s so that one given for no chosen loss is an error rather than
/// silently ignored; read them through [`LossSpec::label_smoothing`] etc., which apply the
/// defaults. Build with [`LossSpec::from_flags`] (or fill the fields and call
/// [`LossSpec::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpec {
    /// Each loss with its weight, in `--loss` order; no kind twice.
    pub terms: Vec<(LossKind, f64)>,
    /// β (`--beta`): the temperature of every loss (IPO's regulariser τ in its paper).
    pub beta: f64,
    /// ε (`--label-smoothing`): the assumed label-flip rate.
    pub label_smoothing: Option<f64>,
    /// τ (`--discopop-tau`): the width of DiscoPOP's blend.
    pub discopop_tau: Option<f64>,
    /// γ/β (`--gamma-beta-ratio`): SimPO's target margin in units of β.
    pub gamma_beta_ratio: Option<f64>,
}

/// The trainer's loss flags, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossFlags<'a> {
    /// `--loss`: `NAME` or `NAME:WEIGHT,NAME:WEIGHT,…` (a bare name weighs 1).
    pub loss: &'a str,
    /// `--beta`.
    pub beta: f64,
    /// `--label-smoothing`.
    pub label_smoothing: Option<f64>,
    /// `--discopop-tau`.
    pub discopop_tau: Option<f64>,
    /// `--gamma-beta-ratio`.
    pub gamma_beta_ratio: Option<f64>,
    /// `--sft-weight w`: adds `sft:w` to `--loss` (RPO's NLL term on the chosen response).
    pub sft_weight: Option<f64>,
}

impl LossSpec {
    /// The spec the flags describe, checked.
    pub fn from_flags(flags: &LossFlags<'_>) -> Result<Self> {
        let mut terms = parse_terms(flags.loss)?;
        if let Some(w) = flags.sft_weight {
            ensure!(
                !terms.iter().any(|(k, _)| *k == LossKind::Sft),
                "--sft-weight adds an sft term, but --loss `{}` already has one: give its weight once",
                flags.loss
            );
            ensure!(w.is_finite() && w > 0.0, "--sft-weight must be a positive number, got {w}");
            terms.push((LossKind::Sft, w));
        }
        let spec = LossSpec {
            terms,
            beta: flags.beta,
            label_smoothing: flags.label_smoothing,
            discopop_tau: flags.discopop_tau,
            gamma_beta_ratio: flags.gamma_beta_ratio,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// A single loss of weight 1 with no optional parameter (e.g. plain DPO).
    pub fn single(kind: LossKind, beta: f64) -> Self {
        LossSpec {
            terms: vec![(kind, 1.0)],
            beta,
            label_smoothing: None,
            discopop_tau: None,
            gamma_beta_ratio: None,
        }
    }

    /// ε, 0 when not given.
    pub fn label_smoothing(&self) -> f64 {
        self.label_smoothing.unwrap_or(0.0)
    }

    /// τ, [`DEFAULT_DISCOPOP_TAU`] when not given.
    pub fn discopop_tau(&self) -> f64 {
        self.discopop_tau.unwrap_or(DEFAULT_DISCOPOP_TAU)
    }

    /// γ/β, [`DEFAULT_GAMMA_BETA_RATIO`] when not given.
    pub fn gamma_beta_ratio(&self) -> f64 {
        self.gamma_beta_ratio.unwrap_or(DEFAULT_GAMMA_BETA_RATIO)
    }

    /// Whether some term reads the reference log-probs: false only for `simpo` and `sft` (alone or
    /// together). The trainer refuses `--ref-server none` when this is true.
    pub fn needs_reference(&self) -> bool {
        self.terms.iter().any(|(k, _)| k.needs_reference())
    }

    /// Whether the spec has a term of this kind.
    pub fn has(&self, kind: LossKind) -> bool {
        self.terms.iter().any(|(k, _)| *k == kind)
    }

    /// Whether some term couples the pairs of a batch (see [`LossKind::couples_batch`]).
    pub fn couples_batch(&self) -> bool {
        self.terms.iter().any(|(k, _)| k.couples_batch())
    }

    /// Whether some term's gradient for a pair depends on the other pairs' log-probs (see
    /// [`LossKind::gradient_couples_batch`]): the trainer then needs all of a micro-batch's
    /// policy log-probs before its first backward.
    pub fn gradient_couples_batch(&self) -> bool {
        self.terms.iter().any(|(k, _)| k.gradient_couples_batch())
    }

    /// Whether each pair has a loss of its own, the batch loss being their mean (no term
    /// couples the batch): then per-pair extremes are defined.
    pub fn has_pair_losses(&self) -> bool {
        !self.couples_batch()
    }

    /// Every check, each error naming the flag to fix.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.terms.is_empty(), "--loss names no loss");
        for (i, (kind, weight)) in self.terms.iter().enumerate() {
            ensure!(
                !self.terms[..i].iter().any(|(k, _)| k == kind),
                "--loss names {kind} twice: give each loss once, with its total weight"
            );
            ensure!(
                weight.is_finite() && *weight > 0.0,
                "--loss: the weight of {kind} must be a positive number, got {weight}"
            );
        }
        ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "--beta must be a positive number, got {}",
            self.beta
        );
        if self.has(LossKind::Simpo) {
            let with_reference: Vec<_> =
                self.terms.iter().map(|(k, _)| *k).filter(|k| k.needs_reference()).collect();
            ensure!(
                with_reference.is_empty(),
                "--loss: simpo is reference-free and mixes only with sft, not with {}",
                names(&with_reference)
            );
        }
        self.validate_label_smoothing()?;
        if let Some(tau) = self.discopop_tau {
            self.ensure_used("--discopop-tau", &[LossKind::Discopop])?;
            ensure!(
                tau.is_finite() && tau > 0.0,
                "--discopop-tau must be a positive number, got {tau}"
            );
        }
        if let Some(ratio) = self.gamma_beta_ratio {
            self.ensure_used("--gamma-beta-ratio", &[LossKind::Simpo])?;
            ensure!(
                ratio.is_finite() && ratio >= 0.0,
                "--gamma-beta-ratio must be a number ≥ 0, got {ratio}"
            );
        }
        Ok(())
    }

    fn validate_label_smoothing(&self) -> Result<()> {
        let Some(eps) = self.label_smoothing else {
            ensure!(
                !self.has(LossKind::ExoPair),
                "--loss exo_pair needs --label-smoothing ε in (0, 1) (its paper suggests 1e-3): \
                 EXO's target distribution puts ε on the rejected response, and log ε is part of the loss"
            );
            return Ok(());
        };
        let takers: Vec<_> =
            LossKind::ALL.into_iter().filter(|k| k.takes_label_smoothing()).collect();
        self.ensure_used("--label-smoothing", &takers)?;
        ensure!(
            (0.0..=1.0).contains(&eps),
            "--label-smoothing is a probability and must lie in [0, 1], got {eps}"
        );
        if self.has(LossKind::Robust) {
            ensure!(
                eps < 0.5,
                "--label-smoothing must be below 0.5 for robust (it divides by 1 − 2ε), got {eps}"
            );
        }
        if self.has(LossKind::ExoPair) {
            ensure!(
                eps > 0.0 && eps < 1.0,
                "--label-smoothing must lie in (0, 1) for exo_pair (its loss has log ε and log(1 − ε)), got {eps}"
            );
        }
        Ok(())
    }

    /// An error unless some term is one of `users`: a parameter no chosen loss reads is a mistake.
    fn ensure_used(&self, flag: &str, users: &[LossKind]) -> Result<()> {
        ensure!(
            self.terms.iter().any(|(k, _)| users.contains(k)),
            "{flag} is given but --loss `{self}` does not use it (only {} do)",
            names(users)
        );
        Ok(())
    }
}

/// `--loss` as written: `sigmoid`, or `sigmoid:1,sft:0.5`.
impl fmt::Display for LossSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [(kind, weight)] = self.terms[..] {
            if weight == 1.0 {
                return write!(f, "{kind}");
            }
        }
        let terms: Vec<_> = self.terms.iter().map(|(k, w)| format!("{k}:{w}")).collect();
        f.write_str(&terms.join(","))
    }
}

/// The terms of a `--loss` string: comma-separated `NAME` or `NAME:WEIGHT` (a bare name weighs 1).
pub fn parse_terms(s: &str) -> Result<Vec<(LossKind, f64)>> {
    let mut terms = Vec::new();
    for term in s.split(',') {
        let term = term.trim();
        ensure!(
            !term.is_empty(),
            "--loss `{s}` has an empty term (expected NAME or NAME:WEIGHT, comma-separated)"
        );
        let (name, weight) = match term.split_once(':') {
            None => (term, 1.0),
            Some((name, weight)) => {
                let weight: f64 = weight.trim().parse().map_err(|_| {
                    anyhow::anyhow!(
                        "--loss: the weight of `{}` is not a number: `{weight}`",
                        name.trim()
                    )
                })?;
                (name.trim(), weight)
            }
        };
        terms.push((name.parse::<LossKind>()?, weight));
    }
    Ok(terms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(loss: &str) -> LossFlags<'_> {
        LossFlags {
            loss,
            beta: 0.1,
            label_smoothing: None,
            discopop_tau: None,
            gamma_beta_ratio: None,
            sft_weight: None,
        }
    }

    fn err(f: LossFlags<'_>) -> String {
        format!("{:#}", LossSpec::from_flags(&f).unwrap_err())
    }

    #[test]
    fn names_round_trip() {
        for kind in LossKind::ALL {
            assert_eq!(kind.to_string().parse::<LossKind>().unwrap(), kind);
        }
    }

    #[test]
    fn parses_single_and_weighted_mixes() {
        let spec = LossSpec::from_flags(&flags("sigmoid")).unwrap();
        assert_eq!(spec.terms, vec![(LossKind::Sigmoid, 1.0)]);
        assert_eq!(spec.to_string(), "sigmoid");
        let spec = LossSpec::from_flags(&flags("sigmoid:1, sft:0.5")).unwrap();
        assert_eq!(spec.terms, vec![(LossKind::Sigmoid, 1.0), (LossKind::Sft, 0.5)]);
        assert_eq!(spec.to_string(), "sigmoid:1,sft:0.5");
        let spec =
            LossSpec::from_flags(&LossFlags { sft_weight: Some(0.25), ..flags("ipo") }).unwrap();
        assert_eq!(spec.terms, vec![(LossKind::Ipo, 1.0), (LossKind::Sft, 0.25)]);
    }

    #[test]
    fn unknown_loss_lists_the_valid_ones() {
        let e = err(flags("sigmoid,dpo"));
        assert!(e.contains("--loss") && e.contains("`dpo`"), "{e}");
        for kind in LossKind::ALL {
            assert!(e.contains(kind.name()), "{e}");
        }
    }

    #[test]
    fn malformed_terms_are_errors() {
        assert!(err(flags("sigmoid:x")).contains("not a number"));
        assert!(err(flags("sigmoid,,sft")).contains("empty term"));
        assert!(err(flags("sigmoid:0")).contains("positive"));
        assert!(err(flags("sigmoid:-1")).contains("positive"));
        assert!(err(flags("sigmoid,sigmoid:2")).contains("twice"));
        let e = err(LossFlags { sft_weight: Some(1.0), ..flags("sigmoid,sft") });
        assert!(e.contains("--sft-weight") && e.contains("once"), "{e}");
        assert!(
            err(LossFlags { sft_weight: Some(-1.0), ..flags("sigmoid") }).contains("--sft-weight")
        );
        assert!(err(LossFlags { beta: 0.0, ..flags("sigmoid") }).contains("--beta"));
    }

    #[test]
    fn parameters_no_chosen_loss_takes_are_errors() {
        let e = err(LossFlags { discopop_tau: Some(0.05), ..flags("sigmoid") });
        assert!(e.contains("--discopop-tau") && e.contains("discopop"), "{e}");
        let e = err(LossFlags { gamma_beta_ratio: Some(0.5), ..flags("sigmoid") });
        assert!(e.contains("--gamma-beta-ratio") && e.contains("simpo"), "{e}");
        let e = err(LossFlags { label_smoothing: Some(0.1), ..flags("ipo,hinge") });
        assert!(e.contains("--label-smoothing") && e.contains("robust"), "{e}");
        // Given for one chosen loss is enough.
        LossSpec::from_flags(&LossFlags { label_smoothing: Some(0.1), ..flags("ipo,robust") })
            .unwrap();
        LossSpec::from_flags(&LossFlags { discopop_tau: Some(0.1), ..flags("discopop") }).unwrap();
        LossSpec::from_flags(&LossFlags { gamma_beta_ratio: Some(0.5), ..flags("simpo") }).unwrap();
    }

    #[test]
    fn label_smoothing_ranges() {
        let with = |loss, eps| err(LossFlags { label_smoothing: Some(eps), ..flags(loss) });
        assert!(with("robust", 0.5).contains("below 0.5"));
        assert!(with("sigmoid", 1.5).contains("[0, 1]"));
        assert!(with("sigmoid", -0.1).contains("[0, 1]"));
        assert!(with("exo_pair", 0.0).contains("(0, 1)"));
        assert!(with("exo_pair", 1.0).contains("(0, 1)"));
        let e = err(flags("exo_pair"));
        assert!(e.contains("exo_pair needs --label-smoothing"), "{e}");
        LossSpec::from_flags(&LossFlags { label_smoothing: Some(0.0), ..flags("robust") }).unwrap();
        LossSpec::from_flags(&LossFlags { label_smoothing: Some(1e-3), ..flags("exo_pair") })
            .unwrap();
    }

    #[test]
    fn reference_needs() {
        let needs = |loss| LossSpec::from_flags(&flags(loss)).unwrap().needs_reference();
        assert!(!needs("simpo"));
        assert!(!needs("sft"));
        assert!(!needs("simpo,sft:0.5"));
        for kind in
            LossKind::ALL.into_iter().filter(|k| !matches!(k, LossKind::Simpo | LossKind::Sft))
        {
            if kind != LossKind::ExoPair {
                assert!(needs(kind.name()), "{kind}");
            }
        }
        assert!(needs("sft,sigmoid"));
        let e = err(flags("simpo,sigmoid"));
        assert!(e.contains("simpo is reference-free") && e.contains("sigmoid"), "{e}");
    }

    #[test]
    fn defaults_apply_when_not_given() {
        let spec = LossSpec::single(LossKind::Discopop, 0.1);
        assert_eq!(spec.discopop_tau(), DEFAULT_DISCOPOP_TAU);
        assert_eq!(spec.label_smoothing(), 0.0);
        assert_eq!(LossSpec::single(LossKind::Simpo, 2.0).gamma_beta_ratio(), 0.25);
    }
}
