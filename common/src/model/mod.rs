//! The Llama model: hyper-parameters, weights, the forward pass and checkpoint I/O.

pub mod backward;
pub mod config;
pub mod grad_ops;
mod kernel;
pub mod llama;
pub mod load;
pub mod lora;
pub mod ops;
mod packed;
pub mod save;
mod vexp;

use candle_core::DType;

pub use config::{LlamaConfig, RopeScaling};
pub use llama::{LayerContext, Llama, Mode, PrefixKv, TokenLayout};
pub use load::{load_checkpoint, load_model, parse_dtype, Checkpoint, LoadedModel};
pub use lora::{LoraAdapters, LoraConfig, LoraTarget};
pub use save::{save_hf, SaveOptions};

/// The dtype to compute or accumulate in for tensors of `dtype`: f32 at least, so that bf16
/// and f16 sums and small deltas are not rounded away; f64 stays f64 (the gradient checks
/// rely on it).
pub fn at_least_f32(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
