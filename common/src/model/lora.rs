//! LoRA: low-rank adapters on a frozen base model, in PEFT's conventions so that an adapter
//! trained here loads with `peft.PeftModel.from_pretrained(base, dir)` and back.
//!
//! A targeted projection `y = x·Wᵀ` becomes `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with `A` `[r, in]`,
//! `B` `[out, r]` and `s = alpha / r`. PEFT initialises `A` Kaiming-uniform with
//! `a = √5`, i.e. `U(-1/√in, 1/√in)`, and `B` zero, so an untrained adapter leaves the
//! model exactly the base: a DPO run starts with the policy equal to its reference.
//!
//! Only the adapters train: they are the model's variables ([`LoraAdapters::vars`]), the
//! hand-written backward (`model::backward`) forms weight gradients for them alone, and the
//! base's weights get none. Checkpoints hold the adapters in PEFT's format
//! ([`save_peft`], [`load_peft`]): `adapter_config.json` and `adapter_model.safetensors`
//! with tensors named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`.
//!
//! Adapters are kept in f32 on any base narrower than f32 ([`adapter_dtype`]), as PEFT
//! does by default (`autocast_adapter_dtype`): an RMSprop step at DPO's learning rates
//! moves an entry of `A` by a few parts in 10⁴ of its size, well under bf16's spacing, so
//! bf16 adapters would train only through rounding noise. The adapter path casts its input
//! to f32 and its output back to the base's dtype; the memory is the adapters' alone.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use serde_json::{json, Value};

use super::at_least_f32;
use super::config::LlamaConfig;
use super::save::{atomic_dir_write, write_file};
use crate::data::SplitMix64;
use crate::error::{Error, Result};

/// Elements of a dropout mask drawn from one random stream.
const MASK_CHUNK: usize = 1 << 14;

/// PEFT's name for the adapter's configuration file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's name for the adapter's weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Beside PEFT's files, the base an adapter was trained on: its path and fingerprint
/// (`crate::fingerprint`), so that loading the adapter onto another base of the same shapes
/// (say the base model where it was trained on the instruct one) is refused, not silently
/// merged. PEFT ignores the file.
pub const ADAPTER_BASE: &str = "adapter_base.json";

/// A projection of a decoder layer that can carry an adapter, named as PEFT's
/// `target_modules` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// Every target, in the order adapters are stored and differentiated.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module's name in `target_modules` (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub fn module(self) -> String {
        let block = match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
            LoraTarget::Gate | LoraTarget::Up | LoraTarget::Down => "mlp",
        };
        format!("{block}.{}", self.name())
    }

    /// The base weight's Hugging Face name in layer `layer`.
    pub fn base_weight(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.weight", self.module())
    }

    /// PEFT's names of the adapter's `A` and `B` in layer `layer`.
    pub fn adapter_names(self, layer: usize) -> (String, String) {
        let p = format!("base_model.model.model.layers.{layer}.{}", self.module());
        (format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight"))
    }

    /// `(out, in)` of the projection's weight for `cfg`.
    pub fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        match self {
            LoraTarget::Q => (cfg.num_attention_heads * d, h),
            LoraTarget::K | LoraTarget::V => (cfg.num_key_value_heads * d, h),
            LoraTarget::O => (h, cfg.num_attention_heads * d),
            LoraTarget::Gate | LoraTarget::Up => (i, h),
            LoraTarget::Down => (h, i),
        }
    }

    /// Parses a PEFT module name (`q_proj`; `q` is accepted too).
    pub fn parse(s: &str) -> Option<LoraTarget> {
        let s = s.trim();
        LoraTarget::ALL
            .into_iter()
            .find(|t| t.name() == s || t.name().strip_suffix("_proj") == Some(s))
    }

    /// Every valid name, for error messages.
    pub fn valid_names() -> String {
        LoraTarget::ALL.map(LoraTarget::name).join(", ")
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a comma-separated target list (`q_proj,v_proj`); `all` means every projection.
/// Duplicates collapse; the result is in [`LoraTarget::ALL`] order.
pub fn parse_targets(list: &str) -> Result<Vec<LoraTarget>> {
    if list.trim() == "all" {
        return Ok(LoraTarget::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in list.split(',').filter(|s| !s.trim().is_empty()) {
        let t = LoraTarget::parse(name).ok_or_else(|| {
            Error::Input(format!(
                "unknown LoRA target `{}` (valid: {}, or all)",
                name.trim(),
                LoraTarget::valid_names()
            ))
        })?;
        out.push(t);
    }
    if out.is_empty() {
        return Err(Error::Input(format!(
            "no LoRA targets given (valid: {}, or all)",
            LoraTarget::valid_names()
        )));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The adapters' hyper-parameters (PEFT's `LoraConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`: the adapters' rank.
    pub rank: usize,
    /// `lora_alpha`: the adapter's output is scaled by `alpha / rank`.
    pub alpha: f64,
    /// `lora_dropout`: dropout on the adapter path's input during training passes (those
    /// made with [`LoraAdapters::with_dropout`]); inference never drops.
    pub dropout: f64,
    /// The projections that carry adapters, in [`LoraTarget::ALL`] order.
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// `alpha / rank`, what the adapter's output is multiplied by.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks the configuration against the model it adapts: a rank of at least 1 and no
    /// larger than any targeted projection's smaller dimension, a finite alpha, a dropout
    /// this implementation supports, at least one target.
    pub fn validate(&self, cfg: &LlamaConfig) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Input("a LoRA rank of 0 means no adapters".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::Input(format!("LoRA alpha must be positive, not {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Input(format!(
                "LoRA dropout must be in [0, 1), not {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Input("no LoRA targets".into()));
        }
        for t in &self.targets {
            let (out, inp) = t.shape(cfg);
            if self.rank > out.min(inp) {
                return Err(Error::Input(format!(
                    "LoRA rank {} is larger than {t}'s dimensions ({out} × {inp}): at most {}",
                    self.rank,
                    out.min(inp)
                )));
            }
        }
        Ok(())
    }
}

/// The dtype adapters are kept in on a base model of `model_dtype`: f64 on an f64 model,
/// f32 otherwise (see the module doc).
pub fn adapter_dtype(model_dtype: DType) -> DType {
    at_least_f32(model_dtype)
}

/// One projection's adapter: `A` `[r, in]`, `B` `[out, r]` and the scale `alpha / r`.
#[derive(Clone)]
pub(crate) struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Training dropout on the adapter's input: the drop probability and the seed of this
    /// adapter's mask in the current pass (see [`LoraAdapters::with_dropout`]).
    pub dropout: Option<(f64, u64)>,
}

impl LoraAdapter {
    /// `s·(drop(x)·Aᵀ)·Bᵀ` for `x` `[N, in]`: `[N, out]`, in `x`'s dtype (computed in the
    /// adapter's). The rank-r product goes first, so the cost is `r·(in + out)` per row,
    /// never `in·out`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let xa = self.input(x)?;
        let xa = match self.dropout_mask(&xa)? {
            Some(mask) => (xa * mask)?,
            None => xa,
        };
        let u = xa.matmul(&self.a.t()?)?;
        Ok(u.matmul(&self.b.t()?)?.affine(self.scale, 0.0)?.to_dtype(x.dtype())?)
    }

    /// `t` in the adapter's dtype, as the adapter path computes with it (a no-op when the
    /// base's dtype is the adapter's).
    pub fn input(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(self.a.dtype())?)
    }

    /// The dropout mask for an input shaped like `x` (`[N, in]`): each element `1/(1-p)`
    /// (kept) or 0 (dropped), as `torch.nn.Dropout` scales; `None` without dropout. A pure
    /// function of the adapter's seed and the shape, so that the backward (and a
    /// checkpointed layer's recomputation) draws the mask its forward used.
    pub fn dropout_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((p, seed)) = self.dropout else { return Ok(None) };
        let keep = (1.0 / (1.0 - p)) as f32;
        let threshold = (p * (1u64 << 53) as f64) as u64;
        let mut mask = vec![0f32; x.elem_count()];
        // Chunks with streams of their own: drawn in parallel, the same masks on any number
        // of threads (a pass draws millions of these).
        mask.par_chunks_mut(MASK_CHUNK).enumerate().for_each(|(c, chunk)| {
            let mut rng = SplitMix64::new(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for m in chunk {
                *m = if rng.next_u64() >> 11 < threshold { 0.0 } else { keep };
            }
        });
        let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?;
        Ok(Some(mask.to_dtype(x.dtype())?.to_device(x.device())?))
    }

    /// `s·B·A` `[out, in]`, the adapter as a weight delta (for merging), in `dtype`.
    fn delta(&self, dtype: DType) -> Result<Tensor> {
        let (a, b) = (self.a.to_dtype(dtype)?, self.b.to_dtype(dtype)?);
        Ok(b.matmul(&a)?.affine(self.scale, 0.0)?)
    }
}

/// The adapters of every layer of a model: their configuration, the tensors, and (for
/// training) the variables those tensors are.
#[derive(Clone)]
pub struct LoraAdapters {
    config: LoraConfig,
    /// Per layer, one slot per [`LoraTarget::ALL`] entry.
    layers: Vec<[Option<LoraAdapter>; 7]>,
    /// The tensors as variables, in [`named_tensors`](Self::named_tensors) order; empty on
    /// a [`detached`](Self::detached) copy.
    vars: Vec<Var>,
}

impl LoraAdapters {
    /// Fresh adapters for a model of `cfg`, initialised as PEFT does (see the module doc)
    /// from `seed`: each adapter's `A` draws from its own stream (of the seed, the layer and
    /// the target), so the initialisation of one does not depend on which others exist.
    /// Stored in [`adapter_dtype`]`(model_dtype)`.
    pub fn init(
        cfg: &LlamaConfig,
        config: LoraConfig,
        seed: u64,
        model_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate(cfg)?;
        let mut weights = HashMap::new();
        for layer in 0..cfg.num_hidden_layers {
            for &t in &config.targets {
                let (out, inp) = t.shape(cfg);
                let slot = LoraTarget::ALL.iter().position(|&x| x == t).expect("a target") as u64;
                let mut rng = SplitMix64::new(seed ^ 0x4C6F_5241_0000_0000);
                let mut rng = SplitMix64::new(
                    rng.next_u64()
                        ^ ((layer as u64) << 8 | slot).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..config.rank * inp)
                    .map(|_| {
                        // 53 random bits: uniform in [0, 1).
                        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                        ((2.0 * u - 1.0) * bound) as f32
                    })
                    .collect();
                let (na, nb) = t.adapter_names(layer);
                weights.insert(na, Tensor::from_vec(a, (config.rank, inp), &Device::Cpu)?);
                weights.insert(nb, Tensor::zeros((out, config.rank), DType::F32, &Device::Cpu)?);
            }
        }
        Self::from_tensors(cfg, config, weights, model_dtype, device)
    }

    /// Adapters from tensors under PEFT's names, checked against `cfg` and `config`: every
    /// adapter present with its shape, nothing else. Converted to the adapter dtype of a
    /// `model_dtype` base ([`adapter_dtype`]) on `device`, as trainable variables.
    pub fn from_tensors(
        cfg: &LlamaConfig,
        config: LoraConfig,
        mut weights: HashMap<String, Tensor>,
        model_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dtype = adapter_dtype(model_dtype);
        let scale = config.scale();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut vars = Vec::new();
        for layer in 0..cfg.num_hidden_layers {
            let mut slots: [Option<LoraAdapter>; 7] = Default::default();
            // In `ALL` order whatever the configuration's order: the variables' order must
            // be `named_tensors`'.
            for t in LoraTarget::ALL.into_iter().filter(|t| config.targets.contains(t)) {
                let (out, inp) = t.shape(cfg);
                let (na, nb) = t.adapter_names(layer);
                let mut take = |name: String, shape: [usize; 2]| -> Result<Tensor> {
                    let w = weights.remove(&name).ok_or_else(|| Error::Weight {
                        name: name.clone(),
                        message: "missing from the adapter".into(),
                    })?;
                    if w.dims() != shape {
                        return Err(Error::Weight {
                            name,
                            message: format!(
                                "shape {:?}, but the base model and the adapter's rank imply \
                                 {shape:?}",
                                w.dims()
                            ),
                        });
                    }
                    let var = Var::from_tensor(&w.to_device(device)?.to_dtype(dtype)?)?;
                    let t = var.as_tensor().clone();
                    vars.push(var);
                    Ok(t)
                };
                let a = take(na, [config.rank, inp])?;
                let b = take(nb, [out, config.rank])?;
                slots[slot(t)] = Some(LoraAdapter { a, b, scale, dropout: None });
            }
            layers.push(slots);
        }
        if let Some(name) = weights.keys().min() {
            return Err(Error::Weight {
                name: name.clone(),
                message: format!(
                    "not an adapter of this model with targets {} ({} unexpected tensors in all)",
                    config.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(","),
                    weights.len()
                ),
            });
        }
        Ok(LoraAdapters { config, layers, vars })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The trainable variables, in [`named_tensors`](Self::named_tensors) order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Every adapter tensor under its PEFT name: per layer, per target in
    /// [`LoraTarget::ALL`] order, `A` then `B`. This is the order of the gradient
    /// accumulators and of the optimizer's state.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (layer, slots) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                if let Some(ad) = &slots[slot(t)] {
                    let (na, nb) = t.adapter_names(layer);
                    out.push((na, ad.a.clone()));
                    out.push((nb, ad.b.clone()));
                }
            }
        }
        out
    }

    /// The adapter on `target` of layer `layer`, if there is one.
    pub(crate) fn get(&self, layer: usize, target: LoraTarget) -> Option<&LoraAdapter> {
        self.layers.get(layer).and_then(|s| s[slot(target)].as_ref())
    }

    /// The same tensors without the variables (shared storage: updates show through), so
    /// that no pass over them builds an autograd graph.
    pub fn detached(&self) -> LoraAdapters {
        let layers = self
            .layers
            .iter()
            .map(|slots| {
                slots.clone().map(|s| {
                    s.map(|ad| LoraAdapter {
                        a: ad.a.detach(),
                        b: ad.b.detach(),
                        scale: ad.scale,
                        dropout: ad.dropout,
                    })
                })
            })
            .collect();
        LoraAdapters { config: self.config.clone(), layers, vars: Vec::new() }
    }

    /// The same adapters (shared tensors and variables) with the configuration's dropout
    /// switched on for one training pass: every adapter's mask is drawn from `seed` (give
    /// each pass its own), its layer and its target. Without dropout in the configuration,
    /// the adapters as they are.
    pub fn with_dropout(&self, seed: u64) -> LoraAdapters {
        let p = self.config.dropout;
        let mut out = self.clone();
        if p == 0.0 {
            return out;
        }
        for (layer, slots) in out.layers.iter_mut().enumerate() {
            for (k, s) in slots.iter_mut().enumerate() {
                if let Some(ad) = s {
                    let stream = (layer as u64) << 8 | k as u64;
                    let mut mix =
                        SplitMix64::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
                    ad.dropout = Some((p, mix.next_u64()));
                }
            }
        }
        out
    }

    /// Checks that the adapters fit a model of `cfg` (layers and shapes).
    pub(crate) fn check_fits(&self, cfg: &LlamaConfig) -> Result<()> {
        if self.layers.len() != cfg.num_hidden_layers {
            return Err(Error::Input(format!(
                "adapters for {} layers on a model of {}",
                self.layers.len(),
                cfg.num_hidden_layers
            )));
        }
        for (layer, slots) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                if let Some(ad) = &slots[slot(t)] {
                    let (out, inp) = t.shape(cfg);
                    let r = self.config.rank;
                    if ad.a.dims() != [r, inp] || ad.b.dims() != [out, r] {
                        return Err(Error::Input(format!(
                            "the adapter on layer {layer}'s {t} ({:?} and {:?}) does not fit \
                             its {out} × {inp} weight",
                            ad.a.dims(),
                            ad.b.dims()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds every adapter into the base weights it adapts (`W + s·B·A`), computed in f32
    /// (f64 for f64 weights) and stored in each weight's dtype: the merged model computes what base + adapters do.
    pub fn merge_into(&self, weights: &mut [(String, Tensor)]) -> Result<()> {
        let index: HashMap<String, usize> =
            weights.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        for (layer, slots) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                let Some(ad) = &slots[slot(t)] else { continue };
                let name = t.base_weight(layer);
                let &i = index.get(&name).ok_or_else(|| Error::Weight {
                    name: name.clone(),
                    message: "the base model has no such weight to merge the adapter into".into(),
                })?;
                let w = &weights[i].1;
                // f32 at least: a bf16 sum would round the delta away where it is small.
                let dtype = at_least_f32(w.dtype());
                let merged = (w.to_dtype(dtype)? + ad.delta(dtype)?.to_device(w.device())?)?;
                weights[i].1 = merged.to_dtype(w.dtype())?;
            }
        }
        Ok(())
    }
}

fn slot(t: LoraTarget) -> usize {
    LoraTarget::ALL.iter().position(|&x| x == t).expect("every target has a slot")
}

/// PEFT's `adapter_config.json` for `config`, naming the base model as `base_model`.
pub fn peft_config_json(config: &LoraConfig, base_model: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// Reads a PEFT `adapter_config.json`: a LoRA adapter of the plain kind (no DoRA, no
/// rsLoRA, no per-layer ranks, no biases), whose hyper-parameters this implementation
/// reproduces exactly. Anything else is an error naming the file and the key.
pub fn read_peft_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let bad = |msg: String| Error::file(path, msg);
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(format!("peft_type is `{peft_type}`; only LORA adapters are supported")));
    }
    let rank = v.get("r").and_then(Value::as_u64).ok_or_else(|| bad("no integer `r`".into()))?;
    let alpha =
        v.get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| bad("no `lora_alpha`".into()))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let targets = match v.get("target_modules") {
        Some(Value::Array(names)) => {
            let names: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
            parse_targets(&names.join(",")).map_err(|e| bad(format!("target_modules: {e}")))?
        }
        Some(Value::String(s)) if s == "all-linear" => LoraTarget::ALL.to_vec(),
        other => return Err(bad(format!("target_modules {other:?} is not a list of names"))),
    };
    for (key, plain) in [
        ("use_dora", json!(false)),
        ("use_rslora", json!(false)),
        ("fan_in_fan_out", json!(false)),
        ("bias", json!("none")),
    ] {
        if let Some(value) = v.get(key).filter(|x| !x.is_null() && **x != plain) {
            return Err(bad(format!("{key} is {value}; only {plain} is supported")));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(bad(format!("{key} is set; per-module ranks are not supported")));
        }
    }
    if v.get("layers_to_transform").is_some_and(|x| !x.is_null()) {
        return Err(bad("layers_to_transform is set; adapters on every layer only".into()));
    }
    // Dropout does not change an adapter's inference: accept any here, and let training
    // validate it.
    Ok(LoraConfig { rank: rank as usize, alpha, dropout, targets })
}

/// Writes `adapters` as a PEFT adapter directory at `dir` (atomically replacing what was
/// there): `adapter_config.json` naming `base_model`, and `adapter_model.safetensors` in
/// the adapters' dtype. `write_extra` adds files inside the same atomic swap.
pub fn save_peft_with(
    adapters: &LoraAdapters,
    base_model: &str,
    dir: &Path,
    write_extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    atomic_dir_write(dir, |tmp| {
        let config = peft_config_json(&adapters.config, base_model);
        let bytes = serde_json::to_vec_pretty(&config)
            .map_err(|e| Error::Input(format!("serializing JSON: {e}")))?;
        write_file(&tmp.join(ADAPTER_CONFIG), &bytes)?;
        let tensors = adapters
            .named_tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.detach().to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        let path = tmp.join(ADAPTER_WEIGHTS);
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(tensors, metadata, &path)
            .map_err(|e| Error::file(&path, e))?;
        write_file_sync(&path)?;
        write_extra(tmp)
    })
}

/// [`save_peft_with`] without extra files.
pub fn save_peft(adapters: &LoraAdapters, base_model: &str, dir: &Path) -> Result<()> {
    save_peft_with(adapters, base_model, dir, |_| Ok(()))
}

/// Writes [`ADAPTER_BASE`] into `dir`: the adapter was trained on `base_model`, whose
/// fingerprint is `fingerprint`.
pub fn write_adapter_base(dir: &Path, base_model: &str, fingerprint: &str) -> Result<()> {
    let record = json!({ "base_model_name_or_path": base_model, "base_fingerprint": fingerprint });
    let bytes = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::Input(format!("serializing JSON: {e}")))?;
    write_file(&dir.join(ADAPTER_BASE), &bytes)
}

/// Checks that the adapter in `dir` was trained on `model` (whose fingerprint is
/// `fingerprint`), as far as `dir` says: an adapter without [`ADAPTER_BASE`] (one PEFT
/// wrote) records no base, and only its shapes can be checked ([`load_peft`]).
pub fn check_adapter_base(dir: &Path, model: &Path, fingerprint: &str) -> Result<()> {
    let path = dir.join(ADAPTER_BASE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::file(&path, e)),
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let recorded = v
        .get("base_fingerprint")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::file(&path, "no `base_fingerprint`"))?;
    if recorded != fingerprint {
        let trained_on = v.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("?");
        return Err(Error::file(
            &path,
            format!(
                "the adapter was trained on {trained_on} ({recorded}), not on {} ({fingerprint}); \
                 load it on the base it was trained on (if the two are the same model in \
                 another format, remove this file to load it anyway)",
                model.display()
            ),
        ));
    }
    Ok(())
}

fn write_file_sync(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::file(path, e))
}

/// The base model a PEFT adapter directory names (`base_model_name_or_path`), if it names
/// one.
pub fn base_model_of(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string)
}

/// True if `dir` holds a PEFT adapter (its `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// Reads a PEFT adapter directory for a base model of `cfg`: its configuration and its
/// tensors, as trainable variables on `device` in the adapter dtype of a `model_dtype` base
/// ([`adapter_dtype`]). A shape that does not fit the base (another model) is an error
/// naming the tensor and the file.
pub fn load_peft(
    dir: &Path,
    cfg: &LlamaConfig,
    model_dtype: DType,
    device: &Device,
) -> Result<LoraAdapters> {
    let config_path = dir.join(ADAPTER_CONFIG);
    if !config_path.is_file() {
        return Err(Error::file(dir, format!("not a PEFT adapter directory: no {ADAPTER_CONFIG}")));
    }
    let config = read_peft_config(&config_path)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let weights = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::file(&path, format!("not a readable safetensors file: {e}")))?;
    // PEFT checkpoints written with an adapter name keep it in the tensor names.
    let weights = weights
        .into_iter()
        .map(|(n, t)| {
            (n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."), t)
        })
        .collect();
    for t in &config.targets {
        let (out, inp) = t.shape(cfg);
        if config.rank > out.min(inp) {
            return Err(Error::file(
                &config_path,
                format!("rank {} is larger than {t}'s dimensions ({out} × {inp})", config.rank),
            ));
        }
    }
    LoraAdapters::from_tensors(cfg, config, weights, model_dtype, device)
        .map_err(|e| Error::file(&path, format!("{e} (is the adapter for another base model?)")))
}
