//! Automatic prefix caching for scoring. Requests formatted with one prompt template all
//! start with the same tokens (the Alpaca preamble is about 25 tokens, a quarter of a
//! typical HH sequence). [`PrefixCache`] finds such a prefix by comparing the prompts it is
//! given, computes its keys and values once ([`Llama::prefix_kv`]) and scores every later
//! batch that starts with it from there ([`prefixed_logprobs`]). The log-probs are those of
//! the full sequences up to float rounding: causal attention makes a prefix's keys and
//! values independent of what follows.
//!
//! The cache is tied to the weights it was filled with: use it for a frozen model only (the
//! reference server), or [`clear`](PrefixCache::clear) it whenever the weights change.

use crate::error::Result;
use crate::logprob::{prefixed_logprobs, shared_prompt_logprobs, validate_groups};
use crate::logprob::{ResponseLogProbs, SharedPrompt};
use crate::model::{Llama, PrefixKv};

/// Shorter common prefixes are not worth a cache entry.
pub const DEFAULT_MIN_PREFIX_TOKENS: usize = 8;

/// Prefixes kept at once (most recently used first), for traffic with a few templates.
const MAX_ENTRIES: usize = 4;

/// Counters, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Batches scored from a cached prefix.
    pub hits: u64,
    /// Batches scored in full.
    pub misses: u64,
    /// Prompt tokens not recomputed thanks to the cache (prefix length × rows).
    pub tokens_saved: u64,
    /// Prefixes computed.
    pub prefixes_computed: u64,
}

/// Finds and reuses prompt prefixes shared across batches; see the module doc.
pub struct PrefixCache {
    /// Most recently used first.
    entries: Vec<PrefixKv>,
    /// The first prompt of the last batch no entry served, to find a prefix in common with
    /// the next one.
    last_prompt: Vec<u32>,
    min_tokens: usize,
    stats: PrefixStats,
}

impl PrefixCache {
    /// A cache that uses prefixes of at least `min_tokens` tokens (at least 1).
    pub fn new(min_tokens: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            last_prompt: Vec::new(),
            min_tokens: min_tokens.max(1),
            stats: PrefixStats::default(),
        }
    }

    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// The cached prefixes' lengths, most recently used first.
    pub fn prefix_lens(&self) -> Vec<usize> {
        self.entries.iter().map(PrefixKv::len).collect()
    }

    /// Forgets every prefix (call it when the weights change).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.last_prompt.clear();
    }

    /// The log-probs of [`shared_prompt_logprobs`]`(model, groups)`, computed from a cached
    /// prefix when the batch shares one, else in full (and then remembered, so that the next
    /// batch can share a prefix with this one).
    pub fn score(&mut self, model: &Llama, groups: &[SharedPrompt]) -> Result<ResponseLogProbs> {
        if groups.is_empty() || groups.iter().any(|g| g.prompt.is_empty()) {
            // The plain path names the problem.
            return shared_prompt_logprobs(model, groups);
        }
        // The entry this batch can use the most of.
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, usable_len(e.ids(), groups)))
            .max_by_key(|&(i, len)| (len, std::cmp::Reverse(i)));
        if let Some((i, len)) = best.filter(|&(_, len)| len >= self.min_tokens) {
            let entry = self.entries.remove(i);
            self.entries.insert(0, entry);
            // A narrower view when the batch shares less than the whole entry: exact, since
            // no position of a prefix depends on the ones after it.
            let prefix = if len < self.entries[0].len() {
                self.entries[0].truncated(len)?
            } else {
                self.entries[0].clone()
            };
            return self.score_from(model, groups, &prefix);
        }
        let len = usable_len(&self.last_prompt, groups);
        self.last_prompt = groups[0].prompt.clone();
        if len >= self.min_tokens {
            // Token ids are checked here, before they reach the model as a prefix.
            validate_groups(model, groups)?;
            let prefix = model.prefix_kv(&groups[0].prompt[..len])?;
            self.stats.prefixes_computed += 1;
            tracing::debug!(tokens = len, "prefix cache: new shared prefix");
            self.entries.insert(0, prefix.clone());
            self.entries.truncate(MAX_ENTRIES);
            return self.score_from(model, groups, &prefix);
        }
        self.stats.misses += 1;
        shared_prompt_logprobs(model, groups)
    }

    fn score_from(
        &mut self,
        model: &Llama,
        groups: &[SharedPrompt],
        prefix: &PrefixKv,
    ) -> Result<ResponseLogProbs> {
        let lp = prefixed_logprobs(model, groups, prefix)?;
        self.stats.hits += 1;
        self.stats.tokens_saved += (prefix.len() * groups.len()) as u64;
        Ok(lp)
    }
}

/// How much of `prefix` every one of `prompts` starts with, leaving each prompt at least
/// its last token (which predicts the first response token, so it must be computed); 0
/// without prompts.
pub fn usable_prefix_len<'a>(
    prefix: &[u32],
    prompts: impl IntoIterator<Item = &'a [u32]>,
) -> usize {
    prompts
        .into_iter()
        .map(|p| {
            let common = prefix.iter().zip(p).take_while(|(a, b)| a == b).count();
            common.min(p.len().saturating_sub(1))
        })
        .min()
        .unwrap_or(0)
}

fn usable_len(prefix: &[u32], groups: &[SharedPrompt]) -> usize {
    usable_prefix_len(prefix, groups.iter().map(|g| g.prompt.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(prompt: &[u32]) -> SharedPrompt {
        SharedPrompt { prompt: prompt.to_vec(), responses: vec![vec![1]] }
    }

    #[test]
    fn usable_len_is_the_common_part_leaving_the_last_prompt_token() {
        let g = [group(&[1, 2, 3, 4]), group(&[1, 2, 3, 9, 9])];
        assert_eq!(usable_len(&[1, 2, 3, 4, 5], &g), 3);
        assert_eq!(usable_len(&[1, 2], &g), 2);
        assert_eq!(usable_len(&[7], &g), 0);
        // The whole prompt is never usable: its last token must be computed.
        assert_eq!(usable_len(&[1, 2, 3, 4], &[group(&[1, 2, 3, 4])]), 3);
        assert_eq!(usable_len(&[], &g), 0);
    }
}
