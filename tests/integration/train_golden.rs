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
    Batch, StepLoss, Target,
};

pub(crate) fn step_dir() -> std::path::PathBuf {
    golden_dir().join("tiny-llama-train-step")
}

fn reference() -> HashMap<String, Tensor> {
    load_safetensors_file(&step_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// The tiny model with the golden starting adapter as training `Var`s.
pub(crate) fn model_with_adapter() -> (Decoder, Trainable) {
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
pub(crate) fn batch(prefix: &str) -> Batch {
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
        retain: vec![false; labels.len()],
        real_tokens,
    }
}

pub(crate) fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

pub(crate) fn params(tr: &Trainable) -> Vec<(&String, &Var)> {
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
    let (loss, mut grads) = loss_and_grads(&model, &p, &[batch("")], 0.0).unwrap();
    let loss = loss.total;
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
    let (loss, grads) = loss_and_grads(&model, &p, &[batch("seq1_unpadded.")], 0.0).unwrap();
    let loss = loss.total;
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
    let (_, grads) = loss_and_grads(&model, &p, std::slice::from_ref(&b), 0.0).unwrap();
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
    let (loss2, grads) = loss_and_grads(&model, &p, std::slice::from_ref(&b), 0.0).unwrap();
    let loss2 = loss2.total;
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
    let (loss3, _) = loss_and_grads(&model, &p, &[b], 0.0).unwrap();
    let loss3 = loss3.total;
    // Loss at after_step2: 32.950807545753364.
    assert!(
        (loss3 - 32.950807545753364).abs() < 1e-4 + 1e-4 * 32.95,
        "loss {loss3}"
    );
}

/// The hand-written LoRA step against candle's autodiff on fresh random factors (every `B`
/// non-zero, so every `A` gradient is too): a padded batch and an unpadded one accumulated into
/// one step, grouped-query attention, all seven projections adapted.
/// Sets every factor to fresh uniform values in ±0.2 from a seeded generator (every `B`
/// non-zero, so every `A` gradient is too).
pub(crate) fn randomize(tr: &Trainable, seed: u64) {
    let mut state = seed;
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
}

#[test]
fn hand_written_step_equals_autodiff_on_random_factors() {
    let (model, tr) = model_with_adapter();
    randomize(&tr, 0x5eed);
    let p = params(&tr);
    assert!(fast::applies(&model, &p));
    let batches = [batch(""), batch("seq1_unpadded.")];
    let (fast_loss, fast_grads) = fast::loss_and_grads(&model, &p, &batches, 0.0).unwrap();
    let (auto_loss, auto_grads) = autodiff_loss_and_grads(&model, &p, &batches, 0.0).unwrap();
    let (fast_loss, auto_loss) = (fast_loss.total, auto_loss.total);
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

/// The golden batches with retain rows: sequence 0 of the padded batch (not sequence 1, so the
/// base runs on a subset of the rows), and the unpadded sequence 1 alone. 6 + 4 of the 14
/// targets are retain targets.
fn retain_batches() -> [Batch; 2] {
    let mut mixed = batch("");
    mixed.retain = vec![true, false];
    let mut alone = batch("seq1_unpadded.");
    alone.retain = vec![true];
    [mixed, alone]
}

pub(crate) fn bits(grads: &[Tensor]) -> Vec<Vec<u32>> {
    grads
        .iter()
        .map(|g| flat(g).iter().map(|x| x.to_bits()).collect())
        .collect()
}

type Step = fn(
    &Decoder,
    &[(&String, &Var)],
    &[Batch],
    f64,
) -> sails::train::Result<(StepLoss, Vec<Tensor>)>;

const STEPS: [(&str, Step); 2] = [
    ("hand-written", fast::loss_and_grads),
    ("autodiff", autodiff_loss_and_grads),
];

/// λ = 0 is the step as it was: retain flags change nothing and no KL is reported, λ > 0 on
/// batches without retain rows changes nothing either, and autodiff's loss and gradients are
/// bit for bit those of `response_token_loss`'s sum / n_total, backward (its code before the
/// retain term).
#[test]
fn retain_kl_zero_leaves_loss_and_gradients_bit_identical() {
    let (model, tr) = model_with_adapter();
    randomize(&tr, 0x5eed);
    let p = params(&tr);
    let plain = [batch(""), batch("seq1_unpadded.")];
    let flagged = retain_batches();
    for (path, step) in STEPS {
        let (l0, g0) = step(&model, &p, &plain, 0.0).unwrap();
        let (l1, g1) = step(&model, &p, &flagged, 0.0).unwrap();
        let (l2, g2) = step(&model, &p, &plain, 0.5).unwrap();
        assert_eq!(l0.retain_kl, None, "{path}");
        assert_eq!(l0.total.to_bits(), l0.nll.to_bits(), "{path}");
        assert_eq!(l1, l0, "{path}: retain flags at λ = 0");
        assert_eq!(l2, l0, "{path}: λ > 0 without retain rows");
        assert!(bits(&g1) == bits(&g0), "{path}: retain flags at λ = 0");
        assert!(bits(&g2) == bits(&g0), "{path}: λ > 0 without retain rows");
    }
    let n_total = 14.0;
    let (mut loss_sum, mut want): (f64, Vec<Option<Tensor>>) = (0.0, vec![None; p.len()]);
    for b in &plain {
        let out = response_token_loss(&model, b).unwrap();
        loss_sum += out
            .sum
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let store = (&out.sum / n_total).unwrap().backward().unwrap();
        for (slot, (_, var)) in want.iter_mut().zip(&p) {
            let g = store.get(var.as_tensor()).unwrap().clone();
            *slot = Some(match slot.take() {
                Some(acc) => (acc + g).unwrap(),
                None => g,
            });
        }
    }
    let want: Vec<Tensor> = want.into_iter().map(Option::unwrap).collect();
    let (got, grads) = autodiff_loss_and_grads(&model, &p, &plain, 0.0).unwrap();
    assert_eq!(got.total.to_bits(), (loss_sum / n_total).to_bits());
    assert!(bits(&grads) == bits(&want));
}

/// The hand-written step with a retain term against candle's autodiff (KL through its own
/// log-softmax) on fresh random factors, at the tolerances of the plain step's comparison; the
/// term is not idle (the gradients move well beyond that tolerance).
#[test]
fn retain_kl_hand_written_step_equals_autodiff_on_random_factors() {
    let (model, tr) = model_with_adapter();
    randomize(&tr, 0x7e7a_1e55);
    let p = params(&tr);
    let batches = retain_batches();
    let lambda = 0.7;
    let (fast_loss, fast_grads) = fast::loss_and_grads(&model, &p, &batches, lambda).unwrap();
    let (auto_loss, auto_grads) = autodiff_loss_and_grads(&model, &p, &batches, lambda).unwrap();
    let (fast_kl, auto_kl) = (fast_loss.retain_kl.unwrap(), auto_loss.retain_kl.unwrap());
    for (what, f, a) in [
        ("total", fast_loss.total, auto_loss.total),
        ("nll", fast_loss.nll, auto_loss.nll),
        ("retain_kl", fast_kl, auto_kl),
    ] {
        assert!((f - a).abs() < 1e-5 * a.abs(), "{what}: {f} vs {a}");
    }
    assert!(
        auto_kl > 0.01,
        "the random adapter barely moves the model: KL {auto_kl}"
    );
    let (_, nll_grads) = fast::loss_and_grads(&model, &p, &batches, 0.0).unwrap();
    let mut moved = 0f32;
    for (((name, _), (f, a)), n) in p
        .iter()
        .zip(fast_grads.iter().zip(&auto_grads))
        .zip(&nll_grads)
    {
        let (f, a, n) = (flat(f), flat(a), flat(n));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        assert_close(name, &f, &a, 1e-5 * scale, 1e-4);
        let change = f
            .iter()
            .zip(&n)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        moved = moved.max(change / scale);
    }
    assert!(
        moved > 1e-2,
        "the KL term changes the gradients by {moved} at most"
    );
}

/// `log softmax` of a row, in f64.
pub(crate) fn log_softmax_f64(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// The step's KL against one computed in f64 from the full logits of the adapted model and of
/// a copy with the adapter removed: KL = Σ_retain targets Σ_v p·(log p − log q), p the base's.
#[test]
fn retain_kl_value_matches_an_f64_computation_from_both_logit_sets() {
    let (model, tr) = model_with_adapter();
    randomize(&tr, 0x5eed);
    let p = params(&tr);
    let batches = retain_batches();
    let mut base = model.clone();
    sails::model::lora::clear(&mut base);
    let (mut kl_sum, mut n_retain) = (0f64, 0usize);
    for b in &batches {
        let logits = |m: &Decoder| {
            m.forward(Forward::logits(&b.input_ids, Some(&b.attention_mask)), None)
                .unwrap()
                .logits
                .unwrap()
                .to_vec3::<f32>()
                .unwrap()
        };
        let (adapted, original) = (logits(&model), logits(&base));
        for x in b.targets.iter().filter(|x| b.retain[x.row]) {
            let log_p = log_softmax_f64(&original[x.row][x.pos]);
            let log_q = log_softmax_f64(&adapted[x.row][x.pos]);
            kl_sum += log_p
                .iter()
                .zip(&log_q)
                .map(|(lp, lq)| lp.exp() * (lp - lq))
                .sum::<f64>();
            n_retain += 1;
        }
    }
    assert_eq!(n_retain, 10);
    let want = kl_sum / n_retain as f64;
    assert!(want > 0.1, "KL {want}");
    let lambda = 0.7;
    for (path, step) in STEPS {
        let (loss, _) = step(&model, &p, &batches, lambda).unwrap();
        let got = loss.retain_kl.unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * want,
            "{path}: KL {got} vs {want}"
        );
        // (Σ NLL + λ Σ KL) / n_total, n_total = 14.
        let total = loss.nll + lambda * kl_sum / 14.0;
        assert!(
            (loss.total - total).abs() <= 1e-5 * total,
            "{path}: loss {} vs {total}",
            loss.total
        );
    }
}

/// With every `B` zero the adapter is the base: the hand-written step's KL is exactly 0 and its
/// gradients are bit for bit those without the term (base and adapted logits come out of the
/// same kernels, so they are equal, and p_base is scaled exactly as the softmax). On the autodiff
/// path the model without trainable tensors takes candle's gradient-free kernels, so both are 0
/// only to rounding there.
#[test]
fn retain_kl_is_exactly_zero_when_the_adapter_is_the_base() {
    let (model, tr) = model_with_adapter();
    randomize(&tr, 0x5eed);
    for (name, var) in &tr.vars {
        if name.contains("lora_B") {
            var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
        }
    }
    let p = params(&tr);
    let batches = retain_batches();
    let (with, g) = fast::loss_and_grads(&model, &p, &batches, 0.7).unwrap();
    let (without, g0) = fast::loss_and_grads(&model, &p, &batches, 0.0).unwrap();
    assert_eq!(with.retain_kl, Some(0.0));
    assert_eq!(with.total.to_bits(), without.total.to_bits());
    assert!(bits(&g) == bits(&g0));
    assert!(
        g0.iter().any(|t| flat(t).iter().any(|&x| x != 0.0)),
        "all gradients are zero: nothing was compared"
    );
    let (with, g) = autodiff_loss_and_grads(&model, &p, &batches, 0.7).unwrap();
    let (_, g0) = autodiff_loss_and_grads(&model, &p, &batches, 0.0).unwrap();
    let kl = with.retain_kl.unwrap();
    assert!(kl.abs() < 1e-9, "autodiff KL {kl}");
    for ((name, _), (a, b)) in p.iter().zip(g.iter().zip(&g0)) {
        let b = flat(b);
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_close(name, &flat(a), &b, 1e-6 * scale.max(1e-6), 0.0);
    }
}
