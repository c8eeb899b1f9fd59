//! LoRA end to end: `ref-server` with a tiny random Llama, `policy-trainer train
//! --lora-rank 4` against it.
//!
//! Checks: the step-0 loss is ln 2 (PEFT's initialisation leaves the policy the reference,
//! and the fingerprint check passes on the base); the run learns; `best/` and `last/` hold
//! PEFT adapters (config and tensor names) and the base is untouched; `merged/` scores
//! what base + best adapter score; a crashed LoRA run resumes with the uninterrupted run's
//! losses; bad flags and a resume across full fine-tuning and LoRA are refused by name.
//! PEFT itself loads our step-0 adapter, scores the pairs as we do and takes the same
//! RMSprop step (`tests/conformance/lora_peft.py`; its output for this test is the fixture
//! `tests/fixtures/peft_lora/`, and it runs live with `DPO_PEFT_PYTHON`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use dpo_common::data::EncodedPair;
use dpo_common::logprob::{shared_prompt_logprobs, SharedPrompt};
use dpo_common::model::backward;
use dpo_common::model::lora::{self, LoraAdapters, LoraConfig, LoraTarget};
use dpo_common::model::{load_model, Llama, Mode};
use dpo_common::testing::{workspace_root, write_tiny_checkpoint, TinySpec};
use dpo_tests::{binary, number as f, of_kind as kind, read_jsonl, Server};
use policy_trainer::loss::{batch_loss, LossFlags, LossSpec, PairLogps};
use policy_trainer::metrics::METRICS_FILE;
use policy_trainer::optim::{GradAccumulator, RmsProp, RmsPropConfig};
use policy_trainer::passes::{loss_inputs, policy_logprobs, shared_row};
use policy_trainer::ref_cache::RefScores;
use serde_json::Value;

fn fixture() -> PathBuf {
    workspace_root().join("tests/fixtures/prefs_small.jsonl")
}

fn trainer_args(model: &Path, url: &str, out: &Path, max_steps: usize) -> Vec<String> {
    let (steps, data) = (max_steps.to_string(), fixture());
    let args = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--ref-server",
        url,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--template",
        "raw",
        "--max-length",
        "128",
        "--val-size",
        "16",
        "--batch-size",
        "8",
        "--micro-batch",
        "4",
        "--lr",
        "1e-2",
        "--beta",
        "0.5",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--epochs",
        "3",
        "--max-steps",
        &steps,
        "--seed",
        "7",
        "--no-progress",
        "--lora-rank",
        "4",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

fn run(args: &[String], extra: &[&str]) -> Output {
    Command::new(binary("policy-trainer")).args(args).args(extra).output().unwrap()
}

#[test]
fn lora_trains_saves_peft_adapters_merges_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let server = Server::start(&model, &[], dir.path());

    let full = dir.path().join("full");
    let out = run(&trainer_args(&model, &server.url, &full, 8), &["--save-merged"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "LoRA run failed:\n{stderr}");
    assert!(stderr.contains("LoRA: rank 4, alpha 8 (scale 2)"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("LoRA adapters in PEFT's format"), "{stdout}");
    let serve = format!(
        "ref-server serve --model {} --adapter {}",
        model.display(),
        full.join("best").display()
    );
    assert!(stdout.contains(&serve), "{stdout}");
    assert!(stdout.contains("merged:"), "{stdout}");

    let records = read_jsonl(&full.join(METRICS_FILE));
    let (evals, trains) = (kind(&records, "eval"), kind(&records, "train"));
    assert_eq!(trains.len(), 8);
    let ln2 = std::f64::consts::LN_2;
    let e0 = &evals[0];
    assert!((f(e0, "loss") - ln2).abs() < 1e-5, "step-0 loss {}", f(e0, "loss"));
    assert!((f(e0, "loss_min") - ln2).abs() < 1e-5 && (f(e0, "loss_max") - ln2).abs() < 1e-5);
    assert!((f(&trains[0], "loss") - ln2).abs() < 1e-5, "first step's training loss");
    assert!(f(evals.last().unwrap(), "loss") < ln2 - 0.02, "validation loss did not fall");

    // best/ and last/ are PEFT adapter directories for the base.
    for sub in ["best", "last"] {
        let d = full.join(sub);
        let config: Value =
            serde_json::from_slice(&std::fs::read(d.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["r"], 4);
        assert_eq!(config["lora_alpha"], 8.0);
        assert_eq!(config["base_model_name_or_path"], model.to_str().unwrap());
        assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
        assert!(!d.join("model.safetensors").exists(), "{sub}/ holds the adapter only");
        let st = candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
        assert_eq!(st.len(), 2 * 7 * 2);
        let b = &st["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
        assert_eq!(b.dims(), [32, 4]);
        assert!(b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
    assert!(full.join("last/optimizer.safetensors").exists());
    let state =
        candle_core::safetensors::load(full.join("last/optimizer.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(state.len(), 2 * 7 * 2, "RMSprop state for the adapters only");

    // merged/ scores what the base with best/'s adapter does.
    let base = load_model(&model, Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let adapters =
        lora::load_peft(&full.join("best"), base.model.config(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(adapters.config().targets, LoraTarget::ALL.to_vec());
    let adapted = base.model.clone().with_lora(adapters).unwrap();
    let merged = load_model(&full.join("merged"), Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let rows = [SharedPrompt { prompt: vec![5, 6, 7, 8], responses: vec![vec![9, 10], vec![11]] }];
    let a = shared_prompt_logprobs(&adapted, &rows).unwrap().sums_vec().unwrap();
    let m = shared_prompt_logprobs(&merged.model, &rows).unwrap().sums_vec().unwrap();
    let b = shared_prompt_logprobs(&base.model, &rows).unwrap().sums_vec().unwrap();
    for ((x, y), z) in a.iter().zip(&m).zip(&b) {
        assert!((x - y).abs() < 1e-4, "merged {y} vs adapted {x}");
        assert!((x - z).abs() > 1e-4, "the adapter should have changed the log-probs");
    }

    // Crashed after step 5 (last/ at step 4), resumed: the uninterrupted run's losses.
    let killed = dir.path().join("killed");
    let args = trainer_args(&model, &server.url, &killed, 8);
    let crashed = Command::new(binary("policy-trainer"))
        .args(&args)
        .env("DPO_TEST_CRASH_AFTER_STEP", "5")
        .output()
        .unwrap();
    assert!(!crashed.status.success(), "the crash hook did not fire");

    // A LoRA run does not resume as full fine-tuning, nor with other adapter flags.
    let no_lora: Vec<String> = args[..args.len() - 2].to_vec();
    let out = run(&no_lora, &["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("holds LoRA adapters"), "{err}");
    let out = run(&args, &["--resume", "--lora-alpha", "16"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("alpha 8"), "{err}");

    let out = run(&args, &["--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed:\n{stderr}");
    assert!(stderr.contains("resuming at step 4"), "{stderr}");
    let resumed = kind(&read_jsonl(&killed.join(METRICS_FILE)), "train");
    assert_eq!(resumed.len(), 8);
    for (a, b) in resumed.iter().zip(&trains) {
        let (la, lb) = (f(a, "loss"), f(b, "loss"));
        assert!((la - lb).abs() < 1e-5 * lb.abs().max(1.0), "step {}: {la} vs {lb}", a["step"]);
    }

    // A full fine-tuning run does not resume as LoRA.
    let ft = dir.path().join("ft");
    let ft_args: Vec<String> = trainer_args(&model, &server.url, &ft, 2)[..args.len() - 2].to_vec();
    let out = run(&ft_args, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&trainer_args(&model, &server.url, &ft, 2), &["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("full fine-tuning run"), "{err}");
}

#[test]
fn bad_lora_flags_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    // No server: each of these fails before one is needed.
    let args = |out: &str| trainer_args(&model, "none", &dir.path().join(out), 1);
    let fails = |extra: &[&str], out: &str, wanted: &[&str]| {
        let o = run(&args(out), &[&["--loss", "simpo"][..], extra].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should fail");
        for w in wanted {
            assert!(err.contains(w), "{extra:?}: `{w}` not in:\n{err}");
        }
    };
    fails(&["--lora-targets", "q_proj,qkv"], "a", &["--lora-targets", "qkv", "down_proj"]);
    // The tiny model's k_proj is 16 × 32.
    fails(&["--lora-rank", "17"], "b", &["--lora-rank", "rank 17", "k_proj"]);
    fails(&["--lora-dropout", "1"], "c", &["--lora-dropout"]);
}

/// A bf16 base trains f32 adapters (PEFT's default): at DPO's learning rates an RMSprop
/// step moves an entry of `A` by about `10·lr`, far under bf16's spacing at its size, yet
/// every entry moves, and the saved adapter is f32. A bf16 LoRA run that crashes resumes to
/// the uninterrupted run's adapters.
#[test]
fn a_bf16_base_trains_f32_adapters_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    // Weights exact in bf16: the f32 server and the bf16 trainer hold the same model (one
    // fingerprint), and an f32 reference scores the same whatever the server's batches.
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::BF16, None).unwrap();
    let server = Server::start(&model, &[], dir.path());
    let bf16_args = |out: &Path| {
        let mut args = trainer_args(&model, &server.url, out, 4);
        let lr = args.iter().position(|a| a == "--lr").unwrap() + 1;
        args[lr] = "1e-6".into();
        args.extend(["--dtype", "bf16"].map(String::from));
        args
    };
    let out_dir = dir.path().join("bf16");
    let out = run(&bf16_args(&out_dir), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let init = LoraAdapters::init(
        &dpo_common::testing::tiny_config(&TinySpec::default()),
        LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: LoraTarget::ALL.to_vec() },
        7,
        DType::BF16,
        &Device::Cpu,
    )
    .unwrap();
    let load = |run: &Path| {
        candle_core::safetensors::load(run.join("last/adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
    };
    let saved = load(&out_dir);
    let (mut moved, mut total, mut largest) = (0usize, 0usize, 0f32);
    for (name, start) in init.named_tensors().into_iter().filter(|(n, _)| n.contains("lora_A")) {
        let now = &saved[&name];
        assert_eq!(now.dtype(), DType::F32, "{name}");
        let start = start.to_dtype(DType::F32).unwrap();
        let d: Vec<f32> = (now - &start).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        moved += d.iter().filter(|x| **x != 0.0).count();
        total += d.len();
        largest = d.iter().fold(largest, |m, x| m.max(x.abs()));
    }
    assert!(saved.values().all(|t| t.dtype() == DType::F32));
    assert!(moved * 10 > total * 9, "only {moved} of {total} entries of A moved");
    assert!(largest < 1e-4, "an RMSprop step of lr 1e-6 moved A by {largest}");

    // Crashed after step 3 (last/ at step 2), resumed: the same adapters at step 4. Steps
    // move an entry by ~1e-5; RMSprop state lost at the resume would move it by a sizeable
    // part of that more.
    let killed = dir.path().join("killed");
    let crashed = Command::new(binary("policy-trainer"))
        .args(bf16_args(&killed))
        .env("DPO_TEST_CRASH_AFTER_STEP", "3")
        .output()
        .unwrap();
    assert!(!crashed.status.success(), "the crash hook did not fire");
    let out = run(&bf16_args(&killed), &["--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("resuming at step 2"), "{stderr}");
    let resumed = load(&killed);
    let mut worst = 0f32;
    for (name, t) in &saved {
        let d = (t - &resumed[name]).unwrap().abs().unwrap().flatten_all().unwrap();
        worst = worst.max(d.max(0).unwrap().to_scalar::<f32>().unwrap());
    }
    assert!(worst < 1e-7, "resumed adapters differ from the uninterrupted run's by {worst}");
}

/// The pairs of the PEFT check: token ids of the tiny model's byte vocabulary.
fn peft_pairs() -> Vec<EncodedPair> {
    let pair = |p: &[u32], c: &[u32], r: &[u32]| EncodedPair {
        prompt_ids: p.to_vec(),
        chosen_ids: c.to_vec(),
        rejected_ids: r.to_vec(),
    };
    vec![
        pair(&[256, 72, 105, 33, 10], &[72, 101, 108, 108, 111, 257], &[78, 111, 257]),
        pair(
            &[256, 50, 43, 50, 61],
            &[52, 257],
            &[53, 44, 32, 73, 32, 116, 104, 105, 110, 107, 257],
        ),
        pair(
            &[256, 67, 111, 108, 111, 114, 63],
            &[66, 108, 117, 101, 257],
            &[78, 111, 110, 101, 257],
        ),
    ]
}

/// The policy's loss inputs for `pairs` against `refs`, scored by `policy` (no gradients).
fn scored(policy: &Llama, pairs: &[EncodedPair], refs: &[RefScores]) -> Vec<PairLogps> {
    let (scores, _) = policy_logprobs(&policy.frozen_view().unwrap(), pairs, None).unwrap();
    let mut inputs = loss_inputs(pairs, Some(refs));
    for (p, (c, r)) in inputs.iter_mut().zip(scores) {
        (p.policy_chosen, p.policy_rejected) = (c, r);
    }
    inputs
}

/// PEFT loads the adapter our trainer saves at step 0 and gives our log-probs (1e-3 nats);
/// one DPO step on the same pairs with `torch.optim.RMSprop` and with ours (the trainer's
/// loss, hand-written backward, accumulator and RMSprop) gives the same loss after the step
/// (1e-4) and the same adapter update (relative 1e-2).
///
/// PEFT's side is `tests/fixtures/peft_lora/` (what the script wrote for this test's inputs,
/// which are deterministic: the tiny checkpoint and the adapters come from fixed seeds), or,
/// with `DPO_PEFT_PYTHON` set, the script run now; `DPO_UPDATE_FIXTURES=1` then writes it
/// to the fixture.
#[test]
fn peft_loads_our_adapter_and_takes_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny");
    write_tiny_checkpoint(&model_dir, &TinySpec::default(), DType::F32, None).unwrap();
    let base = load_model(&model_dir, Mode::Frozen, DType::F32, &Device::Cpu).unwrap().model;
    let config =
        LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: LoraTarget::ALL.to_vec() };
    let adapters = LoraAdapters::init(base.config(), config, 7, DType::F32, &Device::Cpu).unwrap();
    let step0 = dir.path().join("adapter_step0");
    lora::save_peft(&adapters, model_dir.to_str().unwrap(), &step0).unwrap();
    let policy = base.clone().with_lora(adapters).unwrap();

    let (lr, beta) = (1e-3, 0.5);
    let pairs = peft_pairs();
    let spec = serde_json::json!({
        "lr": lr,
        "beta": beta,
        "pairs": pairs.iter().map(|p| serde_json::json!({
            "prompt": p.prompt_ids, "chosen": p.chosen_ids, "rejected": p.rejected_ids,
        })).collect::<Vec<_>>(),
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let fixture = workspace_root().join("tests/fixtures/peft_lora");
    let out_dir = match std::env::var_os("DPO_PEFT_PYTHON") {
        None => fixture,
        Some(python) => {
            let out_dir = dir.path().join("peft");
            let script = workspace_root().join("tests/conformance/lora_peft.py");
            let run = Command::new(python)
                .args([&script, &model_dir, &step0, &spec_path, &out_dir])
                .output()
                .unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&run.stdout),
                String::from_utf8_lossy(&run.stderr)
            );
            assert!(run.status.success(), "PEFT's side failed:\n{report}");
            eprintln!("{report}");
            if std::env::var_os("DPO_UPDATE_FIXTURES").is_some() {
                let after = fixture.join("adapter_after_step");
                std::fs::create_dir_all(&after).unwrap();
                std::fs::copy(out_dir.join("peft.json"), fixture.join("peft.json")).unwrap();
                for f in ["adapter_config.json", "adapter_model.safetensors"] {
                    std::fs::copy(out_dir.join("adapter_after_step").join(f), after.join(f))
                        .unwrap();
                }
            }
            out_dir
        }
    };
    let peft: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("peft.json")).unwrap()).unwrap();
    assert_eq!(peft["trainable_tensors"], 2 * 7 * 2);

    // Step 0: PEFT's log-probs with our adapter are ours (and the base's).
    let (ref_scores, _) = policy_logprobs(&base, &pairs, None).unwrap();
    let refs: Vec<RefScores> =
        ref_scores.iter().map(|&(chosen, rejected)| RefScores { chosen, rejected }).collect();
    let before = scored(&policy, &pairs, &refs);
    for (i, (ours, theirs)) in
        before.iter().zip(peft["logps_step0"].as_array().unwrap()).enumerate()
    {
        for (a, b) in [(ours.policy_chosen, &theirs[0]), (ours.policy_rejected, &theirs[1])] {
            let b = b.as_f64().unwrap();
            assert!((a - b).abs() < 1e-3, "pair {i}: our log-prob {a}, PEFT's {b}");
        }
    }

    // One step, ours: the whole batch in one pass, then RMSprop.
    let loss = LossSpec::from_flags(&LossFlags {
        loss: "sigmoid",
        beta,
        label_smoothing: None,
        discopop_tau: None,
        gamma_beta_ratio: None,
        sft_weight: None,
    })
    .unwrap();
    let at_step0 = batch_loss(&loss, &before).unwrap();
    assert!((at_step0.loss - peft["loss_step0"].as_f64().unwrap()).abs() < 1e-6);
    let mut acc = GradAccumulator::new(policy.vars(), DType::F32).unwrap();
    acc.add_with(|grads| {
        let rows: Vec<SharedPrompt> = pairs.iter().map(shared_row).collect();
        let pass = backward::forward_shared(&policy, &rows, false)?;
        let dsums: Vec<f32> = at_step0
            .grads
            .iter()
            .flat_map(|g| [g.policy_chosen as f32, g.policy_rejected as f32])
            .collect();
        Ok(backward::backward(pass, &dsums, grads)?)
    })
    .unwrap();
    let init: Vec<Tensor> = policy.vars().iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let mut optimizer =
        RmsProp::new(policy.vars(), RmsPropConfig { lr, ..RmsPropConfig::default() }).unwrap();
    optimizer.step(&acc).unwrap();

    let after = batch_loss(&loss, &scored(&policy, &pairs, &refs)).unwrap().loss;
    let peft_after = peft["loss_after_step"].as_f64().unwrap();
    assert!(after < at_step0.loss, "the step should lower the loss: {after}");
    assert!(
        (after - peft_after).abs() < 1e-4,
        "loss after the step: ours {after}, PEFT's {peft_after}"
    );

    // The update of every adapter tensor, ours against PEFT's.
    let theirs = lora::load_peft(
        &out_dir.join("adapter_after_step"),
        base.config(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (mut diff, mut norm) = (0f64, 0f64);
    for ((var, start), (name, peft_t)) in
        policy.vars().iter().zip(&init).zip(theirs.named_tensors())
    {
        let ours = (var.as_tensor() - start).unwrap();
        let peft_update = (&peft_t - start).unwrap();
        let sq =
            |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        diff += sq(&(&ours - &peft_update).unwrap());
        norm += sq(&peft_update);
        assert_eq!(ours.dims(), peft_update.dims(), "{name}");
    }
    let rel = (diff / norm).sqrt();
    eprintln!("adapter update after one step: relative difference to PEFT's {rel:.2e}");
    assert!(norm > 0.0 && rel < 1e-2, "the adapter updates differ: relative {rel}");
}

/// `--lora-dropout`: the run starts at ln 2 (B = 0, so dropping the adapters' input changes
/// nothing yet), trains, and is a function of its seed: two runs log the same losses, a run
/// without dropout others.
#[test]
fn dropout_runs_start_at_ln2_and_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let server = Server::start(&model, &[], dir.path());
    let losses = |name: &str, extra: &[&str]| {
        let out_dir = dir.path().join(name);
        let out = run(&trainer_args(&model, &server.url, &out_dir, 4), extra);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let trains = kind(&read_jsonl(&out_dir.join(METRICS_FILE)), "train");
        trains.iter().map(|t| f(t, "loss")).collect::<Vec<_>>()
    };
    let (a, b) = (losses("a", &["--lora-dropout", "0.1"]), losses("b", &["--lora-dropout", "0.1"]));
    let none = losses("none", &[]);
    assert!((none[1] - a[1]).abs() > 1e-4 * a[1], "dropout changed nothing: {a:?} vs {none:?}");
    // Equal up to the reference's float rounding (the server batches differently per run).
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1e-3),
            "the same seed drops the same inputs: {a:?} vs {b:?}"
        );
    }
    assert!((a[0] - std::f64::consts::LN_2).abs() < 1e-5, "{a:?}");
    assert!(a[3] < a[0], "{a:?}");
}

/// `ref-server serve --adapter DIR` serves base + adapter: the same model, fingerprint and
/// scores as the merged checkpoint `--save-merged` writes; an adapter for another base is
/// refused at start-up naming the adapter.
#[test]
fn a_server_serves_base_plus_adapter_as_the_merged_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let server = Server::start(&model, &[], dir.path());
    let run_dir = dir.path().join("run");
    let out = run(&trainer_args(&model, &server.url, &run_dir, 4), &["--save-merged"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let best = run_dir.join("best");

    let (adapter_logs, merged_logs) = (dir.path().join("adapter"), dir.path().join("merged"));
    std::fs::create_dir_all(&adapter_logs).unwrap();
    std::fs::create_dir_all(&merged_logs).unwrap();
    let with_adapter = Server::start(&model, &["--adapter", best.to_str().unwrap()], &adapter_logs);
    let merged = Server::start(&run_dir.join("merged"), &[], &merged_logs);
    let info = |url: &str| -> Value {
        let out =
            Command::new(binary("ref-server")).args(["info", "--server", url]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (a, m, b) = (info(&with_adapter.url), info(&merged.url), info(&server.url));
    assert_eq!(a["fingerprint"], m["fingerprint"], "base + adapter is the merged model");
    assert_ne!(a["fingerprint"], b["fingerprint"], "the adapter changed nothing");
    assert!(a["source"].as_str().unwrap().contains("best"), "{a}");

    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\":\"a b c\",\"chosen\":\"d e\",\"rejected\":\"f\"}\n")
        .unwrap();
    let score = |url: &str, name: &str| -> Value {
        let output = dir.path().join(name);
        let out = Command::new(binary("ref-server"))
            .args(["score", "--server", url, "--template", "raw", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        read_jsonl(&output).remove(0)
    };
    let (sa, sm) = (score(&with_adapter.url, "a.jsonl"), score(&merged.url, "m.jsonl"));
    for key in ["chosen_logprob", "rejected_logprob"] {
        let (x, y) = (f(&sa, key), f(&sm, key));
        assert!((x - y).abs() < 1e-4, "{key}: adapter {x}, merged {y}");
    }

    // dpo-eval --model BASE --adapter DIR evaluates what the merged checkpoint does.
    let mmlu = workspace_root().join("tests/fixtures/eval/mmlu");
    let run_eval = |extra: &[&str], report: &Path| -> Output {
        Command::new(binary("dpo-eval"))
            .args(["mmlu", "--by-logprob", "--template", "raw", "--input"])
            .arg(&mmlu)
            .arg("--out")
            .arg(report)
            .args(extra)
            .output()
            .unwrap()
    };
    let evaluate = |extra: &[&str], name: &str| -> Value {
        let report = dir.path().join(name);
        let out = run_eval(extra, &report);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
    };
    let merged_dir = run_dir.join("merged");
    let e_adapter = evaluate(
        &["--model", model.to_str().unwrap(), "--adapter", best.to_str().unwrap()],
        "ea.json",
    );
    let e_merged = evaluate(&["--model", merged_dir.to_str().unwrap()], "em.json");
    for key in ["accuracy", "n"] {
        assert_eq!(e_adapter["metrics"][key], e_merged["metrics"][key], "{key}");
    }
    assert!(e_adapter["metrics"]["n"].as_f64() > Some(0.0), "{e_adapter}");
    let no_model = Command::new(binary("dpo-eval"))
        .args(["mmlu", "--server", &server.url, "--input"])
        .arg(&mmlu)
        .arg("--adapter")
        .arg(&best)
        .output()
        .unwrap();
    assert!(!no_model.status.success(), "--adapter without --model was accepted");

    // An adapter for a wider base does not fit this one.
    let wide = dir.path().join("wide");
    write_tiny_checkpoint(&wide, &TinySpec { hidden: 64, ..TinySpec::default() }, DType::F32, None)
        .unwrap();
    // `ref-server serve --model BASE --adapter best/`, which must fail: its stderr.
    let serving_refused = |base: &Path| -> String {
        let out = Command::new(binary("ref-server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--model"])
            .arg(base)
            .arg("--adapter")
            .arg(&best)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{err}");
        err
    };
    let err = serving_refused(&wide);
    assert!(err.contains("adapter") && err.contains(best.to_str().unwrap()), "{err}");

    // Nor on a base of the same shapes with other weights: the trainer recorded its base's
    // fingerprint beside the adapter, and the server and dpo-eval check it.
    let base_record: Value =
        serde_json::from_slice(&std::fs::read(best.join(lora::ADAPTER_BASE)).unwrap()).unwrap();
    assert_eq!(base_record["base_fingerprint"], b["fingerprint"], "{base_record}");
    let other = dir.path().join("other");
    write_tiny_checkpoint(&other, &TinySpec { seed: 2, ..TinySpec::default() }, DType::F32, None)
        .unwrap();
    let err = serving_refused(&other);
    for wanted in [lora::ADAPTER_BASE, "trained on", model.to_str().unwrap()] {
        assert!(err.contains(wanted), "`{wanted}` not in:\n{err}");
    }
    let refused = run_eval(
        &["--model", other.to_str().unwrap(), "--adapter", best.to_str().unwrap()],
        &dir.path().join("refused.json"),
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains(lora::ADAPTER_BASE), "{err}");
}
