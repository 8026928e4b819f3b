//! The DPO term on the tiny Llama of `golden/tiny-llama-train-step`: the hand-written step
//! against candle's autodiff, the loss against an f64 computation from both models' logits, the
//! policy = reference case against the SFT gradients, and a short training run.
//!
//! The PyTorch + PEFT float64 reference for DPO is `train_dpo_golden`
//! (`tests/fixtures/golden/tiny-llama-dpo-step`). Here the references are candle's autodiff (an
//! independent derivation of the same gradients through the generic ops) and the f64
//! computations below. A float64 finite-difference check of the autodiff path is not
//! possible: LoRA factors are f32 only (`lora::inject_adapter` refuses another dtype), so the
//! model cannot run in f64 with an adapter.

use std::f64::consts::LN_2;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::common::assert_close;
use crate::train_golden::{
    bits, flat, log_softmax_f64, model_with_adapter, params, randomize, step_dir,
};
use candle_core::{Device, Tensor};
use sails::lora::Trainable;
use sails::model::decoder::{Decoder, Forward};
use sails::model::weights::load_safetensors_file;
use sails::train::dpo::{self, autodiff_dpo_loss_and_grads, PairBatch};
use sails::train::{
    self, fast, loss_and_grads, Batch, CurveRecord, RunOptions, TokenizedExample, TokenizedPair,
    TrainConfig, TrainData, TrainError,
};

/// The two golden sequences as examples: sequence 0 (12 tokens, targets 5..11) and sequence 1
/// without its pads (9 tokens, targets 5..9).
fn sequences() -> [TokenizedExample; 2] {
    let t = load_safetensors_file(&step_dir().join("inputs.safetensors"), &Device::Cpu).unwrap();
    let one = |prefix: &str| {
        let ids = t[&format!("{prefix}input_ids")].to_vec2::<i64>().unwrap()[0].clone();
        let labels = t[&format!("{prefix}labels")].to_vec2::<i64>().unwrap()[0].clone();
        TokenizedExample {
            ids: ids.iter().map(|&x| x as u32).collect(),
            target_start: labels.iter().position(|&l| l != -100).unwrap(),
            target_end: labels.iter().rposition(|&l| l != -100).unwrap() + 1,
            retain: false,
        }
    };
    [one(""), one("seq1_unpadded.")]
}

fn pair(id: &str, chosen: &TokenizedExample, rejected: &TokenizedExample) -> TokenizedPair {
    TokenizedPair {
        id: id.into(),
        chosen: chosen.clone(),
        rejected: rejected.clone(),
    }
}

/// Pair a: sequence 0 over sequence 1; pair b: the other way round.
fn pairs() -> [TokenizedPair; 2] {
    let [s0, s1] = sequences();
    [pair("a", &s0, &s1), pair("b", &s1, &s0)]
}

pub(crate) fn without_adapter(model: &Decoder) -> Decoder {
    let mut base = model.clone();
    sails::model::lora::clear(&mut base);
    base
}

/// Two micro-batches: both pairs side by side, then pair b alone (three pairs in the step).
fn pair_batches(model: &Decoder) -> Vec<PairBatch> {
    let ps = pairs();
    let reference = dpo::reference_logps(&without_adapter(model), &ps, 0).unwrap();
    vec![
        PairBatch::new(&[&ps[0], &ps[1]], reference.clone(), 0, &Device::Cpu).unwrap(),
        PairBatch::new(&[&ps[1]], vec![reference[1]], 0, &Device::Cpu).unwrap(),
    ]
}

const BETA: f64 = 0.1;
const WEIGHT: f64 = 0.8;

#[test]
fn dpo_hand_written_step_equals_autodiff_on_random_factors() {
    let (model, tr) = model_with_adapter();
    randomize(&tr, 0xd90);
    let p = params(&tr);
    assert!(fast::applies(&model, &p));
    let batches = pair_batches(&model);
    let (fs, fast_grads) = fast::dpo_loss_and_grads(&model, &p, &batches, BETA, WEIGHT).unwrap();
    let (a, auto_grads) = autodiff_dpo_loss_and_grads(&model, &p, &batches, BETA, WEIGHT).unwrap();
    assert_eq!((fs.pairs, a.pairs), (3, 3));
    assert_eq!(fs.preferred, a.preferred);
    for (what, f, w) in [
        ("loss", fs.loss(), a.loss()),
        ("margin", fs.margin(), a.margin()),
    ] {
        assert!(
            (f - w).abs() < 1e-5 * w.abs().max(1.0),
            "{what}: {f} vs {w}"
        );
    }
    // Not saturated: each pair's σ(−m) is well inside (0, 1), so every gradient is exercised.
    assert!(
        a.loss() > 0.05 && a.margin().abs() > 1e-3,
        "loss {} margin {}",
        a.loss(),
        a.margin()
    );
    for ((name, _), (f, w)) in p.iter().zip(fast_grads.iter().zip(&auto_grads)) {
        let (f, w) = (flat(f), flat(w));
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        assert_close(name, &f, &w, 1e-5 * scale, 1e-4);
    }
}

/// Each row's summed target log-prob in f64 from the full f32 logits of `model`.
fn logps_f64(model: &Decoder, b: &Batch) -> Vec<f64> {
    let logits = model
        .forward(Forward::logits(&b.input_ids, Some(&b.attention_mask)), None)
        .unwrap()
        .logits
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let mut sums = vec![0f64; logits.len()];
    for x in &b.targets {
        sums[x.row] += log_softmax_f64(&logits[x.row][x.pos])[x.token as usize];
    }
    sums
}

/// ℓ = mean over pairs of ln(1 + e^(−m)), m = β[(log π(c) − log π_ref(c)) − (log π(r) −
/// log π_ref(r))], every log-prob a sum of f64 log-softmax values of the adapted model's and
/// the adapter-free copy's logits.
#[test]
fn dpo_loss_matches_an_f64_computation_from_policy_and_reference_logits() {
    let (model, tr) = model_with_adapter();
    randomize(&tr, 0xd90);
    let p = params(&tr);
    let base = without_adapter(&model);
    let batches = pair_batches(&model);
    let (mut loss_sum, mut margin_sum, mut n) = (0f64, 0f64, 0usize);
    for pb in &batches {
        let (policy, reference) = (logps_f64(&model, &pb.batch), logps_f64(&base, &pb.batch));
        for i in 0..pb.reference.len() {
            let ratio = |row: usize| policy[row] - reference[row];
            let m = BETA * (ratio(2 * i) - ratio(2 * i + 1));
            loss_sum += (1.0 + (-m).exp()).ln();
            margin_sum += m;
            n += 1;
        }
    }
    let (want_loss, want_margin) = (loss_sum / n as f64, margin_sum / n as f64);
    for (path, stats) in [
        (
            "hand-written",
            fast::dpo_loss_and_grads(&model, &p, &batches, BETA, WEIGHT)
                .unwrap()
                .0,
        ),
        (
            "autodiff",
            autodiff_dpo_loss_and_grads(&model, &p, &batches, BETA, WEIGHT)
                .unwrap()
                .0,
        ),
    ] {
        assert!(
            (stats.loss() - want_loss).abs() <= 1e-4 * want_loss.max(1.0),
            "{path}: loss {} vs {want_loss}",
            stats.loss()
        );
        assert!(
            (stats.margin() - want_margin).abs() <= 1e-4 * want_margin.abs().max(1.0),
            "{path}: margin {} vs {want_margin}",
            stats.margin()
        );
    }
}

/// With every `B` zero the policy is the reference: m = 0, ℓ = ln 2, σ(−m) = ½, so the gradient
/// is −(β/2)·w·(∇ log π(c) − ∇ log π(r)). `loss_and_grads` on one sequence gives ∇ of its mean
/// NLL, so ∇ log π(y) = −n_y · that gradient. The hand-written step computes policy and
/// reference with the same kernels on the same batch, so its margin is exactly 0; autodiff's
/// policy runs candle's ops, so its margin is 0 to rounding.
#[test]
fn dpo_at_b_zero_has_zero_margin_ln2_loss_and_the_sft_gradient_difference() {
    let (model, tr) = model_with_adapter();
    randomize(&tr, 0xd90);
    for (name, var) in &tr.vars {
        if name.contains("lora_B") {
            var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
        }
    }
    let p = params(&tr);
    let [s0, s1] = sequences();
    let pa = pair("a", &s0, &s1);
    let reference =
        dpo::reference_logps(&without_adapter(&model), std::slice::from_ref(&pa), 0).unwrap();
    let batches = [PairBatch::new(&[&pa], reference, 0, &Device::Cpu).unwrap()];
    let sft = |e: &TokenizedExample| {
        let b = Batch::left_padded(&[e], 0, &Device::Cpu).unwrap();
        loss_and_grads(&model, &p, &[b], 0.0).unwrap().1
    };
    let (gc, gr) = (sft(&s0), sft(&s1));
    let (nc, nr) = (s0.num_targets() as f64, s1.num_targets() as f64);
    let want: Vec<Vec<f32>> = gc
        .iter()
        .zip(&gr)
        .map(|(c, r)| {
            let d = ((c * (nc * BETA / 2.0)).unwrap() - (r * (nr * BETA / 2.0)).unwrap()).unwrap();
            flat(&d)
        })
        .collect();
    assert!(
        want.iter().any(|g| g.iter().any(|&x| x != 0.0)),
        "all expected gradients are zero: nothing is compared"
    );

    let (stats, grads) = fast::dpo_loss_and_grads(&model, &p, &batches, BETA, 1.0).unwrap();
    assert_eq!(stats.margin_sum, 0.0);
    assert_eq!(stats.preferred, 0);
    assert!((stats.loss() - LN_2).abs() < 1e-15, "loss {}", stats.loss());
    let (auto_stats, auto_grads) =
        autodiff_dpo_loss_and_grads(&model, &p, &batches, BETA, 1.0).unwrap();
    assert!(auto_stats.margin().abs() < 1e-5, "{}", auto_stats.margin());
    assert!((auto_stats.loss() - LN_2).abs() < 1e-5);
    for (path, got) in [("hand-written", &grads), ("autodiff", &auto_grads)] {
        for (((name, _), g), w) in p.iter().zip(got).zip(&want) {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_close(
                &format!("{path} {name}"),
                &flat(g),
                w,
                1e-5 * scale + 1e-9,
                1e-4,
            );
        }
    }
}

fn run(
    cfg: &TrainConfig,
    out: &Path,
    pairs: &[TokenizedPair],
    resume: bool,
    stop_after: Option<usize>,
) -> (Trainable, Result<train::TrainSummary, TrainError>) {
    let (model, tr) = model_with_adapter();
    let [s0, s1] = sequences();
    let train_set = [s0.clone(), s1.clone()];
    let heldout = [pair("c", &s0, &s0), pair("d", &s1, &s0)];
    let stop = AtomicBool::new(false);
    let summary = train::run(
        cfg,
        &model,
        &tr,
        TrainData {
            train: &train_set,
            eval: std::slice::from_ref(&s1),
            pairs,
            eval_pairs: &heldout,
            pad_id: 0,
        },
        RunOptions {
            out_dir: out,
            resume,
            stop: &stop,
            stop_after,
            progress: false,
        },
    );
    (tr, summary)
}

fn weights(tr: &Trainable) -> Vec<Vec<u32>> {
    let values: Vec<Tensor> = tr.vars.values().map(|v| v.as_tensor().clone()).collect();
    bits(&values)
}

/// A run with the DPO term writes the reference once, logs the pair statistics for training and
/// held-out steps, resumes bit for bit, and refuses to resume on changed pairs.
#[test]
fn dpo_training_run_logs_preferences_resumes_exactly_and_refuses_changed_pairs() {
    let cfg = TrainConfig {
        lr_peak: 1e-3,
        lr_min: 1e-4,
        warmup_steps: 0,
        max_steps: 3,
        batch_size: 2,
        eval_every: Some(3),
        checkpoint_every: Some(1),
        max_seq_len: 64,
        dpo_weight: 1.0,
        ..TrainConfig::default()
    };
    let ps = pairs();
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let (tr, summary) = run(&cfg, &whole, &ps, false, None);
    summary.unwrap();
    let text = std::fs::read_to_string(whole.join("loss_curve.jsonl")).unwrap();
    let records: Vec<CurveRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (mut train_steps, mut evals) = (0, 0);
    for r in &records {
        match r {
            CurveRecord::Train {
                dpo_loss,
                dpo_margin,
                dpo_accuracy,
                ..
            } => {
                train_steps += 1;
                assert!(dpo_loss.unwrap() > 0.0 && dpo_margin.is_some());
                assert!((0.0..=1.0).contains(&dpo_accuracy.unwrap()));
            }
            CurveRecord::Eval {
                dpo_loss,
                dpo_accuracy,
                ..
            } => {
                evals += 1;
                // Pair c compares sequence 0 with itself: its margin is 0, never "preferred".
                assert!(dpo_loss.unwrap() > 0.0 && dpo_accuracy.unwrap() <= 0.5);
            }
        }
    }
    assert_eq!((train_steps, evals), (3, 1));
    let reference: dpo::ReferenceFile =
        serde_json::from_slice(&std::fs::read(whole.join(dpo::REFERENCE_FILE)).unwrap()).unwrap();
    assert_eq!(reference.train.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(reference.heldout.keys().collect::<Vec<_>>(), ["c", "d"]);

    let split = dir.path().join("split");
    let (_, first) = run(&cfg, &split, &ps, false, Some(1));
    assert!(first.unwrap().interrupted);
    let (resumed, rest) = run(&cfg, &split, &ps, true, None);
    assert_eq!(rest.unwrap().resumed_from, Some(1));
    assert!(weights(&resumed) == weights(&tr), "resumed run differs");

    let changed = [ps[1].clone(), ps[0].clone()].map(|mut p| {
        std::mem::swap(&mut p.chosen, &mut p.rejected);
        p
    });
    let (_, refused) = run(&cfg, &split, &changed, true, None);
    assert!(
        matches!(refused, Err(TrainError::DpoDataChanged { .. })),
        "{refused:?}"
    );
    let (_, none) = run(&cfg, &dir.path().join("none"), &[], false, None);
    assert!(matches!(none, Err(TrainError::Config(_))), "{none:?}");
}
