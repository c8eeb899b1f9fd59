//! The model fingerprint: a stable hash of config, weights and tokenizer, so two processes
//! (reference server and trainer, possibly on different hosts) can prove they hold the same
//! model before the DPO loss compares their log-probs.
//!
//! Weights are hashed as their f32 values in the canonical parameter order, so the same
//! checkpoint loaded in bf16 or in f32 (an exact widening) gets the same fingerprint, while
//! a model whose weights differ in any bit does not.

use candle_core::DType;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::model::Llama;
use crate::tokenizer::LlamaTokenizer;

/// `sha256:<64 hex digits>` over config, weights and tokenizer.
pub fn model_fingerprint(model: &Llama, tokenizer: &LlamaTokenizer) -> Result<String> {
    let mut h = Sha256::new();
    let mut config = model.config().clone();
    // The storage dtype is not part of a model's identity (see the module doc).
    config.torch_dtype = String::new();
    h.update(b"config\0");
    h.update(serde_json::to_vec(&config.to_hf_json()).unwrap_or_default());
    for (name, t) in model.params() {
        h.update(b"\0param\0");
        h.update(name.as_bytes());
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        let values = t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for chunk in values.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            h.update(&bytes);
        }
    }
    h.update(b"\0tokenizer\0");
    h.update(tokenizer.fingerprint_bytes()?);
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}
