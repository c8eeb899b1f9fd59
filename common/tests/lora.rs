//! LoRA adapters (`model::lora`): PEFT's initialisation leaves the base model's numbers
//! untouched, the hand-written backward's adapter gradients match candle's autograd of the
//! same forward (every pass the trainer uses: shared prompts, checkpointing, the prefix
//! pass), merging gives the adapters' outputs, and PEFT-format checkpoints round-trip.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use dpo_common::logprob::{response_logprobs, shared_prompt_logprobs, Sequence, SharedPrompt};
use dpo_common::model::backward::{backward, forward_sequences, forward_shared, zero_grads};
use dpo_common::model::backward::{
    backward_after_prefix, forward_prefix, forward_shared_after, prefix_backward,
};
use dpo_common::model::lora::{self, parse_targets, LoraAdapters, LoraConfig, LoraTarget};
use dpo_common::model::{Llama, Mode};
use dpo_common::testing::{tiny_config, tiny_weights, TinySpec};

fn groups() -> Vec<SharedPrompt> {
    // A common 6-token prefix, then different prompts and responses of several lengths.
    let pre = [10u32, 11, 12, 13, 14, 15];
    let row = |p: &[u32], c: &[u32], r: &[u32]| SharedPrompt {
        prompt: [&pre[..], p].concat(),
        responses: vec![c.to_vec(), r.to_vec()],
    };
    vec![
        row(&[40, 41, 42], &[60, 61, 62, 63], &[70, 71]),
        row(&[50], &[80, 81], &[90, 91, 92, 93, 94, 95]),
        row(&[44, 45], &[100], &[101, 102, 103]),
    ]
}

fn sequences(groups: &[SharedPrompt]) -> Vec<Sequence> {
    groups
        .iter()
        .flat_map(|g| {
            g.responses.iter().map(|r| Sequence {
                ids: [g.prompt.as_slice(), r].concat(),
                response_start: g.prompt.len(),
            })
        })
        .collect()
}

fn base(dtype: DType) -> Llama {
    let cfg = tiny_config(&TinySpec::default());
    let w = tiny_weights(&cfg, 3).unwrap();
    Llama::from_weights(cfg, w, Mode::Frozen, dtype, &Device::Cpu).unwrap()
}

fn lora_config(targets: &[LoraTarget]) -> LoraConfig {
    LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: targets.to_vec() }
}

/// Adapters as after some training: PEFT's initial `A` and a non-zero `B`, so that both
/// `A`'s and `B`'s gradients are informative.
fn trained_adapters(m: &Llama, targets: &[LoraTarget]) -> LoraAdapters {
    let cfg = m.config();
    let init = LoraAdapters::init(cfg, lora_config(targets), 7, DType::F32, &Device::Cpu).unwrap();
    let weights: HashMap<String, Tensor> = init
        .named_tensors()
        .into_iter()
        .enumerate()
        .map(|(k, (name, t))| {
            let t = if name.contains("lora_B") {
                let n = t.elem_count();
                let v: Vec<f32> = (0..n).map(|j| 0.3 * ((j * 7 + k * 13) as f32).sin()).collect();
                Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    LoraAdapters::from_tensors(cfg, lora_config(targets), weights, m.dtype(), &Device::Cpu).unwrap()
}

fn dsums(n: usize) -> Vec<f32> {
    (0..n).map(|i| 0.7 - 0.45 * i as f32).collect()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    (diff / norm.max(1e-300)).sqrt()
}

/// Autograd's gradients of Σ w·logprobs with respect to the adapters, in
/// `trainable_params()` order.
fn autograd_grads(m: &Llama, seqs: &[Sequence], w: &[f32]) -> Vec<Tensor> {
    let lp = response_logprobs(m, seqs).unwrap();
    let w =
        Tensor::from_slice(w, w.len(), &Device::Cpu).unwrap().to_dtype(lp.sums.dtype()).unwrap();
    let grads = (lp.sums * w).unwrap().sum_all().unwrap().backward().unwrap();
    m.vars().iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()).collect()
}

fn assert_close(m: &Llama, got: &[Tensor], want: &[Tensor], tol: f64, what: &str) {
    let names = m.trainable_params();
    assert_eq!(got.len(), want.len(), "{what}");
    assert_eq!(got.len(), names.len(), "{what}");
    for ((name, _), (g, r)) in names.iter().zip(got.iter().zip(want)) {
        let e = rel_err(g, r);
        assert!(e < tol, "{what}: {name}: relative error {e:e}");
    }
}

#[test]
fn untrained_adapters_leave_the_base_model_exactly() {
    // On an f32 base and on a bf16 one, whose adapters are f32 all the same (as PEFT's).
    for dtype in [DType::F32, DType::BF16] {
        let plain = base(dtype);
        let cfg = plain.config().clone();
        let adapters =
            LoraAdapters::init(&cfg, lora_config(&LoraTarget::ALL), 1, dtype, &Device::Cpu)
                .unwrap();
        // PEFT's initialisation: A uniform in ±1/√in, B zero.
        for (name, t) in adapters.named_tensors() {
            assert_eq!(t.dtype(), DType::F32, "{name} on a {dtype:?} base");
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            if name.contains("lora_B") {
                assert!(v.iter().all(|&x| x == 0.0), "{name}");
            } else {
                let bound = 1.0 / (t.dim(1).unwrap() as f32).sqrt();
                assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
                let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(max > 0.8 * bound, "{name}: A should fill its range ({max} of {bound})");
            }
        }
        let adapted = plain.clone().with_lora(adapters).unwrap();
        let g = groups();
        let a = shared_prompt_logprobs(&plain, &g).unwrap().sums_vec().unwrap();
        let b = shared_prompt_logprobs(&adapted, &g).unwrap().sums_vec().unwrap();
        assert_eq!(a, b, "{dtype:?}: B = 0, the adapters add exact zeros");
        // The trainable parameters are the adapters alone: 2 per target per layer.
        assert_eq!(adapted.vars().len(), 2 * 7 * cfg.num_hidden_layers);
        assert_eq!(zero_grads(&adapted).unwrap().len(), adapted.vars().len());
        assert!(plain.vars().is_empty());
    }
}

fn check(dtype: DType, targets: &[LoraTarget], shared: bool, checkpoint: bool, tol: f64) {
    let m = base(dtype);
    let m = m.clone().with_lora(trained_adapters(&m, targets)).unwrap();
    let g = groups();
    let seqs = sequences(&g);
    let w = dsums(seqs.len());
    let want = autograd_grads(&m, &seqs, &w);
    let pass = if shared {
        forward_shared(&m, &g, checkpoint).unwrap()
    } else {
        forward_sequences(&m, &seqs, checkpoint).unwrap()
    };
    assert!(!pass.logprobs.sums.track_op(), "the training forward built a graph");
    let expected = response_logprobs(&m, &seqs).unwrap().sums_vec().unwrap();
    for (a, b) in pass.logprobs.sums_vec().unwrap().iter().zip(&expected) {
        assert!((a - b).abs() < tol.max(1e-12) * 100.0, "log-prob {a} vs {b}");
    }
    let mut grads = zero_grads(&m).unwrap();
    backward(pass, &w, &mut grads).unwrap();
    let what = format!("{dtype:?}, {targets:?}, shared {shared}, checkpoint {checkpoint}");
    assert_close(&m, &grads, &want, tol, &what);
}

#[test]
fn adapter_gradients_match_autograd_in_f64() {
    for (shared, checkpoint) in [(false, false), (true, false), (true, true)] {
        check(DType::F64, &LoraTarget::ALL, shared, checkpoint, 1e-10);
    }
    // Some projections only: the others' adapters are absent, their weights frozen.
    check(DType::F64, &[LoraTarget::Q, LoraTarget::V, LoraTarget::Down], true, false, 1e-10);
}

#[test]
fn adapter_gradients_match_autograd_in_f32() {
    check(DType::F32, &LoraTarget::ALL, false, false, 2e-5);
    check(DType::F32, &LoraTarget::ALL, true, true, 2e-5);
}

/// The trainer's prefix path with adapters: the preamble once, the rows after it, the
/// prefix's backward last: autograd's gradients of whole sequences.
#[test]
fn the_prefix_pass_gives_the_adapters_the_same_gradients() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
        let m = base(dtype);
        let m = m.clone().with_lora(trained_adapters(&m, &LoraTarget::ALL)).unwrap();
        let g = groups();
        let w = dsums(2 * g.len());
        let want = autograd_grads(&m, &sequences(&g), &w);
        for checkpoint in [false, true] {
            let mut prefix = forward_prefix(&m, &g[0].prompt[..6]).unwrap();
            let mut grads = zero_grads(&m).unwrap();
            for (row, w) in g.iter().zip(w.chunks(2)) {
                let pass = forward_shared_after(&m, std::slice::from_ref(row), &prefix, checkpoint)
                    .unwrap();
                backward_after_prefix(pass, w, &mut grads, &mut prefix).unwrap();
            }
            prefix_backward(prefix, &mut grads).unwrap();
            assert_close(&m, &grads, &want, tol, &format!("prefix, {dtype:?}, {checkpoint}"));
        }
    }
}

/// Dropout on the adapters' input (a training pass's view, `with_lora_dropout`): the
/// hand-written backward draws the forward's masks again, also for a checkpointed layer,
/// and matches autograd through the same masks. Without the view nothing is dropped.
#[test]
fn dropout_gradients_match_autograd() {
    let m = base(DType::F64);
    let cfg = m.config().clone();
    let adapters = trained_adapters(&m, &LoraTarget::ALL);
    let weights = adapters.named_tensors().into_iter().collect();
    let config = LoraConfig { dropout: 0.3, ..lora_config(&LoraTarget::ALL) };
    let adapters =
        LoraAdapters::from_tensors(&cfg, config, weights, DType::F64, &Device::Cpu).unwrap();
    let plain = m.clone().with_lora(adapters).unwrap();
    let g = groups();
    let w = dsums(2 * g.len());
    let no_drop = shared_prompt_logprobs(&plain, &g).unwrap().sums_vec().unwrap();
    let undropped = shared_prompt_logprobs(
        &m.clone().with_lora(trained_adapters(&m, &LoraTarget::ALL)).unwrap(),
        &g,
    )
    .unwrap()
    .sums_vec()
    .unwrap();
    assert_eq!(no_drop, undropped, "no dropout outside a training pass's view");
    let dropped = plain.with_lora_dropout(42);
    let lp = shared_prompt_logprobs(&dropped, &g).unwrap();
    let with_drop = lp.sums_vec().unwrap();
    assert!(with_drop.iter().zip(&no_drop).any(|(a, b)| (a - b).abs() > 1e-3), "nothing dropped");
    let wt = Tensor::from_slice(&w, w.len(), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let autograd = (lp.sums * wt).unwrap().sum_all().unwrap().backward().unwrap();
    let want: Vec<Tensor> =
        dropped.vars().iter().map(|v| autograd.get(v.as_tensor()).unwrap().clone()).collect();
    for checkpoint in [false, true] {
        let pass = forward_shared(&dropped, &g, checkpoint).unwrap();
        for (a, b) in pass.logprobs.sums_vec().unwrap().iter().zip(&with_drop) {
            assert!((a - b).abs() < 1e-9, "log-prob {a} vs {b}");
        }
        let mut grads = zero_grads(&dropped).unwrap();
        backward(pass, &w, &mut grads).unwrap();
        assert_close(&dropped, &grads, &want, 1e-10, &format!("dropout, checkpoint {checkpoint}"));
    }
    // Another seed, other masks.
    let other = shared_prompt_logprobs(&plain.with_lora_dropout(43), &g).unwrap();
    assert_ne!(other.sums_vec().unwrap(), with_drop);
}

/// Finite differences on one entry of `A` and one of `B`, independently of autograd.
#[test]
fn adapter_gradients_match_finite_differences() {
    let m = base(DType::F64);
    let adapters = trained_adapters(&m, &[LoraTarget::O, LoraTarget::Up]);
    let m = m.clone().with_lora(adapters).unwrap();
    let g = groups();
    let w = dsums(2 * g.len());
    let objective = |m: &Llama| -> f64 {
        let v = shared_prompt_logprobs(m, &g).unwrap().sums_vec().unwrap();
        v.iter().zip(&w).map(|(a, b)| a * *b as f64).sum()
    };
    let mut grads = zero_grads(&m).unwrap();
    backward(forward_shared(&m, &g, false).unwrap(), &w, &mut grads).unwrap();
    for (k, var) in m.vars().iter().enumerate().step_by(3) {
        let flat = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let j = flat.len() / 3;
        let h = 1e-5;
        let at = |delta: f64| {
            let mut v = flat.clone();
            v[j] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
            objective(&m)
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        at(0.0);
        let got = grads[k].flatten_all().unwrap().to_vec1::<f64>().unwrap()[j];
        assert!((got - fd).abs() < 1e-6 * fd.abs().max(1.0), "parameter {k}: {got} vs {fd}");
    }
}

#[test]
fn merged_weights_compute_what_the_adapters_do() {
    let m = base(DType::F64);
    let m = m.clone().with_lora(trained_adapters(&m, &LoraTarget::ALL)).unwrap();
    let merged = m.merged().unwrap();
    assert!(merged.lora().is_none());
    let g = groups();
    let a = shared_prompt_logprobs(&m, &g).unwrap().sums_vec().unwrap();
    let b = shared_prompt_logprobs(&merged, &g).unwrap().sums_vec().unwrap();
    let plain = shared_prompt_logprobs(&base(DType::F64), &g).unwrap().sums_vec().unwrap();
    for ((x, y), p) in a.iter().zip(&b).zip(&plain) {
        assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        assert!((x - p).abs() > 1e-4, "the adapters should change the log-probs");
    }
}

#[test]
fn peft_checkpoints_round_trip() {
    let m = base(DType::F32);
    let targets = [LoraTarget::Q, LoraTarget::K, LoraTarget::Gate];
    let adapters = trained_adapters(&m, &targets);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    lora::save_peft(&adapters, "tiny-base", &out).unwrap();
    assert!(lora::is_adapter_dir(&out));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(lora::ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(config["base_model_name_or_path"], "tiny-base");
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "k_proj", "gate_proj"]));
    let st = candle_core::safetensors::load(out.join(lora::ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    let a = &st["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"];
    let b = &st["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"];
    assert_eq!(a.dims(), [4, 32]);
    assert_eq!(b.dims(), [48, 4]);
    assert_eq!(st.len(), 2 * 3 * 2);

    let back = lora::load_peft(&out, m.config(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.config(), adapters.config());
    for ((n1, t1), (n2, t2)) in back.named_tensors().iter().zip(adapters.named_tensors()) {
        assert_eq!(n1, &n2);
        assert_eq!(rel_err(t1, &t2), 0.0, "{n1}");
    }

    // An adapter for another base model: the shape names the tensor.
    let mut other = tiny_config(&TinySpec { intermediate: 64, ..TinySpec::default() });
    other.torch_dtype = "float32".into();
    let err = lora::load_peft(&out, &other, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("gate_proj.lora_") && err.contains("another base model"), "{err}");
}

#[test]
fn bad_configurations_are_named() {
    let cfg = tiny_config(&TinySpec::default());
    let err = parse_targets("q_proj,attn_proj").unwrap_err().to_string();
    assert!(err.contains("attn_proj") && err.contains("down_proj"), "{err}");
    assert_eq!(parse_targets("v_proj, q").unwrap(), vec![LoraTarget::Q, LoraTarget::V]);
    assert_eq!(parse_targets("all").unwrap(), LoraTarget::ALL.to_vec());
    // k_proj is 16 × 32 (2 KV heads of 8): rank 17 does not fit.
    let big = LoraConfig { rank: 17, ..lora_config(&[LoraTarget::K]) };
    let err = big.validate(&cfg).unwrap_err().to_string();
    assert!(err.contains("rank 17") && err.contains("k_proj"), "{err}");
    assert!(LoraConfig { rank: 16, ..big.clone() }.validate(&cfg).is_ok());
    let dropout = LoraConfig { dropout: 1.0, ..lora_config(&[LoraTarget::Q]) };
    assert!(dropout.validate(&cfg).unwrap_err().to_string().contains("dropout"));
    assert!(LoraConfig { dropout: 0.1, ..dropout }.validate(&cfg).is_ok());
    // Adapters go on a frozen base only.
    let trainable = Llama::from_weights(
        cfg.clone(),
        tiny_weights(&cfg, 3).unwrap(),
        Mode::Trainable,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let adapters =
        LoraAdapters::init(&cfg, lora_config(&[LoraTarget::Q]), 1, DType::F32, &Device::Cpu)
            .unwrap();
    assert!(trainable.with_lora(adapters).is_err());
}

/// bf16 weights (the large-model setting) with f32 adapters and f32 gradient sums: the
/// adapters' gradients are those of autograd through the same bf16 forward, up to bf16
/// rounding, and near f32's.
#[test]
fn bf16_adapter_gradients_follow_autograd_and_f32() {
    let g = groups();
    let w = dsums(2 * g.len());
    let run = |dtype: DType| {
        let m = base(dtype);
        let m = m.clone().with_lora(trained_adapters(&m, &LoraTarget::ALL)).unwrap();
        let mut grads = zero_grads(&m).unwrap();
        backward(forward_shared(&m, &g, true).unwrap(), &w, &mut grads).unwrap();
        (m, grads)
    };
    let (m32, f32_grads) = run(DType::F32);
    let (m16, got) = run(DType::BF16);
    assert!(got.iter().all(|g| g.dtype() == DType::F32));
    assert!(m16.vars().iter().all(|v| v.dtype() == DType::F32), "f32 adapters on bf16");
    let autograd = autograd_grads(&m16, &sequences(&g), &w);
    let worst = |a: &[Tensor], b: &[Tensor]| {
        a.iter().zip(b).map(|(x, y)| rel_err(x, y)).fold(0f64, f64::max)
    };
    eprintln!(
        "bf16: worst relative error against bf16 autograd {:.3e}, against f32 {:.3e}",
        worst(&got, &autograd),
        worst(&got, &f32_grads)
    );
    assert_close(&m16, &got, &autograd, 5e-2, "bf16 vs bf16 autograd");
    assert_close(&m32, &got, &f32_grads, 1e-1, "bf16 vs f32");
}
