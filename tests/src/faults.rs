//! Runs for the fault tests (a reference server killed and restarted, replicas lost): a
//! short training run whose reference traffic is spread over its steps, and ways to watch it.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use dpo_common::model::{load_model, Mode};
use dpo_common::testing::{workspace_root, write_tiny_checkpoint, TinySpec};
use serde_json::Value;

use crate::{binary, read_jsonl};

/// The trainer's metrics file (`policy_trainer::metrics::METRICS_FILE`).
const METRICS_FILE: &str = "metrics.jsonl";

/// Small batches and a short prefetch window, so that the pairs of the steps after the
/// kill are asked for only then; the trainer pauses after step 2 (a test hook) so that the
/// server is killed while the run is known to be still going.
pub fn short_run(model: &Path, url: &str, out: &Path, pause_after_step_2: bool) -> Command {
    let mut c = Command::new(binary("policy-trainer"));
    c.arg("train").arg("--model").arg(model).args(["--ref-server", url]);
    c.arg("--data").arg(workspace_root().join("tests/fixtures/prefs_small.jsonl"));
    c.arg("--out").arg(out);
    c.args(["--template", "raw", "--max-length", "128", "--val-size", "4"]);
    c.args(["--batch-size", "2", "--micro-batch", "1", "--max-steps", "6"]);
    c.args(["--eval-every", "3", "--save-every", "100", "--lr", "3e-3", "--beta", "0.5"]);
    c.args(["--ref-prefetch", "2", "--ref-batch", "1", "--ref-timeout", "60"]);
    c.args(["--seed", "7", "--no-progress"]);
    if pause_after_step_2 {
        c.env("DPO_TEST_PAUSE_AFTER_STEP", "2:1500");
    }
    c
}

pub fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    read_jsonl(&out.join(METRICS_FILE))
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until the run has logged `step` (or has ended, which the caller then reports).
pub fn wait_for_step(run: &mut Child, out: &Path, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let metrics = out.join(METRICS_FILE);
    loop {
        let logged = std::fs::read_to_string(&metrics).unwrap_or_default().lines().any(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|r| r["kind"] == "train" && r["step"].as_u64() == Some(step))
        });
        if logged || run.try_wait().unwrap().is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "the run never logged step {step}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two tiny checkpoints in `dir` that differ only in their random weights, `tiny` (the
/// default spec) and `other`, with their fingerprints.
pub fn two_models(dir: &Path) -> [(std::path::PathBuf, String); 2] {
    let default_seed = TinySpec::default().seed;
    [("tiny", default_seed), ("other", default_seed + 1)].map(|(name, seed)| {
        let path = dir.join(name);
        write_tiny_checkpoint(&path, &TinySpec { seed, ..TinySpec::default() }, DType::F32, None)
            .unwrap();
        let fingerprint =
            load_model(&path, Mode::Frozen, DType::F32, &Device::Cpu).unwrap().fingerprint;
        (path, fingerprint)
    })
}

/// A disturbed run logged every one of the undisturbed run's steps once, with its losses
/// (reference scores do not depend on which server process computed them).
pub fn assert_same_losses(got: &[(u64, f64)], want: &[(u64, f64)], steps: usize) {
    assert_eq!(got.len(), steps, "every step logged once: {got:?}");
    assert_eq!(
        got.iter().map(|s| s.0).collect::<Vec<_>>(),
        want.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    for ((step, a), (_, b)) in got.iter().zip(want) {
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "step {step}: {a} vs {b}");
    }
}
