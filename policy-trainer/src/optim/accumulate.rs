//! Gradient accumulation over micro-batches and global-norm clipping.
//!
//! Gradients are summed in f32 whatever the parameters' dtype, so accumulating 64 bf16
//! micro-batch gradients loses nothing to rounding; the caller scales each micro-batch's loss
//! (or calls [`GradAccumulator::scale`]) to get a mean.

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};

/// Sum of the gradients of a fixed list of parameters, in the order they were given.
pub struct GradAccumulator {
    ids: Vec<TensorId>,
    grads: Vec<Tensor>,
    count: usize,
}

impl GradAccumulator {
    /// Zero f32 gradients shaped like `vars`, on their devices.
    pub fn new(vars: &[Var]) -> Result<Self> {
        let grads = vars
            .iter()
            .map(|v| Tensor::zeros(v.shape(), DType::F32, v.device()))
            .collect::<candle_core::Result<Vec<_>>>()
            .context("allocating the gradient accumulator")?;
        Ok(GradAccumulator { ids: vars.iter().map(|v| v.id()).collect(), grads, count: 0 })
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
            *acc = (&*acc + g.detach().to_dtype(DType::F32)?)?;
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
            *g = g.affine(factor, 0.0)?;
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
            sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(sum.sqrt())
    }

    /// The accumulated f32 gradients, one per parameter in the order given to `new`.
    pub fn grads(&self) -> &[Tensor] {
        &self.grads
    }

    pub(super) fn ids(&self) -> &[TensorId] {
        &self.ids
    }
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
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone()]).unwrap();
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

    #[test]
    fn sums_scales_zeroes_and_norms() {
        let (a, b) = setup();
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone()]).unwrap();
        acc.add(&backward(&a, &b, &[1.0, 2.0, 3.0])).unwrap();
        acc.add(&backward(&a, &b, &[3.0, 2.0, 1.0])).unwrap();
        assert_eq!(acc.count(), 2);
        assert_eq!(acc.grads()[0].to_vec1::<f32>().unwrap(), [4.0, 4.0, 4.0]);
        assert_eq!(acc.grads()[1].to_vec1::<f32>().unwrap(), [2.0, 1.0]);
        acc.scale(0.5).unwrap();
        assert_eq!(acc.grads()[0].to_vec1::<f32>().unwrap(), [2.0, 2.0, 2.0]);
        let expected = (3.0 * 4.0f64 + 1.0 + 0.25).sqrt();
        assert!((acc.norm().unwrap() - expected).abs() < 1e-6);
        acc.zero().unwrap();
        assert_eq!(acc.count(), 0);
        assert_eq!(acc.norm().unwrap(), 0.0);
    }

    #[test]
    fn a_parameter_without_gradient_is_an_error() {
        let (a, b) = setup();
        let c = Var::from_vec(vec![1.0f32], 1, &Device::Cpu).unwrap();
        let mut acc = GradAccumulator::new(&[a.clone(), c, b.clone()]).unwrap();
        let err = acc.add(&backward(&a, &b, &[1.0, 1.0, 1.0])).unwrap_err();
        assert!(err.to_string().contains("parameter 1"), "{err}");
        assert_eq!(acc.count(), 0);
        assert_eq!(acc.norm().unwrap(), 0.0, "a failed add changes nothing");
    }

    #[test]
    fn clipping_follows_torch() {
        let (a, b) = setup();
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone()]).unwrap();
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
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone()]).unwrap();
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
            let mut acc = GradAccumulator::new(std::slice::from_ref(&w)).unwrap();
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
