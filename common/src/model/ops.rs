//! Differentiable building blocks of the Llama forward pass.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward: gradients stop
//! at them silently. Each op here has a backward. On CPU with f32 tensors (the compute dtype
//! we use on CPU) they run as custom ops with hand-written kernels and a backward expressed
//! in tensor ops; on every other device/dtype they fall back to compositions of primitive
//! candle ops, which autograd differentiates on its own. Both paths give the same numbers
//! (tested below), so the frozen and trainable model share one forward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::kernel::{fast_path, for_each_row, inv_rms, slice, CResult};
use super::{at_least_f32, grad_ops};

/// Runs `f` on a worker thread of rayon's global pool (inline when already on one) and
/// waits for it. candle's CPU kernels, gemm and [`for_each_row`] fan out to that pool on
/// every op; called from a thread outside it, each op is a cold injection (a futex wake
/// and a blocking wait on the caller), from inside a cheap work-stealing join. Model
/// entry points wrap their whole pass in it, so a pass pays for one injection instead of
/// one per op.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Fixes the CPU thread count candle's kernels use by setting `RAYON_NUM_THREADS` (unless
/// the user set it) to the count candle would pick. Without it candle 0.11 works the count
/// out again on every matmul and many other ops, reading `/proc/cpuinfo` each time
/// (`num_cpus::get_physical`): some 270 reads per SmolLM2 forward, a visible share of its
/// time. rayon's pool gets the same count. Call it first thing in `main`, before any other thread
/// exists: the environment must not change while another thread may read it.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

// ---------------------------------------------------------------------------------------
// RMS norm: y = x / sqrt(mean(x²) + eps) * w, over the last dimension.

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "dpo-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = slice::<f32>(xs, xl)?;
        let w = slice::<f32>(ws, wl)?;
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, h, |i, yr| {
            let xr = &x[i * h..(i + 1) * h];
            let r = inv_rms(xr, self.eps);
            for ((y, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *y = xv * r * wv;
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = grad_ops::rms_norm_grad(x, w, g, self.eps as f64)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMS norm over the last dimension, computed in f32 (as transformers' `LlamaRMSNorm`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    if fast_path(&[x, w]) {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 });
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(at_least_f32(dtype))?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&r)?.to_dtype(dtype)?.broadcast_mul(w)
}

// ---------------------------------------------------------------------------------------
// Softmax over the last dimension.

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dpo-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = slice::<f32>(s, l)?;
        let n = l.dims()[l.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, n, |i, yr| {
            yr.copy_from_slice(&x[i * n..(i + 1) * n]);
            super::vexp::softmax_row(yr);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad_ops::softmax_grad(y, g, 1.0)?))
    }
}

/// Softmax over the last dimension. Rows must hold at least one finite value.
pub fn softmax_last_dim(x: &Tensor) -> CResult<Tensor> {
    if fast_path(&[x]) {
        return x.contiguous()?.apply_op1(Softmax);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

// ---------------------------------------------------------------------------------------
// Attention probabilities: softmax(scale * scores + mask) in one pass, so neither the
// scaled nor the masked scores exist as tensors (each would be as large as the scores).

struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "dpo-masked-softmax"
    }

    /// scores: [B, .., S] whose rows, per batch entry, cycle through the mask's T query
    /// positions (e.g. [B, heads, T, S] or GQA's [B, kv_heads, rep*T, S]); mask: [T, S]
    /// (shared by the batch) or [B, T, S].
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = slice::<f32>(xs, xl)?;
        let mask = slice::<f32>(ms, ml)?;
        let (b, t, s, per_batch_mask) = mask_geometry(xl.dims(), ml.dims())?;
        let rows_per_batch = x.len() / s / b;
        let scale = self.scale;
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, s, |i, yr| {
            let (bi, ti) = (i / rows_per_batch, (i % rows_per_batch) % t);
            let mrow = if per_batch_mask { bi * t + ti } else { ti };
            let mr = &mask[mrow * s..(mrow + 1) * s];
            for ((y, &v), &m) in yr.iter_mut().zip(&x[i * s..(i + 1) * s]).zip(mr) {
                *y = v * scale + m;
            }
            super::vexp::softmax_row(yr);
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_ops::softmax_grad(y, g, self.scale as f64)?), None))
    }
}

/// `softmax(scale * scores + mask)` over the last dimension, for attention. `scores` is
/// `[B, .., T, S]`; the additive `mask` (0 = attend, -inf = not) is `[T, S]` for the whole
/// batch or `[B, T, S]` per sequence. Every row must leave at least one entry unmasked.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> CResult<Tensor> {
    if fast_path(&[scores, mask]) {
        let op = MaskedSoftmax { scale: scale as f32 };
        return scores.contiguous()?.apply_op2(&mask.contiguous()?, op);
    }
    let (b, t, s, per_batch_mask) = mask_geometry(scores.dims(), mask.dims())?;
    // Scores as [B, rows/T, T, S] against a mask [1 or B, 1, T, S].
    let mask =
        mask.to_dtype(scores.dtype())?.reshape((if per_batch_mask { b } else { 1 }, 1, t, s))?;
    let x = scores.reshape((b, (), t, s))?.affine(scale, 0.0)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&x, D::Minus1)?.reshape(scores.shape())
}

/// For scores `[B, .., S]` and a mask `[T, S]` or `[B, T, S]`: (B, T, S, whether the mask
/// is per batch entry), after checking that they fit.
fn mask_geometry(scores: &[usize], mask: &[usize]) -> CResult<(usize, usize, usize, bool)> {
    let (b, s) = (scores[0], scores[scores.len() - 1]);
    let rows_per_batch = scores.iter().product::<usize>() / s.max(1) / b.max(1);
    let (t, per_batch) = match *mask {
        [t, ms] if ms == s => (t, false),
        [mb, t, ms] if ms == s && mb == b => (t, true),
        _ => candle_core::bail!("mask {mask:?} does not fit scores {scores:?}"),
    };
    if t == 0 || rows_per_batch % t != 0 {
        candle_core::bail!("mask {mask:?} does not fit scores {scores:?}");
    }
    Ok((b, t, s, per_batch))
}

// ---------------------------------------------------------------------------------------
// SwiGLU: silu(gate) * up, the Llama MLP's activation, fused (two [T, intermediate]
// temporaries fewer in the forward, and a one-pass backward).

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "dpo-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let gate = slice::<f32>(gs, gl)?;
        let up = slice::<f32>(us, ul)?;
        let n = *gl.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; gate.len()];
        for_each_row(&mut out, n, |i, yr| {
            super::vexp::swiglu_row(yr, &gate[i * n..(i + 1) * n], &up[i * n..(i + 1) * n]);
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dgate, dup) = grad_ops::swiglu_grad(gate, up, g)?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// `silu(gate) * up`, elementwise (same shapes).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    if fast_path(&[gate, up]) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

// ---------------------------------------------------------------------------------------
// Rotary position embedding, Hugging Face (non-interleaved, "rotate_half") convention.

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "dpo-rope"
    }

    /// x: [B, T, H, D]; cos, sin: [T, D/2] (every sequence at positions 0..T) or
    /// [B*T, D/2] (a table row per token).
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = slice::<f32>(xs, xl)?;
        let cos = slice::<f32>(cs, cl)?;
        let sin = slice::<f32>(ss, sl)?;
        let (_b, _t, h, d) = xl.shape().dims4()?;
        let half = d / 2;
        let table_rows = cl.dims()[0];
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, d, |row, yr| {
            let pos = (row / h) % table_rows;
            let c = &cos[pos * half..(pos + 1) * half];
            let s = &sin[pos * half..(pos + 1) * half];
            let (x1, x2) = x[row * d..(row + 1) * d].split_at(half);
            let (y1, y2) = yr.split_at_mut(half);
            for i in 0..half {
                y1[i] = x1[i] * c[i] - x2[i] * s[i];
                y2[i] = x2[i] * c[i] + x1[i] * s[i];
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rope_grad(g, cos, sin)?), None, None))
    }
}

/// Applies RoPE to `x` of shape [B, T, H, D] with `cos`/`sin` of shape [T, D/2] (positions
/// 0..T for every sequence) or [B*T, D/2] (one row per token, for packed layouts).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    if fast_path(&[x, cos, sin]) {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope);
    }
    let (b, t, _h, d) = x.dims4()?;
    let half = d / 2;
    let lead = if cos.dim(0)? == t { 1 } else { b };
    let c = cos.to_dtype(x.dtype())?.reshape((lead, t, 1, half))?;
    let s = sin.to_dtype(x.dtype())?.reshape((lead, t, 1, half))?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let y1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let y2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Tensor::cat(&[y1, y2], D::Minus1)
}

/// The gradient of [`rope`] with respect to `x`: a rotation's adjoint is the rotation by
/// the opposite angle.
pub fn rope_grad(g: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    if fast_path(&[g, cos, sin]) {
        return g.contiguous()?.apply_op3(&cos.contiguous()?, &sin.neg()?, Rope);
    }
    rope(g, cos, &sin.neg()?)
}

// ---------------------------------------------------------------------------------------
// Log-probability of a target token: logits[i, t_i] - logsumexp(logits[i, :]).
// Fused so that the [N, vocab] log-softmax is never materialised as a graph node; the
// backward is g_i * (onehot(t_i) - softmax(logits_i)).

struct TargetLogProb;

/// log Σ exp over a row. The sum runs over the whole vocabulary (49k–128k terms): an f32
/// accumulator drops the small terms systematically and biases every log-prob upwards
/// (by ~1e-4 per token on SmolLM2), so it accumulates in f64.
fn row_logsumexp(r: &[f32]) -> f32 {
    let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = r.iter().map(|v| (v - m).exp() as f64).sum();
    m + sum.ln() as f32
}

impl CustomOp2 for TargetLogProb {
    fn name(&self) -> &'static str {
        "dpo-target-logprob"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let logits = slice::<f32>(ls, ll)?;
        let targets = slice::<u32>(ts, tl)?;
        let (n, v) = ll.shape().dims2()?;
        if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("target token {t} is outside the vocabulary ({v})");
        }
        let out: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|i| {
                let r = &logits[i * v..(i + 1) * v];
                r[targets[i] as usize] - row_logsumexp(r)
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(target_logprob_grad(logits, targets, g)?), None))
    }
}

struct TargetLogProbGrad;

impl CustomOp3 for TargetLogProbGrad {
    fn name(&self) -> &'static str {
        "dpo-target-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let logits = slice::<f32>(ls, ll)?;
        let targets = slice::<u32>(ts, tl)?;
        let g = slice::<f32>(gs, gl)?;
        let (_n, v) = ll.shape().dims2()?;
        let mut out = vec![0f32; logits.len()];
        for_each_row(&mut out, v, |i, o| {
            let (r, gi) = (&logits[i * v..(i + 1) * v], g[i]);
            let lse = row_logsumexp(r);
            for (oj, &lj) in o.iter_mut().zip(r) {
                *oj = -gi * (lj - lse).exp();
            }
            o[targets[i] as usize] += gi;
        });
        Ok((CpuStorage::F32(out), ll.shape().clone()))
    }
}

/// For logits [N, V] (any float dtype) and targets [N] (u32), the f32 (f64 for f64) log-probability of
/// each target under the softmax of its row: [N].
pub fn target_logprob(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let logits = logits.to_dtype(at_least_f32(logits.dtype()))?;
    if fast_path(&[&logits]) {
        return logits.contiguous()?.apply_op2(&targets.contiguous()?, TargetLogProb);
    }
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}

/// The gradient of [`target_logprob`] with respect to the logits `[N, V]`, given the
/// gradient `g` `[N]` of its output: `g_i * (onehot(t_i) - softmax(logits_i))`, in the
/// logits' dtype (f32 at least).
pub fn target_logprob_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> CResult<Tensor> {
    let logits = logits.to_dtype(at_least_f32(logits.dtype()))?;
    let g = g.to_dtype(logits.dtype())?;
    if fast_path(&[&logits, &g]) {
        return logits.contiguous()?.apply_op3(
            &targets.contiguous()?,
            &g.contiguous()?,
            TargetLogProbGrad,
        );
    }
    let (n, v) = logits.dims2()?;
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
    let onehot = Tensor::zeros((n, v), logits.dtype(), logits.device())?.scatter_add(
        &targets.unsqueeze(1)?,
        &Tensor::ones((n, 1), logits.dtype(), logits.device())?,
        1,
    )?;
    (onehot - probs)?.broadcast_mul(&g.unsqueeze(1)?)
}

/// Whether autograd would record an op on `t` (it is a variable or derived from one).
pub fn is_tracked(t: &Tensor) -> bool {
    t.track_op()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::kernel::tests::{max_diff, randn};
    use candle_core::{DType, Device, Var};

    /// Runs `f` through the fast custom op (f32 on CPU) and through the composite fallback
    /// (f64, which takes the other branch), comparing values and input gradients.
    fn check_against_composite(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> CResult<Tensor>,
        tol: f32,
    ) {
        let run = |dtype: DType| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            // A fixed random projection makes every output element matter to the loss.
            let proj = randn(y.dims(), 99).to_dtype(y.dtype()).unwrap();
            let loss = (&y * &proj).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let gs: Vec<Tensor> = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap())
                .collect();
            (y.to_dtype(DType::F32).unwrap(), gs)
        };
        let (y_fast, g_fast) = run(DType::F32);
        let (y_ref, g_ref) = run(DType::F64);
        assert!(max_diff(&y_fast, &y_ref) < tol, "forward differs");
        for (i, (a, b)) in g_fast.iter().zip(&g_ref).enumerate() {
            assert!(max_diff(a, b) < tol, "gradient of input {i} differs: {}", max_diff(a, b));
        }
    }

    #[test]
    fn rms_norm_fast_path_matches_composite() {
        let x = randn(&[2, 3, 8], 1);
        let w = randn(&[8], 2);
        check_against_composite(&[x, w], |t| rms_norm(&t[0], &t[1], 1e-5), 1e-4);
    }

    #[test]
    fn softmax_fast_path_matches_composite() {
        let x = randn(&[2, 3, 5, 7], 3);
        check_against_composite(&[x], |t| softmax_last_dim(&t[0]), 1e-5);
    }

    #[test]
    fn softmax_ignores_masked_entries() {
        let x = Tensor::new(&[[1f32, f32::NEG_INFINITY, 2.0]], &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = softmax_last_dim(&x).unwrap().to_vec2().unwrap();
        assert_eq!(y[0][1], 0.0);
        assert!((y[0][0] + y[0][2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_fast_path_matches_composite() {
        let x = randn(&[2, 4, 3, 6], 4);
        let cos = randn(&[4, 3], 5);
        let sin = randn(&[4, 3], 6);
        // cos/sin are constants in the model; only x's gradient is compared.
        check_against_composite(
            &[x],
            |t| {
                let c = cos.to_dtype(t[0].dtype())?;
                let s = sin.to_dtype(t[0].dtype())?;
                rope(&t[0], &c, &s)
            },
            1e-5,
        );
    }

    #[test]
    fn target_logprob_matches_log_softmax_gather() {
        let logits = randn(&[4, 11], 7).affine(5.0, 0.0).unwrap();
        let targets = Tensor::new(&[0u32, 10, 3, 3], &Device::Cpu).unwrap();
        check_against_composite(
            &[logits],
            |t| {
                if t[0].dtype() == DType::F32 {
                    target_logprob(&t[0], &targets)
                } else {
                    let lsm = candle_nn::ops::log_softmax(&t[0], D::Minus1)?;
                    lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
                }
            },
            1e-5,
        );
    }

    #[test]
    fn target_out_of_vocab_is_an_error() {
        let logits = randn(&[1, 4], 8);
        let targets = Tensor::new(&[4u32], &Device::Cpu).unwrap();
        assert!(target_logprob(&logits, &targets).is_err());
    }
}
