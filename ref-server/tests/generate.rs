//! The `Generate` RPC: a greedy generation streamed by the server equals `common::generate`
//! run in-process on the same checkpoint, token for token; bad requests are
//! `INVALID_ARGUMENT` and the server keeps serving.

mod common;

use common::{load_local, tiny_model, Server};
use dpo_common::generate::{generate, GenerateParams};
use dpo_common::template::Template;
use dpo_proto::v1;

#[tokio::test]
async fn streamed_generation_equals_local_generation() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let server = Server::start(&model, &[], &[]);
    let client = server.ready_client(&server.options()).await;

    let req = v1::GenerateRequest {
        prompt: "Say something.".into(),
        template: v1::Template::Raw as i32,
        max_new_tokens: 24,
        ..Default::default()
    };
    let mut stream = client.generate(req.clone()).await.unwrap();
    let (mut ids, mut text) = (Vec::new(), String::new());
    let last = loop {
        let m = stream.message().await.unwrap().expect("a finish message");
        if !m.finish_reason.is_empty() {
            break m;
        }
        ids.extend(m.token_ids);
        text.push_str(&m.text);
    };

    let local = load_local(&model);
    let prompt =
        local.tokenizer.encode_prompt(&Template::Raw.format_prompt("Say something.")).unwrap();
    let params = GenerateParams { max_new_tokens: 24, ..GenerateParams::default() };
    let expected = generate(&local.model, &local.tokenizer, &[prompt], &params).unwrap().remove(0);
    let mut expected_ids = expected.tokens.clone();
    if expected.finish.as_str() == "eos" {
        expected_ids.push(local.tokenizer.eos_id()); // the stream reports the EOS it stopped on
    }
    assert_eq!(ids, expected_ids);
    assert_eq!(last.finish_reason, expected.finish.as_str());
    assert_eq!(last.full_text, expected.text);
    assert_eq!(text, expected.text, "the deltas add up to the output");

    // generate_text gives the same, and a second generation after the first works.
    let (streamed, last2) = client.generate_text(req).await.unwrap();
    assert_eq!((streamed, last2.full_text), (expected.text.clone(), expected.text));
}

#[tokio::test]
async fn bad_generation_requests_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let server = Server::start(&model, &["--max-tokens-per-item", "64"], &[]);
    let client = server.ready_client(&server.options()).await;
    for (req, needle) in [
        (
            v1::GenerateRequest { prompt: "x".into(), max_new_tokens: 100, ..Default::default() },
            "max_tokens_per_item",
        ),
        (
            v1::GenerateRequest {
                prompt: "x".into(),
                template: v1::Template::Raw as i32,
                top_p: 2.0,
                ..Default::default()
            },
            "top_p",
        ),
    ] {
        let err = match client.generate(req).await {
            Ok(_) => panic!("accepted a request that should be refused ({needle})"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("INVALID_ARGUMENT") && err.contains(needle), "{err}");
    }
    let ok = v1::GenerateRequest {
        prompt: "x".into(),
        template: v1::Template::Raw as i32,
        max_new_tokens: 4,
        ..Default::default()
    };
    assert!(client.generate_text(ok).await.is_ok(), "still serving");
}
