//! Loads the real SmolLM2-135M-Instruct Q4_1 GGUF and checks config, weights and token ids
//! against what transformers 5.24 produces for the same file.
//!
//! The file is not committed: `deploy/fetch-model.sh` puts it where the test looks, or point
//! `SMOLLM2_GGUF` at a copy:
//!
//! ```sh
//! deploy/fetch-model.sh && cargo test -p dpo-common --test gguf_smollm2
//! ```
//!
//! Expected ids were produced with transformers 5.24.0 / tokenizers 0.23.3:
//!
//! ```python
//! tok = AutoTokenizer.from_pretrained(dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
//! prompt_ids = tok(s).input_ids
//! response_ids = tok(s, add_special_tokens=False).input_ids + [tok.eos_token_id]
//! ```
//!
//! and the weight values from the float32 Hugging Face directory transformers writes for the
//! same file (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..)` then
//! `save_pretrained`).

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use dpo_common::gguf::{load_gguf, GgufModel};
use dpo_common::tokenizer::LlamaTokenizer;

fn gguf_path() -> PathBuf {
    dpo_common::testing::smollm2_gguf()
}

fn model() -> &'static GgufModel {
    static MODEL: OnceLock<GgufModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = gguf_path();
        load_gguf(&path, DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    })
}

/// (text, ids of `encode_prompt`, ids of `encode_response`) from transformers.
const CASES: &[(&str, &[u32], &[u32])] = &[
    ("Hello world", &[19556, 905], &[19556, 905, 2]),
    (
        " leading space and  double  spaces",
        &[2899, 1898, 284, 216, 5561, 216, 5600],
        &[2899, 1898, 284, 216, 5561, 216, 5600, 2],
    ),
    (
        "Numbers: 2024, 3.14159 and 1,000,000.",
        &[
            39006, 42, 216, 34, 32, 34, 36, 28, 216, 35, 30, 33, 36, 33, 37, 41, 284, 216, 33, 28,
            32, 32, 32, 28, 32, 32, 32, 30,
        ],
        &[
            39006, 42, 216, 34, 32, 34, 36, 28, 216, 35, 30, 33, 36, 33, 37, 41, 284, 216, 33, 28,
            32, 32, 32, 28, 32, 32, 32, 30, 2,
        ],
    ),
    (
        "Human: What's the café's Wi\u{2011}Fi? 😀\n\nAssistant: I don't know — ask them!",
        &[
            14917, 42, 1812, 506, 260, 37366, 506, 15030, 28357, 14366, 47, 40303, 218, 198, 198,
            9519, 9531, 42, 339, 1326, 982, 699, 1841, 1998, 601, 17,
        ],
        &[
            14917, 42, 1812, 506, 260, 37366, 506, 15030, 28357, 14366, 47, 40303, 218, 198, 198,
            9519, 9531, 42, 339, 1326, 982, 699, 1841, 1998, 601, 17, 2,
        ],
    ),
    (
        "日本語 and Ελληνικά\ttabs\r\nCRLF",
        &[
            23274, 115, 40993, 179, 120, 248, 284, 5664, 239, 17162, 17162, 25723, 11517, 12001,
            21118, 26112, 197, 100, 7366, 201, 198, 9088, 60, 54,
        ],
        &[
            23274, 115, 40993, 179, 120, 248, 284, 5664, 239, 17162, 17162, 25723, 11517, 12001,
            21118, 26112, 197, 100, 7366, 201, 198, 9088, 60, 54, 2,
        ],
    ),
    // Special-token text in the input becomes the special ids, as in transformers.
    ("<|im_start|>user\nhi<|im_end|>", &[1, 4093, 198, 6004, 2], &[1, 4093, 198, 6004, 2, 2]),
    (
        "Below is an instruction that describes a task. Write a response that appropriately \
         completes the request.\n\n### Instruction:\nWhat will happen if I drive my car into the \
         water?\n\n### Response:\n",
        &[
            19798, 314, 354, 5785, 338, 6601, 253, 3856, 30, 9517, 253, 2426, 338, 13674, 32873,
            260, 3116, 30, 198, 198, 3757, 20880, 42, 198, 1780, 523, 4317, 585, 339, 4926, 957,
            1076, 618, 260, 913, 47, 198, 198, 3757, 14212, 42, 198,
        ],
        &[
            19798, 314, 354, 5785, 338, 6601, 253, 3856, 30, 9517, 253, 2426, 338, 13674, 32873,
            260, 3116, 30, 198, 198, 3757, 20880, 42, 198, 1780, 523, 4317, 585, 339, 4926, 957,
            1076, 618, 260, 913, 47, 198, 198, 3757, 14212, 42, 198, 2,
        ],
    ),
];

fn check_ids(t: &LlamaTokenizer, who: &str) {
    for (text, prompt, response) in CASES {
        assert_eq!(t.encode_prompt(text).unwrap(), *prompt, "{who}: prompt {text:?}");
        assert_eq!(t.encode_response(text).unwrap(), *response, "{who}: response {text:?}");
    }
    let e = t.encode_prompt_response(CASES[6].0, CASES[0].0).unwrap();
    assert_eq!(e.response_start, CASES[6].1.len());
    assert_eq!(e.ids[e.response_start..], *CASES[0].2);
}

#[test]
fn config_matches_transformers() {
    let c = &model().config;
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.torch_dtype, "float32");
}

#[test]
fn weights_match_transformers() {
    let w = &model().weights;
    // 30 layers x 9 tensors + embeddings + final norm; tied, so no lm_head.
    assert_eq!(w.len(), 272);
    assert!(!w.contains_key("lm_head.weight"));
    // Compared as f64 so the literals can be written exactly; every value is an f32.
    let at = |name: &str, row: usize, n: usize| -> Vec<f64> {
        let t: &Tensor = &w[name];
        let row: Vec<f32> = t.get(row).unwrap().narrow(0, 0, n).unwrap().to_vec1().unwrap();
        row.into_iter().map(f64::from).collect()
    };
    let sum = |name: &str| -> f64 {
        w[name].to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    // Rows 1 and 33 of a 64-row head sit in different places before the permutation is
    // undone, so these pin it down (Q4_1 for q/k, Q8_0 for the embeddings).
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(at(q, 1, 4), [-0.1591796875, 0.39794921875, -0.0198974609375, -1.2734375]);
    assert_eq!(at(q, 33, 2), [-0.06280517578125, 0.1446533203125]);
    let k = "model.layers.0.self_attn.k_proj.weight";
    assert_eq!(at(k, 1, 4), [0.203369140625, 0.09136962890625, 0.203369140625, -0.13262939453125]);
    assert_eq!(at(k, 33, 2), [-0.09912109375, 0.22955322265625]);
    let k29 = "model.layers.29.self_attn.k_proj.weight";
    assert_eq!(at(k29, 1, 4), [0.05859375, -0.02734375, 0.1015625, -0.11328125]);
    let e = "model.embed_tokens.weight";
    assert_eq!(at(e, 1, 4), [-0.0238037109375, -0.015869140625, -0.0396728515625, 0.015869140625]);
    for (name, want) in [(q, 59.22322082519531), (k, 26.937057495117188), (e, -15353.04449415207)] {
        assert!((sum(name) - want).abs() < 1e-6 * want.abs().max(1.0), "{name}: {}", sum(name));
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let t = &model().tokenizer;
    assert_eq!((t.bos_id(), t.eos_id(), t.vocab_size()), (Some(1), 2, 49152));
    assert!(!t.adds_bos(), "SmolLM2's GGUF sets tokenizer.ggml.add_bos_token = false");
    check_ids(t, "gguf");
    assert_eq!(t.decode(CASES[3].1, false).unwrap(), CASES[3].0);
    assert_eq!(t.decode(CASES[5].1, true).unwrap(), "user\nhi");
}

#[test]
fn saved_tokenizer_reads_back_identically() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    m.tokenizer.save_hf(dir.path()).unwrap();
    let back = LlamaTokenizer::from_hf_dir(dir.path(), &m.config).unwrap();
    check_ids(&back, "save_hf/from_hf_dir");
    assert_eq!((back.bos_id(), back.eos_id()), (Some(1), 2));
    assert_eq!(back.fingerprint_bytes().unwrap(), m.tokenizer.fingerprint_bytes().unwrap());
}
