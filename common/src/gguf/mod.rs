//! Loading a llama.cpp GGUF checkpoint. This module owns the translation from llama.cpp's
//! world to ours: `llama.*` metadata to [`LlamaConfig`], llama.cpp tensor names to Hugging
//! Face names, quantized blocks to dense tensors, and undoing the q/k row permutation that
//! `convert_hf_to_gguf.py` applies for llama.cpp's RoPE layout. The tokenizer comes from
//! [`LlamaTokenizer::from_gguf`].
//!
//! The result is meant to equal what transformers produces when it loads the same file
//! (`from_pretrained(.., gguf_file=..)`): same names, same (dequantized) values, same config.
//! Where transformers is silently wrong for Llama GGUFs (it ignores `rope_freqs`, i.e. Llama
//! 3.1 RoPE scaling) we follow llama.cpp instead.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{LlamaConfig, RopeScaling};
use crate::tokenizer::LlamaTokenizer;

/// A GGUF checkpoint, translated: weights under Hugging Face names.
pub struct GgufModel {
    pub config: LlamaConfig,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: LlamaTokenizer,
}

/// llama.cpp's tensor holding Llama 3 RoPE frequency factors; read into the config, not a weight.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// Loads a llama.cpp GGUF file whose `general.architecture` is `llama`: config from its
/// metadata, every weight dequantized then cast to `dtype` on `device` under its Hugging Face
/// name (q/k permutation undone), and its tokenizer.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    let file = File::open(path).map_err(|e| Error::file(path, e))?;
    let mut reader = BufReader::new(file);
    let content = match Content::read(&mut reader) {
        Ok(c) => c,
        Err(e) => return Err(read_error(path, e)),
    };
    let arch = match content.metadata.get("general.architecture") {
        Some(v) => v
            .to_string()
            .map_err(|_| Error::file(path, "`general.architecture` is not a string"))?
            .clone(),
        None => return Err(Error::file(path, "not a model GGUF: no `general.architecture`")),
    };
    if arch != "llama" {
        return Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{arch}`; only `llama` is supported",
            path.display()
        )));
    }

    let mut config = config_from_metadata(&content)?;
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        let factors = read_f32(&content, &mut reader, ROPE_FREQS)?;
        config.rope_scaling = llama3_scaling_from_factors(&config, &factors, &content)?;
    }
    config.validate()?;
    let tokenizer = LlamaTokenizer::from_gguf(&content)?;

    // Name every tensor first so an unknown one fails before any dequantization work.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut unknown = vec![];
    for name in content.tensor_infos.keys() {
        if name == ROPE_FREQS {
            continue;
        }
        match hf_name(name, config.num_hidden_layers) {
            Some(hf) => {
                names.insert(name.clone(), hf);
            }
            None => unknown.push(name.clone()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::Unsupported(format!(
            "{}: GGUF tensors with no Llama counterpart: {}",
            path.display(),
            unknown.join(", ")
        )));
    }
    let expected = expected_shapes(&config);
    if let Some(missing) = expected.keys().find(|hf| !names.values().any(|n| n == *hf)) {
        let what = if missing == "lm_head.weight" { " (untied output)" } else { "" };
        return Err(Error::Weight {
            name: missing.clone(),
            message: format!("missing from {}{what}", path.display()),
        });
    }

    let mut weights = HashMap::with_capacity(names.len());
    for (gguf, hf) in &names {
        let ctx = |e: &dyn std::fmt::Display| Error::Weight {
            name: hf.clone(),
            message: format!("GGUF tensor `{gguf}`: {e}"),
        };
        let info = &content.tensor_infos[gguf];
        let want = &expected[hf];
        if info.shape.dims() != want.as_slice() {
            return Err(ctx(&format!(
                "shape {:?}, expected {want:?} from the metadata",
                info.shape.dims()
            )));
        }
        let q = content.tensor(&mut reader, gguf, &Device::Cpu).map_err(|e| ctx(&e))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| ctx(&format!("cannot dequantize type {:?}: {e}", info.ggml_dtype)))?;
        if gguf.ends_with(".attn_q.weight") {
            t = unpermute_rope_rows(&t, config.num_attention_heads).map_err(|e| ctx(&e))?;
        } else if gguf.ends_with(".attn_k.weight") {
            t = unpermute_rope_rows(&t, config.num_key_value_heads).map_err(|e| ctx(&e))?;
        }
        let t = t.to_dtype(dtype).and_then(|t| t.to_device(device)).map_err(|e| ctx(&e))?;
        weights.insert(hf.clone(), t);
    }
    Ok(GgufModel { config, weights, tokenizer })
}

/// The config the `llama.*` metadata describes (RoPE scaling from `rope_freqs` is filled in
/// by the caller, which has the tensor).
fn config_from_metadata(content: &Content) -> Result<LlamaConfig> {
    let md = &content.metadata;
    let key = |k: &str| format!("llama.{k}");
    let get = |k: &str| md.get(&key(k));
    let int = |k: &str| -> Result<Option<usize>> {
        match get(k) {
            None => Ok(None),
            Some(v) => meta_usize(v, &key(k)).map(Some),
        }
    };
    let req = |k: &str| -> Result<usize> {
        int(k)?.ok_or_else(|| Error::Config(format!("GGUF metadata `{}` is missing", key(k))))
    };
    let float = |k: &str| -> Result<Option<f64>> {
        match get(k) {
            None => Ok(None),
            Some(GgufValue::F32(x)) => Ok(Some(*x as f64)),
            Some(GgufValue::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(Error::Config(format!("GGUF metadata `{}` is not a float", key(k)))),
        }
    };

    if int("expert_count")?.is_some_and(|n| n > 0) {
        return Err(Error::Unsupported(
            "mixture-of-experts GGUF (`llama.expert_count` > 0)".into(),
        ));
    }
    let hidden_size = req("embedding_length")?;
    let num_attention_heads = req("attention.head_count")?;
    let num_key_value_heads = int("attention.head_count_kv")?.unwrap_or(num_attention_heads);
    if num_attention_heads == 0 {
        return Err(Error::Config("GGUF metadata `llama.attention.head_count` is 0".into()));
    }
    let head_dim = int("attention.key_length")?.unwrap_or(hidden_size / num_attention_heads);
    if let Some(v) = int("attention.value_length")? {
        if v != head_dim {
            return Err(Error::Unsupported(format!(
                "value head size {v} differs from key head size {head_dim}"
            )));
        }
    }
    if let Some(r) = int("rope.dimension_count")? {
        if r != head_dim {
            return Err(Error::Unsupported(format!(
                "partial rotary embeddings (`llama.rope.dimension_count` {r} < head size {head_dim})"
            )));
        }
    }
    if let Some(v) = get("rope.scaling.type") {
        let t = v.to_string().map(String::as_str).unwrap_or("?");
        if t != "none" {
            return Err(Error::Unsupported(format!(
                "GGUF RoPE scaling `{t}` (`llama.rope.scaling.type`); only Llama 3 scaling \
                 (stored as a `{ROPE_FREQS}` tensor) is supported"
            )));
        }
    }
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| Error::Config("GGUF has no `tokenizer.ggml.tokens` array".into()))?;
    let vocab_size = tokens.len();
    if let Some(v) = int("vocab_size")? {
        if v != vocab_size {
            return Err(Error::Config(format!(
                "`llama.vocab_size` is {v} but `tokenizer.ggml.tokens` has {vocab_size} tokens"
            )));
        }
    }
    let token_id = |k: &str| -> Result<Option<u32>> {
        match md.get(k) {
            None => Ok(None),
            Some(v) => {
                let id = meta_usize(v, k)?;
                u32::try_from(id).ok().filter(|&i| (i as usize) < vocab_size).map(Some).ok_or_else(
                    || {
                        Error::Config(format!(
                            "`{k}` = {id} is outside the {vocab_size}-token vocabulary"
                        ))
                    },
                )
            }
        }
    };
    let eos = token_id("tokenizer.ggml.eos_token_id")?
        .ok_or_else(|| Error::Config("GGUF has no `tokenizer.ggml.eos_token_id`".into()))?;
    // The end-of-turn / end-of-message ids also stop generation in llama.cpp; EOS stays first
    // because it is the one appended after responses.
    let mut eos_token_ids = vec![eos];
    for k in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = token_id(k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }

    Ok(LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: req("feed_forward_length")?,
        num_hidden_layers: req("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            Error::Config(
                "GGUF metadata `llama.attention.layer_norm_rms_epsilon` is missing".into(),
            )
        })?,
        rope_theta: float("rope.freq_base")?.unwrap_or(10_000.0),
        rope_scaling: RopeScaling::None,
        max_position_embeddings: req("context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        torch_dtype: "float32".into(),
    })
}

fn meta_usize(v: &GgufValue, key: &str) -> Result<usize> {
    use GgufValue as V;
    let n: Option<u64> = match v {
        V::U8(x) => Some(*x as u64),
        V::U16(x) => Some(*x as u64),
        V::U32(x) => Some(*x as u64),
        V::U64(x) => Some(*x),
        V::I8(x) => u64::try_from(*x).ok(),
        V::I16(x) => u64::try_from(*x).ok(),
        V::I32(x) => u64::try_from(*x).ok(),
        V::I64(x) => u64::try_from(*x).ok(),
        V::Array(_) => {
            return Err(Error::Unsupported(format!(
                "GGUF metadata `{key}` is a per-layer array; only one value for all layers is supported"
            )))
        }
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
        Error::Config(format!("GGUF metadata `{key}` is not a non-negative integer"))
    })
}

/// The Hugging Face name of a llama.cpp tensor, `None` if it has none (or names a layer
/// beyond `n_layers`).
fn hf_name(gguf: &str, n_layers: usize) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    // Reject "01" and the like so each tensor has exactly one spelling.
    let n: usize = layer.parse().ok().filter(|n: &usize| n.to_string() == layer)?;
    if n >= n_layers {
        return None;
    }
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{n}.{hf}"))
}

/// Every weight a Llama with `cfg` needs, with its (Hugging Face, row-major) shape.
fn expected_shapes(cfg: &LlamaConfig) -> HashMap<String, Vec<usize>> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut m = HashMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), vec![v, h]);
    }
    for l in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        m.insert(p("self_attn.q_proj.weight"), vec![q, h]);
        m.insert(p("self_attn.k_proj.weight"), vec![kv, h]);
        m.insert(p("self_attn.v_proj.weight"), vec![kv, h]);
        m.insert(p("self_attn.o_proj.weight"), vec![h, q]);
        m.insert(p("mlp.gate_proj.weight"), vec![i, h]);
        m.insert(p("mlp.up_proj.weight"), vec![i, h]);
        m.insert(p("mlp.down_proj.weight"), vec![h, i]);
        m.insert(p("input_layernorm.weight"), vec![h]);
        m.insert(p("post_attention_layernorm.weight"), vec![h]);
    }
    m
}

/// Undoes `convert_hf_to_gguf.py`'s q/k permutation. llama.cpp rotates adjacent pairs
/// (x0, x1), (x2, x3).. while Hugging Face rotates halves (x_i, x_{i+d/2}), so the converter
/// reorders each head's rows: `w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)`. The inverse
/// views GGUF rows as `(n_head, d/2, 2, in)` and swaps the middle axes back.
pub fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(Error::Config(format!(
            "cannot undo the RoPE permutation: {rows} rows is not a multiple of 2 x {n_head} heads"
        )));
    }
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

fn read_f32<R: Read + Seek>(content: &Content, reader: &mut R, name: &str) -> Result<Vec<f32>> {
    let ctx =
        |e: candle_core::Error| Error::Weight { name: name.to_string(), message: e.to_string() };
    let t = content.tensor(reader, name, &Device::Cpu).map_err(ctx)?;
    t.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).map_err(ctx)
}

/// Recovers Llama 3 RoPE scaling from llama.cpp's `rope_freqs` factors (the converter
/// stores, per frequency, 1 above the high-frequency cut, `factor` below the low-frequency
/// one and the smooth blend between). The blend is linear in 1/wavelength, so two blended
/// frequencies give both cut-offs; `original_max_position_embeddings` only scales them
/// (taken from `llama.rope.scaling.original_context_length`, else Llama 3's 8192). The result
/// is accepted only if it reproduces every stored factor.
fn llama3_scaling_from_factors(
    cfg: &LlamaConfig,
    factors: &[f32],
    content: &Content,
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
    let original = match content.metadata.get("llama.rope.scaling.original_context_length") {
        Some(v) => meta_usize(v, "llama.rope.scaling.original_context_length")?,
        None => 8192,
    };
    let factor = rf.iter().cloned().fold(f64::MIN, f64::max);
    let base = {
        let mut plain = cfg.clone();
        plain.rope_scaling = RopeScaling::None;
        plain.rope_inv_freq()
    };
    // Points strictly inside the blend: (1/wavelength, blend weight).
    let blend: Vec<(f64, f64)> = rf
        .iter()
        .zip(&base)
        .filter(|(&r, _)| (r - 1.0).abs() > 1e-4 && (r - factor).abs() > 1e-4 * factor)
        .map(|(&r, &f)| {
            (f / (2.0 * std::f64::consts::PI), (1.0 / r - 1.0 / factor) / (1.0 - 1.0 / factor))
        })
        .collect();
    let round = |x: f64| {
        // Recover the round numbers configs use (1.0, 4.0, ...) from float32 factors.
        let scale = 10f64.powi(5 - x.abs().log10().floor() as i32);
        (x * scale).round() / scale
    };
    let (low, high) = match (blend.first(), blend.last()) {
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

/// candle rejects a GGUF with a quantization it does not know while reading the header,
/// naming only the type number; find the tensor and name both.
fn read_error(path: &Path, e: candle_core::Error) -> Error {
    let msg = e.to_string();
    if msg.contains("unknown dtype") {
        if let Ok(Some((tensor, ty))) = first_unsupported_tensor(path) {
            return Error::Unsupported(format!(
                "{}: tensor `{tensor}` is quantized as {} (ggml type {ty}), which candle cannot \
                 dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, \
                 Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)",
                path.display(),
                ggml_type_name(ty)
            ));
        }
    }
    Error::file(path, format!("not a readable GGUF file: {msg}"))
}

fn ggml_type_name(ty: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(ty as usize).map_or_else(|| format!("type {ty}"), |s| s.to_string())
}

/// Walks the GGUF header (skipping metadata) to the first tensor whose ggml type candle
/// does not know. Only used to explain a failed read, so any oddity just yields `None`.
fn first_unsupported_tensor(path: &Path) -> std::io::Result<Option<(String, u32)>> {
    const KNOWN: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];
    let mut r = BufReader::new(File::open(path)?);
    let u32_ = |r: &mut BufReader<File>| -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    };
    let u64_ = |r: &mut BufReader<File>| -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    };
    if u32_(&mut r)? != 0x4655_4747 {
        return Ok(None);
    }
    let v1 = u32_(&mut r)? == 1;
    let len = |r: &mut BufReader<File>| if v1 { u32_(r).map(u64::from) } else { u64_(r) };
    let (n_tensors, n_kv) = (len(&mut r)?, len(&mut r)?);
    fn skip_value(
        r: &mut BufReader<File>,
        ty: u32,
        len: &dyn Fn(&mut BufReader<File>) -> std::io::Result<u64>,
        depth: u32,
    ) -> std::io::Result<bool> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let n = len(r)?;
                r.seek(SeekFrom::Current(n as i64))?;
                return Ok(true);
            }
            9 if depth < 4 => {
                let mut b = [0u8; 4];
                r.read_exact(&mut b)?;
                let elem = u32::from_le_bytes(b);
                let n = len(r)?;
                for _ in 0..n {
                    if !skip_value(r, elem, len, depth + 1)? {
                        return Ok(false);
                    }
                }
                return Ok(true);
            }
            _ => return Ok(false),
        };
        r.seek(SeekFrom::Current(fixed))?;
        Ok(true)
    }
    for _ in 0..n_kv {
        let klen = len(&mut r)?;
        r.seek(SeekFrom::Current(klen as i64))?;
        let ty = u32_(&mut r)?;
        if !skip_value(&mut r, ty, &len, 0)? {
            return Ok(None);
        }
    }
    for _ in 0..n_tensors {
        let nlen = len(&mut r)?;
        if nlen > 1 << 16 {
            return Ok(None);
        }
        let mut name = vec![0u8; nlen as usize];
        r.read_exact(&mut name)?;
        let n_dims = u32_(&mut r)?;
        if n_dims > 8 {
            return Ok(None);
        }
        for _ in 0..n_dims {
            len(&mut r)?;
        }
        let ty = u32_(&mut r)?;
        u64_(&mut r)?;
        if !KNOWN.contains(&ty) {
            return Ok(Some((String::from_utf8_lossy(&name).into_owned(), ty)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

    /// The converter's forward permutation, written as in convert_hf_to_gguf.py.
    fn permute(w: &Tensor, n_head: usize) -> Tensor {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    fn rows(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn permutation_matches_llama_cpp_and_round_trips() {
        // One head of size 4, one column: HF rows [0 1 2 3] -> llama.cpp pairs (0,2), (1,3).
        let hf = Tensor::new(&[[0f32], [1.], [2.], [3.]], &Device::Cpu).unwrap();
        assert_eq!(rows(&permute(&hf, 1)), vec![0., 2., 1., 3.]);
        assert_eq!(rows(&unpermute_rope_rows(&permute(&hf, 1), 1).unwrap()), vec![0., 1., 2., 3.]);

        // 3 heads of size 8, 5 columns.
        let hf = Tensor::arange(0f32, 120., &Device::Cpu).unwrap().reshape((24, 5)).unwrap();
        let back = unpermute_rope_rows(&permute(&hf, 3), 3).unwrap();
        assert_eq!(rows(&back), rows(&hf));
        assert!(unpermute_rope_rows(&hf, 5).is_err());
    }

    #[test]
    fn tensor_names() {
        assert_eq!(hf_name("token_embd.weight", 2).unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_name("output.weight", 2).unwrap(), "lm_head.weight");
        assert_eq!(
            hf_name("blk.1.attn_output.weight", 2).unwrap(),
            "model.layers.1.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", 2).unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert!(hf_name("blk.2.attn_q.weight", 2).is_none());
        assert!(hf_name("blk.01.attn_q.weight", 2).is_none());
        assert!(hf_name("blk.0.attn_q.bias", 2).is_none());
    }

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
        assert_eq!(llama3_scaling_from_factors(&cfg, &factors, &content).unwrap(), want);
        let ones = vec![1f32; 64];
        assert_eq!(llama3_scaling_from_factors(&cfg, &ones, &content).unwrap(), RopeScaling::None);
        let mut odd = factors.clone();
        odd[40] *= 1.5;
        assert!(llama3_scaling_from_factors(&cfg, &odd, &content).is_err());
    }

    fn tiny_config() -> LlamaConfig {
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
    fn write_tiny_gguf(
        path: &Path,
        arch: &str,
        extra_tensor: Option<&str>,
        drop_tensor: Option<&str>,
    ) -> HashMap<String, Tensor> {
        let cfg = tiny_config();
        let s = |x: &str| GgufValue::String(x.to_string());
        let mut tokens: Vec<GgufValue> = vec![s("<s>"), s("</s>")];
        for b in b'a'..=b'z' {
            tokens.push(s(&(b as char).to_string()));
        }
        while tokens.len() < 32 {
            tokens.push(s(&format!("<extra_{}>", tokens.len())));
        }
        let vocab = tokens.len();
        let md: Vec<(&str, GgufValue)> = vec![
            ("general.architecture", s(arch)),
            ("llama.embedding_length", GgufValue::U32(32)),
            ("llama.feed_forward_length", GgufValue::U32(64)),
            ("llama.block_count", GgufValue::U32(2)),
            ("llama.attention.head_count", GgufValue::U32(2)),
            ("llama.attention.head_count_kv", GgufValue::U32(1)),
            ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5)),
            ("llama.rope.freq_base", GgufValue::F32(10_000.0)),
            ("llama.context_length", GgufValue::U32(128)),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s("gpt2")),
            ("tokenizer.ggml.tokens", GgufValue::Array(tokens)),
            ("tokenizer.ggml.merges", GgufValue::Array(vec![])),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(0)),
            ("tokenizer.ggml.eos_token_id", GgufValue::U32(1)),
        ];
        let mut hf = HashMap::new();
        let mut gguf: Vec<(String, QTensor)> = vec![];
        let mut seed = 0f32;
        let mut add = |g: &str, shape: &[usize], permute_heads: Option<usize>, q: GgmlDType| {
            if Some(g) == drop_tensor {
                return;
            }
            let n: usize = shape.iter().product();
            seed += 1.0;
            let vals: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
            let t = Tensor::from_vec(vals, shape, &Device::Cpu).unwrap();
            let stored = permute_heads.map_or(t.clone(), |h| permute(&t, h));
            let qt = QTensor::quantize(&stored, q).unwrap();
            // Compare against what the file really holds (quantization is lossy).
            let held = qt.dequantize(&Device::Cpu).unwrap();
            let held =
                permute_heads.map_or(held.clone(), |h| unpermute_rope_rows(&held, h).unwrap());
            if let Some(name) = hf_name(g, cfg.num_hidden_layers) {
                hf.insert(name, held);
            }
            gguf.push((g.to_string(), qt));
        };
        // Quantized types need rows that are whole blocks of 32 values.
        add("token_embd.weight", &[vocab, 32], None, GgmlDType::Q8_0);
        add("output_norm.weight", &[32], None, GgmlDType::F32);
        for l in 0..2 {
            let p = |x: &str| format!("blk.{l}.{x}.weight");
            add(&p("attn_q"), &[32, 32], Some(2), GgmlDType::Q4_1);
            add(&p("attn_k"), &[16, 32], Some(1), GgmlDType::F32);
            add(&p("attn_v"), &[16, 32], None, GgmlDType::Q4_1);
            add(&p("attn_output"), &[32, 32], None, GgmlDType::F32);
            add(&p("ffn_gate"), &[64, 32], None, GgmlDType::F16);
            add(&p("ffn_up"), &[64, 32], None, GgmlDType::F32);
            add(&p("ffn_down"), &[32, 64], None, GgmlDType::Q8_0);
            add(&p("attn_norm"), &[32], None, GgmlDType::F32);
            add(&p("ffn_norm"), &[32], None, GgmlDType::F32);
        }
        if let Some(x) = extra_tensor {
            add(x, &[32], None, GgmlDType::F32);
        }
        let mut f = File::create(path).unwrap();
        let md_refs: Vec<(&str, &GgufValue)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = gguf.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
        hf
    }

    #[test]
    fn loads_a_tiny_llama_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let want = write_tiny_gguf(&path, "llama", None, None);
        let m = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
        let c = &m.config;
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads),
            (32, 64, 2, 2)
        );
        assert_eq!((c.num_key_value_heads, c.head_dim, c.vocab_size), (1, 16, 32));
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(0), vec![1]));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.max_position_embeddings, 128);
        assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);
        assert_eq!(m.weights.len(), want.len());
        for (name, w) in &want {
            let got = &m.weights[name];
            assert_eq!(rows(got), rows(w), "{name}");
        }
        assert_eq!(m.tokenizer.eos_id(), 1);

        let bf = load_gguf(&path, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(bf.weights["model.norm.weight"].dtype(), DType::BF16);
    }

    #[test]
    fn gguf_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");

        write_tiny_gguf(&path, "qwen2", None, None);
        let e = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("qwen2"), "{e}");

        write_tiny_gguf(&path, "llama", Some("blk.0.attn_q.bias"), None);
        let e = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("blk.0.attn_q.bias"), "{e}");

        write_tiny_gguf(&path, "llama", None, Some("blk.1.ffn_up.weight"));
        let e = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");

        std::fs::write(&path, b"not a gguf").unwrap();
        let e = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("a.gguf"), "{e}");
    }

    #[test]
    fn unknown_quant_types_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iq.gguf");
        write_tiny_gguf(&path, "llama", None, None);
        // Rewrite the type of the first tensor whose info follows its name to IQ4_XS (23).
        let mut bytes = std::fs::read(&path).unwrap();
        let name = b"output_norm.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
        // n_dims (u32 = 1), one u64 dim, then the u32 type.
        let ty = at + 4 + 8;
        bytes[ty..ty + 4].copy_from_slice(&23u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap();
        let msg = e.to_string();
        assert!(msg.contains("output_norm.weight") && msg.contains("IQ4_XS"), "{msg}");
    }

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
