//! The server's limits, given on the command line and validated once against the model
//! before anything is served. Every other module reads them from [`Limits`]. The score
//! store's flags are [`StoreArgs`].

use std::path::PathBuf;

/// Limits as given on the command line; unset ones get defaults that depend on the model.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Longest scored sequence (prompt + one response, in tokens) of any item
    /// [default: the model's maximum sequence length, at most --batch-token-budget].
    #[arg(long)]
    pub max_tokens_per_item: Option<usize>,
    /// Most tokens in one request, summed over every scored sequence.
    #[arg(long, default_value_t = 65_536)]
    pub max_tokens_per_request: usize,
    /// Most items in one request.
    #[arg(long, default_value_t = 4_096)]
    pub max_items_per_request: usize,
    /// Largest request message decoded, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_message_bytes: usize,
    /// Padded tokens (rows × longest row; a pair is one row) per forward pass.
    #[arg(long, default_value_t = 8_192)]
    pub batch_token_budget: usize,
    /// Least fraction of real (non-padding) tokens in a forward pass: sequences of very
    /// different lengths are not batched together below it. Near 1 suits CPUs; lower it
    /// on a GPU for larger batches.
    #[arg(long, default_value_t = 0.9)]
    pub min_batch_fill: f64,
    /// Prompt prefixes at least this long that requests share (a prompt template's
    /// preamble) are computed once and reused by later passes; 0 turns the cache off.
    #[arg(long, default_value_t = dpo_common::prefix::DEFAULT_MIN_PREFIX_TOKENS)]
    pub prefix_cache_min_tokens: usize,
    /// Most tokens waiting to be scored across all requests; further requests wait for
    /// room (bounds memory under load) [default: 4 × --max-tokens-per-request].
    #[arg(long)]
    pub max_queued_tokens: Option<usize>,
}

/// The score store (`--score-store`): reference scores kept in a file across requests, runs
/// and restarts. Without it every request is computed.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Keep every computed score in this file (a redb database, created if missing) and
    /// answer a response asked for again from it, without a forward pass [default: no store].
    #[arg(long)]
    pub score_store: Option<PathBuf>,
    /// Bound on the store's entries, in MiB; beyond it the least recently used go.
    #[arg(long, default_value_t = 1024, requires = "score_store")]
    pub score_store_max_mb: u64,
    /// Start with an empty store, replacing the file (one of another model, or unreadable).
    #[arg(long, requires = "score_store")]
    pub score_store_reset: bool,
}

impl StoreArgs {
    /// No store (in-process scoring, tests).
    pub fn none() -> StoreArgs {
        StoreArgs { score_store: None, score_store_max_mb: 1024, score_store_reset: false }
    }

    /// The bound in bytes; at least 1 MiB.
    pub fn max_bytes(&self) -> Result<u64, String> {
        if self.score_store_max_mb == 0 {
            return Err("--score-store-max-mb must be at least 1".into());
        }
        self.score_store_max_mb
            .checked_mul(1 << 20)
            .ok_or_else(|| format!("--score-store-max-mb {} is too large", self.score_store_max_mb))
    }
}

/// Validated limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_tokens_per_item: usize,
    pub max_tokens_per_request: usize,
    pub max_items_per_request: usize,
    pub max_message_bytes: usize,
    pub batch_token_budget: usize,
    pub min_batch_fill: f64,
    /// 0: no prefix cache.
    pub prefix_cache_min_tokens: usize,
    pub max_queued_tokens: usize,
}

impl LimitArgs {
    /// The command-line defaults, for in-process use (`ref-server score --model`).
    pub fn default_for_cli() -> Self {
        LimitArgs {
            max_tokens_per_item: None,
            max_tokens_per_request: 65_536,
            max_items_per_request: 4_096,
            max_message_bytes: 64 << 20,
            batch_token_budget: 8_192,
            min_batch_fill: 0.9,
            prefix_cache_min_tokens: dpo_common::prefix::DEFAULT_MIN_PREFIX_TOKENS,
            max_queued_tokens: None,
        }
    }

    /// Fills the defaults and checks that the limits are consistent with each other and
    /// with the model's maximum sequence length `model_max`.
    pub fn resolve(&self, model_max: usize) -> Result<Limits, String> {
        let max_tokens_per_item =
            self.max_tokens_per_item.unwrap_or(model_max.min(self.batch_token_budget));
        let limits = Limits {
            max_tokens_per_item,
            max_tokens_per_request: self.max_tokens_per_request,
            max_items_per_request: self.max_items_per_request,
            max_message_bytes: self.max_message_bytes,
            batch_token_budget: self.batch_token_budget,
            min_batch_fill: self.min_batch_fill,
            prefix_cache_min_tokens: self.prefix_cache_min_tokens,
            max_queued_tokens: self
                .max_queued_tokens
                .unwrap_or(self.max_tokens_per_request.saturating_mul(4)),
        };
        let checks = [
            (limits.max_tokens_per_item >= 2, "--max-tokens-per-item must be at least 2"),
            (
                (0.0..=1.0).contains(&limits.min_batch_fill),
                "--min-batch-fill must be between 0 and 1",
            ),
            (limits.max_items_per_request >= 1, "--max-items-per-request must be at least 1"),
            (limits.max_message_bytes >= 1024, "--max-message-bytes must be at least 1024"),
            (
                limits.max_tokens_per_item <= model_max,
                "--max-tokens-per-item exceeds the model's maximum sequence length",
            ),
            (
                limits.max_tokens_per_item <= limits.batch_token_budget,
                "--batch-token-budget must fit one item of --max-tokens-per-item tokens",
            ),
            (
                limits.max_tokens_per_item <= limits.max_tokens_per_request,
                "--max-tokens-per-request must be at least --max-tokens-per-item",
            ),
            (
                limits.max_tokens_per_request <= limits.max_queued_tokens,
                "--max-queued-tokens must be at least --max-tokens-per-request",
            ),
            (
                limits.max_queued_tokens <= u32::MAX as usize,
                "--max-queued-tokens must be below 2^32",
            ),
        ];
        for (ok, why) in checks {
            if !ok {
                return Err(format!("{why} (model maximum {model_max}; limits {limits:?})"));
            }
        }
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> LimitArgs {
        LimitArgs::default_for_cli()
    }

    #[test]
    fn defaults_follow_the_model() {
        let l = args().resolve(512).unwrap();
        assert_eq!(l.max_tokens_per_item, 512);
        assert_eq!(l.max_queued_tokens, 4 * 65_536);
        assert_eq!(args().resolve(131_072).unwrap().max_tokens_per_item, 8192);
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let a = LimitArgs { max_tokens_per_item: Some(1024), ..args() };
        assert!(a.resolve(512).unwrap_err().contains("maximum sequence length"));
        let a = LimitArgs { batch_token_budget: 100, max_tokens_per_item: Some(200), ..args() };
        assert!(a.resolve(512).unwrap_err().contains("--batch-token-budget"));
        let a = LimitArgs { max_queued_tokens: Some(10), ..args() };
        assert!(a.resolve(512).is_err());
    }
}
