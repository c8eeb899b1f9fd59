//! `dpo-eval` end to end on a tiny random model and the fixtures in `tests/fixtures/eval`:
//! the numbers are meaningless, the files and their formats are what is checked. The judge
//! path runs against a real `ref-server` (tiny model) on an ephemeral loopback port.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

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
    // Win rate is the share of preferences above ½ (ties ½), recomputed from the examples.
    let prefs: Vec<f64> = r["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["preference"].as_f64().unwrap())
        .collect();
    assert_eq!(prefs.len(), 3);
    let expect = prefs
        .iter()
        .map(|&p| {
            if p > 0.5 {
                1.0
            } else if p == 0.5 {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / 3.0;
    assert!((wr - expect).abs() < 1e-12);
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
