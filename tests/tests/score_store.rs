//! The server's score store as users meet it: real processes on loopback, a tiny random
//! model, `ref-server serve --score-store FILE`.
//!
//! Checks: a second trainer run over the same pairs is answered from the store (no forward
//! tokens for it, the same losses); concurrent clients asking for the same responses get
//! each computed once (single flight); the store survives its server killed with SIGKILL
//! in the middle of writing and gives the right scores after a restart; a store of another
//! model, a file that is not a store and a store in use by another server are refused with
//! an error naming the file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use dpo_common::model::{load_model, Mode};
use dpo_common::testing::{workspace_root, write_tiny_checkpoint, TinySpec};
use dpo_tests::{binary, read_jsonl, Server};
use policy_trainer::metrics::METRICS_FILE;
use serde_json::Value;

fn prefs() -> PathBuf {
    workspace_root().join("tests/fixtures/prefs_small.jsonl")
}

fn tiny(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let model = dir.join(name);
    write_tiny_checkpoint(&model, &TinySpec { seed, ..TinySpec::default() }, DType::F32, None)
        .unwrap();
    model
}

/// The server's `ModelInfo.score_store`, as `ref-server info` prints it.
fn store_stats(url: &str) -> Value {
    let out = Command::new(binary("ref-server")).args(["info", "--server", url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["score_store"].clone()
}

fn count(stats: &Value, name: &str) -> u64 {
    stats[name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {stats}"))
}

/// Distinct (prompt, response) pairs of a preference file: the responses a store holds.
fn distinct_responses(path: &Path) -> usize {
    let mut seen = HashSet::new();
    for line in read_jsonl(path) {
        for side in ["chosen", "rejected"] {
            seen.insert((line["prompt"].to_string(), line[side].to_string()));
        }
    }
    seen.len()
}

fn score_command(url: &str, input: &Path, output: &Path, batch_size: usize) -> Command {
    let mut c = Command::new(binary("ref-server"));
    c.args(["score", "--server", url, "--template", "raw"]);
    c.arg("--input").arg(input).arg("--output").arg(output);
    c.args(["--batch-size", &batch_size.to_string()]);
    c
}

fn score(url: &str, input: &Path, output: &Path, batch_size: usize) {
    let out = score_command(url, input, output, batch_size).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn trainer(model: &Path, url: &str, out: &Path) -> Command {
    let mut c = Command::new(binary("policy-trainer"));
    c.arg("train").arg("--model").arg(model).args(["--ref-server", url]);
    c.arg("--data").arg(prefs()).arg("--out").arg(out);
    c.args(["--template", "raw", "--max-length", "128", "--val-size", "8"]);
    c.args(["--batch-size", "4", "--micro-batch", "2", "--max-steps", "4", "--eval-every", "2"]);
    c.args(["--save-every", "100", "--lr", "3e-3", "--beta", "0.5", "--seed", "7"]);
    c.arg("--no-progress");
    c
}

fn losses(out: &Path) -> Vec<(String, u64, f64)> {
    read_jsonl(&out.join(METRICS_FILE))
        .iter()
        .map(|r| {
            let kind = r["kind"].as_str().unwrap().to_string();
            (kind, r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap())
        })
        .collect()
}

/// `ref-server serve` expected to refuse to start: its exit status and stderr.
fn serve_refused(model: &Path, store_flags: &[&str]) -> (Output, String) {
    let out = Command::new(binary("ref-server"))
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--listen", "127.0.0.1:0"])
        .args(store_flags)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the server started:\n{stderr}");
    (out, stderr)
}

#[test]
fn a_second_run_over_the_same_pairs_is_answered_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "tiny", 1);
    let store = dir.path().join("scores.redb");
    let server = Server::start(&model, &["--score-store", store.to_str().unwrap()], dir.path());
    let before = store_stats(&server.url);
    assert_eq!(before["enabled"], true);
    assert_eq!(count(&before, "forward_tokens"), 0);

    let first = dir.path().join("first");
    let run = trainer(&model, &server.url, &first).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let after_first = store_stats(&server.url);
    let computed = count(&after_first, "misses");
    assert!(computed > 0 && count(&after_first, "forward_tokens") > 0, "{after_first}");
    assert_eq!(count(&after_first, "entries"), computed);

    let second = dir.path().join("second");
    let run = trainer(&model, &server.url, &second).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let after_second = store_stats(&server.url);
    assert_eq!(
        count(&after_second, "forward_tokens"),
        count(&after_first, "forward_tokens"),
        "the second run made forward passes: {after_second}"
    );
    assert_eq!(count(&after_second, "misses"), computed);
    assert!(count(&after_second, "hits") >= count(&after_first, "hits") + computed);
    // Bit-identical reference scores: the same losses.
    assert_eq!(losses(&second), losses(&first));
}

#[test]
fn concurrent_clients_compute_each_response_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "tiny", 1);
    let store = dir.path().join("scores.redb");
    // Every forward pass waits a little before it is queued, so that the two clients'
    // requests for the same pairs are in flight together for certain.
    let server = Server::start_with_env(
        "127.0.0.1:0",
        &model,
        &["--score-store", store.to_str().unwrap()],
        &[("DPO_TEST_SCORE_DELAY_MS", "400")],
        dir.path(),
    );
    let outputs: Vec<PathBuf> =
        (0..2).map(|i| dir.path().join(format!("scored-{i}.jsonl"))).collect();
    let clients: Vec<_> = outputs
        .iter()
        .map(|out| {
            score_command(&server.url, &prefs(), out, 16).stderr(Stdio::null()).spawn().unwrap()
        })
        .collect();
    for mut c in clients {
        assert!(c.wait().unwrap().success());
    }
    let (a, b) = (read_jsonl(&outputs[0]), read_jsonl(&outputs[1]));
    assert_eq!(a, b, "both clients got the same scores");
    let stats = store_stats(&server.url);
    let distinct = distinct_responses(&prefs()) as u64;
    assert_eq!(count(&stats, "misses"), distinct, "each response computed once: {stats}");
    assert_eq!(count(&stats, "hits") + count(&stats, "single_flight_waits"), distinct, "{stats}");
    assert!(count(&stats, "single_flight_waits") > 0, "the clients never overlapped: {stats}");
}

#[test]
fn the_store_survives_its_server_killed_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "tiny", 1);
    let store = dir.path().join("scores.redb");
    let flags = ["--score-store", store.to_str().unwrap()];

    // One pair per request: the store is written after every request; SIGKILL while the
    // client is still sending.
    let first_dir = dir.path().join("first");
    std::fs::create_dir_all(&first_dir).unwrap();
    let mut server = Server::start(&model, &flags, &first_dir);
    let mut client = score_command(&server.url, &prefs(), &dir.path().join("cut.jsonl"), 1)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&store_stats(&server.url), "entries") < 8 {
        assert!(Instant::now() < deadline, "the store never filled");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let _ = client.wait();

    // Restarted on the same file: what survived is used, and every score is right.
    let second_dir = dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let server = Server::start(&model, &flags, &second_dir);
    let survived = count(&store_stats(&server.url), "entries");
    assert!(survived >= 8, "committed entries were lost: {survived}");
    let restarted = dir.path().join("restarted.jsonl");
    score(&server.url, &prefs(), &restarted, 16);
    let stats = store_stats(&server.url);
    assert!(count(&stats, "hits") >= survived, "{stats}");
    let distinct = distinct_responses(&prefs()) as u64;
    assert_eq!(count(&stats, "hits") + count(&stats, "misses"), distinct, "{stats}");

    // The same numbers as a local model, and as the store answers from now on, bit for bit.
    let local = dir.path().join("local.jsonl");
    let out = Command::new(binary("ref-server"))
        .arg("score")
        .arg("--model")
        .arg(&model)
        .args(["--template", "raw", "--input"])
        .arg(prefs())
        .arg("--output")
        .arg(&local)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (got, want) = (read_jsonl(&restarted), read_jsonl(&local));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        for field in ["chosen_logprob", "rejected_logprob"] {
            let (a, b) = (g[field].as_f64().unwrap(), w[field].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{field}: {a} vs {b}");
        }
    }
    let again = dir.path().join("again.jsonl");
    score(&server.url, &prefs(), &again, 16);
    assert_eq!(read_jsonl(&again), got);
    assert_eq!(count(&store_stats(&server.url), "misses"), count(&stats, "misses"));
}

#[test]
fn a_store_of_another_model_is_refused_naming_both_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let (model, other) = (tiny(dir.path(), "tiny", 1), tiny(dir.path(), "other", 2));
    let store = dir.path().join("scores.redb");
    let flags = ["--score-store", store.to_str().unwrap()];
    let server = Server::start(&model, &flags, dir.path());
    score(&server.url, &prefs(), &dir.path().join("scored.jsonl"), 16);
    drop(server);

    let fingerprint =
        |m: &Path| load_model(m, Mode::Frozen, DType::F32, &Device::Cpu).unwrap().fingerprint;
    let (stored, served) = (fingerprint(&model), fingerprint(&other));
    let (_, stderr) = serve_refused(&other, &flags);
    assert!(stderr.contains(&store.display().to_string()), "{stderr}");
    assert!(stderr.contains(&stored) && stderr.contains(&served), "{stderr}");
    assert!(stderr.contains("--score-store-reset"), "{stderr}");

    // Rebuilt for the other model on request.
    let reset = [&flags[..], &["--score-store-reset"]].concat();
    let server = Server::start(&other, &reset, dir.path());
    let stats = store_stats(&server.url);
    assert_eq!(count(&stats, "entries"), 0, "{stats}");
}

#[test]
fn a_corrupt_or_busy_store_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "tiny", 1);
    let corrupt = dir.path().join("corrupt.redb");
    std::fs::write(&corrupt, "this is not a database\n".repeat(200)).unwrap();
    let (_, stderr) = serve_refused(&model, &["--score-store", corrupt.to_str().unwrap()]);
    assert!(stderr.contains(&corrupt.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a usable score store"), "{stderr}");
    assert!(stderr.contains("--score-store-reset"), "{stderr}");

    // A store is one server's: a second one on the same file is refused.
    let store = dir.path().join("scores.redb");
    let flags = ["--score-store", store.to_str().unwrap()];
    let _first = Server::start(&model, &flags, dir.path());
    let (_, stderr) = serve_refused(&model, &flags);
    assert!(stderr.contains(&store.display().to_string()), "{stderr}");
    assert!(stderr.contains("open in another process"), "{stderr}");
}
