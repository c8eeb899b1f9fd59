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

use std::collections::HashSet;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;

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
    /// From a Hugging Face dir: `tokenizer.json` (required) plus `tokenizer_config.json` /
    /// `special_tokens_map.json` when present. EOS is the tokenizer's `eos_token` when named
    /// (Llama 3.1 Instruct: `<|eot_id|>`), else `config.eos_token_ids[0]`; BOS likewise.
    /// Whether BOS/EOS are added is what tokenizer.json's post-processor does, unless
    /// tokenizer_config.json sets `add_bos_token`/`add_eos_token` to something else, in which
    /// case the post-processor is rebuilt from those flags as transformers 5 does.
    pub fn from_hf_dir(dir: &Path, config: &LlamaConfig) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::file(
                &tok_path,
                "missing: the model directory needs a tokenizers-format tokenizer.json \
                 (a sentencepiece tokenizer.model alone is not supported)",
            ));
        }
        let mut inner = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::file(&tok_path, format!("not a valid tokenizer.json: {e}")))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg = read_optional_json(&cfg_path)?;
        let map_path = dir.join("special_tokens_map.json");
        let special_map = read_optional_json(&map_path)?;

        // transformers 5 reads special_tokens_map.json only for configs without
        // `added_tokens_decoder` (the "legacy" layout), and then lets it override the config.
        let legacy = tok_cfg.as_ref().is_none_or(|c| c.get("added_tokens_decoder").is_none());
        let name_of = |key: &str| -> Option<(String, &Path)> {
            let from_map = special_map
                .as_ref()
                .filter(|_| legacy)
                .and_then(|m| token_name(m.get(key)))
                .map(|n| (n, map_path.as_path()));
            from_map.or_else(|| {
                tok_cfg
                    .as_ref()
                    .and_then(|c| token_name(c.get(key)))
                    .map(|n| (n, cfg_path.as_path()))
            })
        };
        let resolve = |key: &str, fallback: Option<u32>| -> Result<Option<(u32, String)>> {
            if let Some((name, file)) = name_of(key) {
                let id = inner.token_to_id(&name).ok_or_else(|| {
                    Error::file(
                        file,
                        format!("{key} `{name}` is not in tokenizer.json's vocabulary"),
                    )
                })?;
                return Ok(Some((id, name)));
            }
            match fallback {
                None => Ok(None),
                Some(id) => {
                    let name = inner.id_to_token(id).ok_or_else(|| {
                        Error::Config(format!(
                            "{key} id {id} from config.json is outside the tokenizer's vocabulary \
                             ({} tokens in {})",
                            inner.get_vocab_size(true),
                            tok_path.display()
                        ))
                    })?;
                    Ok(Some((id, name)))
                }
            }
        };
        let (eos_id, eos_token) = resolve("eos_token", config.eos_token_ids.first().copied())?
            .ok_or_else(|| {
                Error::file(
                    dir,
                    "no EOS token: neither tokenizer_config.json nor config.json names one",
                )
            })?;
        let bos = resolve("bos_token", config.bos_token_id)?;
        let unk_token = name_of("unk_token").map(|(n, _)| n);
        let pad_token = name_of("pad_token").map(|(n, _)| n);

        // transformers adds every named special token the added vocabulary lacks as a special
        // token, which changes how text containing it is split; do the same so ids agree.
        // (A name missing from the vocabulary entirely it appends as a new id beyond the
        // model's embeddings; that we do not copy.)
        let named: Vec<&str> = [Some(eos_token.as_str()), bos.as_ref().map(|(_, n)| n.as_str())]
            .into_iter()
            .chain([unk_token.as_deref(), pad_token.as_deref()])
            .flatten()
            .filter(|n| inner.token_to_id(n).is_some())
            .collect();
        add_missing_specials(&mut inner, &named)?;

        let observed = observe_specials(&inner, bos.as_ref().map(|b| b.0), eos_id)?;
        let flag = |key: &str| tok_cfg.as_ref().and_then(|c| c.get(key)).and_then(Value::as_bool);
        let (want_bos, want_eos) = (flag("add_bos_token"), flag("add_eos_token"));
        if want_bos.is_some() || want_eos.is_some() {
            // transformers 5 rebuilds the post-processor whenever either flag is given; we only
            // do so when that changes behaviour, so a tokenizer we saved reads back identical.
            let add_bos = want_bos.unwrap_or(false) && bos.is_some();
            let add_eos = want_eos.unwrap_or(false);
            if (add_bos, add_eos) != (observed.add_bos, observed.add_eos) || !observed.expressible {
                tracing::warn!(
                    "{}: add_bos_token/add_eos_token ({add_bos}/{add_eos}) override what \
                     tokenizer.json's post-processor does; following them as transformers 5 does",
                    cfg_path.display()
                );
                let pp = template_processor(
                    bos.as_ref().map(|(i, n)| (*i, n.as_str())),
                    (eos_id, eos_token.as_str()),
                    add_bos,
                    add_eos,
                )?;
                inner.with_post_processor(Some(pp));
            }
        }

        let model_max_length = tok_cfg
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_u64)
            .or(Some(config.max_position_embeddings as u64));
        let chat_template = tok_cfg
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());

        let (bos_id, bos_token) = bos.unzip();
        let mut t = Self::assemble(inner, bos_id, bos_token, eos_id, eos_token)?;
        t.unk_token = unk_token;
        t.pad_token = pad_token;
        t.model_max_length = model_max_length;
        t.chat_template = chat_template;
        Ok(t)
    }

    /// From GGUF metadata `tokenizer.ggml.*`, built exactly as transformers 5 builds it when
    /// it loads the same file (`gguf_tokenizer_mapping.py`): byte-level BPE from the stored
    /// tokens and merges, control tokens (type 3) special, user-defined ones (type 4) added,
    /// the split regex chosen by `tokenizer.ggml.pre` where transformers knows it (else
    /// GPT-2's), BOS/EOS added as `tokenizer.ggml.add_bos_token`/`add_eos_token` say.
    ///
    /// Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |k: &str| md.get(k);
        let model = get("tokenizer.ggml.model")
            .ok_or_else(|| Error::Tokenizer("GGUF has no `tokenizer.ggml.model`".into()))?;
        let model = gguf_str(model, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Unsupported(format!(
                "GGUF tokenizer model `{model}`: only byte-level BPE (`gpt2`) tokenizers are \
                 supported; convert the model to a Hugging Face directory instead"
            )));
        }
        let tokens = gguf_strings(
            get("tokenizer.ggml.tokens")
                .ok_or_else(|| Error::Tokenizer("GGUF has no `tokenizer.ggml.tokens`".into()))?,
            "tokenizer.ggml.tokens",
        )?;
        let merges = gguf_strings(
            get("tokenizer.ggml.merges")
                .ok_or_else(|| Error::Tokenizer("GGUF has no `tokenizer.ggml.merges`".into()))?,
            "tokenizer.ggml.merges",
        )?;
        let token_types: Vec<i64> = match get("tokenizer.ggml.token_type") {
            None => vec![],
            Some(v) => gguf_array(v, "tokenizer.ggml.token_type")?
                .iter()
                .map(|x| gguf_int(x, "tokenizer.ggml.token_type"))
                .collect::<Result<_>>()?,
        };
        let id_key = |k: &str| -> Result<Option<u32>> {
            let Some(v) = get(k) else { return Ok(None) };
            let id = gguf_int(v, k)?;
            match usize::try_from(id).ok().filter(|&i| i < tokens.len()) {
                Some(i) => Ok(Some(i as u32)),
                None => Err(Error::Tokenizer(format!(
                    "`{k}` = {id} is outside the {}-token vocabulary",
                    tokens.len()
                ))),
            }
        };
        let eos_id = id_key("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| Error::Tokenizer("GGUF has no `tokenizer.ggml.eos_token_id`".into()))?;
        let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
        let unk_id = id_key("tokenizer.ggml.unknown_token_id")?;
        let pad_id = id_key("tokenizer.ggml.padding_token_id")?;
        let flag = |k: &str| -> Result<bool> {
            match get(k) {
                None => Ok(false),
                Some(v) => {
                    v.to_bool().map_err(|_| Error::Tokenizer(format!("`{k}` is not a bool")))
                }
            }
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token")? && bos_id.is_some();
        let add_eos = flag("tokenizer.ggml.add_eos_token")?;
        let pre = match get("tokenizer.ggml.pre") {
            Some(v) => Some(gguf_str(v, "tokenizer.ggml.pre")?),
            None => None,
        };

        // Vocabulary in the byte-level alphabet. llama.cpp stores tokens as it spells them;
        // any that use characters outside GPT-2's byte alphabet are respelled from their
        // UTF-8 bytes, as transformers' `byte_level_tokenizer` does.
        let alphabet = byte_alphabet();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let respell = |t: &str| -> String {
            if in_alphabet(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| BYTE_TO_CHAR[b as usize]).collect()
            }
        };
        // Later duplicates win, as in transformers' dict comprehension.
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (respell(t), i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                let mut parts = m.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                    _ => Err(Error::Tokenizer(format!(
                        "`tokenizer.ggml.merges` entry `{m}` is not two tokens separated by a space"
                    ))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        // The same BPE settings as transformers' GPT2Tokenizer (no unk token, no byte
        // fallback, empty subword prefix/suffix) so the serialized tokenizer.json matches too.
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err("building the BPE model from GGUF tokens and merges", e))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // GPT2Tokenizer's own defaults (bos = eos = unk = <|endoftext|>) are registered as
        // special before the GGUF's names; where the vocabulary has that token this marks it
        // special. (Where it does not, transformers appends it as a new id beyond the model's
        // embedding; we do not copy that.)
        let eot_text = "<|endoftext|>";
        if inner.token_to_id(eot_text).is_some() {
            add_missing_specials(&mut inner, &[eot_text])?;
        }
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(t, ty)| **ty == 3 && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(control).map_err(|e| tok_err("adding control tokens", e))?;
        let model_vocab = inner.get_vocab(false);
        let user_defined: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(t, ty)| **ty == 4 && model_vocab.contains_key(t.as_str()))
            .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner.add_tokens(user_defined).map_err(|e| tok_err("adding user-defined tokens", e))?;
        // Named special tokens, registered only where the name resolves to the same id
        // (a respelled name would otherwise become a new token).
        let named: Vec<&str> = [bos_id, Some(eos_id), unk_id, pad_id]
            .into_iter()
            .flatten()
            .map(|id| tokens[id as usize].as_str())
            .filter(|t| inner.token_to_id(t).is_some())
            .collect();
        add_missing_specials(&mut inner, &named)?;

        if let Some(split) = pre.and_then(gguf_pre_split) {
            let split = Split::new(
                SplitPattern::Regex(split.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err("compiling the pre-tokenizer regex", e))?;
            inner.with_pre_tokenizer(Some(PreSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        } else if let Some(p) = pre.filter(|p| *p != "gpt2" && *p != "default") {
            tracing::debug!(
                "GGUF tokenizer.ggml.pre `{p}` has no split regex in transformers; using GPT-2's"
            );
        }

        let bos = bos_id.map(|id| (id, tokens[id as usize].as_str()));
        let eos = (eos_id, tokens[eos_id as usize].as_str());
        inner.with_post_processor(Some(template_processor(bos, eos, add_bos, add_eos)?));

        let arch = get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        let model_max_length = arch
            .and_then(|a| get(&format!("{a}.context_length")))
            .and_then(|v| gguf_int(v, "context_length").ok())
            .and_then(|n| u64::try_from(n).ok());
        let chat_template =
            get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();

        let mut t = Self::assemble(
            inner,
            bos_id,
            bos_id.map(|id| tokens[id as usize].clone()),
            eos_id,
            tokens[eos_id as usize].clone(),
        )?;
        t.unk_token = unk_id.map(|id| tokens[id as usize].clone());
        t.pad_token = pad_id.map(|id| tokens[id as usize].clone());
        t.model_max_length = model_max_length;
        t.chat_template = chat_template;
        Ok(t)
    }

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

    /// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into
    /// `dir` so that [`Self::from_hf_dir`] reads back an identical tokenizer and
    /// transformers' `AutoTokenizer.from_pretrained(dir)` (4.x and 5.x) tokenizes identically.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let tok_json = self.inner.to_string(true).map_err(|e| tok_err("serializing", e))?;
        write(&dir.join("tokenizer.json"), tok_json.as_bytes())?;

        let mut specials = serde_json::Map::new();
        let mut put = |key: &str, v: &Option<String>| {
            if let Some(v) = v {
                specials.insert(key.to_string(), json!(v));
            }
        };
        put("bos_token", &self.bos_token);
        put("eos_token", &Some(self.eos_token.clone()));
        put("unk_token", &self.unk_token);
        put("pad_token", &self.pad_token);

        let mut cfg = specials.clone();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        // Decoding in transformers then matches `decode` here (4.x would otherwise strip
        // spaces before punctuation).
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if self.specials.expressible {
            // transformers 5 rebuilds the post-processor from these; they describe exactly
            // what tokenizer.json's does, so the ids stay the same.
            cfg.insert("add_bos_token".into(), json!(self.specials.add_bos));
            cfg.insert("add_eos_token".into(), json!(self.specials.add_eos));
        }
        if let Some(n) = self.model_max_length {
            cfg.insert("model_max_length".into(), json!(n));
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        write(&dir.join("tokenizer_config.json"), &pretty(&Value::Object(cfg))?)?;
        write(&dir.join("special_tokens_map.json"), &pretty(&Value::Object(specials))?)?;
        Ok(())
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

/// The split regex transformers uses for a GGUF `tokenizer.ggml.pre` value
/// (`GGUF_PRE_TOKENIZER_SPLITS` in transformers 5.24); `None` means GPT-2's byte-level regex.
fn gguf_pre_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable Latin-1 bytes map to
/// themselves, the rest to U+0100 onwards in byte order.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut next = 0x100u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
        let cp = if printable {
            b as u32
        } else {
            let c = next;
            next += 1;
            c
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => panic!("byte alphabet code point out of range"),
        };
        b += 1;
    }
    table
};

fn byte_alphabet() -> HashSet<char> {
    BYTE_TO_CHAR.iter().copied().collect()
}

/// A special token's name as tokenizer_config.json / special_tokens_map.json write it: a
/// string, or an AddedToken object with `content`.
fn token_name(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

fn pretty(v: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Tokenizer(format!("serializing JSON: {e}")))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn gguf_str<'a>(v: &'a GgufValue, key: &str) -> Result<&'a str> {
    v.to_string()
        .map(String::as_str)
        .map_err(|_| Error::Tokenizer(format!("GGUF `{key}` is not a string")))
}

fn gguf_array<'a>(v: &'a GgufValue, key: &str) -> Result<&'a Vec<GgufValue>> {
    v.to_vec().map_err(|_| Error::Tokenizer(format!("GGUF `{key}` is not an array")))
}

fn gguf_strings(v: &GgufValue, key: &str) -> Result<Vec<String>> {
    gguf_array(v, key)?
        .iter()
        .enumerate()
        .map(|(i, x)| {
            x.to_string()
                .cloned()
                .map_err(|_| Error::Tokenizer(format!("GGUF `{key}`[{i}] is not a string")))
        })
        .collect()
}

fn gguf_int(v: &GgufValue, key: &str) -> Result<i64> {
    use GgufValue as V;
    Ok(match v {
        V::U8(x) => *x as i64,
        V::I8(x) => *x as i64,
        V::U16(x) => *x as i64,
        V::I16(x) => *x as i64,
        V::U32(x) => *x as i64,
        V::I32(x) => *x as i64,
        V::I64(x) => *x,
        V::U64(x) => i64::try_from(*x)
            .map_err(|_| Error::Tokenizer(format!("GGUF `{key}` = {x} is out of range")))?,
        other => {
            return Err(Error::Tokenizer(format!(
                "GGUF `{key}` is not an integer (found {:?})",
                other.value_type()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tiny byte-level GGUF tokenizer: every byte as a token (in byte order after the
    /// specials), a few merges, and control tokens, as a GGUF stores them.
    fn tiny_gguf(pre: &str, add_bos: bool, extra: Vec<(&str, GgufValue)>) -> Content {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![3i32, 3, 3];
        for b in 0..=255u8 {
            tokens.push(BYTE_TO_CHAR[b as usize].to_string());
            types.push(1);
        }
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "1 2"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        tokens.push("<tool>".into());
        types.push(4);
        let s = |x: &str| GgufValue::String(x.to_string());
        let mut metadata: HashMap<String, GgufValue> = [
            ("general.architecture", s("llama")),
            ("llama.context_length", GgufValue::U32(4096)),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s(pre)),
            ("tokenizer.ggml.tokens", GgufValue::Array(tokens.iter().map(|t| s(t)).collect())),
            ("tokenizer.ggml.merges", GgufValue::Array(merges.iter().map(|m| s(m)).collect())),
            (
                "tokenizer.ggml.token_type",
                GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
            ("tokenizer.ggml.add_bos_token", GgufValue::Bool(add_bos)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            metadata.insert(k.to_string(), v);
        }
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn id(t: &LlamaTokenizer, s: &str) -> u32 {
        t.inner().token_to_id(s).unwrap()
    }

    #[test]
    fn byte_alphabet_matches_gpt2() {
        assert_eq!(BYTE_TO_CHAR[b'!' as usize], '!');
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[0], 'Ā');
        assert_eq!(byte_alphabet().len(), 256);
    }

    #[test]
    fn gguf_without_bos_encodes_prompt_and_response() {
        let t = LlamaTokenizer::from_gguf(&tiny_gguf("smollm", false, vec![])).unwrap();
        assert_eq!((t.bos_id(), t.eos_id()), (Some(1), 2));
        assert!(!t.adds_bos());
        let hello = id(&t, "hello");
        let wo = id(&t, "Ġwo");
        assert_eq!(t.encode_prompt("hello wo").unwrap(), vec![hello, wo]);
        assert_eq!(t.encode_response("hello").unwrap(), vec![hello, 2]);
        let e = t.encode_prompt_response("hello", " wo").unwrap();
        assert_eq!(e, Encoded { ids: vec![hello, wo, 2], response_start: 1 });
        // Control tokens in text stay whole; user-defined ones too.
        assert_eq!(t.encode_prompt("</s><tool>").unwrap(), vec![2, id(&t, "<tool>")]);
        assert_eq!(t.decode(&[hello, wo, 2], true).unwrap(), "hello wo");
        assert_eq!(t.decode(&[hello, 2], false).unwrap(), "hello</s>");
        assert!(matches!(t.decode(&[99_999], false), Err(Error::Input(_))));
    }

    #[test]
    fn gguf_add_bos_and_pre_regex() {
        let t = LlamaTokenizer::from_gguf(&tiny_gguf("llama-bpe", true, vec![])).unwrap();
        assert!(t.adds_bos());
        let twelve = id(&t, "12");
        assert_eq!(t.encode_prompt("12").unwrap(), vec![1, twelve]);
        assert_eq!(t.encode_response("12").unwrap(), vec![twelve, 2]);
        let e = t.encode_prompt_response("", "hello").unwrap();
        assert_eq!(e.response_start, 1);
    }

    #[test]
    fn empty_prompt_without_bos_is_an_input_error() {
        let t = LlamaTokenizer::from_gguf(&tiny_gguf("gpt2", false, vec![])).unwrap();
        assert!(matches!(t.encode_prompt_response("", "hello"), Err(Error::Input(_))));
    }

    #[test]
    fn gguf_metadata_errors_are_named() {
        let mut c = tiny_gguf("gpt2", false, vec![]);
        c.metadata.insert("tokenizer.ggml.model".into(), GgufValue::String("llama".into()));
        let e = LlamaTokenizer::from_gguf(&c).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("llama"), "{e}");

        let mut c = tiny_gguf("gpt2", false, vec![]);
        c.metadata.remove("tokenizer.ggml.eos_token_id");
        let e = LlamaTokenizer::from_gguf(&c).unwrap_err();
        assert!(e.to_string().contains("eos_token_id"), "{e}");

        let c = tiny_gguf(
            "gpt2",
            false,
            vec![("tokenizer.ggml.bos_token_id", GgufValue::U32(1 << 20))],
        );
        let e = LlamaTokenizer::from_gguf(&c).unwrap_err();
        assert!(e.to_string().contains("bos_token_id"), "{e}");
    }

    #[test]
    fn save_and_reload_is_identical() {
        for (pre, bos) in [("smollm", false), ("llama-bpe", true)] {
            let t = LlamaTokenizer::from_gguf(&tiny_gguf(pre, bos, vec![])).unwrap();
            let dir = tempfile::tempdir().unwrap();
            t.save_hf(dir.path()).unwrap();
            let cfg = tiny_config(vec![7]);
            let back = LlamaTokenizer::from_hf_dir(dir.path(), &cfg).unwrap();
            assert_eq!(back.eos_id(), 2, "eos comes from tokenizer_config, not config.json");
            assert_eq!(back.bos_id(), Some(1));
            assert_eq!(back.adds_bos(), bos);
            assert_eq!(back.fingerprint_bytes().unwrap(), t.fingerprint_bytes().unwrap());
            for s in ["hello world 12", "</s> x", ""] {
                assert_eq!(back.encode_prompt(s).unwrap(), t.encode_prompt(s).unwrap());
            }
            assert_eq!(back.model_max_length, Some(4096));
        }
    }

    fn tiny_config(eos: Vec<u32>) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 300,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: crate::model::config::RopeScaling::None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: eos,
            torch_dtype: "float32".into(),
        }
    }

    #[test]
    fn hf_dir_eos_rules() {
        let t = LlamaTokenizer::from_gguf(&tiny_gguf("gpt2", false, vec![])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        t.inner().save(dir.path().join("tokenizer.json"), false).unwrap();

        // No tokenizer_config.json: EOS is config.json's first id, BOS config.json's.
        let back = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0, 2])).unwrap();
        assert_eq!((back.eos_id(), back.bos_id()), (0, Some(1)));

        // eos_token as an AddedToken object overrides config.json.
        let cfg = json!({"eos_token": {"content": "</s>", "special": true}});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let back = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap();
        assert_eq!(back.eos_id(), 2);

        // special_tokens_map.json wins over a legacy tokenizer_config.json, as in transformers.
        let map = json!({"eos_token": "<|endoftext|>"});
        std::fs::write(dir.path().join("special_tokens_map.json"), map.to_string()).unwrap();
        let back = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![2])).unwrap();
        assert_eq!(back.eos_id(), 0);

        // An explicit add_bos_token that tokenizer.json does not do is followed.
        let cfg = json!({"eos_token": "</s>", "bos_token": "<s>", "add_bos_token": true,
                         "added_tokens_decoder": {}});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let back = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap();
        assert!(back.adds_bos());
        assert_eq!(back.encode_prompt("hello").unwrap(), vec![1, id(&back, "hello")]);

        // A named token that the vocabulary lacks is an error naming the file.
        let cfg = json!({"eos_token": "<nope>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        std::fs::remove_file(dir.path().join("special_tokens_map.json")).unwrap();
        let e = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap_err();
        assert!(
            e.to_string().contains("tokenizer_config.json") && e.to_string().contains("<nope>"),
            "{e}"
        );
    }

    #[test]
    fn missing_tokenizer_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap_err();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let e = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap_err();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
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
