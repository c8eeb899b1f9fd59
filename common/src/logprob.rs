//! Response log-probabilities: the quantity DPO is built from, computed one way for the
//! reference server and the policy trainer alike.
//!
//! For a sequence `ids` whose response starts at `response_start`, the log-probability of
//! the response is `Σ_{p = response_start}^{len-1} log P(ids[p] | ids[..p])`: prompt tokens
//! are context only. Only the positions that predict response tokens go through the output
//! projection, and the log-softmax runs in f32 whatever the weights' dtype.
//!
//! The policy's passes (the trainer's, [`shared_prompt_logprobs_and_logits`] and
//! [`prefixed_logprobs_and_logits`]) also sum, per response, the mean logit over the
//! vocabulary at each of those positions: what Hugging Face TRL reports as `logits/chosen` and
//! `logits/rejected`, taken from the logits the log-probs are computed from.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::{at_least_f32, ops, Llama, PrefixKv, TokenLayout};

/// A tokenized (prompt, response) sequence.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Index of the first response token; everything before it is prompt.
    pub response_start: usize,
}

/// A tokenized (prompt, response) pair is exactly what gets scored.
impl From<crate::tokenizer::Encoded> for Sequence {
    fn from(e: crate::tokenizer::Encoded) -> Self {
        Sequence { ids: e.ids, response_start: e.response_start }
    }
}

impl Sequence {
    pub fn response_len(&self) -> usize {
        self.ids.len().saturating_sub(self.response_start)
    }

    /// Checks what the forward pass needs, naming the violated limit.
    pub fn validate(&self, vocab_size: usize, max_len: usize) -> Result<()> {
        if self.response_start == 0 {
            return Err(Error::Input(
                "the prompt is empty: the first response token has no context to be predicted \
                 from (response_start must be at least 1)"
                    .into(),
            ));
        }
        if self.response_start >= self.ids.len() {
            return Err(Error::Input(format!(
                "no response tokens (response_start {} with {} tokens in all)",
                self.response_start,
                self.ids.len()
            )));
        }
        if self.ids.len() > max_len {
            return Err(Error::Input(format!(
                "{} tokens exceed the maximum sequence length of {max_len}",
                self.ids.len()
            )));
        }
        if let Some((i, id)) =
            self.ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab_size)
        {
            return Err(Error::Input(format!(
                "token id {id} at position {i} is out of range for a vocabulary of {vocab_size}"
            )));
        }
        Ok(())
    }
}

/// Log-probs of a batch of responses. In trainable mode the tensors carry the autograd graph.
pub struct ResponseLogProbs {
    /// Summed response log-prob per sequence: [B], f32 (f64 for an f64 model).
    pub sums: Tensor,
    /// Per-token log-probs of all responses, concatenated in batch order: [Σ counts], f32.
    pub per_token: Tensor,
    /// Number of response tokens of each sequence.
    pub counts: Vec<usize>,
    /// Per response: Σ over the positions that predict its tokens of the mean of the logits
    /// over the vocabulary, [B], f32 (f64 for an f64 model), no graph. TRL's `logits/chosen`
    /// for a batch is the chosen responses' sum of these over the sum of their `counts`.
    /// Computed by the policy's passes only (`None` from [`shared_prompt_logprobs`],
    /// [`prefixed_logprobs`] and [`response_logprobs`], which the reference server uses).
    pub mean_logit_sums: Option<Tensor>,
}

impl ResponseLogProbs {
    pub fn sums_vec(&self) -> Result<Vec<f64>> {
        Ok(self.sums.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }

    /// [`ResponseLogProbs::mean_logit_sums`] as numbers, when the pass computed them.
    pub fn mean_logit_sums_vec(&self) -> Result<Option<Vec<f64>>> {
        match &self.mean_logit_sums {
            Some(t) => Ok(Some(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)),
            None => Ok(None),
        }
    }

    /// Per-token values split per sequence.
    pub fn per_token_vecs(&self) -> Result<Vec<Vec<f32>>> {
        let all = self.per_token.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(self.counts.len());
        let mut off = 0;
        for &c in &self.counts {
            out.push(all[off..off + c].to_vec());
            off += c;
        }
        Ok(out)
    }
}

/// A prompt with several responses (typically chosen and rejected), scored in one row: the
/// prompt goes through the model once, and each response attends to the prompt and to
/// itself only, at the positions it would have on its own. The log-probs are those of the
/// separate sequences `prompt ++ response` (up to float rounding).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedPrompt {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
}

impl SharedPrompt {
    /// Tokens in the row: the prompt once plus every response.
    pub fn row_len(&self) -> usize {
        self.prompt.len() + self.responses.iter().map(Vec::len).sum::<usize>()
    }

    /// Checks what the forward pass needs, naming the violated limit.
    pub fn validate(&self, vocab_size: usize, max_len: usize) -> Result<()> {
        if self.responses.is_empty() {
            return Err(Error::Input("a shared prompt without responses".into()));
        }
        for (j, r) in self.responses.iter().enumerate() {
            let seq = Sequence {
                ids: [self.prompt.as_slice(), r.as_slice()].concat(),
                response_start: self.prompt.len(),
            };
            seq.validate(vocab_size, max_len)
                .map_err(|e| Error::Input(format!("response {j}: {e}")))?;
        }
        Ok(())
    }
}

impl From<&Sequence> for SharedPrompt {
    fn from(s: &Sequence) -> Self {
        SharedPrompt {
            prompt: s.ids[..s.response_start].to_vec(),
            responses: vec![s.ids[s.response_start..].to_vec()],
        }
    }
}

/// A batch laid out for response log-probs: right-padded ids (one row per prompt), how the
/// tokens relate, the flattened `[B*T]` positions whose logits predict a response token,
/// those tokens, and the 0/1 membership matrix that sums each response's tokens. Built once
/// here for the plain forward and `model::backward`.
pub(crate) struct ResponseBatch {
    /// [B, T], padded with token 0: any valid id does, since no real position attends to it.
    pub ids: Tensor,
    /// `None` when every row is a single sequence (plain causal attention).
    pub layout: Option<TokenLayout>,
    /// [N] rows of the flattened `[B*T]` hidden states that predict a response token.
    pub rows: Tensor,
    /// [N] the response tokens they predict.
    pub targets: Tensor,
    /// [R, N] f32: 1 where token n belongs to response r.
    pub member: Tensor,
    /// Response tokens per response.
    pub counts: Vec<usize>,
}

/// Validates `seqs` against the model and lays them out as a [`ResponseBatch`], one
/// sequence per row.
pub(crate) fn response_batch(model: &Llama, seqs: &[Sequence]) -> Result<ResponseBatch> {
    if seqs.is_empty() {
        return Err(Error::Input("empty batch".into()));
    }
    let cfg = model.config();
    for (i, s) in seqs.iter().enumerate() {
        s.validate(cfg.vocab_size, cfg.max_position_embeddings)
            .map_err(|e| Error::Input(format!("sequence {i}: {e}")))?;
    }
    let groups: Vec<SharedPrompt> = seqs.iter().map(SharedPrompt::from).collect();
    layout_batch(model, &groups, 0)
}

/// Validates `groups` against the model and lays them out as a [`ResponseBatch`], one
/// prompt and its responses per row.
pub(crate) fn shared_prompt_batch(model: &Llama, groups: &[SharedPrompt]) -> Result<ResponseBatch> {
    validate_groups(model, groups)?;
    layout_batch(model, groups, 0)
}

/// Checks a non-empty batch of groups against the model's vocabulary and length limit,
/// naming the first bad prompt.
pub(crate) fn validate_groups(model: &Llama, groups: &[SharedPrompt]) -> Result<()> {
    if groups.is_empty() {
        return Err(Error::Input("empty batch".into()));
    }
    let cfg = model.config();
    for (i, g) in groups.iter().enumerate() {
        g.validate(cfg.vocab_size, cfg.max_position_embeddings)
            .map_err(|e| Error::Input(format!("prompt {i}: {e}")))?;
    }
    Ok(())
}

/// Lays `groups` out with the first `prefix_len` tokens of every prompt left out (they are
/// a precomputed prefix's): positions still count them.
fn layout_batch(
    model: &Llama,
    groups: &[SharedPrompt],
    prefix_len: usize,
) -> Result<ResponseBatch> {
    let device = model.device();
    let b = groups.len();
    let t = groups.iter().map(|g| g.row_len() - prefix_len).max().unwrap_or(0);
    let branched = prefix_len > 0 || groups.iter().any(|g| g.responses.len() > 1);
    let mut ids = vec![0u32; b * t];
    // Pads sit in a branch of their own, at position 0: never attended to by real tokens.
    let mut layout = TokenLayout { positions: vec![0; b * t], branches: vec![u32::MAX; b * t] };
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut counts = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let base = i * t;
        let p = g.prompt.len();
        let rest = &g.prompt[prefix_len..];
        ids[base..base + rest.len()].copy_from_slice(rest);
        for k in 0..rest.len() {
            layout.positions[base + k] = (prefix_len + k) as u32;
            layout.branches[base + k] = 0;
        }
        let mut start = base + rest.len();
        for (j, r) in g.responses.iter().enumerate() {
            ids[start..start + r.len()].copy_from_slice(r);
            for (k, &tok) in r.iter().enumerate() {
                layout.positions[start + k] = (p + k) as u32;
                layout.branches[start + k] = j as u32 + 1;
                // The first response token is predicted by the prompt's last token; the
                // others by the response token before them.
                let from = if k == 0 { base + rest.len() - 1 } else { start + k - 1 };
                rows.push(from as u32);
                targets.push(tok);
            }
            counts.push(r.len());
            start += r.len();
        }
    }
    let n = rows.len();
    let r = counts.len();
    // Segment sums as one matmul with a 0/1 membership matrix [R, N].
    let mut member = vec![0f32; r * n];
    let mut off = 0;
    for (i, &c) in counts.iter().enumerate() {
        member[i * n + off..i * n + off + c].iter_mut().for_each(|m| *m = 1.0);
        off += c;
    }
    Ok(ResponseBatch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        layout: branched.then_some(layout),
        rows: Tensor::from_vec(rows, n, device)?,
        targets: Tensor::from_vec(targets, n, device)?,
        member: Tensor::from_vec(member, (r, n), device)?,
        counts,
    })
}

/// Whether a pass also computes [`ResponseLogProbs::mean_logit_sums`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MeanLogits {
    Skip,
    Sum,
}

/// Computes the response log-probs of `seqs` in one right-padded forward pass.
pub fn response_logprobs(model: &Llama, seqs: &[Sequence]) -> Result<ResponseLogProbs> {
    batch_logprobs(model, response_batch(model, seqs)?, None, MeanLogits::Skip)
}

/// Computes the log-probs of every response of `groups`, in order (group 0's responses,
/// then group 1's, ...), in one forward pass where each prompt is computed once.
pub fn shared_prompt_logprobs(model: &Llama, groups: &[SharedPrompt]) -> Result<ResponseLogProbs> {
    batch_logprobs(model, shared_prompt_batch(model, groups)?, None, MeanLogits::Skip)
}

/// [`shared_prompt_logprobs`] with [`ResponseLogProbs::mean_logit_sums`].
pub fn shared_prompt_logprobs_and_logits(
    model: &Llama,
    groups: &[SharedPrompt],
) -> Result<ResponseLogProbs> {
    batch_logprobs(model, shared_prompt_batch(model, groups)?, None, MeanLogits::Sum)
}

/// [`shared_prompt_logprobs`] for prompts that all start with `prefix`, whose keys and
/// values are taken as computed instead of being recomputed for every row. Each prompt
/// must have at least one token after the prefix (the one that predicts the first response
/// token).
pub fn prefixed_logprobs(
    model: &Llama,
    groups: &[SharedPrompt],
    prefix: &PrefixKv,
) -> Result<ResponseLogProbs> {
    batch_logprobs(model, prefixed_batch(model, groups, prefix)?, Some(prefix), MeanLogits::Skip)
}

/// [`prefixed_logprobs`] with [`ResponseLogProbs::mean_logit_sums`].
pub fn prefixed_logprobs_and_logits(
    model: &Llama,
    groups: &[SharedPrompt],
    prefix: &PrefixKv,
) -> Result<ResponseLogProbs> {
    batch_logprobs(model, prefixed_batch(model, groups, prefix)?, Some(prefix), MeanLogits::Sum)
}

/// Validates `groups` against the model and `prefix` and lays out what follows the prefix
/// as a [`ResponseBatch`].
pub(crate) fn prefixed_batch(
    model: &Llama,
    groups: &[SharedPrompt],
    prefix: &PrefixKv,
) -> Result<ResponseBatch> {
    validate_groups(model, groups)?;
    for (i, g) in groups.iter().enumerate() {
        if !g.prompt.starts_with(prefix.ids()) || g.prompt.len() <= prefix.len() {
            return Err(Error::Input(format!(
                "prompt {i} ({} tokens) does not extend the {}-token prefix",
                g.prompt.len(),
                prefix.len()
            )));
        }
    }
    layout_batch(model, groups, prefix.len())
}

fn batch_logprobs(
    model: &Llama,
    batch: ResponseBatch,
    prefix: Option<&PrefixKv>,
    mean_logits: MeanLogits,
) -> Result<ResponseLogProbs> {
    ops::on_compute_pool(|| batch_logprobs_here(model, batch, prefix, mean_logits))
}

fn batch_logprobs_here(
    model: &Llama,
    batch: ResponseBatch,
    prefix: Option<&PrefixKv>,
    mean_logits: MeanLogits,
) -> Result<ResponseLogProbs> {
    let (b, t) = batch.ids.dims2()?;
    let hidden = model
        .hidden_states_after_prefix(&batch.ids, batch.layout.as_ref(), prefix)?
        .reshape((b * t, model.config().hidden_size))?;
    let hidden = hidden.index_select(&batch.rows, 0)?;
    let logits = model.logits(&hidden)?; // [N, V]
    response_scores(&logits, &batch, mean_logits)
}

/// The log-probs of `batch`'s responses from the logits `[N, V]` of the positions that predict
/// their tokens, and [`ResponseLogProbs::mean_logit_sums`] if asked. Shared by the plain
/// forward and `model::backward`.
pub(crate) fn response_scores(
    logits: &Tensor,
    batch: &ResponseBatch,
    mean_logits: MeanLogits,
) -> Result<ResponseLogProbs> {
    // The log-softmax reads the logits in f32 (f64 stays f64); the same copy serves the
    // mean, so it is made once either way.
    let logits = logits.to_dtype(at_least_f32(logits.dtype()))?;
    let per_token = ops::target_logprob(&logits, &batch.targets)?;
    let member = batch.member.to_dtype(per_token.dtype())?;
    let segment_sums = |per_position: &Tensor| -> Result<Tensor> {
        Ok(member.matmul(&per_position.unsqueeze(1)?)?.squeeze(1)?)
    };
    let sums = segment_sums(&per_token)?;
    let mean_logit_sums = match mean_logits {
        MeanLogits::Skip => None,
        MeanLogits::Sum => {
            // One reduction per position over the vocabulary (TRL's `mean_logits`); a metric,
            // so outside any autograd graph.
            let vocab = logits.dim(1)? as f64;
            Some(segment_sums(&(logits.detach().sum(1)? / vocab)?)?)
        }
    };
    Ok(ResponseLogProbs { sums, per_token, counts: batch.counts.clone(), mean_logit_sums })
}
