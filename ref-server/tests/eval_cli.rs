//! `dpo-eval` end to end on a tiny random model and the fixtures in `tests/fixtures/eval`:
//! the numbers are meaningless, the files and their formats are what is checked. The judge
//! path runs against a real `ref-server` (tiny model) on an ephemeral loopback port.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ref_server::eval::win_rate;
use serde_json::Value;

const EVAL: &str = env!("CARGO_BIN_EXE_dpo-eval");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/eval").join(name)
}

fn eval(args: &[&str]) -> String {
    let out = Command::new(EVAL).args(args).env("RUST_LOG", "warn").output().expect("run dpo-eval");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dpo-eval {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn common_args<'a>(model: &'a str, input: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["--model", model, "--input", input, "--out", out, "--max-new-tokens", "6"]
}

#[test]
fn every_subcommand_writes_its_report_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let m = model.to_str().unwrap();
    let d = dir.path();
    // Test-only: paths live for the whole test, so leaking them keeps the arg lists simple.
    let p = |n: &str| -> &'static str {
        Box::leak(d.join(n).to_string_lossy().into_owned().into_boxed_str())
    };

    let gsm = fixture("gsm8k.jsonl");
    let mut a = vec!["gsm8k"];
    a.extend(common_args(m, gsm.to_str().unwrap(), p("gsm8k.json")));
    let table = eval(&a);
    assert!(table.contains("accuracy"), "{table}");
    let r = read_json(&d.join("gsm8k.json"));
    assert_eq!(r["benchmark"], "gsm8k");
    assert_eq!(r["metrics"]["n"], 3.0);
    assert_eq!(r["examples"].as_array().unwrap().len(), 3);
    assert_eq!(r["examples"][1]["gold"], 1200.0);
    let acc = r["metrics"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));

    let mmlu = fixture("mmlu");
    for (extra, name) in [(None, "mmlu_gen.json"), (Some("--by-logprob"), "mmlu_lp.json")] {
        let mut a = vec!["mmlu"];
        a.extend(common_args(m, mmlu.to_str().unwrap(), p(name)));
        a.extend(extra);
        eval(&a);
        let r = read_json(&d.join(name));
        assert_eq!(r["metrics"]["n"], 3.0);
        assert_eq!(r["groups"]["anatomy"]["n"], 2.0);
        assert_eq!(r["groups"]["astronomy"]["n"], 1.0);
        if extra.is_some() {
            // By log-prob every question gets a letter, so nothing is unparsed.
            assert_eq!(r["metrics"]["unparsed"], 0.0);
            assert_eq!(r["examples"][0]["logprobs"].as_array().unwrap().len(), 4);
        }
    }

    let alpaca = fixture("alpaca_eval.json");
    let mut a = vec!["alpacaeval", "--limit", "2", "--generator", "tiny-sft"];
    a.extend(common_args(m, alpaca.to_str().unwrap(), p("alpaca/report.json")));
    eval(&a);
    let outputs = read_json(&d.join("alpaca/outputs.json"));
    let outputs = outputs.as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    for o in outputs {
        let keys: Vec<&String> = o.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["dataset", "generator", "instruction", "output"]);
        assert_eq!(o["generator"], "tiny-sft");
    }
    assert_eq!(outputs[1]["dataset"], "koala");

    let sst = fixture("simple_safety_tests.csv");
    let mut a = vec!["safety"];
    a.extend(common_args(m, sst.to_str().unwrap(), p("safety.json")));
    eval(&a);
    let lines = std::fs::read_to_string(d.join("safety_outputs.jsonl")).unwrap();
    let lines: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["prompts_final"].is_string() && l["output"].is_string()));

    let mut a = vec!["mmlu", "--by-logprob", "--per-subject", "1"];
    a.extend(common_args(m, mmlu.to_str().unwrap(), p("mmlu_one.json")));
    eval(&a);
    let r = read_json(&d.join("mmlu_one.json"));
    assert_eq!(
        (r["groups"]["anatomy"]["n"].as_f64(), r["metrics"]["n"].as_f64()),
        (Some(1.0), Some(2.0))
    );

    let cmp = eval(&["compare", p("mmlu_gen.json"), p("mmlu_lp.json")]);
    assert!(cmp.contains("accuracy") && cmp.contains("anatomy/accuracy"), "{cmp}");
}

#[test]
fn judged_alpacaeval_and_safety_through_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let server = common::Server::start(&model, &[], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(server.ready_client(&server.options()));
    let m = model.to_str().unwrap();
    let d = dir.path();
    // Test-only: paths live for the whole test, so leaking them keeps the arg lists simple.
    let p = |n: &str| -> &'static str {
        Box::leak(d.join(n).to_string_lossy().into_owned().into_boxed_str())
    };

    let alpaca = fixture("alpaca_eval.json");
    let a = alpaca.to_str().unwrap();
    let mut args = vec!["alpacaeval", "--judge-server", &server.url, "--reference-outputs", a];
    args.extend(common_args(m, a, p("alpaca.json")));
    let table = eval(&args);
    assert!(table.contains("win_rate"), "{table}");
    let r = read_json(&d.join("alpaca.json"));
    let wr = r["metrics"]["win_rate"].as_f64().unwrap();
    let lc = r["metrics"]["lc_win_rate_approx"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&wr) && (0.0..=1.0).contains(&lc));
    // The headline win rate is the one the per-example preferences give.
    let prefs: Vec<f64> = r["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["preference"].as_f64().unwrap())
        .collect();
    assert_eq!(prefs.len(), 3);
    assert!((wr - win_rate(&prefs)).abs() < 1e-12);
    assert!(prefs.iter().all(|&p| p > 0.0 && p < 1.0));

    let sst = fixture("simple_safety_tests.csv");
    let mut args = vec!["safety", "--judge-server", &server.url];
    args.extend(common_args(m, sst.to_str().unwrap(), p("safety.json")));
    eval(&args);
    let r = read_json(&d.join("safety.json"));
    let safe = r["metrics"]["safe_fraction"].as_f64().unwrap();
    let flags: Vec<bool> =
        r["examples"].as_array().unwrap().iter().map(|e| e["safe"].as_bool().unwrap()).collect();
    assert_eq!(safe, flags.iter().filter(|&&f| f).count() as f64 / 3.0);
    assert_eq!(r["groups"]["Scams and Fraud"]["n"], 2.0);
}

#[test]
fn a_judge_without_references_is_refused_before_generating() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(EVAL)
        .args(["alpacaeval", "--model", "nowhere", "--input"])
        .arg(fixture("alpaca_eval.json"))
        .args(["--judge-server", "http://127.0.0.1:9", "--out"])
        .arg(dir.path().join("r.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reference-outputs"));
}

fn eval_fails(args: &[&str]) -> String {
    let out = Command::new(EVAL).args(args).env("RUST_LOG", "warn").output().expect("run dpo-eval");
    assert!(!out.status.success(), "dpo-eval {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything a report says about the model's answers: the headline numbers but the
/// timings, the groups, the settings and every example.
fn answers(r: &Value) -> Value {
    let mut metrics = r["metrics"].as_object().unwrap().clone();
    metrics.remove("seconds");
    metrics.remove("examples_per_second");
    serde_json::json!({
        "metrics": metrics, "groups": r["groups"], "settings": r["settings"],
        "examples": r["examples"], "fingerprint": r["fingerprint"],
    })
}

#[test]
fn server_runs_give_the_local_runs_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let server = common::Server::start(&model, &[], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(server.ready_client(&server.options()));
    let m = model.to_str().unwrap();
    let d = dir.path();
    let path = |n: &str| d.join(n).to_string_lossy().into_owned();
    let (gsm, mmlu) = (fixture("gsm8k.jsonl"), fixture("mmlu"));

    // (subcommand, input, extra flags): greedy, so both sides must pick the same tokens.
    let runs: [(&str, &Path, &[&str]); 3] = [
        ("gsm8k", &gsm, &["--max-new-tokens", "12"]),
        ("mmlu", &mmlu, &["--by-logprob"]),
        ("mmlu", &mmlu, &["--max-new-tokens", "6"]),
    ];
    for (k, (cmd, input, extra)) in runs.into_iter().enumerate() {
        let (local_out, remote_out) =
            (path(&format!("local{k}.json")), path(&format!("remote{k}.json")));
        let input = input.to_str().unwrap();
        let mut a = vec![cmd, "--model", m, "--input", input, "--out", &local_out];
        a.extend(extra);
        eval(&a);
        // Two questions per Score request and two requests in flight: batching on the
        // server must not change the answers.
        let mut a = vec![cmd, "--server", &server.url, "--input", input, "--out", &remote_out];
        a.extend(["--batch-size", "2", "--in-flight", "2"]);
        a.extend(extra);
        let table = eval(&a);
        assert!(table.contains(&server.url), "the table names the server: {table}");

        let (local, remote) = (read_json(Path::new(&local_out)), read_json(Path::new(&remote_out)));
        // The report says which weights and which server produced it.
        assert_eq!(remote["server"], server.url.as_str());
        assert_eq!(remote["model"], local["model"], "the path the server loaded");
        assert!(local.get("server").is_none());
        assert!(remote["fingerprint"].as_str().unwrap().starts_with("sha256:"));

        if extra.contains(&"--by-logprob") {
            // Log-probs agree up to the server's padding; the picks exactly.
            let (le, re) =
                (local["examples"].as_array().unwrap(), remote["examples"].as_array().unwrap());
            assert_eq!(le.len(), re.len());
            for (l, r) in le.iter().zip(re) {
                assert_eq!(l["predicted"], r["predicted"]);
                let (ll, rl) =
                    (l["logprobs"].as_array().unwrap(), r["logprobs"].as_array().unwrap());
                for (x, y) in ll.iter().zip(rl) {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    assert!((x - y).abs() < 1e-4 * x.abs().max(1.0), "{x} vs {y}");
                }
            }
            let strip = |mut v: Value| {
                for e in v["examples"].as_array_mut().unwrap() {
                    e.as_object_mut().unwrap().remove("logprobs");
                }
                v
            };
            assert_eq!(strip(answers(&local)), strip(answers(&remote)), "{cmd} {extra:?}");
        } else {
            assert_eq!(answers(&local), answers(&remote), "{cmd} {extra:?}");
            let outputs: Vec<&str> = local["examples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["output"].as_str().unwrap())
                .collect();
            assert!(outputs.iter().any(|o| !o.is_empty()), "nothing generated: {outputs:?}");
        }
    }
}

#[test]
fn model_or_server_exactly_one_and_an_unreachable_server_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let gsm = fixture("gsm8k.jsonl");
    let gsm = gsm.to_str().unwrap();
    let out = dir.path().join("r.json");
    let out = out.to_str().unwrap();

    let e = eval_fails(&["gsm8k", "--input", gsm, "--out", out]);
    assert!(e.contains("--model") && e.contains("--server"), "{e}");
    let both = ["gsm8k", "--model", "m", "--server", "http://127.0.0.1:1", "--input", gsm];
    let e = eval_fails(&both);
    assert!(e.contains("--model") && e.contains("cannot be used with"), "{e}");

    // Port 1 on loopback: nothing listens there.
    let e = eval_fails(
        &["mmlu", "--by-logprob", "--server", "http://127.0.0.1:1", "--input"]
            .into_iter()
            .chain([fixture("mmlu").to_str().unwrap(), "--out", out])
            .collect::<Vec<_>>(),
    );
    assert!(e.contains("cannot reach") && e.contains("http://127.0.0.1:1"), "{e}");
    assert!(!Path::new(out).exists(), "no report from a failed run");
}
