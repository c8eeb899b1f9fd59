//! The Llama model: hyper-parameters, weights, the forward pass and checkpoint I/O.

pub mod config;
pub mod llama;
pub mod load;
pub mod ops;
pub mod save;

pub use config::{LlamaConfig, RopeScaling};
pub use llama::{Llama, Mode};
pub use load::{load_checkpoint, load_model, parse_dtype, Checkpoint, LoadedModel};
pub use save::{save_hf, SaveOptions};
