//! Dynamic batching. One dedicated thread owns the model; requests enqueue their sequences
//! and wait on a oneshot channel. Each forward pass takes up to `batch_token_budget` padded
//! tokens (sequences × longest sequence), chosen so that
//!
//! * the oldest waiting request always gets at least one sequence in: requests finish in
//!   roughly arrival order, and a large request can delay a small one only until it is
//!   done, never indefinitely;
//! * around that anchor, sequences of similar length are grouped (sorted by length within
//!   a window of the oldest requests), and a neighbour joins only while real tokens stay at
//!   least `min_fill` of the padded tokens: padding is pure waste (on a CPU, batching gains
//!   little over one sequence at a time, so `min_fill` near 1 is right there; on a GPU a
//!   lower value buys larger batches).
//!
//! Memory is bounded: a request first takes its token count from a semaphore of
//! `max_queued_tokens`, and waits there while the queue is full.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use dpo_common::logprob::{response_logprobs, Sequence};
use dpo_common::model::Llama;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// The score of one sequence.
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

struct Job {
    seqs: Vec<Sequence>,
    results: Vec<Option<Scored>>,
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

    /// Scores `seqs` (already validated), in order.
    pub async fn score(&self, seqs: Vec<Sequence>) -> Result<Vec<Scored>, BatchError> {
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        let tokens: usize = seqs.iter().map(|s| s.ids.len()).sum();
        // Validation keeps a request below max_tokens_per_request <= max_queued_tokens.
        let tokens = tokens.min(self.max_queued_tokens) as u32;
        let permit = self
            .queued_tokens
            .clone()
            .acquire_many_owned(tokens)
            .await
            .map_err(|_| BatchError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        let n = seqs.len();
        let job = Job { seqs, results: vec![None; n], remaining: n, reply, _permit: permit };
        self.tx.send(job).map_err(|_| BatchError::ShuttingDown)?;
        rx.await.map_err(|_| BatchError::ShuttingDown)?
    }
}

/// How forward passes are formed.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Most padded tokens (sequences × longest sequence) per pass.
    pub budget: usize,
    /// Least fraction of a pass's padded tokens that must be real tokens.
    pub min_fill: f64,
}

fn run(model: Arc<Llama>, plan: Plan, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut queue: VecDeque<Job> = VecDeque::new();
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
        let seqs: Vec<Sequence> = batch.iter().map(|&(j, s)| queue[j].seqs[s].clone()).collect();
        let started = std::time::Instant::now();
        match forward(&model, &seqs) {
            Ok(scores) => {
                for (&(j, s), score) in batch.iter().zip(scores) {
                    queue[j].results[s] = Some(score);
                    queue[j].remaining -= 1;
                }
            }
            Err(e) => {
                tracing::error!("forward pass over {} sequences failed: {e}", seqs.len());
                // Fail every request that had a sequence in this pass.
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
        tracing::debug!(
            sequences = seqs.len(),
            padded_tokens = seqs.len() * seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0),
            ms = started.elapsed().as_millis() as u64,
            "forward pass"
        );
        let mut i = 0;
        while i < queue.len() {
            if queue[i].remaining == 0 {
                let job = queue.remove(i).expect("index in range");
                let results = job.results.into_iter().map(|r| r.expect("scored")).collect();
                let _ = job.reply.send(Ok(results));
            } else {
                i += 1;
            }
        }
    }
    tracing::debug!("batcher stopped");
}

/// One padded forward pass; a panic inside candle becomes an error, not a dead batcher.
fn forward(model: &Llama, seqs: &[Sequence]) -> Result<Vec<Scored>, String> {
    let out = catch_unwind(AssertUnwindSafe(|| -> dpo_common::Result<Vec<Scored>> {
        let lp = response_logprobs(model, seqs)?;
        Ok(lp
            .per_token_vecs()?
            .into_iter()
            .map(|per_token| Scored {
                logprob: per_token.iter().map(|&x| x as f64).sum(),
                per_token,
            })
            .collect())
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

/// How many queued sequences (from the oldest requests on) are considered for grouping
/// by length, in multiples of the batch budget.
const WINDOW_BUDGETS: usize = 4;

/// Picks the sequences of the next forward pass as (job index, sequence index) pairs: the
/// first unscored sequence of the oldest job, plus its nearest neighbours by length within
/// the window while the padded size stays within `budget`. Never empty when a job waits.
fn plan_batch(queue: &VecDeque<Job>, p: Plan) -> Vec<(usize, usize)> {
    let lens: Vec<Vec<Option<usize>>> = queue
        .iter()
        .map(|j| {
            j.seqs.iter().zip(&j.results).map(|(s, r)| r.is_none().then_some(s.ids.len())).collect()
        })
        .collect();
    plan(&lens, p)
}

/// [`plan_batch`] over just the lengths of unscored sequences (`None` = already scored).
fn plan(lens: &[Vec<Option<usize>>], p: Plan) -> Vec<(usize, usize)> {
    let budget = p.budget;
    let mut window: Vec<(usize, usize, usize)> = Vec::new(); // (len, job, seq)
    let mut tokens = 0;
    for (j, job) in lens.iter().enumerate() {
        if j > 0 && tokens >= WINDOW_BUDGETS * budget {
            break;
        }
        for (s, len) in job.iter().enumerate() {
            if let Some(len) = *len {
                window.push((len, j, s));
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
    window[lo..=hi].iter().map(|&(_, j, s)| (j, s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(v: &[usize]) -> Vec<Option<usize>> {
        v.iter().map(|&x| Some(x)).collect()
    }

    #[test]
    fn oldest_request_always_progresses_within_budget() {
        // A big old request and a small new one: the old one's first sequence leads.
        let lens = vec![some(&[50; 40]), some(&[10])];
        let b = plan(&lens, Plan { budget: 200, min_fill: 0.0 });
        assert!(b.contains(&(0, 0)));
        assert!(b.len() * 50 <= 200);
    }

    #[test]
    fn groups_similar_lengths() {
        let lens = vec![some(&[10, 100, 11]), some(&[12, 99])];
        let b = plan(&lens, Plan { budget: 40, min_fill: 0.0 });
        let mut got: Vec<_> = b.iter().map(|&(j, s)| lens[j][s].unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![10, 11, 12]);
    }

    #[test]
    fn min_fill_keeps_padding_down() {
        let lens = vec![some(&[100, 10, 95, 12])];
        let b = plan(&lens, Plan { budget: 1000, min_fill: 0.9 });
        let mut got: Vec<_> = b.iter().map(|&(j, s)| lens[j][s].unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![95, 100]);
    }

    #[test]
    fn an_oversized_sequence_still_runs_alone() {
        let lens = vec![vec![None, Some(500)], some(&[3, 3])];
        assert_eq!(plan(&lens, Plan { budget: 100, min_fill: 0.0 }), vec![(0, 1)]);
    }

    #[test]
    fn every_sequence_is_eventually_scheduled() {
        let mut lens = vec![some(&[7, 30, 2, 2, 64]), some(&[5; 9]), some(&[64, 1])];
        let mut passes = 0;
        while lens.iter().any(|j| j.iter().any(Option::is_some)) {
            let b = plan(&lens, Plan { budget: 64, min_fill: 0.8 });
            assert!(!b.is_empty());
            for (j, s) in b {
                assert!(lens[j][s].take().is_some(), "scheduled twice");
            }
            passes += 1;
            assert!(passes < 100);
        }
    }
}
