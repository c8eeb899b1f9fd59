//! Response log-probabilities: the quantity DPO is built from, computed one way for the
//! reference server and the policy trainer alike.
//!
//! For a sequence `ids` whose response starts at `response_start`, the log-probability of
//! the response is `Σ_{p = response_start}^{len-1} log P(ids[p] | ids[..p])`: prompt tokens
//! are context only. Only the positions that predict response tokens go through the output
//! projection, and the log-softmax runs in f32 whatever the weights' dtype.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{ops, Llama};

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
}

impl ResponseLogProbs {
    pub fn sums_vec(&self) -> Result<Vec<f64>> {
        Ok(self.sums.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
    }

    /// Per-token values split per sequence.
    pub fn per_token_vecs(&self) -> Result<Vec<Vec<f32>>> {
        let all = self.per_token.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(self.counts.len());
        let mut off = 0;
        for &c in &self.counts {
            out.push(all[off..off + c].to_vec());
            off += c;
        }
        Ok(out)
    }
}

/// A batch of sequences laid out for response log-probs: right-padded ids, the flattened
/// `[B*T]` positions whose logits predict a response token, those tokens, and the 0/1
/// membership matrix that sums each sequence's tokens. Built once here for the plain
/// forward and for `model::recompute`.
pub(crate) struct ResponseBatch {
    /// [B, T], padded with token 0: any valid id does, since no real position attends to it.
    pub ids: Tensor,
    /// [N] rows of the flattened `[B*T]` hidden states that predict a response token.
    pub rows: Tensor,
    /// [N] the response tokens they predict.
    pub targets: Tensor,
    /// [B, N] f32: 1 where token n belongs to sequence b.
    pub member: Tensor,
    /// Response tokens per sequence.
    pub counts: Vec<usize>,
}

/// Validates `seqs` against the model and lays them out as a [`ResponseBatch`].
pub(crate) fn response_batch(model: &Llama, seqs: &[Sequence]) -> Result<ResponseBatch> {
    if seqs.is_empty() {
        return Err(Error::Input("empty batch".into()));
    }
    let cfg = model.config();
    for (i, s) in seqs.iter().enumerate() {
        s.validate(cfg.vocab_size, cfg.max_position_embeddings)
            .map_err(|e| Error::Input(format!("sequence {i}: {e}")))?;
    }
    let device = model.device();
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut ids = vec![0u32; b * t];
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut counts = Vec::with_capacity(b);
    for (i, s) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.ids.len()].copy_from_slice(&s.ids);
        for p in s.response_start..s.ids.len() {
            rows.push((i * t + p - 1) as u32);
            targets.push(s.ids[p]);
        }
        counts.push(s.response_len());
    }
    let n = rows.len();
    // Segment sums as one matmul with a 0/1 membership matrix [B, N].
    let mut member = vec![0f32; b * n];
    let mut off = 0;
    for (i, &c) in counts.iter().enumerate() {
        member[i * n + off..i * n + off + c].iter_mut().for_each(|m| *m = 1.0);
        off += c;
    }
    Ok(ResponseBatch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        rows: Tensor::from_vec(rows, n, device)?,
        targets: Tensor::from_vec(targets, n, device)?,
        member: Tensor::from_vec(member, (b, n), device)?,
        counts,
    })
}

/// Computes the response log-probs of `seqs` in one right-padded forward pass.
pub fn response_logprobs(model: &Llama, seqs: &[Sequence]) -> Result<ResponseLogProbs> {
    let batch = response_batch(model, seqs)?;
    let (b, t) = batch.ids.dims2()?;
    let hidden = model.hidden_states(&batch.ids)?.reshape((b * t, model.config().hidden_size))?;
    let hidden = hidden.index_select(&batch.rows, 0)?;
    let logits = model.logits(&hidden)?; // [N, V]
    let per_token = ops::target_logprob(&logits, &batch.targets)?;
    let member = batch.member.to_dtype(per_token.dtype())?;
    let sums = member.matmul(&per_token.unsqueeze(1)?)?.squeeze(1)?;
    Ok(ResponseLogProbs { sums, per_token, counts: batch.counts })
}
