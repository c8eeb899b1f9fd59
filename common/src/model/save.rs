//! Saving a model as a Hugging Face directory that transformers loads and that
//! `load_checkpoint` reads back bit-identically.
//!
//! Saves are atomic: everything is written and fsynced into a sibling temporary directory,
//! which then replaces the target in one rename (an atomic exchange when a previous
//! version exists). A crash at any point leaves either the old complete directory or the
//! new complete one, never a half-written directory under the target name.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::llama::Llama;
use super::load::torch_dtype_name;
use crate::error::{Error, Result};
use crate::tokenizer::LlamaTokenizer;

/// transformers' default shard size for `save_pretrained`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// The dtype written; `None` keeps the model's own (the only bit-exact choice).
    pub dtype: Option<DType>,
    /// Above this many bytes of weights, write `model-0000i-of-0000n.safetensors` shards
    /// plus `model.safetensors.index.json`.
    pub max_shard_bytes: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { dtype: None, max_shard_bytes: DEFAULT_MAX_SHARD_BYTES }
    }
}

/// Writes `model` and `tokenizer` as a Hugging Face directory at `dir`, atomically
/// replacing any previous content. `extra_files` (name, bytes) are written alongside,
/// inside the same atomic swap (e.g. a JSON note of the metrics the checkpoint came from).
pub fn save_hf(
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    dir: &Path,
    opts: &SaveOptions,
    extra_files: &[(&str, Vec<u8>)],
) -> Result<()> {
    save_hf_with(model, tokenizer, dir, opts, |tmp| {
        for (name, bytes) in extra_files {
            write_file(&tmp.join(name), bytes)?;
        }
        Ok(())
    })
}

/// [`save_hf`] with the extra files written by `write_extra` into the temporary directory
/// (inside the same atomic swap), for files too large to build in memory first: the
/// trainer's optimizer state is as large as the model.
pub fn save_hf_with(
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    dir: &Path,
    opts: &SaveOptions,
    write_extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    atomic_dir_write(dir, |tmp| {
        let dtype = opts.dtype.unwrap_or(model.dtype());
        let mut config = model.config().clone();
        config.torch_dtype = torch_dtype_name(dtype).to_string();
        write_file(&tmp.join("config.json"), &to_pretty_json(&config.to_hf_json())?)?;
        let generation = json!({
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_ids,
        });
        write_file(&tmp.join("generation_config.json"), &to_pretty_json(&generation)?)?;
        write_weights(model, tmp, dtype, opts.max_shard_bytes)?;
        tokenizer.save_hf(tmp)?;
        write_extra(tmp)
    })
}

fn to_pretty_json(v: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Input(format!("serializing JSON: {e}")))
}

fn write_weights(model: &Llama, dir: &Path, dtype: DType, max_shard_bytes: usize) -> Result<()> {
    // Tensors in canonical order, moved to the host in the output dtype.
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in model.params() {
        let t = t.detach().to_dtype(dtype)?.to_device(&Device::Cpu)?.contiguous()?;
        tensors.push((name.clone(), t));
    }
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    let mut shard_bytes = 0usize;
    for (name, t) in tensors {
        let bytes = t.elem_count() * dtype.size_in_bytes();
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(vec![]);
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        shards.last_mut().expect("at least one shard").push((name, t));
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if shards.len() == 1 {
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(shards.remove(0), metadata, &path)
            .map_err(|e| Error::file(&path, e))?;
        return fsync(&path);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        for (name, t) in &shard {
            weight_map.insert(name.clone(), json!(file));
            total += t.elem_count() * dtype.size_in_bytes();
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(shard, metadata.clone(), &path)
            .map_err(|e| Error::file(&path, e))?;
        fsync(&path)?;
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_file(&dir.join("model.safetensors.index.json"), &to_pretty_json(&index)?)
}

/// Writes a file and flushes it to disk.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::file(path, e))?;
    f.write_all(bytes).map_err(|e| Error::file(path, e))?;
    f.sync_all().map_err(|e| Error::file(path, e))
}

/// Flushes a file or a directory (its entries) to disk.
fn fsync(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::file(path, e))
}

fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::file(dir, "cannot save to a path without a final component"))?;
    let mut s = std::ffi::OsString::from(".");
    s.push(name);
    s.push(format!(".{tag}-{}", std::process::id()));
    Ok(dir.with_file_name(s))
}

/// Fills a fresh temporary sibling of `dir` with `fill`, then moves it into place so that
/// `dir` is at every instant either its old complete content or the new complete content.
pub fn atomic_dir_write(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::file(&parent, e))?;
    let tmp = sibling(dir, "tmp")?;
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::file(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| Error::file(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fsync(&tmp)?;
    if dir.exists() {
        exchange(&tmp, dir)?;
        // `tmp` now holds the previous version.
        fs::remove_dir_all(&tmp).map_err(|e| Error::file(&tmp, e))?;
    } else {
        fs::rename(&tmp, dir).map_err(|e| Error::file(dir, e))?;
    }
    fsync(&parent)
}

/// Atomically swaps two directories (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(|e| Error::file(a, e))?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(|e| Error::file(b, e))?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(Error::file(b, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Elsewhere: move the old version aside first; a crash in between leaves it recoverable
/// under its `.old-*` name.
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    let old = sibling(b, "old")?;
    fs::rename(b, &old).map_err(|e| Error::file(b, e))?;
    fs::rename(a, b).map_err(|e| Error::file(b, e))?;
    fs::rename(&old, a).map_err(|e| Error::file(a, e))
}
