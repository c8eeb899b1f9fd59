//! The two-process path end to end: `ref-server` on an ephemeral port with a tiny random
//! Llama, `policy-trainer train` against it on a small learnable preference set.
//!
//! Checks: the step-0 loss is ln 2 for every validation pair (policy == reference through
//! gRPC); validation accuracy rises; `best/` holds the step with the highest accuracy and
//! loads as a model; a killed run `--resume`s from its last checkpoint and reproduces the
//! loss curve of an uninterrupted run; `--report-to tensorboard` event files show what
//! `metrics.jsonl` holds, also across a resume.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use dpo_common::model::{load_model, Mode};
use dpo_common::testing::{workspace_root, write_tiny_checkpoint, TinySpec};
use dpo_tests::{binary, number as f, of_kind as kind, read_jsonl, Server};
use policy_trainer::metrics::{tensorboard_scalars, METRICS_FILE};
use policy_trainer::plot::CHART_FILE;
use policy_trainer::tensorboard::read_scalars;
use serde_json::Value;

fn fixture() -> PathBuf {
    workspace_root().join("tests/fixtures/prefs_small.jsonl")
}

fn trainer_args(model: &Path, url: &str, out: &Path, max_steps: usize) -> Vec<String> {
    [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--ref-server",
        url,
        "--data",
        fixture().to_str().unwrap(),
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
        "3e-3",
        "--beta",
        "0.5",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--epochs",
        "3",
        "--max-steps",
        &max_steps.to_string(),
        "--seed",
        "7",
        "--no-progress",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn trains_selects_best_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let server = Server::start(&model, &[], dir.path());

    // An uninterrupted run of 10 steps.
    let full = dir.path().join("full");
    let out = Command::new(binary("policy-trainer"))
        .args(trainer_args(&model, &server.url, &full, 10))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trainer failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("best/") || stdout.contains("best"), "{stdout}");

    let records = read_jsonl(&full.join(METRICS_FILE));
    let evals = kind(&records, "eval");
    let trains = kind(&records, "train");
    assert_eq!(trains.len(), 10);
    assert_eq!(evals.len(), 6, "evals at steps 0,2,4,6,8,10");

    // Step 0: policy == reference, so every pair's loss is ln 2 (through gRPC).
    let e0 = &evals[0];
    assert_eq!(e0["step"], 0);
    let ln2 = std::f64::consts::LN_2;
    assert!((f(e0, "loss") - ln2).abs() < 1e-5, "step-0 loss {}", f(e0, "loss"));
    assert!((f(e0, "loss_min") - ln2).abs() < 1e-5 && (f(e0, "loss_max") - ln2).abs() < 1e-5);
    assert!((f(&trains[0], "loss") - ln2).abs() < 1e-5, "first step's training loss");
    assert_eq!(f(e0, "reward_accuracy"), 0.0, "step 0: every margin is a tie (wrong)");

    // Learning: accuracy rises and the loss falls.
    let accs: Vec<f64> = evals.iter().map(|e| f(e, "reward_accuracy")).collect();
    let best_acc = accs[1..].iter().cloned().fold(f64::MIN, f64::max);
    assert!(best_acc >= 0.75, "validation accuracy never rose: {accs:?}");
    assert!(f(evals.last().unwrap(), "loss") < ln2 - 0.05, "validation loss did not fall");

    // best/ holds the first step reaching the highest accuracy (step 0 is not eligible).
    let best_step = evals[1..]
        .iter()
        .find(|e| f(e, "reward_accuracy") == best_acc)
        .map(|e| e["step"].as_u64().unwrap())
        .unwrap();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("best/best.json")).unwrap())
            .unwrap();
    assert_eq!(meta["step"].as_u64().unwrap(), best_step, "{meta}");
    assert_eq!(meta["value"].as_f64().unwrap(), best_acc);
    let best = load_model(&full.join("best"), Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
    assert_ne!(
        best.fingerprint,
        load_model(&model, Mode::Frozen, DType::F32, &Device::Cpu).unwrap().fingerprint,
        "best/ must hold trained weights"
    );

    // Same run, crashed right after step 5 (its last checkpoint is step 4), then resumed.
    let killed = dir.path().join("killed");
    let crashed = Command::new(binary("policy-trainer"))
        .args(trainer_args(&model, &server.url, &killed, 10))
        .env("DPO_TEST_CRASH_AFTER_STEP", "5")
        .output()
        .unwrap();
    assert!(!crashed.status.success(), "the crash hook did not fire");
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(killed.join("last/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let saved_step = saved["step"].as_u64().unwrap();
    assert_eq!(saved_step, 4);
    assert_eq!(kind(&read_jsonl(&killed.join(METRICS_FILE)), "train").len(), 5);

    // Without --resume the trainer refuses to touch the run.
    let refused = Command::new(binary("policy-trainer"))
        .args(trainer_args(&model, &server.url, &killed, 10))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));

    let mut args = trainer_args(&model, &server.url, &killed, 10);
    args.push("--resume".into());
    // Nor resumes it with another loss.
    let other_loss = Command::new(binary("policy-trainer"))
        .args(&args)
        .args(["--loss", "ipo"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&other_loss.stderr);
    assert!(!other_loss.status.success(), "resumed with another loss:\n{err}");
    assert!(err.contains("--loss sigmoid, not ipo"), "{err}");
    let out = Command::new(binary("policy-trainer")).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed:\n{stderr}");
    assert!(stderr.contains(&format!("resuming at step {saved_step}")), "{stderr}");

    // The resumed run's log is the uninterrupted run's: each step once, same losses.
    let resumed = read_jsonl(&killed.join(METRICS_FILE));
    let rt = kind(&resumed, "train");
    assert_eq!(rt.len(), 10, "one record per step after the resume");
    for (a, b) in rt.iter().zip(&trains) {
        assert_eq!(a["step"], b["step"]);
        let (la, lb) = (f(a, "loss"), f(b, "loss"));
        assert!((la - lb).abs() < 1e-4 * lb.abs().max(1.0), "step {}: {la} vs {lb}", a["step"]);
    }
    let re = kind(&resumed, "eval");
    assert_eq!(re.len(), evals.len());
    for (a, b) in re.iter().zip(&evals) {
        assert_eq!(a["reward_accuracy"], b["reward_accuracy"], "eval at step {}", a["step"]);
    }
}

#[test]
fn grad_checkpointing_trains_the_same_as_a_plain_backward() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    // Four layers, so that there is something to recompute between the layer inputs.
    write_tiny_checkpoint(&model, &TinySpec { layers: 4, ..TinySpec::default() }, DType::F32, None)
        .unwrap();
    let server = Server::start(&model, &[], dir.path());
    let run = |name: &str, extra: &[&str]| {
        let out_dir = dir.path().join(name);
        let out = Command::new(binary("policy-trainer"))
            .args(trainer_args(&model, &server.url, &out_dir, 4))
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        read_jsonl(&out_dir.join(METRICS_FILE))
    };
    let plain = run("plain", &[]);
    let ckpt = run("checkpointed", &["--grad-checkpointing"]);
    assert_eq!(plain.len(), ckpt.len());
    // The recomputed layers are the same ops on the same inputs: equal up to f32 rounding,
    // also after four updates at lr 3e-3.
    for (a, b) in plain.iter().zip(&ckpt) {
        assert_eq!(a["kind"], b["kind"]);
        assert_eq!(a["step"], b["step"]);
        let keys: &[&str] = if a["kind"] == "train" {
            &["loss", "margin", "grad_norm", "reward_accuracy"]
        } else {
            &["loss", "margin", "reward_accuracy"]
        };
        for key in keys {
            let (x, y) = (f(a, key), f(b, key));
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{key}: {x} vs {y}\n{a}\n{b}");
        }
    }
}

/// The memory-saving configuration for large models (`--dtype bf16 --grad-dtype bf16
/// --optim-state-dtype bf16`) on the same run: it trains (the step-0 loss is ln 2 up to
/// bf16's rounding of the policy's log-probs), saves its RMSprop state in bf16, resumes
/// from it, and a resume with another state dtype is refused by name.
#[test]
fn bf16_weights_gradients_and_state_train_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    // Stored in bf16, as large checkpoints are: the f32 server and the bf16 policy then
    // load the same values (the same fingerprint).
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::BF16, None).unwrap();
    let server = Server::start(&model, &[], dir.path());
    let out_dir = dir.path().join("run");
    let lean = ["--dtype", "bf16", "--grad-dtype", "bf16", "--optim-state-dtype", "bf16"];
    let train = |steps: usize, extra: &[&str]| {
        Command::new(binary("policy-trainer"))
            .args(trainer_args(&model, &server.url, &out_dir, steps))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = train(2, &lean);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bf16 run failed:\n{stderr}");
    assert!(stderr.contains("gradients BF16, RMSprop state BF16"), "{stderr}");
    let records = read_jsonl(&out_dir.join(METRICS_FILE));
    let trains = kind(&records, "train");
    assert_eq!(trains.len(), 2);
    let ln2 = std::f64::consts::LN_2;
    let e0 = &kind(&records, "eval")[0];
    assert!((f(e0, "loss") - ln2).abs() < 0.05, "step-0 loss {}", f(e0, "loss"));
    for t in &trains {
        assert!(f(t, "loss").is_finite() && f(t, "grad_norm") > 0.0, "{t}");
    }
    let state =
        candle_core::safetensors::load(out_dir.join("last/optimizer.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(!state.is_empty());
    assert!(state.values().all(|t| t.dtype() == DType::BF16), "the state was not saved in bf16");

    // Resuming with the default f32 state is refused, naming the flag; with the run's own
    // flags it continues.
    let refused = train(3, &["--dtype", "bf16", "--grad-dtype", "bf16", "--resume"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("--optim-state-dtype"), "{stderr}");
    let resumed = train(3, &[&lean[..], &["--resume"]].concat());
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "bf16 resume failed:\n{stderr}");
    assert!(stderr.contains("resuming at step 2"), "{stderr}");
    let trains = kind(&read_jsonl(&out_dir.join(METRICS_FILE)), "train");
    assert_eq!(trains.len(), 3);
    assert!(f(&trains[2], "loss").is_finite());
}

/// A run without validation pairs evaluates nothing, so it draws no chart: its summary
/// names the files it wrote and no chart.
#[test]
fn a_run_without_validation_names_only_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let server = Server::start(&model, &[], dir.path());
    let out_dir = dir.path().join("run");
    let out = Command::new(binary("policy-trainer"))
        .args(trainer_args(&model, &server.url, &out_dir, 1))
        .args(["--val-size", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out_dir.join(CHART_FILE).exists());
    assert!(!stdout.contains(CHART_FILE), "names a chart it did not draw:\n{stdout}");
    assert!(stdout.contains("best:    none saved"), "{stdout}");
    for written in [METRICS_FILE, "last"] {
        let path = out_dir.join(written);
        assert!(path.exists() && stdout.contains(&path.display().to_string()), "{stdout}");
    }
}

/// `--report-to tensorboard` on a run killed after step 3 (its checkpoint: step 2) and resumed
/// to step 4: two event files in `--out`, and TensorBoard's view of them (the crashed run's
/// step 3 hidden by the resumed file's restart mark) is exactly `metrics.jsonl`, under Hugging
/// Face's tags. When DPO_TENSORBOARD_PYTHON names a Python with the `tensorboard` package
/// (deploy/test.sh makes one), TensorBoard's own reader checks the same
/// (`tests/conformance/tensorboard_events.py`).
#[test]
fn report_to_tensorboard_shows_the_metrics_across_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let server = Server::start(&model, &[], dir.path());
    let out_dir = dir.path().join("run");
    let train = |extra: &[&str], crash_after: Option<&str>| {
        let mut command = Command::new(binary("policy-trainer"));
        command.args(trainer_args(&model, &server.url, &out_dir, 4));
        command.args(["--report-to", "tensorboard"]).args(extra);
        if let Some(step) = crash_after {
            command.env("DPO_TEST_CRASH_AFTER_STEP", step);
        }
        command.output().unwrap()
    };
    let crashed = train(&[], Some("3"));
    assert!(!crashed.status.success(), "the crash hook did not fire");
    let event_files = || -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents.")
            })
            .collect();
        files.sort();
        files
    };
    assert_eq!(event_files().len(), 1);
    let before_resume = read_scalars(&out_dir).unwrap();
    assert!(before_resume.iter().any(|s| s.tag == "train/loss" && s.step == 3));
    let resumed = train(&["--resume"], None);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(event_files().len(), 2, "a resumed run adds an event file");

    let records = read_jsonl(&out_dir.join(METRICS_FILE));
    let mut expected = Vec::new();
    for record in &records {
        let (step, scalars) = tensorboard_scalars(record).unwrap();
        expected.extend(scalars.into_iter().map(|(tag, v)| (tag, step, v as f32)));
    }
    let shown: Vec<(String, i64, f32)> =
        read_scalars(&out_dir).unwrap().into_iter().map(|s| (s.tag, s.step, s.value)).collect();
    assert_eq!(shown, expected);
    // The names a TRL dashboard reads, at the optimizer steps.
    let curve = |tag: &str| -> Vec<(i64, f32)> {
        shown.iter().filter(|s| s.0 == tag).map(|s| (s.1, s.2)).collect()
    };
    let metric = |kind: &str, key: &str| -> Vec<(i64, f32)> {
        records
            .iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| (r["step"].as_i64().unwrap(), f(r, key) as f32))
            .collect()
    };
    assert_eq!(curve("train/loss"), metric("train", "loss"));
    assert_eq!(curve("train/loss").iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(curve("eval/loss"), metric("eval", "loss"));
    assert_eq!(curve("eval/loss").iter().map(|p| p.0).collect::<Vec<_>>(), [0, 2, 4]);
    assert_eq!(curve("eval/reward_accuracy"), metric("eval", "reward_accuracy"));
    assert!(curve("train/step").is_empty() && curve("eval/step").is_empty());

    match std::env::var_os("DPO_TENSORBOARD_PYTHON") {
        Some(python) => {
            let script = workspace_root().join("tests/conformance/tensorboard_events.py");
            let check = Command::new(python)
                .arg(script)
                .arg("--check")
                .arg(&out_dir)
                .arg("--metrics")
                .arg(out_dir.join(METRICS_FILE))
                .output()
                .unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            assert!(check.status.success(), "TensorBoard's reader disagrees:\n{report}");
            assert!(report.contains("exactly the records of"), "{report}");
            eprintln!("{report}");
        }
        None => eprintln!(
            "DPO_TENSORBOARD_PYTHON is not set: TensorBoard's own reader was not run on the \
             event files (deploy/test.sh sets it)"
        ),
    }
}

#[test]
fn refuses_a_different_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let other = dir.path().join("other");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    write_tiny_checkpoint(&other, &TinySpec { seed: 2, ..TinySpec::default() }, DType::F32, None)
        .unwrap();
    let server = Server::start(&other, &[], dir.path());
    let out = Command::new(binary("policy-trainer"))
        .args(trainer_args(&model, &server.url, &dir.path().join("run"), 2))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("different model"), "{stderr}");
    assert!(stderr.contains("--allow-different-reference"), "{stderr}");
}

#[test]
fn unreachable_server_fails_after_the_timeout_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    // A port nobody listens on: bind, read it, drop the listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let mut args = trainer_args(&model, &url, &dir.path().join("run"), 2);
    args.extend(["--ref-timeout".into(), "2".into()]);
    let started = Instant::now();
    let out = Command::new(binary("policy-trainer")).args(&args).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&url) && stderr.contains("unreachable"), "{stderr}");
    assert!(started.elapsed() >= Duration::from_secs(2), "gave up before --ref-timeout");
}
