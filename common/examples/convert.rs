//! Converts any checkpoint `load_model` reads (a GGUF file or an HF directory) into a Hugging
//! Face directory, the way the trainer saves its checkpoints.
//!
//!     cargo run --release -p dpo-common --example convert -- MODEL OUT_DIR [f32|bf16|f16]

use candle_core::Device;
use dpo_common::model::{load_model, parse_dtype, save_hf, Mode, SaveOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, out, rest @ ..] = args.as_slice() else {
        return Err("usage: convert MODEL OUT_DIR [f32|bf16|f16]".into());
    };
    let dtype = parse_dtype(rest.first().map_or("f32", String::as_str))?;
    let loaded = load_model(model.as_ref(), Mode::Frozen, dtype, &Device::Cpu)?;
    save_hf(&loaded.model, &loaded.tokenizer, out.as_ref(), &SaveOptions::default(), &[])?;
    println!("wrote {out} ({})", loaded.fingerprint);
    Ok(())
}
