//! Gradients of the forward ops in `model::ops`, as explicit functions: the
//! hand-written backward of the Llama layer (`model::backward`) calls them directly, and the
//! custom ops' autograd `bwd` calls them too, so both backwards share one implementation.
//!
//! Each has a CPU f32 kernel (one pass, threaded over rows) and a fallback composed of plain
//! candle ops for every other device and dtype (CUDA bf16, and f64 for the gradient checks).

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout, Shape, Tensor, D,
};

use super::kernel::{fast_path, for_each_row, inv_rms, slice, CResult};

// ---------------------------------------------------------------------------------------
// Softmax: dx = scale * y * (g - Σ g·y), per row.

struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "dpo-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = slice::<f32>(ys, yl)?;
        let g = slice::<f32>(gs, gl)?;
        let n = *yl.dims().last().unwrap_or(&1);
        let scale = self.scale;
        let mut out = vec![0f32; y.len()];
        for_each_row(&mut out, n, |i, o| {
            let (yr, gr) = (&y[i * n..(i + 1) * n], &g[i * n..(i + 1) * n]);
            let dot: f64 = yr.iter().zip(gr).map(|(&a, &b)| (a * b) as f64).sum();
            let dot = dot as f32;
            for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                *o = scale * yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

/// Gradient of `softmax(scale * x + mask)` with respect to `x`, from its output `y` and the
/// output's gradient `g` (same shapes).
pub fn softmax_grad(y: &Tensor, g: &Tensor, scale: f64) -> CResult<Tensor> {
    if fast_path(&[y, g]) {
        return y
            .contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { scale: scale as f32 });
    }
    let dot = (g * y)?.sum_keepdim(D::Minus1)?;
    (y * g.broadcast_sub(&dot)?)?.affine(scale, 0.0)
}

// ---------------------------------------------------------------------------------------
// RMS norm, y = x * r * w with r = 1/sqrt(mean(x²) + eps):
//   dx = r * (g·w) - x * r³ * mean(g·w·x),   dw = Σ_rows g * x * r.

struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "dpo-rms-norm-grad"
    }

    /// Returns `[R + 1, H]`: dx in the first R rows, dw in the last.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = slice::<f32>(xs, xl)?;
        let w = slice::<f32>(ws, wl)?;
        let g = slice::<f32>(gs, gl)?;
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; x.len() + h];
        let (dx, dw) = out.split_at_mut(x.len());
        for_each_row(dx, h, |i, dxr| {
            let (xr, gr) = (&x[i * h..(i + 1) * h], &g[i * h..(i + 1) * h]);
            let r = inv_rms(xr, self.eps);
            let dot: f64 =
                xr.iter().zip(gr).zip(w).map(|((&xv, &gv), &wv)| (gv * wv * xv) as f64).sum();
            let coef = r * r * r * (dot / h as f64) as f32;
            for (((d, &xv), &gv), &wv) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                *d = r * gv * wv - xv * coef;
            }
        });
        // dw sums over rows: in f64, rows in order, so the result is thread-count independent.
        let mut acc = vec![0f64; h];
        for i in 0..rows {
            let (xr, gr) = (&x[i * h..(i + 1) * h], &g[i * h..(i + 1) * h]);
            let r = inv_rms(xr, self.eps);
            for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
                *a += (gv * xv * r) as f64;
            }
        }
        dw.iter_mut().zip(&acc).for_each(|(d, &a)| *d = a as f32);
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, h))))
    }
}

/// Gradients of `ops::rms_norm(x, w, eps)` (x `[.., H]`, w `[H]`) given the output gradient
/// `g`: `(dx, dw)`.
pub fn rms_norm_grad(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> CResult<(Tensor, Tensor)> {
    let h = w.dim(0)?;
    if fast_path(&[x, w, g]) {
        let both = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &g.contiguous()?,
            &RmsNormGrad { eps: eps as f32 },
        )?;
        let rows = both.dim(0)? - 1;
        return Ok((both.narrow(0, 0, rows)?.reshape(x.shape())?, both.get(rows)?));
    }
    // In f32 at least, as the forward normalises.
    let dtype = x.dtype();
    let work = super::at_least_f32(dtype);
    let x2 = x.to_dtype(work)?.reshape(((), h))?;
    let g2 = g.to_dtype(work)?.reshape(((), h))?;
    let w = w.to_dtype(work)?;
    let r = (x2.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?; // [R,1]
    let u = g2.broadcast_mul(&w)?; // [R,H]
    let dot = (&u * &x2)?.sum_keepdim(1)?; // [R,1]
    let coef = (r.powf(3.0)? * dot)?.affine(1.0 / h as f64, 0.0)?;
    let dx = (u.broadcast_mul(&r)? - x2.broadcast_mul(&coef)?)?;
    let dw = (g2 * x2.broadcast_mul(&r)?)?.sum(0)?;
    Ok((dx.reshape(x.shape())?.to_dtype(dtype)?, dw.to_dtype(dtype)?))
}

// ---------------------------------------------------------------------------------------
// SwiGLU, y = silu(a) * u with silu(a) = a σ(a):
//   du = g * silu(a),   da = g * u * σ(a) * (1 + a (1 - σ(a))).

struct SwiGluGrad;

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "dpo-swiglu-grad"
    }

    /// Returns `[2, ..]`: d gate then d up.
    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let a = slice::<f32>(as_, al)?;
        let u = slice::<f32>(us, ul)?;
        let g = slice::<f32>(gs, gl)?;
        let n = *al.dims().last().unwrap_or(&1);
        let len = a.len();
        let mut out = vec![0f32; 2 * len];
        let (da, du) = out.split_at_mut(len);
        for_each_row(da, n, |i, dar| {
            for (j, d) in dar.iter_mut().enumerate() {
                let k = i * n + j;
                let s = 1.0 / (1.0 + (-a[k]).exp());
                *d = g[k] * u[k] * s * (1.0 + a[k] * (1.0 - s));
            }
        });
        for_each_row(du, n, |i, dur| {
            for (j, d) in dur.iter_mut().enumerate() {
                let k = i * n + j;
                *d = g[k] * silu(a[k]);
            }
        });
        let mut dims = vec![2];
        dims.extend_from_slice(al.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Gradients of `ops::swiglu(gate, up)` given the output gradient `g`: `(d gate, d up)`.
pub fn swiglu_grad(gate: &Tensor, up: &Tensor, g: &Tensor) -> CResult<(Tensor, Tensor)> {
    if fast_path(&[gate, up, g]) {
        let both = gate.contiguous()?.apply_op3_no_bwd(
            &up.contiguous()?,
            &g.contiguous()?,
            &SwiGluGrad,
        )?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    let s = candle_nn::ops::sigmoid(gate)?;
    let silu = (gate * &s)?;
    let du = (g * &silu)?;
    let one_minus = s.affine(-1.0, 1.0)?;
    let dsilu = (&s * (gate * one_minus)?.affine(1.0, 1.0)?)?;
    let da = ((g * up)? * dsilu)?;
    Ok((da, du))
}

// ---------------------------------------------------------------------------------------
// Gradient accumulation in place.

struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "dpo-add-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<()> {
        let src = slice::<f32>(s2, l2)?;
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("add-assign expects a contiguous destination");
        };
        let dst = match s1 {
            CpuStorage::F32(d) => &mut d[a..b],
            _ => candle_core::bail!("add-assign expects f32"),
        };
        if dst.len() != src.len() {
            candle_core::bail!("add-assign: {} elements into {}", src.len(), dst.len());
        }
        use rayon::prelude::*;
        dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
        });
        Ok(())
    }
}

/// Seeds of the stochastic rounding of bf16 accumulators: each [`accumulate`] into one
/// takes the next value, so successive adds round independently.
static ROUNDING_SEED: AtomicU64 = AtomicU64::new(0);

/// Restarts the sequence of rounding seeds of bf16 accumulators at `seed`. The trainer
/// calls it once per optimizer step with a seed of (run, step), so that a resumed run
/// rounds exactly as the uninterrupted one did (the backward's adds come in a fixed order).
pub fn set_rounding_seed(seed: u64) {
    ROUNDING_SEED.store(seed, Ordering::Relaxed);
}

/// `acc += g`, in place for contiguous f32 CPU tensors (no allocation: the accumulators are
/// as large as the model); otherwise `acc` is replaced by the sum. `g` is converted to
/// `acc`'s dtype first.
///
/// A bf16 `acc` is the exception: the sum is formed in f32 and rounded to bf16
/// stochastically ([`crate::sround::add_stochastic_bf16`]; in place on a CPU). Summed with
/// round-to-nearest, a gradient smaller than 2^-9 of the running sum would be lost.
pub fn accumulate(acc: &mut Tensor, g: &Tensor) -> CResult<()> {
    if acc.dims() != g.dims() {
        candle_core::bail!("gradient of shape {:?} added to {:?}", g.dims(), acc.dims());
    }
    if acc.dtype() == DType::BF16 {
        let seed = ROUNDING_SEED.fetch_add(1, Ordering::Relaxed);
        return crate::sround::add_stochastic_bf16(acc, g, seed)
            .map_err(|e| candle_core::Error::Msg(e.to_string()));
    }
    let g = g.to_dtype(acc.dtype())?;
    if fast_path(&[acc, &g]) && acc.is_contiguous() {
        return acc.inplace_op2(&g.contiguous()?, &AddAssign);
    }
    *acc = (&*acc + g)?;
    Ok(())
}

/// `acc += a · b` for `acc` `[M, N]`, `a` `[M, K]`, `b` `[K, N]` (any strides): the matmul
/// kernel adds its product straight into the accumulator.
struct AddMatmul;

impl InplaceOp3 for AddMatmul {
    fn name(&self) -> &'static str {
        "dpo-add-matmul"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        acc_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> CResult<()> {
        let (Some((start, end)), &[m, n], &[am, k], &[bk, bn]) =
            (acc_l.contiguous_offsets(), acc_l.dims(), a_l.dims(), b_l.dims())
        else {
            candle_core::bail!("add-matmul expects a contiguous 2-D accumulator and 2-D operands");
        };
        if (am, bn, bk) != (m, n, k) {
            candle_core::bail!("add-matmul: {am}x{k} times {bk}x{bn} into {m}x{n}");
        }
        let dst = match acc {
            CpuStorage::F32(d) => &mut d[start..end],
            _ => candle_core::bail!("add-matmul expects an f32 accumulator"),
        };
        if m * n * k == 0 {
            return Ok(());
        }
        let (a, b) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
        // The last element each operand reads must lie in its storage (the kernel takes raw
        // pointers; every dim is at least 1 here).
        let reach = |l: &Layout, len: usize| {
            let last: usize = l.dims().iter().zip(l.stride()).map(|(d, s)| (d - 1) * s).sum();
            l.start_offset() + last < len
        };
        if !reach(a_l, a.len()) || !reach(b_l, b.len()) {
            candle_core::bail!("add-matmul: an operand's layout reaches past its storage");
        }
        let threads = rayon::current_num_threads();
        let parallelism =
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        // SAFETY: dst is m×n contiguous (checked above); every index the kernel forms from
        // the operands' dims and strides was checked to lie inside their storage.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                true,
                a.as_ptr().add(a_l.start_offset()),
                a_l.stride()[1] as isize,
                a_l.stride()[0] as isize,
                b.as_ptr().add(b_l.start_offset()),
                b_l.stride()[1] as isize,
                b_l.stride()[0] as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok(())
    }
}

/// `acc += a · b`: a weight's gradient (`dyᵀ · x`) added into its accumulator. For f32
/// CPU tensors the product goes straight into `acc`, with no weight-sized temporary to
/// allocate, zero and add (per micro-batch that was every weight's size in transient
/// memory and two extra passes over it); otherwise it is [`accumulate`] of the product.
pub fn accumulate_matmul(acc: &mut Tensor, a: &Tensor, b: &Tensor) -> CResult<()> {
    if fast_path(&[acc, a, b]) && acc.is_contiguous() && acc.rank() == 2 {
        return acc.inplace_op3(a, b, &AddMatmul);
    }
    accumulate(acc, &a.matmul(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernel::tests::randn;
    use candle_core::DType;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn f64(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F64).unwrap()
    }

    // Each kernel (f32, CPU) against its composite fallback (taken for f64). The composites
    // themselves are checked against autograd / finite differences in `ops` and in
    // `tests/model.rs`.

    #[test]
    fn softmax_grad_kernel_matches_composite() {
        let y = candle_nn::ops::softmax_last_dim(&randn(&[3, 4, 9], 1)).unwrap();
        let g = randn(&[3, 4, 9], 2);
        let fast = softmax_grad(&y, &g, 0.3).unwrap();
        let slow = softmax_grad(&f64(&y), &f64(&g), 0.3).unwrap();
        assert!(max_diff(&fast, &slow) < 1e-6);
    }

    #[test]
    fn rms_norm_grad_kernel_matches_composite() {
        let (x, w, g) = (randn(&[5, 2, 16], 3), randn(&[16], 4), randn(&[5, 2, 16], 5));
        let (dx, dw) = rms_norm_grad(&x, &w, &g, 1e-5).unwrap();
        let (dx64, dw64) = rms_norm_grad(&f64(&x), &f64(&w), &f64(&g), 1e-5).unwrap();
        assert_eq!(dx.dims(), x.dims());
        assert!(max_diff(&dx, &dx64) < 1e-5, "{}", max_diff(&dx, &dx64));
        assert!(max_diff(&dw, &dw64) < 1e-5, "{}", max_diff(&dw, &dw64));
    }

    #[test]
    fn swiglu_grad_kernel_matches_composite() {
        let (a, u, g) = (randn(&[4, 33], 6), randn(&[4, 33], 7), randn(&[4, 33], 8));
        let a = a.affine(4.0, 0.0).unwrap();
        let (da, du) = swiglu_grad(&a, &u, &g).unwrap();
        let (da64, du64) = swiglu_grad(&f64(&a), &f64(&u), &f64(&g)).unwrap();
        assert!(max_diff(&da, &da64) < 1e-5);
        assert!(max_diff(&du, &du64) < 1e-5);
    }

    #[test]
    fn accumulate_adds_in_place_and_checks_shapes() {
        let mut acc = randn(&[300, 400], 9);
        let alias = acc.clone(); // shares the storage
        let g = randn(&[300, 400], 10);
        let expected = (acc.copy().unwrap() + &g).unwrap();
        accumulate(&mut acc, &g).unwrap();
        // In place: the alias sees the sum too.
        assert!(max_diff(&alias, &expected) < 1e-7);
        assert!(max_diff(&acc, &expected) < 1e-7);
        assert!(accumulate(&mut acc, &randn(&[3], 1)).is_err());
    }

    /// The backward's weight gradients: `dyᵀ · x` (a transposed view times a contiguous
    /// matrix), also from views with offsets, added in place; f64 takes the composite path.
    #[test]
    fn accumulate_matmul_adds_the_product_in_place() {
        for (m, n, k) in [(300, 200, 37), (7, 5, 1), (64, 48, 600)] {
            let mut acc = randn(&[m, n], 1);
            let alias = acc.clone();
            let dy = randn(&[k, m], 2);
            let x = randn(&[k + 3, n], 3).narrow(0, 3, k).unwrap(); // starts at an offset
            let expected = (acc.copy().unwrap() + dy.t().unwrap().matmul(&x).unwrap()).unwrap();
            accumulate_matmul(&mut acc, &dy.t().unwrap(), &x).unwrap();
            assert!(max_diff(&alias, &expected) < 1e-4, "{m}x{n}x{k}");
            // Both operands transposed views.
            let expected = (acc.copy().unwrap()
                + dy.t().unwrap().matmul(&x.t().unwrap().contiguous().unwrap().t().unwrap()))
            .unwrap();
            let xt = x.t().unwrap().contiguous().unwrap();
            accumulate_matmul(&mut acc, &dy.t().unwrap(), &xt.t().unwrap()).unwrap();
            assert!(max_diff(&acc, &expected) < 1e-4, "{m}x{n}x{k} (transposed)");
            let mut acc64 = f64(&acc);
            let expected = (f64(&acc) + f64(&dy).t().unwrap().matmul(&f64(&x)).unwrap()).unwrap();
            accumulate_matmul(&mut acc64, &f64(&dy).t().unwrap(), &f64(&x)).unwrap();
            assert!(max_diff(&acc64, &expected) < 1e-12);
        }
        let mut acc = randn(&[4, 5], 1);
        assert!(accumulate_matmul(&mut acc, &randn(&[4, 3], 2), &randn(&[2, 5], 3)).is_err());
        // An empty inner dimension adds nothing.
        let before = acc.copy().unwrap();
        let empty = Tensor::zeros((4, 0), DType::F32, &candle_core::Device::Cpu).unwrap();
        let empty_t = Tensor::zeros((0, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
        accumulate_matmul(&mut acc, &empty, &empty_t).unwrap();
        assert_eq!(max_diff(&acc, &before), 0.0);
    }
}
