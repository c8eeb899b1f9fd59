//! Dynamic batching. One dedicated thread owns the model; requests enqueue their rows and
//! wait on a oneshot channel. The unit of work is a row, a [`SharedPrompt`]: a prompt with
//! the responses that share it, each response attending to the prompt and to itself only
//! (see `dpo_common::logprob`). A pair item (prompt, chosen, rejected) is one row, so its
//! prompt goes through the model once, not twice; [`item_rows`] lays a request out as
//! rows. Each forward pass takes up to `batch_token_budget` padded tokens (rows × longest
//! row), chosen so that
//!
//! * the oldest waiting request always gets at least one row in: requests finish in
//!   roughly arrival order, and a large request can delay a small one only until it is
//!   done, never indefinitely;
//! * around that anchor, rows of similar length are grouped (sorted by length within a
//!   window of the oldest requests), and a neighbour joins only while real tokens stay at
//!   least `min_fill` of the padded tokens: padding is pure waste (on a CPU, batching gains
//!   little over one row at a time, so `min_fill` near 1 is right there; on a GPU a lower
//!   value buys larger batches).
//!
//! Memory is bounded: a request first takes its row tokens from a semaphore of
//! `max_queued_tokens`, and waits there while the queue is full.
//!
//! A prompt prefix that requests share (the prompt template's preamble) is found and
//! computed once by a [`PrefixCache`], and passes whose rows all start with it start from
//! its keys and values.
//!
//! Results come back one per response, in request order, exactly as if every response had
//! been scored as its own `prompt ++ response` sequence (the numbers equal up to float
//! rounding).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use dpo_common::logprob::{Sequence, SharedPrompt};
use dpo_common::model::Llama;
use dpo_common::prefix::PrefixCache;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// The score of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Summed response log-prob, accumulated in f64.
    pub logprob: f64,
    /// Per-token log-probs of the response.
    pub per_token: Vec<f32>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the forward pass failed: {0}")]
    Forward(String),
}

/// Lays out a validated request's sequences (`responses_per_item` of them per item, in
/// order) as rows: the responses of one item that share its prompt (the ids before
/// `response_start`) go into one row while it stays within `max_row` tokens, so a pair item
/// is one row. Sequences with a different prompt, and responses that would make a row
/// longer than `max_row` (the batch budget), start a row of their own; a row always holds
/// at least one response. Items never share a row. Flattening the rows' responses gives
/// back the order of `seqs`.
pub fn item_rows(
    seqs: &[Sequence],
    responses_per_item: &[usize],
    max_row: usize,
) -> Vec<SharedPrompt> {
    let mut rows = Vec::with_capacity(responses_per_item.len());
    let mut next = seqs.iter();
    for &n in responses_per_item {
        let mut current: Option<SharedPrompt> = None;
        for s in next.by_ref().take(n) {
            let (prompt, response) = s.ids.split_at(s.response_start);
            match &mut current {
                Some(row) if row.prompt == prompt && row.row_len() + response.len() <= max_row => {
                    row.responses.push(response.to_vec());
                }
                _ => {
                    rows.extend(current.take());
                    current = Some(SharedPrompt {
                        prompt: prompt.to_vec(),
                        responses: vec![response.to_vec()],
                    });
                }
            }
        }
        rows.extend(current);
    }
    rows
}

struct Job {
    rows: Vec<SharedPrompt>,
    /// Per row: the scores of its responses, once its pass is done.
    results: Vec<Option<Vec<Scored>>>,
    remaining: usize,
    reply: oneshot::Sender<Result<Vec<Scored>, BatchError>>,
    /// Returned to the queue's token budget when the job is done.
    _permit: OwnedSemaphorePermit,
}

/// Submits work to the batcher thread. Dropping every handle stops the thread once the
/// queue is empty.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    queued_tokens: Arc<Semaphore>,
    max_queued_tokens: usize,
}

impl Batcher {
    /// Starts the batcher thread, which takes ownership of `model`.
    pub fn spawn(model: Arc<Llama>, plan: Plan, max_queued_tokens: usize) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("batcher".into())
            .spawn(move || run(model, plan, rx))
            .expect("cannot start the batcher thread");
        Batcher {
            tx,
            queued_tokens: Arc::new(Semaphore::new(max_queued_tokens)),
            max_queued_tokens,
        }
    }

    /// Scores `rows` (already validated): one result per response, row after row, each
    /// row's responses in order.
    pub async fn score(&self, rows: Vec<SharedPrompt>) -> Result<Vec<Scored>, BatchError> {
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let tokens: usize = rows.iter().map(SharedPrompt::row_len).sum();
        // Validation keeps a request's sequences (which hold at least its row tokens)
        // below max_tokens_per_request <= max_queued_tokens.
        let tokens = tokens.min(self.max_queued_tokens) as u32;
        let _queued = crate::metrics::metrics().enqueue(&rows);
        let permit = self
            .queued_tokens
            .clone()
            .acquire_many_owned(tokens)
            .await
            .map_err(|_| BatchError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        let n = rows.len();
        let job = Job { rows, results: vec![None; n], remaining: n, reply, _permit: permit };
        self.tx.send(job).map_err(|_| BatchError::ShuttingDown)?;
        rx.await.map_err(|_| BatchError::ShuttingDown)?
    }
}

/// How forward passes are formed.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Most padded tokens (rows × longest row) per pass.
    pub budget: usize,
    /// Least fraction of a pass's padded tokens that must be real tokens.
    pub min_fill: f64,
    /// Shortest shared prompt prefix worth caching; 0: no prefix cache.
    pub prefix_min_tokens: usize,
}

fn run(model: Arc<Llama>, plan: Plan, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut prefixes =
        (plan.prefix_min_tokens > 0).then(|| PrefixCache::new(plan.prefix_min_tokens));
    loop {
        if queue.is_empty() {
            match rx.blocking_recv() {
                Some(job) => queue.push_back(job),
                None => break,
            }
        }
        while let Ok(job) = rx.try_recv() {
            queue.push_back(job);
        }
        // Requests whose client went away are not worth computing.
        queue.retain(|j| !j.reply.is_closed());
        if queue.is_empty() {
            continue;
        }
        let batch = plan_batch(&queue, plan);
        let rows: Vec<SharedPrompt> =
            batch.iter().map(|&(j, r)| queue[j].rows[r].clone()).collect();
        let started = std::time::Instant::now();
        let computed_before = prefixes.as_ref().map(|c| c.stats().prefixes_computed);
        match forward(&model, prefixes.as_mut(), &rows) {
            Ok(scores) => {
                for (&(j, r), score) in batch.iter().zip(scores) {
                    queue[j].results[r] = Some(score);
                    queue[j].remaining -= 1;
                }
            }
            Err(e) => {
                tracing::error!("forward pass over {} rows failed: {e}", rows.len());
                // Fail every request that had a row in this pass.
                let mut failed: Vec<usize> = batch.iter().map(|&(j, _)| j).collect();
                failed.sort_unstable();
                failed.dedup();
                for &j in failed.iter().rev() {
                    if let Some(job) = queue.remove(j) {
                        let _ = job.reply.send(Err(BatchError::Forward(e.clone())));
                    }
                }
            }
        }
        crate::metrics::metrics().forward_pass(&rows, started.elapsed());
        if let Some(c) =
            prefixes.as_ref().filter(|c| Some(c.stats().prefixes_computed) != computed_before)
        {
            tracing::info!(
                "prefix cache: a {}-token prompt prefix shared by requests is now computed once",
                c.prefix_lens()[0]
            );
        }
        tracing::debug!(
            rows = rows.len(),
            responses = rows.iter().map(|r| r.responses.len()).sum::<usize>(),
            padded_tokens = rows.len() * rows.iter().map(SharedPrompt::row_len).max().unwrap_or(0),
            ms = started.elapsed().as_millis() as u64,
            "forward pass"
        );
        let mut i = 0;
        while i < queue.len() {
            if queue[i].remaining == 0 {
                let job = queue.remove(i).expect("index in range");
                let results = job.results.into_iter().flat_map(|r| r.expect("scored")).collect();
                let _ = job.reply.send(Ok(results));
            } else {
                i += 1;
            }
        }
    }
    tracing::debug!("batcher stopped");
}

/// One padded forward pass over `rows` (from a cached prefix when `prefixes` has one they
/// share): the scores of each row's responses. A panic inside candle becomes an error, not
/// a dead batcher.
fn forward(
    model: &Llama,
    prefixes: Option<&mut PrefixCache>,
    rows: &[SharedPrompt],
) -> Result<Vec<Vec<Scored>>, String> {
    let out = catch_unwind(AssertUnwindSafe(|| -> dpo_common::Result<Vec<Vec<Scored>>> {
        let lp = match prefixes {
            Some(cache) => cache.score(model, rows)?,
            None => dpo_common::logprob::shared_prompt_logprobs(model, rows)?,
        };
        let mut scores = lp.per_token_vecs()?.into_iter().map(|per_token| Scored {
            logprob: per_token.iter().map(|&x| x as f64).sum(),
            per_token,
        });
        Ok(rows.iter().map(|r| scores.by_ref().take(r.responses.len()).collect()).collect())
    }));
    match out {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())),
    }
}

/// How many queued row tokens (from the oldest requests on) are considered for grouping
/// by length, in multiples of the batch budget.
const WINDOW_BUDGETS: usize = 4;

/// Picks the rows of the next forward pass as (job index, row index) pairs: the first
/// unscored row of the oldest job, plus its nearest neighbours by length within the window
/// while the padded size stays within `budget`. Never empty when a job waits.
fn plan_batch(queue: &VecDeque<Job>, p: Plan) -> Vec<(usize, usize)> {
    let lens: Vec<Vec<Option<usize>>> = queue
        .iter()
        .map(|j| {
            j.rows.iter().zip(&j.results).map(|(r, s)| s.is_none().then(|| r.row_len())).collect()
        })
        .collect();
    plan(&lens, p)
}

/// [`plan_batch`] over just the lengths of unscored rows (`None` = already scored).
fn plan(lens: &[Vec<Option<usize>>], p: Plan) -> Vec<(usize, usize)> {
    let budget = p.budget;
    let mut window: Vec<(usize, usize, usize)> = Vec::new(); // (len, job, row)
    let mut tokens = 0;
    for (j, job) in lens.iter().enumerate() {
        if j > 0 && tokens >= WINDOW_BUDGETS * budget {
            break;
        }
        for (r, len) in job.iter().enumerate() {
            if let Some(len) = *len {
                window.push((len, j, r));
                tokens += len;
            }
        }
    }
    let Some(&anchor) = window.first() else { return vec![] };
    window.sort_unstable();
    let pos = window.binary_search(&anchor).expect("anchor is in the window");
    let (mut lo, mut hi) = (pos, pos);
    let mut real = window[pos].0;
    let fits = |n: usize, longest: usize, real: usize| {
        n * longest <= budget && real as f64 >= p.min_fill * (n * longest) as f64
    };
    loop {
        let n = hi - lo + 1;
        // Shorter neighbours do not raise the padded length; try them first.
        if lo > 0 && fits(n + 1, window[hi].0, real + window[lo - 1].0) {
            lo -= 1;
            real += window[lo].0;
        } else if hi + 1 < window.len() && fits(n + 1, window[hi + 1].0, real + window[hi + 1].0) {
            hi += 1;
            real += window[hi].0;
        } else {
            break;
        }
    }
    window[lo..=hi].iter().map(|&(_, j, r)| (j, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(v: &[usize]) -> Vec<Option<usize>> {
        v.iter().map(|&x| Some(x)).collect()
    }

    fn seq(prompt: &[u32], response: &[u32]) -> Sequence {
        Sequence { ids: [prompt, response].concat(), response_start: prompt.len() }
    }

    /// The responses of `rows` as separate sequences, in order.
    fn flatten(rows: &[SharedPrompt]) -> Vec<Sequence> {
        rows.iter().flat_map(|r| r.responses.iter().map(|x| seq(&r.prompt, x))).collect()
    }

    #[test]
    fn a_pair_is_planned_as_one_row() {
        // prompt 3 + chosen 2 + rejected 3: one row of 8 tokens, where two separate
        // sequences would pad to 2 × 6 = 12.
        let seqs = vec![seq(&[1, 2, 3], &[4, 5]), seq(&[1, 2, 3], &[6, 7, 8])];
        let rows = item_rows(&seqs, &[2], 8192);
        assert_eq!(
            rows,
            vec![SharedPrompt {
                prompt: vec![1, 2, 3],
                responses: vec![vec![4, 5], vec![6, 7, 8]]
            }]
        );
        assert_eq!(flatten(&rows), seqs);
        let lens = vec![some(&[rows[0].row_len()])];
        assert_eq!(
            plan(&lens, Plan { budget: 8, min_fill: 0.9, prefix_min_tokens: 0 }),
            vec![(0, 0)]
        );
    }

    #[test]
    fn rows_keep_items_apart_and_fall_back_to_separate_rows() {
        let seqs = vec![
            // Item 0: a single response.
            seq(&[1, 2], &[3]),
            // Item 1: the same prompt as item 0, but items never share a row.
            seq(&[1, 2], &[4]),
            // Item 2: two sides whose prompts differ (a token-level split of a different
            // prefix): separate rows.
            seq(&[1, 2], &[5, 6]),
            seq(&[1, 2, 5], &[7]),
            // Item 3: three responses, the third would make the row longer than max_row.
            seq(&[9; 4], &[1; 3]),
            seq(&[9; 4], &[2; 3]),
            seq(&[9; 4], &[3; 3]),
        ];
        let rows = item_rows(&seqs, &[1, 1, 2, 3], 10);
        let shape: Vec<(usize, usize)> =
            rows.iter().map(|r| (r.prompt.len(), r.responses.len())).collect();
        assert_eq!(shape, vec![(2, 1), (2, 1), (2, 1), (3, 1), (4, 2), (4, 1)]);
        assert!(rows.iter().all(|r| r.row_len() <= 10));
        assert_eq!(flatten(&rows), seqs, "responses come back in request order");
        // A row always takes one response, even beyond max_row.
        let long = vec![seq(&[1; 8], &[2; 8])];
        assert_eq!(item_rows(&long, &[1], 10).len(), 1);
    }

    #[test]
    fn a_pass_scores_each_response_as_its_own_sequence() {
        use candle_core::{DType, Device};
        use dpo_common::logprob::response_logprobs;
        use dpo_common::model::Mode;
        use dpo_common::testing::{tiny_config, tiny_weights, TinySpec};

        let cfg = tiny_config(&TinySpec::default());
        let weights = tiny_weights(&cfg, 3).unwrap();
        let model =
            Llama::from_weights(cfg, weights, Mode::Frozen, DType::F32, &Device::Cpu).unwrap();
        let p: Vec<u32> = (0..9).map(|k| (k * 29 + 5) % 258).collect();
        let rows = vec![
            SharedPrompt { prompt: p.clone(), responses: vec![vec![7, 8, 257], vec![9, 257]] },
            SharedPrompt { prompt: vec![256, 40], responses: vec![vec![41, 42, 43, 44]] },
            SharedPrompt { prompt: p[..4].to_vec(), responses: vec![vec![1], vec![2, 3], vec![4]] },
        ];
        let check = |rows: &[SharedPrompt], prefixes: Option<&mut PrefixCache>| {
            let got: Vec<Scored> =
                forward(&model, prefixes, rows).unwrap().into_iter().flatten().collect();
            let seqs = flatten(rows);
            assert_eq!(got.len(), seqs.len());
            for (i, (g, s)) in got.iter().zip(&seqs).enumerate() {
                let want = response_logprobs(&model, std::slice::from_ref(s)).unwrap();
                let want = &want.per_token_vecs().unwrap()[0];
                assert_eq!(g.per_token.len(), want.len(), "response {i}");
                for (a, b) in g.per_token.iter().zip(want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "response {i}: {a} vs {b}");
                }
                let sum: f64 = want.iter().map(|&x| x as f64).sum();
                assert!((g.logprob - sum).abs() <= 1e-4 * (1.0 + sum.abs()), "response {i}");
            }
        };
        check(&rows, None);
        // Rows 0 and 2 share a 4-token prefix: from the second pass on, it is cached.
        let mut cache = PrefixCache::new(2);
        let sharing = [rows[0].clone(), rows[2].clone()];
        for _ in 0..3 {
            check(&sharing, Some(&mut cache));
        }
        check(&rows, Some(&mut cache));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.prefixes_computed), (2, 1), "{stats:?}");
    }

    #[test]
    fn oldest_request_always_progresses_within_budget() {
        // A big old request and a small new one: the old one's first sequence leads.
        let lens = vec![some(&[50; 40]), some(&[10])];
        let b = plan(&lens, Plan { budget: 200, min_fill: 0.0, prefix_min_tokens: 0 });
        assert!(b.contains(&(0, 0)));
        assert!(b.len() * 50 <= 200);
    }

    #[test]
    fn groups_similar_lengths() {
        let lens = vec![some(&[10, 100, 11]), some(&[12, 99])];
        let b = plan(&lens, Plan { budget: 40, min_fill: 0.0, prefix_min_tokens: 0 });
        let mut got: Vec<_> = b.iter().map(|&(j, s)| lens[j][s].unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![10, 11, 12]);
    }

    #[test]
    fn min_fill_keeps_padding_down() {
        let lens = vec![some(&[100, 10, 95, 12])];
        let b = plan(&lens, Plan { budget: 1000, min_fill: 0.9, prefix_min_tokens: 0 });
        let mut got: Vec<_> = b.iter().map(|&(j, s)| lens[j][s].unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![95, 100]);
    }

    #[test]
    fn an_oversized_sequence_still_runs_alone() {
        let lens = vec![vec![None, Some(500)], some(&[3, 3])];
        assert_eq!(
            plan(&lens, Plan { budget: 100, min_fill: 0.0, prefix_min_tokens: 0 }),
            vec![(0, 1)]
        );
    }

    #[test]
    fn every_sequence_is_eventually_scheduled() {
        let mut lens = vec![some(&[7, 30, 2, 2, 64]), some(&[5; 9]), some(&[64, 1])];
        let mut passes = 0;
        while lens.iter().any(|j| j.iter().any(Option::is_some)) {
            let b = plan(&lens, Plan { budget: 64, min_fill: 0.8, prefix_min_tokens: 0 });
            assert!(!b.is_empty());
            for (j, s) in b {
                assert!(lens[j][s].take().is_some(), "scheduled twice");
            }
            passes += 1;
            assert!(passes < 100);
        }
    }
}
