//! Gradient accumulation over micro-batches and global-norm clipping.
//!
//! The sums are f32 by default (`--grad-dtype f32`), whatever the parameters' dtype, so
//! accumulating 64 bf16 micro-batch gradients loses nothing to rounding. With bf16 sums
//! (`--grad-dtype bf16`, half the memory: 16 GB instead of 32 for an 8B model) every add is
//! formed in f32 and rounded to bf16 *stochastically* (`dpo_common::model::grad_ops::accumulate`,
//! which the hand-written backward calls for each weight gradient as it is formed). Why not
//! round to nearest: a bf16 sum keeps 8 significant bits, so an addend below 2^-9 of the
//! running sum (one micro-batch's share after a large one) would be dropped outright, every
//! time; rounded stochastically it is kept in expectation, at the cost of noise of about one
//! bf16 spacing of the sum. (Summing each step in f32 and storing the result in bf16 would
//! need the f32 sums to exist during the step: no memory saved.) The norm and clipping
//! compute in f32 whatever the sums' dtype.
//!
//! The caller scales each micro-batch's loss (or calls [`GradAccumulator::scale`]) to get a
//! mean.

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use dpo_common::model::grad_ops;

/// Elements per chunk when a bf16 sum is read in f32 (the norm): a 64 MB f32 copy at most.
const F32_CHUNK: usize = 1 << 24;

/// Sum of the gradients of a fixed list of parameters, in the order they were given.
pub struct GradAccumulator {
    ids: Vec<TensorId>,
    grads: Vec<Tensor>,
    count: usize,
}

impl GradAccumulator {
    /// Zero gradients of `dtype` (f32 or bf16) shaped like `vars`, on their devices.
    pub fn new(vars: &[Var], dtype: DType) -> Result<Self> {
        ensure!(
            matches!(dtype, DType::F32 | DType::BF16),
            "gradients accumulate in f32 or bf16, not {dtype:?}"
        );
        let grads = vars
            .iter()
            .map(|v| Tensor::zeros(v.shape(), dtype, v.device()))
            .collect::<candle_core::Result<Vec<_>>>()
            .context("allocating the gradient accumulator")?;
        Ok(GradAccumulator { ids: vars.iter().map(|v| v.id()).collect(), grads, count: 0 })
    }

    /// The dtype of the sums.
    pub fn dtype(&self) -> DType {
        self.grads.first().map_or(DType::F32, Tensor::dtype)
    }

    /// Adds the gradient of every parameter from one backward pass. A parameter without a
    /// gradient is an error: it means the graph was cut (a detach or a non-differentiable op)
    /// and training would silently leave it frozen.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        // Check everything first so a failure leaves the sums untouched.
        let mut found = Vec::with_capacity(self.ids.len());
        for (i, (id, acc)) in self.ids.iter().zip(&self.grads).enumerate() {
            let Some(g) = grads.get_id(*id) else {
                bail!(
                    "no gradient for parameter {i} (shape {:?}): it is not connected to the loss",
                    acc.dims()
                );
            };
            ensure!(
                g.dims() == acc.dims(),
                "gradient of parameter {i} has shape {:?}, the parameter {:?}",
                g.dims(),
                acc.dims()
            );
            found.push(g);
        }
        for (acc, g) in self.grads.iter_mut().zip(found) {
            // candle's gradients are built from the forward's tensors and still carry their
            // graph: detached, the sums (and the optimizer state computed from them) hold
            // values only, not every micro-batch's activations for the rest of the run.
            // The same add as the hand-written backward's (stochastic into bf16).
            grad_ops::accumulate(acc, &g.detach())?;
        }
        self.count += 1;
        Ok(())
    }

    /// Lets `f` add one backward pass's gradients into the sums in place (the hand-written
    /// backward, `dpo_common::model::backward`, adds each weight's gradient as soon as it is
    /// formed, so no second copy of the gradients ever exists). The slice is in the order
    /// of the variables given to `new` (`Llama::params()` order for a model's `vars()`).
    pub fn add_with<T>(&mut self, f: impl FnOnce(&mut [Tensor]) -> Result<T>) -> Result<T> {
        let out = f(&mut self.grads)?;
        self.count += 1;
        Ok(out)
    }

    /// Multiplies every accumulated gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        ensure!(factor.is_finite(), "cannot scale gradients by {factor}");
        for g in &mut self.grads {
            *g = match g.dtype() {
                DType::F32 => g.affine(factor, 0.0)?,
                // In f32: candle's bf16 affine would first round `factor` itself to bf16.
                // One rounding of each element, as storing it in bf16 already does.
                dtype => g.to_dtype(DType::F32)?.affine(factor, 0.0)?.to_dtype(dtype)?,
            };
        }
        Ok(())
    }

    /// Resets the sums to zero and the count of added backward passes to 0.
    pub fn zero(&mut self) -> Result<()> {
        for g in &mut self.grads {
            *g = g.zeros_like()?;
        }
        self.count = 0;
        Ok(())
    }

    /// Backward passes added since creation or the last [`zero`](Self::zero).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Global L2 norm of all accumulated gradients (per-tensor sums of squares in f32, as
    /// PyTorch does, combined in f64).
    pub fn norm(&self) -> Result<f64> {
        let mut sum = 0.0f64;
        for g in &self.grads {
            sum += sum_of_squares(g)?;
        }
        Ok(sum.sqrt())
    }

    /// The accumulated gradients (f32 or bf16), one per parameter in the order given to
    /// `new`.
    pub fn grads(&self) -> &[Tensor] {
        &self.grads
    }

    pub(super) fn ids(&self) -> &[TensorId] {
        &self.ids
    }
}

/// Σ g² of one tensor in f32. A bf16 tensor is read in f32 a chunk at a time: squared and
/// summed in bf16, the sum would stop growing once it outgrew each square 2^9-fold.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if g.dtype() == DType::F32 {
        return Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64);
    }
    let flat = g.flatten_all()?;
    let n = flat.elem_count();
    let mut sum = 0.0f64;
    for start in (0..n).step_by(F32_CHUNK) {
        let chunk = flat.narrow(0, start, F32_CHUNK.min(n - start))?.to_dtype(DType::F32)?;
        sum += chunk.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sum)
}

/// Scales the gradients so their global norm is at most `max_norm` and returns the norm
/// before clipping (`torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`,
/// capped at 1). `max_norm <= 0` disables clipping; the norm is still returned.
///
/// A non-finite norm is an error rather than a step: applying it would write NaN into every
/// weight.
pub fn clip_grad_norm(acc: &mut GradAccumulator, max_norm: f64) -> Result<f64> {
    let norm = acc.norm()?;
    ensure!(
        norm.is_finite(),
        "the gradient norm is {norm}: the loss diverged or a gradient overflowed (not stepping)"
    );
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            acc.scale(coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sums_hold_values_not_the_graph() {
        // The gradient of a·a depends on `a` itself, so candle's gradient tensor carries
        // graph; kept in the sums, it would keep every micro-batch's activations alive.
        let (a, b) = setup();
        let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(a.as_tensor()).unwrap().track_op(),
            "premise: candle's grads are tracked"
        );
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone()], DType::F32).unwrap();
        acc.add(&grads).unwrap();
        acc.add(&grads).unwrap();
        assert!(acc.grads().iter().all(|g| !g.track_op()));
    }

    fn setup() -> (Var, Var) {
        let a = Var::from_vec(vec![1.0f32, -2.0, 3.0], 3, &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![0.5f32, 0.25], 2, &Device::Cpu).unwrap();
        (a, b)
    }

    /// loss = Σ w·a + Σ b² ⇒ grad a = w, grad b = 2b.
    fn backward(a: &Var, b: &Var, w: &[f32]) -> GradStore {
        let w = Tensor::new(w, &Device::Cpu).unwrap();
        let loss = ((a.as_tensor() * w).unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        loss.backward().unwrap()
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn sums_scales_zeroes_and_norms() {
        // Every value here is exact in bf16 too, so both dtypes give the same numbers.
        for dtype in [DType::F32, DType::BF16] {
            let (a, b) = setup();
            let mut acc = GradAccumulator::new(&[a.clone(), b.clone()], dtype).unwrap();
            assert_eq!(acc.dtype(), dtype);
            acc.add(&backward(&a, &b, &[1.0, 2.0, 3.0])).unwrap();
            acc.add(&backward(&a, &b, &[3.0, 2.0, 1.0])).unwrap();
            assert_eq!(acc.count(), 2);
            assert_eq!(f32s(&acc.grads()[0]), [4.0, 4.0, 4.0]);
            assert_eq!(f32s(&acc.grads()[1]), [2.0, 1.0]);
            acc.scale(0.5).unwrap();
            assert_eq!(f32s(&acc.grads()[0]), [2.0, 2.0, 2.0]);
            assert!(acc.grads().iter().all(|g| g.dtype() == dtype));
            let expected = (3.0 * 4.0f64 + 1.0 + 0.25).sqrt();
            assert!((acc.norm().unwrap() - expected).abs() < 1e-6);
            acc.zero().unwrap();
            assert_eq!(acc.count(), 0);
            assert_eq!(acc.norm().unwrap(), 0.0);
            assert_eq!(acc.dtype(), dtype);
        }
        let (a, _) = setup();
        assert!(GradAccumulator::new(&[a], DType::F16).is_err());
    }

    /// bf16 sums, added into as the hand-written backward does (`grad_ops::accumulate`):
    /// one micro-batch gradient of about 1, then 63 of about 1e-3 (one pair with a large loss,
    /// the rest with small ones). Round-to-nearest would stay at the first gradient (1e-3 is
    /// under half of bf16's spacing at 1, 2^-8); the stochastic adds keep the f32 sum to well
    /// within that.
    #[test]
    fn bf16_sums_keep_the_small_gradients_round_to_nearest_loses() {
        const N: usize = 4096;
        let w = Var::zeros(N, DType::F32, &Device::Cpu).unwrap();
        let big: Vec<f32> = (0..N).map(|i| 0.9 + 0.2 * (i % 7) as f32 / 7.0).collect();
        let small: Vec<f32> = (0..N).map(|i| 1e-3 * (1.0 + (i % 3) as f32 / 3.0)).collect();
        let (big, small) =
            (Tensor::new(big, &Device::Cpu).unwrap(), Tensor::new(small, &Device::Cpu).unwrap());
        let sums = |dtype: DType| {
            let mut acc = GradAccumulator::new(std::slice::from_ref(&w), dtype).unwrap();
            for k in 0..64 {
                let g = if k == 0 { &big } else { &small };
                acc.add_with(|sums| Ok(grad_ops::accumulate(&mut sums[0], g)?)).unwrap();
            }
            assert_eq!(acc.count(), 64);
            (f32s(&acc.grads()[0]), acc.norm().unwrap())
        };
        let (exact, exact_norm) = sums(DType::F32);
        let (sr, sr_norm) = sums(DType::BF16);
        // Round-to-nearest in bf16, for comparison.
        let mut rtn = big.to_dtype(DType::BF16).unwrap();
        for _ in 1..64 {
            rtn = (rtn.to_dtype(DType::F32).unwrap() + &small)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
        }
        let rtn = f32s(&rtn);
        let mean_err =
            |v: &[f32]| v.iter().zip(&exact).map(|(a, b)| (a - b) as f64).sum::<f64>() / N as f64;
        // Each element's 63 rounding errors are martingale differences of at most one spacing
        // (2^-7 on [1, 2)): the mean error over N elements has sd ≤ sqrt(63 / 4)·2^-7/sqrt(N).
        let tol = 5.0 * (63.0f64 / 4.0).sqrt() * 2f64.powi(-7) / (N as f64).sqrt();
        let (e_sr, e_rtn) = (mean_err(&sr), mean_err(&rtn));
        eprintln!("mean error: stochastic {e_sr:.2e}, nearest {e_rtn:.2e}, tolerance {tol:.2e}");
        assert!(e_sr.abs() < tol, "stochastic bf16 sums are off by {e_sr} on average (tol {tol})");
        assert!(e_rtn.abs() > 10.0 * tol, "premise: round-to-nearest loses the small gradients");
        // The norm (computed in f32) follows too: 0.3% is a tenth of what is lost to nearest.
        let rel = (sr_norm - exact_norm).abs() / exact_norm;
        assert!(rel < 3e-3, "norm {sr_norm} vs {exact_norm}");
    }

    /// A bf16 sum's norm is taken in f32: in bf16, a sum of 100,000 squares of 1 would stop
    /// growing at 256 + 1 rounding to 256.
    #[test]
    fn bf16_norm_and_clipping_compute_in_f32() {
        let w = Var::zeros(100_000, DType::F32, &Device::Cpu).unwrap();
        let mut acc = GradAccumulator::new(std::slice::from_ref(&w), DType::BF16).unwrap();
        let ones = Tensor::ones(100_000, DType::F32, &Device::Cpu).unwrap();
        acc.add_with(|sums| Ok(grad_ops::accumulate(&mut sums[0], &ones)?)).unwrap();
        let norm = acc.norm().unwrap();
        assert!((norm - 1e5f64.sqrt()).abs() < 1e-6 * norm, "{norm}");
        clip_grad_norm(&mut acc, 1.0).unwrap();
        assert_eq!(acc.dtype(), DType::BF16);
        // 1/316.2 in bf16 is within 2^-9 relative of the exact coefficient.
        assert!((acc.norm().unwrap() - 1.0).abs() < 4e-3, "{}", acc.norm().unwrap());
    }

    #[test]
    fn a_parameter_without_gradient_is_an_error() {
        let (a, b) = setup();
        let c = Var::from_vec(vec![1.0f32], 1, &Device::Cpu).unwrap();
        let mut acc = GradAccumulator::new(&[a.clone(), c, b.clone()], DType::F32).unwrap();
        let err = acc.add(&backward(&a, &b, &[1.0, 1.0, 1.0])).unwrap_err();
        assert!(err.to_string().contains("parameter 1"), "{err}");
        assert_eq!(acc.count(), 0);
        assert_eq!(acc.norm().unwrap(), 0.0, "a failed add changes nothing");
    }

    #[test]
    fn clipping_follows_torch() {
        let (a, b) = setup();
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone()], DType::F32).unwrap();
        acc.add(&backward(&a, &b, &[3.0, 4.0, 0.0])).unwrap(); // grads [3,4,0], [1,0.5]
        let norm = (25.0f64 + 1.25).sqrt();
        // No clipping when disabled or when the norm is below the limit.
        assert!((clip_grad_norm(&mut acc, 0.0).unwrap() - norm).abs() < 1e-6);
        assert!((clip_grad_norm(&mut acc, 100.0).unwrap() - norm).abs() < 1e-6);
        assert_eq!(acc.grads()[0].to_vec1::<f32>().unwrap(), [3.0, 4.0, 0.0]);
        let before = clip_grad_norm(&mut acc, 1.0).unwrap();
        assert!((before - norm).abs() < 1e-6);
        let coef = 1.0 / (norm + 1e-6);
        let g = acc.grads()[0].to_vec1::<f32>().unwrap();
        assert!((g[0] as f64 - 3.0 * coef).abs() < 1e-6 && (g[1] as f64 - 4.0 * coef).abs() < 1e-6);
        assert!((acc.norm().unwrap() - norm * coef).abs() < 1e-6);
    }

    #[test]
    fn non_finite_norm_is_an_error() {
        let (a, b) = setup();
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone()], DType::F32).unwrap();
        acc.add(&backward(&a, &b, &[f32::NAN, 0.0, 0.0])).unwrap();
        let err = clip_grad_norm(&mut acc, 1.0).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
    }

    /// The mean gradient of 64 examples is the same whether they come one at a time or in
    /// micro-batches of 8, when each micro-batch's summed loss is divided by 64.
    #[test]
    fn micro_batches_of_1_and_8_accumulate_the_same_gradient() {
        let w = Var::from_vec(vec![0.3f32, -0.2, 0.1], 3, &Device::Cpu).unwrap();
        let xs: Vec<f32> = (0..64 * 3).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let x = Tensor::from_vec(xs, (64, 3), &Device::Cpu).unwrap();
        let run = |micro: usize| {
            let mut acc = GradAccumulator::new(std::slice::from_ref(&w), DType::F32).unwrap();
            for start in (0..64).step_by(micro) {
                let xb = x.narrow(0, start, micro).unwrap();
                // A non-linear per-example loss: softplus-like log(1 + exp(x·w)).
                let z = xb.matmul(&w.as_tensor().unsqueeze(1).unwrap()).unwrap();
                let l = (z.exp().unwrap() + 1.0).unwrap().log().unwrap();
                let loss = (l.sum_all().unwrap() / 64.0).unwrap();
                acc.add(&loss.backward().unwrap()).unwrap();
            }
            assert_eq!(acc.count(), 64 / micro);
            acc.grads()[0].to_vec1::<f32>().unwrap()
        };
        let (g1, g8) = (run(1), run(8));
        for (a, b) in g1.iter().zip(&g8) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-3), "{g1:?} vs {g8:?}");
        }
    }
}
