//! Tokenization for the DPO data contract. This module owns [`LlamaTokenizer`]: building it
//! from a Hugging Face directory or from a GGUF file's `tokenizer.ggml.*` metadata, encoding a
//! prompt/response pair the way TRL does (prompt with the tokenizer's own special tokens,
//! response without them plus EOS), and writing it back as Hugging Face files.
//!
//! The reference for every id is transformers: a tokenizer built here must give the ids that
//! `AutoTokenizer.from_pretrained(..)` gives for the same files (transformers 5.x semantics,
//! checked against 5.24). The GGUF path therefore mirrors transformers'
//! `integrations/gguf/gguf_tokenizer_mapping.py` step by step rather than llama.cpp's own
//! tokenizer, and the Hugging Face path mirrors how `TokenizersBackend` reads
//! `tokenizer_config.json` / `special_tokens_map.json`.
//!
//! This file holds the tokenizer and the encoding contract; `hf` builds it from (and writes
//! it as) Hugging Face files, `gguf` builds it from GGUF metadata.

#[cfg(test)]
mod fixtures;
mod gguf;
mod hf;

use std::collections::HashSet;

use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// The token ids of one prompt/response pair, ready to score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Prompt ids followed by response ids.
    pub ids: Vec<u32>,
    /// Index in `ids` of the first response token (= number of prompt tokens).
    pub response_start: usize,
}

/// Wraps a `tokenizers::Tokenizer` with the ids and rules the DPO tokenization contract needs.
#[derive(Clone)]
pub struct LlamaTokenizer {
    inner: Tokenizer,
    eos_id: u32,
    eos_token: String,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    /// What the post-processor adds around a single sequence, observed by encoding a probe
    /// (see [`observe_specials`]).
    specials: ObservedSpecials,
    /// Written to `tokenizer_config.json` so transformers truncates where the model stops;
    /// not part of the tokenizer's identity.
    model_max_length: Option<u64>,
    /// Carried through so a saved checkpoint keeps its chat template; not used here.
    chat_template: Option<String>,
}

impl std::fmt::Debug for LlamaTokenizer {
    // The inner tokenizer's Debug prints the whole vocabulary; a summary is what a reader wants.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos", &(self.eos_id, &self.eos_token))
            .field("bos", &(self.bos_id, &self.bos_token))
            .field("add_bos", &self.specials.add_bos)
            .field("add_eos", &self.specials.add_eos)
            .finish()
    }
}

/// What `encode(text, add_special_tokens = true)` adds around the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ObservedSpecials {
    add_bos: bool,
    add_eos: bool,
    /// False when the post-processor adds something other than exactly `[bos]` before and/or
    /// `[eos]` after; then `add_bos_token`/`add_eos_token` cannot describe it and are not
    /// written (transformers then keeps tokenizer.json's post-processor as it is).
    expressible: bool,
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

impl LlamaTokenizer {
    /// Wraps an existing tokenizer; BOS/EOS must be ids in its vocabulary. Whether BOS is
    /// added is whatever its post-processor does.
    pub fn from_tokenizer(inner: Tokenizer, bos: Option<u32>, eos: u32) -> Result<Self> {
        let name = |id: u32, what: &str| {
            inner.id_to_token(id).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{what} id {id} is outside the vocabulary ({} tokens)",
                    inner.get_vocab_size(true)
                ))
            })
        };
        let eos_token = name(eos, "EOS")?;
        let bos_token = bos.map(|b| name(b, "BOS")).transpose()?;
        Self::assemble(inner, bos, bos_token, eos, eos_token)
    }

    fn assemble(
        inner: Tokenizer,
        bos_id: Option<u32>,
        bos_token: Option<String>,
        eos_id: u32,
        eos_token: String,
    ) -> Result<Self> {
        let specials = observe_specials(&inner, bos_id, eos_id)?;
        Ok(LlamaTokenizer {
            inner,
            eos_id,
            eos_token,
            bos_id,
            bos_token,
            unk_token: None,
            pad_token: None,
            specials,
            model_max_length: None,
            chat_template: None,
        })
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether `encode_prompt` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.specials.add_bos
    }

    /// The number of ids, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The prompt with the tokenizer's special tokens (BOS only where the tokenizer adds one),
    /// as `tokenizer(prompt)` in transformers/TRL.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, true)
    }

    /// The response without special tokens, EOS appended, as TRL's DPO tokenization.
    pub fn encode_response(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text, false)?;
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// `encode_prompt(prompt) ++ encode_response(response)`. Fails when the prompt encodes to
    /// no tokens: the first response token would then have nothing to be predicted from.
    pub fn encode_prompt_response(&self, prompt: &str, response: &str) -> Result<Encoded> {
        let mut ids = self.encode_prompt(prompt)?;
        if ids.is_empty() {
            return Err(Error::Input(
                "the prompt encodes to no tokens (empty, and the tokenizer adds no BOS), so the \
                 first response token has no context to be scored from"
                    .into(),
            ));
        }
        let response_start = ids.len();
        ids.extend(self.encode_response(response)?);
        Ok(Encoded { ids, response_start })
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| tok_err("encoding text", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; unknown ids are an error rather than silently dropped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.vocab_size()
            )));
        }
        self.inner.decode(ids, skip_special).map_err(|e| tok_err("decoding ids", e))
    }

    /// Canonical bytes identifying the tokenizer for the model fingerprint: the compact
    /// tokenizer.json serialization (vocabulary, merges, added tokens, pipeline) plus the EOS
    /// and BOS ids. Equal for a tokenizer and its `save_hf`/`from_hf_dir` round trip.
    pub fn fingerprint_bytes(&self) -> Result<Vec<u8>> {
        let mut out = b"dpo-tokenizer-v1\0".to_vec();
        let json = self.inner.to_string(false).map_err(|e| tok_err("serializing", e))?;
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(b"\0eos\0");
        out.extend_from_slice(&self.eos_id.to_le_bytes());
        out.extend_from_slice(b"\0bos\0");
        match self.bos_id {
            Some(b) => {
                out.push(1);
                out.extend_from_slice(&b.to_le_bytes());
            }
            None => out.push(0),
        }
        Ok(out)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Encodes a probe with and without special tokens and reads off what the post-processor
/// puts around it. Observing behaviour (rather than parsing the post-processor's JSON)
/// covers every post-processor type tokenizers has.
fn observe_specials(inner: &Tokenizer, bos: Option<u32>, eos: u32) -> Result<ObservedSpecials> {
    let enc = |add| -> Result<Vec<u32>> {
        Ok(inner
            .encode("a", add)
            .map_err(|e| tok_err("probing the post-processor", e))?
            .get_ids()
            .to_vec())
    };
    let (with, without) = (enc(true)?, enc(false)?);
    if without.is_empty() {
        // A vocabulary that cannot spell the probe: only the specials are left, so read
        // them off in template order (BOS first).
        let add_bos = bos.is_some_and(|b| with.first() == Some(&b));
        let rest = &with[usize::from(add_bos)..];
        let add_eos = rest == [eos];
        let expressible = rest.is_empty() || add_eos;
        return Ok(ObservedSpecials { add_bos, add_eos, expressible });
    }
    let pos = (0..=with.len().saturating_sub(without.len()))
        .find(|&i| with[i..].starts_with(&without))
        .filter(|_| with.len() >= without.len());
    let Some(pos) = pos else {
        return Err(Error::Tokenizer(format!(
            "the post-processor rewrites the text's own tokens ({without:?} -> {with:?}); \
             such tokenizers are not supported"
        )));
    };
    let (prefix, suffix) = (&with[..pos], &with[pos + without.len()..]);
    let add_bos = bos.is_some_and(|b| prefix == [b]);
    let add_eos = suffix == [eos];
    let expressible = (prefix.is_empty() || add_bos) && (suffix.is_empty() || add_eos);
    Ok(ObservedSpecials { add_bos, add_eos, expressible })
}

/// transformers 5's `update_post_processor`: a template with BOS/EOS as the flags say.
fn template_processor(
    bos: Option<(u32, &str)>,
    eos: (u32, &str),
    add_bos: bool,
    add_eos: bool,
) -> Result<TemplateProcessing> {
    let bos = bos.filter(|_| add_bos);
    let eos = Some(eos).filter(|_| add_eos);
    let single = format!(
        "{}$A:0{}",
        bos.map_or(String::new(), |(_, t)| format!("{t}:0 ")),
        eos.map_or(String::new(), |(_, t)| format!(" {t}:0"))
    );
    let pair = format!(
        "{single}{} $B:1{}",
        bos.map_or(String::new(), |(_, t)| format!(" {t}:1")),
        eos.map_or(String::new(), |(_, t)| format!(" {t}:1"))
    );
    let special: Vec<(String, u32)> =
        bos.into_iter().chain(eos).map(|(id, t)| (t.to_string(), id)).collect();
    TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(|e| tok_err("building the BOS/EOS template", e))?
        .try_pair(pair.as_str())
        .map_err(|e| tok_err("building the BOS/EOS template", e))?
        .special_tokens(special)
        .build()
        .map_err(|e| tok_err("building the BOS/EOS template", e))
}

/// Registers `names` as special (unnormalized) added tokens where the added vocabulary
/// does not already hold them.
fn add_missing_specials(inner: &mut Tokenizer, names: &[&str]) -> Result<()> {
    let added: HashSet<String> =
        inner.get_added_tokens_decoder().into_values().map(|t| t.content).collect();
    let mut seen = HashSet::new();
    let missing: Vec<AddedToken> = names
        .iter()
        .filter(|n| !added.contains(**n) && seen.insert(**n))
        .map(|n| AddedToken::from(n.to_string(), true).normalized(false))
        .collect();
    if !missing.is_empty() {
        inner.add_special_tokens(missing).map_err(|e| tok_err("adding special tokens", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fixtures::tiny_gguf;
    use super::*;

    #[test]
    fn empty_prompt_without_bos_is_an_input_error() {
        let t = LlamaTokenizer::from_gguf(&tiny_gguf("gpt2", false, vec![])).unwrap();
        assert!(matches!(t.encode_prompt_response("", "hello"), Err(Error::Input(_))));
    }

    #[test]
    fn from_tokenizer_checks_ids() {
        let t = LlamaTokenizer::from_gguf(&tiny_gguf("gpt2", false, vec![])).unwrap();
        let inner = t.inner().clone();
        assert!(LlamaTokenizer::from_tokenizer(inner.clone(), None, 100_000).is_err());
        let w = LlamaTokenizer::from_tokenizer(inner, None, 2).unwrap();
        assert_eq!((w.eos_id(), w.bos_id(), w.vocab_size()), (2, None, t.vocab_size()));
    }
}
