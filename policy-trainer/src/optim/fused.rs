//! RMSprop's update as two in-place passes over f32 CPU tensors, for the common case (f32
//! weights on a CPU). The composite path in `rmsprop.rs` forms about six parameter-sized
//! temporaries per tensor; for a large embedding matrix that is more memory, at the step's
//! peak, than the activations of a whole micro-batch. The arithmetic is the composite
//! path's, op for op in f32, so both give the same bits (tested).

use candle_core::{CpuStorage, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;

use super::config::RmsPropConfig;

type CResult<T> = candle_core::Result<T>;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("fused RMSprop expects contiguous tensors"),
    }
}

fn contiguous_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> CResult<&'a mut [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("fused RMSprop expects contiguous tensors".into())
    })?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("fused RMSprop expects f32"),
    }
}

/// The gradient with weight decay, as the composite path forms it: `g + p·wd`.
fn decayed(g: f32, p: f32, wd: f32, decay: bool) -> f32 {
    if decay {
        g + p * wd
    } else {
        g
    }
}

/// `v = α·v + (1 − α)·g²` in place on `v`; the inputs are `(p, g)`.
struct SquareAvg {
    alpha: f32,
    one_minus_alpha: f32,
    wd: f32,
    decay: bool,
}

impl InplaceOp3 for SquareAvg {
    fn name(&self) -> &'static str {
        "dpo-rmsprop-square-avg"
    }

    fn cpu_fwd(
        &self,
        vs: &mut CpuStorage,
        vl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<()> {
        let v = contiguous_mut(vs, vl)?;
        let (p, g) = (contiguous(ps, pl)?, contiguous(gs, gl)?);
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, vc)| {
            let o = c * CHUNK;
            for (k, v) in vc.iter_mut().enumerate() {
                let g = decayed(g[o + k], p[o + k], self.wd, self.decay);
                *v = *v * self.alpha + g * g * self.one_minus_alpha;
            }
        });
        Ok(())
    }
}

/// `p = p + (g / (sqrt(v) + eps))·(−lr)` in place on `p`; the inputs are `(v, g)`.
struct Update {
    neg_lr: f32,
    eps: f32,
    wd: f32,
    decay: bool,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "dpo-rmsprop-update"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<()> {
        let p = contiguous_mut(ps, pl)?;
        let (v, g) = (contiguous(vs, vl)?, contiguous(gs, gl)?);
        p.par_chunks_mut(CHUNK).enumerate().for_each(|(c, pc)| {
            let o = c * CHUNK;
            for (k, p) in pc.iter_mut().enumerate() {
                let g = decayed(g[o + k], *p, self.wd, self.decay);
                *p += (g / (v[o + k].sqrt() + self.eps)) * self.neg_lr;
            }
        });
        Ok(())
    }
}

/// Whether [`step`] applies: f32 contiguous tensors on the CPU.
pub fn applies(p: &Tensor, v: &Tensor, g: &Tensor) -> bool {
    [p, v, g]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
        && p.dims() == v.dims()
        && p.dims() == g.dims()
}

/// One RMSprop step on parameter `p` with square average `v` and gradient `g`, in place.
pub fn step(p: &Tensor, v: &Tensor, g: &Tensor, cfg: &RmsPropConfig) -> CResult<()> {
    let decay = cfg.weight_decay != 0.0;
    let wd = cfg.weight_decay as f32;
    let sq =
        SquareAvg { alpha: cfg.alpha as f32, one_minus_alpha: (1.0 - cfg.alpha) as f32, wd, decay };
    v.inplace_op3(p, g, &sq)?;
    p.inplace_op3(v, g, &Update { neg_lr: -cfg.lr as f32, eps: cfg.eps as f32, wd, decay })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(seed: u32, n: usize) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 997.0 - 0.5)
            .collect();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    /// The composite path's ops (rmsprop.rs), for comparison.
    fn composite(p: &Tensor, v: &Tensor, g: &Tensor, cfg: &RmsPropConfig) -> (Tensor, Tensor) {
        let g = if cfg.weight_decay != 0.0 {
            (g + p.affine(cfg.weight_decay, 0.0).unwrap()).unwrap()
        } else {
            g.clone()
        };
        let v = (v.affine(cfg.alpha, 0.0).unwrap()
            + g.sqr().unwrap().affine(1.0 - cfg.alpha, 0.0).unwrap())
        .unwrap();
        let avg = (v.sqrt().unwrap() + cfg.eps).unwrap();
        let update = (g / avg).unwrap().affine(-cfg.lr, 0.0).unwrap();
        ((p + update).unwrap(), v)
    }

    #[test]
    fn in_place_step_equals_the_composite_ops_bit_for_bit() {
        let n = 100_003; // several parallel chunks and a ragged tail
        for wd in [0.0, 0.1] {
            let cfg = RmsPropConfig { lr: 3e-3, weight_decay: wd, ..Default::default() };
            let (p, g) = (t(1, n), t(2, n));
            let v = t(3, n).abs().unwrap();
            let (want_p, want_v) = composite(&p, &v, &g, &cfg);
            let (p, v) = (p.copy().unwrap(), v.copy().unwrap());
            assert!(applies(&p, &v, &g));
            step(&p, &v, &g, &cfg).unwrap();
            for (a, b) in [(&p, &want_p), (&v, &want_v)] {
                let a = a.to_vec1::<f32>().unwrap();
                let b = b.to_vec1::<f32>().unwrap();
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "wd {wd}");
            }
        }
        let bf = t(1, 4).to_dtype(DType::BF16).unwrap();
        assert!(!applies(&bf, &t(1, 4), &t(1, 4)));
    }
}
