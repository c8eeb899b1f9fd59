//! Tokenizers and configs the tokenizer's tests build from.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};

use super::gguf::BYTE_TO_CHAR;
use super::LlamaTokenizer;
use crate::model::config::LlamaConfig;

/// A tiny byte-level GGUF tokenizer: every byte as a token (in byte order after the
/// specials), a few merges, and control tokens, as a GGUF stores them.
pub(super) fn tiny_gguf(pre: &str, add_bos: bool, extra: Vec<(&str, GgufValue)>) -> Content {
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

pub(super) fn id(t: &LlamaTokenizer, s: &str) -> u32 {
    t.inner().token_to_id(s).unwrap()
}
pub(super) fn tiny_config(eos: Vec<u32>) -> LlamaConfig {
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
