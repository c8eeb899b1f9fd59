//! The model config a GGUF file describes: its `llama.*` metadata (and the vocabulary and
//! special ids of `tokenizer.ggml.*`) read into a [`LlamaConfig`], and Llama 3 RoPE scaling
//! recovered from the `rope_freqs` tensor llama.cpp stores in its place.

use candle_core::quantized::gguf_file::Content;

use super::metadata::Metadata;
use super::ROPE_FREQS;
use crate::error::{Error, Result};
use crate::model::config::{LlamaConfig, RopeScaling};

/// The config the `llama.*` metadata describes (RoPE scaling from `rope_freqs` is filled in
/// by the caller, which has the tensor).
pub(super) fn config_from_metadata(content: &Content) -> Result<LlamaConfig> {
    let md = Metadata::new(content, Error::Config);
    reject_mixture_of_experts(&md)?;
    let attention = attention_shape(&md)?;
    reject_rope_variants(&md, attention.head_dim)?;
    let vocab_size = vocab_size(&md)?;
    let (bos_token_id, eos_token_ids) = special_token_ids(&md, vocab_size)?;
    Ok(LlamaConfig {
        vocab_size,
        hidden_size: attention.hidden_size,
        intermediate_size: md.require_usize("llama.feed_forward_length")?,
        num_hidden_layers: md.require_usize("llama.block_count")?,
        num_attention_heads: attention.num_heads,
        num_key_value_heads: attention.num_kv_heads,
        head_dim: attention.head_dim,
        rms_norm_eps: md.require_f64("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: md.get_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
        rope_scaling: RopeScaling::None,
        max_position_embeddings: md.require_usize("llama.context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id,
        eos_token_ids,
        torch_dtype: "float32".into(),
    })
}

fn reject_mixture_of_experts(md: &Metadata) -> Result<()> {
    if md.get_usize("llama.expert_count")?.is_some_and(|n| n > 0) {
        return Err(Error::Unsupported(
            "mixture-of-experts GGUF (`llama.expert_count` > 0)".into(),
        ));
    }
    Ok(())
}

struct AttentionShape {
    hidden_size: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// Head counts and sizes; value heads must be as wide as key heads (as in every Llama).
fn attention_shape(md: &Metadata) -> Result<AttentionShape> {
    let hidden_size = md.require_usize("llama.embedding_length")?;
    let num_heads = md.require_usize("llama.attention.head_count")?;
    let num_kv_heads = md.get_usize("llama.attention.head_count_kv")?.unwrap_or(num_heads);
    if num_heads == 0 {
        return Err(Error::Config("GGUF metadata `llama.attention.head_count` is 0".into()));
    }
    let head_dim = md.get_usize("llama.attention.key_length")?.unwrap_or(hidden_size / num_heads);
    if let Some(v) = md.get_usize("llama.attention.value_length")? {
        if v != head_dim {
            return Err(Error::Unsupported(format!(
                "value head size {v} differs from key head size {head_dim}"
            )));
        }
    }
    Ok(AttentionShape { hidden_size, num_heads, num_kv_heads, head_dim })
}

/// Partial rotary embeddings and RoPE scalings other than Llama 3's are not modelled.
fn reject_rope_variants(md: &Metadata, head_dim: usize) -> Result<()> {
    if let Some(r) = md.get_usize("llama.rope.dimension_count")? {
        if r != head_dim {
            return Err(Error::Unsupported(format!(
                "partial rotary embeddings (`llama.rope.dimension_count` {r} < head size {head_dim})"
            )));
        }
    }
    let scaling_key = "llama.rope.scaling.type";
    if md.contains(scaling_key) {
        let t = md.get_str(scaling_key).ok().flatten().unwrap_or("?");
        if t != "none" {
            return Err(Error::Unsupported(format!(
                "GGUF RoPE scaling `{t}` (`{scaling_key}`); only Llama 3 scaling \
                 (stored as a `{ROPE_FREQS}` tensor) is supported"
            )));
        }
    }
    Ok(())
}

/// The number of tokens, which `llama.vocab_size` (optional) must agree with.
fn vocab_size(md: &Metadata) -> Result<usize> {
    let vocab_size = md.require_array("tokenizer.ggml.tokens")?.len();
    if let Some(v) = md.get_usize("llama.vocab_size")? {
        if v != vocab_size {
            return Err(Error::Config(format!(
                "`llama.vocab_size` is {v} but `tokenizer.ggml.tokens` has {vocab_size} tokens"
            )));
        }
    }
    Ok(vocab_size)
}

/// BOS, and every id that ends a generation.
fn special_token_ids(md: &Metadata, vocab_size: usize) -> Result<(Option<u32>, Vec<u32>)> {
    let eos = md.require_token_id("tokenizer.ggml.eos_token_id", vocab_size)?;
    // The end-of-turn / end-of-message ids also stop generation in llama.cpp; EOS stays first
    // because it is the one appended after responses.
    let mut eos_token_ids = vec![eos];
    for k in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = md.get_token_id(k, vocab_size)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let bos = md.get_token_id("tokenizer.ggml.bos_token_id", vocab_size)?;
    Ok((bos, eos_token_ids))
}

/// Recovers Llama 3 RoPE scaling from llama.cpp's `rope_freqs` factors (the converter
/// stores, per frequency, 1 above the high-frequency cut, `factor` below the low-frequency
/// one and the smooth blend between). The blend is linear in 1/wavelength, so two blended
/// frequencies give both cut-offs; `original_max_position_embeddings` only scales them
/// (taken from `llama.rope.scaling.original_context_length`, else Llama 3's 8192). The result
/// is accepted only if it reproduces every stored factor.
pub(super) fn llama3_scaling_from_factors(
    cfg: &LlamaConfig,
    factors: &[f32],
    md: &Metadata,
) -> Result<RopeScaling> {
    let n = cfg.head_dim / 2;
    if factors.len() != n {
        return Err(Error::Weight {
            name: ROPE_FREQS.into(),
            message: format!("{} values, expected head_dim / 2 = {n}", factors.len()),
        });
    }
    let rf: Vec<f64> = factors.iter().map(|&x| x as f64).collect();
    if rf.iter().any(|&x| !(x.is_finite() && x > 0.0)) {
        return Err(Error::Weight {
            name: ROPE_FREQS.into(),
            message: "factors must be finite and positive".into(),
        });
    }
    if rf.iter().all(|&x| (x - 1.0).abs() < 1e-6) {
        return Ok(RopeScaling::None);
    }
    let original = md.get_usize("llama.rope.scaling.original_context_length")?.unwrap_or(8192);
    let factor = rf.iter().cloned().fold(f64::MIN, f64::max);
    let base = {
        let mut plain = cfg.clone();
        plain.rope_scaling = RopeScaling::None;
        plain.rope_inv_freq()
    };
    let (low, high) = blend_cutoffs(&rf, &base, factor, original);
    let round = |x: f64| {
        // Recover the round numbers configs use (1.0, 4.0, ...) from float32 factors.
        let scale = 10f64.powi(5 - x.abs().log10().floor() as i32);
        (x * scale).round() / scale
    };
    let scaling = RopeScaling::Llama3 {
        factor: round(factor),
        low_freq_factor: round(low),
        high_freq_factor: round(high),
        original_max_position_embeddings: original,
    };
    let mut scaled = cfg.clone();
    scaled.rope_scaling = scaling.clone();
    let fits = scaled
        .rope_inv_freq()
        .iter()
        .zip(&base)
        .zip(&rf)
        .all(|((s, b), r)| ((b / s) - r).abs() <= 1e-4 * r);
    if !fits {
        return Err(Error::Unsupported(format!(
            "`{ROPE_FREQS}` holds RoPE factors that no Llama 3 scaling reproduces \
             (closest: {scaling:?})"
        )));
    }
    Ok(scaling)
}

/// The two cut-offs of the blend, as `low_freq_factor` / `high_freq_factor`: a line through
/// the first and last frequency strictly inside the blend.
fn blend_cutoffs(rf: &[f64], base: &[f64], factor: f64, original: usize) -> (f64, f64) {
    // Points strictly inside the blend: (1/wavelength, blend weight).
    let blend: Vec<(f64, f64)> = rf
        .iter()
        .zip(base)
        .filter(|(&r, _)| (r - 1.0).abs() > 1e-4 && (r - factor).abs() > 1e-4 * factor)
        .map(|(&r, &f)| {
            (f / (2.0 * std::f64::consts::PI), (1.0 / r - 1.0 / factor) / (1.0 - 1.0 / factor))
        })
        .collect();
    match (blend.first(), blend.last()) {
        (Some(&(x0, s0)), Some(&(x1, s1))) if blend.len() >= 2 && (x1 - x0).abs() > 0.0 => {
            let slope = (s1 - s0) / (x1 - x0);
            let icpt = s0 - slope * x0;
            // s = slope * x + icpt is 0 at x = 1/low_wavelen and 1 at x = 1/high_wavelen.
            let inv_low_wavelen = -icpt / slope;
            let inv_high_wavelen = (1.0 - icpt) / slope;
            (original as f64 * inv_low_wavelen, original as f64 * inv_high_wavelen)
        }
        // Too few blended frequencies to fit: try Llama 3's published cut-offs.
        _ => (1.0, 4.0),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::gguf_file::{self, Value as GgufValue};

    use super::*;

    #[test]
    fn llama3_scaling_is_recovered_from_rope_freqs() {
        // Llama 3.1 8B: factors as convert_hf_to_gguf.py computes them.
        let mut cfg = tiny_config();
        cfg.head_dim = 128;
        cfg.rope_theta = 500_000.0;
        let want = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let mut scaled = cfg.clone();
        scaled.rope_scaling = want.clone();
        let base = cfg.rope_inv_freq();
        let factors: Vec<f32> =
            base.iter().zip(scaled.rope_inv_freq()).map(|(b, s)| (b / s) as f32).collect();
        let content = gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: HashMap::new(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        let md = Metadata::new(&content, Error::Config);
        assert_eq!(llama3_scaling_from_factors(&cfg, &factors, &md).unwrap(), want);
        let ones = vec![1f32; 64];
        assert_eq!(llama3_scaling_from_factors(&cfg, &ones, &md).unwrap(), RopeScaling::None);
        let mut odd = factors.clone();
        odd[40] *= 1.5;
        assert!(llama3_scaling_from_factors(&cfg, &odd, &md).is_err());
    }

    pub(in crate::gguf) fn tiny_config() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 0,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
            torch_dtype: "float32".into(),
        }
    }

    /// Writes a tiny Llama GGUF (byte-level tokenizer, F32/Q8_0 weights in llama.cpp's q/k
    /// layout) and returns its HF-layout weights for comparison.
    #[test]
    fn metadata_errors_are_named() {
        let content = |drop: &str| {
            let mut md: HashMap<String, GgufValue> = [
                ("llama.embedding_length", GgufValue::U32(8)),
                ("llama.feed_forward_length", GgufValue::U32(12)),
                ("llama.block_count", GgufValue::U32(2)),
                ("llama.attention.head_count", GgufValue::U32(2)),
                ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5)),
                ("llama.context_length", GgufValue::U32(128)),
                ("tokenizer.ggml.tokens", GgufValue::Array(vec![GgufValue::String("a".into())])),
                ("tokenizer.ggml.eos_token_id", GgufValue::U32(0)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            md.remove(drop);
            gguf_file::Content {
                magic: gguf_file::VersionedMagic::GgufV3,
                metadata: md,
                tensor_infos: HashMap::new(),
                tensor_data_offset: 0,
            }
        };
        let c = config_from_metadata(&content("nothing")).unwrap();
        assert_eq!((c.num_key_value_heads, c.rope_theta, c.vocab_size), (2, 10_000.0, 1));
        for key in [
            "llama.block_count",
            "llama.attention.layer_norm_rms_epsilon",
            "tokenizer.ggml.eos_token_id",
        ] {
            let e = config_from_metadata(&content(key)).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
        let mut c = content("nothing");
        c.metadata.insert("llama.rope.scaling.type".into(), GgufValue::String("yarn".into()));
        let e = config_from_metadata(&c).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let mut c = content("nothing");
        c.metadata.insert("llama.expert_count".into(), GgufValue::U32(8));
        assert!(matches!(config_from_metadata(&c), Err(Error::Unsupported(_))));
    }
}
