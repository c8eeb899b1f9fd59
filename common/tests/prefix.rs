//! Prefix caching (`prefix`, `logprob::prefixed_logprobs`) against scoring every token:
//! the same log-probs from a precomputed prefix, and a cache that finds the prefix prompts
//! share, uses no more of it than each batch shares, and falls back when there is none.

use candle_core::{DType, Device};
use dpo_common::logprob::{prefixed_logprobs, shared_prompt_logprobs, SharedPrompt};
use dpo_common::model::{Llama, Mode};
use dpo_common::prefix::PrefixCache;
use dpo_common::template::Template;
use dpo_common::testing::{tiny_config, tiny_tokenizer, tiny_weights, TinySpec};

fn model(dtype: DType) -> Llama {
    let spec = TinySpec::default();
    let cfg = tiny_config(&spec);
    let w = tiny_weights(&cfg, spec.seed).unwrap();
    Llama::from_weights(cfg, w, Mode::Frozen, dtype, &Device::Cpu).unwrap()
}

/// Alpaca-formatted pairs: every prompt starts with the template's preamble.
fn pairs(items: &[(&str, &str, &str)]) -> Vec<SharedPrompt> {
    let tok = tiny_tokenizer();
    items
        .iter()
        .map(|(p, c, r)| {
            let prompt = Template::Alpaca.format_prompt(p);
            let c = tok.encode_prompt_response(&prompt, c).unwrap();
            let r = tok.encode_prompt_response(&prompt, r).unwrap();
            SharedPrompt {
                prompt: c.ids[..c.response_start].to_vec(),
                responses: vec![
                    c.ids[c.response_start..].to_vec(),
                    r.ids[r.response_start..].to_vec(),
                ],
            }
        })
        .collect()
}

fn batch_a() -> Vec<SharedPrompt> {
    pairs(&[
        ("What is 2+2?", "4", "Five, I think."),
        ("Name a colour.", "A deep shade of blue, like the sea.", "No."),
    ])
}

fn batch_b() -> Vec<SharedPrompt> {
    pairs(&[("Hi", "", "Hello there!"), ("What is 3+3?", "6", "Seven.")])
}

fn assert_close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < tol, "{x} vs {y}");
    }
}

#[test]
fn a_precomputed_prefix_gives_the_full_log_probs() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
        let m = model(dtype);
        let groups = batch_a();
        let full = shared_prompt_logprobs(&m, &groups).unwrap();
        let (a, b) = (&groups[0].prompt, &groups[1].prompt);
        let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        // From one token up to everything the prompts share.
        for len in [1, 10, common] {
            let prefix = m.prefix_kv(&groups[0].prompt[..len]).unwrap();
            let got = prefixed_logprobs(&m, &groups, &prefix).unwrap();
            assert_close(&got.sums_vec().unwrap(), &full.sums_vec().unwrap(), tol);
            assert_eq!(got.counts, full.counts);
            let (a, b) = (got.per_token_vecs().unwrap(), full.per_token_vecs().unwrap());
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() < tol as f32 * 10.0, "per-token {x} vs {y}");
            }
            // A truncated prefix is the prefix of the shorter ids.
            let short = prefix.truncated(len / 2 + 1).unwrap();
            let got = prefixed_logprobs(&m, &groups, &short).unwrap();
            assert_close(&got.sums_vec().unwrap(), &full.sums_vec().unwrap(), tol);
        }
    }
}

#[test]
fn a_prefix_the_prompts_do_not_extend_is_refused() {
    let m = model(DType::F32);
    let groups = batch_a();
    let other = m.prefix_kv(&[5, 6, 7]).unwrap();
    let err = prefixed_logprobs(&m, &groups, &other).err().expect("a foreign prefix");
    assert!(err.to_string().contains("does not extend"), "{err}");
    // The whole prompt cannot be a prefix: its last token predicts the response.
    let whole = m.prefix_kv(&groups[0].prompt).unwrap();
    assert!(prefixed_logprobs(&m, &groups[..1], &whole).is_err());
    assert!(m.prefix_kv(&[]).is_err());
    assert!(m.prefix_kv(&[100_000]).is_err(), "out-of-range ids are refused");
    assert!(whole.truncated(whole.len() + 1).is_err());
}

#[test]
fn the_cache_finds_the_shared_preamble_and_scores_like_the_full_pass() {
    let m = model(DType::F32);
    let mut cache = PrefixCache::new(8);
    let preamble_len = {
        let (a, b) = (&batch_a()[0].prompt, &batch_b()[0].prompt);
        a.iter().zip(b).take_while(|(x, y)| x == y).count()
    };
    assert!(preamble_len > 100, "the Alpaca preamble is long ({preamble_len})");

    // First batch: nothing to compare with, scored in full.
    for (i, groups) in [batch_a(), batch_b(), batch_a(), batch_b()].iter().enumerate() {
        let got = cache.score(&m, groups).unwrap().sums_vec().unwrap();
        let want = shared_prompt_logprobs(&m, groups).unwrap().sums_vec().unwrap();
        assert_close(&got, &want, 1e-4);
        let s = cache.stats();
        match i {
            0 => assert_eq!((s.hits, s.misses, s.prefixes_computed), (0, 1, 0)),
            // The second batch shares the preamble with the first prompt seen.
            1 => {
                assert_eq!((s.hits, s.misses, s.prefixes_computed), (1, 1, 1));
                assert_eq!(cache.prefix_lens(), [preamble_len]);
            }
            _ => assert_eq!((s.hits, s.prefixes_computed), (i as u64, 1)),
        }
    }
    assert!(cache.stats().tokens_saved >= 3 * 2 * preamble_len as u64);

    // Prompts that share nothing with the cache are scored in full, and the cache still
    // serves the template afterwards.
    let before = cache.stats();
    let odd = vec![SharedPrompt { prompt: vec![1, 2, 3, 4, 5], responses: vec![vec![6, 7]] }];
    let got = cache.score(&m, &odd).unwrap().sums_vec().unwrap();
    assert_close(&got, &shared_prompt_logprobs(&m, &odd).unwrap().sums_vec().unwrap(), 1e-5);
    assert_eq!(cache.stats().misses, before.misses + 1);
    cache.score(&m, &batch_a()).unwrap();
    assert_eq!(cache.stats().hits, before.hits + 1);

    // Errors are the plain path's.
    assert!(cache.score(&m, &[]).is_err());
    let bad = vec![SharedPrompt { prompt: batch_a()[0].prompt.clone(), responses: vec![vec![]] }];
    assert!(cache.score(&m, &bad).is_err());
    cache.clear();
    assert!(cache.prefix_lens().is_empty());
}
