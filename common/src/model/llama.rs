//! The Llama decoder, one forward pass for both uses: `Mode::Frozen` (the reference model:
//! plain tensors, so candle records no gradient graph) and `Mode::Trainable` (the policy:
//! every weight is a `Var` and every op has a backward, see `ops`). The same code runs in
//! both modes, so the two give bit-identical numbers.
//!
//! Batches are right-padded: with a causal mask, real tokens never attend to the pads that
//! follow them, so no padding mask is needed and pad positions are simply never read. A
//! [`TokenLayout`] generalises this: a row may hold a prompt followed by several responses
//! (chosen and rejected), each attending to the prompt and to itself only, each positioned
//! right after the prompt, so a shared prompt goes through the model once.

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};

use super::config::LlamaConfig;
use super::lora::{LoraAdapter, LoraAdapters, LoraTarget};
use super::ops;
use super::packed::Weight;
use crate::error::{Error, Result};

/// Whether the weights take part in autograd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reference model: no gradient graph is ever kept (lowest memory).
    Frozen,
    /// Policy model: every weight is a candle `Var`.
    Trainable,
}

#[derive(Clone)]
struct Layer {
    input_norm: Tensor,
    q: Weight,
    k: Weight,
    v: Weight,
    o: Weight,
    post_norm: Tensor,
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// Cloning shares the weights (tensors are reference-counted).
#[derive(Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Weight,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The output projection; the same tensor as `embed` when embeddings are tied.
    lm_head: Weight,
    /// Every parameter under its Hugging Face name, in a fixed order (embeddings, layers,
    /// norm, head). The order is what checkpoints, fingerprints and optimizers rely on.
    /// Set at construction; a model packed for inference drops it (the packed weights are
    /// the only copy) and unpacks it again if asked.
    params: OnceLock<Vec<(String, Tensor)>>,
    /// Low-rank adapters on top of the (then frozen) weights; see `model::lora`.
    lora: Option<LoraAdapters>,
    /// The trainable variables: the weights' in `Mode::Trainable`, the adapters' when the
    /// model carries some, none otherwise.
    vars: Vec<Var>,
    mode: Mode,
    device: Device,
    dtype: DType,
}

/// What every layer of one forward pass shares: the batch shape, the RoPE tables and the
/// attention mask (see [`Llama::embed_tokens`]).
pub struct LayerContext {
    pub b: usize,
    pub t: usize,
    /// [T, head_dim/2] (positions 0..T in every row) or [B*T, head_dim/2] (per token).
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Additive, 0 = attend, -inf = not: [T, T] (causal) or [B, T, P + T] (per row, the
    /// first P columns the prefix's).
    pub(crate) mask: Tensor,
    /// Keys and values every row attends to before its own tokens.
    pub(crate) prefix: Option<PrefixKv>,
}

/// The rotated keys and values of a token prefix at every layer, computed once (see
/// [`Llama::prefix_kv`]) and attended to by every row of later passes, so that a prefix
/// many sequences share (a prompt template's preamble) is not recomputed for each. With
/// causal attention a prefix's keys and values do not depend on what follows it, so the
/// result is that of the full sequences up to float rounding. Valid only for the weights
/// it was computed with.
#[derive(Clone)]
pub struct PrefixKv {
    ids: Vec<u32>,
    /// Per layer, keys and values [1, kv_heads, P, head_dim].
    layers: Vec<(Tensor, Tensor)>,
}

impl PrefixKv {
    /// The prefix's token ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The first `len` tokens of the prefix: exact, since no position depends on later ones.
    pub fn truncated(&self, len: usize) -> Result<PrefixKv> {
        if len > self.len() {
            return Err(Error::Input(format!(
                "cannot extend a prefix of {} tokens to {len} by truncation",
                self.len()
            )));
        }
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)))
            .collect::<Result<_>>()?;
        Ok(PrefixKv { ids: self.ids[..len].to_vec(), layers })
    }
}

/// Where each token of a `[B, T]` batch sits and what it may attend to, when rows are not
/// simply one sequence each. Both vectors have one entry per token, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLayout {
    /// The token's RoPE position.
    pub positions: Vec<u32>,
    /// 0 for a shared prefix (the prompt), k ≥ 1 for the k-th continuation of it. A token
    /// attends to the earlier tokens of its row that are in the prefix or in its own branch.
    pub branches: Vec<u32>,
}

impl TokenLayout {
    /// The additive mask [B, T, P + T] this layout implies after a prefix of `p` tokens that
    /// every token sees.
    fn mask(&self, b: usize, t: usize, p: usize) -> Vec<f32> {
        let s = p + t;
        let mut m = vec![f32::NEG_INFINITY; b * t * s];
        for r in 0..b {
            let br = &self.branches[r * t..(r + 1) * t];
            for i in 0..t {
                let row = &mut m[(r * t + i) * s..(r * t + i + 1) * s];
                row[..p].fill(0.0);
                for j in 0..=i {
                    if br[j] == 0 || br[j] == br[i] {
                        row[p + j] = 0.0;
                    }
                }
            }
        }
        m
    }
}

/// What a layer's forward keeps for its backward (`model::backward`). The norms' outputs
/// and the MLP activation are cheap to recompute and are not kept.
pub(crate) struct LayerActivations {
    /// The layer's input, [B*T, H].
    pub x: Tensor,
    /// Rotated queries [B, kv_heads, rep*T, d]; the keys and values attended to, a
    /// prefix's (P ≥ 0 positions) then the rows' own: [B, kv_heads, P + T, d].
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Attention probabilities [B, kv_heads, rep*T, P + T].
    pub probs: Tensor,
    /// Attention output before the output projection, [B*T, heads*d].
    pub attn: Tensor,
    /// The residual stream after attention, [B*T, H].
    pub x2: Tensor,
    /// MLP gate and up projections, [B*T, intermediate].
    pub gate: Tensor,
    pub up: Tensor,
}

/// A layer's weights, for the backward: (input norm, q, k, v, o, post norm, gate, up, down).
pub(crate) struct LayerWeights<'a> {
    pub input_norm: &'a Tensor,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub o: &'a Tensor,
    pub post_norm: &'a Tensor,
    pub gate: &'a Tensor,
    pub up: &'a Tensor,
    pub down: &'a Tensor,
}

/// The Hugging Face names and shapes every Llama checkpoint of `cfg` must hold.
pub fn expected_params(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![nh * d, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![nkv * d, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![nkv * d, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, nh * d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Tensors that checkpoints sometimes carry but that are derived, not learned.
fn is_ignorable(name: &str, cfg: &LlamaConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// Tensors under their Hugging Face names.
type NamedParams = Vec<(String, Tensor)>;

/// Takes every parameter `cfg` implies out of `weights` (under Hugging Face names), checked
/// against its expected shape and converted to `dtype` on `device`, in the order of
/// [`expected_params`]; trainable ones become `Var`s (returned too). A missing tensor, a
/// wrong shape or a tensor the architecture does not use (a different model) is an error.
fn take_params(
    cfg: &LlamaConfig,
    mut weights: HashMap<String, Tensor>,
    mode: Mode,
    dtype: DType,
    device: &Device,
) -> Result<(NamedParams, Vec<Var>)> {
    let mut params = Vec::new();
    let mut vars = Vec::new();
    for (name, shape) in expected_params(cfg) {
        let t = weights.remove(&name).ok_or_else(|| Error::Weight {
            name: name.clone(),
            message: "missing from the checkpoint".into(),
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::Weight {
                name,
                message: format!(
                    "shape {:?} does not match the config, which implies {shape:?}",
                    t.dims()
                ),
            });
        }
        let t = t.to_device(device)?.to_dtype(dtype)?;
        let t = match mode {
            Mode::Frozen => t,
            Mode::Trainable => {
                let var = Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                vars.push(var);
                t
            }
        };
        params.push((name, t));
    }
    let mut unknown: Vec<_> = weights.keys().filter(|n| !is_ignorable(n, cfg)).collect();
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::Weight {
            name: unknown[0].clone(),
            message: format!(
                "not part of a Llama model with this config ({} unexpected tensors in all)",
                unknown.len()
            ),
        });
    }
    Ok((params, vars))
}

impl Llama {
    /// Builds the model from weights under Hugging Face names, converting each to `dtype`
    /// on `device`. Every expected tensor must be present with the expected shape; a tensor
    /// the architecture does not use is an error too (it means a different model).
    pub fn from_weights(
        cfg: LlamaConfig,
        weights: HashMap<String, Tensor>,
        mode: Mode,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let (params, vars) = take_params(&cfg, weights, mode, dtype, device)?;
        let by_name: HashMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let get = |n: &str| by_name[n].clone();
        let dense = |n: &str| Weight::Dense(get(n));
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Layer {
                    input_norm: get(&format!("{p}.input_layernorm.weight")),
                    q: dense(&format!("{p}.self_attn.q_proj.weight")),
                    k: dense(&format!("{p}.self_attn.k_proj.weight")),
                    v: dense(&format!("{p}.self_attn.v_proj.weight")),
                    o: dense(&format!("{p}.self_attn.o_proj.weight")),
                    post_norm: get(&format!("{p}.post_attention_layernorm.weight")),
                    gate: dense(&format!("{p}.mlp.gate_proj.weight")),
                    up: dense(&format!("{p}.mlp.up_proj.weight")),
                    down: dense(&format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        let embed = dense("model.embed_tokens.weight");
        let lm_head = if cfg.tie_word_embeddings { embed.clone() } else { dense("lm_head.weight") };
        let norm = get("model.norm.weight");
        Ok(Llama {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            params: OnceLock::from(params),
            lora: None,
            vars,
            mode,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Every parameter under its Hugging Face name, in the canonical order. On a model
    /// packed for inference the first call unpacks a copy of the weights.
    pub fn params(&self) -> &[(String, Tensor)] {
        self.params.get_or_init(|| self.unpacked_params().expect("packed weights unpack"))
    }

    /// The parameters rebuilt from the layers, in the order of [`expected_params`].
    fn unpacked_params(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = vec![self.embed.to_dense()?];
        for l in &self.layers {
            tensors.push(l.input_norm.clone());
            for w in [&l.q, &l.k, &l.v, &l.o] {
                tensors.push(w.to_dense()?);
            }
            tensors.push(l.post_norm.clone());
            for w in [&l.gate, &l.up, &l.down] {
                tensors.push(w.to_dense()?);
            }
        }
        tensors.push(self.norm.clone());
        if !self.cfg.tie_word_embeddings {
            tensors.push(self.lm_head.to_dense()?);
        }
        let names = expected_params(&self.cfg).into_iter().map(|(n, _)| n);
        Ok(names.zip(tensors).collect())
    }

    /// Lays the projection and embedding weights of a frozen CPU f32 model out once for the
    /// CPU matmul kernel (see `model::packed`), so that no pass repacks them (the gain is
    /// largest on lone short sequences). The packed weights replace the dense ones
    /// (no extra memory); [`params`](Self::params) unpacks a copy if called afterwards, so
    /// compute what needs them (the fingerprint) first. Returns whether anything was packed: a
    /// trainable model, another device or dtype stays as it is.
    pub fn pack_for_inference(&mut self) -> Result<bool> {
        if self.mode != Mode::Frozen || !self.device.is_cpu() || self.dtype != DType::F32 {
            return Ok(false);
        }
        // Drop the parameter list first: it holds the dense tensors too.
        self.params = OnceLock::new();
        for l in &mut self.layers {
            for w in [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down] {
                *w = w.packed()?;
            }
        }
        self.embed = self.embed.packed()?;
        self.lm_head = if self.cfg.tie_word_embeddings {
            self.embed.clone()
        } else {
            self.lm_head.packed()?
        };
        Ok(true)
    }

    /// The trainable variables, in the order of
    /// [`trainable_params`](Self::trainable_params): every weight in `Mode::Trainable`, the
    /// adapters' tensors on a model with LoRA adapters, none otherwise.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The parameters that train, under their names: the adapters' (PEFT names) on a model
    /// with LoRA adapters, every weight otherwise. Gradient accumulators and optimizer
    /// state follow this order.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        match &self.lora {
            Some(lora) => lora.named_tensors(),
            None => self.params().to_vec(),
        }
    }

    /// Puts LoRA adapters on this frozen model: they become its only variables (see
    /// `model::lora`). The base keeps its weights as they are, packed or not.
    pub fn with_lora(mut self, adapters: LoraAdapters) -> Result<Llama> {
        if self.mode != Mode::Frozen {
            return Err(Error::Input(
                "LoRA adapters go on a frozen base model (load it with Mode::Frozen)".into(),
            ));
        }
        adapters.check_fits(&self.cfg)?;
        self.vars = adapters.vars().to_vec();
        self.lora = Some(adapters);
        Ok(self)
    }

    /// The model without its LoRA adapters (the same weights, shared): the frozen base.
    /// A model without adapters is returned as it is.
    pub fn without_lora(&self) -> Llama {
        let mut base = self.clone();
        if base.lora.take().is_some() {
            base.vars = Vec::new();
        }
        base
    }

    /// The same model (shared weights and variables) with its LoRA adapters' dropout
    /// switched on for one training pass, the masks drawn from `seed`
    /// ([`LoraAdapters::with_dropout`]). A model without adapters, or without dropout, is
    /// returned as it is.
    pub fn with_lora_dropout(&self, seed: u64) -> Llama {
        let mut m = self.clone();
        if let Some(lora) = &self.lora {
            m.lora = Some(lora.with_dropout(seed));
        }
        m
    }

    /// The model's LoRA adapters, if it has some.
    pub fn lora(&self) -> Option<&LoraAdapters> {
        self.lora.as_ref()
    }

    /// The base model with the adapters added into its weights (`W + s·B·A`), as a frozen
    /// model without adapters: what `--save-merged` writes. A model without adapters is
    /// returned as it is.
    pub fn merged(&self) -> Result<Llama> {
        let Some(lora) = &self.lora else { return Ok(self.clone()) };
        let mut weights: Vec<(String, Tensor)> =
            self.params().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        lora.merge_into(&mut weights)?;
        let weights = weights.into_iter().collect();
        Llama::from_weights(self.cfg.clone(), weights, Mode::Frozen, self.dtype, &self.device)
    }

    /// The same weights (shared storage: updates to the variables show through) as a frozen
    /// model: no autograd graph is built on it, and the fused inference kernels apply.
    pub fn frozen_view(&self) -> Result<Llama> {
        if self.mode == Mode::Frozen {
            let mut view = self.clone();
            if let Some(lora) = &self.lora {
                view.lora = Some(lora.detached());
                view.vars = Vec::new();
            }
            return Ok(view);
        }
        let weights = self.params().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        Llama::from_weights(self.cfg.clone(), weights, Mode::Frozen, self.dtype, &self.device)
    }

    /// The adapter on `target` of layer `layer`, if the model has one there.
    pub(crate) fn adapter(&self, layer: usize, target: LoraTarget) -> Option<&LoraAdapter> {
        self.lora.as_ref().and_then(|l| l.get(layer, target))
    }

    /// Layer `layer`'s projection `target` (base weight `w`) on `x`: `x·Wᵀ`, plus the
    /// adapter's output where there is one.
    fn project(&self, layer: usize, target: LoraTarget, w: &Weight, x: &Tensor) -> Result<Tensor> {
        let y = w.apply(x)?;
        match self.adapter(layer, target) {
            Some(ad) => Ok((y + ad.apply(x)?)?),
            None => Ok(y),
        }
    }

    /// Layer `i`'s weights as tensors, for the backward (an error on a packed model).
    pub(crate) fn layer_weights(&self, i: usize) -> Result<LayerWeights<'_>> {
        let l = &self.layers[i];
        Ok(LayerWeights {
            input_norm: &l.input_norm,
            q: l.q.dense()?,
            k: l.k.dense()?,
            v: l.v.dense()?,
            o: l.o.dense()?,
            post_norm: &l.post_norm,
            gate: l.gate.dense()?,
            up: l.up.dense()?,
            down: l.down.dense()?,
        })
    }

    pub(crate) fn norm_weight(&self) -> &Tensor {
        &self.norm
    }

    pub(crate) fn lm_head(&self) -> Result<&Tensor> {
        self.lm_head.dense()
    }

    /// RoPE tables for positions `0..t`: cos and sin of shape [t, head_dim/2], f32.
    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let inv_freq = self.cfg.rope_inv_freq();
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for f in &inv_freq {
                // Angles in f32 exactly as transformers computes them (inv_freq is f32 there).
                let a = p as f32 * (*f as f32);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// The final-norm hidden states for token ids `[B, T]` (u32): `[B, T, hidden]`.
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden_states_with_layout(ids, None)
    }

    /// [`hidden_states`](Self::hidden_states) for any [`TokenLayout`].
    pub fn hidden_states_with_layout(
        &self,
        ids: &Tensor,
        layout: Option<&TokenLayout>,
    ) -> Result<Tensor> {
        self.hidden_states_after_prefix(ids, layout, None)
    }

    /// [`hidden_states_with_layout`](Self::hidden_states_with_layout) for rows that continue
    /// `prefix` (see [`embed_after_prefix`](Self::embed_after_prefix)).
    pub fn hidden_states_after_prefix(
        &self,
        ids: &Tensor,
        layout: Option<&TokenLayout>,
        prefix: Option<&PrefixKv>,
    ) -> Result<Tensor> {
        ops::on_compute_pool(|| {
            let (mut x, ctx) = self.embed_after_prefix(ids, layout, prefix)?;
            for i in 0..self.layers.len() {
                x = self.forward_layer(i, &x, &ctx)?;
            }
            let x = self.final_norm(&x)?;
            Ok(x.reshape((ctx.b, ctx.t, self.cfg.hidden_size))?)
        })
    }

    /// The first step of [`hidden_states`](Self::hidden_states), public so that callers can
    /// run the layers one at a time (as `model::backward` does): checks
    /// the ids `[B, T]` and returns the embeddings `[B*T, H]` and the per-batch constants
    /// every layer needs. Rows are right-padded sequences at positions `0..T`.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<(Tensor, LayerContext)> {
        self.embed_with_layout(ids, None)
    }

    /// [`embed_tokens`](Self::embed_tokens) for any [`TokenLayout`] (`None`: right-padded
    /// sequences at positions `0..T`).
    pub fn embed_with_layout(
        &self,
        ids: &Tensor,
        layout: Option<&TokenLayout>,
    ) -> Result<(Tensor, LayerContext)> {
        self.embed_after_prefix(ids, layout, None)
    }

    /// [`embed_with_layout`](Self::embed_with_layout) for rows that continue `prefix`: every
    /// token attends to the whole prefix, and the layout's positions count the prefix's
    /// tokens (a layout is required with a prefix).
    pub fn embed_after_prefix(
        &self,
        ids: &Tensor,
        layout: Option<&TokenLayout>,
        prefix: Option<&PrefixKv>,
    ) -> Result<(Tensor, LayerContext)> {
        let (b, t) = ids.dims2()?;
        let p = prefix.map_or(0, PrefixKv::len);
        if let Some(prefix) = prefix {
            self.check_prefix(prefix)?;
            if layout.is_none() {
                return Err(Error::Input("rows after a prefix need a token layout".into()));
            }
        }
        let (cos, sin, mask) = match layout {
            None => {
                self.check_tokens(ids, t.saturating_sub(1))?;
                let (cos, sin) = self.rope_tables(t.max(1))?;
                (cos, sin, causal_mask(t, &self.device)?)
            }
            Some(l) => {
                if l.positions.len() != b * t || l.branches.len() != b * t {
                    return Err(Error::Input(format!(
                        "token layout of {} positions and {} branches for a [{b}, {t}] batch",
                        l.positions.len(),
                        l.branches.len()
                    )));
                }
                self.check_tokens(ids, max_position(&l.positions))?;
                let (cos, sin) = self.rope_at(&l.positions)?;
                let mask = Tensor::from_vec(l.mask(b, t, p), (b, t, p + t), &self.device)?;
                (cos, sin, mask)
            }
        };
        let mask = mask.to_dtype(self.dtype)?;
        let x = self.embed.rows(&ids.flatten_all()?)?; // [B*T, H]
        Ok((x, LayerContext { b, t, cos, sin, mask, prefix: prefix.cloned() }))
    }

    /// Checks the ids `[B, T]` of a pass against the vocabulary and its largest RoPE
    /// position `max_pos` against the model's maximum.
    fn check_tokens(&self, ids: &Tensor, max_pos: usize) -> Result<()> {
        if max_pos >= self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "token position {max_pos} is beyond the model's maximum of {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= self.cfg.vocab_size {
            return Err(Error::Input(format!(
                "token id {max_id} is out of range for a vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// RoPE tables with one row per token, for tokens at `positions`: cos and sin of shape
    /// `[positions.len(), head_dim/2]`.
    fn rope_at(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.rope_tables(max_position(positions) + 1)?;
        let pos = Tensor::from_slice(positions, positions.len(), &self.device)?;
        Ok((cos.index_select(&pos, 0)?, sin.index_select(&pos, 0)?))
    }

    /// The keys and values of `ids` at every layer, for passes that continue them.
    pub fn prefix_kv(&self, ids: &[u32]) -> Result<PrefixKv> {
        ops::on_compute_pool(|| Ok(self.prefix_pass(ids)?.0))
    }

    /// Runs prefix `ids` alone through every layer: its keys and values, the layer context
    /// and every layer's activations (what `model::backward`'s prefix pass keeps).
    pub(crate) fn prefix_pass(
        &self,
        ids: &[u32],
    ) -> Result<(PrefixKv, LayerContext, Vec<LayerActivations>)> {
        if ids.is_empty() {
            return Err(Error::Input("an empty prefix".into()));
        }
        let ids_t = Tensor::from_slice(ids, (1, ids.len()), &self.device)?;
        let (mut x, ctx) = self.embed_tokens(&ids_t)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut acts = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let (y, a) = self.layer_forward(i, &x, &ctx, true)?;
            let a = a.expect("activations were asked for");
            layers.push((a.k.detach(), a.v.detach()));
            acts.push(a);
            x = y;
        }
        Ok((PrefixKv { ids: ids.to_vec(), layers }, ctx, acts))
    }

    /// Checks that `prefix` has this model's shape (it cannot check the weights).
    fn check_prefix(&self, prefix: &PrefixKv) -> Result<()> {
        let cfg = &self.cfg;
        let want = [1, cfg.num_key_value_heads, prefix.len(), cfg.head_dim];
        let fits = prefix.layers.len() == self.layers.len()
            && prefix
                .layers
                .iter()
                .all(|(k, v)| k.dims() == want && v.dims() == want && k.dtype() == self.dtype);
        if !fits || prefix.is_empty() {
            return Err(Error::Input(format!(
                "a prefix of {} tokens over {} layers does not fit this model",
                prefix.len(),
                prefix.layers.len()
            )));
        }
        Ok(())
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layer `i` on `x` `[B*T, H]`: `[B*T, H]`.
    pub fn forward_layer(&self, i: usize, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        Ok(self.layer_forward(i, x, ctx, false)?.0)
    }

    /// The final RMS norm, on hidden states `[.., H]`.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// Decoder layer `i` on `x` `[B*T, H]`, also returning what its backward needs when
    /// `save` is set.
    pub(crate) fn layer_forward(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &LayerContext,
        save: bool,
    ) -> Result<(Tensor, Option<LayerActivations>)> {
        let past = ctx.prefix.as_ref().and_then(|p| p.layers.get(i));
        let (y, acts) = self.layer(i, x, ctx, past)?;
        Ok((y, save.then_some(acts)))
    }

    /// The decoder layer, the one forward every pass runs: layer `i` on `x` `[B*T, H]`,
    /// attending first to `past`, the keys and values of earlier positions at this layer
    /// (`[1 or B, kv_heads, P, head_dim]` each: a prefix every row shares, or a generation
    /// cache with one per row), then causally (as `ctx.mask` says) to the rows' own tokens.
    /// Returns the output `[B*T, H]` and the activations, whose keys and values span
    /// `past` and the rows' own positions.
    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &LayerContext,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, LayerActivations)> {
        let l = self.layers.get(i).ok_or_else(|| {
            Error::Input(format!("layer {i} does not exist ({} layers)", self.layers.len()))
        })?;
        let cfg = &self.cfg;
        let (b, t) = (ctx.b, ctx.t);
        let (nh, nkv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let rep = nh / nkv;

        let hn = ops::rms_norm(x, &l.input_norm, cfg.rms_norm_eps)?;
        let q = self.project(i, LoraTarget::Q, &l.q, &hn)?.reshape((b, t, nh, d))?;
        let k = self.project(i, LoraTarget::K, &l.k, &hn)?.reshape((b, t, nkv, d))?;
        let v = self.project(i, LoraTarget::V, &l.v, &hn)?.reshape((b, t, nkv, d))?;
        let q = ops::rope(&q, &ctx.cos, &ctx.sin)?;
        let k = ops::rope(&k, &ctx.cos, &ctx.sin)?;
        // Grouped-query attention without copying K/V per query head: the `rep` query heads
        // that share a KV head are stacked along the row axis. [B, nkv, rep*T, d]
        let q = q.transpose(1, 2)?.contiguous()?.reshape((b, nkv, rep * t, d))?;
        let k = k.transpose(1, 2)?.contiguous()?; // [B, nkv, T, d]
        let v = v.transpose(1, 2)?.contiguous()?;
        // Keys and values of earlier positions come first: [B, nkv, P + T, d].
        let (k, v) = match past {
            None => (k, v),
            Some((pk, pv)) => {
                let shape = (b, nkv, pk.dim(2)?, d);
                (
                    Tensor::cat(&[&pk.broadcast_as(shape)?.contiguous()?, &k], 2)?,
                    Tensor::cat(&[&pv.broadcast_as(shape)?.contiguous()?, &v], 2)?,
                )
            }
        };
        let scores = q.matmul(&k.t()?)?; // [B, nkv, rep*T, P + T]
        let probs = ops::masked_softmax(&scores, &ctx.mask, 1.0 / (d as f64).sqrt())?;
        let attn = probs.matmul(&v)?; // [B, nkv, rep*T, d]
        let attn = attn.reshape((b, nh, t, d))?.transpose(1, 2)?.contiguous()?;
        let attn = attn.reshape((b * t, nh * d))?;
        let x2 = (x + self.project(i, LoraTarget::O, &l.o, &attn)?)?;

        let hn = ops::rms_norm(&x2, &l.post_norm, cfg.rms_norm_eps)?;
        let gate = self.project(i, LoraTarget::Gate, &l.gate, &hn)?;
        let up = self.project(i, LoraTarget::Up, &l.up, &hn)?;
        let mlp = self.project(i, LoraTarget::Down, &l.down, &ops::swiglu(&gate, &up)?)?;
        let y = (&x2 + mlp)?;
        Ok((y, LayerActivations { x: x.clone(), q, k, v, probs, attn, x2, gate, up }))
    }

    /// Output logits for hidden states `[.., hidden]`: `[.., vocab]` in the model dtype.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let h = hidden.reshape(((), self.cfg.hidden_size))?;
        let out = self.lm_head.apply(&h)?;
        let mut shape = dims;
        *shape.last_mut().expect("hidden states have a last dimension") = self.cfg.vocab_size;
        Ok(out.reshape(shape)?)
    }

    /// Full forward: logits `[B, T, vocab]` for ids `[B, T]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.hidden_states(ids)?)
    }
}

/// Additive causal mask [T, T]: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (t, t), device)?)
}

// ---------------------------------------------------------------------------------------
// Incremental forward with a key/value cache, for generation (`generate`): the same layer
// forward, attending to the cached keys and values before the new tokens'.

/// The keys and values every layer has seen so far, `[B, kv_heads, S, head_dim]` each.
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new() -> Self {
        KvCache::default()
    }

    /// Number of cached positions (columns), 0 when empty.
    pub fn len(&self) -> usize {
        self.layers.first().map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows `rows` (in that order), e.g. to drop finished sequences.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if self.layers.is_empty() {
            return Ok(());
        }
        let device = self.layers[0].0.device().clone();
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), &device)?;
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}

impl Llama {
    /// Runs `ids` `[B, T]` (u32) at RoPE `positions` `[B, T]` (u32) on top of `cache`, and
    /// appends their keys and values to it. `mask` `[B, T, S + T]` (S = `cache.len()`) is
    /// additive (0 = attend, -inf = not): it carries causality and padding, so batches may be
    /// padded on either side. Every query row must be allowed at least one key (a pad may
    /// attend to itself), or softmax yields NaN. Returns final-norm hidden states `[B, T, H]`.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        ops::on_compute_pool(|| self.forward_cached_here(ids, positions, mask, cache))
    }

    fn forward_cached_here(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let s = cache.len();
        if mask.dims() != [b, t, s + t] || positions.dims() != [b, t] {
            return Err(Error::Input(format!(
                "forward_cached: ids {:?}, positions {:?} and mask {:?} do not fit a cache of {s} \
                 positions",
                ids.dims(),
                positions.dims(),
                mask.dims()
            )));
        }
        let positions = positions.flatten_all()?.to_vec1::<u32>()?;
        self.check_tokens(ids, max_position(&positions))?;
        // A table row per token: rows of a left-padded batch sit at different positions.
        let (cos, sin) = self.rope_at(&positions)?;
        let mask = mask.to_dtype(self.dtype)?;
        let ctx = LayerContext { b, t, cos, sin, mask, prefix: None };
        let mut x = self.embed.rows(&ids.flatten_all()?)?; // [B*T, H]
        for i in 0..self.layers.len() {
            let (y, acts) = self.layer(i, &x, &ctx, cache.layers.get(i))?;
            let kv = (acts.k, acts.v);
            match cache.layers.get_mut(i) {
                Some(cached) => *cached = kv,
                None => cache.layers.push(kv),
            }
            x = y;
        }
        let x = self.final_norm(&x)?;
        Ok(x.reshape((b, t, self.cfg.hidden_size))?)
    }
}

/// The largest of `positions` (0 when there are none).
fn max_position(positions: &[u32]) -> usize {
    positions.iter().copied().max().unwrap_or(0) as usize
}
