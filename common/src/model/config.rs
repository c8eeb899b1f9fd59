//! The Llama hyper-parameters, read from a Hugging Face `config.json` (transformers 4.x and
//! 5.x spellings) or filled in from GGUF metadata, and written back as a 4.x-style
//! `config.json` that every transformers version reads.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// RoPE frequency scaling. Only what Llama-family checkpoints use in practice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// All ids that end a generation; the first is the one appended after responses
    /// unless the tokenizer names another.
    pub eos_token_ids: Vec<u32>,
    /// The dtype the weights were stored in (`float32`, `bfloat16`, `float16`).
    pub torch_dtype: String,
}

fn field<'a>(obj: &'a Value, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn req_usize(obj: &Value, key: &str) -> Result<usize> {
    field(obj, key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| Error::Config(format!("`{key}` is missing or not a non-negative integer")))
}

fn opt_f64(obj: &Value, key: &str) -> Option<f64> {
    field(obj, key).and_then(Value::as_f64)
}

fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// Llama-family checkpoints whose differences the forward pass does not model.
fn reject_unsupported(v: &Value) -> Result<()> {
    if let Some(mt) = field(v, "model_type").and_then(Value::as_str) {
        // Mistral and Qwen2-style configs look alike but differ in ways we do not model
        // (sliding windows, biases); refuse rather than compute wrong numbers.
        if mt != "llama" {
            return Err(Error::Unsupported(format!(
                "model_type `{mt}`: only `llama` checkpoints are supported"
            )));
        }
    }
    for (key, ok) in [("attention_bias", false), ("mlp_bias", false)] {
        if field(v, key).and_then(Value::as_bool).is_some_and(|b| b != ok) {
            return Err(Error::Unsupported(format!("`{key}: true` is not supported")));
        }
    }
    if let Some(act) = field(v, "hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(Error::Unsupported(format!("hidden_act `{act}` (only `silu`)")));
        }
    }
    Ok(())
}

/// `rope_theta` and the RoPE scaling, from either transformers spelling.
fn rope_from_hf(v: &Value) -> Result<(f64, RopeScaling)> {
    // transformers 5.x moves rope_theta and rope_scaling into `rope_parameters`.
    let rope_params = field(v, "rope_parameters").or_else(|| field(v, "rope_scaling"));
    let rope_theta = opt_f64(v, "rope_theta")
        .or_else(|| rope_params.and_then(|p| opt_f64(p, "rope_theta")))
        .unwrap_or(10_000.0);
    let rope_scaling = match rope_params {
        None => RopeScaling::None,
        Some(p) => {
            let kind = field(p, "rope_type")
                .or_else(|| field(p, "type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => RopeScaling::None,
                "llama3" => {
                    let get = |k: &str| {
                        opt_f64(p, k).ok_or_else(|| {
                            Error::Config(format!("llama3 rope scaling is missing `{k}`"))
                        })
                    };
                    RopeScaling::Llama3 {
                        factor: get("factor")?,
                        low_freq_factor: get("low_freq_factor")?,
                        high_freq_factor: get("high_freq_factor")?,
                        original_max_position_embeddings: get("original_max_position_embeddings")?
                            as usize,
                    }
                }
                other => {
                    return Err(Error::Unsupported(format!(
                        "rope scaling type `{other}` (supported: default, llama3)"
                    )))
                }
            }
        }
    };
    Ok((rope_theta, rope_scaling))
}

impl LlamaConfig {
    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        Self::from_hf_value(&v)
    }

    pub fn from_hf_value(v: &Value) -> Result<Self> {
        reject_unsupported(v)?;
        let hidden_size = req_usize(v, "hidden_size")?;
        let num_attention_heads = req_usize(v, "num_attention_heads")?;
        let num_key_value_heads = field(v, "num_key_value_heads")
            .and_then(Value::as_u64)
            .map_or(num_attention_heads, |x| x as usize);
        let head_dim = field(v, "head_dim")
            .and_then(Value::as_u64)
            .map_or(hidden_size / num_attention_heads.max(1), |x| x as usize);

        let (rope_theta, rope_scaling) = rope_from_hf(v)?;
        let torch_dtype = field(v, "torch_dtype")
            .or_else(|| field(v, "dtype"))
            .and_then(Value::as_str)
            .unwrap_or("float32")
            .to_string();
        let cfg = LlamaConfig {
            vocab_size: req_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size")?,
            num_hidden_layers: req_usize(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: field(v, "max_position_embeddings")
                .and_then(Value::as_u64)
                .map_or(2048, |x| x as usize),
            tie_word_embeddings: field(v, "tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: id_list(field(v, "bos_token_id")).first().copied(),
            eos_token_ids: id_list(field(v, "eos_token_id")),
            torch_dtype,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between sizes that the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("attention head counts must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even and positive", self.head_dim));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        Ok(())
    }

    /// A transformers-4.x style `config.json` (read by 4.x and 5.x alike).
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "torch_dtype": self.torch_dtype,
            "use_cache": true,
        });
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = json!(b);
        }
        v["eos_token_id"] = match self.eos_token_ids.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = &self.rope_scaling
        {
            v["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            });
        }
        v
    }

    /// The inverse RoPE frequencies for each of the `head_dim / 2` rotation pairs, with
    /// Llama 3.1 scaling applied exactly as transformers' `_compute_llama3_parameters`.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        // In f32, as transformers computes it: the angles p·θ_i reach thousands of radians, so
        // the last bit of θ_i shows in the log-probs of long sequences.
        let base: Vec<f64> = (0..d / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / d as f32;
                (1.0f32 / (self.rope_theta as f32).powf(exponent)) as f64
            })
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA31_V4: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
      "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
      "rope_theta": 500000.0, "max_position_embeddings": 131072,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 128256,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}"#;

    const LLAMA31_V5: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
      "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
      "max_position_embeddings": 131072,
      "rope_parameters": {"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                          "rope_type": "llama3"},
      "tie_word_embeddings": false, "dtype": "bfloat16", "vocab_size": 128256,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}"#;

    #[test]
    fn transformers_4_and_5_spellings_agree() {
        let a = LlamaConfig::from_hf_json(LLAMA31_V4).unwrap();
        let b = LlamaConfig::from_hf_json(LLAMA31_V5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.head_dim, 128);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(a.torch_dtype, "bfloat16");
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn written_config_reads_back_identically() {
        let a = LlamaConfig::from_hf_json(LLAMA31_V4).unwrap();
        let b = LlamaConfig::from_hf_value(&a.to_hf_json()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn llama3_scaling_matches_transformers() {
        // Values from transformers' _compute_llama3_parameters for Llama 3.1 8B, head_dim 128.
        let cfg = LlamaConfig::from_hf_json(LLAMA31_V4).unwrap();
        let f = cfg.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert!((f[0] - 1.0).abs() < 1e-12); // high frequencies are untouched
        let plain = (1.0f32 / 500000f32.powf(126.0 / 128.0)) as f64;
        assert!((f[63] - plain / 8.0).abs() < 1e-18); // low frequencies divided by the factor
    }

    #[test]
    fn unsupported_models_are_named() {
        let e = LlamaConfig::from_hf_json(r#"{"model_type":"mistral"}"#).unwrap_err();
        assert!(e.to_string().contains("mistral"), "{e}");
        let e = LlamaConfig::from_hf_json(
            r#"{"model_type":"llama","hidden_size":8,"num_attention_heads":2,"vocab_size":10}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("intermediate_size"), "{e}");
    }
}
