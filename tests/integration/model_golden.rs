//! Forward-pass parity with the float64 PyTorch/transformers references in `golden/tiny-*`:
//! logits, every hidden state and every raw layer output, on a left-padded batch.

use std::path::Path;

use crate::common::{assert_close, golden_dir, real_positions};
use candle_core::{DType, Device, Tensor};
use sails::model::config::DecoderConfig;
use sails::model::decoder::{Decoder, Forward, Logits};
use sails::model::weights::{load_safetensors_file, WeightMap};
use sails::model::Resid;

fn load_tiny(name: &str, config_file: &str) -> Decoder {
    let dir = golden_dir().join(name);
    let cfg = DecoderConfig::from_hf_file(&dir.join(config_file)).expect("config parses");
    let mut weights = WeightMap::from_safetensors_dir(&dir, &Device::Cpu).expect("weights load");
    Decoder::load(cfg, &mut weights, &Device::Cpu, DType::F32).expect("model builds")
}

struct Inputs {
    ids: Tensor,
    mask: Tensor,
    mask_rows: Vec<Vec<i64>>,
}

fn inputs(dir: &Path) -> Inputs {
    let t = load_safetensors_file(&dir.join("inputs.safetensors"), &Device::Cpu).unwrap();
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = t["attention_mask"].to_dtype(DType::U32).unwrap();
    let mask_rows = t["attention_mask"].to_vec2::<i64>().unwrap();
    Inputs {
        ids,
        mask,
        mask_rows,
    }
}

fn check_model(name: &str, config_file: &str) {
    let dir = golden_dir().join(name);
    let model = load_tiny(name, config_file);
    let reference =
        load_safetensors_file(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let inp = inputs(&dir);
    let n = model.config.num_layers;
    let mut capture: Vec<Resid> = (0..n).map(Resid::In).collect();
    capture.push(Resid::Out(n - 1));
    let out = model
        .forward(
            Forward {
                input_ids: &inp.ids,
                attention_mask: Some(&inp.mask),
                logits: Logits::All,
                capture: &capture,
                edit: None,
            },
            None,
        )
        .unwrap();
    // Tolerance from the golden README: |got − ref| ≤ 1e-4 + 1e-4·|ref|.
    let (atol, rtol) = (1e-4, 1e-4);
    let logits = out.logits.unwrap();
    assert_close(
        &format!("{name} logits"),
        &real_positions(&logits, &inp.mask_rows),
        &real_positions(&reference["logits"], &inp.mask_rows),
        atol,
        rtol,
    );
    let hidden = &reference["hidden_states"];
    for l in 0..n {
        assert_close(
            &format!("{name} hidden_states[{l}]"),
            &real_positions(&out.captured[&Resid::In(l)], &inp.mask_rows),
            &real_positions(&hidden.get(l).unwrap(), &inp.mask_rows),
            atol,
            rtol,
        );
    }
    let layer_out = &reference["layer_outputs"];
    for l in 0..n {
        let resid = if l + 1 < n {
            Resid::In(l + 1)
        } else {
            Resid::Out(n - 1)
        };
        assert_close(
            &format!("{name} layer_outputs[{l}]"),
            &real_positions(&out.captured[&resid], &inp.mask_rows),
            &real_positions(&layer_out.get(l).unwrap(), &inp.mask_rows),
            atol,
            rtol,
        );
    }
    // The last hidden_states entry is the final norm of the last raw output.
    let final_norm =
        candle_core::Module::forward(&model.norm, &out.captured[&Resid::Out(n - 1)]).unwrap();
    assert_close(
        &format!("{name} hidden_states[{n}] (final norm)"),
        &real_positions(&final_norm, &inp.mask_rows),
        &real_positions(&hidden.get(n).unwrap(), &inp.mask_rows),
        atol,
        rtol,
    );
}

#[test]
fn tiny_llama_matches_reference() {
    check_model("tiny-llama", "config.json");
}

#[test]
fn tiny_llama_v4_config_layout_matches_reference() {
    check_model("tiny-llama", "config.v4.json");
}

#[test]
fn tiny_qwen2_matches_reference() {
    check_model("tiny-qwen2", "config.json");
}

#[test]
fn tiny_qwen2_v4_config_layout_matches_reference() {
    check_model("tiny-qwen2", "config.v4.json");
}

#[test]
fn tiny_gemma2_matches_reference() {
    check_model("tiny-gemma2", "config.json");
}

#[test]
fn tiny_gemma2_v4_config_layout_matches_reference() {
    check_model("tiny-gemma2", "config.v4.json");
}

/// Decoding token by token through the KV cache gives the logits of one full forward pass,
/// padded row included (positions continue per sequence).
fn check_cache_matches_full_pass(name: &str) {
    let dir = golden_dir().join(name);
    let model = load_tiny(name, "config.json");
    let inp = inputs(&dir);
    let full = model
        .forward(Forward::logits(&inp.ids, Some(&inp.mask)), None)
        .unwrap()
        .logits
        .unwrap();
    let (_, t) = inp.ids.dims2().unwrap();
    let split = 7;
    let mut cache = sails::model::decoder::KvCache::new();
    let mut pieces = vec![model
        .forward(
            Forward::logits(
                &inp.ids.narrow(1, 0, split).unwrap(),
                Some(&inp.mask.narrow(1, 0, split).unwrap()),
            ),
            Some(&mut cache),
        )
        .unwrap()
        .logits
        .unwrap()];
    for i in split..t {
        let ids = inp.ids.narrow(1, i, 1).unwrap();
        let mask = inp.mask.narrow(1, i, 1).unwrap();
        pieces.push(
            model
                .forward(Forward::logits(&ids, Some(&mask)), Some(&mut cache))
                .unwrap()
                .logits
                .unwrap(),
        );
    }
    let stepped = Tensor::cat(&pieces, 1).unwrap();
    assert_close(
        &format!("{name} cached vs full"),
        &real_positions(&stepped, &inp.mask_rows),
        &real_positions(&full, &inp.mask_rows),
        1e-5,
        1e-5,
    );
}

#[test]
fn kv_cache_decoding_matches_full_pass_llama() {
    check_cache_matches_full_pass("tiny-llama");
}

#[test]
fn kv_cache_decoding_matches_full_pass_gemma2_sliding_window() {
    check_cache_matches_full_pass("tiny-gemma2");
}

#[test]
fn capture_only_pass_stops_early_and_matches_full_pass() {
    let dir = golden_dir().join("tiny-llama");
    let model = load_tiny("tiny-llama", "config.json");
    let inp = inputs(&dir);
    let reference =
        load_safetensors_file(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let out = model
        .forward(
            Forward {
                input_ids: &inp.ids,
                attention_mask: Some(&inp.mask),
                logits: Logits::None,
                capture: &[Resid::In(1)],
                edit: None,
            },
            None,
        )
        .unwrap();
    assert!(out.logits.is_none());
    assert_close(
        "resid_in[1] without logits",
        &real_positions(&out.captured[&Resid::In(1)], &inp.mask_rows),
        &real_positions(&reference["hidden_states"].get(1).unwrap(), &inp.mask_rows),
        1e-4,
        1e-4,
    );
}
