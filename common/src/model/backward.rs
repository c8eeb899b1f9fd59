//! The policy's backward pass, written out by hand.
//!
//! candle's autograd works, but on this model it costs about three forwards where the
//! arithmetic needs two: every op's gradient is added into a zero tensor first, transposed
//! weight gradients are added through strided copies, and all parameter gradients are held
//! at once in a `GradStore` beside the accumulator they end up in. Here the forward keeps
//! exactly the activations the backward needs ([`LayerActivations`]), the backward runs the
//! layers in reverse with the fused gradient kernels of [`grad_ops`], and each weight
//! gradient is added into the caller's accumulator (in place on CPU) as soon as it exists,
//! so no second copy of the gradients is ever held.
//!
//! Optionally (`checkpoint`) only each layer's input is kept and the layer's forward is
//! recomputed just before its backward: activation memory drops from all layers' to one
//! layer's, for one more forward of compute.
//!
//! A prompt prefix that every pass of an optimizer step shares (the template's preamble)
//! can go through the model once per step ([`forward_prefix`]): passes over the rest of the
//! prompts attend to its keys and values ([`forward_shared_after`]), their backward sums
//! the gradients that reach those keys and values into the [`PrefixPass`]
//! ([`backward_after_prefix`]), and [`prefix_backward`] carries the sum back into the
//! weights once, after the step's last pass. Gradients are linear in those sums, so this is
//! exact.
//!
//! The autograd path (`Mode::Trainable` + `Tensor::backward`) stays as the reference this
//! is tested against (`tests/backward.rs`).

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::grad_ops::{self, accumulate, accumulate_matmul};
use super::llama::{LayerActivations, LayerContext};
use super::lora::LoraTarget;
use super::{at_least_f32, ops, Llama, PrefixKv};
use crate::error::{Error, Result};
use crate::logprob::{prefixed_batch, response_batch, response_scores, shared_prompt_batch};
use crate::logprob::{MeanLogits, ResponseBatch, ResponseLogProbs};
use crate::logprob::{Sequence, SharedPrompt};

/// What a layer kept for its backward.
enum Kept {
    Activations(LayerActivations),
    /// Activation checkpointing: the input only; the rest is recomputed.
    Input(Tensor),
}

/// A forward pass that can be differentiated by [`backward`]: the log-probs it computed
/// and what it kept to differentiate them.
pub struct TrainingPass {
    /// The log-probs, plain values (no autograd graph), with
    /// [`ResponseLogProbs::mean_logit_sums`].
    pub logprobs: ResponseLogProbs,
    /// A no-graph view of the model's weights (shares their storage).
    model: Llama,
    ctx: LayerContext,
    /// Token ids, flattened `[B*T]`.
    ids: Tensor,
    layers: Vec<Kept>,
    /// Input of the final norm, `[B*T, H]`.
    last: Tensor,
    /// The normed hidden states of the positions that predict response tokens, `[N, H]`.
    hidden: Tensor,
    /// Their logits `[N, V]`.
    logits: Tensor,
    batch: ResponseBatch,
}

/// Forward pass over `seqs` (one per row, right-padded) keeping what [`backward`] needs.
pub fn forward_sequences(
    model: &Llama,
    seqs: &[Sequence],
    checkpoint: bool,
) -> Result<TrainingPass> {
    forward(model, response_batch(model, seqs)?, None, checkpoint)
}

/// Forward pass over `groups` (a prompt and its responses per row, the prompt computed
/// once) keeping what [`backward`] needs. The log-probs come in the order of
/// [`shared_prompt_logprobs`](crate::logprob::shared_prompt_logprobs).
pub fn forward_shared(
    model: &Llama,
    groups: &[SharedPrompt],
    checkpoint: bool,
) -> Result<TrainingPass> {
    forward(model, shared_prompt_batch(model, groups)?, None, checkpoint)
}

/// [`forward_shared`] for prompts that all extend `prefix`'s tokens: only the tokens after
/// the prefix are computed. Differentiate the pass with [`backward_after_prefix`].
pub fn forward_shared_after(
    model: &Llama,
    groups: &[SharedPrompt],
    prefix: &PrefixPass,
    checkpoint: bool,
) -> Result<TrainingPass> {
    let batch = prefixed_batch(model, groups, &prefix.kv)?;
    forward(model, batch, Some(&prefix.kv), checkpoint)
}

fn forward(
    model: &Llama,
    batch: ResponseBatch,
    prefix: Option<&PrefixKv>,
    checkpoint: bool,
) -> Result<TrainingPass> {
    ops::on_compute_pool(|| forward_here(model, batch, prefix, checkpoint))
}

fn forward_here(
    model: &Llama,
    batch: ResponseBatch,
    prefix: Option<&PrefixKv>,
    checkpoint: bool,
) -> Result<TrainingPass> {
    // Weights as plain tensors: nothing here may build an autograd graph (it would keep
    // every intermediate alive).
    let model = model.frozen_view()?;
    let (mut x, ctx) = model.embed_after_prefix(&batch.ids, batch.layout.as_ref(), prefix)?;
    let mut layers = Vec::with_capacity(model.num_layers());
    for i in 0..model.num_layers() {
        let (y, acts) = model.layer_forward(i, &x, &ctx, !checkpoint)?;
        layers.push(match acts {
            Some(a) => Kept::Activations(a),
            None => Kept::Input(x),
        });
        x = y;
    }
    let hidden = model.final_norm(&x)?.index_select(&batch.rows, 0)?;
    let logits = model.logits(&hidden)?; // [N, V]
    let logprobs = response_scores(&logits, &batch, MeanLogits::Sum)?;
    let ids = batch.ids.flatten_all()?;
    Ok(TrainingPass { logprobs, model, ctx, ids, layers, last: x, hidden, logits, batch })
}

/// A prompt prefix run through the policy once for the passes of an optimizer step; see
/// the module doc. Holds its activations and, per layer, the gradients with respect to its
/// keys and values summed over the passes backwarded so far.
pub struct PrefixPass {
    kv: PrefixKv,
    /// A no-graph view of the model's weights.
    model: Llama,
    ctx: LayerContext,
    /// The prefix's ids, `[P]`.
    ids: Tensor,
    layers: Vec<LayerActivations>,
    /// Per layer, [1, kv_heads, P, head_dim], f32 (f64 for an f64 model).
    dk: Vec<Tensor>,
    dv: Vec<Tensor>,
}

impl PrefixPass {
    /// The prefix's keys and values (also what a no-gradient pass, e.g. an evaluation with
    /// the same weights, can start from).
    pub fn kv(&self) -> &PrefixKv {
        &self.kv
    }

    pub fn len(&self) -> usize {
        self.kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }
}

/// Runs prefix `ids` through `model`, keeping what [`prefix_backward`] needs (all of its
/// activations: a prefix is short).
pub fn forward_prefix(model: &Llama, ids: &[u32]) -> Result<PrefixPass> {
    ops::on_compute_pool(|| {
        let model = model.frozen_view()?;
        let (kv, ctx, layers) = model.prefix_pass(ids)?;
        let acc_dtype = at_least_f32(model.dtype());
        let zeros = |t: &Tensor| t.zeros_like()?.to_dtype(acc_dtype);
        let dk = layers.iter().map(|a| zeros(&a.k)).collect::<candle_core::Result<_>>()?;
        let dv = layers.iter().map(|a| zeros(&a.v)).collect::<candle_core::Result<_>>()?;
        let ids = Tensor::from_slice(ids, ids.len(), model.device())?;
        Ok(PrefixPass { kv, model, ctx, ids, layers, dk, dv })
    })
}

impl TrainingPass {
    /// Bytes of the distinct storages the pass keeps for its backward (weights excluded):
    /// what `memory::layer_kept_tensors` and `memory::head_kept_tensors` predict.
    pub fn kept_bytes(&self) -> u64 {
        let mut kept: Vec<&Tensor> = vec![
            &self.ctx.cos,
            &self.ctx.sin,
            &self.ctx.mask,
            &self.last,
            &self.hidden,
            &self.logits,
            &self.logprobs.sums,
            &self.logprobs.per_token,
        ];
        for l in &self.layers {
            match l {
                Kept::Activations(a) => {
                    kept.extend([&a.x, &a.q, &a.k, &a.v, &a.probs, &a.attn, &a.x2, &a.gate, &a.up])
                }
                Kept::Input(x) => kept.push(x),
            }
        }
        let mut seen = std::collections::HashMap::new();
        for t in kept {
            let (storage, layout) = t.storage_and_layout();
            let key = &*storage as *const _ as usize;
            let bytes = (layout.shape().elem_count() * t.dtype().size_in_bytes()) as u64;
            let e = seen.entry(key).or_insert(0u64);
            *e = (*e).max(bytes);
        }
        seen.values().sum()
    }
}

/// Where each trainable parameter's gradient goes: its index in
/// `Llama::trainable_params()` order. A frozen weight (the base under LoRA adapters) has
/// none, and its gradient is never formed.
struct ParamIndex(HashMap<String, usize>);

impl ParamIndex {
    fn new(model: &Llama) -> Self {
        let names = model.trainable_params().into_iter().map(|(n, _)| n);
        ParamIndex(names.enumerate().map(|(i, n)| (n, i)).collect())
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.0.get(name).copied()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Adds `dyᵀ·x` into the accumulator of `name`, if that parameter trains.
fn accumulate_weight_grad(
    grads: &mut [Tensor],
    index: &ParamIndex,
    name: &str,
    dy: &Tensor,
    x: &Tensor,
) -> Result<()> {
    if let Some(k) = index.get(name) {
        accumulate_matmul(&mut grads[k], &dy.t()?, x)?;
    }
    Ok(())
}

/// Adds the gradient of `Σ_r dsums[r] · logprob_r` (one value per response of the pass,
/// in its order) with respect to every trainable parameter into `grads` (one tensor per
/// parameter, in `Llama::trainable_params()` order: the adapters' alone under LoRA), usually f32; bf16 accumulators are added into with stochastic
/// rounding, see [`accumulate`]). The pass is consumed: its activations are freed layer by
/// layer as the backward goes.
pub fn backward(pass: TrainingPass, dsums: &[f32], grads: &mut [Tensor]) -> Result<()> {
    ops::on_compute_pool(|| backward_here(pass, dsums, grads, None))
}

/// [`backward`] for a pass made by [`forward_shared_after`]: the gradients reaching the
/// prefix's keys and values are added into `prefix`, for [`prefix_backward`].
pub fn backward_after_prefix(
    pass: TrainingPass,
    dsums: &[f32],
    grads: &mut [Tensor],
    prefix: &mut PrefixPass,
) -> Result<()> {
    ops::on_compute_pool(|| backward_here(pass, dsums, grads, Some(prefix)))
}

/// Adds the gradients that the passes backwarded with [`backward_after_prefix`] sent into
/// the prefix's keys and values to the weights' gradients in `grads`. Call it once, after
/// the last pass that used the prefix.
pub fn prefix_backward(prefix: PrefixPass, grads: &mut [Tensor]) -> Result<()> {
    ops::on_compute_pool(|| {
        let PrefixPass { model, ctx, ids, layers, dk, dv, .. } = prefix;
        let index = ParamIndex::new(&model);
        check_accumulators(&index, grads)?;
        let dtype = model.dtype();
        // Nothing reads the prefix's last hidden states: its gradient enters through the
        // keys and values only.
        let mut dx =
            Tensor::zeros((ids.dim(0)?, model.config().hidden_size), dtype, model.device())?;
        for (i, acts) in layers.into_iter().enumerate().rev() {
            let from_rows = (&dk[i].to_dtype(dtype)?, &dv[i].to_dtype(dtype)?);
            dx = layer_backward(&model, i, acts, &dx, &ctx, &index, grads, None, Some(from_rows))?;
        }
        embedding_backward(&model, &ids, dx, &index, grads)
    })
}

fn check_accumulators(index: &ParamIndex, grads: &[Tensor]) -> Result<()> {
    if grads.len() != index.len() {
        return Err(Error::Input(format!(
            "{} gradient accumulators for {} trainable parameters",
            grads.len(),
            index.len()
        )));
    }
    Ok(())
}

fn backward_here(
    pass: TrainingPass,
    dsums: &[f32],
    grads: &mut [Tensor],
    mut prefix: Option<&mut PrefixPass>,
) -> Result<()> {
    let TrainingPass { model, ctx, ids, layers, last, hidden, logits, batch, .. } = pass;
    let same_prefix = match (&ctx.prefix, &prefix) {
        (None, None) => true,
        (Some(a), Some(b)) => a.ids() == b.kv.ids(),
        _ => false,
    };
    if !same_prefix {
        return Err(Error::Input(
            "a pass is differentiated with the prefix it was computed from (forward_shared_after \
             with backward_after_prefix), or without one"
                .into(),
        ));
    }
    let index = ParamIndex::new(&model);
    check_accumulators(&index, grads)?;
    if dsums.len() != batch.counts.len() {
        return Err(Error::Input(format!(
            "{} output gradients for {} responses",
            dsums.len(),
            batch.counts.len()
        )));
    }
    let cfg = model.config().clone();
    let dtype = model.dtype();
    let device = model.device().clone();

    // Output head: d logp_n = dsums[response of n]; d logits = d logp (onehot - softmax).
    let dsums = Tensor::from_slice(dsums, dsums.len(), &device)?;
    let dtok = batch.member.t()?.matmul(&dsums.unsqueeze(1)?)?.squeeze(1)?; // [N]
    let dlogits = ops::target_logprob_grad(&logits, &batch.targets, &dtok)?.to_dtype(dtype)?;
    drop(logits);
    let head = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    accumulate_weight_grad(grads, &index, head, &dlogits, &hidden)?;
    let dhidden = dlogits.matmul(model.lm_head()?)?; // [N, H]
    drop(dlogits);
    let (bt, h) = last.dims2()?;
    let dnormed = Tensor::zeros((bt, h), dtype, &device)?.index_add(&batch.rows, &dhidden, 0)?;
    let (mut dx, dnorm) =
        grad_ops::rms_norm_grad(&last, model.norm_weight(), &dnormed, cfg.rms_norm_eps)?;
    if let Some(k) = index.get("model.norm.weight") {
        accumulate(&mut grads[k], &dnorm)?;
    }

    for (i, kept) in layers.into_iter().enumerate().rev() {
        let acts = match kept {
            Kept::Activations(a) => a,
            Kept::Input(x) => model
                .layer_forward(i, &x, &ctx, true)?
                .1
                .expect("layer_forward keeps activations when asked"),
        };
        let to_prefix = prefix.as_deref_mut().map(|p| (&mut p.dk[i], &mut p.dv[i]));
        dx = layer_backward(&model, i, acts, &dx, &ctx, &index, grads, to_prefix, None)?;
    }
    embedding_backward(&model, &ids, dx, &index, grads)
}

/// Adds each token's input gradient `dx` `[B*T, H]` to the embedding row of its id.
fn embedding_backward(
    model: &Llama,
    ids: &Tensor,
    dx: Tensor,
    index: &ParamIndex,
    grads: &mut [Tensor],
) -> Result<()> {
    let Some(e) = index.get("model.embed_tokens.weight") else {
        // A frozen embedding: the gradient ends here.
        return Ok(());
    };
    let device = model.device().clone();
    let (bt, h) = dx.dims2()?;
    let rows = ids.unsqueeze(1)?.broadcast_as((bt, h))?.contiguous()?;
    if grads[e].dtype() == DType::BF16 {
        // Scattered into bf16 one token at a time, every add would round to nearest: sum
        // this pass's rows in f32 first (a [V, H] transient, no larger than the head's
        // weight gradient), then add them once, rounding stochastically (`accumulate`).
        let (v, _) = grads[e].dims2()?;
        let summed = Tensor::zeros((v, h), DType::F32, &device)?.scatter_add(
            &rows,
            &dx.to_dtype(DType::F32)?,
            0,
        )?;
        accumulate(&mut grads[e], &summed)?;
        return Ok(());
    }
    let dx = dx.to_dtype(grads[e].dtype())?;
    if grads[e].is_contiguous() {
        grads[e].scatter_add_set(&rows, &dx, 0)?;
    } else {
        grads[e] = grads[e].scatter_add(&rows, &dx, 0)?;
    }
    Ok(())
}

/// The backward of decoder layer `i`: adds its weights' gradients into `grads` and returns
/// the gradient of its input, given `dy`, the gradient of its output. When the pass
/// attended to a prefix, the gradients of the prefix's keys and values (summed over the
/// batch) are added into `to_prefix`; when this is a prefix's own pass, `from_rows` holds
/// the gradients its keys and values received from the passes that attended to them.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    model: &Llama,
    i: usize,
    a: LayerActivations,
    dy: &Tensor,
    ctx: &LayerContext,
    index: &ParamIndex,
    grads: &mut [Tensor],
    to_prefix: Option<(&mut Tensor, &mut Tensor)>,
    from_rows: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let cfg = model.config();
    let w = model.layer_weights(i)?;
    let eps = cfg.rms_norm_eps;
    let (b, t) = (ctx.b, ctx.t);
    let (nh, nkv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let rep = nh / nkv;
    let p = format!("model.layers.{i}");
    let norm_grad = |grads: &mut [Tensor], name: &str, g: &Tensor| -> Result<()> {
        if let Some(k) = index.get(&format!("{p}.{name}")) {
            accumulate(&mut grads[k], g)?;
        }
        Ok(())
    };
    let project = |grads: &mut [Tensor], target, w, x: &Tensor, dy: &Tensor| {
        projection_backward(model, i, target, w, x, dy, index, grads)
    };

    // MLP: y = x2 + down(swiglu(gate(h2), up(h2))), h2 = norm(x2).
    let m = ops::swiglu(&a.gate, &a.up)?;
    let dm = project(grads, LoraTarget::Down, w.down, &m, dy)?;
    drop(m);
    let (dgate, dup) = grad_ops::swiglu_grad(&a.gate, &a.up, &dm)?;
    drop(dm);
    let h2 = ops::rms_norm(&a.x2, w.post_norm, eps)?;
    let dh2 = (project(grads, LoraTarget::Gate, w.gate, &h2, &dgate)?
        + project(grads, LoraTarget::Up, w.up, &h2, &dup)?)?;
    drop((h2, dgate, dup));
    let (dx2, dpost) = grad_ops::rms_norm_grad(&a.x2, w.post_norm, &dh2, eps)?;
    norm_grad(grads, "post_attention_layernorm.weight", &dpost)?;
    let dx2 = (dy + dx2)?;

    // Attention: x2 = x + o(attn), attn = softmax(scale q kᵀ + mask) v per head.
    let dattn = project(grads, LoraTarget::O, w.o, &a.attn, &dx2)?; // [B*T, nh*d]
    let dattn = dattn.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()?;
    let dattn = dattn.reshape((b, nkv, rep * t, d))?;
    let dprobs = dattn.matmul(&a.v.t()?)?; // [B, nkv, rep*T, P + T]
    let dv = a.probs.t()?.matmul(&dattn)?; // [B, nkv, P + T, d]
    drop(dattn);
    let scale = 1.0 / (d as f64).sqrt();
    let dscores = grad_ops::softmax_grad(&a.probs, &dprobs, scale)?;
    drop(dprobs);
    let dq = dscores.matmul(&a.k)?; // [B, nkv, rep*T, d]
    let dk = dscores.t()?.matmul(&a.q)?; // [B, nkv, P + T, d]
    drop(dscores);
    let p = ctx.prefix.as_ref().map_or(0, PrefixKv::len);
    let (dk, dv) = match to_prefix {
        Some((pk, pv)) if p > 0 => {
            accumulate(pk, &dk.narrow(2, 0, p)?.sum_keepdim(0)?)?;
            accumulate(pv, &dv.narrow(2, 0, p)?.sum_keepdim(0)?)?;
            (dk.narrow(2, p, t)?, dv.narrow(2, p, t)?)
        }
        _ => (dk, dv),
    };
    let (dk, dv) = match from_rows {
        Some((rk, rv)) => ((dk + rk)?, (dv + rv)?),
        None => (dk, dv),
    };
    let dq = dq.reshape((b, nh, t, d))?.transpose(1, 2)?.contiguous()?; // [B, T, nh, d]
    let dq = ops::rope_grad(&dq, &ctx.cos, &ctx.sin)?.reshape((b * t, nh * d))?;
    let dk = dk.transpose(1, 2)?.contiguous()?;
    let dk = ops::rope_grad(&dk, &ctx.cos, &ctx.sin)?.reshape((b * t, nkv * d))?;
    let dv = dv.transpose(1, 2)?.contiguous()?.reshape((b * t, nkv * d))?;
    let h1 = ops::rms_norm(&a.x, w.input_norm, eps)?;
    let dh1 = ((project(grads, LoraTarget::Q, w.q, &h1, &dq)?
        + project(grads, LoraTarget::K, w.k, &h1, &dk)?)?
        + project(grads, LoraTarget::V, w.v, &h1, &dv)?)?;
    drop(h1);
    let (dx, din) = grad_ops::rms_norm_grad(&a.x, w.input_norm, &dh1, eps)?;
    norm_grad(grads, "input_layernorm.weight", &din)?;
    Ok((dx2 + dx)?)
}

/// The backward of layer `layer`'s projection `target`, `y = x·Wᵀ` plus `s·(x·Aᵀ)·Bᵀ`
/// where it carries an adapter, given its input `x` and its output's gradient `dy`: adds
/// the gradients of whichever of `W`, `A` and `B` train into `grads` and returns the
/// gradient of `x`.
#[allow(clippy::too_many_arguments)]
fn projection_backward(
    model: &Llama,
    layer: usize,
    target: LoraTarget,
    w: &Tensor,
    x: &Tensor,
    dy: &Tensor,
    index: &ParamIndex,
    grads: &mut [Tensor],
) -> Result<Tensor> {
    accumulate_weight_grad(grads, index, &target.base_weight(layer), dy, x)?;
    let dx = dy.matmul(w)?;
    let Some(ad) = model.adapter(layer, target) else { return Ok(dx) };
    let (name_a, name_b) = target.adapter_names(layer);
    // The adapter path computes in the adapter's dtype (f32 on a bf16 base).
    let (x, dy) = (&ad.input(x)?, &ad.input(dy)?);
    // With dropout the adapter saw drop(x) = x ⊙ mask: the same mask, drawn again.
    let mask = ad.dropout_mask(x)?;
    let xd = match &mask {
        Some(mask) => (x * mask)?,
        None => x.clone(),
    };
    // x·Aᵀ is [N, r]: recomputing it costs a rank-r product, less than keeping it would
    // cost memory for every projection of every layer.
    let su = xd.matmul(&ad.a.t()?)?.affine(ad.scale, 0.0)?;
    accumulate_weight_grad(grads, index, &name_b, dy, &su)?; // dB = s·dyᵀ·(x·Aᵀ)
    drop(su);
    let du = dy.matmul(&ad.b)?.affine(ad.scale, 0.0)?; // [N, r]
    accumulate_weight_grad(grads, index, &name_a, &du, &xd)?; // dA = (s·dy·B)ᵀ·x
    drop(xd);
    let dxd = du.matmul(&ad.a)?;
    let dxd = match &mask {
        Some(mask) => (dxd * mask)?,
        None => dxd,
    };
    let dxd = dxd.to_dtype(dx.dtype())?;
    Ok((dx + dxd)?)
}

/// Zero gradient accumulators for every trainable parameter of `model`, in
/// `trainable_params()` order (the adapters' alone under LoRA): f32 (so that bf16
/// gradients of many micro-batches sum without loss), f64 for an f64 model.
pub fn zero_grads(model: &Llama) -> Result<Vec<Tensor>> {
    let dtype = at_least_f32(model.dtype());
    Ok(model
        .trainable_params()
        .iter()
        .map(|(_, p)| Tensor::zeros(p.shape(), dtype, p.device()))
        .collect::<candle_core::Result<Vec<_>>>()?)
}
