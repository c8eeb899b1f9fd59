//! `ref-server score` on a small JSONL, both line forms, against a server and locally,
//! against a server that is still loading its model, and through a restart of the server.

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

/// `score --server` started right after the server's `listening on` line, while the model
/// still loads: the client waits for SERVING (up to its --connect-timeout) and succeeds.
#[test]
fn score_waits_for_a_server_that_is_still_loading() {
    let dir = tempfile::tempdir().unwrap();
    // A real model: loading it takes long enough for the client to find it loading.
    let model = dpo_common::testing::smollm2_gguf();
    let server = Server::start(&model, &[], &[]);
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\":\"Say hi\",\"response\":\"hi!\"}\n").unwrap();
    let out = score(
        &["--server", &server.url, "--connect-timeout", "120"],
        &input,
        &dir.path().join("out.jsonl"),
    );
    assert_eq!(out.len(), 1);
    assert!(out[0]["logprob"].as_f64().unwrap() < 0.0, "{:?}", out[0]);

    // Where nothing listens, the wait ends at --connect-timeout with an error naming the URL.
    let t = std::time::Instant::now();
    let failed = Command::new(BIN)
        .args(["score", "--server", "http://127.0.0.1:1", "--connect-timeout", "1"])
        .args(["--input", input.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("http://127.0.0.1:1") && stderr.contains("unreachable"), "{stderr}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
}

/// `score --server`'s requests survive the server killed (SIGKILL) and started again on the
/// same address: the next request finds the connection dead, is retried within the
/// client's `--connect-timeout`, and the output is that of an undisturbed run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_requests_survive_a_server_restart() {
    use dpo_proto::client::ClientOptions;
    use ref_server::score_cli::{self, ScoreOptions, Scorer};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\":\"Say hi\",\"response\":\"hi!\"}\n{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n",
    )
    .unwrap();
    let mut server = Server::start(&model, &[], &[]);
    let opts = ClientOptions { connect_timeout: Duration::from_secs(60), ..server.options() };
    server.ready_client(&opts).await;
    let client = dpo_proto::fleet::RefClient::connect_waiting(&opts).await.unwrap();
    let scorer = Scorer::remote(client).await.unwrap();
    let run = |name: &str| ScoreOptions {
        input: input.clone(),
        output: dir.path().join(name),
        template: Template::Alpaca,
        batch_size: 1,
    };
    assert_eq!(score_cli::run(&scorer, &run("before.jsonl")).await.unwrap(), 2);

    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let addr = server.addr.clone();
    let restarted = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(1500));
        Server::start_on(&model, &addr)
    });
    assert_eq!(score_cli::run(&scorer, &run("after.jsonl")).await.unwrap(), 2);
    let Scorer::Remote(client) = &scorer else { unreachable!() };
    assert!(client.retries() > 0, "the dead connection was never noticed");
    let _restarted = restarted.await.unwrap();
    let lines = |name: &str| -> Vec<Value> {
        std::fs::read_to_string(dir.path().join(name))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for (a, b) in lines("before.jsonl").iter().zip(&lines("after.jsonl")) {
        for k in ["logprob", "chosen_logprob", "rejected_logprob"] {
            if let Some(x) = a.get(k) {
                let (x, y) = (x.as_f64().unwrap(), b[k].as_f64().unwrap());
                assert!((x - y).abs() < 1e-4, "{k}: {x} vs {y}");
            }
        }
    }
}
