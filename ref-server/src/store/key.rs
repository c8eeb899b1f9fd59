//! What a stored score is keyed by: SHA-256 over everything that decides its value — the
//! model (its fingerprint), the compute dtype and device kind (other rounding), the prompt
//! token ids and the response token ids. One key per response: a pair is two entries, and
//! a response that several items or runs share is one.

use sha2::{Digest, Sha256};

/// A response's content address in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScoreKey(pub [u8; 32]);

/// What every key of one server shares: the model and how it computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyContext {
    /// The model fingerprint (`sha256:...` over weights and tokenizer).
    pub fingerprint: String,
    /// The compute dtype, e.g. `float32`: another dtype gives other numbers.
    pub dtype: String,
    /// `cpu` or `cuda` (without the ordinal: every GPU of a kind computes alike).
    pub device_kind: String,
}

/// Versions the key layout: a change of what is hashed must not meet old entries.
const KEY_DOMAIN: &[u8] = b"dpo-ref-score/v1";

impl KeyContext {
    pub fn new(fingerprint: &str, dtype: &str, device: &str) -> KeyContext {
        let device_kind = device.split(':').next().unwrap_or(device);
        KeyContext {
            fingerprint: fingerprint.into(),
            dtype: dtype.into(),
            device_kind: device_kind.into(),
        }
    }

    /// The key of `response` scored after `prompt`. Every part is length-prefixed, so no
    /// two different inputs hash the same bytes (a token moved from the prompt to the
    /// response changes the key).
    pub fn key(&self, prompt: &[u32], response: &[u32]) -> ScoreKey {
        let mut h = Sha256::new();
        h.update(KEY_DOMAIN);
        for text in [&self.fingerprint, &self.dtype, &self.device_kind] {
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        for ids in [prompt, response] {
            h.update((ids.len() as u64).to_le_bytes());
            for id in ids {
                h.update(id.to_le_bytes());
            }
        }
        ScoreKey(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> KeyContext {
        KeyContext::new("sha256:abc", "float32", "cpu")
    }

    #[test]
    fn every_input_that_changes_the_value_changes_the_key() {
        let base = ctx().key(&[1, 2, 3], &[4, 5]);
        assert_eq!(base, ctx().key(&[1, 2, 3], &[4, 5]), "deterministic");
        let others = [
            ctx().key(&[1, 2], &[3, 4, 5]),
            ctx().key(&[1, 2, 3, 4], &[5]),
            ctx().key(&[1, 2, 3], &[4, 6]),
            ctx().key(&[1, 2, 3], &[5, 4]),
            ctx().key(&[], &[1, 2, 3, 4, 5]),
            KeyContext::new("sha256:abd", "float32", "cpu").key(&[1, 2, 3], &[4, 5]),
            KeyContext::new("sha256:abc", "bfloat16", "cpu").key(&[1, 2, 3], &[4, 5]),
            KeyContext::new("sha256:abc", "float32", "cuda:0").key(&[1, 2, 3], &[4, 5]),
        ];
        for (i, k) in others.iter().enumerate() {
            assert_ne!(*k, base, "variant {i}");
        }
    }

    #[test]
    fn the_gpu_ordinal_does_not_split_the_store() {
        let a = KeyContext::new("f", "float32", "cuda:0");
        let b = KeyContext::new("f", "float32", "cuda:1");
        assert_eq!(a.key(&[1], &[2]), b.key(&[1], &[2]));
    }
}
