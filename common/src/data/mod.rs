//! Preference data, from files on disk to token ids in training order.
//!
//! - [`hh`]: the Anthropic HH files (`{subset}/{split}.jsonl.gz`), single-turn pairs only.
//! - [`preference`]: a generic JSONL of `{"prompt","chosen","rejected"}` for users' own data.
//! - [`jsonl`]: the line reader both use, and the [`LoadReport`] it fills: how many lines were
//!   read, kept and dropped (and why), and which lines were malformed.
//! - [`encode`]: tokenization into [`EncodedPair`]s with the prompt template, EOS placement
//!   and the `--max-length` policy ([`LengthPolicy`]).
//! - [`split`]: the seeded validation split and per-epoch shuffles, on a PRNG written out
//!   here so that an order never changes with a dependency's version (resume relies on it).

pub mod encode;
pub mod hh;
pub mod jsonl;
pub mod preference;
pub mod split;

pub use encode::{encode_pairs, EncodeReport, EncodedPair, LengthPolicy};
pub use hh::{read_hh_dir, read_hh_file, HH_SUBSETS};
pub use jsonl::{DropReason, LoadReport, MalformedLine};
pub use preference::read_preference_jsonl;
pub use split::{epoch_order, split_validation, SplitMix64};

/// One preference example before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    /// The instruction (HH: the human turn), before any template is applied.
    pub prompt: String,
    /// The preferred response.
    pub chosen: String,
    /// The dispreferred response.
    pub rejected: String,
    /// Where the pair came from: the HH subset (`harmless-base`, ...) or the file name.
    pub source: String,
}
