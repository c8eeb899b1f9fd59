//! Text generation on the frozen Llama with a key/value cache: greedy or temperature/top-p
//! sampling (seeded, reproducible), stop sequences matched on the decoded text, EOS, a
//! maximum number of new tokens, and batches of prompts.
//!
//! Batches are **left-padded**: every prompt ends in the last column, so one decode step
//! feeds one new token per row. Each row has its own RoPE positions (a pad-free prompt
//! starts at 0 whatever its padding) and an additive mask that hides the pads; a pad query
//! attends only to itself, which keeps its (unused) row finite. Finished rows are dropped
//! from the batch and its cache, so a batch costs what its live rows cost.
//!
//! Sampling draws from [`SplitMix64`]; prompt `i` of a batch uses the stream of
//! `seed + i`, so a batch reproduces one-by-one calls made with seeds `seed, seed + 1, …`.

use candle_core::{DType, Tensor, D};

use crate::data::SplitMix64;
use crate::error::{Error, Result};
use crate::model::llama::KvCache;
use crate::model::Llama;
use crate::tokenizer::LlamaTokenizer;

/// How to generate. `Default` is greedy, 256 new tokens, no stop sequences, stop at EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Upper bound on generated tokens per prompt (EOS not counted in the output).
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax, lowest id on ties); otherwise logits are divided by it.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability
    /// reaches `top_p` (1.0 keeps all). Ignored when greedy.
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops when the decoded output contains one of these; the output text is
    /// cut before it (as vLLM does).
    pub stop: Vec<String>,
    /// Stop at the model's EOS token(s).
    pub stop_at_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            stop_at_eos: true,
        }
    }
}

impl GenerateParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Input(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::Input("a stop sequence is empty".into()));
        }
        Ok(())
    }
}

/// Why generation of one prompt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an EOS token.
    Eos,
    /// The output contained a stop sequence.
    Stop,
    /// `max_new_tokens` was reached, or the model's maximum context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What one prompt produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids (without the EOS that ended it; with the tokens of a stop sequence).
    pub tokens: Vec<u32>,
    /// Decoded output, special tokens skipped, cut before the first stop sequence.
    pub text: String,
    pub finish: FinishReason,
}

/// Generates a continuation for every prompt (token ids, e.g. `encode_prompt`), in one
/// left-padded batch.
pub fn generate(
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
) -> Result<Vec<Generation>> {
    generate_with(model, tokenizer, prompts, params, |_, _| true)
}

/// [`generate`], calling `on_token(prompt index, token id)` for every token as it is
/// chosen (EOS included); returning `false` cancels the whole batch, which then returns
/// what it has (finish reason `Length`).
pub fn generate_with(
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Result<Vec<Generation>> {
    params.validate()?;
    let max_ctx = model.config().max_position_embeddings;
    check_prompts(prompts, max_ctx)?;
    let ends = Ends { eos: eos_ids(model, tokenizer), max_ctx, params, tokenizer };
    let mut states: Vec<SeqState> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| SeqState::new(p.len(), params.seed.wrapping_add(i as u64)))
        .collect();
    if prompts.is_empty() || params.max_new_tokens == 0 {
        return finish_all(states);
    }
    let mut batch = LiveBatch::prefill(model, prompts)?;
    loop {
        let logits = model.logits(&batch.last)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(batch.live.len());
        let mut keep = Vec::with_capacity(batch.live.len());
        let mut cancelled = false;
        for (r, &i) in batch.live.iter().enumerate() {
            let st = &mut states[i];
            let tok = pick(&logits[r], params, &mut st.rng);
            if !on_token(i, tok) {
                cancelled = true;
            }
            if st.push(tok, &ends)? {
                keep.push(r);
                next.push(tok);
            }
        }
        if cancelled || keep.is_empty() {
            break;
        }
        batch.keep_rows(&keep)?;
        batch.decode(model, next, &states)?;
    }
    finish_all(states)
}

/// Every prompt needs a token to start from and room for at least one more.
fn check_prompts(prompts: &[Vec<u32>], max_ctx: usize) -> Result<()> {
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Input(format!("prompt {i} has no tokens")));
        }
        if p.len() >= max_ctx {
            return Err(Error::Input(format!(
                "prompt {i} has {} tokens: no room to generate within the model's maximum of \
                 {max_ctx}",
                p.len()
            )));
        }
    }
    Ok(())
}

/// The tokens that end a generation: the model's EOS ids and the tokenizer's.
fn eos_ids(model: &Llama, tokenizer: &LlamaTokenizer) -> Vec<u32> {
    let mut eos = model.config().eos_token_ids.clone();
    eos.push(tokenizer.eos_id());
    eos
}

/// What decides that a sequence is finished.
struct Ends<'a> {
    eos: Vec<u32>,
    /// The model's maximum context, prompt included.
    max_ctx: usize,
    params: &'a GenerateParams,
    tokenizer: &'a LlamaTokenizer,
}

/// The rows of a left-padded batch still generating, and the key/value cache of their
/// tokens so far.
struct LiveBatch {
    /// `live[r]`: the index of the prompt in batch row r.
    live: Vec<usize>,
    /// `row_pads[r]`: the left padding of row r.
    row_pads: Vec<usize>,
    cache: KvCache,
    /// The final-norm hidden state of each row's last token, `[rows, H]`.
    last: Tensor,
}

impl LiveBatch {
    /// Runs the prompts through the model as one batch: left-padded ids, per-row
    /// positions, a causal mask that hides the pads.
    fn prefill(model: &Llama, prompts: &[Vec<u32>]) -> Result<LiveBatch> {
        let device = model.device();
        let b = prompts.len();
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
        let mut ids = vec![0u32; b * t];
        let mut pos = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t * t];
        for (r, p) in prompts.iter().enumerate() {
            let pad = pads[r];
            ids[r * t + pad..(r + 1) * t].copy_from_slice(p);
            for j in 0..t {
                pos[r * t + j] = j.saturating_sub(pad) as u32;
                for k in 0..t {
                    let visible = k == j || (k < j && k >= pad);
                    if !visible {
                        mask[(r * t + j) * t + k] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mut cache = KvCache::new();
        let hidden = model.forward_cached(
            &Tensor::from_vec(ids, (b, t), device)?,
            &Tensor::from_vec(pos, (b, t), device)?,
            &Tensor::from_vec(mask, (b, t, t), device)?,
            &mut cache,
        )?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?; // [B, H]
        Ok(LiveBatch { live: (0..b).collect(), row_pads: pads, cache, last })
    }

    /// Keeps only rows `keep` (in that order), dropping finished ones from the cache too.
    fn keep_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.len() != self.live.len() {
            self.cache.select_rows(keep)?;
            self.live = keep.iter().map(|&r| self.live[r]).collect();
            self.row_pads = keep.iter().map(|&r| self.row_pads[r]).collect();
        }
        Ok(())
    }

    /// One decode step: token `next[r]` for every live row r, at padded column
    /// `cache.len()`.
    fn decode(&mut self, model: &Llama, next: Vec<u32>, states: &[SeqState]) -> Result<()> {
        let device = model.device();
        let s = self.cache.len();
        let n = self.live.len();
        let mut pos = Vec::with_capacity(n);
        let mut mask = vec![0f32; n * (s + 1)];
        for (r, &i) in self.live.iter().enumerate() {
            pos.push((states[i].prompt_len + states[i].tokens.len() - 1) as u32);
            mask[r * (s + 1)..r * (s + 1) + self.row_pads[r]].fill(f32::NEG_INFINITY);
        }
        let hidden = model.forward_cached(
            &Tensor::from_vec(next, (n, 1), device)?,
            &Tensor::from_vec(pos, (n, 1), device)?,
            &Tensor::from_vec(mask, (n, 1, s + 1), device)?,
            &mut self.cache,
        )?;
        self.last = hidden.squeeze(1)?;
        Ok(())
    }
}

struct SeqState {
    prompt_len: usize,
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    rng: SplitMix64,
}

impl SeqState {
    fn new(prompt_len: usize, seed: u64) -> Self {
        SeqState {
            prompt_len,
            tokens: Vec::new(),
            text: String::new(),
            finish: None,
            rng: SplitMix64::new(seed),
        }
    }

    /// Takes the chosen token `tok`; returns whether the sequence goes on (otherwise its
    /// finish reason is set).
    fn push(&mut self, tok: u32, ends: &Ends) -> Result<bool> {
        let params = ends.params;
        if params.stop_at_eos && ends.eos.contains(&tok) {
            self.finish = Some(FinishReason::Eos);
            return Ok(false);
        }
        self.tokens.push(tok);
        if !params.stop.is_empty() || self.tokens.len() >= params.max_new_tokens {
            self.text = ends.tokenizer.decode(&self.tokens, true)?;
        }
        if let Some(cut) = find_stop(&self.text, &params.stop) {
            self.text.truncate(cut);
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() >= params.max_new_tokens
            || self.prompt_len + self.tokens.len() >= ends.max_ctx
        {
            self.finish = Some(FinishReason::Length);
        }
        Ok(self.finish.is_none())
    }
}

fn finish_all(states: Vec<SeqState>) -> Result<Vec<Generation>> {
    Ok(states
        .into_iter()
        .map(|s| Generation {
            tokens: s.tokens,
            text: s.text,
            finish: s.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}

/// Byte offset of the earliest stop sequence in `text`.
fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// The next token from one row of logits.
pub fn pick(logits: &[f32], params: &GenerateParams, rng: &mut SplitMix64) -> u32 {
    if params.temperature == 0.0 {
        return argmax(logits);
    }
    // Softmax in f64 of logits / T, then the nucleus, then one uniform draw.
    let inv_t = 1.0 / params.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) * inv_t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    if params.top_p < 1.0 {
        // Most likely first; ties by id, so the order never depends on the sort.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= params.top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * mass;
    let mut acc = 0.0;
    for &(id, p) in &probs {
        acc += p;
        if u < acc {
            return id;
        }
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy/sampled generation for one prompt with no cache: the full forward over the whole
/// sequence at every step. Quadratic; it exists as the reference the cached path is
/// tested against. Stops at EOS and `max_new_tokens` only.
pub fn generate_uncached(
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    prompt: &[u32],
    params: &GenerateParams,
) -> Result<Vec<u32>> {
    let eos = eos_ids(model, tokenizer);
    let mut rng = SplitMix64::new(params.seed);
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < params.max_new_tokens {
        let x = Tensor::from_vec(ids.clone(), (1, ids.len()), model.device())?;
        let logits = model.forward(&x)?.squeeze(0)?.get(ids.len() - 1)?;
        let logits = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let tok = pick(&logits, params, &mut rng);
        if params.stop_at_eos && eos.contains(&tok) {
            break;
        }
        out.push(tok);
        ids.push(tok);
    }
    Ok(out)
}

/// Log-softmax of the next-token logits after `prompt`, f32 — what scoring a single-token
/// answer (e.g. an MMLU letter) needs without a response sequence.
pub fn next_token_logprobs(model: &Llama, prompt: &[u32]) -> Result<Vec<f32>> {
    if prompt.is_empty() {
        return Err(Error::Input("empty prompt".into()));
    }
    let x = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), model.device())?;
    let h = model.hidden_states(&x)?.squeeze(0)?.get(prompt.len() - 1)?;
    let logits = model.logits(&h.unsqueeze(0)?)?.to_dtype(DType::F32)?;
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    Ok(lsm.squeeze(0)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mode;
    use crate::testing::{tiny_config, tiny_tokenizer, tiny_weights, TinySpec};
    use candle_core::Device;

    fn tiny(spec: &TinySpec) -> Llama {
        let cfg = tiny_config(spec);
        let w = tiny_weights(&cfg, spec.seed).unwrap();
        Llama::from_weights(cfg, w, Mode::Frozen, DType::F32, &Device::Cpu).unwrap()
    }

    fn prompts(tok: &LlamaTokenizer) -> Vec<Vec<u32>> {
        ["Hello", "The capital of France is", "a", "Once upon a time, there"]
            .iter()
            .map(|p| tok.encode_prompt(p).unwrap())
            .collect()
    }

    fn greedy(n: usize) -> GenerateParams {
        GenerateParams { max_new_tokens: n, stop_at_eos: false, ..Default::default() }
    }

    #[test]
    fn cached_equals_uncached_greedy_and_sampled() {
        for spec in [
            TinySpec::default(),
            TinySpec { llama3_rope: false, tied: true, seed: 3, ..Default::default() },
        ] {
            let model = tiny(&spec);
            let tok = tiny_tokenizer();
            for params in
                [greedy(24), GenerateParams { temperature: 0.9, top_p: 0.8, seed: 7, ..greedy(24) }]
            {
                for p in prompts(&tok) {
                    let reference = generate_uncached(&model, &tok, &p, &params).unwrap();
                    let got = generate(&model, &tok, std::slice::from_ref(&p), &params).unwrap();
                    assert_eq!(got[0].tokens, reference, "prompt {p:?} params {params:?}");
                    assert_eq!(got[0].tokens.len(), 24);
                    assert_eq!(got[0].finish, FinishReason::Length);
                }
            }
        }
    }

    /// The cache path runs the same layer forward as a full pass: a prefill gives the full
    /// forward's hidden states exactly, and a prefill then a decode step gives them up to the
    /// rounding of matrix products of other shapes.
    #[test]
    fn cached_forward_equals_the_full_forward() {
        let spec = TinySpec { heads: 8, kv_heads: 2, hidden: 64, ..TinySpec::default() };
        let model = tiny(&spec);
        let ids: Vec<u32> = tiny_tokenizer().encode_prompt("Once upon a time, there").unwrap();
        let t = ids.len();
        let full = model.hidden_states(&Tensor::from_slice(&ids, (1, t), &Device::Cpu).unwrap());
        let full = full.unwrap().squeeze(0).unwrap();
        let causal = |n: usize| -> Vec<f32> {
            (0..n)
                .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect()
        };
        let positions: Vec<u32> = (0..t as u32).collect();
        let run = |ids: &[u32], pos: &[u32], mask: Vec<f32>, cache: &mut KvCache| {
            let n = ids.len();
            let s = cache.len();
            model
                .forward_cached(
                    &Tensor::from_slice(ids, (1, n), &Device::Cpu).unwrap(),
                    &Tensor::from_slice(pos, (1, n), &Device::Cpu).unwrap(),
                    &Tensor::from_vec(mask, (1, n, s + n), &Device::Cpu).unwrap(),
                    cache,
                )
                .unwrap()
                .squeeze(0)
                .unwrap()
        };
        let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let prefill = run(&ids, &positions, causal(t), &mut KvCache::new());
        assert_eq!(max_diff(&prefill, &full), 0.0);
        let mut cache = KvCache::new();
        let prefill = run(&ids[..t - 1], &positions[..t - 1], causal(t - 1), &mut cache);
        let step = run(&ids[t - 1..], &positions[t - 1..], vec![0.0; t], &mut cache);
        let cached = Tensor::cat(&[prefill, step], 0).unwrap();
        assert!(max_diff(&cached, &full) < 1e-5, "{}", max_diff(&cached, &full));
    }

    #[test]
    fn batched_equals_one_by_one() {
        let model = tiny(&TinySpec::default());
        let tok = tiny_tokenizer();
        let ps = prompts(&tok);
        for params in [
            greedy(16),
            GenerateParams { temperature: 1.0, top_p: 0.95, seed: 11, ..greedy(16) },
            // Different stop points per row exercise dropping finished rows mid-batch.
            GenerateParams { stop: vec!["}".into(), "W".into(), "NN".into()], ..greedy(16) },
        ] {
            let batch = generate(&model, &tok, &ps, &params).unwrap();
            if !params.stop.is_empty() {
                let lens: std::collections::BTreeSet<_> =
                    batch.iter().map(|g| g.tokens.len()).collect();
                assert!(lens.len() > 1, "rows should finish at different steps: {batch:?}");
                assert!(batch.iter().any(|g| g.finish == FinishReason::Stop));
            }
            for (i, p) in ps.iter().enumerate() {
                let one = GenerateParams { seed: params.seed + i as u64, ..params.clone() };
                let single = generate(&model, &tok, std::slice::from_ref(p), &one).unwrap();
                assert_eq!(batch[i], single[0], "prompt {i} with {params:?}");
            }
        }
    }

    #[test]
    fn stop_sequences_and_max_tokens() {
        let model = tiny(&TinySpec::default());
        let tok = tiny_tokenizer();
        let p = tok.encode_prompt("Once upon a time").unwrap();
        let free = generate(&model, &tok, std::slice::from_ref(&p), &greedy(40)).unwrap();
        assert_eq!(free[0].tokens.len(), 40);
        let full = tok.decode(&free[0].tokens, true).unwrap();
        assert_eq!(free[0].text, full);
        // Stop on a piece of text the free run produced (chars 3..5): the output ends before it.
        let chars: Vec<char> = full.chars().collect();
        let stop: String = chars[3..5].iter().collect();
        let cut = full.find(&stop).unwrap();
        let params = GenerateParams { stop: vec![stop.clone(), "\u{1F600}".into()], ..greedy(40) };
        let got = generate(&model, &tok, std::slice::from_ref(&p), &params).unwrap();
        assert_eq!(got[0].finish, FinishReason::Stop);
        assert_eq!(got[0].text, full[..cut]);
        assert_eq!(got[0].tokens, free[0].tokens[..got[0].tokens.len()]);
        assert!(tok.decode(&got[0].tokens, true).unwrap().contains(&stop));
        // Max tokens.
        let got = generate(&model, &tok, std::slice::from_ref(&p), &greedy(5)).unwrap();
        assert_eq!(got[0].tokens, free[0].tokens[..5]);
        assert_eq!(got[0].finish, FinishReason::Length);
        let none = generate(&model, &tok, std::slice::from_ref(&p), &greedy(0)).unwrap();
        assert!(none[0].tokens.is_empty());
    }

    #[test]
    fn eos_stops_and_is_not_in_the_output() {
        let model = tiny(&TinySpec::default());
        let p = tiny_tokenizer().encode_prompt("abc").unwrap();
        let free =
            generate(&model, &tiny_tokenizer(), std::slice::from_ref(&p), &greedy(8)).unwrap();
        // A tokenizer whose EOS is the k-th greedy token (first occurrence) stops right there.
        let k = 3;
        let eos = free[0].tokens[k];
        let first = free[0].tokens.iter().position(|&t| t == eos).unwrap();
        let tok = LlamaTokenizer::from_tokenizer(tiny_tokenizer().inner().clone(), Some(256), eos)
            .unwrap();
        let params = GenerateParams { max_new_tokens: 8, ..Default::default() };
        let got = generate(&model, &tok, std::slice::from_ref(&p), &params).unwrap();
        assert_eq!(got[0].finish, FinishReason::Eos);
        assert_eq!(got[0].tokens, free[0].tokens[..first]);
        let no_eos = GenerateParams { stop_at_eos: false, ..params };
        let got = generate(&model, &tok, std::slice::from_ref(&p), &no_eos).unwrap();
        assert_eq!(got[0].tokens, free[0].tokens);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // p ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 keeps only id 0; 0.7 keeps ids 0 and 1.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = SplitMix64::new(5);
        let p = GenerateParams { temperature: 1.0, top_p: 0.5, ..Default::default() };
        assert!((0..200).all(|_| pick(&logits, &p, &mut rng) == 0));
        let p = GenerateParams { top_p: 0.7, ..p };
        let draws: Vec<u32> = (0..400).map(|_| pick(&logits, &p, &mut rng)).collect();
        assert!(draws.iter().all(|&d| d < 2));
        let ones = draws.iter().filter(|&&d| d == 1).count() as f64 / 400.0;
        assert!((ones - 0.27).abs() < 0.08, "{ones}");
        assert!(GenerateParams { top_p: 0.0, ..p.clone() }.validate().is_err());
        assert!(GenerateParams { temperature: -1.0, ..p }.validate().is_err());
    }

    #[test]
    fn next_token_logprobs_match_the_full_forward() {
        let model = tiny(&TinySpec::default());
        let tok = tiny_tokenizer();
        let p = tok.encode_prompt("Answer:").unwrap();
        let lp = next_token_logprobs(&model, &p).unwrap();
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4);
        let greedy_tok = generate_uncached(&model, &tok, &p, &greedy(1)).unwrap()[0];
        assert_eq!(argmax(&lp), greedy_tok);
    }
}
