//! The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) against the float64 references in
//! `golden/smollm2-135m`: GGUF dequantisation, chat ids, logits, residual norms, greedy text.

use std::sync::OnceLock;

use crate::common::{assert_close, golden_dir};
use candle_core::{DType, Device, Tensor};
use sails::eval::capability::reply_logprobs;
use sails::eval::judge::refusal_logodds;
use sails::eval::{first_position_logodds, opening_ids};
use sails::model::chat::Message;
use sails::model::decoder::{Forward, Logits};
use sails::model::generate::{generate, generate_with_prompt_logits, GenerationConfig};
use sails::model::gguf::GgufFile;
use sails::model::load::{ChatModel, ModelSource, DEFAULT_MODEL_ASSET};
use sails::model::weights::load_safetensors_file;
use sails::model::Resid;
use serde_json::Value;

fn gguf_path() -> std::path::PathBuf {
    match std::env::var_os("SAILS_SMOLLM2_GGUF") {
        Some(p) => p.into(),
        None => sails::assets::ensure(DEFAULT_MODEL_ASSET).expect("default model asset"),
    }
}

fn model() -> &'static ChatModel {
    static MODEL: OnceLock<ChatModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        ChatModel::load(&ModelSource::Gguf(gguf_path()), &Device::Cpu, DType::F32)
            .expect("SmolLM2 loads")
    })
}

fn golden(file: &str) -> Value {
    let text = std::fs::read_to_string(golden_dir().join("smollm2-135m").join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `logits.safetensors`: the float64 reference's ids and logits, by prompt name.
fn golden_logits() -> std::collections::HashMap<String, Tensor> {
    load_safetensors_file(
        &golden_dir().join("smollm2-135m/logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn config_comes_from_gguf_metadata() {
    let cfg = &model().decoder.config;
    assert_eq!(
        (
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (cfg.intermediate_size, cfg.vocab_size, cfg.head_dim),
        (1536, 49152, 64)
    );
    assert_eq!(cfg.rope_theta, 100000.0);
    assert!((cfg.rms_norm_eps - 1e-5).abs() < 1e-10);
    assert!(cfg.tie_word_embeddings);
}

#[test]
fn chat_prompts_logits_norms_and_top20_match_reference() {
    let m = model();
    let prompts = golden("prompts.json");
    let logits = golden_logits();
    for p in prompts["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let messages: Vec<Message> = serde_json::from_value(p["messages"].clone()).unwrap();
        let ids = m.encode_chat(&messages).unwrap();
        assert_eq!(ids, u32s(&p["input_ids"]), "{name}: chat ids");
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let n = m.decoder.config.num_layers;
        let capture: Vec<Resid> = (0..n).map(Resid::In).chain([Resid::Out(n - 1)]).collect();
        let out = m
            .decoder
            .forward(
                Forward {
                    input_ids: &input,
                    attention_mask: None,
                    logits: Logits::All,
                    capture: &capture,
                    edit: None,
                },
                None,
            )
            .unwrap();
        let all = out.logits.unwrap().squeeze(0).unwrap(); // (t, vocab)
        let t = ids.len();
        let last = all.get(t - 1).unwrap().to_vec1::<f32>().unwrap();
        // README tolerance for an f32 forward over dequantised weights: 1e-3 absolute.
        let want_last = logits[&format!("{name}.logits_last")]
            .to_vec1::<f32>()
            .unwrap();
        assert_close(&format!("{name} last logits"), &last, &want_last, 1e-3, 0.0);
        assert_eq!(
            sails::model::generate::argmax(&last) as u64,
            p["argmax_last"].as_u64().unwrap(),
            "{name}: argmax"
        );
        // Top-20 at every position, looked up at the reference ids (lists hold exact ties).
        let top_ids = logits[&format!("{name}.top20_ids")]
            .to_vec2::<i64>()
            .unwrap();
        let top_logits = logits[&format!("{name}.top20_logits")]
            .to_vec2::<f32>()
            .unwrap();
        let rows = all.to_vec2::<f32>().unwrap();
        for pos in 0..t {
            let got: Vec<f32> = top_ids[pos]
                .iter()
                .map(|&id| rows[pos][id as usize])
                .collect();
            assert_close(
                &format!("{name} top20 at {pos}"),
                &got,
                &top_logits[pos],
                1e-3,
                0.0,
            );
        }
        // Residual norms at the last position, relative 1e-4.
        let want_norms = f64s(&p["residual_l2_norm_last_position"]);
        for (l, want) in want_norms.iter().enumerate() {
            let resid = if l < n {
                Resid::In(l)
            } else {
                Resid::Out(n - 1)
            };
            let h = out.captured[&resid].squeeze(0).unwrap().get(t - 1).unwrap();
            let norm = h
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt() as f64;
            assert!(
                (norm - want).abs() <= 1e-4 * want,
                "{name}: residual norm {l}: {norm} vs {want}"
            );
        }
    }
}

#[test]
fn raw_prompt_logits_at_every_position_match_reference() {
    let m = model();
    let logits = golden_logits();
    let ids = logits["short_raw.input_ids"].to_dtype(DType::U32).unwrap();
    assert_eq!(
        m.tokenizer
            .encode("The capital of France is", false)
            .unwrap(),
        ids.to_vec1::<u32>().unwrap()
    );
    let out = m
        .decoder
        .forward(Forward::logits(&ids.unsqueeze(0).unwrap(), None), None)
        .unwrap();
    let got = out
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = logits["short_raw.logits_all"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_close("short_raw logits", &got, &want, 1e-3, 0.0);
}

#[test]
fn batched_greedy_continuations_are_identical_to_reference() {
    let m = model();
    let prompts = golden("prompts.json");
    let items = prompts["prompts"].as_array().unwrap();
    let ids: Vec<Vec<u32>> = items.iter().map(|p| u32s(&p["input_ids"])).collect();
    // All six at once: different lengths, so the batch is left-padded.
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        ..Default::default()
    };
    let out = generate(&m.decoder, &m.tokenizer, &ids, &cfg, |_, _| {}).unwrap();
    for (p, g) in items.iter().zip(&out) {
        let name = p["name"].as_str().unwrap();
        let want = &p["greedy_float64"];
        assert_eq!(g.ids, u32s(&want["ids"]), "{name}: greedy ids");
        assert_eq!(g.text, want["text"].as_str().unwrap(), "{name}: text");
    }
}

/// Sequences that join a batch already decoding, and leave it when they end, get the float64
/// reference's greedy continuations: each one sees only its own tokens whatever else shares
/// the batch. A sequence dropped half-way changes nothing for the others, and a seeded sampled
/// one gives what a one-prompt `generate` gives with that seed.
#[test]
fn sequences_joining_a_running_batch_keep_the_reference_continuations() {
    use sails::model::batcher::{Batcher, NewSequence, SequenceParams};
    use sails::model::generate::Sampling;
    let m = model();
    let prompts = golden("prompts.json");
    let items = prompts["prompts"].as_array().unwrap();
    let greedy = |n| SequenceParams {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        stop_strings: Vec::new(),
    };
    let sampled = SequenceParams {
        max_new_tokens: 12,
        sampling: Sampling::TopP {
            temperature: 0.8,
            top_p: 0.9,
            seed: 7,
        },
        stop_strings: Vec::new(),
    };
    let mut batcher = Batcher::new(&m.decoder, &m.tokenizer);
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); items.len() + 2];
    let mut finished = vec![false; items.len() + 2];
    let mut streamed = vec![String::new(); items.len() + 2];
    // Prompts 0-1 start together; 2-3 join after 5 steps, 4-5 after 12; a seventh sequence (a
    // copy of prompt 0) is dropped after 3 steps and an eighth is sampled.
    let ids = |k: usize| u32s(&items[k]["input_ids"]);
    let mut joins: Vec<(usize, Vec<NewSequence>)> = vec![
        (
            0,
            vec![
                (0, ids(0), greedy(40)),
                (1, ids(1), greedy(40)),
                (6, ids(0), greedy(40)),
            ],
        ),
        (
            5,
            vec![
                (2, ids(2), greedy(40)),
                (3, ids(3), greedy(40)),
                (7, ids(4), sampled.clone()),
            ],
        ),
        (12, vec![(4, ids(4), greedy(40)), (5, ids(5), greedy(40))]),
    ];
    joins.reverse();
    let mut step = 0;
    while !joins.is_empty() || !batcher.is_empty() {
        if joins.last().is_some_and(|(at, _)| *at == step) {
            let (_, new) = joins.pop().unwrap();
            batcher.admit(new).unwrap();
        }
        if step == 3 {
            assert!(
                !finished[6],
                "sequence 6 is still decoding when it is dropped"
            );
            batcher.cancel(6).unwrap();
        }
        for out in batcher.step().unwrap() {
            let k = out.id as usize;
            assert!(!finished[k], "sequence {k} stepped after it finished");
            streamed[k].push_str(&out.delta);
            if let Some(g) = out.finished {
                assert_eq!(
                    streamed[k], g.text,
                    "sequence {k}: the deltas make the text"
                );
                got[k] = g.ids;
                finished[k] = true;
            }
        }
        step += 1;
        assert!(step < 200, "the batch never emptied");
    }
    for (k, p) in items.iter().enumerate() {
        let name = p["name"].as_str().unwrap();
        assert_eq!(
            got[k],
            u32s(&p["greedy_float64"]["ids"]),
            "{name}: greedy ids"
        );
    }
    assert!(!finished[6], "a dropped sequence reports nothing more");
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        sampling: sampled.sampling.clone(),
        ..Default::default()
    };
    let alone = generate(&m.decoder, &m.tokenizer, &[ids(4)], &cfg, |_, _| {}).unwrap();
    assert_eq!(
        got[7], alone[0].ids,
        "seeded sampling as a one-prompt generate"
    );
}

/// The five prompts with the default system turn share their first 24 tokens, which the batch
/// computes once and copies to every row: the continuations stay the float64 reference's.
#[test]
fn shared_system_turn_computed_once_keeps_the_reference_continuations() {
    let m = model();
    let prompts = golden("prompts.json");
    let items: Vec<&serde_json::Value> = prompts["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] != "multi_turn_with_system")
        .collect();
    let ids: Vec<Vec<u32>> = items.iter().map(|p| u32s(&p["input_ids"])).collect();
    let shared = ids[0]
        .iter()
        .enumerate()
        .take_while(|&(i, t)| ids.iter().all(|p| p.get(i) == Some(t)))
        .count();
    assert_eq!(shared, 24);
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        ..Default::default()
    };
    let out = generate(&m.decoder, &m.tokenizer, &ids, &cfg, |_, _| {}).unwrap();
    for (p, g) in items.iter().zip(&out) {
        let want = &p["greedy_float64"];
        assert_eq!(g.ids, u32s(&want["ids"]), "{}: greedy ids", p["name"]);
    }
    // The refusal score the evaluation takes from that prefill equals a plain forward's.
    let openings = opening_ids(m).unwrap();
    let plain = first_position_logodds(m, &ids, &openings).unwrap();
    let mut shared = vec![f64::NAN; ids.len()];
    let one_token = GenerationConfig {
        max_new_tokens: 1,
        ..Default::default()
    };
    generate_with_prompt_logits(
        &m.decoder,
        &m.tokenizer,
        &ids,
        &one_token,
        |row, logits| shared[row] = refusal_logodds(logits, &openings),
        |_, _| {},
    )
    .unwrap();
    for (a, b) in shared.iter().zip(&plain) {
        assert!((a - b).abs() < 1e-4, "refusal log-odds {a} vs {b}");
    }
}

#[test]
fn corrupt_gguf_files_give_clear_errors() {
    let bytes = std::fs::read(gguf_path()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cut.gguf");
    for cut in [10, 5_000, bytes.len() / 2, bytes.len() - 10] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = match ChatModel::load(&ModelSource::Gguf(path.clone()), &Device::Cpu, DType::F32)
        {
            Ok(_) => panic!("cut at {cut} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("cut.gguf")
                && (err.contains("truncated") || err.contains("not a readable GGUF")),
            "cut {cut}: {err}"
        );
    }
    let mut bad = bytes[..4096].to_vec();
    bad[..4].copy_from_slice(b"NOPE");
    std::fs::write(&path, &bad).unwrap();
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("not a readable GGUF"),
        "{err}"
    );
}

/// Greedy continuations of the six golden prompts with the given decode weights, and how many
/// are identical to the float64 reference.
fn greedy_with_decode_weights(
    weights: sails::model::decoder::DecodeWeights,
) -> (usize, Vec<usize>) {
    let mut m = ChatModel::load(&ModelSource::Gguf(gguf_path()), &Device::Cpu, DType::F32).unwrap();
    m.decoder.set_decode_weights(weights).unwrap();
    let prompts = golden("prompts.json");
    let items = prompts["prompts"].as_array().unwrap();
    let ids: Vec<Vec<u32>> = items.iter().map(|p| u32s(&p["input_ids"])).collect();
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        ..Default::default()
    };
    let out = generate(&m.decoder, &m.tokenizer, &ids, &cfg, |_, _| {}).unwrap();
    let mut identical = 0;
    let mut agree_prefix = Vec::new();
    for (p, g) in items.iter().zip(&out) {
        let want = u32s(&p["greedy_float64"]["ids"]);
        identical += usize::from(g.ids == want);
        agree_prefix.push(g.ids.iter().zip(&want).take_while(|(a, b)| a == b).count());
    }
    (identical, agree_prefix)
}

#[test]
fn bf16_decode_weights_stay_close_to_reference() {
    let (identical, agree_prefix) =
        greedy_with_decode_weights(sails::model::decoder::DecodeWeights::Bf16);
    eprintln!("bf16 decode: {identical}/6 greedy continuations identical; agreeing prefix lengths {agree_prefix:?}");
    // Measured on this machine class: 6/6 identical (the smallest reference margin is 0.033).
    assert_eq!(identical, 6, "agreeing prefixes {agree_prefix:?}");
}

#[test]
fn gguf_block_decode_weights_give_the_reference_continuations() {
    // The blocks are the exact source of the f32 weights, so nothing but summation order differs.
    let (identical, agree_prefix) =
        greedy_with_decode_weights(sails::model::decoder::DecodeWeights::Gguf);
    assert_eq!(identical, 6, "agreeing prefixes {agree_prefix:?}");
}

#[test]
fn gguf_block_decode_weights_cover_every_projection_and_the_head() {
    let mut m = ChatModel::load(&ModelSource::Gguf(gguf_path()), &Device::Cpu, DType::F32).unwrap();
    m.decoder
        .set_decode_weights(sails::model::decoder::DecodeWeights::Gguf)
        .unwrap();
    let layers = m.decoder.linear_layers();
    assert_eq!(layers.len(), 30 * 7);
    for (name, linear) in &layers {
        assert!(
            matches!(
                linear.decode_weight,
                Some(sails::model::layers::DecodeWeight::Blocks(_))
            ),
            "{name} decodes from f32"
        );
    }
    // Merging an update makes the blocks stale: that layer falls back to its f32 weight.
    let (_, linear) = m.decoder.linear_layers_mut().into_iter().next().unwrap();
    let w = (&linear.weight * 1.01).unwrap();
    linear.set_weight(w).unwrap();
    assert!(linear.decode_weight.is_none() && linear.source_blocks().is_none());
}

/// Reply scoring (capability suite) against log-probabilities computed in float64 from the
/// reference logits: replies of several lengths, batched beside a longer sequence so that rows
/// are left-padded, sorted by length and put back in the order given.
#[test]
fn reply_logprobs_match_the_reference_logits_in_any_batch() {
    let m = model();
    let golden = golden_logits();
    let ids = golden["short_raw.input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let logits = golden["short_raw.logits_all"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    // log p(ids[j] | ids[..j]) from the reference logits at position j − 1
    let reference = |j: usize| {
        let row = &logits[j - 1];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let log_z = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        row[ids[j] as usize] - log_z
    };
    let longer = m
        .tokenizer
        .encode(
            "A much longer prompt, so that the others are padded on the left:",
            false,
        )
        .unwrap();
    assert!(longer.len() > ids.len());
    let mut items = vec![(longer, ids[1..].to_vec())];
    for split in [1, ids.len() - 1, 2] {
        items.push((ids[..split].to_vec(), ids[split..].to_vec()));
    }
    for batch_size in [1, 2, 4] {
        let got = reply_logprobs(m, &items, batch_size).unwrap();
        assert_eq!(got.len(), items.len());
        for (k, (prompt, reply)) in items.iter().enumerate().skip(1) {
            let want: f64 = (prompt.len()..ids.len()).map(reference).sum();
            assert_eq!(got[k].1, reply.len());
            assert!(
                (got[k].0 - want).abs() <= 2e-3 * reply.len() as f64,
                "batch {batch_size}, item {k}: {} vs {want}",
                got[k].0
            );
        }
        assert!(got[0].0.is_finite() && got[0].0 < 0.0);
    }
    // Prompts that share a beginning (here the chat template's system turn, and the whole
    // request for the first three): it runs once and every batch starts from its cache. Each
    // item scored alone, which shares nothing and is checked above, is the reference.
    let mut shared = Vec::new();
    for (prompt, reply) in [
        ("Name a colour.", "Blue."),
        ("Name a colour.", "I'd rather not say, but green is nice."),
        (
            "Name a colour.",
            "Red, as in a ripe tomato or a fire engine.",
        ),
        ("What is 2 + 2?", "4"),
    ] {
        shared.push(sails::eval::capability::reply_ids(m, prompt, reply, 32).unwrap());
    }
    let alone: Vec<f64> = shared
        .iter()
        .map(|item| reply_logprobs(m, std::slice::from_ref(item), 1).unwrap()[0].0)
        .collect();
    for batch_size in [1, 2, 4] {
        let got = reply_logprobs(m, &shared, batch_size).unwrap();
        for (k, (want, (_, reply))) in alone.iter().zip(&shared).enumerate() {
            assert_eq!(got[k].1, reply.len());
            assert!(
                (got[k].0 - want).abs() <= 1e-3 * reply.len() as f64,
                "shared prefix, batch {batch_size}, item {k}: {} vs {want}",
                got[k].0
            );
        }
    }
}
