//! Weight matrices laid out once for the CPU matmul kernel, for frozen (inference-only)
//! models.
//!
//! A projection `y = x·Wᵀ` with `W` in Hugging Face layout (`[out, in]`, row-major) makes
//! gemm repack `W` on every call: it wants `W` as column-major panels of a few rows, and
//! gathers them one scalar at a time with a stride of a whole row, redone for every
//! sequence: on a lone short sequence that gather is a large share of the forward. Here
//! the panels are built once, at load: panel `q` holds rows `q*PANEL .. q*PANEL + PANEL`
//! column-major, so every call hands gemm a contiguous column-major block it reads as it
//! is, and the threads split the output by panels.
//!
//! The arithmetic is gemm's own microkernel, with the same accumulation order along the
//! inner dimension, so the results are those of candle's matmul up to float rounding of the
//! inner blocking (equal in the layer shapes measured; ≤ 1e-5 relative on the vocabulary
//! projection).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::kernel::{slice, CResult};
use crate::error::{Error, Result};

/// Rows per panel. A multiple of the microkernel's 16-row block; 32 measured best on
/// SmolLM2's shapes (16, 24 and 64 were slower on the small key/value and vocabulary
/// projections).
const PANEL: usize = 32;

/// Below this many multiply-adds a projection runs on the calling thread.
const PAR_MIN_FLOPS: usize = 1 << 18;

/// A projection's weight `[out, in]`: the tensor itself (what autograd, saving and every
/// device use), or packed for CPU inference (see [`Llama::pack_for_inference`]).
///
/// [`Llama::pack_for_inference`]: super::Llama::pack_for_inference
#[derive(Clone)]
pub(crate) enum Weight {
    Dense(Tensor),
    Packed(Arc<PackedMatrix>),
}

impl Weight {
    /// `x·Wᵀ` for `x` `[.., in]`: `[.., out]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(x.matmul(&w.t()?)?),
            Weight::Packed(p) => p.matmul_t(x),
        }
    }

    /// Rows `ids` (u32, 1-D) of the matrix: an embedding lookup.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.index_select(ids, 0)?),
            Weight::Packed(p) => p.rows_of(&ids.to_vec1::<u32>()?),
        }
    }

    /// The tensor, for what needs it as it is (the backward): packed weights have none.
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Weight::Dense(w) => Ok(w),
            Weight::Packed(_) => Err(Error::Unsupported(
                "a model packed for inference has no gradients; load it as trainable".into(),
            )),
        }
    }

    /// The tensor in Hugging Face layout (unpacked into a new one when packed).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Packed(p) => p.unpack(),
        }
    }

    /// Packs a dense CPU f32 weight; anything else stays as it is.
    pub fn packed(&self) -> Result<Weight> {
        match self {
            Weight::Dense(w) if w.device().is_cpu() && w.dtype() == DType::F32 => {
                Ok(Weight::Packed(Arc::new(PackedMatrix::pack(w)?)))
            }
            other => Ok(other.clone()),
        }
    }
}

/// A `[rows, cols]` f32 matrix stored as column-major panels of [`PANEL`] rows (the last
/// one zero-padded).
pub(crate) struct PackedMatrix {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl PackedMatrix {
    /// Packs a `[rows, cols]` CPU tensor (converted to f32 first if it is not).
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        // Read in place: a copy of the largest matrix (the embeddings) would add to the
        // server's peak memory at start-up.
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(Error::Unsupported("packing weights that are not on the CPU".into()));
        };
        let src = slice::<f32>(cpu, layout)?;
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![0f32; panels * PANEL * cols];
        for (q, panel) in data.chunks_mut(PANEL * cols).enumerate() {
            let first = q * PANEL;
            let height = PANEL.min(rows - first);
            for r in 0..height {
                let row = &src[(first + r) * cols..(first + r + 1) * cols];
                for (k, &v) in row.iter().enumerate() {
                    panel[k * PANEL + r] = v;
                }
            }
        }
        Ok(PackedMatrix { data, rows, cols })
    }

    #[cfg(test)]
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The matrix back in row-major `[rows, cols]` layout, as a CPU f32 tensor.
    pub fn unpack(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate() {
            self.copy_row(r, row);
        }
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &candle_core::Device::Cpu)?)
    }

    fn copy_row(&self, r: usize, out: &mut [f32]) {
        let panel = &self.data[(r / PANEL) * PANEL * self.cols..];
        let i = r % PANEL;
        for (k, o) in out.iter_mut().enumerate() {
            *o = panel[k * PANEL + i];
        }
    }

    /// Rows `ids` (an embedding lookup): `[ids.len(), cols]` on the CPU. Ids are checked
    /// against the row count.
    pub fn rows_of(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, row) in ids.iter().zip(out.chunks_mut(self.cols.max(1))) {
            if id as usize >= self.rows {
                return Err(Error::Input(format!(
                    "row {id} is out of range for a {}-row matrix",
                    self.rows
                )));
            }
            self.copy_row(id as usize, row);
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &candle_core::Device::Cpu)?)
    }

    /// `x·Wᵀ` for `x` `[.., cols]` (CPU, f32): `[.., rows]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1_no_bwd(&PackedMatmulT(self))?)
    }

    /// `out[m, rows] = x[m, cols]·Wᵀ`, one gemm call per panel.
    fn matmul_t_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        debug_assert!(x.len() == m * cols && out.len() == m * rows);
        if m == 0 || rows == 0 {
            return;
        }
        if cols == 0 {
            out.fill(0.0);
            return;
        }
        let out_ptr = SendPtr(out.as_mut_ptr());
        let panel = |q: usize| {
            let first = q * PANEL;
            let height = PANEL.min(rows - first);
            // SAFETY: in gemm's terms this is dst[height, m] = lhs[height, cols] ·
            // rhs[cols, m] with dst(i, j) = out[j*rows + first + i], lhs(i, k) =
            // panel[k*PANEL + i] and rhs(k, j) = x[j*cols + k]: every index stays inside
            // `out`, the panel and `x` (whose lengths are checked above), and panels write
            // disjoint column ranges of `out`, so concurrent calls never alias.
            unsafe {
                gemm::gemm(
                    height,
                    m,
                    cols,
                    out_ptr.get().add(first),
                    rows as isize,
                    1,
                    false,
                    self.data.as_ptr().add(first * cols),
                    PANEL as isize,
                    1,
                    x.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        let panels = rows.div_ceil(PANEL);
        if m * rows * cols < PAR_MIN_FLOPS || panels == 1 {
            (0..panels).for_each(panel);
        } else {
            (0..panels).into_par_iter().for_each(panel);
        }
    }
}

/// A raw output pointer the panel tasks share (they write disjoint columns).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: see `matmul_t_into`: the tasks holding it write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method, not a field access, so closures capture the whole (Sync) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

struct PackedMatmulT<'a>(&'a PackedMatrix);

impl CustomOp1 for PackedMatmulT<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let w = self.0;
        let dims = l.dims();
        if dims.last() != Some(&w.cols) {
            candle_core::bail!(
                "packed matmul: input {dims:?} for a [{}, {}] weight",
                w.rows,
                w.cols
            );
        }
        let x = slice::<f32>(s, l)?;
        let m = x.len() / w.cols.max(1);
        let mut out = vec![0f32; m * w.rows];
        w.matmul_t_into(x, m, &mut out);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = w.rows;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernel::tests::{max_abs, max_diff};
    use candle_core::Device;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn packing_round_trips_for_any_row_count() {
        for rows in [1, 31, 32, 33, 100] {
            let w = matrix(rows, 7, rows as u32);
            let p = PackedMatrix::pack(&w).unwrap();
            assert_eq!(p.dims(), (rows, 7));
            assert_eq!(max_diff(&p.unpack().unwrap(), &w), 0.0, "{rows} rows");
        }
    }

    #[test]
    fn matmul_matches_candle_on_ragged_shapes_serial_and_parallel() {
        // (tokens, out, in): partial last panels, one token, and sizes over the threshold.
        for (m, n, k) in [(1, 5, 3), (7, 33, 16), (93, 192, 64), (40, 97, 576), (3, 64, 1)] {
            let x = matrix(m, k, 1);
            let w = matrix(n, k, 2);
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = PackedMatrix::pack(&w).unwrap().matmul_t(&x).unwrap();
            assert_eq!(got.dims(), [m, n]);
            let scale = max_abs(&want);
            assert!(max_diff(&got, &want) <= 1e-5 * scale.max(1.0), "{m}x{n}x{k}");
        }
    }

    #[test]
    fn matmul_keeps_leading_dims_and_takes_strided_input() {
        let w = PackedMatrix::pack(&matrix(40, 8, 3)).unwrap();
        let x = matrix(8, 6, 4).reshape((2, 8, 3)).unwrap().transpose(1, 2).unwrap(); // [2, 3, 8]
        let got = w.matmul_t(&x).unwrap();
        assert_eq!(got.dims(), [2, 3, 40]);
        let want = x
            .contiguous()
            .unwrap()
            .reshape((6, 8))
            .unwrap()
            .matmul(&w.unpack().unwrap().t().unwrap())
            .unwrap();
        assert!(max_diff(&got.reshape((6, 40)).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn shape_errors_and_bad_rows_are_reported() {
        let w = PackedMatrix::pack(&matrix(10, 4, 5)).unwrap();
        let err = w.matmul_t(&matrix(2, 5, 6)).unwrap_err().to_string();
        assert!(err.contains("[10, 4]"), "{err}");
        let err = w.rows_of(&[3, 10]).unwrap_err().to_string();
        assert!(err.contains("row 10"), "{err}");
        let rows = w.rows_of(&[9, 0]).unwrap();
        let dense = matrix(10, 4, 5);
        let want =
            Tensor::cat(&[dense.narrow(0, 9, 1).unwrap(), dense.narrow(0, 0, 1).unwrap()], 0)
                .unwrap();
        assert_eq!(max_diff(&rows, &want), 0.0);
    }

    #[test]
    fn empty_inputs_give_empty_outputs() {
        let w = PackedMatrix::pack(&matrix(10, 4, 7)).unwrap();
        let x = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(w.matmul_t(&x).unwrap().dims(), [0, 10]);
    }
}
