//! The `policy-trainer` binary on bad input: each mistake a user can make before training
//! starts is a clear error that names the problem, and writes nothing into `--out`.
//! (Training itself is tested end to end, with a real server, in `tests/`.)

use std::path::Path;
use std::process::{Command, Output};

fn train(args: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_policy-trainer"))
        .arg("train")
        .args(args)
        .arg("--out")
        .arg(out)
        .args(["--ref-timeout", "1", "--no-progress"])
        .output()
        .expect("run policy-trainer")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_missing_data_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let o = train(&["--model", "m", "--data", "/nonexistent/prefs.jsonl"], &dir.path().join("run"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/prefs.jsonl"), "{}", stderr(&o));
    assert!(!dir.path().join("run").exists(), "nothing may be written for a failed start");
}

#[test]
fn a_file_of_malformed_lines_is_refused_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "not json\n{\"prompt\": \"p\"}\n").unwrap();
    let o = train(&["--model", "m", "--data", data.to_str().unwrap()], &dir.path().join("run"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("line 1") && e.contains("line 2"), "{e}");
}

#[test]
fn a_missing_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ok.jsonl");
    std::fs::write(&data, "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n").unwrap();
    let o = train(
        &["--model", "/nonexistent/model-dir", "--data", data.to_str().unwrap()],
        &dir.path().join("run"),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/model-dir"), "{}", stderr(&o));
}

#[test]
fn contradictory_flags_are_refused_before_anything_loads() {
    let dir = tempfile::tempdir().unwrap();
    let o = train(
        &["--model", "m", "--data", "x.jsonl", "--batch-size", "6", "--micro-batch", "4"],
        &dir.path().join("run"),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--micro-batch"), "{}", stderr(&o));
}

#[test]
fn an_unknown_report_to_names_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let o = train(
        &["--model", "m", "--data", "x.jsonl", "--report-to", "wandb"],
        &dir.path().join("run"),
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("wandb") && e.contains("none") && e.contains("tensorboard"), "{e}");
}

/// The loss flags' mistakes, each named before the data, the model or a server is touched
/// (the data file and model given here do not exist, and no server listens).
#[test]
fn loss_mistakes_are_refused_before_anything_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let base = ["--model", "/nonexistent/model", "--data", "/nonexistent/prefs.jsonl"];
    let refused = |extra: &[&str]| {
        let o = train(&[&base[..], extra].concat(), &out);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(!out.exists(), "{extra:?}: nothing may be written for a failed start");
        let e = stderr(&o);
        assert!(!e.contains("/nonexistent/"), "{extra:?}: checked too late:\n{e}");
        e
    };
    // An unknown loss: named, with the valid ones listed.
    let e = refused(&["--loss", "dpo"]);
    assert!(
        e.contains("--loss") && e.contains("`dpo`") && e.contains("sigmoid, robust, ipo"),
        "{e}"
    );
    let e = refused(&["--loss", "sigmoid:1,sfft:0.5"]);
    assert!(e.contains("`sfft`"), "{e}");
    // A parameter the chosen loss does not take.
    let e = refused(&["--loss", "ipo", "--label-smoothing", "0.1"]);
    assert!(e.contains("--label-smoothing") && e.contains("ipo"), "{e}");
    let e = refused(&["--gamma-beta-ratio", "0.5"]);
    assert!(e.contains("--gamma-beta-ratio") && e.contains("simpo"), "{e}");
    let e = refused(&["--loss", "sigmoid", "--discopop-tau", "0.05"]);
    assert!(e.contains("--discopop-tau"), "{e}");
    // A loss that needs a reference, without one.
    let e = refused(&["--loss", "ipo", "--ref-server", "none"]);
    assert!(e.contains("--loss ipo needs a reference") && e.contains("--ref-server"), "{e}");
    let e = refused(&[
        "--loss",
        "simpo",
        "--sft-weight",
        "0.5",
        "--loss",
        "sigmoid",
        "--ref-server",
        "none",
    ]);
    assert!(e.contains("needs a reference"), "{e}");
}
