//! The model core on tiny random Llama checkpoints written by the tests themselves: load/save
//! round trips, padded batches, frozen vs trainable, and gradients against finite differences.

use candle_core::{DType, Device, Tensor, Var};
use dpo_common::logprob::{response_logprobs, Sequence};
use dpo_common::model::{load_model, Llama, Mode, SaveOptions};
use dpo_common::testing::{
    tiny_config, tiny_tokenizer, tiny_weights, write_tiny_checkpoint, TinySpec,
};

fn seqs() -> Vec<Sequence> {
    let tok = tiny_tokenizer();
    [("What is 2+2?", "4"), ("Name a colour.", "A deep shade of blue, like the sea."), ("Hi", "")]
        .iter()
        .map(|(p, r)| Sequence::from(tok.encode_prompt_response(p, r).unwrap()))
        .collect()
}

fn tiny_model(spec: &TinySpec, mode: Mode, dtype: DType) -> Llama {
    let cfg = tiny_config(spec);
    let w = tiny_weights(&cfg, spec.seed).unwrap();
    Llama::from_weights(cfg, w, mode, dtype, &Device::Cpu).unwrap()
}

fn sums(model: &Llama, s: &[Sequence]) -> Vec<f64> {
    response_logprobs(model, s).unwrap().sums_vec().unwrap()
}

#[test]
fn save_load_round_trip_is_bit_identical() {
    for (tied, dtype, shard) in [
        (false, DType::F32, None),
        (true, DType::F32, Some(20_000)),
        (false, DType::BF16, Some(10_000)),
        (true, DType::BF16, None),
    ] {
        let spec = TinySpec { tied, ..TinySpec::default() };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        write_tiny_checkpoint(&dir, &spec, dtype, shard).unwrap();
        assert_eq!(dir.join("model.safetensors.index.json").exists(), shard.is_some());
        let a = load_model(&dir, Mode::Frozen, dtype, &Device::Cpu).unwrap();
        // Save what was loaded, load it again: every parameter must be the same bits.
        let dir2 = tmp.path().join("again");
        let opts = SaveOptions { dtype: None, max_shard_bytes: shard.unwrap_or(usize::MAX) };
        dpo_common::model::save_hf(&a.model, &a.tokenizer, &dir2, &opts, &[]).unwrap();
        let b = load_model(&dir2, Mode::Frozen, dtype, &Device::Cpu).unwrap();
        assert_eq!(a.model.params().len(), b.model.params().len());
        for ((na, ta), (nb, tb)) in a.model.params().iter().zip(b.model.params()) {
            assert_eq!(na, nb);
            let va =
                ta.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let vb =
                tb.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{na} differs");
        }
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(b.model.config().tie_word_embeddings, tied);
        assert_eq!(sums(&a.model, &seqs()), sums(&b.model, &seqs()));
    }
}

#[test]
fn fingerprint_changes_with_any_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    write_tiny_checkpoint(&a, &spec, DType::F32, None).unwrap();
    write_tiny_checkpoint(&b, &TinySpec { seed: 2, ..spec }, DType::F32, None).unwrap();
    let fa = load_model(&a, Mode::Frozen, DType::F32, &Device::Cpu).unwrap().fingerprint;
    let fb = load_model(&b, Mode::Frozen, DType::F32, &Device::Cpu).unwrap().fingerprint;
    let fa_trainable =
        load_model(&a, Mode::Trainable, DType::F32, &Device::Cpu).unwrap().fingerprint;
    assert_ne!(fa, fb);
    assert_eq!(fa, fa_trainable);
    assert!(fa.starts_with("sha256:") && fa.len() == 7 + 64);
}

#[test]
fn padded_batch_equals_one_at_a_time() {
    for spec in [
        TinySpec::default(),
        TinySpec { tied: true, kv_heads: 4, llama3_rope: false, ..TinySpec::default() },
    ] {
        let model = tiny_model(&spec, Mode::Frozen, DType::F32);
        let s = seqs();
        let batched = response_logprobs(&model, &s).unwrap();
        let per_tok = batched.per_token_vecs().unwrap();
        for (i, seq) in s.iter().enumerate() {
            let one = response_logprobs(&model, std::slice::from_ref(seq)).unwrap();
            let (a, b) = (batched.sums_vec().unwrap()[i], one.sums_vec().unwrap()[0]);
            assert!((a - b).abs() < 1e-4, "sequence {i}: batched {a} vs alone {b}");
            assert_eq!(batched.counts[i], seq.response_len());
            let alone = one.per_token_vecs().unwrap().remove(0);
            for (x, y) in per_tok[i].iter().zip(&alone) {
                assert!((x - y).abs() < 1e-5);
            }
        }
        // The empty response scores EOS alone.
        assert_eq!(batched.counts[2], 1);
    }
}

#[test]
fn frozen_and_trainable_give_identical_numbers() {
    let spec = TinySpec::default();
    let frozen = tiny_model(&spec, Mode::Frozen, DType::F32);
    let trainable = tiny_model(&spec, Mode::Trainable, DType::F32);
    assert!(frozen.vars().is_empty());
    assert_eq!(trainable.vars().len(), trainable.params().len());
    let (a, b) = (sums(&frozen, &seqs()), sums(&trainable, &seqs()));
    assert_eq!(a, b, "frozen and trainable must agree bit for bit");
    // Only the trainable one records a graph.
    let f = response_logprobs(&frozen, &seqs()).unwrap().sums;
    let t = response_logprobs(&trainable, &seqs()).unwrap().sums;
    assert!(!dpo_common::model::ops::is_tracked(&f));
    assert!(dpo_common::model::ops::is_tracked(&t));
}

/// Packing a frozen model for inference changes the layout, not the model: the same
/// log-probs (up to the rounding of gemm's inner blocking), the same parameters when unpacked,
/// the same fingerprint, and no gradients.
#[test]
fn packed_model_scores_like_the_dense_one() {
    for spec in [TinySpec::default(), TinySpec { tied: true, ..TinySpec::default() }] {
        let dense = tiny_model(&spec, Mode::Frozen, DType::F32);
        let mut packed = dense.clone();
        assert!(packed.pack_for_inference().unwrap());
        let (a, b) = (sums(&dense, &seqs()), sums(&packed, &seqs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "dense {x} vs packed {y}");
        }
        // Per sequence too (one token row per call: the smallest matmuls).
        for s in seqs() {
            let one = sums(&packed, std::slice::from_ref(&s))[0];
            let want = sums(&dense, std::slice::from_ref(&s))[0];
            assert!((one - want).abs() <= 1e-5 * want.abs().max(1.0));
        }
        // Unpacked on demand, bit for bit, in the canonical order.
        assert_eq!(packed.params().len(), dense.params().len());
        for ((na, ta), (nb, tb)) in dense.params().iter().zip(packed.params()) {
            assert_eq!(na, nb);
            let diff = (ta - tb).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{na}");
        }
        let tok = tiny_tokenizer();
        assert_eq!(
            dpo_common::fingerprint::model_fingerprint(&packed, &tok).unwrap(),
            dpo_common::fingerprint::model_fingerprint(&dense, &tok).unwrap()
        );
        // A frozen view shares the packed weights; the backward refuses them.
        assert_eq!(sums(&packed.frozen_view().unwrap(), &seqs()), b);
        let pass = dpo_common::model::backward::forward_sequences(&packed, &seqs(), false);
        let err = pass
            .and_then(|p| {
                let mut g = dpo_common::model::backward::zero_grads(&packed)?;
                dpo_common::model::backward::backward(p, &[1.0, 1.0, 1.0], &mut g)
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("packed for inference"), "{err}");
    }
    // Only frozen CPU f32 models are packed.
    let mut trainable = tiny_model(&TinySpec::default(), Mode::Trainable, DType::F32);
    assert!(!trainable.pack_for_inference().unwrap());
    let mut bf16 = tiny_model(&TinySpec::default(), Mode::Frozen, DType::BF16);
    assert!(!bf16.pack_for_inference().unwrap());
}

/// d(sum of response log-probs)/d(weight) by autograd vs central finite differences, in f64
/// (composite ops), on a few entries of several tensors.
#[test]
fn gradient_matches_finite_differences() {
    let spec = TinySpec { tied: true, ..TinySpec::default() };
    let model = tiny_model(&spec, Mode::Trainable, DType::F64);
    let s = seqs();
    let loss = response_logprobs(&model, &s).unwrap().sums.sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    ];
    for name in names {
        let idx = model.params().iter().position(|(n, _)| n == name).unwrap();
        let var: &Var = &model.vars()[idx];
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reached {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Entries with the largest gradient: a silent cut would show as zeros there.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in order.iter().take(3) {
            let eps = 1e-5;
            let eval = |delta: f64| {
                let mut w = orig.clone();
                w[i] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap()).unwrap();
                sums(&model, &s).iter().sum::<f64>()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            assert!(g[i].abs() > 1e-6, "{name}[{i}]: gradient is zero");
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + g[i].abs()),
                "{name}[{i}]: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

/// The f32 CPU fast path (custom ops) gives the same gradient as the f64 composite path.
#[test]
fn fast_path_gradients_match_composite() {
    let spec = TinySpec::default();
    let m32 = tiny_model(&spec, Mode::Trainable, DType::F32);
    let m64 = tiny_model(&spec, Mode::Trainable, DType::F64);
    let s = seqs();
    let g32 = response_logprobs(&m32, &s).unwrap().sums.sum_all().unwrap().backward().unwrap();
    let g64 = response_logprobs(&m64, &s).unwrap().sums.sum_all().unwrap().backward().unwrap();
    for (i, (name, _)) in m32.params().iter().enumerate() {
        let a = g32.get(m32.vars()[i].as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        let b = g64.get(m64.vars()[i].as_tensor()).unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff <= 1e-5 * scale, "{name}: max diff {diff} (scale {scale})");
    }
}

#[test]
fn bad_checkpoints_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let missing =
        load_model(&dir, Mode::Frozen, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(missing.contains("no such file"), "{missing}");

    write_tiny_checkpoint(&dir, &TinySpec::default(), DType::F32, None).unwrap();
    // A config that disagrees with the weights names the tensor.
    let cfg_path = dir.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"intermediate_size\": 48", "\"intermediate_size\": 64"),
    )
    .unwrap();
    let e = load_model(&dir, Mode::Frozen, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("gate_proj") && e.contains("shape"), "{e}");
    std::fs::write(&cfg_path, &cfg).unwrap();

    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_model(&dir, Mode::Frozen, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_model(&dir, Mode::Frozen, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");

    let e =
        load_model(tmp.path(), Mode::Frozen, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn invalid_sequences_are_rejected_with_the_limit_named() {
    let model = tiny_model(&TinySpec::default(), Mode::Frozen, DType::F32);
    let bad = |s: Sequence| response_logprobs(&model, &[s]).err().unwrap().to_string();
    assert!(bad(Sequence { ids: vec![1, 2, 999], response_start: 1 }).contains("999"));
    assert!(bad(Sequence { ids: vec![1, 2], response_start: 2 }).contains("no response tokens"));
    assert!(bad(Sequence { ids: vec![1, 2], response_start: 0 }).contains("prompt is empty"));
    assert!(bad(Sequence { ids: vec![1; 600], response_start: 1 }).contains("512"));
}

#[test]
fn interrupted_save_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("best");
    write_tiny_checkpoint(&dir, &TinySpec::default(), DType::F32, None).unwrap();
    let before = load_model(&dir, Mode::Frozen, DType::F32, &Device::Cpu).unwrap().fingerprint;
    let r = dpo_common::model::save::atomic_dir_write(&dir, |tmp_dir| {
        std::fs::write(tmp_dir.join("config.json"), b"{ half written").unwrap();
        Err(dpo_common::Error::Input("simulated crash mid-save".into()))
    });
    assert!(r.is_err());
    let after = load_model(&dir, Mode::Frozen, DType::F32, &Device::Cpu).unwrap().fingerprint;
    assert_eq!(before, after);
    // No temporary directory is left behind.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}
