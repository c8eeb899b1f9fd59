//! Building a [`LlamaTokenizer`] from a GGUF file's `tokenizer.ggml.*` metadata, step by
//! step as transformers 5 does it when it loads the same file
//! (`integrations/gguf/gguf_tokenizer_mapping.py`), not as llama.cpp's own tokenizer does.

use std::collections::HashSet;

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{add_missing_specials, template_processor, tok_err, LlamaTokenizer};
use crate::error::{Error, Result};
use crate::gguf::metadata::Metadata;

/// `tokenizer.ggml.token_type` of a control token: special, never split.
const CONTROL: i128 = 3;
/// `tokenizer.ggml.token_type` of a user-defined token: added, not special.
const USER_DEFINED: i128 = 4;

/// The stored vocabulary: tokens (as llama.cpp spells them), merges and token types.
struct StoredVocabulary {
    tokens: Vec<String>,
    merges: Vec<String>,
    /// Empty when the file has no `tokenizer.ggml.token_type`.
    token_types: Vec<i128>,
}

/// The special ids the metadata names, each checked to lie in the vocabulary.
struct SpecialIds {
    eos: u32,
    bos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

impl LlamaTokenizer {
    /// From GGUF metadata `tokenizer.ggml.*`, built exactly as transformers 5 builds it when
    /// it loads the same file (`gguf_tokenizer_mapping.py`): byte-level BPE from the stored
    /// tokens and merges, control tokens (type 3) special, user-defined ones (type 4) added,
    /// the split regex chosen by `tokenizer.ggml.pre` where transformers knows it (else
    /// GPT-2's), BOS/EOS added as `tokenizer.ggml.add_bos_token`/`add_eos_token` say.
    ///
    /// Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = Metadata::new(content, Error::Tokenizer);
        let stored = read_vocabulary(&md)?;
        let ids = read_special_ids(&md, stored.tokens.len())?;
        let add_bos =
            md.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false) && ids.bos.is_some();
        let add_eos = md.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let pre = md.get_str("tokenizer.ggml.pre")?;

        let mut inner = byte_level_bpe(&stored)?;
        register_added_tokens(&mut inner, &stored, &ids)?;
        set_pre_split(&mut inner, pre)?;
        let name = |id: u32| stored.tokens[id as usize].clone();
        let bos = ids.bos.map(|id| (id, stored.tokens[id as usize].as_str()));
        let eos = (ids.eos, stored.tokens[ids.eos as usize].as_str());
        inner.with_post_processor(Some(template_processor(bos, eos, add_bos, add_eos)?));

        let mut t = Self::assemble(inner, ids.bos, ids.bos.map(name), ids.eos, name(ids.eos))?;
        t.unk_token = ids.unk.map(name);
        t.pad_token = ids.pad.map(name);
        t.model_max_length = context_length(&md);
        t.chat_template = md.get_str("tokenizer.chat_template").ok().flatten().map(str::to_string);
        Ok(t)
    }
}

fn read_vocabulary(md: &Metadata) -> Result<StoredVocabulary> {
    let model = md.require_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model `{model}`: only byte-level BPE (`gpt2`) tokenizers are \
             supported; convert the model to a Hugging Face directory instead"
        )));
    }
    Ok(StoredVocabulary {
        tokens: md.require_strings("tokenizer.ggml.tokens")?,
        merges: md.require_strings("tokenizer.ggml.merges")?,
        token_types: md.get_integers("tokenizer.ggml.token_type")?.unwrap_or_default(),
    })
}

fn read_special_ids(md: &Metadata, vocab_size: usize) -> Result<SpecialIds> {
    Ok(SpecialIds {
        eos: md.require_token_id("tokenizer.ggml.eos_token_id", vocab_size)?,
        bos: md.get_token_id("tokenizer.ggml.bos_token_id", vocab_size)?,
        unk: md.get_token_id("tokenizer.ggml.unknown_token_id", vocab_size)?,
        pad: md.get_token_id("tokenizer.ggml.padding_token_id", vocab_size)?,
    })
}

/// Whether every character of `token` is in GPT-2's byte alphabet.
fn in_alphabet(alphabet: &HashSet<char>, token: &str) -> bool {
    token.chars().all(|c| alphabet.contains(&c))
}

/// The BPE model over the stored tokens and merges, with byte-level pre-tokenizer and
/// decoder.
fn byte_level_bpe(stored: &StoredVocabulary) -> Result<Tokenizer> {
    // Vocabulary in the byte-level alphabet. llama.cpp stores tokens as it spells them;
    // any that use characters outside GPT-2's byte alphabet are respelled from their
    // UTF-8 bytes, as transformers' `byte_level_tokenizer` does.
    let alphabet = byte_alphabet();
    let respell = |t: &str| -> String {
        if in_alphabet(&alphabet, t) {
            t.to_string()
        } else {
            t.bytes().map(|b| BYTE_TO_CHAR[b as usize]).collect()
        }
    };
    // Later duplicates win, as in transformers' dict comprehension.
    let vocab: Vocab =
        stored.tokens.iter().enumerate().map(|(i, t)| (respell(t), i as u32)).collect();
    let merges = stored
        .merges
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
    Ok(inner)
}

/// Added tokens in transformers' order: GPT-2's default specials, control tokens,
/// user-defined tokens, then the named special ids.
fn register_added_tokens(
    inner: &mut Tokenizer,
    stored: &StoredVocabulary,
    ids: &SpecialIds,
) -> Result<()> {
    // GPT2Tokenizer's own defaults (bos = eos = unk = <|endoftext|>) are registered as
    // special before the GGUF's names; where the vocabulary has that token this marks it
    // special. (Where it does not, transformers appends it as a new id beyond the model's
    // embedding; we do not copy that.)
    let eot_text = "<|endoftext|>";
    if inner.token_to_id(eot_text).is_some() {
        add_missing_specials(inner, &[eot_text])?;
    }
    let alphabet = byte_alphabet();
    let of_type = |ty: i128| {
        stored
            .tokens
            .iter()
            .zip(&stored.token_types)
            .filter(move |(_, t)| **t == ty)
            .map(|(t, _)| t)
    };
    let control: Vec<AddedToken> = of_type(CONTROL)
        .filter(|t| in_alphabet(&alphabet, t))
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    inner.add_special_tokens(control).map_err(|e| tok_err("adding control tokens", e))?;
    let model_vocab = inner.get_vocab(false);
    let user_defined: Vec<AddedToken> = of_type(USER_DEFINED)
        .filter(|t| model_vocab.contains_key(t.as_str()))
        .map(|t| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    inner.add_tokens(user_defined).map_err(|e| tok_err("adding user-defined tokens", e))?;
    // Named special tokens, registered only where the name resolves to the same id
    // (a respelled name would otherwise become a new token).
    let named: Vec<&str> = [ids.bos, Some(ids.eos), ids.unk, ids.pad]
        .into_iter()
        .flatten()
        .map(|id| stored.tokens[id as usize].as_str())
        .filter(|t| inner.token_to_id(t).is_some())
        .collect();
    add_missing_specials(inner, &named)
}

/// The split regex `tokenizer.ggml.pre` selects, ahead of the byte-level step.
fn set_pre_split(inner: &mut Tokenizer, pre: Option<&str>) -> Result<()> {
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
    Ok(())
}

/// `{arch}.context_length`, for `model_max_length`; absent or unreadable is no limit.
fn context_length(md: &Metadata) -> Option<u64> {
    let arch = md.get_str("general.architecture").ok().flatten()?;
    md.get_usize(&format!("{arch}.context_length")).ok().flatten().map(|n| n as u64)
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
pub(super) const BYTE_TO_CHAR: [char; 256] = {
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

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::Value as GgufValue;

    use super::super::fixtures::{id, tiny_gguf};
    use super::*;
    use crate::tokenizer::Encoded;

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
}
