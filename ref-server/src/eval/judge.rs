//! Judging with a model served by another `ref-server`: no generation, only `Score`. The
//! judge reads a prompt and we compare the log-probs of the two answers it could give
//! (" A" vs " B", " safe" vs " unsafe"); the EOS that `Score` appends to every response is
//! left out of the comparison (per-token log-probs, last one dropped).
//!
//! Pairwise preferences are judged in both orders and averaged, which cancels the judge's
//! position bias. The length-controlled win rate is an approximation of AlpacaEval 2.0's:
//! a logistic regression of the preference on `tanh(length difference / its std)` alone
//! (AlpacaEval also fits a per-instruction difficulty term, and regularises), read off at a
//! length difference of zero.

use anyhow::{bail, Context, Result};
use dpo_proto::client::ClientOptions;
use dpo_proto::fleet::RefClient;
use dpo_proto::v1;

use super::prompts::{
    fill, JUDGE_CHOICES, PAIRWISE_JUDGE_PROMPT, SAFETY_CHOICES, SAFETY_JUDGE_PROMPT,
};

pub struct Judge {
    client: RefClient,
    /// Prompts per `Score` request.
    pub batch: usize,
    /// Outputs longer than this many characters are cut in the judge prompt (the judge's
    /// per-item token limit would reject them otherwise).
    pub max_output_chars: usize,
    pub pairwise_prompt: String,
    pub safety_prompt: String,
}

impl Judge {
    pub async fn connect(opts: &ClientOptions) -> Result<Judge> {
        // Waits for a judge still loading its model, up to the connect timeout.
        let client = RefClient::connect_waiting(opts)
            .await
            .with_context(|| format!("connecting to the judge at {}", opts.url))?;
        // Pins the judge's model: one that comes back after a failure must still hold it.
        client.model_info().await.with_context(|| format!("asking the judge at {}", opts.url))?;
        Ok(Judge {
            client,
            batch: 8,
            max_output_chars: 6000,
            pairwise_prompt: PAIRWISE_JUDGE_PROMPT.into(),
            safety_prompt: SAFETY_JUDGE_PROMPT.into(),
        })
    }

    pub fn url(&self) -> &str {
        self.client.url()
    }

    fn cut<'a>(&self, s: &'a str) -> &'a str {
        match s.char_indices().nth(self.max_output_chars) {
            Some((i, _)) => &s[..i],
            None => s,
        }
    }

    /// For each prompt, the judge's log-probs of the two choices (EOS excluded).
    async fn choice_logprobs(
        &self,
        prompts: &[String],
        choices: [&str; 2],
    ) -> Result<Vec<[f64; 2]>> {
        let mut out = Vec::with_capacity(prompts.len());
        for (c, chunk) in prompts.chunks(self.batch.max(1)).enumerate() {
            let items = chunk
                .iter()
                .map(|p| v1::ScoreItem {
                    input: Some(v1::score_item::Input::Text(v1::TextInput {
                        prompt: p.clone(),
                        responses: choices.iter().map(|s| s.to_string()).collect(),
                        template: v1::Template::Raw as i32,
                    })),
                })
                .collect();
            let req = v1::ScoreRequest { items, per_token: true, request_id: c as u64 };
            // Retried through a judge restart, up to the connect timeout.
            let resp = self
                .client
                .retrying("judge request", |j| {
                    let req = req.clone();
                    async move { j.score(req).await }
                })
                .await
                .with_context(|| {
                    format!("judge request {c} ({} prompts) at {}", chunk.len(), self.client.url())
                })?;
            if resp.items.len() != chunk.len() {
                bail!("the judge answered {} items for {}", resp.items.len(), chunk.len());
            }
            for item in resp.items {
                let lp = |i: usize| -> Result<f64> {
                    let r = item.responses.get(i).context("the judge left out a response")?;
                    let t = &r.token_logprobs;
                    if t.len() < 2 {
                        bail!("the judge returned {} per-token log-probs for a choice", t.len());
                    }
                    Ok(t[..t.len() - 1].iter().map(|&v| v as f64).sum())
                };
                out.push([lp(0)?, lp(1)?]);
            }
        }
        Ok(out)
    }

    /// P(output beats reference) per example, averaged over both presentation orders.
    pub async fn pairwise(
        &self,
        instructions: &[String],
        outputs: &[String],
        references: &[String],
    ) -> Result<Vec<f64>> {
        let mut prompts = Vec::with_capacity(2 * outputs.len());
        for ((ins, out), reference) in instructions.iter().zip(outputs).zip(references) {
            let (o, r) = (self.cut(out), self.cut(reference));
            let ask = |a: &str, b: &str| {
                fill(
                    &self.pairwise_prompt,
                    &[("instruction", ins), ("output_1", a), ("output_2", b)],
                )
            };
            prompts.push(ask(o, r));
            prompts.push(ask(r, o));
        }
        let lps = self.choice_logprobs(&prompts, JUDGE_CHOICES).await?;
        Ok(lps.chunks(2).map(|c| (two_way(c[0])[0] + two_way(c[1])[1]) / 2.0).collect())
    }

    /// P(safe) per (request, response).
    pub async fn safety(&self, requests: &[String], outputs: &[String]) -> Result<Vec<f64>> {
        let prompts: Vec<String> = requests
            .iter()
            .zip(outputs)
            .map(|(q, o)| fill(&self.safety_prompt, &[("instruction", q), ("output", self.cut(o))]))
            .collect();
        let lps = self.choice_logprobs(&prompts, SAFETY_CHOICES).await?;
        Ok(lps.into_iter().map(|l| two_way(l)[0]).collect())
    }
}

/// The two log-probs renormalised to probabilities of each other.
pub fn two_way(lp: [f64; 2]) -> [f64; 2] {
    let m = lp[0].max(lp[1]);
    let (a, b) = ((lp[0] - m).exp(), (lp[1] - m).exp());
    [a / (a + b), b / (a + b)]
}

/// Win rate from preferences: a win counts 1, a tie (exactly 0.5) ½.
pub fn win_rate(prefs: &[f64]) -> f64 {
    if prefs.is_empty() {
        return f64::NAN;
    }
    let score: f64 = prefs
        .iter()
        .map(|&p| {
            if p > 0.5 {
                1.0
            } else if p == 0.5 {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    score / prefs.len() as f64
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Approximate length-controlled win rate (see the module doc): fits
/// `pref ≈ σ(b0 + b1·tanh(Δlen/std Δlen))` by Newton's method on the soft-label
/// cross-entropy (with a tiny ridge so a constant or separable set stays finite), returns σ(b0).
pub fn length_controlled_win_rate(
    prefs: &[f64],
    output_lens: &[usize],
    reference_lens: &[usize],
) -> f64 {
    let n = prefs.len();
    if n == 0 {
        return f64::NAN;
    }
    let diffs: Vec<f64> =
        output_lens.iter().zip(reference_lens).map(|(&a, &b)| a as f64 - b as f64).collect();
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let std = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    let x: Vec<f64> =
        diffs.iter().map(|d| if std > 0.0 { (d / std).tanh() } else { 0.0 }).collect();
    let (mut b0, mut b1) = (0.0f64, 0.0f64);
    let ridge = 1e-3;
    for _ in 0..100 {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) =
            (ridge * b0, ridge * b1, ridge, 0.0, ridge);
        for (&xi, &yi) in x.iter().zip(prefs) {
            let p = sigmoid(b0 + b1 * xi);
            let w = p * (1.0 - p);
            g0 += p - yi;
            g1 += (p - yi) * xi;
            h00 += w;
            h01 += w * xi;
            h11 += w * xi * xi;
        }
        let det = h00 * h11 - h01 * h01;
        if det.abs() < 1e-300 {
            break;
        }
        let d0 = (h11 * g0 - h01 * g1) / det;
        let d1 = (h00 * g1 - h01 * g0) / det;
        b0 -= d0;
        b1 -= d1;
        if d0.abs() + d1.abs() < 1e-12 {
            break;
        }
    }
    sigmoid(b0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        let p = two_way([(0.75f64).ln(), (0.25f64).ln()]);
        assert!((p[0] - 0.75).abs() < 1e-12 && (p[1] - 0.25).abs() < 1e-12);
        assert_eq!(win_rate(&[0.9, 0.1, 0.5, 0.6]), 2.5 / 4.0);
        // No length effect: the LC rate is the mean preference's logit-mean, ~ the plain rate.
        let prefs = [0.8, 0.8, 0.2, 0.8];
        let lc = length_controlled_win_rate(&prefs, &[10, 10, 10, 10], &[10, 10, 10, 10]);
        assert!((lc - 0.65).abs() < 1e-3, "{lc}");
        // Wins only where the output is longer: controlling for length pulls the rate down.
        let prefs = [0.9, 0.9, 0.9, 0.1, 0.1, 0.5];
        let out = [200, 220, 240, 50, 60, 100];
        let reference = [100; 6];
        let plain = prefs.iter().sum::<f64>() / 6.0;
        let lc = length_controlled_win_rate(&prefs, &out, &reference);
        assert!(lc < plain, "lc {lc} plain {plain}");
    }
}
