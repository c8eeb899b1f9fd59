//! Loading a checkpoint from disk: a Hugging Face directory (`config.json`, one or sharded
//! `*.safetensors`, `tokenizer.json`) or a llama.cpp `.gguf` file. Either way the result is
//! the same: a config, weights under Hugging Face names, and a tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::LlamaConfig;
use super::llama::{Llama, Mode};
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::tokenizer::LlamaTokenizer;

/// What a checkpoint file or directory holds, before it becomes a model.
pub struct Checkpoint {
    pub config: LlamaConfig,
    /// Weights under Hugging Face names, in their stored dtype (GGUF: dequantized to the
    /// requested dtype).
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: LlamaTokenizer,
    pub source: PathBuf,
}

/// A model ready to run, with the tokenizer it was trained with and its identity.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: LlamaTokenizer,
    /// See [`fingerprint::model_fingerprint`].
    pub fingerprint: String,
    pub source: PathBuf,
}

/// Reads a checkpoint: a directory is a Hugging Face model, a `.gguf` file a llama.cpp one.
/// `gguf_dtype` is the dtype GGUF weights are dequantized to (safetensors keep theirs).
pub fn load_checkpoint(path: &Path, gguf_dtype: DType) -> Result<Checkpoint> {
    if !path.exists() {
        return Err(Error::file(path, "no such file or directory"));
    }
    if path.is_dir() {
        return load_hf_dir(path);
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let g = crate::gguf::load_gguf(path, gguf_dtype, &Device::Cpu)?;
        return Ok(Checkpoint {
            config: g.config,
            weights: g.weights,
            tokenizer: g.tokenizer,
            source: path.to_path_buf(),
        });
    }
    Err(Error::file(
        path,
        "not a model: expected a Hugging Face model directory (with config.json) or a .gguf file",
    ))
}

/// Loads a checkpoint and builds the model in `mode` with weights in `dtype` on `device`.
pub fn load_model(path: &Path, mode: Mode, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let ck = load_checkpoint(path, dtype)?;
    let model = Llama::from_weights(ck.config, ck.weights, mode, dtype, device)?;
    let fingerprint = fingerprint::model_fingerprint(&model, &ck.tokenizer)?;
    Ok(LoadedModel { model, tokenizer: ck.tokenizer, fingerprint, source: ck.source })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

fn load_hf_dir(dir: &Path) -> Result<Checkpoint> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::file(dir, "not a Hugging Face model directory: config.json is missing"));
    }
    let config = LlamaConfig::from_hf_value(&read_json(&config_path)?)
        .map_err(|e| Error::file(&config_path, e))?;
    let files = safetensors_files(dir)?;
    let weights = read_safetensors(&files)?;
    let tokenizer = LlamaTokenizer::from_hf_dir(dir, &config)?;
    Ok(Checkpoint { config, weights, tokenizer, source: dir.to_path_buf() })
}

/// The weight files of a directory: the shards its index names, or `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::file(&index, "has no `weight_map` object"))?;
        let mut files: Vec<String> =
            map.values().filter_map(Value::as_str).map(str::to_string).collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(Error::file(
                missing,
                format!("shard named by {} is missing", index.display()),
            ));
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if dir.join("pytorch_model.bin").exists() {
        return Err(Error::file(
            dir,
            "only pytorch_model.bin found: convert it to safetensors (transformers: \
             model.save_pretrained(dir, safe_serialization=True))",
        ));
    }
    Err(Error::file(dir, "no model.safetensors or model.safetensors.index.json"))
}

fn read_safetensors(files: &[PathBuf]) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for path in files {
        // SAFETY: the file is mapped read-only and only read while the map lives; a
        // concurrent writer truncating it is outside what any loader can defend against.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
            .map_err(|e| Error::file(path, format!("not a readable safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            let dtype = view.dtype();
            use safetensors::Dtype as S;
            if !matches!(dtype, S::F32 | S::BF16 | S::F16) {
                return Err(Error::file(
                    path,
                    format!("tensor `{name}` has dtype {dtype:?}; supported: F32, BF16, F16"),
                ));
            }
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
            if out.insert(name.clone(), t).is_some() {
                return Err(Error::file(path, format!("tensor `{name}` appears in two shards")));
            }
        }
    }
    Ok(out)
}

/// Parses a dtype name as users write it (`f32`, `bf16`, `float16`, ...).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::Input(format!("unknown dtype `{other}` (use f32, bf16 or f16)"))),
    }
}

/// The `torch_dtype` name of a candle dtype.
pub fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}
