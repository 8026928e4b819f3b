//! One LoRA SFT step on the tiny Llama against `golden/tiny-llama-train-step` (transformers, PEFT
//! and torch in float64): response-only loss, per-token NLL, all 28 LoRA gradients, clipping, and two
//! AdamW steps. Tolerances are the README's "for an f32 implementation" table.

use std::collections::HashMap;

use crate::common::{assert_close, golden_dir};
use candle_core::{DType, Device, Tensor, Var};
use sails::lora::{inject_adapter, Trainable};
use sails::model::config::DecoderConfig;
use sails::model::decoder::{Decoder, Forward};
use sails::model::lora::Adapter;
use sails::model::weights::{load_safetensors_file, WeightMap};
use sails::train::{
    autodiff_loss_and_grads, clip_grad_norm, fast, loss_and_grads, response_token_loss, AdamW,
    Batch, Target,
};

fn step_dir() -> std::path::PathBuf {
    golden_dir().join("tiny-llama-train-step")
}

fn reference() -> HashMap<String, Tensor> {
    load_safetensors_file(&step_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// The tiny model with the golden starting adapter as training `Var`s.
fn model_with_adapter() -> (Decoder, Trainable) {
    let dir = golden_dir().join("tiny-llama");
    let cfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut w = WeightMap::from_safetensors_dir(&dir, &Device::Cpu).unwrap();
    let mut model = Decoder::load(cfg, &mut w, &Device::Cpu, DType::F32).unwrap();
    let adapter = Adapter::load(&step_dir(), &Device::Cpu).unwrap();
    let trainable = inject_adapter(&mut model, &adapter).unwrap();
    assert_eq!(trainable.vars.len(), 28);
    (model, trainable)
}

/// A batch from the golden ids, mask and labels (`logits[b, t]` predicts `labels[b, t+1]`).
fn batch(prefix: &str) -> Batch {
    let t = load_safetensors_file(&step_dir().join("inputs.safetensors"), &Device::Cpu).unwrap();
    let labels = t[&format!("{prefix}labels")].to_vec2::<i64>().unwrap();
    let mut targets = Vec::new();
    for (row, l) in labels.iter().enumerate() {
        for pos in 0..l.len() - 1 {
            if l[pos + 1] != -100 {
                targets.push(Target {
                    row,
                    pos,
                    token: l[pos + 1] as u32,
                });
            }
        }
    }
    let mask = t[&format!("{prefix}attention_mask")]
        .to_dtype(DType::U32)
        .unwrap();
    let real_tokens = mask.sum_all().unwrap().to_scalar::<u32>().unwrap() as usize;
    Batch {
        input_ids: t[&format!("{prefix}input_ids")]
            .to_dtype(DType::U32)
            .unwrap(),
        attention_mask: mask,
        targets,
        real_tokens,
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn params(tr: &Trainable) -> Vec<(&String, &Var)> {
    tr.vars.iter().collect()
}

// Per the README: tolerance `1e-4 + 1e-4·|ref|` for logits, NLL, loss, gradients and exp_avg.
const A: f32 = 1e-4;
const R: f32 = 1e-4;

#[test]
fn loss_token_nll_and_logits_match_reference() {
    let (model, _tr) = model_with_adapter();
    let reference = reference();
    let b = batch("");
    assert_eq!(b.targets.len(), 10); // 6 + 4 response targets
    let out = response_token_loss(&model, &b).unwrap();
    let loss = out.sum.to_scalar::<f32>().unwrap() / 10.0;
    // One mean over the batch's 10 targets (not per-sequence means): 38.33522460551199.
    assert_close("loss", &[loss], &[38.335_224], A, R);
    // token_nll [2, 11], zero where there is no target; ours is in the same row-major order.
    let want: Vec<f32> = flat(&reference["token_nll"])
        .into_iter()
        .filter(|&x| x != 0.0)
        .collect();
    assert_eq!(want.len(), 10);
    assert_close("token_nll", &flat(&out.token_nll), &want, A, R);

    let logits = model
        .forward(Forward::logits(&b.input_ids, Some(&b.attention_mask)), None)
        .unwrap()
        .logits
        .unwrap();
    let mask = b.attention_mask.to_vec2::<u32>().unwrap();
    let (got, want) = (
        logits.to_vec3::<f32>().unwrap(),
        reference["logits"].to_vec3::<f32>().unwrap(),
    );
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (row, m) in mask.iter().enumerate() {
        for (t, &real) in m.iter().enumerate() {
            if real == 1 {
                g.extend_from_slice(&got[row][t]);
                w.extend_from_slice(&want[row][t]);
            }
        }
    }
    assert_close("logits (real positions)", &g, &w, A, R);
}

#[test]
fn lora_gradients_and_clipping_match_reference() {
    let (model, tr) = model_with_adapter();
    let reference = reference();
    let p = params(&tr);
    let (loss, mut grads) = loss_and_grads(&model, &p, &[batch("")]).unwrap();
    assert!((loss - 38.33522460551199).abs() < 1e-4 + 1e-4 * 38.34);
    for ((name, _), g) in p.iter().zip(&grads) {
        let want = &reference[&format!("{name}.grad")];
        assert_close(&format!("{name}.grad"), &flat(g), &flat(want), A, R);
    }
    // clip_grad_norm_(max_norm 0.1): norm 49.18392757270032 (relative 1e-5), coef 0.00203318…
    let norm = clip_grad_norm(&mut grads, Some(0.1)).unwrap();
    assert!(
        ((norm - 49.18392757270032) / 49.18392757270032).abs() < 1e-5,
        "global grad norm {norm}"
    );
    for ((name, _), g) in p.iter().zip(&grads) {
        let want = &reference[&format!("{name}.grad_clipped")];
        // README: `1e-6 + 1e-4·|ref|` for the clipped gradients.
        assert_close(
            &format!("{name}.grad_clipped"),
            &flat(g),
            &flat(want),
            1e-6,
            R,
        );
    }
}

#[test]
fn unpadded_sequence_gives_its_own_mean_and_gradients() {
    let (model, tr) = model_with_adapter();
    let reference = reference();
    let p = params(&tr);
    let (loss, grads) = loss_and_grads(&model, &p, &[batch("seq1_unpadded.")]).unwrap();
    // seq1_unpadded alone: 45.97030793148971 (its own mean over 4 targets).
    assert!(
        (loss - 45.97030793148971).abs() < 1e-4 + 1e-4 * 45.97,
        "loss {loss}"
    );
    for ((name, _), g) in p.iter().zip(&grads) {
        let want = &reference[&format!("{name}.grad_seq1_unpadded")];
        assert_close(
            &format!("{name}.grad_seq1_unpadded"),
            &flat(g),
            &flat(want),
            A,
            R,
        );
    }
}

/// AdamW lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 (torch.optim.AdamW).
fn golden_adamw() -> AdamW {
    AdamW::new(0.9, 0.999, 1e-8, 0.01)
}

#[test]
fn adamw_fed_the_stored_gradients_matches_torch_to_1e6() {
    let (_model, tr) = model_with_adapter();
    let reference = reference();
    let p = params(&tr);
    let mut opt = golden_adamw();
    for (step, grad_key, after_key) in
        [(1, "grad", "after_step1"), (2, "grad_step2", "after_step2")]
    {
        let grads: Vec<Tensor> = p
            .iter()
            .map(|(name, _)| reference[&format!("{name}.{grad_key}")].clone())
            .collect();
        opt.step(&p, &grads, 1e-3).unwrap();
        assert_eq!(opt.t, step);
        for (name, var) in &p {
            let want = &reference[&format!("{name}.{after_key}")];
            // README: 1e-6 absolute (no weight decay would be off by 8e-6 / 1.6e-5).
            assert_close(
                &format!("{name}.{after_key}"),
                &flat(var.as_tensor()),
                &flat(want),
                1e-6,
                0.0,
            );
        }
    }
    for (name, _) in &p {
        assert_close(
            &format!("{name}.exp_avg"),
            &flat(&opt.exp_avg[*name]),
            &flat(&reference[&format!("{name}.exp_avg_after_step2")]),
            A,
            R,
        );
        assert_close(
            &format!("{name}.exp_avg_sq"),
            &flat(&opt.exp_avg_sq[*name]),
            &flat(&reference[&format!("{name}.exp_avg_sq_after_step2")]),
            1e-6,
            R,
        );
    }
}

#[test]
fn two_training_steps_end_to_end_match_reference() {
    let (model, tr) = model_with_adapter();
    let reference = reference();
    let p = params(&tr);
    let mut opt = golden_adamw();
    let b = batch("");
    let (_, grads) = loss_and_grads(&model, &p, std::slice::from_ref(&b)).unwrap();
    opt.step(&p, &grads, 1e-3).unwrap();
    for (name, var) in &p {
        let want = &reference[&format!("{name}.after_step1")];
        // README: 1e-5 absolute end to end (1 % of a step).
        assert_close(
            &format!("{name}.after_step1"),
            &flat(var.as_tensor()),
            &flat(want),
            1e-5,
            0.0,
        );
    }
    let (loss2, grads) = loss_and_grads(&model, &p, std::slice::from_ref(&b)).unwrap();
    // The step-2 loss (at after_step1): 35.601211934901116.
    assert!(
        (loss2 - 35.601211934901116).abs() < 1e-4 + 1e-4 * 35.6,
        "loss {loss2}"
    );
    for ((name, _), g) in p.iter().zip(&grads) {
        let want = &reference[&format!("{name}.grad_step2")];
        assert_close(&format!("{name}.grad_step2"), &flat(g), &flat(want), A, R);
    }
    opt.step(&p, &grads, 1e-3).unwrap();
    for (name, var) in &p {
        let want = &reference[&format!("{name}.after_step2")];
        assert_close(
            &format!("{name}.after_step2"),
            &flat(var.as_tensor()),
            &flat(want),
            1e-5,
            0.0,
        );
    }
    let (loss3, _) = loss_and_grads(&model, &p, &[b]).unwrap();
    // Loss at after_step2: 32.950807545753364.
    assert!(
        (loss3 - 32.950807545753364).abs() < 1e-4 + 1e-4 * 32.95,
        "loss {loss3}"
    );
}

/// The hand-written LoRA step against candle's autodiff on fresh random factors (every `B`
/// non-zero, so every `A` gradient is too): a padded batch and an unpadded one accumulated into
/// one step, grouped-query attention, all seven projections adapted.
#[test]
fn hand_written_step_equals_autodiff_on_random_factors() {
    let (model, tr) = model_with_adapter();
    let mut state = 0x5eed_u64;
    for var in tr.vars.values() {
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
            })
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let p = params(&tr);
    assert!(fast::applies(&model, &p));
    let batches = [batch(""), batch("seq1_unpadded.")];
    let (fast_loss, fast_grads) = fast::loss_and_grads(&model, &p, &batches).unwrap();
    let (auto_loss, auto_grads) = autodiff_loss_and_grads(&model, &p, &batches).unwrap();
    assert!(
        (fast_loss - auto_loss).abs() < 1e-5 * auto_loss.abs(),
        "loss {fast_loss} vs {auto_loss}"
    );
    for ((name, _), (f, a)) in p.iter().zip(fast_grads.iter().zip(&auto_grads)) {
        let (f, a) = (flat(f), flat(a));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        assert_close(name, &f, &a, 1e-5 * scale, 1e-4);
    }
    // The forward-only loss (the held-out loss during training) is the same loss.
    let n_total: usize = batches.iter().map(|b| b.targets.len()).sum();
    let forward_only: f64 = batches
        .iter()
        .map(|b| fast::batch_loss(&model, b).unwrap())
        .sum::<f64>()
        / n_total as f64;
    assert!(
        (forward_only - auto_loss).abs() < 1e-5 * auto_loss.abs(),
        "forward-only loss {forward_only} vs {auto_loss}"
    );
}
