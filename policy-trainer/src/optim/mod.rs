//! The optimizer side of a training step: gradients of micro-batches summed into an
//! [`GradAccumulator`], optionally clipped by global norm ([`clip_grad_norm`]), then applied
//! by [`RmsProp`] with PyTorch's semantics so the recipe's hyper-parameters carry over.

mod accumulate;
mod config;
mod fused;
mod rmsprop;
#[cfg(test)]
mod torch_fixture;

pub use accumulate::{clip_grad_norm, GradAccumulator};
pub use config::RmsPropConfig;
pub use rmsprop::RmsProp;
