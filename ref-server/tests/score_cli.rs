//! `ref-server score` on a small JSONL, both line forms, against a server and locally.

mod common;

use std::process::Command;

use common::*;
use dpo_common::logprob::Sequence;
use dpo_common::template::Template;
use serde_json::Value;

fn score(args: &[&str], input: &std::path::Path, output: &std::path::Path) -> Vec<Value> {
    let out = Command::new(BIN)
        .arg("score")
        .args(["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "score {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_jsonl_locally_and_remotely_alike() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"prompt":"Say hi","response":"hi!","id":1}"#,
            "\n",
            r#"{"prompt":"Name a colour","chosen":"blue","rejected":"","id":2}"#,
            "\n",
            "\n",
            r#"{"prompt":"x","response":""}"#,
            "\n",
        ),
    )
    .unwrap();
    let local_out = score(
        &["--model", model.to_str().unwrap(), "--batch-size", "2"],
        &input,
        &dir.path().join("a.jsonl"),
    );
    let server = Server::start(&model, &[], &[]);
    server.ready_client(&server.options()).await;
    let remote_out = score(&["--server", &server.url], &input, &dir.path().join("b.jsonl"));
    assert_eq!(local_out.len(), 3);
    assert_eq!(remote_out.len(), 3);
    for (a, b) in local_out.iter().zip(&remote_out) {
        for k in ["logprob", "chosen_logprob", "rejected_logprob"] {
            if let Some(x) = a.get(k) {
                let y = b[k].as_f64().unwrap();
                assert!((x.as_f64().unwrap() - y).abs() < 1e-4, "{k}: {x} vs {y}");
            }
        }
    }
    // Extra fields kept, order kept, the numbers those of common's scoring.
    assert_eq!(local_out[0]["id"], 1);
    assert_eq!(local_out[1]["id"], 2);
    let m = load_local(&model);
    let enc = |p: &str, r: &str| -> Sequence {
        m.tokenizer.encode_prompt_response(&Template::Alpaca.format_prompt(p), r).unwrap().into()
    };
    let seqs = [enc("Say hi", "hi!"), enc("Name a colour", "blue"), enc("Name a colour", "")];
    let want = local_scores(&m, &seqs);
    assert!((local_out[0]["logprob"].as_f64().unwrap() - want[0]).abs() < 1e-4);
    assert_eq!(local_out[0]["tokens"], seqs[0].response_len());
    assert!((local_out[1]["chosen_logprob"].as_f64().unwrap() - want[1]).abs() < 1e-4);
    assert!((local_out[1]["rejected_logprob"].as_f64().unwrap() - want[2]).abs() < 1e-4);
    assert_eq!(local_out[1]["rejected_tokens"], 1);
    assert_eq!(local_out[2]["tokens"], 1);

    // A malformed line: an error naming it, non-zero exit.
    std::fs::write(&input, "{\"prompt\":\"a\",\"response\":\"b\"}\n{oops\n").unwrap();
    let out = Command::new(BIN)
        .args(["score", "--server", &server.url, "--input", input.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}
