//! `deploy/run.sh` itself, as a user runs it (with a tiny model and the binaries this test
//! build made, via `DPO_BIN_DIR`): a short run leaves its outputs and no process behind; a
//! `--loss` reaches the trainer, and a reference-free one starts no server; a failing
//! trainer's exit status is the script's, again with nothing left running; a script killed
//! mid-run (even twice) takes its server and trainer with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::DType;
use dpo_common::testing::{workspace_root, write_tiny_checkpoint, TinySpec};
use dpo_tests::{binary, read_jsonl};
use policy_trainer::metrics::METRICS_FILE;
use policy_trainer::plot::CHART_FILE;

fn run_sh(model: &Path, out: &Path, extra: &[&str]) -> Command {
    let bin_dir = binary("ref-server").parent().unwrap().to_path_buf();
    assert!(binary("policy-trainer").starts_with(&bin_dir));
    let mut c = Command::new(workspace_root().join("deploy/run.sh"));
    c.env("DPO_BIN_DIR", &bin_dir).env_remove("DPO_CUDA").env_remove("DPO_AUTH_TOKEN");
    c.arg("--model").arg(model).arg("--out").arg(out).arg("--data");
    c.arg(workspace_root().join("tests/fixtures/prefs_small.jsonl"));
    c.args(["--template", "raw", "--max-length", "128", "--val-size", "8", "--batch-size", "4"]);
    c.args(["--micro-batch", "4", "--lr", "3e-3", "--no-progress"]);
    c.args(extra);
    c
}

/// Processes whose command line mentions `needle` (a test's private temp dir).
fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    model
}

fn show(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_short_run_leaves_its_outputs_and_no_processes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out_dir = dir.path().join("run");
    let out =
        run_sh(&model, &out_dir, &["--max-steps", "2", "--eval-every", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["best", METRICS_FILE, CHART_FILE] {
        assert!(
            stdout.contains(&out_dir.join(name).display().to_string()),
            "{name} not named:\n{stdout}"
        );
    }
    assert!(out_dir.join("best/config.json").is_file());
    assert!(out_dir.join(CHART_FILE).is_file());
    let records = read_jsonl(&out_dir.join(METRICS_FILE));
    assert_eq!(records.iter().filter(|r| r["kind"] == "train").count(), 2);
    assert_eq!(processes_mentioning(dir.path()), Vec::<String>::new());
}

/// `--loss` goes on to the trainer; a reference-free loss (simpo) starts no server at all.
#[test]
fn a_loss_is_passed_on_and_a_reference_free_one_starts_no_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    for (loss, starts_server) in [("ipo", true), ("simpo", false)] {
        let out_dir = dir.path().join(loss);
        let out =
            run_sh(&model, &out_dir, &["--loss", loss, "--max-steps", "1", "--eval-every", "1"])
                .output()
                .unwrap();
        assert!(out.status.success(), "--loss {loss}: {}", show(&out));
        assert_eq!(
            out_dir.join("ref-server.stdout").is_file(),
            starts_server,
            "--loss {loss}: {}",
            show(&out)
        );
        let records = read_jsonl(&out_dir.join(METRICS_FILE));
        let train: Vec<_> = records.iter().filter(|r| r["kind"] == "train").collect();
        assert_eq!(train.len(), 1);
        assert_eq!(train[0]["loss_type"], loss);
    }
    assert_eq!(processes_mentioning(dir.path()), Vec::<String>::new());
}

#[test]
fn a_failing_trainer_fails_the_script_and_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // Rejected by the trainer after the server is up.
    let out = run_sh(&model, &dir.path().join("run"), &["--max-steps", "2", "--beta=-1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--beta"), "{}", show(&out));
    assert!(
        dir.path().join("run/ref-server.stdout").is_file(),
        "the server should have been started before the trainer failed"
    );
    assert_eq!(processes_mentioning(dir.path()), Vec::<String>::new());
}

#[test]
fn killing_the_script_stops_the_server_and_the_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out_dir = dir.path().join("run");
    let mut child = run_sh(&model, &out_dir, &["--max-steps", "100000", "--eval-every", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until training is under way (the first training step is logged).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(out_dir.join(METRICS_FILE))
        .is_ok_and(|s| s.contains("\"train\""))
    {
        assert!(Instant::now() < deadline, "training never started");
        assert!(child.try_wait().unwrap().is_none(), "run.sh ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Twice, as an impatient user or a supervisor would: clean-up must still finish.
    sigterm(child.id());
    std::thread::sleep(Duration::from_millis(50));
    // (It may be gone already: then this one is refused, which is fine.)
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "run.sh should exit 128+SIGTERM");
    assert_eq!(processes_mentioning(dir.path()), Vec::<String>::new());
}

fn sigterm(pid: u32) {
    let ok = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM {pid}");
}
