//! The model under test, wherever it runs: loaded in this process (`--model`) or held by a
//! `ref-server` (`--server`) and reached through its `Generate` and `Score` RPCs. The
//! benchmarks in `super::benchmarks` see only [`Backend`]'s two operations, so each is written
//! once:
//!
//! - [`Backend::generate`]: a continuation per prompt;
//! - [`Backend::answer_logprobs`]: the log-prob of each of a few fixed answers after a
//!   prompt (MMLU `--by-logprob`).
//!
//! Prompts arrive already formatted (the eval template applied here, on the client), so the
//! server is always asked with `TEMPLATE_RAW`: it then tokenizes exactly what the local path
//! tokenizes (`encode_prompt` of the formatted text). An answer's log-prob is the sum, in
//! f64, of its per-token log-probs without the EOS that scoring appends — the same
//! arithmetic on both sides (and in the judge), so local and remote runs of one checkpoint
//! agree up to the padding the server's batcher may add.

use std::future::Future;

use anyhow::{bail, Context, Result};
use dpo_common::generate::{generate, GenerateParams};
use dpo_common::logprob::{shared_prompt_logprobs, SharedPrompt};
use dpo_common::model::LoadedModel;
use dpo_proto::client::{ClientOptions, ModelInfo};
use dpo_proto::fleet::RefClient;
use dpo_proto::v1;
use indicatif::ProgressBar;
use tokio::task::JoinSet;

/// One prompt's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Decoded output, cut before the first stop sequence.
    pub text: String,
    /// `eos`, `stop` or `length`.
    pub finish: String,
}

/// Which weights produced a report, and where they ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Local: the path as given. Remote: the path the server loaded (its `ModelInfo.source`).
    pub model: String,
    /// `dpo_common::fingerprint` of the weights (the server's `ModelInfo.fingerprint`).
    pub fingerprint: String,
    /// The server's URL, for a remote model.
    pub server: Option<String>,
}

pub enum Backend {
    Local(Box<Local>),
    Remote(Box<Remote>),
}

pub struct Local {
    pub loaded: LoadedModel,
    /// The path as the user gave it.
    pub model_arg: String,
}

pub struct Remote {
    client: RefClient,
    info: ModelInfo,
    /// Requests kept in flight at the server.
    in_flight: usize,
}

impl Remote {
    /// Connects, waiting up to the connect timeout for the server to be SERVING (it may
    /// still be loading its model), and reads what model it holds.
    pub async fn connect(opts: &ClientOptions, in_flight: usize) -> Result<Remote> {
        // Client errors name the URL themselves.
        let client = RefClient::connect_waiting(opts)
            .await
            .context("connecting to the server under test")?;
        // Also pins the model that a server coming back after a failure must still hold.
        let info =
            client.model_info().await.context("asking the server under test for its model")?;
        Ok(Remote { client, info, in_flight: in_flight.max(1) })
    }
}

impl Backend {
    pub fn identity(&self) -> Identity {
        match self {
            Backend::Local(l) => Identity {
                model: l.model_arg.clone(),
                fingerprint: l.loaded.fingerprint.clone(),
                server: None,
            },
            Backend::Remote(r) => Identity {
                model: r.info.source.clone(),
                fingerprint: r.info.fingerprint.clone(),
                server: Some(r.client.url().to_string()),
            },
        }
    }

    /// Generates for every (formatted) prompt; results in input order. Example `i` samples
    /// with seed `params.seed + i` on both sides (`common::generate`'s batch rule), so a
    /// sampled run does not depend on batching or on where it runs.
    pub async fn generate(
        &self,
        prompts: &[String],
        params: &GenerateParams,
        batch_size: usize,
        progress: &ProgressBar,
    ) -> Result<Vec<Completion>> {
        match self {
            Backend::Local(l) => generate_local(&l.loaded, prompts, params, batch_size, progress),
            Backend::Remote(r) => generate_remote(r, prompts, params, progress).await,
        }
    }

    /// For every (formatted) prompt, the log-prob of each answer after it (EOS excluded).
    /// Remote: `batch_size` prompts per `Score` request.
    pub async fn answer_logprobs(
        &self,
        prompts: &[String],
        answers: &[String],
        batch_size: usize,
        progress: &ProgressBar,
    ) -> Result<Vec<Vec<f64>>> {
        match self {
            Backend::Local(l) => answer_logprobs_local(&l.loaded, prompts, answers, progress),
            Backend::Remote(r) => {
                answer_logprobs_remote(r, prompts, answers, batch_size, progress).await
            }
        }
    }
}

/// Greedy: batches of similar length (left-padded; `common::generate` gives each row what
/// it would alone). Sampled: one call per example, so example `i` draws from `seed + i`
/// whatever batch it would have landed in.
fn generate_local(
    m: &LoadedModel,
    prompts: &[String],
    params: &GenerateParams,
    batch_size: usize,
    progress: &ProgressBar,
) -> Result<Vec<Completion>> {
    let tok = &m.tokenizer;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode_prompt(p))
        .collect::<Result<_, _>>()
        .context("tokenizing prompts")?;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut out: Vec<Option<Completion>> = vec![None; ids.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let gens = if params.temperature == 0.0 {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            generate(&m.model, tok, &batch, params)?
        } else {
            let mut g = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let p =
                    GenerateParams { seed: params.seed.wrapping_add(i as u64), ..params.clone() };
                g.extend(generate(&m.model, tok, std::slice::from_ref(&ids[i]), &p)?);
            }
            g
        };
        for (&i, g) in chunk.iter().zip(gens) {
            out[i] = Some(Completion { text: g.text, finish: g.finish.as_str().into() });
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(out.into_iter().map(|c| c.expect("every prompt generated")).collect())
}

/// One `Generate` call per example, `in_flight` of them at a time. The server runs one
/// generation at a time today (the others wait there), so in effect this is sequential;
/// a second request in flight only hides the round trip between two generations.
async fn generate_remote(
    r: &Remote,
    prompts: &[String],
    params: &GenerateParams,
    progress: &ProgressBar,
) -> Result<Vec<Completion>> {
    // On the wire 0 means "the server's default" (256), not "nothing".
    if params.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1 with --server");
    }
    let max_new_tokens = u32::try_from(params.max_new_tokens)
        .context("--max-new-tokens is too large for a Generate request")?;
    let jobs = prompts.iter().enumerate().map(|(i, prompt)| {
        // Temperature and top_p travel as f32: a sampled remote run may differ from a local
        // one (f64) where a probability sits on a rounding boundary; greedy is unaffected.
        let req = v1::GenerateRequest {
            prompt: prompt.clone(),
            template: v1::Template::Raw as i32,
            max_new_tokens,
            temperature: params.temperature as f32,
            top_p: params.top_p as f32,
            seed: params.seed.wrapping_add(i as u64),
            stop: params.stop.clone(),
        };
        let client = r.client.clone();
        let job = async move {
            // A generation is repeatable (its seed travels with it): retried through a
            // server restart, up to the connect timeout.
            let what = format!("generating for example {i}");
            let (_, last) = client
                .retrying(&what, |c| {
                    let req = req.clone();
                    async move { c.generate_text(req).await }
                })
                .await
                .context(what)?;
            Ok(Completion { text: last.full_text, finish: last.finish_reason })
        };
        (1, job)
    });
    run_in_flight(r.in_flight, jobs.collect(), progress).await
}

/// One forward pass per question, on one shared-prompt row: the prompt is computed once and
/// each answer attends to it and to itself only (`dpo_common::logprob`'s layout, as the
/// server's batcher and the trainer score a prompt with its responses). The log-probs are
/// those of the separate sequences `prompt ++ answer`, up to float rounding, while one row
/// per answer would run the prompt through the model once per answer.
fn answer_logprobs_local(
    m: &LoadedModel,
    prompts: &[String],
    answers: &[String],
    progress: &ProgressBar,
) -> Result<Vec<Vec<f64>>> {
    let tok = &m.tokenizer;
    let answer_ids: Vec<Vec<u32>> = answers
        .iter()
        .map(|a| tok.encode_response(a)) // EOS appended, as `Score` does
        .collect::<Result<_, _>>()
        .context("tokenizing the answers")?;
    let mut out = Vec::with_capacity(prompts.len());
    for p in prompts {
        let prompt = tok.encode_prompt(p).context("tokenizing a prompt")?;
        let row = SharedPrompt { prompt, responses: answer_ids.clone() };
        let per_token =
            shared_prompt_logprobs(&m.model, std::slice::from_ref(&row))?.per_token_vecs()?;
        out.push(per_token.iter().map(|t| answer_logprob(t)).collect::<Result<_>>()?);
        progress.inc(1);
    }
    Ok(out)
}

async fn answer_logprobs_remote(
    r: &Remote,
    prompts: &[String],
    answers: &[String],
    batch_size: usize,
    progress: &ProgressBar,
) -> Result<Vec<Vec<f64>>> {
    let batch = batch_size.max(1);
    let jobs = prompts.chunks(batch).enumerate().map(|(c, chunk)| {
        let items = chunk
            .iter()
            .map(|p| v1::ScoreItem {
                input: Some(v1::score_item::Input::Text(v1::TextInput {
                    prompt: p.clone(),
                    responses: answers.to_vec(),
                    template: v1::Template::Raw as i32,
                })),
            })
            .collect();
        let req = v1::ScoreRequest { items, per_token: true, request_id: c as u64 };
        let (first, n) = (c * batch, chunk.len());
        let client = r.client.clone();
        let job = async move {
            let what = format!("scoring examples {first}..{}", first + n);
            let resp = client
                .retrying(&what, |c| {
                    let req = req.clone();
                    async move { c.score(req).await }
                })
                .await
                .context(what)?;
            // `score` checked the shape: one item per prompt, one response per answer.
            resp.items
                .iter()
                .map(|item| {
                    item.responses.iter().map(|s| answer_logprob(&s.token_logprobs)).collect()
                })
                .collect::<Result<Vec<Vec<f64>>>>()
        };
        (n as u64, job)
    });
    let chunks = run_in_flight(r.in_flight, jobs.collect(), progress).await?;
    Ok(chunks.into_iter().flatten().collect())
}

/// An answer's log-prob from its per-token values: all but the last (the EOS scoring
/// appends), summed in f64.
fn answer_logprob(per_token: &[f32]) -> Result<f64> {
    match per_token.split_last() {
        Some((_eos, answer)) if !answer.is_empty() => Ok(answer.iter().map(|&v| v as f64).sum()),
        _ => bail!("an answer scored as {} token(s): nothing before EOS", per_token.len()),
    }
}

/// Runs `jobs` with at most `limit` at a time; results in job order. Each job's weight is
/// what it adds to `progress` when done. The first failure ends the run (the others are
/// cancelled as the set drops).
async fn run_in_flight<T, F>(
    limit: usize,
    jobs: Vec<(u64, F)>,
    progress: &ProgressBar,
) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let mut out: Vec<Option<T>> = (0..jobs.len()).map(|_| None).collect();
    let mut pending = jobs.into_iter().enumerate();
    let mut running = JoinSet::new();
    loop {
        while running.len() < limit.max(1) {
            let Some((i, (weight, job))) = pending.next() else { break };
            running.spawn(async move { (i, weight, job.await) });
        }
        let Some(done) = running.join_next().await else { break };
        let (i, weight, result) = done.context("a request task panicked")?;
        out[i] = Some(result?);
        progress.inc(weight);
    }
    Ok(out.into_iter().map(|r| r.expect("every job ran")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_logprob_drops_eos() {
        assert_eq!(answer_logprob(&[-1.0, -0.5, -9.0]).unwrap(), -1.5);
        assert!(answer_logprob(&[-9.0]).is_err());
        assert!(answer_logprob(&[]).is_err());
    }

    /// A tiny random checkpoint, loaded and packed as `dpo-eval --model` loads it.
    fn tiny_local(dir: &std::path::Path) -> LoadedModel {
        use candle_core::{DType, Device};
        use dpo_common::model::{load_model, Mode};
        use dpo_common::testing::{write_tiny_checkpoint, TinySpec};
        write_tiny_checkpoint(dir, &TinySpec::default(), DType::F32, None).unwrap();
        let mut m = load_model(dir, Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
        m.model.pack_for_inference().unwrap();
        m
    }

    #[test]
    fn shared_prompt_scores_equal_separate_rows() {
        use dpo_common::logprob::{response_logprobs, Sequence};
        let dir = tempfile::tempdir().unwrap();
        let m = tiny_local(dir.path());
        let prompts: Vec<String> = [
            "Question: Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer:",
            "Q: 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:",
            "Answer:",
        ]
        .map(String::from)
        .to_vec();
        let answers: Vec<String> =
            ['A', 'B', 'C', 'D'].map(|l| format!(" The correct answer is {l}")).to_vec();
        let shared = answer_logprobs_local(&m, &prompts, &answers, &ProgressBar::hidden()).unwrap();
        assert_eq!(shared.len(), prompts.len());
        let argmax =
            |lps: &[f64]| (0..lps.len()).max_by(|&a, &b| lps[a].total_cmp(&lps[b])).unwrap();
        for (p, got) in prompts.iter().zip(&shared) {
            let prompt = m.tokenizer.encode_prompt(p).unwrap();
            // Each answer on its own row, scored alone: no shared layout, no padding.
            let separate: Vec<f64> = answers
                .iter()
                .map(|a| {
                    let ids = [prompt.clone(), m.tokenizer.encode_response(a).unwrap()].concat();
                    let seq = Sequence { ids, response_start: prompt.len() };
                    let lp = response_logprobs(&m.model, &[seq]).unwrap();
                    answer_logprob(&lp.per_token_vecs().unwrap()[0]).unwrap()
                })
                .collect();
            assert_eq!(got.len(), 4);
            for (x, y) in got.iter().zip(&separate) {
                assert!((x - y).abs() < 1e-4, "shared {x} vs separate {y} for {p:?}");
            }
            assert_eq!(argmax(got), argmax(&separate), "{got:?} vs {separate:?}");
        }
    }

    #[tokio::test]
    async fn in_flight_keeps_order_and_limit() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs = (0..10u64)
            .map(|i| {
                let (now, peak) = (Arc::clone(&now), Arc::clone(&peak));
                let job = async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    // Later jobs finish first: order must come from the index, not the finish.
                    tokio::time::sleep(std::time::Duration::from_millis(10 - i)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(i)
                };
                (1, job)
            })
            .collect();
        let bar = ProgressBar::hidden();
        let got = run_in_flight(3, jobs, &bar).await.unwrap();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(bar.position(), 10);
    }

    #[tokio::test]
    async fn in_flight_stops_at_the_first_error() {
        let jobs: Vec<(u64, _)> = (0..4)
            .map(|i| {
                (1, async move {
                    if i == 1 {
                        bail!("job {i} failed")
                    }
                    Ok(i)
                })
            })
            .collect();
        let e = run_in_flight(1, jobs, &ProgressBar::hidden()).await.unwrap_err();
        assert!(e.to_string().contains("job 1 failed"));
    }
}
