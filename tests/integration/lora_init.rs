//! The LoRA-initialisation stage on the tiny Llama: every init except full fine-tuning leaves the
//! model's logits bit-identical, the subspace init puts `U_l` where DESIGN.md §1 step 5 says, a
//! frozen basis gets no gradient while every trainable tensor does, unmatched targets are named.

use crate::common;

use std::collections::BTreeMap;

use crate::common::golden_dir;
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sails::lora::{inject, LoraConfig, LoraError, LoraInit, Trainable};
use sails::model::config::DecoderConfig;
use sails::model::decoder::{Decoder, Forward};
use sails::model::weights::{load_safetensors_file, WeightMap};
use sails::train::{loss_and_grads, AdamW, Batch, TokenizedExample};

const ALL7: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn tiny() -> Decoder {
    let dir = golden_dir().join("tiny-llama");
    let cfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut w = WeightMap::from_safetensors_dir(&dir, &Device::Cpu).unwrap();
    Decoder::load(cfg, &mut w, &Device::Cpu, DType::F32).unwrap()
}

fn inputs() -> (Tensor, Tensor) {
    let t = load_safetensors_file(
        &golden_dir().join("tiny-llama/inputs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (
        t["input_ids"].to_dtype(DType::U32).unwrap(),
        t["attention_mask"].to_dtype(DType::U32).unwrap(),
    )
}

fn logits(model: &Decoder) -> Vec<f32> {
    let (ids, mask) = inputs();
    model
        .forward(Forward::logits(&ids, Some(&mask)), None)
        .unwrap()
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// An orthonormal `(64, r)` basis from a seeded Gram–Schmidt.
fn orthonormal(seed: u64, d: usize, r: usize) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cols: Vec<Vec<f64>> = Vec::new();
    while cols.len() < r {
        let mut v: Vec<f64> = (0..d).map(|_| rng.random::<f64>() - 0.5).collect();
        for c in &cols {
            let dot: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(c).for_each(|(a, b)| *a -= dot * b);
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        cols.push(v.into_iter().map(|x| x / n).collect());
    }
    let flat: Vec<f32> = (0..d)
        .flat_map(|i| cols.iter().map(move |c| c[i] as f32).collect::<Vec<_>>())
        .collect();
    Tensor::from_vec(flat, (d, r), &Device::Cpu).unwrap()
}

fn subspace(freeze_basis: bool) -> LoraInit {
    // A basis for layer 0 only: layer 1 must take it (nearest layer).
    LoraInit::Subspace {
        bases: BTreeMap::from([(0, orthonormal(3, 64, 4))]),
        freeze_basis,
    }
}

fn config(init: LoraInit) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: ALL7.map(String::from).to_vec(),
        rslora: false,
        init,
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn lora_at_init_leaves_logits_bit_identical() {
    let base = logits(&tiny());
    for init in [
        LoraInit::Kaiming,
        LoraInit::Gaussian,
        subspace(false),
        subspace(true),
    ] {
        let name = init.name();
        let mut model = tiny();
        let trainable = inject(&mut model, &config(init), 7).unwrap();
        // Applied as plain tensors (the inference path), ΔW = B·A contributes exactly 0.
        let adapter = trainable.to_adapter().unwrap();
        assert_eq!(adapter.weights.len(), 14, "{name}");
        let mut fresh = tiny();
        adapter
            .apply(&mut fresh, std::path::Path::new(name))
            .unwrap();
        assert_eq!(logits(&fresh), base, "{name}: logits changed at init");
        // The training path (Vars, differentiable ops) agrees to rounding.
        let train_path = logits(&model);
        let worst = train_path
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{name}: training path off by {worst}");
    }
}

#[test]
fn kaiming_draws_a_within_one_over_sqrt_in_and_zero_b() {
    let mut model = tiny();
    let tr = inject(&mut model, &config(LoraInit::Kaiming), 1).unwrap();
    let a =
        values(tr.vars["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].as_tensor());
    // down_proj: in = 128 → bound 1/√128 ≈ 0.0884; 512 draws reach near it.
    let max = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max <= 1.0 / 128f32.sqrt() && max > 0.08, "max |A| {max}");
    let b =
        values(tr.vars["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].as_tensor());
    assert!(b.iter().all(|&x| x == 0.0));
    // Same seed, same draws; another seed, others.
    let again = inject(&mut tiny(), &config(LoraInit::Kaiming), 1).unwrap();
    let other = inject(&mut tiny(), &config(LoraInit::Kaiming), 2).unwrap();
    let key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    assert_eq!(
        values(tr.vars[key].as_tensor()),
        values(again.vars[key].as_tensor())
    );
    assert_ne!(
        values(tr.vars[key].as_tensor()),
        values(other.vars[key].as_tensor())
    );
}

#[test]
fn subspace_puts_the_basis_on_the_residual_side_and_uses_the_nearest_layer() {
    let u = orthonormal(3, 64, 4);
    let ut = values(&u.t().unwrap().contiguous().unwrap());
    let mut model = tiny();
    let tr = inject(&mut model, &config(subspace(false)), 0).unwrap();
    for layer in 0..2 {
        let key =
            |m: &str, h: &str| format!("base_model.model.model.layers.{layer}.{m}.lora_{h}.weight");
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ] {
            assert_eq!(values(tr.vars[&key(m, "A")].as_tensor()), ut, "{m}: A = Uᵀ");
            assert!(values(tr.vars[&key(m, "B")].as_tensor())
                .iter()
                .all(|&x| x == 0.0));
        }
        for m in ["self_attn.o_proj", "mlp.down_proj"] {
            assert_eq!(
                values(tr.vars[&key(m, "B")].as_tensor()),
                values(&u),
                "{m}: B = U"
            );
            assert!(values(tr.vars[&key(m, "A")].as_tensor())
                .iter()
                .all(|&x| x == 0.0));
        }
    }
    assert_eq!(
        tr.provenance.basis_for_block,
        BTreeMap::from([(0, 0), (1, 0)])
    );
}

#[test]
fn unmatched_target_is_an_error_naming_it() {
    let mut cfg = config(LoraInit::Kaiming);
    cfg.targets.push("c_attn".into());
    match inject(&mut tiny(), &cfg, 0) {
        Err(e @ LoraError::NoMatchingModule { .. }) => assert!(e.to_string().contains("c_attn")),
        other => panic!("expected NoMatchingModule, got {other:?}"),
    }
    let wrong_shape = LoraInit::Subspace {
        bases: BTreeMap::from([(0, orthonormal(3, 64, 3))]),
        freeze_basis: false,
    };
    assert!(matches!(
        inject(&mut tiny(), &config(wrong_shape), 0),
        Err(LoraError::BasisShape { rank: 4, .. })
    ));
}

/// One training batch of the tiny model: the golden ids with made-up response spans.
fn tiny_batch() -> Batch {
    let (ids, _) = inputs();
    let rows = ids.to_vec2::<u32>().unwrap();
    let a = TokenizedExample {
        ids: rows[0].clone(),
        target_start: 5,
        target_end: 11,
        retain: false,
    };
    let b = TokenizedExample {
        ids: rows[1][3..].to_vec(),
        target_start: 5,
        target_end: 9,
        retain: false,
    };
    Batch::left_padded(&[&a, &b], 0, &Device::Cpu).unwrap()
}

/// After one AdamW step (so the zero factors are no longer zero), every trainable tensor gets a
/// finite, non-zero gradient; a frozen basis gets none and does not move.
fn assert_gradient_coverage(tr: &Trainable, model: &Decoder) {
    let params: Vec<_> = tr.vars.iter().collect();
    let batch = tiny_batch();
    let (_, grads) = loss_and_grads(model, &params, std::slice::from_ref(&batch), 0.0).unwrap();
    AdamW::new(0.9, 0.999, 1e-8, 0.0)
        .step(&params, &grads, 1e-2)
        .unwrap();
    let out = sails::train::response_token_loss(model, &batch).unwrap();
    let store = (out.sum / 10.0).unwrap().backward().unwrap();
    for (name, var) in &tr.vars {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let v = values(g);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(v.iter().any(|&x| x != 0.0), "{name}: zero gradient");
    }
    for (name, t) in &tr.frozen {
        assert!(
            store.get(t).is_none(),
            "{name}: frozen basis got a gradient"
        );
    }
}

#[test]
fn every_trainable_tensor_gets_a_gradient_and_a_frozen_basis_none() {
    for init in [
        LoraInit::Kaiming,
        subspace(false),
        subspace(true),
        LoraInit::Full,
    ] {
        let name = init.name();
        let mut model = tiny();
        let tr = inject(&mut model, &config(init), 5).unwrap();
        let expected = match name {
            "full" => 14,
            _ if !tr.frozen.is_empty() => 14,
            _ => 28,
        };
        assert_eq!(tr.vars.len(), expected, "{name}");
        let frozen_before: Vec<Vec<f32>> = tr.frozen.values().map(values).collect();
        assert_gradient_coverage(&tr, &model);
        let frozen_after: Vec<Vec<f32>> = tr.frozen.values().map(values).collect();
        assert_eq!(frozen_before, frozen_after, "{name}: frozen basis moved");
    }
}

#[test]
fn export_writes_peft_layout_and_provenance() {
    let mut model = tiny();
    let tr = inject(&mut model, &config(subspace(true)), 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tr.save(dir.path()).unwrap();
    let back = sails::model::lora::Adapter::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(back.weights.len(), 14);
    assert_eq!(back.config.r, 4);
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("sails_lora.json")).unwrap())
            .unwrap();
    assert_eq!(prov["init"], "subspace");
    assert_eq!(prov["freeze_basis"], true);
}

#[test]
fn full_fine_tuning_weights_saved_then_applied_reproduce_the_trained_model() {
    let mut trained = tiny();
    let trainable = inject(&mut trained, &config(LoraInit::Full), 0).unwrap();
    // move every trained weight away from the base by a known amount
    for var in trainable.vars.values() {
        var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    trainable.save(dir.path()).unwrap();
    let mut fresh = tiny();
    let before = logits(&fresh);
    let n = sails::lora::apply_full_weights(&mut fresh, dir.path(), 1.0).unwrap();
    assert_eq!(n, trainable.vars.len());
    // the trained model runs the differentiable path (its weights are Vars), the fresh one the
    // fused inference kernels: equal up to summation order
    common::assert_close(
        "full weights applied",
        &logits(&fresh),
        &logits(&trained),
        1e-4,
        1e-4,
    );
    assert_ne!(logits(&fresh), before, "the weights did change the model");
    // scale 0 is the base model bit for bit; scale 0.5 is halfway: W + 0.5·(1.5W − W) = 1.25·W
    let mut none = tiny();
    sails::lora::apply_full_weights(&mut none, dir.path(), 0.0).unwrap();
    assert_eq!(logits(&none), before);
    let mut half = tiny();
    sails::lora::apply_full_weights(&mut half, dir.path(), 0.5).unwrap();
    let base = tiny();
    let weights = |m: &sails::model::decoder::Decoder| -> Vec<f32> {
        m.linear_layers()
            .iter()
            .flat_map(|(_, l)| l.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let want: Vec<f32> = weights(&base)
        .iter()
        .zip(weights(&trained))
        .map(|(b, t)| if t == *b { *b } else { 1.25 * b })
        .collect();
    common::assert_close(
        "full weights at scale 0.5",
        &weights(&half),
        &want,
        1e-6,
        1e-6,
    );
    assert!(sails::lora::apply_full_weights(&mut tiny(), dir.path(), -1.0).is_err());
    // a weight that fits no module is an error naming it
    let bad: std::collections::HashMap<String, Tensor> = [(
        "model.layers.0.self_attn.nope.weight".to_string(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    )]
    .into_iter()
    .collect();
    sails::model::weights::save_safetensors_atomic(&bad, &dir.path().join("model.safetensors"))
        .unwrap();
    let err = sails::lora::apply_full_weights(&mut tiny(), dir.path(), 1.0).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}
