//! The trainer's side of the reference: scores are requested ahead of the policy (a
//! bounded window of upcoming pairs in flight), kept in the [`RefCache`]. `--ref-server`
//! may name several replicas (a list or a `dns:///` name); requests are balanced over them.
//! A request that fails for any reason but the server's verdict (a replica down,
//! restarting or still loading, the connection lost) is retried on another replica, or on
//! the same one once it is back, for at most `--ref-timeout` ([`RefClient::retrying`]),
//! after which the trainer fails with an error naming the server; replicas serving another
//! model than the first one's are never used, and when none is left the run ends.
//!
//! The training loop is synchronous (candle compute on the calling thread); the gRPC
//! traffic runs on a small tokio runtime owned by [`ReferenceScorer`]. The two meet in a
//! mutex-guarded table of pending/ready pairs with a condition variable.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use dpo_common::data::EncodedPair;
use dpo_proto::client::{ClientError, ClientOptions, ModelInfo, TokenPair};
use dpo_proto::fleet::{RefClient, ReplicaStats};

use crate::ref_cache::{PairKey, RefCache, RefScores};

/// How the trainer talks to the reference server.
#[derive(Debug, Clone)]
pub struct ScorerOptions {
    pub client: ClientOptions,
    /// Give up after the server has been unreachable this long.
    pub timeout: Duration,
    /// Pairs per Score request.
    pub pairs_per_request: usize,
    /// Score requests in flight at once.
    pub max_requests_in_flight: usize,
}

enum Slot {
    Pending,
    Failed(String),
}

struct Shared {
    /// Scores known so far (also the persistent cache).
    cache: RefCache,
    /// Pairs requested but not yet answered, or whose request failed for good.
    pending: HashMap<PairKey, Slot>,
}

pub struct ReferenceScorer {
    runtime: tokio::runtime::Runtime,
    client: RefClient,
    info: ModelInfo,
    options: ScorerOptions,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    requests: Arc<tokio::sync::Semaphore>,
    /// Requests made to the server / answered from the cache, for the run summary.
    stats: Arc<Mutex<ScorerStats>>,
}

#[derive(Debug, Default, Clone)]
pub struct ScorerStats {
    pub pairs_requested: usize,
    pub requests: usize,
    pub retries: usize,
    /// Each replica's calls (attempts) and failures.
    pub replicas: Vec<ReplicaStats>,
}

impl ScorerStats {
    /// One line for the run summary: the requests, the retries and, with several replicas,
    /// each one's share of the calls.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "{} pairs in {} requests ({} retries)",
            self.pairs_requested, self.requests, self.retries
        );
        if self.replicas.len() > 1 {
            let calls: u64 = self.replicas.iter().map(|r| r.calls).sum::<u64>().max(1);
            let shares: Vec<String> = self
                .replicas
                .iter()
                .map(|r| {
                    let failed = match r.failures {
                        0 => String::new(),
                        n => format!(", {n} failed"),
                    };
                    let share = 100.0 * r.calls as f64 / calls as f64;
                    format!("{} {} calls ({share:.0}%{failed})", r.url, r.calls)
                })
                .collect();
            line.push_str(&format!("; replicas: {}", shares.join(", ")));
        }
        line
    }
}

/// `what` failed for good: a server verdict or a changed model as it is, and a server
/// unreachable for the whole `--ref-timeout` with a hint on how to start one.
fn scoring_error(what: &str, timeout: Duration, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::NotServing { .. } => anyhow!(
            "{what}: {e} (--ref-timeout {}s). Is `ref-server serve` running there (or use \
             deploy/run.sh, which starts one)?",
            timeout.as_secs()
        ),
        e => anyhow!("{what}: {e}"),
    }
}

impl ReferenceScorer {
    /// Connects (waiting, within the timeout, while the server is not up yet or still
    /// loading its model) and fetches the server's `ModelInfo`.
    pub fn connect(options: ScorerOptions, cache: RefCache) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ref-client")
            .enable_all()
            .build()
            .context("cannot start the reference client's runtime")?;
        let stats = Arc::new(Mutex::new(ScorerStats::default()));
        let (client, info) = runtime.block_on(async {
            // Waits for a server that is not up yet or still loading, up to the timeout.
            // Every replica found now serves the same model, or this fails naming both.
            let client = RefClient::wait_until_serving(&options.client, options.timeout)
                .await
                .map_err(|e| scoring_error("connecting", options.timeout, e))?;
            let info = client
                .model_info()
                .await
                .map_err(|e| scoring_error("asking for ModelInfo", options.timeout, e))?;
            anyhow::Ok((client, info))
        })?;
        let requests = Arc::new(tokio::sync::Semaphore::new(options.max_requests_in_flight.max(1)));
        Ok(ReferenceScorer {
            runtime,
            client,
            info,
            options,
            shared: Arc::new((
                Mutex::new(Shared { cache, pending: HashMap::new() }),
                Condvar::new(),
            )),
            requests,
            stats,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn stats(&self) -> ScorerStats {
        let retries = self.client.retries() as usize;
        let replicas = self.client.replicas();
        ScorerStats { retries, replicas, ..self.stats.lock().expect("stats lock").clone() }
    }

    pub fn cached(&self) -> usize {
        self.shared.0.lock().expect("scorer lock").cache.len()
    }

    fn key(&self, pair: &EncodedPair) -> PairKey {
        PairKey::new(&self.info.fingerprint, pair)
    }

    /// Asks for the scores of `pairs` in the background (those not cached or already on
    /// their way); returns immediately.
    pub fn prefetch<'a>(&self, pairs: impl IntoIterator<Item = &'a EncodedPair>) {
        let mut todo: Vec<(PairKey, TokenPair)> = Vec::new();
        {
            let mut shared = self.shared.0.lock().expect("scorer lock");
            for pair in pairs {
                let key = self.key(pair);
                if shared.cache.get(&key).is_some() || shared.pending.contains_key(&key) {
                    continue;
                }
                shared.pending.insert(key, Slot::Pending);
                todo.push((
                    key,
                    TokenPair {
                        prompt_ids: pair.prompt_ids.clone(),
                        chosen_ids: pair.chosen_ids.clone(),
                        rejected_ids: pair.rejected_ids.clone(),
                    },
                ));
            }
        }
        let per_request = self.options.pairs_per_request.max(1);
        let mut todo = todo.into_iter().peekable();
        while todo.peek().is_some() {
            let chunk: Vec<(PairKey, TokenPair)> = todo.by_ref().take(per_request).collect();
            self.spawn_request(chunk);
        }
    }

    fn spawn_request(&self, chunk: Vec<(PairKey, TokenPair)>) {
        let client = self.client.clone();
        let shared = Arc::clone(&self.shared);
        let requests = Arc::clone(&self.requests);
        let stats = Arc::clone(&self.stats);
        let timeout = self.options.timeout;
        self.runtime.spawn(async move {
            let Ok(_permit) = requests.acquire_owned().await else { return };
            {
                let mut s = stats.lock().expect("stats lock");
                s.requests += 1;
                s.pairs_requested += chunk.len();
            }
            let (keys, pairs): (Vec<PairKey>, Vec<TokenPair>) = chunk.into_iter().unzip();
            let what = format!("scoring {} pairs", pairs.len());
            let result = client
                .retrying(&what, |c| {
                    let p = pairs.clone();
                    async move { c.score_pairs(&p).await }
                })
                .await
                .map_err(|e| scoring_error(&what, timeout, e))
                .and_then(|scores| {
                    if scores.len() != keys.len() {
                        bail!(
                            "the reference server returned {} scores for {} pairs",
                            scores.len(),
                            keys.len()
                        );
                    }
                    Ok(scores)
                });
            let (lock, ready) = &*shared;
            let mut shared = lock.lock().expect("scorer lock");
            match result {
                Ok(scores) => {
                    for (key, s) in keys.into_iter().zip(scores) {
                        shared.pending.remove(&key);
                        let scores = RefScores { chosen: s.chosen, rejected: s.rejected };
                        if let Err(e) = shared.cache.insert(key, scores) {
                            shared.pending.insert(key, Slot::Failed(format!("{e:#}")));
                        }
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    for key in keys {
                        shared.pending.insert(key, Slot::Failed(msg.clone()));
                    }
                }
            }
            ready.notify_all();
        });
    }

    /// The reference scores of `pairs`, in order; blocks until all are known (requesting
    /// the ones nobody asked for yet).
    pub fn scores(&self, pairs: &[EncodedPair]) -> Result<Vec<RefScores>> {
        self.prefetch(pairs);
        let keys: Vec<PairKey> = pairs.iter().map(|p| self.key(p)).collect();
        let (lock, ready) = &*self.shared;
        let mut shared = lock.lock().expect("scorer lock");
        loop {
            let mut out = Vec::with_capacity(keys.len());
            for key in &keys {
                if let Some(s) = shared.cache.get(key) {
                    out.push(s);
                } else if let Some(Slot::Failed(msg)) = shared.pending.get(key) {
                    bail!("{msg}");
                } else {
                    break;
                }
            }
            if out.len() == keys.len() {
                return Ok(out);
            }
            // The background request itself gives up after the timeout, so this wait ends.
            shared = ready.wait(shared).expect("scorer lock");
        }
    }

    pub fn flush_cache(&self) -> Result<()> {
        self.shared.0.lock().expect("scorer lock").cache.flush()
    }
}

#[cfg(test)]
mod tests {
    use dpo_proto::fleet::Phase;

    use super::*;

    fn replica(url: &str, calls: u64, failures: u64) -> ReplicaStats {
        ReplicaStats { url: url.into(), calls, failures, phase: Phase::Serving }
    }

    #[test]
    fn the_summary_gives_each_replicas_share_only_for_a_fleet() {
        let one = ScorerStats {
            pairs_requested: 16,
            requests: 4,
            retries: 0,
            replicas: vec![replica("http://a:1", 4, 0)],
        };
        assert_eq!(one.describe(), "16 pairs in 4 requests (0 retries)");
        let fleet = ScorerStats {
            pairs_requested: 16,
            requests: 4,
            retries: 1,
            replicas: vec![replica("http://a:1", 3, 0), replica("http://b:1", 2, 1)],
        };
        assert_eq!(
            fleet.describe(),
            "16 pairs in 4 requests (1 retries); replicas: http://a:1 3 calls (60%), \
             http://b:1 2 calls (40%, 1 failed)"
        );
    }
}
