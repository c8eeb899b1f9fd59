//! The preference losses end to end: `policy-trainer train --loss …` against a real
//! `ref-server` (or, for a reference-free loss, none at all) on a tiny random Llama.
//!
//! Each run's first training step is taken with the policy equal to the reference, so its
//! logged loss is the loss's step-0 value: checked against the closed form where the loss
//! reads the reference (sigmoid with label smoothing, ipo, aot), against the sum of its terms
//! for a mix with sft, and approximately for SimPO, whose start depends on the policy's own
//! log-probs. The metrics carry TRL's names and the loss in use; the reference-free run
//! contacts no server and writes no reference cache.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::DType;
use dpo_common::testing::{workspace_root, write_tiny_checkpoint, TinySpec};
use dpo_tests::{binary, number as f, read_jsonl, Server};
use policy_trainer::metrics::METRICS_FILE;
use serde_json::Value;

const LN2: f64 = std::f64::consts::LN_2;

/// Two steps of 8 pairs (micro-batches of 4), validation at steps 0 and 2.
fn train(model: &Path, reference: &str, out: &Path, extra: &[&str]) -> Output {
    Command::new(binary("policy-trainer"))
        .arg("train")
        .arg("--model")
        .arg(model)
        .args(["--ref-server", reference, "--data"])
        .arg(workspace_root().join("tests/fixtures/prefs_small.jsonl"))
        .arg("--out")
        .arg(out)
        .args(["--template", "raw", "--max-length", "128", "--val-size", "16"])
        .args(["--batch-size", "8", "--micro-batch", "4", "--lr", "3e-3", "--eval-every", "2"])
        .args(["--max-steps", "2", "--seed", "7", "--no-progress"])
        .args(extra)
        .output()
        .unwrap()
}

struct Run {
    trains: Vec<Value>,
    evals: Vec<Value>,
    stderr: String,
    stdout: String,
}

fn finished(out: &Output, dir: &Path, what: &str) -> Run {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{stderr}");
    let records = read_jsonl(&dir.join(METRICS_FILE));
    let of = |k: &str| records.iter().filter(|r| r["kind"] == k).cloned().collect::<Vec<_>>();
    let run = Run {
        trains: of("train"),
        evals: of("eval"),
        stderr,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    assert_eq!(run.trains.len(), 2, "{what}: the run did not finish its steps");
    assert_eq!(run.evals.len(), 2, "{what}: evaluations at steps 0 and 2");
    run
}

/// The step-0 values (first training step and step-0 validation) equal `expected`, which the
/// trainer also printed before training.
fn starts_at(run: &Run, what: &str, expected: f64) {
    let (train, eval) = (f(&run.trains[0], "loss"), f(&run.evals[0], "loss"));
    assert!((train - expected).abs() < 1e-5, "{what}: first training loss {train}, not {expected}");
    assert!(
        (eval - expected).abs() < 1e-5,
        "{what}: step-0 validation loss {eval}, not {expected}"
    );
    let printed = format!("{expected:.6} at step 0");
    assert!(run.stderr.contains(&printed), "{what}: `{printed}` not printed:\n{}", run.stderr);
    assert_eq!(f(&run.evals[0], "reward_accuracy"), 0.0, "{what}: step-0 margins are ties");
    for t in &run.trains {
        assert!(f(t, "loss").is_finite() && f(t, "grad_norm") > 0.0, "{what}: {t}");
    }
}

#[test]
fn every_kind_of_loss_trains_from_its_step_zero_value() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let server = Server::start(&model, &[], dir.path());
    let run = |name: &str, reference: &str, extra: &[&str]| {
        let out_dir = dir.path().join(name);
        finished(&train(&model, reference, &out_dir, extra), &out_dir, name)
    };

    // Conservative DPO: (1−ε)·ln 2 + ε·ln 2. With TRL's metric names beside ours.
    let smoothed = run("sigmoid", &server.url, &["--loss", "sigmoid", "--label-smoothing", "0.1"]);
    starts_at(&smoothed, "sigmoid ε=0.1", LN2);
    let (t, e) = (&smoothed.trains[0], &smoothed.evals[0]);
    assert_eq!(t["loss_type"], "sigmoid");
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/rejected"] {
        assert!(f(t, key).is_finite(), "{key}: {t}");
    }
    assert!(f(t, "logps/chosen") < 0.0 && f(t, "learning_rate") == 3e-3, "{t}");
    assert_eq!(f(t, "rewards/accuracies"), f(t, "reward_accuracy"));
    let tokens =
        [&smoothed.trains[0], &smoothed.trains[1]].map(|t| t["num_tokens"].as_u64().unwrap());
    assert!(tokens[0] > 0 && tokens[1] > tokens[0], "cumulative: {tokens:?}");
    assert_eq!(f(e, "eval_loss"), f(e, "loss"));
    assert_eq!(f(e, "eval_rewards/accuracies"), 0.0);
    assert!(f(e, "eval_logps/chosen") < 0.0 && f(e, "eval_rewards/margins").abs() < 1e-4, "{e}");
    assert!((f(e, "loss_min") - LN2).abs() < 1e-5 && (f(e, "loss_max") - LN2).abs() < 1e-5);

    // IPO on per-token log-ratios: (1/(2β))² = 1 at β = 0.5.
    starts_at(&run("ipo", &server.url, &["--loss", "ipo", "--beta", "0.5"]), "ipo", 1.0);

    // AOT couples each micro-batch (a scoring pass first): ln 2, and no per-pair extremes.
    let aot = run("aot", &server.url, &["--loss", "aot"]);
    starts_at(&aot, "aot", LN2);
    assert!(aot.evals[0].get("loss_min").is_none(), "{}", aot.evals[0]);

    // RPO: sigmoid plus half the chosen NLL per token. The NLL alone (`--loss sft`, which is
    // reference-free) on the same first batch gives the second term.
    let sft = run("sft", "none", &["--loss", "sft"]);
    let mix = run("rpo", &server.url, &["--sft-weight", "0.5"]);
    assert_eq!(mix.trains[0]["loss_type"], "sigmoid:1,sft:0.5");
    let nll = f(&sft.trains[0], "loss");
    assert!(nll > 0.5, "a random model's NLL per token is large: {nll}");
    for (a, b) in [(&mix.trains[0], &sft.trains[0]), (&mix.evals[0], &sft.evals[0])] {
        let (got, want) = (f(a, "loss"), LN2 + 0.5 * f(b, "loss"));
        assert!((got - want).abs() < 1e-4, "sigmoid + 0.5·sft: {got}, not {want}");
    }
    assert!(mix.stderr.contains("depends on the data"), "{}", mix.stderr);
    drop(server);
}

/// SimPO needs no reference: no server runs, none is contacted, no cache is written.
#[test]
fn simpo_trains_without_any_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let out_dir = dir.path().join("simpo");
    let (beta, ratio): (f64, f64) = (0.1, 0.5);
    let out = train(
        &model,
        "none",
        &out_dir,
        &["--loss", "simpo", "--beta", "0.1", "--gamma-beta-ratio", "0.5"],
    );
    let run = finished(&out, &out_dir, "simpo");
    assert!(run.stderr.contains("reference-free"), "{}", run.stderr);
    assert!(run.stdout.contains("loss:    simpo (reference-free"), "{}", run.stdout);
    assert!(!out_dir.join("ref_cache.jsonl").exists(), "a reference-free run caches nothing");
    // softplus(−β·(ā_c − ā_r) + γ) with γ = β·ratio: a random model gives chosen and rejected
    // responses about the same average log-prob, so the start is near softplus(γ).
    let near = (1.0 + (beta * ratio).exp()).ln();
    for v in [f(&run.trains[0], "loss"), f(&run.evals[0], "loss")] {
        assert!((v - near).abs() < 0.05, "SimPO's start {v} is far from {near}");
    }
    // Rewards are β times average log-probs: negative, a few nats per token times β.
    assert!(f(&run.evals[0], "chosen_reward") < 0.0, "{}", run.evals[0]);
    assert_eq!(run.trains[0]["loss_type"], "simpo");
}
