//! What the CPU kernels of `ops` and `grad_ops` share: when a tensor takes the hand-written
//! f32 path, how a kernel reads its arguments, and how it spreads rows over the thread pool.

use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;

pub(crate) type CResult<T> = candle_core::Result<T>;

/// Whether every tensor is f32 on the CPU, where the hand-written kernels apply; any other
/// device or dtype takes the composite of candle ops.
pub(crate) fn fast_path(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The contiguous data of a CPU tensor argument.
pub(crate) fn slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> CResult<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("custom op expects a contiguous tensor"),
    }
}

/// Below this many elements a kernel runs on the calling thread: handing a few thousand
/// floats to the thread pool costs more than it saves.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Runs `f(row_index, out_row)` over the rows of `out` (rows of `n` elements), on the
/// thread pool when the work is large enough. Rows are independent, so results do not
/// depend on the number of threads.
pub(crate) fn for_each_row(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if n == 0 {
        return;
    }
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_exact_mut(n).enumerate().for_each(|(i, r)| f(i, r));
        return;
    }
    let rows_per_task = (PAR_MIN_ELEMS / 4 / n).max(1);
    out.par_chunks_mut(n * rows_per_task).enumerate().for_each(|(c, chunk)| {
        for (j, r) in chunk.chunks_exact_mut(n).enumerate() {
            f(c * rows_per_task + j, r);
        }
    });
}

/// `1 / sqrt(mean(x²) + eps)` of one row, for the RMS norm and its gradient. f64
/// accumulation: a long f32 sum drops small terms systematically and biases the result.
pub(crate) fn inv_rms(xr: &[f32], eps: f32) -> f32 {
    let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / xr.len() as f64;
    (1.0 / (ms + eps as f64).sqrt()) as f32
}

/// Tensors for the kernels' tests: deterministic inputs and the distance between results.
#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Tensor};

    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
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

    pub(crate) fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    #[test]
    fn rows_see_their_own_index_on_and_off_the_pool() {
        for len in [64, super::PAR_MIN_ELEMS * 4] {
            let mut out = vec![0f32; len];
            super::for_each_row(&mut out, 16, |i, r| r.fill(i as f32));
            assert!(out.chunks(16).enumerate().all(|(i, r)| r.iter().all(|&v| v == i as f32)));
        }
    }
}
