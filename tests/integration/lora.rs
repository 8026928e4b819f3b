//! LoRA slots and PEFT adapters against the PEFT references in `golden/tiny-llama-lora`, plus the
//! gradient properties the trainer relies on.

use std::collections::HashMap;

use crate::common::{assert_close, golden_dir, real_positions};
use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sails::model::config::DecoderConfig;
use sails::model::decoder::{Decoder, Forward};
use sails::model::layers::LoraSlot;
use sails::model::lora::{merge_into, Adapter};
use sails::model::weights::{load_safetensors_file, WeightMap};

fn tiny_llama(dtype: DType) -> Decoder {
    let dir = golden_dir().join("tiny-llama");
    let cfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut w = WeightMap::from_safetensors_dir(&dir, &Device::Cpu).unwrap();
    Decoder::load(cfg, &mut w, &Device::Cpu, dtype).unwrap()
}

fn tiny_inputs() -> (Tensor, Tensor, Vec<Vec<i64>>) {
    let t = load_safetensors_file(
        &golden_dir().join("tiny-llama/inputs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (
        t["input_ids"].to_dtype(DType::U32).unwrap(),
        t["attention_mask"].to_dtype(DType::U32).unwrap(),
        t["attention_mask"].to_vec2::<i64>().unwrap(),
    )
}

fn logits(model: &Decoder, ids: &Tensor, mask: &Tensor) -> Tensor {
    model
        .forward(Forward::logits(ids, Some(mask)), None)
        .unwrap()
        .logits
        .unwrap()
}

fn random_tensor(rng: &mut StdRng, shape: &[usize], scale: f32, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn peft_adapter_applied_and_merged_match_reference() {
    let dir = golden_dir().join("tiny-llama-lora");
    let reference =
        load_safetensors_file(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let (ids, mask, rows) = tiny_inputs();
    let adapter = Adapter::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(adapter.weights.len(), 14);
    assert_eq!(adapter.config.scale(), 2.0);
    let mut model = tiny_llama(DType::F32);
    adapter.apply(&mut model, &dir).unwrap();
    // Tolerance from the golden README: 1e-4 + 1e-4·|ref| on both paths.
    assert_close(
        "with adapter",
        &real_positions(&logits(&model, &ids, &mask), &rows),
        &real_positions(&reference["logits_with_adapter"], &rows),
        1e-4,
        1e-4,
    );

    assert_eq!(merge_into(&mut model).unwrap(), 14);
    assert_close(
        "merged",
        &real_positions(&logits(&model, &ids, &mask), &rows),
        &real_positions(&reference["logits_merged"], &rows),
        1e-4,
        1e-4,
    );
    let merged =
        load_safetensors_file(&dir.join("merged_weights.safetensors"), &Device::Cpu).unwrap();
    let ours: HashMap<String, Tensor> = model
        .linear_layers()
        .into_iter()
        .map(|(n, l)| (format!("{n}.weight"), l.weight.clone()))
        .collect();
    for (name, want) in &merged {
        let got = ours[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close(
            name,
            &got,
            &want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn adapter_scale_multiplies_the_update() {
    let dir = golden_dir().join("tiny-llama-lora");
    let reference =
        load_safetensors_file(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let (ids, mask, rows) = tiny_inputs();
    let adapter = Adapter::load(&dir, &Device::Cpu).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scaled = |s: f64| {
        let mut model = tiny_llama(DType::F32);
        adapter.apply_scaled(&mut model, &dir, s).unwrap();
        model
    };
    // Scale 1 is the adapter as `apply` puts it in, bit for bit, and PEFT's logits.
    let mut plain = tiny_llama(DType::F32);
    adapter.apply(&mut plain, &dir).unwrap();
    let one = logits(&scaled(1.0), &ids, &mask);
    assert_eq!(flat(&one), flat(&logits(&plain, &ids, &mask)));
    // Tolerance from the golden README: 1e-4 + 1e-4·|ref|.
    assert_close(
        "scale 1",
        &real_positions(&one, &rows),
        &real_positions(&reference["logits_with_adapter"], &rows),
        1e-4,
        1e-4,
    );
    // Scale 0 is the base model: bit-identical to no adapter, and PEFT's base logits.
    let zero = logits(&scaled(0.0), &ids, &mask);
    assert_eq!(
        flat(&zero),
        flat(&logits(&tiny_llama(DType::F32), &ids, &mask))
    );
    assert_close(
        "scale 0",
        &real_positions(&zero, &rows),
        &real_positions(&reference["logits_base"], &rows),
        1e-4,
        1e-4,
    );
    // Scale 0.5 halves ΔW: merged weights are W + ½·(W_merged − W) with PEFT's W_merged.
    let mut half = scaled(0.5);
    assert_eq!(merge_into(&mut half).unwrap(), 14);
    let base: HashMap<String, Tensor> = tiny_llama(DType::F32)
        .linear_layers()
        .into_iter()
        .map(|(n, l)| (format!("{n}.weight"), l.weight.clone()))
        .collect();
    let ours: HashMap<String, Tensor> = half
        .linear_layers()
        .into_iter()
        .map(|(n, l)| (format!("{n}.weight"), l.weight.clone()))
        .collect();
    let merged =
        load_safetensors_file(&dir.join("merged_weights.safetensors"), &Device::Cpu).unwrap();
    for (name, full) in &merged {
        let w = flat(&base[name]);
        let want: Vec<f32> = w
            .iter()
            .zip(flat(full))
            .map(|(w, m)| w + 0.5 * (m - w))
            .collect();
        // The README's weight tolerance.
        assert_close(name, &flat(&ours[name]), &want, 1e-6, 1e-6);
    }
    for bad in [-0.5, f64::NAN, f64::INFINITY] {
        let err = adapter
            .apply_scaled(&mut tiny_llama(DType::F32), &dir, bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("finite and >= 0"), "{bad}: {err}");
    }
}

#[test]
fn peft_adapter_round_trips_through_save_and_load() {
    let dir = golden_dir().join("tiny-llama-lora");
    let adapter = Adapter::load(&dir, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    adapter.save(out.path()).unwrap();
    let again = Adapter::load(out.path(), &Device::Cpu).unwrap();
    assert_eq!(again.config.r, adapter.config.r);
    assert_eq!(again.config.lora_alpha, adapter.config.lora_alpha);
    // Same key names and shapes as PEFT wrote.
    let golden =
        load_safetensors_file(&dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let ours =
        load_safetensors_file(&out.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut gk: Vec<_> = golden
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let mut ok: Vec<_> = ours
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    gk.sort();
    ok.sort();
    assert_eq!(gk, ok);
    let (ids, mask, _) = tiny_inputs();
    let mut a = tiny_llama(DType::F32);
    adapter.apply(&mut a, &dir).unwrap();
    let mut b = tiny_llama(DType::F32);
    again.apply(&mut b, out.path()).unwrap();
    let la = logits(&a, &ids, &mask)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let lb = logits(&b, &ids, &mask)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(la, lb);
}

#[test]
fn adapter_for_another_model_is_refused() {
    let dir = golden_dir().join("tiny-llama-lora");
    let adapter = Adapter::load(&dir, &Device::Cpu).unwrap();
    // tiny-qwen2 has the same module names but we cut a layer off the adapter's view by renaming.
    let mut renamed = adapter.clone();
    let (k, v) = renamed
        .weights
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    renamed.weights.remove(&k);
    renamed.weights.insert(k.replace("layers.", "layers.9"), v);
    let mut model = tiny_llama(DType::F32);
    let err = renamed.apply(&mut model, &dir).unwrap_err().to_string();
    assert!(
        err.contains("targeted but has no weights") || err.contains("not in this model"),
        "{err}"
    );
    // Wrong rank: shapes do not fit.
    let mut wrong = adapter.clone();
    wrong.config.r = 3;
    let err = wrong
        .apply(&mut tiny_llama(DType::F32), &dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit"), "{err}");
}

#[test]
fn lora_with_zero_b_leaves_logits_bit_identical() {
    let (ids, mask, _) = tiny_inputs();
    let base = tiny_llama(DType::F32);
    let want = logits(&base, &ids, &mask)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut model = tiny_llama(DType::F32);
    let mut rng = StdRng::seed_from_u64(7);
    for (_, lin) in model.linear_layers_mut() {
        let (o, i) = (lin.out_features(), lin.in_features());
        lin.lora = Some(LoraSlot {
            a: random_tensor(&mut rng, &[8, i], 1.0, DType::F32),
            b: Tensor::zeros((o, 8), DType::F32, &Device::Cpu).unwrap(),
            scale: 2.0,
        });
    }
    let got = logits(&model, &ids, &mask)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "logits changed"
    );
}

/// Mean cross-entropy of next-token prediction on real tokens.
fn loss(model: &Decoder, ids: &Tensor, mask: &Tensor) -> Tensor {
    let logits = logits(model, ids, mask); // (b, t, v)
    let (b, t, v) = logits.dims3().unwrap();
    let pred = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let target = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    // Only real tokens predicted from a real position. A pad position's scores are all masked, so
    // its attention is computed as uniform (the scores are lost to rounding next to the mask)
    // while autodiff differentiates the softmax of the scores themselves: a target read at a pad
    // position has a gradient the computed loss does not have (SFT never reads one there).
    let mask_rows = mask.to_vec2::<u32>().unwrap();
    let idx: Vec<u32> = mask_rows
        .iter()
        .flat_map(|row| row.windows(2).map(|w| w[0] == 1 && w[1] == 1))
        .enumerate()
        .filter(|(_, keep)| *keep)
        .map(|(i, _)| i as u32)
        .collect();
    let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
    let pred = pred.index_select(&idx, 0).unwrap();
    let target = target.index_select(&idx, 0).unwrap();
    candle_nn::loss::cross_entropy(&pred, &target).unwrap()
}

fn attach_vars(model: &mut Decoder, rng: &mut StdRng, dtype: DType) -> Vec<(String, Var, Var)> {
    let mut vars = Vec::new();
    for (name, lin) in model.linear_layers_mut() {
        let (o, i) = (lin.out_features(), lin.in_features());
        let a = Var::from_tensor(&random_tensor(rng, &[4, i], 0.5, dtype)).unwrap();
        let b = Var::from_tensor(&random_tensor(rng, &[o, 4], 0.5, dtype)).unwrap();
        lin.lora = Some(LoraSlot {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
        });
        vars.push((name, a, b));
    }
    vars
}

#[test]
fn training_forward_gives_every_lora_factor_a_gradient() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gemma2"] {
        let dir = golden_dir().join(name);
        let cfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let mut w = WeightMap::from_safetensors_dir(&dir, &Device::Cpu).unwrap();
        let mut model = Decoder::load(cfg, &mut w, &Device::Cpu, DType::F32).unwrap();
        let vars = attach_vars(&mut model, &mut StdRng::seed_from_u64(11), DType::F32);
        let (ids, mask, _) = tiny_inputs();
        let grads = loss(&model, &ids, &mask).backward().unwrap();
        for (module, a, b) in &vars {
            for (which, var) in [("A", a), ("B", b)] {
                let g = grads
                    .get(var)
                    .unwrap_or_else(|| panic!("{name} {module} {which}: no gradient"));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt();
                assert!(
                    norm.is_finite() && norm > 0.0,
                    "{name} {module} {which}: gradient norm {norm}"
                );
            }
        }
    }
}

#[test]
fn lora_gradient_matches_finite_differences_in_f64() {
    let mut model = tiny_llama(DType::F64);
    let vars = attach_vars(&mut model, &mut StdRng::seed_from_u64(5), DType::F64);
    let (ids, mask, _) = tiny_inputs();
    let grads = loss(&model, &ids, &mask).backward().unwrap();
    // Probe a few entries of an attention A and an MLP B with central differences.
    let eps = 1e-6;
    // Every module's A (through attention and MLP of both layers) and a B.
    let probes = vars
        .iter()
        .map(|v| (&v.0, &v.1))
        .chain(std::iter::once((&vars[6].0, &vars[6].2)));
    let (mut compared, mut largest) = (0, 0f64);
    for (module, var) in probes {
        let analytic = grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for &i in &[0usize, 3, 17] {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let l = loss(&model, &ids, &mask).to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                l
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[i]).abs();
            // Central differences in f64 at eps 1e-6: truncation ~eps², rounding ~1e-16/eps.
            assert!(
                err <= 1e-7 + 1e-5 * numeric.abs(),
                "{module}[{i}]: analytic {} numeric {numeric} err {err}",
                analytic[i]
            );
            compared += 1;
            largest = largest.max(numeric.abs());
        }
    }
    assert_eq!(compared, 3 * (vars.len() + 1));
    // Never checked on zeros: the probed entries carry real gradient.
    assert!(largest > 1e-4, "largest probed gradient {largest}");
}
