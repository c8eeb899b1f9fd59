//! Load benchmark (not a test): N concurrent clients score single-turn HH pairs against a
//! running `ref-server`, and the same requests are scored in-process through the same
//! [`Engine`] without gRPC, so the transport's overhead is one ratio measured in one run.
//! A batch-1 direct `response_logprobs` pass gives the number comparable with
//! `../shared/bench/torch_baseline.py` (batch 1, forward only). Every tokens/s counts
//! prompt + response per sequence (torch_baseline.py's count), although the server scores a
//! pair as one row with the prompt once: the same work, so the rates compare.
//!
//!   cargo run --release -p ref-server --example server_load -- \
//!       --server http://127.0.0.1:PORT --model MODEL.gguf --hh FILE.jsonl.gz \
//!       --pairs 64 --clients 4 --pairs-per-request 4
//!
//! `tests/bench/server_load.sh` starts the server and runs this.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use dpo_common::logprob::{response_logprobs, Sequence};
use dpo_common::template::Template;
use dpo_proto::client::{ClientOptions, ReplicaClient, TokenPair};
use dpo_proto::v1;
use ref_server::config::{LimitArgs, StoreArgs};
use ref_server::engine::Engine;

#[derive(Parser)]
struct Args {
    /// The running server.
    #[arg(long)]
    server: String,
    /// The same model the server holds (for the in-process comparison).
    #[arg(long)]
    model: PathBuf,
    /// An HH file ({"chosen","rejected"} JSONL, .gz ok).
    #[arg(long)]
    hh: PathBuf,
    /// Pairs to score (single-turn pairs, at most 512 tokens per sequence).
    #[arg(long, default_value_t = 64)]
    pairs: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Pairs per Score request.
    #[arg(long, default_value_t = 4)]
    pairs_per_request: usize,
    /// Repeat the in-process / gRPC measurement this many times (alternating), best of.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

fn token_request(pairs: &[TokenPair]) -> v1::ScoreRequest {
    let items = pairs
        .iter()
        .map(|p| v1::ScoreItem {
            input: Some(v1::score_item::Input::Tokens(v1::TokenInput {
                prompt_ids: p.prompt_ids.clone(),
                responses: vec![
                    v1::TokenIds { ids: p.chosen_ids.clone() },
                    v1::TokenIds { ids: p.rejected_ids.clone() },
                ],
            })),
        })
        .collect();
    v1::ScoreRequest { items, per_token: false, request_id: 0 }
}

struct Run {
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Run {
    fn pct(&self, p: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort();
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        l[i].as_secs_f64() * 1e3
    }
}

/// Runs `clients` workers over the requests (a shared queue), timing each request.
async fn drive<F, Fut>(requests: &[Vec<TokenPair>], clients: usize, call: F) -> Result<Run>
where
    F: Fn(Vec<TokenPair>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let queue =
        Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(requests.to_vec())));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (queue, call) = (queue.clone(), call.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let next = queue.lock().expect("queue").pop_front();
                let Some(r) = next else { break };
                let t = Instant::now();
                call(r).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Run { seconds: started.elapsed().as_secs_f64(), latencies })
}

fn main() -> Result<()> {
    // As the server does, before the runtime's threads exist.
    dpo_common::model::ops::fix_thread_count();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async_main())
}

async fn async_main() -> Result<()> {
    let args = Args::parse();
    let (model, hh) = (args.model.clone(), args.hh.clone());
    let engine = tokio::task::spawn_blocking(move || {
        Engine::load(&model, None, "cpu", "f32", &LimitArgs::default_for_cli(), &StoreArgs::none())
    })
    .await??;
    let engine = Arc::new(engine);
    let (pairs, _) = dpo_common::data::read_hh_file(&hh, "harmless-base")
        .with_context(|| format!("reading {}", hh.display()))?;
    let tok = engine.tokenizer();
    let mut token_pairs = Vec::new();
    for p in &pairs {
        let prompt_ids = tok.encode_prompt(&Template::Alpaca.format_prompt(&p.prompt))?;
        let chosen_ids = tok.encode_response(&p.chosen)?;
        let rejected_ids = tok.encode_response(&p.rejected)?;
        if prompt_ids.len() + chosen_ids.len().max(rejected_ids.len()) <= 512 {
            token_pairs.push(TokenPair { prompt_ids, chosen_ids, rejected_ids });
        }
        if token_pairs.len() == args.pairs {
            break;
        }
    }
    let tokens: usize = token_pairs
        .iter()
        .map(|p| 2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len())
        .sum();
    // What the server computes: one row per pair, the prompt once.
    let row_tokens: usize = token_pairs
        .iter()
        .map(|p| p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len())
        .sum();
    let requests: Vec<Vec<TokenPair>> =
        token_pairs.chunks(args.pairs_per_request.max(1)).map(|c| c.to_vec()).collect();
    eprintln!(
        "{} pairs ({tokens} tokens, prompt + response per sequence; {row_tokens} as shared-prompt \
         rows), {} requests of {} pairs, {} clients",
        token_pairs.len(),
        requests.len(),
        args.pairs_per_request,
        args.clients
    );

    let client = ReplicaClient::connect(&ClientOptions {
        url: args.server.clone(),
        token: dpo_proto::token::load_token(None)?,
        ..ClientOptions::default()
    })
    .await?;
    let info = client.model_info().await?;
    anyhow::ensure!(
        info.fingerprint == engine.model_info().fingerprint,
        "the server holds a different model ({}) than --model ({})",
        info.fingerprint,
        engine.model_info().fingerprint
    );

    // Warm-up (first-touch allocations, thread pools) on both paths.
    let warm = requests[0].clone();
    client.score_pairs(&warm).await?;
    engine.score(token_request(&warm)).await?;

    // Batch 1, one sequence at a time, no batcher: torch_baseline.py's measurement.
    let seqs: Vec<Sequence> = token_pairs
        .iter()
        .flat_map(|p| {
            [&p.chosen_ids, &p.rejected_ids].map(|r| Sequence {
                ids: [p.prompt_ids.as_slice(), r].concat(),
                response_start: p.prompt_ids.len(),
            })
        })
        .collect();
    let direct = Arc::new(dpo_common::model::load::load_model(
        &args.model,
        dpo_common::model::Mode::Frozen,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?);
    let mut bs1_seconds = f64::INFINITY;

    // The machine may be shared: the paths alternate within each round, best round kept.
    let mut best_local: Option<Run> = None;
    let mut best_grpc: Option<Run> = None;
    for _ in 0..args.rounds.max(1) {
        let e = engine.clone();
        let local = drive(&requests, args.clients, move |r| {
            let e = e.clone();
            async move {
                e.score(token_request(&r)).await?;
                Ok(())
            }
        })
        .await?;
        let c = client.clone();
        let grpc = drive(&requests, args.clients, move |r| {
            let c = c.clone();
            async move {
                c.score_pairs(&r).await?;
                Ok(())
            }
        })
        .await?;
        let (m, sq) = (direct.clone(), seqs.clone());
        let bs1 = tokio::task::spawn_blocking(move || -> Result<f64> {
            let t = Instant::now();
            for s in &sq {
                response_logprobs(&m.model, std::slice::from_ref(s))?.sums_vec()?;
            }
            Ok(t.elapsed().as_secs_f64())
        })
        .await??;
        bs1_seconds = bs1_seconds.min(bs1);
        eprintln!(
            "round: in-process {:.2}s, gRPC {:.2}s, batch-1 direct {bs1:.2}s",
            local.seconds, grpc.seconds
        );
        if best_local.as_ref().is_none_or(|b| local.seconds < b.seconds) {
            best_local = Some(local);
        }
        if best_grpc.as_ref().is_none_or(|b| grpc.seconds < b.seconds) {
            best_grpc = Some(grpc);
        }
    }
    let (local, grpc) = (best_local.expect("a round"), best_grpc.expect("a round"));

    let tps = |s: f64| tokens as f64 / s;
    println!("| path | seconds | tokens/s | p50 ms/request | p99 ms/request |");
    println!("|---|---|---|---|---|");
    for (name, r) in [("in-process Engine (batcher, no gRPC)", &local), ("gRPC Score", &grpc)] {
        println!(
            "| {name} | {:.3} | {:.1} | {:.1} | {:.1} |",
            r.seconds,
            tps(r.seconds),
            r.pct(0.5),
            r.pct(0.99)
        );
    }
    println!(
        "| direct response_logprobs, batch 1 | {bs1_seconds:.3} | {:.1} | | |",
        tps(bs1_seconds)
    );
    println!();
    println!(
        "gRPC overhead: {:+.2}% (gRPC seconds / in-process seconds - 1)",
        (grpc.seconds / local.seconds - 1.0) * 100.0
    );
    Ok(())
}
