//! Tokenization of preference pairs, with the `--max-length` policy.
//!
//! The contract is TRL's (and the reference server's, so both sides score the same ids): the
//! templated prompt is encoded once with the tokenizer's special tokens, each response
//! separately without them, EOS appended. A pair is `prompt ++ chosen` and
//! `prompt ++ rejected`, the response starting at `prompt_ids.len()`.
//!
//! Over-long pairs (prompt plus the longer response above `max_length`) follow a
//! [`LengthPolicy`]:
//! - [`LengthPolicy::Truncate`] (default): the prompt loses tokens from the left first (the
//!   instruction's end and the `### Response:` header are what the response is conditioned
//!   on), keeping BOS when the tokenizer adds one, but never below half the budget; what still
//!   does not fit is cut from the responses' ends (which then lose their EOS).
//! - [`LengthPolicy::Drop`]: the pair is left out.
//!
//! Either way it is counted in the [`EncodeReport`].

use std::fmt;

use super::PreferencePair;
use crate::error::{Error, Result};
use crate::logprob::Sequence;
use crate::template::Template;
use crate::tokenizer::LlamaTokenizer;

/// What to do with a pair longer than `max_length` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LengthPolicy {
    /// Cut the prompt from the left, then the responses from the right.
    #[default]
    Truncate,
    /// Leave the pair out.
    Drop,
}

/// One tokenized preference pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EncodedPair {
    /// The templated prompt (BOS included where the tokenizer adds one).
    pub prompt_ids: Vec<u32>,
    /// The chosen response, EOS appended (unless truncation cut it).
    pub chosen_ids: Vec<u32>,
    /// The rejected response, likewise.
    pub rejected_ids: Vec<u32>,
}

impl EncodedPair {
    fn sequence(&self, response: &[u32]) -> Sequence {
        let mut ids = Vec::with_capacity(self.prompt_ids.len() + response.len());
        ids.extend_from_slice(&self.prompt_ids);
        ids.extend_from_slice(response);
        Sequence { ids, response_start: self.prompt_ids.len() }
    }

    /// `prompt ++ chosen`, the response starting after the prompt.
    pub fn chosen_sequence(&self) -> Sequence {
        self.sequence(&self.chosen_ids)
    }

    /// `prompt ++ rejected`.
    pub fn rejected_sequence(&self) -> Sequence {
        self.sequence(&self.rejected_ids)
    }

    /// Tokens of the longer of the two sequences.
    pub fn max_len(&self) -> usize {
        self.prompt_ids.len() + self.chosen_ids.len().max(self.rejected_ids.len())
    }
}

/// What tokenization did to the pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeReport {
    pub max_length: usize,
    pub policy: LengthPolicy,
    /// Pairs given.
    pub pairs: usize,
    /// Pairs returned.
    pub kept: usize,
    /// Pairs whose prompt lost tokens.
    pub prompt_truncated: usize,
    /// Pairs whose responses lost tokens.
    pub response_truncated: usize,
    /// Pairs left out for length ([`LengthPolicy::Drop`]).
    pub dropped_too_long: usize,
    /// Pairs left out because the prompt encodes to no tokens (raw template, empty prompt,
    /// no BOS): the first response token would have no context.
    pub dropped_empty_prompt: usize,
    /// Longest pair before the policy was applied, in tokens.
    pub longest: usize,
}

impl fmt::Display for EncodeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tokenized {} pairs (longest {} tokens, --max-length {}): {} kept",
            self.pairs, self.longest, self.max_length, self.kept
        )?;
        match self.policy {
            LengthPolicy::Truncate => write!(
                f,
                ", {} with the prompt truncated, {} with responses truncated",
                self.prompt_truncated, self.response_truncated
            )?,
            LengthPolicy::Drop => write!(f, ", {} dropped as too long", self.dropped_too_long)?,
        }
        if self.dropped_empty_prompt > 0 {
            write!(f, ", {} dropped for an empty prompt", self.dropped_empty_prompt)?;
        }
        Ok(())
    }
}

/// Tokenizes `pairs` (prompts formatted with `template`) and applies `policy` to those over
/// `max_length` tokens. Fails only when nothing is left, naming why.
pub fn encode_pairs(
    tokenizer: &LlamaTokenizer,
    template: Template,
    pairs: &[PreferencePair],
    max_length: usize,
    policy: LengthPolicy,
) -> Result<(Vec<EncodedPair>, EncodeReport)> {
    let min_length = usize::from(tokenizer.adds_bos()) + 2;
    if max_length < min_length {
        return Err(Error::Input(format!(
            "--max-length {max_length} is too small: a pair needs at least {min_length} tokens \
             (a prompt token, a response token{})",
            if tokenizer.adds_bos() { " and BOS" } else { "" }
        )));
    }
    let mut report =
        EncodeReport { max_length, policy, pairs: pairs.len(), ..EncodeReport::default() };
    let mut out = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let prompt_ids = tokenizer.encode_prompt(&template.format_prompt(&pair.prompt))?;
        if prompt_ids.is_empty() {
            report.dropped_empty_prompt += 1;
            continue;
        }
        let mut encoded = EncodedPair {
            prompt_ids,
            chosen_ids: tokenizer.encode_response(&pair.chosen)?,
            rejected_ids: tokenizer.encode_response(&pair.rejected)?,
        };
        report.longest = report.longest.max(encoded.max_len());
        if encoded.max_len() > max_length {
            match policy {
                LengthPolicy::Drop => {
                    report.dropped_too_long += 1;
                    continue;
                }
                LengthPolicy::Truncate => {
                    let (prompt_cut, response_cut) = truncate(
                        &mut encoded,
                        max_length,
                        tokenizer.bos_id().filter(|_| tokenizer.adds_bos()),
                    );
                    report.prompt_truncated += usize::from(prompt_cut);
                    report.response_truncated += usize::from(response_cut);
                }
            }
        }
        out.push(encoded);
    }
    report.kept = out.len();
    if out.is_empty() {
        return Err(Error::Input(format!("no pairs left to train on: {report}")));
    }
    Ok((out, report))
}

/// Shortens `pair` to `max_length` tokens: the prompt from the left (keeping a leading
/// `bos`) down to what the longer response leaves, but not below half the budget, then the
/// responses from the right. Returns (prompt cut, responses cut).
fn truncate(pair: &mut EncodedPair, max_length: usize, bos: Option<u32>) -> (bool, bool) {
    let longest = pair.chosen_ids.len().max(pair.rejected_ids.len());
    let prompt_len = pair.prompt_ids.len();
    let keep_prompt =
        max_length.saturating_sub(longest).max((max_length / 2).min(prompt_len)).max(1);
    let prompt_cut = keep_prompt < prompt_len;
    if prompt_cut {
        let keeps_bos = bos.is_some() && pair.prompt_ids.first() == bos.as_ref();
        let mut kept = Vec::with_capacity(keep_prompt);
        if keeps_bos {
            kept.push(pair.prompt_ids[0]);
        }
        let tail = keep_prompt - kept.len();
        kept.extend_from_slice(&pair.prompt_ids[prompt_len - tail..]);
        pair.prompt_ids = kept;
    }
    let response_budget = max_length - pair.prompt_ids.len();
    let mut response_cut = false;
    for ids in [&mut pair.chosen_ids, &mut pair.rejected_ids] {
        if ids.len() > response_budget {
            ids.truncate(response_budget);
            response_cut = true;
        }
    }
    (prompt_cut, response_cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_tokenizer;

    fn pair(prompt: &str, chosen: &str, rejected: &str) -> PreferencePair {
        PreferencePair {
            prompt: prompt.into(),
            chosen: chosen.into(),
            rejected: rejected.into(),
            source: "t".into(),
        }
    }

    #[test]
    fn pairs_follow_the_tokenization_contract() {
        let tok = tiny_tokenizer();
        let (enc, report) = encode_pairs(
            &tok,
            Template::Alpaca,
            &[pair("Hi", "yes", "no")],
            512,
            LengthPolicy::Truncate,
        )
        .unwrap();
        let expected =
            tok.encode_prompt_response(&Template::Alpaca.format_prompt("Hi"), "yes").unwrap();
        let chosen = enc[0].chosen_sequence();
        assert_eq!(chosen.ids, expected.ids);
        assert_eq!(chosen.response_start, expected.response_start);
        assert_eq!(*enc[0].rejected_ids.last().unwrap(), tok.eos_id());
        assert_eq!((report.kept, report.prompt_truncated, report.response_truncated), (1, 0, 0));
    }

    #[test]
    fn truncation_cuts_the_prompt_from_the_left_then_the_responses() {
        let tok = tiny_tokenizer();
        assert!(!tok.adds_bos(), "the tiny tokenizer adds no BOS: one token per byte");
        // 30 prompt tokens; responses of 5 and 41 tokens (EOS included).
        let prompt = "abcdefghijklmnopqrstuvwxyz0123";
        let long = "L".repeat(40);
        let (enc, report) = encode_pairs(
            &tok,
            Template::Raw,
            &[pair(prompt, "four", &long)],
            40,
            LengthPolicy::Truncate,
        )
        .unwrap();
        let p = &enc[0];
        // The prompt keeps half the budget, its last 20 bytes.
        assert_eq!(tok.decode(&p.prompt_ids, true).unwrap(), &prompt[10..]);
        assert_eq!(p.rejected_ids.len(), 20, "the long response fills the rest");
        assert_eq!(p.chosen_ids.len(), 5, "the short response is untouched");
        assert_eq!(
            (report.prompt_truncated, report.response_truncated, report.longest),
            (1, 1, 71)
        );

        // A long prompt with short responses: only the prompt is cut, to exactly the budget.
        let (enc, _) =
            encode_pairs(&tok, Template::Raw, &[pair(&long, "a", "b")], 10, LengthPolicy::Truncate)
                .unwrap();
        assert_eq!((enc[0].prompt_ids.len(), enc[0].chosen_ids.len()), (8, 2));
    }

    #[test]
    fn truncation_keeps_a_leading_bos() {
        let mut p = EncodedPair {
            prompt_ids: vec![1, 10, 11, 12, 13, 14],
            chosen_ids: vec![20, 2],
            rejected_ids: vec![21, 22, 2],
        };
        assert_eq!(truncate(&mut p, 6, Some(1)), (true, false));
        assert_eq!(p.prompt_ids, [1, 13, 14]);
        assert_eq!(p.max_len(), 6);
    }

    #[test]
    fn drop_policy_counts_and_an_empty_result_is_an_error() {
        let tok = tiny_tokenizer();
        let pairs = [pair("short", "a", "b"), pair(&"x".repeat(100), "a", "b")];
        let (enc, report) =
            encode_pairs(&tok, Template::Raw, &pairs, 20, LengthPolicy::Drop).unwrap();
        assert_eq!((enc.len(), report.dropped_too_long), (1, 1));
        assert!(report.to_string().contains("1 dropped as too long"), "{report}");
        let err =
            encode_pairs(&tok, Template::Raw, &pairs[1..], 20, LengthPolicy::Drop).unwrap_err();
        assert!(err.to_string().contains("no pairs left"), "{err}");
        assert!(encode_pairs(&tok, Template::Raw, &pairs, 1, LengthPolicy::Truncate).is_err());
    }
}
