//! A run against a fleet of reference replicas, as a user meets it: real `ref-server serve`
//! processes on loopback, the trainer given their URLs as one comma-separated
//! `--ref-server`.
//!
//! Checks: three replicas all take a share of the requests; one killed with SIGKILL
//! mid-run loses no step and changes no loss (against an undisturbed run on one server);
//! replicas serving different models are refused before training, naming both.

use std::path::Path;
use std::process::Stdio;

use candle_core::DType;
use dpo_common::testing::{write_tiny_checkpoint, TinySpec};
use dpo_tests::faults::{assert_same_losses, short_run, train_losses, two_models, wait_for_step};
use dpo_tests::Server;

fn replicas(model: &Path, dir: &Path, n: usize) -> Vec<Server> {
    (0..n)
        .map(|i| {
            let log_dir = dir.join(format!("replica-{i}"));
            std::fs::create_dir_all(&log_dir).unwrap();
            Server::start(model, &[], &log_dir)
        })
        .collect()
}

fn urls(servers: &[Server]) -> String {
    servers.iter().map(|s| s.url.as_str()).collect::<Vec<_>>().join(",")
}

/// Each replica's calls from the summary's `replicas:` list (`URL N calls (P%…)`).
fn calls_per_replica(stdout: &str, servers: &[Server]) -> Vec<u64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("reference:") && l.contains("replicas:"))
        .unwrap_or_else(|| panic!("no replica shares in the summary:\n{stdout}"));
    servers
        .iter()
        .map(|s| {
            let after = line
                .split(&format!("{} ", s.url))
                .nth(1)
                .unwrap_or_else(|| panic!("{} missing from the summary line: {line}", s.url));
            after.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn a_run_spreads_over_three_replicas_and_survives_losing_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let mut fleet = replicas(&model, dir.path(), 3);
    let out = dir.path().join("fleet-run");
    let stderr_path = dir.path().join("trainer.stderr");
    let run = short_run(&model, &urls(&fleet), &out, true)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut run = run;
    wait_for_step(&mut run, &out, 2);
    assert!(run.try_wait().unwrap().is_none(), "the run ended before a replica was killed");
    fleet[1].child.kill().unwrap(); // SIGKILL
    fleet[1].child.wait().unwrap();
    let finished = run.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(finished.status.success(), "the run did not survive losing a replica:\n{stderr}");
    let stdout = String::from_utf8_lossy(&finished.stdout);
    let calls = calls_per_replica(&stdout, &fleet);
    assert!(calls.iter().all(|&n| n > 0), "a replica took no request: {calls:?}\n{stdout}");

    // The same flags, undisturbed, against one server.
    let calm = dir.path().join("undisturbed-run");
    let single = short_run(&model, &fleet[0].url, &calm, false).output().unwrap();
    assert!(single.status.success(), "{}", String::from_utf8_lossy(&single.stderr));
    assert_same_losses(&train_losses(&out), &train_losses(&calm), 6);
}

#[test]
fn replicas_serving_different_models_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let [(model, model_fp), (other, other_fp)] = two_models(dir.path());
    let mut fleet = replicas(&model, dir.path(), 1);
    fleet.extend(replicas(&other, &dir.path().join("other-replica"), 1));
    let out = dir.path().join("run");
    let run = short_run(&model, &urls(&fleet), &out, false).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "a run trained against two models:\n{stderr}");
    assert!(stderr.contains("replicas serve different models"), "{stderr}");
    for needle in [model_fp, other_fp, fleet[0].url.clone(), fleet[1].url.clone()] {
        assert!(stderr.contains(&needle), "{needle} missing:\n{stderr}");
    }
    assert!(train_losses_if_any(&out).is_empty(), "it trained before refusing");
}

fn train_losses_if_any(out: &Path) -> Vec<(u64, f64)> {
    if out.join("metrics.jsonl").exists() {
        train_losses(out)
    } else {
        vec![]
    }
}
