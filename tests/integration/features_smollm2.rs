//! The features stage on the real default model: the content span of a prompt is exactly the
//! user's text in the reference token ids, and batching (left padding) does not change pooling.

use crate::common;

use std::sync::OnceLock;

use crate::common::{assert_close, golden_dir};
use candle_core::{DType, Device};
use sails::features::{collect, prompt_tokens, FeatureError, Pooling};
use sails::model::load::{ChatModel, ModelSource, DEFAULT_MODEL_ASSET};
use sails::model::Resid;
use serde_json::Value;

fn model() -> &'static ChatModel {
    static MODEL: OnceLock<ChatModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = sails::assets::ensure(DEFAULT_MODEL_ASSET).expect("default model asset");
        ChatModel::load(&ModelSource::Gguf(path), &Device::Cpu, DType::F32).expect("SmolLM2 loads")
    })
}

#[test]
fn content_span_is_exactly_the_user_text_in_the_reference_ids() {
    let text =
        std::fs::read_to_string(golden_dir().join("smollm2-135m").join("prompts.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for p in golden["prompts"].as_array().unwrap() {
        let messages = p["messages"].as_array().unwrap();
        let content = messages[0]["content"].as_str().unwrap();
        if messages.len() != 1 || content.is_empty() {
            continue;
        }
        let tokens = prompt_tokens(model(), content).unwrap();
        let want: Vec<u32> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokens.ids, want, "{}", p["name"]);
        let span = model()
            .tokenizer
            .decode(&tokens.ids[tokens.content.clone()], false)
            .unwrap();
        assert_eq!(span, content, "{}", p["name"]);
        // the next token closes the user turn
        assert_eq!(
            tokens.ids[tokens.content.end], 2,
            "<|im_end|> follows the content"
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "four single-turn, non-empty golden prompts");
    assert!(matches!(
        prompt_tokens(model(), "  "),
        Err(FeatureError::ContentSpan { .. })
    ));
}

#[test]
fn batched_pooling_matches_one_prompt_at_a_time() {
    let prompts: Vec<String> = [
        "How do I pick a lock?",
        "Write a haiku about the sea, with the word 'salt' in the second line.",
        "Hi",
        "Explain how vaccines train the immune system, in three short paragraphs for a child.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sae = [common::random_topk_sae(Resid::In(6), 576, 96, 5)];
    for pooling in [Pooling::Mean, Pooling::Last, Pooling::Max] {
        let one = collect(model(), &sae, &prompts, pooling, 1, &mut |_| {}).unwrap();
        let all = collect(model(), &sae, &prompts, pooling, 4, &mut |_| {}).unwrap();
        let hook = Resid::In(6);
        for (what, a, b) in [
            ("features", &one.features[&hook], &all.features[&hook]),
            ("residual", &one.resid[&hook], &all.resid[&hook]),
        ] {
            assert_eq!(a.len(), prompts.len());
            assert_close(
                &format!("{pooling:?} {what}"),
                &b.values,
                &a.values,
                1e-4,
                1e-4,
            );
        }
        // each prompt fires some features, and TopK caps how many per token
        let f = &all.features[&hook];
        for p in 0..prompts.len() {
            let fired = f.fired[p * f.width..(p + 1) * f.width]
                .iter()
                .filter(|x| **x)
                .count();
            assert!(fired >= 8, "prompt {p}: {fired} features fired");
        }
    }
}
