//! `serve --metrics-listen`: the real binary's Prometheus endpoint counts calls by method
//! and status code (refusals by the token check, the validator and a model still loading
//! included), times them, and reports the batcher, the model and the score store; a bad
//! address or a port in use stops the server at start-up with an error naming the flag.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dpo_proto::client::ClientOptions;
use dpo_proto::v1;
use dpo_proto::v1::reference_client::ReferenceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const TOKEN: &str = "metrics-test-token";

/// `GET path` on `addr` over HTTP/1.1: (status line, headers, body).
async fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to metrics");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

async fn scrape(addr: &str) -> String {
    let (status, headers, body) = http_get(addr, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(headers.contains("content-type: text/plain; version=0.0.4"), "{headers}");
    body
}

/// The value of the sample `name` whose labels include `labels`, from the text format.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rendered) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let have: HashMap<&str, &str> = rendered
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
        (n == name && labels.iter().all(|(k, v)| have.get(k) == Some(v)))
            .then(|| value.parse().expect("a number"))
    })
}

fn calls(text: &str, method: &str, code: &str) -> f64 {
    let labels = [("service", "dpo.v1.Reference"), ("method", method), ("code", code)];
    sample(text, "dpo_ref_grpc_requests_total", &labels).unwrap_or(0.0)
}

fn token_item(prompt: &[u32], responses: &[&[u32]]) -> v1::ScoreItem {
    v1::ScoreItem {
        input: Some(v1::score_item::Input::Tokens(v1::TokenInput {
            prompt_ids: prompt.to_vec(),
            responses: responses.iter().map(|r| v1::TokenIds { ids: r.to_vec() }).collect(),
        })),
    }
}

fn score_request(items: Vec<v1::ScoreItem>) -> v1::ScoreRequest {
    v1::ScoreRequest { items, per_token: false, request_id: 7 }
}

fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_by_method_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    // A real model: loading it takes long enough to find the server still loading.
    let model = dpo_common::testing::smollm2_gguf();
    let args =
        ["--metrics-listen", "127.0.0.1:0", "--auth-token-file", token_file.to_str().unwrap()];
    let (server, mut logs) = Server::start_with_logs(&model, &args, &[("RUST_LOG", "info")]);
    let line = logs.wait_for("serving Prometheus metrics on", Duration::from_secs(30)).await;
    let metrics_addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();

    // While the model loads: state 0, and a call is UNAVAILABLE. The model state is set
    // to serving before calls are answered, so a refused call after the scrape proves the
    // scrape saw the server loading.
    let early = scrape(&metrics_addr).await;
    let mut raw = ReferenceClient::connect(server.url.clone()).await.unwrap();
    let saw_loading = match raw.model_info(with_token(v1::ModelInfoRequest {})).await {
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status}");
            assert_eq!(sample(&early, "dpo_ref_model_state", &[]), Some(0.0), "{early}");
            true
        }
        Ok(_) => {
            eprintln!("note: the model loaded before the first call; loading not observed");
            false
        }
    };

    let opts = ClientOptions { token: Some(TOKEN.into()), ..server.options() };
    let client = server.ready_client(&opts).await;
    let info = client.model_info().await.unwrap();
    // Scored, refused by the validator (a token id past the vocabulary), refused by the
    // token check, and one ScoreStream message.
    let pair = token_item(&[1, 2, 3, 4], &[&[5, 6], &[7, 8, 9]]);
    client.score(score_request(vec![pair.clone()])).await.unwrap();
    let bad = client.score(score_request(vec![token_item(&[1], &[&[1_000_000]])])).await;
    assert_eq!(bad.unwrap_err().code(), Some(Code::InvalidArgument));
    let anonymous = raw.model_info(v1::ModelInfoRequest {}).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let stream = tokio_stream::iter(vec![score_request(vec![pair])]);
    let mut answers = raw.score_stream(with_token(stream)).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    assert!(answer.error.is_none(), "{answer:?}");
    assert!(answers.message().await.unwrap().is_none());

    let text = scrape(&metrics_addr).await;
    eprintln!("{text}");
    // Calls by method and code.
    assert_eq!(calls(&text, "Score", "OK"), 1.0);
    assert_eq!(calls(&text, "Score", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(calls(&text, "ModelInfo", "UNAUTHENTICATED"), 1.0);
    assert!(calls(&text, "ModelInfo", "OK") >= 1.0);
    assert_eq!(calls(&text, "ModelInfo", "UNAVAILABLE"), if saw_loading { 1.0 } else { 0.0 });
    assert_eq!(calls(&text, "ScoreStream", "OK"), 1.0);
    assert_eq!(calls(&text, "Generate", "OK"), 0.0, "known methods are there from the start");
    let health = [("service", "grpc.health.v1.Health"), ("method", "Check"), ("code", "OK")];
    assert!(sample(&text, "dpo_ref_grpc_requests_total", &health).unwrap_or(0.0) >= 1.0);
    let score_method = [("service", "dpo.v1.Reference"), ("method", "Score")];
    let latency = "dpo_ref_grpc_request_duration_seconds";
    assert_eq!(sample(&text, &format!("{latency}_count"), &score_method), Some(2.0));
    let inf = [score_method[0], score_method[1], ("le", "+Inf")];
    assert_eq!(sample(&text, &format!("{latency}_bucket"), &inf), Some(2.0));
    assert!(sample(&text, &format!("{latency}_sum"), &score_method).unwrap() > 0.0);
    let stream_ok = [("code", "OK")];
    assert_eq!(sample(&text, "dpo_ref_score_stream_messages_total", &stream_ok), Some(1.0));
    assert_eq!(
        sample(&text, "dpo_ref_score_stream_message_duration_seconds_count", &[]),
        Some(1.0)
    );

    // The batcher: everything answered, so nothing queued; the two scored pairs (one row
    // of 4 + 2 + 3 tokens each, plus the BOS token the server may prepend) went through
    // forward passes.
    assert_eq!(sample(&text, "dpo_ref_queue_sequences", &[]), Some(0.0));
    assert_eq!(sample(&text, "dpo_ref_queue_tokens", &[]), Some(0.0));
    let passes = sample(&text, "dpo_ref_forward_passes_total", &[]).unwrap();
    assert!((1.0..=2.0).contains(&passes), "{passes} forward passes");
    assert!(sample(&text, "dpo_ref_forward_tokens_total", &[]).unwrap() >= 18.0);
    assert_eq!(sample(&text, "dpo_ref_batch_sequences_sum", &[]), Some(4.0));
    assert_eq!(sample(&text, "dpo_ref_batch_fill_ratio_count", &[]), Some(passes));
    assert_eq!(sample(&text, "dpo_ref_forward_duration_seconds_count", &[]), Some(passes));

    // The model.
    assert_eq!(sample(&text, "dpo_ref_model_state", &[]), Some(1.0));
    assert!(sample(&text, "dpo_ref_model_load_seconds", &[]).unwrap() > 0.0);
    let model_labels = [
        ("fingerprint", info.fingerprint.as_str()),
        ("dtype", info.dtype.as_str()),
        ("device", "cpu"),
    ];
    assert_eq!(sample(&text, "dpo_ref_model_info", &model_labels), Some(1.0));
    // The score store's counters exist from the start.
    for name in ["hits", "misses", "single_flight_waits", "evictions"] {
        let name = format!("dpo_ref_store_{name}_total");
        assert!(sample(&text, &name, &[]).is_some(), "{name} missing");
    }
    // ...and read the server's: without a store, every scored response is a miss.
    let misses = sample(&text, "dpo_ref_store_misses_total", &[]).unwrap();
    assert!(misses >= 1.0, "the store counters are not wired: misses {misses}");

    // Nothing else is served there.
    let (status, _, body) = http_get(&metrics_addr, "/").await;
    assert!(status.contains(" 404 ") && body.contains("/metrics"), "{status} {body}");
}

/// Runs `ref-server serve ARGS` that is expected to fail at start-up: (exit code, stdout,
/// stderr). A server that starts anyway is killed and the test fails.
fn serve_failing(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env_remove("DPO_AUTH_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started although it should have refused to");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Exited: what it wrote is in the pipes.
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stdout, stderr)
}

#[test]
fn a_bad_metrics_address_stops_the_server_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let (code, stdout, stderr) =
        serve_failing(&["--model", model, "--listen", "127.0.0.1:0", "--metrics-listen", &taken]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("--metrics-listen {taken}")), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(!stdout.contains("listening on"), "refused before announcing: {stdout}");

    let (code, _, stderr) =
        serve_failing(&["--model", model, "--metrics-listen", "localhost:metrics"]);
    assert_eq!(code, Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("--metrics-listen"), "{stderr}");
}
