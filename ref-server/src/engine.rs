//! The scoring engine: the loaded model's metadata and tokenizer, the limits, and the
//! [`Batcher`] that owns the model. `score` is validate → batch → answer; the gRPC service
//! and the local `ref-server score --model` both go through it, so they give the same
//! numbers by construction.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use dpo_common::device::{device_name, parse_device};
use dpo_common::generate::{generate_with, GenerateParams};
use dpo_common::model::load::{load_model, parse_dtype, torch_dtype_name};
use dpo_common::model::{Llama, Mode};
use dpo_common::tokenizer::LlamaTokenizer;
use dpo_proto::v1;
use tokio::sync::mpsc;

use crate::batcher::{item_rows, BatchError, Batcher, Plan};
use crate::config::{LimitArgs, Limits};
use crate::validation::{template_of, Invalid, Validator};

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
}

impl Engine {
    /// Loads the model (blocking: seconds to minutes) and starts the batcher.
    pub fn load(model: &Path, device: &str, dtype: &str, limits: &LimitArgs) -> Result<Engine> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype)?;
        let started = std::time::Instant::now();
        let mut loaded = load_model(model, Mode::Frozen, dtype, &device)
            .with_context(|| format!("cannot load the reference model {}", model.display()))?;
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
        })
    }

    pub fn model_info(&self) -> &v1::ModelInfoResponse {
        &self.info
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
        // A pair's prompt is computed once: its two responses share one row.
        let rows =
            item_rows(&prepared.seqs, &prepared.responses_per_item, self.limits.batch_token_budget);
        let scores = self.batcher.score(rows).await?;
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
}
