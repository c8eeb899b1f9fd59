//! The real binary against a tiny random model: scores, pairs, concurrency, limits, auth,
//! health, ModelInfo and graceful shutdown.

mod common;

use common::*;
use dpo_common::logprob::Sequence;
use dpo_common::template::Template;
use dpo_proto::client::{ClientOptions, TokenPair};
use dpo_proto::v1;
use std::time::Duration;
use tonic::Code;

fn token_item(prompt: &[u32], responses: &[&[u32]]) -> v1::ScoreItem {
    v1::ScoreItem {
        input: Some(v1::score_item::Input::Tokens(v1::TokenInput {
            prompt_ids: prompt.to_vec(),
            responses: responses.iter().map(|r| v1::TokenIds { ids: r.to_vec() }).collect(),
        })),
    }
}

fn req(items: Vec<v1::ScoreItem>) -> v1::ScoreRequest {
    v1::ScoreRequest { items, per_token: false, request_id: 0 }
}

/// Deterministic varied sequences: prompt and response lengths differ per index.
fn seq(i: usize) -> Sequence {
    let p = 2 + i % 7;
    let r = 1 + (i * 5) % 11;
    let ids = (0..p + r).map(|k| ((i * 31 + k * 17) % 258) as u32).collect();
    Sequence { ids, response_start: p }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * (1.0 + b.abs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scores_match_in_process_and_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let local = load_local(&model);
    let server = Server::start(
        &model,
        &[
            "--max-tokens-per-item",
            "200",
            "--max-tokens-per-request",
            "450",
            "--max-items-per-request",
            "5",
            "--max-message-bytes",
            "8192",
            "--batch-token-budget",
            "400",
        ],
        &[],
    );
    let client = server.ready_client(&server.options()).await;

    // ModelInfo.
    let info = client.model_info().await.unwrap();
    assert_eq!(info.fingerprint, local.fingerprint);
    assert_eq!(info.vocab_size, 258);
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.max_sequence_length, 512);
    assert_eq!(info.eos_token_id, 257);
    assert_eq!(info.bos_token_id, Some(256));
    assert_eq!(info.device, "cpu");
    assert_eq!(info.dtype, "float32");
    assert_eq!(info.max_tokens_per_item, 200);
    assert_eq!(info.max_tokens_per_request, 450);
    assert_eq!(info.max_items_per_request, 5);
    assert_eq!(info.max_message_bytes, 8192);
    assert_eq!(info.batch_token_budget, 400);
    assert!(info.num_parameters > 0);

    // Token items equal in-process response_logprobs, per-token values too.
    let seqs: Vec<Sequence> = (0..5).map(seq).collect();
    let expected = local_scores(&local, &seqs);
    let items = seqs
        .iter()
        .map(|s| token_item(&s.ids[..s.response_start], &[&s.ids[s.response_start..]]))
        .collect();
    let resp =
        client.score(v1::ScoreRequest { items, per_token: true, request_id: 42 }).await.unwrap();
    assert_eq!(resp.request_id, 42);
    for (i, (item, want)) in resp.items.iter().zip(&expected).enumerate() {
        let r = &item.responses[0];
        assert!(close(r.logprob, *want), "item {i}: {} vs {want}", r.logprob);
        assert_eq!(r.tokens as usize, seqs[i].response_len());
        assert_eq!(r.token_logprobs.len(), seqs[i].response_len());
        let sum: f64 = r.token_logprobs.iter().map(|&x| x as f64).sum();
        assert!(close(sum, r.logprob));
    }

    // Pair form == two single items.
    let pair = TokenPair {
        prompt_ids: vec![5, 6, 7],
        chosen_ids: vec![8, 9, 257],
        rejected_ids: vec![10, 257],
    };
    let ps = client.score_pairs(std::slice::from_ref(&pair)).await.unwrap();
    let singles = client
        .score(req(vec![
            token_item(&pair.prompt_ids, &[&pair.chosen_ids]),
            token_item(&pair.prompt_ids, &[&pair.rejected_ids]),
        ]))
        .await
        .unwrap();
    assert!(close(ps[0].chosen, singles.items[0].responses[0].logprob));
    assert!(close(ps[0].rejected, singles.items[1].responses[0].logprob));
    assert_eq!((ps[0].chosen_tokens, ps[0].rejected_tokens), (3, 2));

    // Text items: tokenized as the trainer does (Alpaca by default), empty response = EOS.
    let text = v1::ScoreItem {
        input: Some(v1::score_item::Input::Text(v1::TextInput {
            prompt: "Say hi".into(),
            responses: vec!["hi!".into(), String::new()],
            template: v1::Template::Unspecified as i32,
        })),
    };
    let resp = client.score(req(vec![text])).await.unwrap();
    let prompt = Template::Alpaca.format_prompt("Say hi");
    let encoded: Vec<Sequence> = ["hi!", ""]
        .iter()
        .map(|r| local.tokenizer.encode_prompt_response(&prompt, r).unwrap().into())
        .collect();
    let want = local_scores(&local, &encoded);
    for (j, r) in resp.items[0].responses.iter().enumerate() {
        assert!(close(r.logprob, want[j]), "text response {j}");
        assert_eq!(r.tokens as usize, encoded[j].response_len());
    }
    assert_eq!(resp.items[0].responses[1].tokens, 1, "an empty response scores EOS alone");

    // Every limit: INVALID_ARGUMENT naming the item and the limit; the server keeps serving.
    let ten: &[u32] = &[2; 10];
    let cases: Vec<(v1::ScoreRequest, &str)> = vec![
        (req(vec![]), "no items"),
        (req(vec![token_item(&[1], &[&[2]]); 6]), "max_items_per_request"),
        (
            req(vec![token_item(&[1], &[&[2]]), token_item(&[1], &[&[2, 300]])]),
            "item 1 response 0: token id 300",
        ),
        (req(vec![token_item(&[1], &[&[]])]), "item 0 response 0: no tokens"),
        (req(vec![token_item(&[1], &[])]), "item 0: no responses"),
        (req(vec![token_item(&[], &[&[1]])]), "item 0: the prompt has no tokens"),
        (req(vec![token_item(&[1; 190], &[&[2; 11]])]), "max_tokens_per_item"),
        (
            req(vec![token_item(&[1; 100], &[ten; 5])]),
            "(max_tokens_per_request) at item 0 response 4",
        ),
        (req(vec![v1::ScoreItem { input: None }]), "item 0: no input"),
    ];
    for (r, needle) in cases {
        let err = client.score(r).await.expect_err(needle);
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{needle}: {err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
        assert!(err.to_string().contains("INVALID_ARGUMENT"), "{err}");
        assert!(!err.is_retryable());
    }
    // Oversized message: refused by the transport's decoding limit (before it is read
    // into memory), reported like the other limits.
    let big = v1::ScoreItem {
        input: Some(v1::score_item::Input::Text(v1::TextInput {
            prompt: "a".repeat(10_000),
            responses: vec!["b".into()],
            template: 0,
        })),
    };
    let err = client.score(req(vec![big.clone()])).await.expect_err("too big");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("limit of 8192 bytes (max_message_bytes"), "{err}");
    assert!(err.to_string().contains("--max-message-bytes"), "{err}");
    assert!(!err.is_retryable());
    // Still serving, with the same numbers.
    let again = client
        .score(req(vec![token_item(
            &seqs[0].ids[..seqs[0].response_start],
            &[&seqs[0].ids[seqs[0].response_start..]],
        )]))
        .await
        .unwrap();
    assert!(close(again.items[0].responses[0].logprob, expected[0]));
    assert!(client.health().await.unwrap());

    // ScoreStream: answers carry their request_id; a bad request gets `error`, the stream
    // stays open.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut raw = v1::reference_client::ReferenceClient::connect(server.url.clone()).await.unwrap();
    let mut out = raw
        .score_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for id in 0..4u64 {
        let s = seq(id as usize);
        let mut r =
            req(vec![token_item(&s.ids[..s.response_start], &[&s.ids[s.response_start..]])]);
        if id == 2 {
            r = req(vec![]);
        }
        r.request_id = id;
        tx.send(r).await.unwrap();
    }
    drop(tx);
    let mut seen = std::collections::BTreeSet::new();
    while let Some(msg) = out.message().await.unwrap() {
        let id = msg.request_id;
        seen.insert(id);
        if id == 2 {
            let e = msg.error.expect("error for the empty request");
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert!(e.message.contains("no items"));
        } else {
            assert!(msg.error.is_none());
            assert!(close(msg.items[0].responses[0].logprob, expected[id as usize]));
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);

    // An oversized message on a stream ends it with the same INVALID_ARGUMENT.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut out = raw
        .score_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(req(vec![big])).await.unwrap();
    let status = out.message().await.expect_err("oversized stream message");
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("limit of 8192 bytes (max_message_bytes"), "{status}");
    assert!(client.health().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_get_their_own_results() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let local = load_local(&model);
    let server = Server::start(&model, &["--batch-token-budget", "256"], &[]);
    let client = server.ready_client(&server.options()).await;
    let all: Vec<Sequence> = (0..64).map(seq).collect();
    let expected = local_scores(&local, &all);
    let mut tasks = Vec::new();
    for c in 0..8 {
        let client = client.clone();
        let mine: Vec<(usize, Sequence)> =
            (0..64).filter(|i| i % 8 == c).map(|i| (i, all[i].clone())).collect();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            // Several small requests per client, so they interleave in the batcher.
            for chunk in mine.chunks(3) {
                let items = chunk
                    .iter()
                    .map(|(_, s)| {
                        token_item(&s.ids[..s.response_start], &[&s.ids[s.response_start..]])
                    })
                    .collect();
                let resp = client.score(req(items)).await.unwrap();
                for ((i, _), item) in chunk.iter().zip(resp.items) {
                    got.push((*i, item.responses[0].logprob));
                }
            }
            got
        }));
    }
    let mut n = 0;
    for t in tasks {
        for (i, lp) in t.await.unwrap() {
            assert!(close(lp, expected[i]), "sequence {i}: {lp} vs {}", expected[i]);
            n += 1;
        }
    }
    assert_eq!(n, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_health_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let mut server =
        Server::start(&model, &["--auth-token-file", token_file.to_str().unwrap()], &[]);
    // Health is open without a token.
    let anonymous = server.ready_client(&server.options()).await;
    let err = anonymous.model_info().await.expect_err("no token");
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(!err.is_retryable());
    let wrong = ClientOptions { token: Some("s3cret-tokeN".into()), ..server.options() };
    let wrong = server.ready_client(&wrong).await;
    let err = wrong
        .score_pairs(&[TokenPair {
            prompt_ids: vec![1],
            chosen_ids: vec![2],
            rejected_ids: vec![3],
        }])
        .await;
    assert_eq!(err.unwrap_err().code(), Some(Code::Unauthenticated));
    let right = ClientOptions { token: Some("s3cret-token".into()), ..server.options() };
    let right = server.ready_client(&right).await;
    assert!(right.model_info().await.is_ok());

    // The CLI's health and info commands.
    let health =
        std::process::Command::new(BIN).args(["health", "--server", &server.url]).output().unwrap();
    assert!(health.status.success());
    let info = std::process::Command::new(BIN)
        .args(["info", "--server", &server.url, "--auth-token-file", token_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["vocab_size"], 258);

    let status = server.terminate();
    assert!(status.success(), "SIGTERM exit: {status:?}");
    let down = std::process::Command::new(BIN)
        .args(["health", "--server", &server.url, "--connect-timeout", "2"])
        .output()
        .unwrap();
    assert!(!down.status.success());
}

/// A pair item is scored as one row (its prompt computed once); its two scores, per-token
/// values included, equal the same (prompt, response)s sent as single items, which are
/// scored as separate sequences, and the in-process scores of those sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pair_items_score_like_single_items() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let local = load_local(&model);
    let (server, mut logs) =
        Server::start_with_logs(&model, &[], &[("RUST_LOG", "warn,ref_server::batcher=debug")]);
    let client = server.ready_client(&server.options()).await;
    // Varied prompt and response lengths; each pair's sides differ in length and ids.
    let pairs: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = (0..6)
        .map(|i| {
            let s = seq(i);
            let rejected = (0..1 + (i * 3) % 9).map(|k| ((i * 7 + k * 23) % 258) as u32).collect();
            (s.ids[..s.response_start].to_vec(), s.ids[s.response_start..].to_vec(), rejected)
        })
        .collect();

    let pair_items =
        pairs.iter().map(|(p, c, r)| token_item(p, &[c.as_slice(), r.as_slice()])).collect();
    let paired = client
        .score(v1::ScoreRequest { items: pair_items, per_token: true, request_id: 1 })
        .await
        .unwrap();
    // The batcher's first pass held whole pairs: two responses per row.
    let pass = logs.wait_for("forward pass", Duration::from_secs(30)).await;
    let field = |key: &str| -> usize {
        let v = pass.split(&format!(" {key}=")).nth(1).unwrap_or_else(|| panic!("{key}: {pass}"));
        v.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    assert!(field("rows") >= 1 && field("responses") == 2 * field("rows"), "{pass}");

    let single_items = pairs
        .iter()
        .flat_map(|(p, c, r)| [token_item(p, &[c.as_slice()]), token_item(p, &[r.as_slice()])])
        .collect();
    let singles = client
        .score(v1::ScoreRequest { items: single_items, per_token: true, request_id: 2 })
        .await
        .unwrap();
    let seqs: Vec<Sequence> = pairs
        .iter()
        .flat_map(|(p, c, r)| {
            [c, r].map(|x| Sequence { ids: [p.as_slice(), x].concat(), response_start: p.len() })
        })
        .collect();
    let want = local_scores(&local, &seqs);

    assert_eq!(paired.items.len(), pairs.len());
    for (i, item) in paired.items.iter().enumerate() {
        assert_eq!(item.responses.len(), 2, "pair {i}");
        for (j, got) in item.responses.iter().enumerate() {
            let single = &singles.items[2 * i + j].responses[0];
            let what = format!("pair {i} response {j}");
            assert!(
                close(got.logprob, single.logprob),
                "{what}: {} vs {}",
                got.logprob,
                single.logprob
            );
            assert!(
                close(got.logprob, want[2 * i + j]),
                "{what}: {} vs {}",
                got.logprob,
                want[2 * i + j]
            );
            assert_eq!(got.tokens, single.tokens, "{what}");
            assert_eq!(got.tokens as usize, seqs[2 * i + j].response_len(), "{what}");
            assert_eq!(got.token_logprobs.len(), single.token_logprobs.len(), "{what}");
            for (a, b) in got.token_logprobs.iter().zip(&single.token_logprobs) {
                assert!(close(*a as f64, *b as f64), "{what}: token {a} vs {b}");
            }
        }
    }
}

/// `ref-server health --wait`: a client that starts waiting before the server exists
/// succeeds once the server is up and loaded; one whose server never starts gives up at
/// its deadline, naming the URL and the last error.
#[test]
fn health_waits_for_a_server_started_later_and_gives_up_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // A free port, closed again; the server is started on it after the client.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("http://{addr}");
    let waiting = std::process::Command::new(BIN)
        .args(["health", "--server", &url, "--wait", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let _server = Server::start_on(&model, &addr.to_string());
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    let t = std::time::Instant::now();
    let never = std::process::Command::new(BIN)
        .args(["health", "--server", "http://127.0.0.1:1", "--wait", "1"])
        .output()
        .unwrap();
    assert!(!never.status.success());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let stderr = String::from_utf8_lossy(&never.stderr);
    assert!(stderr.contains("http://127.0.0.1:1 was unreachable for 1s"), "{stderr}");
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
}
