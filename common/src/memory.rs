//! The memory model: how many bytes a run needs at its peak, predicted from the model shape
//! and the run's settings before anything is loaded, so that a run that cannot fit fails at
//! start-up with advice instead of minutes later with an out-of-memory kill.
//!
//! Activations are not estimated from a rule of thumb: [`layer_saved_tensors`] lists the
//! tensors that `model::llama`'s layer forward creates and keeps alive for the backward
//! (candle's autograd graph holds every op's inputs until the loss is dropped), op by op,
//! and [`head_saved_tensors`] does the same for `logprob::response_logprobs` (only response
//! positions go through the output projection). The list depends on which kernels run:
//! on CPU in f32 the fused custom ops of `model::ops` keep one output each; everywhere else
//! (bf16, CUDA) the composite fallbacks keep several f32 intermediates. Tests compare the
//! list with the storages actually reachable from a real graph.
//!
//! What the model does *not* know exactly is the transient memory of candle's backward
//! (gradient temporaries; zero-filled accumulators) and allocator overhead: that is the
//! `workspace` term, sized from the largest tensors and calibrated against measured peaks
//! (see `examples/measure_memory.rs`).

use std::fmt;

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::LlamaConfig;

/// Which side of DPO the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Trainable: weights, gradients, optimizer state and the autograd graph.
    Policy,
    /// Frozen: weights and one forward pass's transient tensors, nothing else.
    Reference,
}

/// Which implementation of rms-norm, softmax, RoPE and the target log-prob runs: they keep
/// different intermediates alive (see `model::ops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// CPU with f32 tensors: fused custom ops, one saved output each.
    FusedCpuF32,
    /// CPU with another dtype: composite layers; the head upcasts to f32 and runs fused
    /// (f64 stays f64 and composite).
    CompositeCpu,
    /// Any GPU: compositions of primitive candle ops everywhere.
    CompositeGpu,
}

impl Kernels {
    pub fn for_device(device: &Device, dtype: DType) -> Self {
        match (device.is_cpu(), dtype) {
            (true, DType::F32) => Kernels::FusedCpuF32,
            (true, _) => Kernels::CompositeCpu,
            (false, _) => Kernels::CompositeGpu,
        }
    }

    fn fused_layers(self) -> bool {
        self == Kernels::FusedCpuF32
    }

    /// `ops::target_logprob` upcasts to f32 and takes the fused path on CPU.
    fn fused_head(self, d: DType) -> bool {
        self != Kernels::CompositeGpu && d != DType::F64
    }
}

/// The settings of a run that decide its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    pub role: Role,
    pub kernels: Kernels,
    /// Dtype of the weights (and of the gradients candle's backward produces).
    pub weight_dtype: DType,
    /// Dtype of the trainer's gradient accumulator (summed over micro-batches).
    pub grad_dtype: DType,
    /// Dtype of the optimizer state (RMSprop: one square average per parameter).
    pub optim_state_dtype: DType,
    /// Preference pairs per forward pass; the forward sees `2 × micro_batch` sequences
    /// (chosen and rejected), right-padded to `seq_len`.
    pub micro_batch: usize,
    /// Padded sequence length (the longest sequence of the micro-batch).
    pub seq_len: usize,
    /// Response tokens per sequence, on average: only these go through the output
    /// projection. `seq_len` is the worst case.
    pub response_len: usize,
    /// Per-layer activation checkpointing (`model::recompute`).
    pub checkpointing: bool,
}

impl MemoryConfig {
    /// The worst case for a policy on `device`: every token a response token.
    pub fn policy(
        device: &Device,
        weight_dtype: DType,
        micro_batch: usize,
        seq_len: usize,
        checkpointing: bool,
    ) -> Self {
        MemoryConfig {
            role: Role::Policy,
            kernels: Kernels::for_device(device, weight_dtype),
            weight_dtype,
            grad_dtype: DType::F32,
            optim_state_dtype: DType::F32,
            micro_batch,
            seq_len,
            response_len: seq_len,
            checkpointing,
        }
    }

    /// The worst case for a reference model on `device` scoring `micro_batch` pairs at once.
    pub fn reference(
        device: &Device,
        weight_dtype: DType,
        micro_batch: usize,
        seq_len: usize,
    ) -> Self {
        MemoryConfig {
            role: Role::Reference,
            checkpointing: false,
            ..Self::policy(device, weight_dtype, micro_batch, seq_len, false)
        }
    }

    /// Sequences per forward pass.
    pub fn sequences(&self) -> usize {
        2 * self.micro_batch
    }
}

/// Predicted peak bytes, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryPlan {
    pub weights: u64,
    /// Gradients from the backward pass plus the accumulator.
    pub grads: u64,
    pub optimizer_state: u64,
    /// What the decoder layers keep for the backward (all layers; with checkpointing, each
    /// layer's input plus one layer recomputed).
    pub activations: u64,
    /// The output head: final norm, selected hidden states, logits, log-prob intermediates.
    pub logits: u64,
    /// Backward temporaries (gradient buffers in flight).
    pub workspace: u64,
    pub total: u64,
}

const GIB: f64 = (1u64 << 30) as f64;

fn gib(b: u64) -> String {
    format!("{:8.3} GiB", b as f64 / GIB)
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "predicted peak memory")?;
        for (name, b) in [
            ("weights", self.weights),
            ("gradients", self.grads),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
            ("logits / head", self.logits),
            ("backward workspace", self.workspace),
        ] {
            writeln!(f, "  {name:<20} {}", gib(b))?;
        }
        write!(f, "  {:<20} {}", "total", gib(self.total))
    }
}

/// Number of parameters of a Llama of shape `cfg`.
pub fn param_count(cfg: &LlamaConfig) -> u64 {
    crate::model::llama::expected_params(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// A tensor kept for the backward: what it is and its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub what: &'static str,
    pub bytes: u64,
}

fn saved(what: &'static str, elems: usize, dtype: DType) -> Saved {
    Saved { what, bytes: (elems * dtype.size_in_bytes()) as u64 }
}

/// Whether the composite rms-norm / log-prob upcast to f32 (they never go below f32).
fn upcasts(d: DType) -> bool {
    d.size_in_bytes() < 4
}

/// The composite rms-norm of `[rows, h]` (`ops::rms_norm` fallback).
fn rms_norm_composite(out: &mut Vec<Saved>, rows: usize, h: usize, d: DType) {
    let f = DType::F32;
    if upcasts(d) {
        out.push(saved("rms_norm: x in f32", rows * h, f));
    }
    out.push(saved("rms_norm: x²", rows * h, f.max_size(d)));
    out.push(saved("rms_norm: sum, mean, +eps, sqrt, 1/·", 5 * rows, f.max_size(d)));
    out.push(saved("rms_norm: x·r", rows * h, f.max_size(d)));
    if upcasts(d) {
        out.push(saved("rms_norm: back to the model dtype", rows * h, d));
    }
    out.push(saved("rms_norm: ·w", rows * h, d));
}

trait MaxSize {
    fn max_size(self, other: DType) -> DType;
}

impl MaxSize for DType {
    /// The wider of two float dtypes (f64 stays f64: gradient checks use it).
    fn max_size(self, other: DType) -> DType {
        if other.size_in_bytes() > self.size_in_bytes() {
            other
        } else {
            self
        }
    }
}

/// The tensors one decoder layer (`Llama::layer_forward`) keeps alive for the backward, for
/// `b` sequences of `t` tokens. The layer's input is not included (it is the previous
/// layer's output, or the embedding); its output is (the last entry).
pub fn layer_saved_tensors(
    cfg: &LlamaConfig,
    b: usize,
    t: usize,
    d: DType,
    k: Kernels,
) -> Vec<Saved> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let n = b * t;
    let (qd, kvd) = (nh * hd, nkv * hd);
    let fused = k.fused_layers();
    let mut out = Vec::new();
    let rms = |out: &mut Vec<Saved>| {
        if fused {
            out.push(saved("rms_norm", n * h, d));
        } else {
            rms_norm_composite(out, n, h, d);
        }
    };
    let rope = |out: &mut Vec<Saved>, dim: usize| {
        if fused {
            out.push(saved("rope", n * dim, d));
        } else {
            // x1·c, x2·s, x2·c, x1·s (half width each), the sum and difference, the concat.
            out.push(saved("rope: four half-width products", 2 * n * dim, d));
            out.push(saved("rope: sum and difference", n * dim, d));
            out.push(saved("rope: concat", n * dim, d));
        }
    };
    rms(&mut out);
    out.push(saved("q, k, v projections", n * (qd + 2 * kvd), d));
    rope(&mut out, qd);
    rope(&mut out, kvd);
    out.push(saved("q, k, v head-major copies", n * (qd + 2 * kvd), d));
    let s = b * nh * t * t;
    if fused {
        // `ops::masked_softmax` scales and masks inside the kernel.
        out.push(saved("attention scores", s, d));
        out.push(saved("softmax", s, d));
    } else {
        out.push(saved("attention scores, scaled, masked", 3 * s, d));
        out.push(saved("softmax: x - max, exp, normalised", 3 * s, d));
        out.push(saved("softmax: max, sum", 2 * b * nh * t, d));
    }
    out.push(saved("attention output, merged-heads copy", 2 * n * qd, d));
    out.push(saved("o projection", n * h, d));
    out.push(saved("residual after attention", n * h, d));
    rms(&mut out);
    if fused {
        out.push(saved("mlp gate, up, swiglu", 3 * n * i, d));
    } else {
        out.push(saved("mlp gate, up, silu(gate), product", 4 * n * i, d));
    }
    out.push(saved("down projection", n * h, d));
    out.push(saved("residual after mlp (layer output)", n * h, d));
    out
}

/// The tensors of the output head of `response_logprobs` for `b` sequences of `t` tokens of
/// which `r` (in all) are response tokens: final norm, the selected rows, logits and the
/// log-prob of each target.
pub fn head_saved_tensors(
    cfg: &LlamaConfig,
    b: usize,
    t: usize,
    r: usize,
    d: DType,
    k: Kernels,
) -> Vec<Saved> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let f = DType::F32.max_size(d);
    let mut out = Vec::new();
    if k.fused_layers() {
        out.push(saved("final rms_norm", b * t * h, d));
    } else {
        rms_norm_composite(&mut out, b * t, h, d);
    }
    out.push(saved("response rows of the hidden states", r * h, d));
    out.push(saved("logits", r * v, d));
    if upcasts(d) {
        out.push(saved("logits in f32", r * v, f));
    }
    if !k.fused_head(d) {
        out.push(saved("log_softmax: x - max, exp, result", 3 * r * v, f));
        out.push(saved("log_softmax: max, sum, log", 3 * r, f));
    }
    out.push(saved("per-token log-probs", r, f));
    out.push(saved("per-sequence sums", b, f));
    out
}

fn total(items: &[Saved]) -> u64 {
    items.iter().map(|s| s.bytes).sum()
}

/// Backward temporaries beyond the graph and the gradients: a few gradients of the largest
/// per-layer tensors in flight at once (candle's backward forms `zeros + grad` for every
/// accumulation), or the copy `index_add` makes of the embedding gradient at the very end
/// when every other gradient already exists. The factor is calibrated on measured peaks.
const WORKSPACE_LARGEST_TENSORS: u64 = 5;

/// Predicts the peak bytes of one forward(+backward) of `mc` on a model of shape `cfg`.
pub fn predict_peak_bytes(cfg: &LlamaConfig, mc: &MemoryConfig) -> MemoryPlan {
    let p = param_count(cfg);
    let wd = mc.weight_dtype;
    let wbytes = wd.size_in_bytes() as u64;
    let b = mc.sequences();
    let t = mc.seq_len;
    let r = b * mc.response_len.min(t);
    let (h, v, l) = (cfg.hidden_size as u64, cfg.vocab_size as u64, cfg.num_hidden_layers as u64);
    let n = (b * t) as u64;

    let layer = total(&layer_saved_tensors(cfg, b, t, wd, mc.kernels));
    let head = total(&head_saved_tensors(cfg, b, t, r, wd, mc.kernels));
    let embedding = n * h * wbytes;
    let largest_layer_tensor = [
        (b * cfg.num_attention_heads * t * t) as u64,
        n * cfg.intermediate_size as u64,
        n * (cfg.num_attention_heads * cfg.head_dim) as u64,
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
        * wbytes;
    let logit_grad = r as u64 * v * 4;

    let weights = p * wbytes;
    let mut plan = MemoryPlan { weights, ..MemoryPlan::default() };
    match mc.role {
        Role::Reference => {
            // No graph: a layer's locals live until the layer returns (shadowed bindings
            // are not dropped early), so the peak is one layer's inventory plus its input.
            plan.activations = embedding + layer;
            plan.logits = head;
        }
        Role::Policy => {
            plan.grads = p * wbytes + p * mc.grad_dtype.size_in_bytes() as u64;
            plan.optimizer_state = p * mc.optim_state_dtype.size_in_bytes() as u64;
            plan.activations = if mc.checkpointing {
                // Every layer's input, plus one layer's graph during its recompute.
                embedding + l * n * h * wbytes + layer
            } else {
                embedding + l * layer
            };
            plan.logits = head;
            let embed_copy = v * h * wbytes;
            // A plain backward also leaves in its store, until it is dropped, the gradient of
            // each layer's broadcast causal mask: one [B, heads, T, T] tensor per layer
            // (`model::recompute` drops them as it goes).
            let mask_grads = if mc.checkpointing {
                0
            } else {
                l * (b * cfg.num_attention_heads * t * t) as u64 * wbytes
            };
            plan.workspace = mask_grads
                + (WORKSPACE_LARGEST_TENSORS * largest_layer_tensor)
                    .max(embed_copy)
                    .max(logit_grad);
        }
    }
    plan.total = plan.weights
        + plan.grads
        + plan.optimizer_state
        + plan.activations
        + plan.logits
        + plan.workspace;
    plan
}

/// Fails with advice when `plan` needs more than `available_bytes`.
pub fn check_fits(plan: &MemoryPlan, available_bytes: u64) -> Result<()> {
    if plan.total <= available_bytes {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "this run needs {:.2} GiB at its peak (weights {:.2}, gradients {:.2}, optimizer \
         {:.2}, activations {:.2}, logits {:.2}, workspace {:.2}), the device has {:.2} GiB; \
         try --micro-batch 1, --grad-checkpointing, bf16 weights or a shorter --max-length",
        plan.total as f64 / GIB,
        plan.weights as f64 / GIB,
        plan.grads as f64 / GIB,
        plan.optimizer_state as f64 / GIB,
        plan.activations as f64 / GIB,
        plan.logits as f64 / GIB,
        plan.workspace as f64 / GIB,
        available_bytes as f64 / GIB
    )))
}

/// Memory the process can still use on `device`: `MemAvailable` plus what the process
/// already holds is not attempted; this is what is free now (on a GPU: the driver's free
/// memory, other processes' allocations excluded). `None` where unknown.
pub fn available_bytes(device: &Device) -> Option<u64> {
    if device.is_cpu() {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        return proc_field_kib(&text, "MemAvailable:").map(|k| k * 1024);
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some(free as u64);
    }
    None
}

/// A `kB` field of a /proc status file (`/proc/meminfo`, `/proc/self/status`), in KiB.
pub fn proc_field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Peak resident set size of this process so far (`VmHWM`), in bytes (Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    proc_field_kib(&text, "VmHWM:").map(|k| k * 1024)
}

/// Current resident set size (`VmRSS`), in bytes (Linux only).
pub fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    proc_field_kib(&text, "VmRSS:").map(|k| k * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_config, TinySpec};

    fn llama_8b() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 128_256,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            max_position_embeddings: 131_072,
            ..tiny_config(&TinySpec::default())
        }
    }

    #[test]
    fn eight_b_counts_and_fits_only_with_bf16_and_checkpointing() {
        let cfg = llama_8b();
        assert_eq!(param_count(&cfg), 8_030_261_248);
        let gpu_like = |ckpt: bool, state: DType, grad: DType| MemoryConfig {
            kernels: Kernels::CompositeGpu,
            optim_state_dtype: state,
            grad_dtype: grad,
            ..MemoryConfig::policy(&Device::Cpu, DType::BF16, 1, 1024, ckpt)
        };
        let eighty = 80u64 << 30;
        let lean = predict_peak_bytes(&cfg, &gpu_like(true, DType::BF16, DType::BF16));
        assert!(check_fits(&lean, eighty).is_ok(), "{lean}");
        let no_ckpt = predict_peak_bytes(&cfg, &gpu_like(false, DType::BF16, DType::BF16));
        let err = check_fits(&no_ckpt, eighty).unwrap_err().to_string();
        assert!(err.contains("--grad-checkpointing") && err.contains("80.00 GiB"), "{err}");
        // f32 accumulator and f32 RMSprop state: +48 GB, over the card.
        let fat = predict_peak_bytes(&cfg, &gpu_like(true, DType::F32, DType::F32));
        assert!(check_fits(&fat, eighty).is_err(), "{fat}");
        let text = lean.to_string();
        assert!(text.contains("weights") && text.contains("GiB"), "{text}");
    }

    #[test]
    fn reference_holds_weights_and_one_layer() {
        let cfg = tiny_config(&TinySpec::default());
        let plan =
            predict_peak_bytes(&cfg, &MemoryConfig::reference(&Device::Cpu, DType::F32, 2, 16));
        assert_eq!(plan.grads + plan.optimizer_state + plan.workspace, 0);
        assert_eq!(plan.weights, param_count(&cfg) * 4);
        let policy =
            predict_peak_bytes(&cfg, &MemoryConfig::policy(&Device::Cpu, DType::F32, 2, 16, false));
        assert!(policy.activations > plan.activations);
    }

    #[test]
    fn checkpointing_saves_memory_once_there_are_layers_to_save() {
        let cfg = LlamaConfig { num_hidden_layers: 8, ..tiny_config(&TinySpec::default()) };
        let on =
            predict_peak_bytes(&cfg, &MemoryConfig::policy(&Device::Cpu, DType::F32, 4, 64, true));
        let off =
            predict_peak_bytes(&cfg, &MemoryConfig::policy(&Device::Cpu, DType::F32, 4, 64, false));
        assert!(on.activations * 3 < off.activations, "{on}\n{off}");
    }

    #[test]
    fn proc_fields_parse() {
        let text = "Name:\tx\nVmHWM:\t  1234 kB\nVmRSS:\t 99 kB\n";
        assert_eq!(proc_field_kib(text, "VmHWM:"), Some(1234));
        assert_eq!(proc_field_kib(text, "VmSwap:"), None);
        assert!(peak_rss_bytes().unwrap_or(0) > 0);
    }
}
