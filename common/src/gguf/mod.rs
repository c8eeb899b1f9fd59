//! Loading a llama.cpp GGUF checkpoint. This module owns the translation from llama.cpp's
//! world to ours: `llama.*` metadata to [`LlamaConfig`] (`config`), llama.cpp tensor names to
//! Hugging Face names, quantized blocks to dense tensors, and undoing the q/k row permutation
//! that `convert_hf_to_gguf.py` applies for llama.cpp's RoPE layout. The tokenizer comes from
//! [`LlamaTokenizer::from_gguf`]; both read the header through [`metadata::Metadata`].
//!
//! The result is meant to equal what transformers produces when it loads the same file
//! (`from_pretrained(.., gguf_file=..)`): same names, same (dequantized) values, same config.
//! Where transformers is silently wrong for Llama GGUFs (it ignores `rope_freqs`, i.e. Llama
//! 3.1 RoPE scaling) we follow llama.cpp instead.

mod config;
pub mod metadata;
mod unsupported;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::tokenizer::LlamaTokenizer;
use metadata::Metadata;

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
    let content = Content::read(&mut reader).map_err(|e| unsupported::read_error(path, e))?;
    check_architecture(path, &content)?;
    let config = read_config(&content, &mut reader)?;
    let tokenizer = LlamaTokenizer::from_gguf(&content)?;
    // Name every tensor first so an unknown one fails before any dequantization work.
    let names = hf_names(path, &content, config.num_hidden_layers)?;
    let expected = expected_shapes(&config);
    check_complete(path, &names, &expected)?;
    let mut weights = HashMap::with_capacity(names.len());
    for (gguf, hf) in &names {
        let w = read_weight(&content, &mut reader, gguf, hf, &expected[hf], &config)?;
        let w = w.to_dtype(dtype).and_then(|t| t.to_device(device)).map_err(|e| Error::Weight {
            name: hf.clone(),
            message: format!("GGUF tensor `{gguf}`: {e}"),
        })?;
        weights.insert(hf.clone(), w);
    }
    Ok(GgufModel { config, weights, tokenizer })
}

fn check_architecture(path: &Path, content: &Content) -> Result<()> {
    let key = "general.architecture";
    let arch = Metadata::new(content, Error::Config)
        .get_str(key)
        .map_err(|_| Error::file(path, format!("`{key}` is not a string")))?
        .ok_or_else(|| Error::file(path, format!("not a model GGUF: no `{key}`")))?;
    if arch != "llama" {
        return Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{arch}`; only `llama` is supported",
            path.display()
        )));
    }
    Ok(())
}

/// The config from the metadata, with Llama 3 RoPE scaling read from `rope_freqs` if present.
fn read_config<R: Read + Seek>(content: &Content, reader: &mut R) -> Result<LlamaConfig> {
    let mut config = config::config_from_metadata(content)?;
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        let factors = read_f32(content, reader, ROPE_FREQS)?;
        let md = Metadata::new(content, Error::Config);
        config.rope_scaling = config::llama3_scaling_from_factors(&config, &factors, &md)?;
    }
    config.validate()?;
    Ok(config)
}

/// The Hugging Face name of every weight tensor (all but `rope_freqs`), keyed by its GGUF
/// name; a tensor with no Llama counterpart is an error naming all such tensors.
fn hf_names(path: &Path, content: &Content, n_layers: usize) -> Result<BTreeMap<String, String>> {
    let mut names = BTreeMap::new();
    let mut unknown = vec![];
    for name in content.tensor_infos.keys() {
        if name == ROPE_FREQS {
            continue;
        }
        match hf_name(name, n_layers) {
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
    Ok(names)
}

/// Fails naming the first weight the config needs that the file lacks.
fn check_complete(
    path: &Path,
    names: &BTreeMap<String, String>,
    expected: &HashMap<String, Vec<usize>>,
) -> Result<()> {
    if let Some(missing) = expected.keys().find(|hf| !names.values().any(|n| n == *hf)) {
        let what = if missing == "lm_head.weight" { " (untied output)" } else { "" };
        return Err(Error::Weight {
            name: missing.clone(),
            message: format!("missing from {}{what}", path.display()),
        });
    }
    Ok(())
}

/// One weight, shape-checked against the config, dequantized (on the CPU) and with the q/k
/// RoPE permutation undone.
fn read_weight<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    gguf: &str,
    hf: &str,
    want: &[usize],
    config: &LlamaConfig,
) -> Result<Tensor> {
    let ctx = |e: &dyn std::fmt::Display| Error::Weight {
        name: hf.to_string(),
        message: format!("GGUF tensor `{gguf}`: {e}"),
    };
    let info = &content.tensor_infos[gguf];
    if info.shape.dims() != want {
        return Err(ctx(&format!(
            "shape {:?}, expected {want:?} from the metadata",
            info.shape.dims()
        )));
    }
    let q = content.tensor(reader, gguf, &Device::Cpu).map_err(|e| ctx(&e))?;
    let t = q
        .dequantize(&Device::Cpu)
        .map_err(|e| ctx(&format!("cannot dequantize type {:?}: {e}", info.ggml_dtype)))?;
    let heads = if gguf.ends_with(".attn_q.weight") {
        Some(config.num_attention_heads)
    } else if gguf.ends_with(".attn_k.weight") {
        Some(config.num_key_value_heads)
    } else {
        None
    };
    match heads {
        Some(n) => unpermute_rope_rows(&t, n).map_err(|e| ctx(&e)),
        None => Ok(t),
    }
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

#[cfg(test)]
mod tests {
    use super::config::tests::tiny_config;
    use super::*;
    use candle_core::quantized::gguf_file::Value as GgufValue;
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
}
