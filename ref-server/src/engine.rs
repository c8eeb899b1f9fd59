//! The scoring engine: the loaded model's metadata and tokenizer, the limits, the
//! [`Batcher`] that owns the model and the optional score store. `score` is validate →
//! look up → batch the misses → answer; the gRPC service and the local `ref-server score
//! --model` both go through it, so they give the same numbers by construction.
//!
//! With a store, every response is a key ([`KeyContext`]); a request claims its keys
//! ([`SingleFlight`]): the keys another request is computing it waits for, the others it
//! looks up, scores the misses (a pair whose responses both hit makes no forward pass),
//! publishes them to its waiters and writes them back in one transaction. What a hit
//! returns is what the miss computed, bit for bit.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dpo_common::device::{device_name, parse_device};
use dpo_common::generate::{generate_with, GenerateParams};
use dpo_common::model::load::{load_model, parse_dtype, torch_dtype_name};
use dpo_common::model::{Llama, Mode};
use dpo_common::tokenizer::LlamaTokenizer;
use dpo_proto::v1;
use tokio::sync::mpsc;

use dpo_common::logprob::Sequence;

use crate::batcher::{item_rows, BatchError, Batcher, Plan, Scored};
use crate::config::{LimitArgs, Limits, StoreArgs};
use crate::store::single_flight::{Leading, Waited};
use crate::store::{KeyContext, OpenedStore, ScoreKey, ScoreStats, ScoreStore, SingleFlight};
use crate::validation::{template_of, Invalid, Prepared, Validator};

/// Test hook: milliseconds every forward pass request waits before it is queued, so that
/// tests can have concurrent requests overlap for certain.
const SCORE_DELAY_ENV: &str = "DPO_TEST_SCORE_DELAY_MS";

/// Why a request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Batch(#[from] BatchError),
}

impl From<ScoreError> for tonic::Status {
    fn from(e: ScoreError) -> Self {
        match e {
            ScoreError::Invalid(i) => tonic::Status::invalid_argument(i.0),
            ScoreError::Batch(BatchError::ShuttingDown) => {
                tonic::Status::unavailable(e.to_string())
            }
            ScoreError::Batch(BatchError::Forward(_)) => tonic::Status::internal(e.to_string()),
        }
    }
}

pub struct Engine {
    info: v1::ModelInfoResponse,
    /// Shared with the batcher thread (scoring) and generation.
    model: Arc<Llama>,
    /// One generation at a time: it holds a KV cache and would compete with scoring.
    generation: Arc<tokio::sync::Semaphore>,
    tokenizer: LlamaTokenizer,
    vocab_size: usize,
    limits: Limits,
    batcher: Batcher,
    stats: Arc<ScoreStats>,
    store: Option<StoreState>,
    score_delay: Option<Duration>,
}

/// The score store of a server that has one.
struct StoreState {
    db: Arc<ScoreStore>,
    keys: KeyContext,
    flights: Arc<SingleFlight>,
}

/// `loaded` with the PEFT LoRA adapter in `dir` added into its weights (`W + s·B·A`, as
/// `policy-trainer --save-merged` writes them): the model served is that merged model, and
/// its fingerprint is the merged weights', the same as the merged checkpoint's. An adapter
/// for another base (other shapes, or another fingerprint than the one its trainer
/// recorded) is an error naming the file.
pub(crate) fn with_adapter(
    mut loaded: dpo_common::model::LoadedModel,
    dir: &Path,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<dpo_common::model::LoadedModel> {
    use dpo_common::model::lora;
    let adapters = lora::check_adapter_base(dir, &loaded.source, &loaded.fingerprint)
        .and_then(|()| lora::load_peft(dir, loaded.model.config(), dtype, device))
        .with_context(|| {
            format!("cannot use the adapter {} on {}", dir.display(), loaded.source.display())
        })?;
    loaded.model = loaded.model.with_lora(adapters)?.merged()?;
    loaded.fingerprint =
        dpo_common::fingerprint::model_fingerprint(&loaded.model, &loaded.tokenizer)?;
    tracing::info!(adapter = %dir.display(), "LoRA adapter merged into the model");
    loaded.source = PathBuf::from(format!("{} + {}", loaded.source.display(), dir.display()));
    Ok(loaded)
}

impl Engine {
    /// Loads the model (blocking: seconds to minutes), opens the score store if `store`
    /// names one, and starts the batcher. A store file in use, unreadable or of another
    /// model is refused (checked before the model loads where it can be).
    pub fn load(
        model: &Path,
        adapter: Option<&Path>,
        device: &str,
        dtype: &str,
        limits: &LimitArgs,
        store: &StoreArgs,
    ) -> Result<Engine> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype)?;
        let max_store_bytes = store.max_bytes().map_err(|e| anyhow::anyhow!(e))?;
        let opened = match &store.score_store {
            Some(path) => Some(OpenedStore::open(path, store.score_store_reset)?),
            None => None,
        };
        let started = std::time::Instant::now();
        let mut loaded = load_model(model, Mode::Frozen, dtype, &device)
            .with_context(|| format!("cannot load the reference model {}", model.display()))?;
        if let Some(dir) = adapter {
            loaded = with_adapter(loaded, dir, dtype, &device)?;
        }
        let cfg = loaded.model.config().clone();
        let limits = limits
            .resolve(cfg.max_position_embeddings)
            .map_err(|e| anyhow::anyhow!("invalid limits: {e}"))?;
        let num_parameters: usize = loaded.model.params().iter().map(|(_, t)| t.elem_count()).sum();
        let info = v1::ModelInfoResponse {
            architecture: "llama".into(),
            vocab_size: cfg.vocab_size as u32,
            max_sequence_length: cfg.max_position_embeddings as u32,
            dtype: torch_dtype_name(loaded.model.dtype()).into(),
            device: device_name(&device),
            fingerprint: loaded.fingerprint.clone(),
            source: loaded.source.display().to_string(),
            eos_token_id: loaded.tokenizer.eos_id(),
            bos_token_id: loaded.tokenizer.bos_id(),
            adds_bos: loaded.tokenizer.adds_bos(),
            num_parameters: num_parameters as u64,
            max_tokens_per_item: limits.max_tokens_per_item as u32,
            max_tokens_per_request: limits.max_tokens_per_request as u32,
            max_items_per_request: limits.max_items_per_request as u32,
            max_message_bytes: limits.max_message_bytes as u64,
            batch_token_budget: limits.batch_token_budget as u32,
            // Filled in as of each call (`model_info`).
            score_store: None,
        };
        // After the fingerprint and the parameter count, which read the dense weights.
        let packed = loaded.model.pack_for_inference()?;
        tracing::info!(
            source = %info.source,
            fingerprint = %info.fingerprint,
            device = %info.device,
            dtype = %info.dtype,
            parameters = num_parameters,
            packed_for_cpu = packed,
            "model loaded in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        let plan = Plan {
            budget: limits.batch_token_budget,
            min_fill: limits.min_batch_fill,
            prefix_min_tokens: limits.prefix_cache_min_tokens,
        };
        let (stats, store) = match opened {
            None => (ScoreStats::without_store(), None),
            Some(opened) => {
                let db = opened.for_model(&info.fingerprint, max_store_bytes)?;
                let stats =
                    ScoreStats::with_store(db.path().display().to_string(), max_store_bytes);
                let size = db.size()?;
                stats.set_size(size.entries, size.bytes);
                tracing::info!(
                    path = %db.path().display(),
                    entries = size.entries,
                    bytes = size.bytes,
                    max_bytes = max_store_bytes,
                    "score store open"
                );
                let keys = KeyContext::new(&info.fingerprint, &info.dtype, &info.device);
                (stats, Some(StoreState { db: Arc::new(db), keys, flights: Arc::default() }))
            }
        };
        let score_delay = std::env::var(SCORE_DELAY_ENV)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis);
        let model = Arc::new(loaded.model);
        let batcher = Batcher::spawn(Arc::clone(&model), plan, limits.max_queued_tokens);
        Ok(Engine {
            info,
            model,
            generation: Arc::new(tokio::sync::Semaphore::new(1)),
            tokenizer: loaded.tokenizer,
            vocab_size: cfg.vocab_size,
            limits,
            batcher,
            stats: Arc::new(stats),
            store,
            score_delay,
        })
    }

    /// The model, the limits and the scoring counters as of now.
    pub fn model_info(&self) -> v1::ModelInfoResponse {
        v1::ModelInfoResponse {
            score_store: Some(self.stats.snapshot().into()),
            ..self.info.clone()
        }
    }

    /// The model's fingerprint (every answer names it).
    pub fn fingerprint(&self) -> &str {
        &self.info.fingerprint
    }

    /// The scoring counters (store hits and misses, forward tokens), live.
    pub fn score_stats(&self) -> &Arc<ScoreStats> {
        &self.stats
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn tokenizer(&self) -> &LlamaTokenizer {
        &self.tokenizer
    }

    /// Starts generating for `req` and returns the stream of its messages (see the proto):
    /// token deltas as they are chosen, then one message with the finish reason and the
    /// whole output. The client going away cancels the generation.
    pub async fn generate(
        self: &Arc<Self>,
        req: v1::GenerateRequest,
    ) -> Result<mpsc::Receiver<Result<v1::GenerateResponse, tonic::Status>>, ScoreError> {
        let template = template_of(req.template)
            .ok_or_else(|| Invalid(format!("unknown template {}", req.template)))?;
        let params = GenerateParams {
            max_new_tokens: if req.max_new_tokens == 0 { 256 } else { req.max_new_tokens as usize },
            temperature: req.temperature as f64,
            top_p: if req.top_p == 0.0 { 1.0 } else { req.top_p as f64 },
            seed: req.seed,
            stop: req.stop,
            stop_at_eos: true,
        };
        params.validate().map_err(|e| Invalid(e.to_string()))?;
        let prompt = self
            .tokenizer
            .encode_prompt(&template.format_prompt(&req.prompt))
            .map_err(|e| Invalid(format!("the prompt: {e}")))?;
        let limit = self.limits.max_tokens_per_item;
        if prompt.is_empty() || prompt.len() + params.max_new_tokens > limit {
            return Err(Invalid(format!(
                "the prompt's {} tokens plus max_new_tokens {} exceed max_tokens_per_item {limit} \
                 (or the prompt is empty)",
                prompt.len(),
                params.max_new_tokens
            ))
            .into());
        }
        let permit = Arc::clone(&self.generation)
            .acquire_owned()
            .await
            .map_err(|_| Invalid("the server is shutting down".into()))?;
        let (tx, rx) = mpsc::channel(64);
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let (mut ids, mut sent) = (Vec::new(), 0usize);
            let result =
                generate_with(&this.model, &this.tokenizer, &[prompt], &params, |_, id| {
                    ids.push(id);
                    // Send the newly decoded text once it is whole (no half character).
                    let text = this.tokenizer.decode(&ids, true).unwrap_or_default();
                    let delta = if text.len() > sent
                        && text.is_char_boundary(sent)
                        && !text.ends_with('\u{FFFD}')
                    {
                        let d = text[sent..].to_string();
                        sent = text.len();
                        d
                    } else {
                        String::new()
                    };
                    let msg = v1::GenerateResponse {
                        text: delta,
                        token_ids: vec![id],
                        ..Default::default()
                    };
                    tx.blocking_send(Ok(msg)).is_ok()
                });
            let last = match result {
                Ok(mut g) => {
                    let g = g.remove(0);
                    Ok(v1::GenerateResponse {
                        finish_reason: g.finish.as_str().into(),
                        full_text: g.text,
                        ..Default::default()
                    })
                }
                Err(e) => Err(tonic::Status::internal(format!("generation failed: {e}"))),
            };
            let _ = tx.blocking_send(last);
        });
        Ok(rx)
    }

    /// Validates and scores one request; results in request order.
    pub async fn score(
        self: &Arc<Self>,
        req: v1::ScoreRequest,
    ) -> Result<v1::ScoreResponse, ScoreError> {
        // Tokenizing text is CPU work: keep it off the async workers.
        let this = Arc::clone(self);
        let prepared = tokio::task::spawn_blocking(move || {
            Validator {
                tokenizer: &this.tokenizer,
                vocab_size: this.vocab_size,
                limits: &this.limits,
            }
            .prepare(&req)
        })
        .await
        .map_err(|e| Invalid(format!("validation failed unexpectedly: {e}")))??;
        let scores = match &self.store {
            None => {
                let scores = self.forward(&prepared.seqs, &prepared.responses_per_item).await?;
                self.stats.add_misses(scores.len());
                scores
            }
            Some(store) => self.score_through_store(store, &prepared).await?,
        };
        let mut scores = scores.into_iter();
        let items = prepared
            .responses_per_item
            .iter()
            .map(|&n| v1::ItemScore {
                responses: scores
                    .by_ref()
                    .take(n)
                    .map(|s| v1::ResponseScore {
                        logprob: s.logprob,
                        tokens: s.per_token.len() as u32,
                        token_logprobs: if prepared.per_token { s.per_token } else { vec![] },
                    })
                    .collect(),
            })
            .collect();
        Ok(v1::ScoreResponse { request_id: prepared.request_id, items, error: None })
    }

    /// Scores `seqs` (`per_item` of them per item, in order) with forward passes: a pair's
    /// prompt is computed once, its two responses sharing one row.
    async fn forward(
        &self,
        seqs: &[Sequence],
        per_item: &[usize],
    ) -> Result<Vec<Scored>, BatchError> {
        let rows = item_rows(seqs, per_item, self.limits.batch_token_budget);
        let tokens = rows.iter().map(|r| r.row_len()).sum();
        if let Some(delay) = self.score_delay {
            tokio::time::sleep(delay).await;
        }
        let scores = self.batcher.score(rows).await?;
        self.stats.add_forward_tokens(tokens);
        Ok(scores)
    }

    /// The scores of `p`'s sequences, through the store: each distinct response is led
    /// (looked up, computed if missing) by this request or waited for if another request
    /// leads it; a key whose leader went away without a result is claimed again.
    async fn score_through_store(
        &self,
        store: &StoreState,
        p: &Prepared,
    ) -> Result<Vec<Scored>, ScoreError> {
        let keys: Vec<ScoreKey> = p
            .seqs
            .iter()
            .map(|s| {
                let (prompt, response) = s.ids.split_at(s.response_start);
                store.keys.key(prompt, response)
            })
            .collect();
        let mut found: HashMap<ScoreKey, Scored> = HashMap::with_capacity(keys.len());
        let mut seen = HashSet::with_capacity(keys.len());
        let mut pending: Vec<ScoreKey> = keys.iter().copied().filter(|k| seen.insert(*k)).collect();
        while !pending.is_empty() {
            let (leading, waits) = store.flights.claim(&pending);
            self.lead(store, p, &keys, &leading, &mut found).await?;
            // Released only now: the store has the scores for whoever comes next.
            drop(leading);
            pending.clear();
            let mut waited = 0;
            for w in waits {
                let key = w.key;
                match w.wait().await {
                    Waited::Done(s) => {
                        found.insert(key, s);
                        waited += 1;
                    }
                    Waited::Failed(e) => return Err(e.into()),
                    Waited::Abandoned => pending.push(key),
                }
            }
            self.stats.add_single_flight_waits(waited);
        }
        Ok(keys.iter().map(|k| found[k].clone()).collect())
    }

    /// The keys `leading` leads: looked up in the store, the misses scored, every outcome
    /// published to the waiters, and hits and misses recorded in one write transaction. A
    /// store that fails at run time costs only its benefit: the request is computed, and
    /// the failure logged.
    async fn lead(
        &self,
        store: &StoreState,
        p: &Prepared,
        keys: &[ScoreKey],
        leading: &Leading,
        found: &mut HashMap<ScoreKey, Scored>,
    ) -> Result<(), ScoreError> {
        let mut seen = HashSet::new();
        let led: Vec<ScoreKey> =
            keys.iter().copied().filter(|k| leading.leads(k) && seen.insert(*k)).collect();
        if led.is_empty() {
            return Ok(());
        }
        let db = Arc::clone(&store.db);
        let wanted = led.clone();
        let looked_up = match tokio::task::spawn_blocking(move || db.lookup(&wanted)).await {
            Ok(Ok(scores)) => scores,
            Ok(Err(e)) => {
                tracing::error!("{e}; computing the request instead");
                vec![None; led.len()]
            }
            Err(e) => {
                tracing::error!("score store lookup failed: {e}; computing the request instead");
                vec![None; led.len()]
            }
        };
        let mut hits = Vec::new();
        let mut misses = HashSet::new();
        for (key, score) in led.into_iter().zip(looked_up) {
            match score {
                Some(score) => {
                    leading.publish(&key, &score);
                    found.insert(key, score);
                    hits.push(key);
                }
                None => {
                    misses.insert(key);
                }
            }
        }
        self.stats.add_hits(hits.len());

        // The misses' sequences (each distinct response once), still grouped by item so
        // that a pair whose two responses missed is one row.
        let (mut seqs, mut per_item, mut order) = (Vec::new(), Vec::new(), Vec::new());
        let mut sequences = p.seqs.iter().zip(keys);
        for &n in &p.responses_per_item {
            let before = seqs.len();
            for (seq, key) in sequences.by_ref().take(n) {
                if misses.remove(key) {
                    seqs.push(seq.clone());
                    order.push(*key);
                }
            }
            per_item.push(seqs.len() - before);
        }
        let computed = if seqs.is_empty() {
            vec![]
        } else {
            match self.forward(&seqs, &per_item).await {
                Ok(scores) => scores,
                Err(e) => {
                    leading.fail(&e);
                    return Err(e.into());
                }
            }
        };
        self.stats.add_misses(order.len());
        let new: Vec<(ScoreKey, Scored)> = order.into_iter().zip(computed).collect();
        for (key, score) in &new {
            leading.publish(key, score);
            found.insert(*key, score.clone());
        }

        let db = Arc::clone(&store.db);
        let recorded = tokio::task::spawn_blocking(move || {
            let new: Vec<(ScoreKey, &Scored)> = new.iter().map(|(k, s)| (*k, s)).collect();
            db.record(&hits, &new)
        })
        .await;
        match recorded {
            Ok(Ok(r)) => {
                self.stats.set_size(r.size.entries, r.size.bytes);
                self.stats.add_evictions(r.evicted);
            }
            Ok(Err(e)) => tracing::error!("{e}; these scores were not stored"),
            Err(e) => {
                tracing::error!("score store write failed: {e}; these scores were not stored")
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use dpo_common::testing::{write_tiny_checkpoint, TinySpec};

    fn load(model: &Path, store: Option<&Path>) -> Arc<Engine> {
        let store = StoreArgs { score_store: store.map(Path::to_path_buf), ..StoreArgs::none() };
        Arc::new(
            Engine::load(model, None, "cpu", "f32", &LimitArgs::default_for_cli(), &store).unwrap(),
        )
    }

    fn pair(prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> v1::ScoreItem {
        v1::ScoreItem {
            input: Some(v1::score_item::Input::Tokens(v1::TokenInput {
                prompt_ids: prompt.to_vec(),
                responses: [chosen, rejected]
                    .iter()
                    .map(|r| v1::TokenIds { ids: r.to_vec() })
                    .collect(),
            })),
        }
    }

    /// Three pairs; the second and third share their rejected response (one key).
    fn request(per_token: bool) -> v1::ScoreRequest {
        v1::ScoreRequest {
            items: vec![
                pair(&[256, 5, 6, 7], &[8, 9, 257], &[10, 257]),
                pair(&[256, 11, 12], &[13, 257], &[14, 15, 16, 257]),
                pair(&[256, 11, 12], &[17, 257], &[14, 15, 16, 257]),
            ],
            per_token,
            request_id: 1,
        }
    }

    fn bits(r: &v1::ScoreResponse) -> Vec<(u64, Vec<u32>)> {
        r.items
            .iter()
            .flat_map(|i| &i.responses)
            .map(|s| (s.logprob.to_bits(), s.token_logprobs.iter().map(|x| x.to_bits()).collect()))
            .collect()
    }

    fn stats(e: &Engine) -> crate::store::ScoreStatsSnapshot {
        e.score_stats().snapshot()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hit_answers_bit_for_bit_without_a_forward_pass() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny");
        write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
        let path = dir.path().join("scores.redb");
        let engine = load(&model, Some(&path));
        let first = engine.score(request(true)).await.unwrap();
        let s = stats(&engine);
        assert_eq!((s.hits, s.misses, s.entries), (0, 5, 5), "{s:?}");
        assert!(s.forward_tokens > 0);
        let forward_tokens = s.forward_tokens;

        let again = engine.score(request(true)).await.unwrap();
        assert_eq!(bits(&again), bits(&first));
        // A per-token request and a plain one are answered by the same entries.
        let plain = engine.score(request(false)).await.unwrap();
        let sums: Vec<u64> =
            plain.items.iter().flat_map(|i| &i.responses).map(|r| r.logprob.to_bits()).collect();
        assert_eq!(sums, bits(&first).iter().map(|b| b.0).collect::<Vec<_>>());
        let s = stats(&engine);
        assert_eq!((s.hits, s.misses, s.forward_tokens), (10, 5, forward_tokens), "{s:?}");
        let info = engine.model_info().score_store.unwrap();
        assert!(info.enabled && info.path.ends_with("scores.redb") && info.hits == 10);

        // After a restart on the same file: still hits, the same bits.
        drop(engine);
        let engine = load(&model, Some(&path));
        assert_eq!(bits(&engine.score(request(true)).await.unwrap()), bits(&first));
        let s = stats(&engine);
        assert_eq!((s.hits, s.misses, s.forward_tokens, s.entries), (5, 0, 0, 5), "{s:?}");

        // Without a store: nothing is stored, every request is computed.
        let plain = load(&model, None);
        plain.score(request(false)).await.unwrap();
        let once = stats(&plain).forward_tokens;
        // Above the store's count: the shared response is computed in both its items.
        assert!(once > forward_tokens, "{once} vs {forward_tokens}");
        plain.score(request(false)).await.unwrap();
        let s = stats(&plain);
        assert_eq!((s.store_path, s.hits, s.misses), (None, 0, 12));
        assert_eq!(s.forward_tokens, 2 * once);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_compute_each_response_once() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny");
        write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
        let engine = load(&model, Some(&dir.path().join("scores.redb")));
        let requests: Vec<_> = (0..6)
            .map(|_| {
                let e = Arc::clone(&engine);
                tokio::spawn(async move { e.score(request(false)).await.unwrap() })
            })
            .collect();
        let mut answers = Vec::new();
        for r in requests {
            answers.push(bits(&r.await.unwrap()));
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "every request got the same scores");
        let s = stats(&engine);
        assert_eq!(s.misses, 5, "each distinct response computed once: {s:?}");
        assert_eq!(s.hits + s.single_flight_waits, 25, "{s:?}");
        assert!(engine.store.as_ref().unwrap().flights.is_empty(), "every key released");
    }
}
