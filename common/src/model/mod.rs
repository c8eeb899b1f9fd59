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

pub use config::{LlamaConfig, RopeScaling};
pub use llama::{LayerContext, Llama, Mode, PrefixKv, TokenLayout};
pub use load::{load_checkpoint, load_model, parse_dtype, Checkpoint, LoadedModel};
pub use lora::{LoraAdapters, LoraConfig, LoraTarget};
pub use save::{save_hf, SaveOptions};
