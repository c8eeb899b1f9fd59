//! Graceful shutdown of the real binary: requests in flight when SIGTERM arrives are
//! answered completely and correctly, new connections are refused as soon as the signal
//! is handled, and the process then exits 0.
//!
//! Two requests span the signal. A `ScoreStream` opened before it is the deterministic
//! one: the test waits until the server has stopped accepting connections (proof that the
//! signal was handled) and only then sends the stream's next batches, which must still be
//! scored. A large unary `Score` is the other: SIGTERM is sent once the server's log shows
//! its first forward pass, so it is in the batcher when the signal comes; it is sized to
//! take seconds, so it is normally still being scored when the shutdown begins (the test
//! says so on stderr when it was not: the check of its answer still holds, only weaker).

mod common;

use std::time::{Duration, Instant};

use common::*;
use dpo_common::logprob::Sequence;
use dpo_proto::v1;
use dpo_proto::v1::reference_client::ReferenceClient;
use tokio_stream::wrappers::ReceiverStream;

/// Every sequence of the large request has this many tokens, and the batch budget is the
/// same: one sequence per forward pass, and its passes recognisable in the log.
const LONG: usize = 200;
/// Sequences in the large request.
const LONG_COUNT: usize = 400;

fn token_item(s: &Sequence) -> v1::ScoreItem {
    v1::ScoreItem {
        input: Some(v1::score_item::Input::Tokens(v1::TokenInput {
            prompt_ids: s.ids[..s.response_start].to_vec(),
            responses: vec![v1::TokenIds { ids: s.ids[s.response_start..].to_vec() }],
        })),
    }
}

fn request(seqs: &[Sequence], request_id: u64) -> v1::ScoreRequest {
    v1::ScoreRequest { items: seqs.iter().map(token_item).collect(), per_token: false, request_id }
}

/// A `LONG`-token sequence; prompt/response split and ids vary with `i`.
fn long_seq(i: usize) -> Sequence {
    let ids = (0..LONG).map(|k| ((i * 37 + k * 13) % 258) as u32).collect();
    Sequence { ids, response_start: 20 + (i * 7) % 150 }
}

/// A short sequence (never `LONG` tokens, so never mistaken for the large request's).
fn short_seq(i: usize) -> Sequence {
    let ids = (0..8 + i % 5).map(|k| ((i * 11 + k * 29) % 258) as u32).collect();
    Sequence { ids, response_start: 3 }
}

fn assert_scores(resp: &v1::ScoreResponse, want: &[f64], what: &str) {
    assert_eq!(resp.items.len(), want.len(), "{what}: items answered");
    for (i, (item, w)) in resp.items.iter().zip(want).enumerate() {
        assert_eq!(item.responses.len(), 1, "{what} item {i}");
        let got = item.responses[0].logprob;
        assert!((got - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what} item {i}: {got} vs {w}");
    }
}

/// Polls (no fixed sleep) until a TCP connection to `addr` is refused.
async fn wait_until_refused(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "{addr} still accepts connections after SIGTERM");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let local = load_local(&model);
    let budget = LONG.to_string();
    let per_request = (LONG * LONG_COUNT).to_string();
    let (mut server, mut logs) = Server::start_with_logs(
        &model,
        &["--batch-token-budget", &budget, "--max-tokens-per-request", &per_request],
        // The batcher logs each forward pass at debug level; the shutdown is logged at info.
        &[("RUST_LOG", "warn,ref_server=info,ref_server::batcher=debug")],
    );
    server.ready_client(&server.options()).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ReferenceClient::new(channel).max_decoding_message_size(64 << 20);

    let shorts: Vec<Sequence> = (0..4).map(short_seq).collect();
    let short_want = local_scores(&local, &shorts);
    let longs: Vec<Sequence> = (0..LONG_COUNT).map(long_seq).collect();
    let long_want = local_scores(&local, &longs);

    // A ScoreStream, open and answering before the signal.
    let (stream_tx, stream_rx) = tokio::sync::mpsc::channel(8);
    let mut answers =
        client.score_stream(ReceiverStream::new(stream_rx)).await.unwrap().into_inner();
    stream_tx.send(request(&shorts[..1], 0)).await.unwrap();
    let first = answers.message().await.unwrap().expect("the stream's first answer");
    assert_eq!(first.request_id, 0);
    assert_scores(&first, &short_want[..1], "stream request 0");

    // The large unary request; SIGTERM once the batcher has started on it.
    let big = request(&longs, 99);
    let mut unary_client = client.clone();
    let unary = tokio::spawn(async move { unary_client.score(big).await });
    let marker = format!("padded_tokens={LONG} ");
    logs.wait_for(&marker, Duration::from_secs(120)).await;
    server.send_sigterm();

    // The listener is closed as soon as the signal is handled.
    wait_until_refused(&server.addr).await;
    let unary_was_in_flight = !unary.is_finished();

    // The stream opened before the signal still takes new batches and answers them all.
    for id in 1..4u64 {
        let i = id as usize;
        stream_tx
            .send(request(&shorts[i..i + 1], id))
            .await
            .expect("the stream opened before SIGTERM still takes requests");
    }
    drop(stream_tx);
    let mut seen = Vec::new();
    while let Some(msg) = answers.message().await.expect("the stream ends cleanly") {
        assert!(msg.error.is_none(), "request {}: {:?}", msg.request_id, msg.error);
        let i = msg.request_id as usize;
        assert_scores(&msg, &short_want[i..i + 1], &format!("stream request {i}"));
        seen.push(i);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3], "answers after the signal");

    // The large request's answer is whole and right.
    let resp = unary.await.unwrap().expect("the large request is answered").into_inner();
    assert_eq!(resp.request_id, 99);
    assert_scores(&resp, &long_want, "the large request");

    let status = server.wait_exit();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(tokio::net::TcpStream::connect(&server.addr).await.is_err(), "refused after exit");

    let lines = logs.rest().await;
    let shutdown_at = lines
        .iter()
        .position(|l| l.contains("shutting down"))
        .expect("the server logs the shutdown");
    let long_passes_after = lines[shutdown_at..].iter().filter(|l| l.contains(&marker)).count();
    if !unary_was_in_flight || long_passes_after == 0 {
        eprintln!(
            "note: the large request was done before the shutdown began (machine too fast for \
             {LONG_COUNT} sequences?); only the stream checked requests across the signal"
        );
    } else {
        eprintln!("the large request spanned the signal: {long_passes_after} passes after it");
    }
}
