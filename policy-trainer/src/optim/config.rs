//! RMSprop's hyper-parameters, shared by the optimizer (`rmsprop.rs`) and its in-place
//! f32 step (`fused.rs`).

use anyhow::{ensure, Result};
use candle_core::DType;

/// Hyper-parameters; the defaults are PyTorch's except the learning rate (the recipe's 1e-6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsPropConfig {
    pub lr: f64,
    /// Smoothing constant of the squared-gradient average.
    pub alpha: f64,
    /// Added to the root mean square for numerical stability.
    pub eps: f64,
    /// L2 penalty added to the gradient (not decoupled, as in PyTorch's RMSprop).
    pub weight_decay: f64,
    /// Seed of the stochastic rounding of bf16 parameters (with the step and the parameter
    /// index, so a resumed run rounds as the uninterrupted one would); also of a bf16
    /// state's rounding.
    pub rounding_seed: u64,
    /// Dtype of the square averages: f32 (PyTorch's) or bf16.
    pub state_dtype: DType,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            lr: 1e-6,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            rounding_seed: 0,
            state_dtype: DType::F32,
        }
    }
}

impl RmsPropConfig {
    pub(super) fn validate(&self) -> Result<()> {
        ensure!(
            self.lr.is_finite() && self.lr >= 0.0,
            "RMSprop: invalid learning rate {}",
            self.lr
        );
        ensure!(
            (0.0..=1.0).contains(&self.alpha),
            "RMSprop: alpha must be in [0, 1], got {}",
            self.alpha
        );
        ensure!(self.eps.is_finite() && self.eps >= 0.0, "RMSprop: invalid eps {}", self.eps);
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "RMSprop: invalid weight decay {}",
            self.weight_decay
        );
        ensure!(
            matches!(self.state_dtype, DType::F32 | DType::BF16),
            "RMSprop: the state is kept in f32 or bf16, not {:?}",
            self.state_dtype
        );
        Ok(())
    }
}
