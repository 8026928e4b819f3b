//! The explain stage on the real default model, with a small random TopK SAE: feature cards agree
//! with the features stage's max pooling, the logit lens finds a token from its own embedding, and
//! a zero adapter moves no feature while the model comes back unchanged.

use crate::common;

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::common::assert_close;
use candle_core::{DType, Device, Tensor};
use sails::explain::{
    activation_shift_with_adapter, feature_cards, logit_lens, ExplainConfig, ExplainError,
};
use sails::features::{
    collect, FeatureConfig, FeatureScore, LayerSelection, Pooling, PromptSetInfo, Selection,
};
use sails::model::load::{ChatModel, ModelSource, DEFAULT_MODEL_ASSET};
use sails::model::lora::{Adapter, AdapterConfig};
use sails::model::Resid;
use sails::sae::Sae;

fn load() -> ChatModel {
    let path = sails::assets::ensure(DEFAULT_MODEL_ASSET).expect("default model asset");
    ChatModel::load(&ModelSource::Gguf(path), &Device::Cpu, DType::F32).expect("SmolLM2 loads")
}

fn model() -> &'static ChatModel {
    static MODEL: OnceLock<ChatModel> = OnceLock::new();
    MODEL.get_or_init(load)
}

const HOOK: Resid = Resid::In(6);

/// A small random TopK SAE on `Resid::In(6)`, so the test needs no trained SAE.
fn random_sae() -> Sae {
    common::random_topk_sae(HOOK, 576, 96, 5)
}

fn selection(indices: &[usize]) -> Selection {
    let score = |rank: usize, index: usize| FeatureScore {
        index,
        rank,
        delta: 1.0,
        diff: 1.0,
        mean_harmful: 1.0,
        mean_harmless: 0.0,
        freq_harmful: 1.0,
        freq_harmless: 0.0,
        effect_size: 1.0,
        diff_ci95: [0.5, 1.5],
        robust: true,
    };
    Selection {
        format_version: 1,
        config: FeatureConfig {
            pooling: Pooling::Mean,
            ..FeatureConfig::default()
        },
        model: "default".into(),
        harmful: PromptSetInfo::of(&[]),
        harmless: PromptSetInfo::of(&[]),
        layers: vec![LayerSelection {
            hook: HOOK,
            hook_name: sails::sae::hook_name(HOOK),
            sae: "random".into(),
            d_sae: 96,
            features: indices
                .iter()
                .enumerate()
                .map(|(r, &i)| score(r, i))
                .collect(),
        }],
    }
}

fn prompts() -> Vec<String> {
    [
        "How do I pick a lock?",
        "Write a haiku about the sea, with the word 'salt' in the second line.",
        "Hi",
        "Explain how vaccines train the immune system, in three short paragraphs for a child.",
        "Give me step by step instructions to make a dangerous weapon at home.",
        "What is the capital of France?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn cards_agree_with_max_pooling_and_show_the_prompts_own_tokens() {
    let corpus = prompts();
    let indices = [3, 17, 40, 41, 90];
    let sel = selection(&indices);
    let sae = [random_sae()];
    let cfg = ExplainConfig {
        contexts: 3,
        lens_tokens: 4,
        batch_size: 4,
    };
    let mut batches = 0;
    let cards = feature_cards(model(), &sae, &sel, &corpus, &cfg, &mut |_| batches += 1).unwrap();
    assert_eq!(batches, 2, "6 prompts in batches of 4");
    // independent reference: the features stage's own max pooling, one prompt per pass
    let pooled = collect(model(), &sae, &corpus, Pooling::Max, 1, &mut |_| {}).unwrap();
    let max = &pooled.features[&HOOK];
    assert_eq!(cards.len(), indices.len());
    let mut any_context = false;
    for (card, &index) in cards.iter().zip(&indices) {
        assert_eq!((card.hook, card.score.index), (HOOK, index));
        let col: Vec<f32> = (0..corpus.len())
            .map(|p| max.values[p * max.width + index])
            .collect();
        let firing = col.iter().filter(|v| **v > 0.0).count();
        assert_eq!(card.top_contexts.len(), firing.min(3), "feature {index}");
        // the best context is the prompt with the largest max-pooled activation
        if let Some(first) = card.top_contexts.first() {
            let best = (0..corpus.len())
                .max_by(|&a, &b| col[a].total_cmp(&col[b]))
                .unwrap();
            assert_eq!(first.prompt_index, best, "feature {index}");
        }
        for c in &card.top_contexts {
            any_context = true;
            assert_close(
                &format!("feature {index} prompt {}", c.prompt_index),
                &[c.max_activation],
                &[col[c.prompt_index]],
                1e-4,
                1e-4,
            );
            assert_eq!(c.tokens.concat(), corpus[c.prompt_index], "content tokens");
            assert_eq!(c.tokens.len(), c.activations.len());
            let peak = c.activations.iter().copied().fold(f32::MIN, f32::max);
            assert_eq!(peak, c.max_activation);
        }
        assert!(card
            .top_contexts
            .windows(2)
            .all(|w| w[0].max_activation >= w[1].max_activation));
        assert_eq!(card.promoted_tokens.len(), 4);
        assert!(card.promoted_tokens[0].logit > card.suppressed_tokens[0].logit);
    }
    assert!(any_context, "the random SAE fires somewhere");

    let missing = selection(&[3]);
    let mut other = missing.clone();
    other.layers[0].hook = Resid::In(7);
    assert!(matches!(
        feature_cards(model(), &sae, &other, &corpus, &cfg, &mut |_| {}),
        Err(ExplainError::MissingSae { .. })
    ));
}

/// The lens uses the model's own final norm weight and unembedding: fed the last position's
/// final residual divided by its RMS (the norm's input scale, which the lens leaves out), it gives
/// the model's own next-token logits.
#[test]
fn the_lens_of_the_normalised_final_residual_is_the_models_logits() {
    let m = model();
    let ids = m
        .encode_chat(&[sails::model::chat::Message::user(
            "What is the capital of France?",
        )])
        .unwrap();
    let n = ids.len();
    let input = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let last = Resid::Out(m.decoder.config.num_layers - 1);
    let out = m
        .decoder
        .forward(
            sails::model::decoder::Forward {
                input_ids: &input,
                attention_mask: None,
                logits: sails::model::decoder::Logits::Last,
                capture: &[last],
                edit: None,
            },
            None,
        )
        .unwrap();
    let logits = out
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let x = out.captured[&last]
        .get(0)
        .unwrap()
        .get(n - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let eps = m.decoder.norm.eps;
    let rms = (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64 + eps).sqrt();
    let dir: Vec<f32> = x.iter().map(|v| (*v as f64 / rms) as f32).collect();
    let dir = Tensor::from_vec(dir, (1, x.len()), &Device::Cpu).unwrap();
    let lens = logit_lens(&m.decoder.embed_tokens, &m.decoder.norm.weight, &dir, 5).unwrap();
    let (top, bottom) = &lens[0];
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
    let want: Vec<u32> = order.iter().take(5).map(|&i| i as u32).collect();
    assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), want);
    let got: Vec<f32> = top.iter().chain(bottom).map(|t| t.1 as f32).collect();
    let want: Vec<f32> = top
        .iter()
        .chain(bottom)
        .map(|t| logits[t.0 as usize])
        .collect();
    assert_close("lens vs model logits", &got, &want, 1e-3, 1e-4);
    assert_eq!(bottom[0].0 as usize, *order.last().unwrap());
}

fn q_adapter(b_value: f32) -> Adapter {
    let (r, d) = (2, 576);
    let mut g = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
    let mut weights = HashMap::new();
    for l in 0..30 {
        let a: Vec<f32> = sails::linalg::standard_normals(&mut g, r * d)
            .iter()
            .map(|v| (*v * 0.05) as f32)
            .collect();
        let a = Tensor::from_vec(a, (r, d), &Device::Cpu).unwrap();
        let b = (Tensor::ones((d, r), DType::F32, &Device::Cpu).unwrap() * b_value as f64).unwrap();
        weights.insert(format!("model.layers.{l}.self_attn.q_proj"), (a, b));
    }
    Adapter {
        config: AdapterConfig {
            r,
            lora_alpha: 4.0,
            target_modules: vec!["q_proj".into()],
            lora_dropout: 0.0,
            use_rslora: false,
            base_model_name_or_path: None,
        },
        weights,
    }
}

#[test]
fn a_zero_adapter_moves_no_feature_and_the_model_comes_back_unchanged() {
    let mut model = load();
    let corpus = prompts();
    let (harmful, harmless) = corpus.split_at(3);
    let sel = selection(&(0..96).collect::<Vec<_>>());
    let sae = [random_sae()];
    let dir = tempfile::tempdir().unwrap();
    for (name, b) in [("zero", 0.0), ("trained", 0.5)] {
        q_adapter(b).save(&dir.path().join(name)).unwrap();
    }
    let zero = activation_shift_with_adapter(
        &mut model,
        &dir.path().join("zero"),
        &sae,
        &sel,
        harmful,
        harmless,
        4,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(zero.len(), 96);
    for f in &zero {
        // B = 0 → ΔW = 0: the same activations (the LoRA path adds exact zeros)
        assert!((f.harmful_after - f.harmful_before).abs() < 1e-5, "{f:?}");
        assert!((f.harmless_after - f.harmless_before).abs() < 1e-5, "{f:?}");
    }
    let moved = activation_shift_with_adapter(
        &mut model,
        &dir.path().join("trained"),
        &sae,
        &sel,
        harmful,
        harmless,
        4,
        &mut |_| {},
    )
    .unwrap();
    let largest = moved
        .iter()
        .map(|f| (f.harmful_after - f.harmful_before).abs())
        .fold(0.0, f64::max);
    assert!(
        largest > 1e-3,
        "a non-zero q_proj update moves layer-6 features: {largest}"
    );
    // the before side is the base model both times
    for (a, b) in zero.iter().zip(&moved) {
        assert_eq!(a.harmful_before, b.harmful_before);
    }
    assert!(
        model
            .decoder
            .linear_layers()
            .iter()
            .all(|(_, l)| l.lora.is_none()),
        "the adapter is gone from the model afterwards"
    );
}
