//! Turns a `ScoreRequest` into checked [`Sequence`]s. Every limit of [`Limits`] and every
//! rule the forward pass relies on is checked here, before anything is queued, and each
//! failure is an [`Invalid`] message naming the item (and response) and the limit — the
//! service sends it back as `INVALID_ARGUMENT`.

use dpo_common::logprob::Sequence;
use dpo_common::template::Template;
use dpo_common::tokenizer::LlamaTokenizer;
use dpo_proto::v1;

use crate::config::Limits;

/// Why a request was refused, in words the client can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// A validated request: the sequences to score, in item order, responses in order.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub seqs: Vec<Sequence>,
    /// Number of responses (= sequences) of each item.
    pub responses_per_item: Vec<usize>,
    pub per_token: bool,
    pub request_id: u64,
    /// Total tokens over all sequences.
    pub total_tokens: usize,
}

/// What validation needs to know about the model.
pub struct Validator<'a> {
    pub tokenizer: &'a LlamaTokenizer,
    /// Token ids must be below this (the model's embedding rows).
    pub vocab_size: usize,
    pub limits: &'a Limits,
}

pub(crate) fn template_of(t: i32) -> Option<Template> {
    match v1::Template::try_from(t).ok()? {
        v1::Template::Unspecified | v1::Template::Alpaca => Some(Template::Alpaca),
        v1::Template::Raw => Some(Template::Raw),
    }
}

impl Validator<'_> {
    pub fn prepare(&self, req: &v1::ScoreRequest) -> Result<Prepared, Invalid> {
        let lim = self.limits;
        if req.items.is_empty() {
            return Err(Invalid("the request has no items".into()));
        }
        if req.items.len() > lim.max_items_per_request {
            return Err(Invalid(format!(
                "the request has {} items, more than the limit of {} (max_items_per_request)",
                req.items.len(),
                lim.max_items_per_request
            )));
        }
        let mut seqs = Vec::new();
        let mut responses_per_item = Vec::with_capacity(req.items.len());
        let mut total = 0usize;
        for (i, item) in req.items.iter().enumerate() {
            let (prompt, responses) = self.item_ids(i, item)?;
            if responses.is_empty() {
                return Err(Invalid(format!("item {i}: no responses to score")));
            }
            if prompt.is_empty() {
                return Err(Invalid(format!(
                    "item {i}: the prompt has no tokens (and the tokenizer adds no BOS), so the \
                     first response token has no context to be scored from"
                )));
            }
            for (j, r) in responses.iter().enumerate() {
                if r.is_empty() {
                    return Err(Invalid(format!(
                        "item {i} response {j}: no tokens; every response needs at least one \
                         (append EOS to score an empty response)"
                    )));
                }
                let len = prompt.len() + r.len();
                if len > lim.max_tokens_per_item {
                    return Err(Invalid(format!(
                        "item {i} response {j}: {len} tokens (prompt {} + response {}) exceed \
                         the limit of {} tokens per item (max_tokens_per_item)",
                        prompt.len(),
                        r.len(),
                        lim.max_tokens_per_item
                    )));
                }
                total += len;
                if total > lim.max_tokens_per_request {
                    return Err(Invalid(format!(
                        "the request exceeds the limit of {} tokens per request \
                         (max_tokens_per_request) at item {i} response {j}",
                        lim.max_tokens_per_request
                    )));
                }
            }
            let bad = |ids: &[u32]| ids.iter().position(|&t| t as usize >= self.vocab_size);
            if let Some(p) = bad(&prompt) {
                return Err(self.out_of_range(i, "prompt", p, prompt[p]));
            }
            for (j, r) in responses.iter().enumerate() {
                if let Some(p) = bad(r) {
                    return Err(self.out_of_range(i, &format!("response {j}"), p, r[p]));
                }
            }
            responses_per_item.push(responses.len());
            for r in responses {
                let mut ids = Vec::with_capacity(prompt.len() + r.len());
                ids.extend_from_slice(&prompt);
                ids.extend_from_slice(&r);
                seqs.push(Sequence { ids, response_start: prompt.len() });
            }
        }
        Ok(Prepared {
            seqs,
            responses_per_item,
            per_token: req.per_token,
            request_id: req.request_id,
            total_tokens: total,
        })
    }

    fn out_of_range(&self, item: usize, part: &str, pos: usize, id: u32) -> Invalid {
        Invalid(format!(
            "item {item} {part}: token id {id} at position {pos} is out of range: the model's \
             vocabulary has {} tokens",
            self.vocab_size
        ))
    }

    /// The prompt ids and response ids of one item; text is tokenized as the trainer does.
    fn item_ids(
        &self,
        i: usize,
        item: &v1::ScoreItem,
    ) -> Result<(Vec<u32>, Vec<Vec<u32>>), Invalid> {
        match &item.input {
            None => Err(Invalid(format!("item {i}: no input (set `text` or `tokens`)"))),
            Some(v1::score_item::Input::Tokens(t)) => {
                // Size checks before copying, so a huge item costs nothing.
                let longest = t.responses.iter().map(|r| r.ids.len()).max().unwrap_or(0);
                if t.prompt_ids.len() + longest > self.limits.max_tokens_per_item {
                    return Err(Invalid(format!(
                        "item {i}: {} tokens (prompt {} + longest response {longest}) exceed the \
                         limit of {} tokens per item (max_tokens_per_item)",
                        t.prompt_ids.len() + longest,
                        t.prompt_ids.len(),
                        self.limits.max_tokens_per_item
                    )));
                }
                Ok((t.prompt_ids.clone(), t.responses.iter().map(|r| r.ids.clone()).collect()))
            }
            Some(v1::score_item::Input::Text(t)) => {
                let template = template_of(t.template).ok_or_else(|| {
                    Invalid(format!("item {i}: unknown template value {}", t.template))
                })?;
                let tok_err = |what: &str, e: dpo_common::Error| {
                    Invalid(format!("item {i}: cannot tokenize the {what}: {e}"))
                };
                let prompt = self
                    .tokenizer
                    .encode_prompt(&template.format_prompt(&t.prompt))
                    .map_err(|e| tok_err("prompt", e))?;
                let responses = t
                    .responses
                    .iter()
                    .map(|r| self.tokenizer.encode_response(r).map_err(|e| tok_err("response", e)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((prompt, responses))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpo_common::testing::tiny_tokenizer;

    fn limits() -> Limits {
        Limits {
            max_tokens_per_item: 16,
            max_tokens_per_request: 40,
            max_items_per_request: 3,
            max_message_bytes: 1 << 20,
            batch_token_budget: 64,
            min_batch_fill: 0.9,
            prefix_cache_min_tokens: 8,
            max_queued_tokens: 1000,
        }
    }

    fn tokens(prompt: Vec<u32>, responses: Vec<Vec<u32>>) -> v1::ScoreItem {
        v1::ScoreItem {
            input: Some(v1::score_item::Input::Tokens(v1::TokenInput {
                prompt_ids: prompt,
                responses: responses.into_iter().map(|ids| v1::TokenIds { ids }).collect(),
            })),
        }
    }

    fn check(items: Vec<v1::ScoreItem>) -> Result<Prepared, Invalid> {
        let tok = tiny_tokenizer();
        let l = limits();
        let v = Validator { tokenizer: &tok, vocab_size: 258, limits: &l };
        v.prepare(&v1::ScoreRequest { items, per_token: false, request_id: 7 })
    }

    fn err(items: Vec<v1::ScoreItem>) -> String {
        check(items).expect_err("must be refused").0
    }

    #[test]
    fn pairs_share_the_prompt() {
        let p = check(vec![tokens(vec![1, 2], vec![vec![3], vec![4, 5]])]).unwrap();
        assert_eq!(p.responses_per_item, vec![2]);
        assert_eq!(p.seqs[0], Sequence { ids: vec![1, 2, 3], response_start: 2 });
        assert_eq!(p.seqs[1], Sequence { ids: vec![1, 2, 4, 5], response_start: 2 });
        assert_eq!(p.total_tokens, 7);
    }

    #[test]
    fn every_limit_names_item_and_limit() {
        assert!(err(vec![]).contains("no items"));
        assert!(err(vec![tokens(vec![1], vec![vec![2]]); 4]).contains("max_items_per_request"));
        assert!(err(vec![v1::ScoreItem { input: None }]).contains("item 0: no input"));
        assert!(err(vec![tokens(vec![1], vec![])]).contains("item 0: no responses"));
        assert!(err(vec![tokens(vec![], vec![vec![1]])]).contains("prompt has no tokens"));
        let e = err(vec![tokens(vec![1], vec![vec![2]]), tokens(vec![1], vec![vec![2], vec![]])]);
        assert!(e.contains("item 1 response 1: no tokens"), "{e}");
        let e = err(vec![tokens(vec![1], vec![vec![2, 258]])]);
        assert!(e.contains("item 0 response 0: token id 258") && e.contains("258 tokens"), "{e}");
        let e = err(vec![tokens(vec![1; 10], vec![vec![2; 7]])]);
        assert!(e.contains("max_tokens_per_item") && e.contains("item 0"), "{e}");
        let e = err(vec![tokens(vec![1; 10], vec![vec![2; 5], vec![2; 5], vec![2; 5]])]);
        assert!(e.contains("max_tokens_per_request") && e.contains("item 0 response 2"), "{e}");
    }

    #[test]
    fn text_items_are_tokenized_like_the_trainer() {
        let tok = tiny_tokenizer();
        let text = v1::ScoreItem {
            input: Some(v1::score_item::Input::Text(v1::TextInput {
                prompt: "hi".into(),
                responses: vec!["yo".into(), String::new()],
                template: v1::Template::Raw as i32,
            })),
        };
        let p = check(vec![text]).unwrap();
        assert_eq!(p.seqs[0], Sequence::from(tok.encode_prompt_response("hi", "yo").unwrap()));
        // An empty response scores EOS alone.
        assert_eq!(p.seqs[1].ids[p.seqs[1].response_start..], [tok.eos_id()]);
        let bad = v1::ScoreItem {
            input: Some(v1::score_item::Input::Text(v1::TextInput {
                prompt: "hi".into(),
                responses: vec!["yo".into()],
                template: 99,
            })),
        };
        assert!(err(vec![bad]).contains("unknown template"));
    }
}
