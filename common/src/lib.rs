//! The model core shared by `ref-server` and `policy-trainer`: everything both sides
//! compute exists once, here — checkpoint loading (Hugging Face directories and GGUF files),
//! the Llama forward pass (frozen or trainable), tokenization and the prompt template,
//! response log-probabilities, checkpoint saving and the model fingerprint.

pub mod data;
pub mod device;
pub mod error;
pub mod fingerprint;
pub mod generate;
pub mod gguf;
pub mod logprob;
pub mod memory;
pub mod model;
pub mod prefix;
pub mod sround;
pub mod startup;
pub mod template;
/// Test support (tiny random checkpoints, a counting allocator) for this workspace's tests,
/// benches and examples; compiled only with the `testing` feature, so it never ships in a
/// product binary.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;

pub use error::{Error, Result};
