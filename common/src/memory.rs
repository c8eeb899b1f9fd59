//! The memory model: how many bytes a run needs at its peak, predicted from the model shape
//! and the run's settings before anything is loaded, so that a run that cannot fit fails at
//! start-up with advice instead of minutes later with an out-of-memory kill.
//!
//! Activations are not estimated from a rule of thumb: [`layer_kept_tensors`] lists what
//! `model::backward`'s forward keeps per decoder layer for the backward, and
//! [`head_kept_tensors`] what it keeps of the output head (only response positions go
//! through the output projection). They do not depend on the kernels (fused CPU or
//! composite GPU): intermediates are dropped as soon as the next op has run, since no
//! autograd graph holds them. A test (`tests/memory.rs`) compares the lists with the
//! storages a real pass keeps, to the byte.
//!
//! What the model estimates rather than counts is the backward's transient memory and the
//! optimizer step's temporaries: the `workspace` and `optimizer_step` terms. The backward
//! goes through phases that never overlap, and the workspace is the largest of them, not
//! their sum: the output head's (the logits' gradient formed beside the logits; then, the
//! logits freed, the head's weight gradient) and then one layer's at a time (with
//! checkpointing the layer recomputed first), when the logits are gone. `tests/memory_peak.rs`
//! checks a pass's predicted peak against the most bytes a real one holds at once (tiny
//! models, each phase the peak in turn), `examples/measure_memory.rs` on SmolLM2 against
//! those bytes and against the peak RSS.

use std::fmt;

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::{at_least_f32, lora, LlamaConfig};

/// Which side of DPO the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Trainable: weights, gradient accumulator, optimizer state and the activations.
    Policy,
    /// Frozen: weights and one forward pass's transient tensors, nothing else.
    Reference,
}

/// The settings of a run that decide its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    pub role: Role,
    /// Dtype of the weights (and of the activations).
    pub weight_dtype: DType,
    /// Dtype of the trainer's gradient accumulator (summed over micro-batches).
    pub grad_dtype: DType,
    /// Dtype of the optimizer state (RMSprop: one square average per parameter).
    pub optim_state_dtype: DType,
    /// Preference pairs per forward pass: one row each (the prompt once, then chosen and
    /// rejected), right-padded to `row_len`.
    pub micro_batch: usize,
    /// Padded row length: prompt + chosen + rejected tokens of the longest pair.
    pub row_len: usize,
    /// Response tokens per row (chosen + rejected), on average: only these go through the
    /// output projection. `row_len` is the worst case.
    pub response_len: usize,
    /// Per-layer activation checkpointing (`model::backward` with `checkpoint`).
    pub checkpointing: bool,
    /// The optimizer updates in place (the trainer's fused RMSprop: f32 weights on a CPU);
    /// otherwise its step forms a few parameter-sized temporaries.
    pub in_place_optimizer: bool,
    /// The pass runs on a CPU: the logits' gradient by a fused kernel (elsewhere candle ops
    /// with temporaries of their own), and a matrix kernel (gemm) that packs operands into
    /// buffers of its own, of which the head's weight gradient's count ([`GEMM_PACK_BYTES`]).
    pub cpu: bool,
    /// LoRA (`model::lora`): only the adapters train, so gradients and optimizer state are
    /// the adapters' size and no base weight's gradient is ever formed. `None`: every
    /// weight trains.
    pub adapters: Option<AdapterSizes>,
}

/// The sizes of a model's LoRA adapters that the memory model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterSizes {
    /// Parameters of all adapters together.
    pub params: u64,
    /// Elements of the largest adapter tensor (the optimizer's temporaries are its size).
    pub largest: u64,
}

/// The adapters' sizes for `lora` on a model of shape `cfg`.
pub fn adapter_sizes(cfg: &LlamaConfig, lora: &crate::model::LoraConfig) -> AdapterSizes {
    let r = lora.rank as u64;
    let shapes = lora.targets.iter().map(|t| t.shape(cfg));
    let per_layer: u64 = shapes.clone().map(|(out, inp)| r * (out + inp) as u64).sum();
    let largest = shapes.map(|(out, inp)| r * out.max(inp) as u64).max().unwrap_or(0);
    AdapterSizes { params: per_layer * cfg.num_hidden_layers as u64, largest }
}

/// The most the CPU matrix kernel (gemm) packs of an operand at once: it copies the
/// operand a block at a time, the block sized from the cache sizes (with 32 MiB of L3:
/// blocks of 26-29 MiB at vocabularies of 49k-128k; the whole operand when smaller).
pub const GEMM_PACK_BYTES: u64 = 32 << 20;

/// The CPU matrix kernel's own buffers while it forms the head's weight gradient
/// `dlogitsᵀ · hidden` ([V, r] times [r, H]), measured with a counting allocator: in f32 the
/// packed transposed gradient, up to [`GEMM_PACK_BYTES`]; in bf16, which is multiplied in
/// f32, the whole transposed gradient and the product in f32.
fn gemm_buffers(r: u64, v: u64, h: u64, dtype: DType) -> u64 {
    match dtype {
        DType::F32 | DType::F64 => (r * v * dtype.size_in_bytes() as u64).min(GEMM_PACK_BYTES),
        _ => (r + h) * v * 4,
    }
}

impl MemoryConfig {
    /// The worst case for a policy on `device`: every token a response token.
    pub fn policy(
        device: &Device,
        weight_dtype: DType,
        micro_batch: usize,
        row_len: usize,
        checkpointing: bool,
    ) -> Self {
        MemoryConfig {
            role: Role::Policy,
            weight_dtype,
            grad_dtype: DType::F32,
            optim_state_dtype: DType::F32,
            micro_batch,
            row_len,
            response_len: row_len,
            checkpointing,
            in_place_optimizer: device.is_cpu() && weight_dtype == DType::F32,
            cpu: device.is_cpu(),
            adapters: None,
        }
    }

    /// The worst case for a reference model scoring `micro_batch` pairs at once.
    pub fn reference(
        device: &Device,
        weight_dtype: DType,
        micro_batch: usize,
        row_len: usize,
    ) -> Self {
        MemoryConfig {
            role: Role::Reference,
            checkpointing: false,
            ..Self::policy(device, weight_dtype, micro_batch, row_len, false)
        }
    }
}

/// Predicted peak bytes, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryPlan {
    pub weights: u64,
    /// The gradient accumulator (each weight gradient is added into it as it is formed).
    pub grads: u64,
    pub optimizer_state: u64,
    /// What the decoder layers keep for the backward (all layers; with checkpointing, each
    /// layer's input).
    pub activations: u64,
    /// The output head: the selected hidden states, logits, log-probs.
    pub logits: u64,
    /// The backward's largest transient beyond what the forward kept: the output head's, or
    /// one layer's (with checkpointing including the layer's recomputed activations) less
    /// the logits, which are freed by then.
    pub workspace: u64,
    /// The optimizer step's temporaries. The step runs after the backward has freed the
    /// activations, so the peak is the larger of the two phases, not their sum.
    pub optimizer_step: u64,
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
            ("optimizer step", self.optimizer_step),
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

/// What `model::backward` keeps of one decoder layer (`LayerActivations`) for `b` rows of
/// `t` tokens, in the weights' dtype `d`. The layer's input is included (it is the
/// embedding or the previous layer's output, kept once).
pub fn layer_kept_tensors(cfg: &LlamaConfig, b: usize, t: usize, d: DType) -> Vec<Saved> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let n = b * t;
    vec![
        saved("layer input", n * h, d),
        saved("rotated queries", n * nh * hd, d),
        saved("rotated keys, values", 2 * n * nkv * hd, d),
        saved("attention probabilities", b * nh * t * t, d),
        saved("attention output", n * nh * hd, d),
        saved("residual after attention", n * h, d),
        saved("mlp gate, up", 2 * n * i, d),
    ]
}

/// What `model::backward` keeps besides the layers, for `b` rows of `t` tokens of which
/// `r` (in all) are response tokens, `responses` responses in all (`shared`: rows hold a
/// prompt and several responses, so the mask and RoPE tables are per row).
pub fn head_kept_tensors(
    cfg: &LlamaConfig,
    b: usize,
    t: usize,
    r: usize,
    responses: usize,
    shared: bool,
    d: DType,
) -> Vec<Saved> {
    let (h, v, half) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim / 2);
    let f = at_least_f32(d);
    let (mask, tables) = if shared { (b * t * t, b * t * half) } else { (t * t, t * half) };
    vec![
        saved("attention mask", mask, d),
        saved("rope cos, sin", 2 * tables, d),
        saved("last layer output", b * t * h, d),
        saved("response rows of the final norm", r * h, d),
        saved("logits", r * v, d),
        saved("per-token log-probs", r, f),
        saved("sums", responses, f),
    ]
}

fn total(items: &[Saved]) -> u64 {
    items.iter().map(|s| s.bytes).sum()
}

/// Predicts the peak bytes of one forward(+backward) of `mc` on a model of shape `cfg`.
pub fn predict_peak_bytes(cfg: &LlamaConfig, mc: &MemoryConfig) -> MemoryPlan {
    let p = param_count(cfg);
    let wd = mc.weight_dtype;
    let wb = wd.size_in_bytes() as u64;
    let f32b = 4u64;
    let (b, t) = (mc.micro_batch, mc.row_len);
    let r = (b * mc.response_len.min(t)) as u64;
    let (h, i, v, l) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.vocab_size as u64,
        cfg.num_hidden_layers as u64,
    );
    let (nh, qd, kvd) = (
        cfg.num_attention_heads as u64,
        (cfg.num_attention_heads * cfg.head_dim) as u64,
        (cfg.num_key_value_heads * cfg.head_dim) as u64,
    );
    let n = (b * t) as u64;
    let scores = b as u64 * nh * (t * t) as u64;

    let layer = total(&layer_kept_tensors(cfg, b, t, wd));
    let head = total(&head_kept_tensors(cfg, b, t, r as usize, 2 * b, true, wd));
    // Adapters beside the base, in f32 on a narrower base (`lora::adapter_dtype`).
    let adapter_bytes = lora::adapter_dtype(wd).size_in_bytes() as u64;
    let weights = p * wb + mc.adapters.map_or(0, |a| a.params) * adapter_bytes;
    let mut plan = MemoryPlan { weights, ..MemoryPlan::default() };
    match mc.role {
        Role::Reference => {
            // No backward: one layer's tensors (plus its raw scores) at a time.
            plan.activations = layer + scores * wb;
            plan.logits = head - n * h * wb;
        }
        Role::Policy => {
            // What trains: every weight, or (LoRA) the adapters alone, the base frozen.
            let (trained, largest) = match mc.adapters {
                Some(a) => (a.params, a.largest),
                None => (p, v * h),
            };
            let frozen_base = mc.adapters.is_some();
            plan.grads = trained * mc.grad_dtype.size_in_bytes() as u64;
            plan.optimizer_state = trained * mc.optim_state_dtype.size_in_bytes() as u64;
            plan.activations = if mc.checkpointing { l * n * h * wb } else { l * layer };
            plan.logits = head;
            let logits = r * v * wb;
            // 1. The logits' gradient, formed in f32 beside the logits (from an f32 copy of
            //    them, and then cast back, when the weights are narrower): on a CPU by one
            //    fused kernel; elsewhere by candle ops, which hold the softmax, the one-hot
            //    targets and their difference as well (counted from the ops, not measured).
            let narrow = if wb < f32b { 1 } else { 0 };
            let composite = if mc.cpu { 0 } else { 3 };
            let head_grad = r * v * f32b * (1 + narrow + composite);
            // 2. The logits freed (their gradient, cast, takes their place): the head's
            //    weight gradient, beside the CPU matrix kernel's buffers while it is formed
            //    ([`gemm_buffers`]), then beside its copy in the sums' dtype when that
            //    differs (a bf16 sum is added into a chunk at a time instead).
            //    On a CPU with f32 weights and sums the matrix kernel adds each weight
            //    gradient straight into its sum (`grad_ops::accumulate_matmul`): no
            //    weight-sized temporary, only the kernel's buffers.
            let gd = mc.grad_dtype;
            let added_by_kernel = mc.cpu && wd == DType::F32 && gd == DType::F32;
            //    A frozen base forms no weight gradient at all (an adapter's is rank-sized).
            let weight_grad = |bytes: u64| if added_by_kernel || frozen_base { 0 } else { bytes };
            let cast = if gd != wd && gd != DType::BF16 { gd.size_in_bytes() as u64 } else { 0 };
            let kernel = if mc.cpu { gemm_buffers(r, v, h, wd) } else { 0 };
            let head_weight = match frozen_base {
                true => 0,
                false => weight_grad(v * h * wb) + kernel.max(v * h * cast),
            };
            // 3. One layer at a time, the logits gone but the gradients of the final norm's
            //    input and output and of the head's hidden states still held: with
            //    checkpointing the layer's activations recomputed; then its MLP's d m and
            //    d gate/up, or d gate/up beside the normed input and a weight gradient; or
            //    its attention's d probs and d scores beside d attn (as computed and
            //    head-major), d v and the d residual pair.
            let carried = (2 * n * h + r * h) * wb;
            let recomputed = if mc.checkpointing { layer - n * h * wb } else { 0 };
            let mlp_bwd = (3 * n * i * wb).max((2 * n * i + n * h) * wb + weight_grad(i * h * wb));
            let attn_bwd = (2 * scores + 2 * n * qd + n * kvd + 2 * n * h) * wb;
            let layer_phase = (carried + recomputed + attn_bwd.max(mlp_bwd)).saturating_sub(logits);
            plan.workspace = head_grad.max(head_weight).max(layer_phase);
            // RMSprop on the largest parameter: a few f32 temporaries of its size, or in
            // place (then only the gradient norm's square of it).
            let temporaries = if mc.in_place_optimizer { 1 } else { 6 };
            plan.optimizer_step = temporaries * largest * f32b;
        }
    }
    plan.total = plan.weights
        + plan.grads
        + plan.optimizer_state
        + (plan.activations + plan.logits + plan.workspace).max(plan.optimizer_step);
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

/// Makes every thread allocate from one glibc arena (`M_ARENA_MAX` = 1; elsewhere
/// nothing). Call it first thing in `main`, before any thread starts.
///
/// Why: a model pass runs on whichever rayon worker picks it up (`ops::on_compute_pool`),
/// and glibc gives each allocating thread an arena of its own. Each arena keeps the freed
/// activations of the passes that ran on it for reuse, so with one arena per worker the
/// retained memory grows with the number of workers (docs/performance.md has the trainer's
/// figures). The allocations are few and large (one per tensor), so threads hardly ever
/// wait on the shared arena's lock, and the CPU time stays the same.
pub fn use_one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator setting; M_ARENA_MAX is always valid.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands the allocator's free memory back to the operating system (glibc: `malloc_trim`,
/// every arena; elsewhere nothing). glibc keeps the heap memory of freed tensors resident
/// for reuse: after a backward pass that is a few hundred MB of freed activations, which
/// stays in the resident set under whatever is touched next. The trainer calls this once
/// per optimizer step, before the step first writes its state.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel; it takes the allocator's
    // locks like any other allocator call.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Current resident set size (`VmRSS`), in bytes (Linux only).
pub fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    proc_field_kib(&text, "VmRSS:").map(|k| k * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{llama31_8b_config as llama_8b, tiny_config, TinySpec};

    #[test]
    fn eight_b_counts_and_fits_only_with_bf16_and_checkpointing() {
        let cfg = llama_8b();
        assert_eq!(param_count(&cfg), 8_030_261_248);
        // Four pairs of 2048-token rows (prompt + chosen + rejected) per micro-batch.
        let run = |ckpt: bool, state: DType, grad: DType| MemoryConfig {
            optim_state_dtype: state,
            grad_dtype: grad,
            ..MemoryConfig::policy(&Device::Cpu, DType::BF16, 4, 2048, ckpt)
        };
        let eighty = 80u64 << 30;
        let lean = predict_peak_bytes(&cfg, &run(true, DType::BF16, DType::BF16));
        assert!(check_fits(&lean, eighty).is_ok(), "{lean}");
        let no_ckpt = predict_peak_bytes(&cfg, &run(false, DType::BF16, DType::BF16));
        let err = check_fits(&no_ckpt, eighty).unwrap_err().to_string();
        assert!(err.contains("--grad-checkpointing") && err.contains("80.00 GiB"), "{err}");
        // f32 accumulator and f32 RMSprop state: +32 GB, over the card.
        let fat = predict_peak_bytes(&cfg, &run(true, DType::F32, DType::F32));
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
