//! Differentiable building blocks of the Llama forward pass.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward: gradients stop
//! at them silently. Each op here has a backward. On CPU with f32 tensors (the compute dtype
//! we use on CPU) they run as custom ops with hand-written kernels and a backward expressed
//! in tensor ops; on every other device/dtype they fall back to compositions of primitive
//! candle ops, which autograd differentiates on its own. Both paths give the same numbers
//! (tested below), so the frozen and trainable model share one forward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

type CResult<T> = candle_core::Result<T>;

fn fast_path(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The contiguous data of a CPU tensor argument.
fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("custom op expects a contiguous tensor"),
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
        for (xr, yr) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            // f64 accumulation: see `row_logsumexp` on why long f32 sums bias results.
            let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64;
            let r = (1.0 / (ms + self.eps as f64).sqrt()) as f32;
            for ((y, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *y = xv * r * wv;
            }
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let h = w.dim(0)?;
        let x2 = x.reshape(((), h))?;
        let g2 = g.reshape(((), h))?;
        let r = (x2.sqr()?.mean_keepdim(1)? + self.eps as f64)?.sqrt()?.recip()?; // [R,1]
        let u = g2.broadcast_mul(w)?; // [R,H]
        let dot = (&u * &x2)?.sum_keepdim(1)?; // [R,1]
        let coef = (r.powf(3.0)? * dot)?.affine(1.0 / h as f64, 0.0)?;
        let dx = (u.broadcast_mul(&r)? - x2.broadcast_mul(&coef)?)?;
        let dw = (g2 * x2.broadcast_mul(&r)?)?.sum(0)?;
        Ok((Some(dx.reshape(x.shape())?), Some(dw)))
    }
}

/// RMS norm over the last dimension, computed in f32 (as transformers' `LlamaRMSNorm`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    if fast_path(&[x, w]) {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 });
    }
    let dtype = x.dtype();
    // Normalise in at least f32 (f64 stays f64: gradient checks rely on it).
    let xf = if dtype == DType::F64 { x.clone() } else { x.to_dtype(DType::F32)? };
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
        for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let m = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for (y, &v) in yr.iter_mut().zip(xr) {
                *y = (v - m).exp();
                sum += *y as f64;
            }
            let inv = (1.0 / sum) as f32;
            yr.iter_mut().for_each(|y| *y *= inv);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
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
// Rotary position embedding, Hugging Face (non-interleaved, "rotate_half") convention.

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "dpo-rope"
    }

    /// x: [B, T, H, D]; cos, sin: [T, D/2].
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
        let (_b, t, h, d) = xl.shape().dims4()?;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        for (row, (xr, yr)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            let pos = (row / h) % t;
            let c = &cos[pos * half..(pos + 1) * half];
            let s = &sin[pos * half..(pos + 1) * half];
            let (x1, x2) = xr.split_at(half);
            let (y1, y2) = yr.split_at_mut(half);
            for i in 0..half {
                y1[i] = x1[i] * c[i] - x2[i] * s[i];
                y2[i] = x2[i] * c[i] + x1[i] * s[i];
            }
        }
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
        // A rotation's adjoint is the rotation by the opposite angle.
        let dx = g.contiguous()?.apply_op3(cos, &sin.neg()?, Rope)?;
        Ok((Some(dx), None, None))
    }
}

/// Applies RoPE to `x` of shape [B, T, H, D] with `cos`/`sin` of shape [T, D/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    if fast_path(&[x, cos, sin]) {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope);
    }
    let (_b, t, _h, d) = x.dims4()?;
    let half = d / 2;
    let c = cos.to_dtype(x.dtype())?.reshape((1, t, 1, half))?;
    let s = sin.to_dtype(x.dtype())?.reshape((1, t, 1, half))?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let y1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let y2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Tensor::cat(&[y1, y2], D::Minus1)
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
        let mut out = Vec::with_capacity(n);
        for (r, &t) in logits.chunks_exact(v).zip(targets) {
            if t as usize >= v {
                candle_core::bail!("target token {t} is outside the vocabulary ({v})");
            }
            out.push(r[t as usize] - row_logsumexp(r));
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dl = logits.apply_op3(targets, &g.contiguous()?, TargetLogProbGrad)?;
        Ok((Some(dl), None))
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
        for ((r, o), (&t, &gi)) in
            logits.chunks_exact(v).zip(out.chunks_exact_mut(v)).zip(targets.iter().zip(g))
        {
            let lse = row_logsumexp(r);
            for (oj, &lj) in o.iter_mut().zip(r) {
                *oj = -gi * (lj - lse).exp();
            }
            o[t as usize] += gi;
        }
        Ok((CpuStorage::F32(out), ll.shape().clone()))
    }
}

/// For logits [N, V] (any float dtype) and targets [N] (u32), the f32 (f64 for f64) log-probability of
/// each target under the softmax of its row: [N].
pub fn target_logprob(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    // Never below f32; f64 (used by gradient checks) stays f64.
    let logits = match logits.dtype() {
        DType::F64 => logits.clone(),
        _ => logits.to_dtype(DType::F32)?,
    };
    if fast_path(&[&logits]) {
        return logits.contiguous()?.apply_op2(&targets.contiguous()?, TargetLogProb);
    }
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}

/// Whether autograd would record an op on `t` (it is a variable or derived from one).
pub fn is_tracked(t: &Tensor) -> bool {
    t.track_op()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values without a global RNG.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

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
