//! Conformance with transformers on the real SmolLM2-135M-Instruct: token ids and summed
//! response log-probs of Alpaca-formatted HH examples must match the fixture written by
//! `tests/conformance/make_fixture.py` (transformers, f32), through both the GGUF path and
//! the Hugging Face directory we save from it.

use std::path::Path;

use candle_core::{DType, Device};
use dpo_common::logprob::{response_logprobs, Sequence};
use dpo_common::model::{load_model, save_hf, LoadedModel, Mode, SaveOptions};
use dpo_common::template::Template;
use dpo_common::testing::{smollm2_gguf, workspace_root};
use serde_json::Value;

fn fixture() -> Value {
    let path = workspace_root().join("tests/fixtures/smollm2_hh_logprobs.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Checks tokenization and log-probs of every fixture item; returns the largest error.
fn check(loaded: &LoadedModel, fx: &Value) -> f64 {
    assert_eq!(fx["template"].as_str().unwrap(), Template::Alpaca.format_prompt("{instruction}"));
    let mut seqs = Vec::new();
    let mut expected = Vec::new();
    for ex in fx["examples"].as_array().unwrap() {
        let prompt = Template::Alpaca.format_prompt(ex["instruction"].as_str().unwrap());
        for side in ["chosen", "rejected"] {
            let item = &ex[side];
            let enc = loaded
                .tokenizer
                .encode_prompt_response(&prompt, item["response"].as_str().unwrap())
                .unwrap();
            let (p, r) = (ids(&item["prompt_ids"]), ids(&item["response_ids"]));
            assert_eq!(enc.ids[..enc.response_start], p[..], "prompt ids differ");
            assert_eq!(enc.ids[enc.response_start..], r[..], "response ids differ");
            seqs.push(Sequence::from(enc));
            expected
                .push((item["logprob_sum"].as_f64().unwrap(), item["n_tokens"].as_u64().unwrap()));
        }
    }
    // One padded batch, as the server runs it.
    let out = response_logprobs(&loaded.model, &seqs).unwrap();
    let got = out.sums_vec().unwrap();
    let mut worst = 0f64;
    for (i, ((want, n), have)) in expected.iter().zip(&got).enumerate() {
        assert_eq!(out.counts[i] as u64, *n);
        let err = (want - have).abs();
        assert!(err < 1e-3, "item {i}: transformers {want}, ours {have}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn gguf_and_saved_hf_match_transformers() {
    let fx = fixture();
    let gguf = load_model(&smollm2_gguf(), Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let e1 = check(&gguf, &fx);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    save_hf(&gguf.model, &gguf.tokenizer, &dir, &SaveOptions::default(), &[]).unwrap();
    let hf = load_model(&dir, Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(hf.fingerprint, gguf.fingerprint, "saving must not change the model");
    let e2 = check(&hf, &fx);
    // The reference server's layout: weights packed once for the CPU kernel.
    let mut packed = hf;
    assert!(packed.model.pack_for_inference().unwrap());
    let e3 = check(&packed, &fx);
    eprintln!(
        "max |Δ log-prob| vs transformers: gguf {e1:.2e}, saved hf {e2:.2e}, packed {e3:.2e}"
    );
    assert!(Path::new(&dir).join("model.safetensors").is_file());
}
