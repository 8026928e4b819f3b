//! The training loop on the tiny Llama: an interrupted and resumed run ends bit-identical to an
//! uninterrupted one; a non-finite loss stops training with an error and keeps the last good
//! checkpoint; a resume with a changed config is refused; the loss curve is written.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::common::golden_dir;
use candle_core::{DType, Device};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sails::lora::{inject, LoraConfig, LoraInit, Trainable};
use sails::model::config::DecoderConfig;
use sails::model::decoder::Decoder;
use sails::model::weights::WeightMap;
use sails::train::{
    self, CurveRecord, RunOptions, TokenizedExample, TrainConfig, TrainData, TrainError,
};

fn tiny_with_lora() -> (Decoder, Trainable) {
    let dir = golden_dir().join("tiny-llama");
    let cfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut w = WeightMap::from_safetensors_dir(&dir, &Device::Cpu).unwrap();
    let mut model = Decoder::load(cfg, &mut w, &Device::Cpu, DType::F32).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        rslora: false,
        init: LoraInit::Kaiming,
    };
    let tr = inject(&mut model, &lora, 9).unwrap();
    (model, tr)
}

/// 10 random "conversations" of 6–14 tokens; the last 2–4 tokens are the response.
fn examples() -> Vec<TokenizedExample> {
    let mut rng = StdRng::seed_from_u64(4);
    (0..10)
        .map(|_| {
            let len = rng.random_range(6..15);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(3..512)).collect();
            let n = rng.random_range(2..5);
            TokenizedExample {
                ids,
                target_start: len - n,
                target_end: len,
                retain: false,
            }
        })
        .collect()
}

fn config() -> TrainConfig {
    TrainConfig {
        lr_peak: 1e-2,
        lr_min: 1e-3,
        warmup_steps: 2,
        max_steps: 6,
        batch_size: 3,
        grad_accum_steps: 2,
        max_grad_norm: Some(1.0),
        weight_decay: 0.01,
        seed: 17,
        max_seq_len: 64,
        eval_every: Some(3),
        checkpoint_every: Some(2),
        ..TrainConfig::default()
    }
}

fn run(
    cfg: &TrainConfig,
    model: &Decoder,
    tr: &Trainable,
    out: &Path,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<train::TrainSummary, TrainError> {
    run_on(&examples(), cfg, model, tr, out, resume, stop_after)
}

/// [`run`] on `data`: the first 8 examples train, the last 2 are held out.
fn run_on(
    data: &[TokenizedExample],
    cfg: &TrainConfig,
    model: &Decoder,
    tr: &Trainable,
    out: &Path,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<train::TrainSummary, TrainError> {
    let stop = AtomicBool::new(false);
    train::run(
        cfg,
        model,
        tr,
        TrainData {
            train: &data[..8],
            eval: &data[8..],
            pairs: &[],
            eval_pairs: &[],
            pad_id: 0,
        },
        RunOptions {
            out_dir: out,
            resume,
            stop: &stop,
            stop_after,
            progress: false,
        },
    )
}

fn weights(tr: &Trainable) -> Vec<Vec<u32>> {
    tr.vars
        .values()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

fn curve(out: &Path) -> Vec<CurveRecord> {
    std::fs::read_to_string(out.join("loss_curve.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let cfg = config();
    let (model, tr) = tiny_with_lora();
    let start = weights(&tr);
    let straight = tempfile::tempdir().unwrap();
    let summary = run(&cfg, &model, &tr, straight.path(), false, None).unwrap();
    assert_eq!(summary.steps, 6);
    let want = weights(&tr);
    assert_ne!(want, start, "training changed nothing");
    let records = curve(straight.path());
    let train_losses: Vec<f64> = records
        .iter()
        .filter_map(|r| match r {
            CurveRecord::Train { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect();
    assert_eq!(train_losses.len(), 6);
    // Held-out loss at steps 3 and 6.
    let evals: Vec<usize> = records
        .iter()
        .filter(|r| matches!(r, CurveRecord::Eval { .. }))
        .map(CurveRecord::step)
        .collect();
    assert_eq!(evals, vec![3, 6]);

    // Stop after 3 steps (a checkpoint is written there), resume in a fresh process state.
    let (model2, tr2) = tiny_with_lora();
    let split = tempfile::tempdir().unwrap();
    let first = run(&cfg, &model2, &tr2, split.path(), false, Some(3)).unwrap();
    assert!(first.interrupted);
    assert_eq!(first.steps, 3);
    let (model3, tr3) = tiny_with_lora();
    let second = run(&cfg, &model3, &tr3, split.path(), true, None).unwrap();
    assert_eq!(second.resumed_from, Some(3));
    assert_eq!(second.steps, 6);
    assert!(
        weights(&tr3) == want,
        "resumed weights differ from the uninterrupted run"
    );
    // The curve holds each step once, with the same losses (timings differ).
    let resumed: Vec<CurveRecord> = curve(split.path());
    let strip = |rs: &[CurveRecord]| -> Vec<(usize, u64)> {
        rs.iter()
            .map(|r| match r {
                CurveRecord::Train { step, loss, .. } | CurveRecord::Eval { step, loss, .. } => {
                    (*step, loss.to_bits())
                }
            })
            .collect()
    };
    assert_eq!(strip(&resumed), strip(&records));
}

#[test]
fn resume_with_a_changed_config_is_refused() {
    let cfg = config();
    let (model, tr) = tiny_with_lora();
    let out = tempfile::tempdir().unwrap();
    run(&cfg, &model, &tr, out.path(), false, Some(2)).unwrap();
    let changed = TrainConfig {
        lr_peak: 5e-3,
        ..cfg
    };
    let (model, tr) = tiny_with_lora();
    match run(&changed, &model, &tr, out.path(), true, None) {
        Err(TrainError::ConfigChanged { field, .. }) => assert_eq!(field, "lr_peak"),
        other => panic!("expected ConfigChanged, got {other:?}"),
    }
}

#[test]
fn non_finite_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint() {
    // lr 1e30 with weight decay: the decay factor (1 − lr·wd) ≈ −1e28 compounds, so step 1
    // leaves large but finite factors (checkpointed) and step 2 overflows to infinity.
    let cfg = TrainConfig {
        lr_peak: 1e30,
        lr_min: 1e30,
        warmup_steps: 0,
        checkpoint_every: Some(1),
        max_grad_norm: None,
        weight_decay: 0.01,
        ..config()
    };
    let (model, tr) = tiny_with_lora();
    let out = tempfile::tempdir().unwrap();
    let err = run(&cfg, &model, &tr, out.path(), false, None).unwrap_err();
    let (step, last) = match &err {
        TrainError::NonFiniteLoss {
            step,
            last_checkpoint,
            ..
        }
        | TrainError::NonFiniteGradient {
            step,
            last_checkpoint,
            ..
        } => (*step, last_checkpoint.clone()),
        TrainError::NonFiniteParameter {
            step,
            last_checkpoint,
            ..
        } => (*step, last_checkpoint.clone()),
        other => panic!("expected a non-finite stop, got {other}"),
    };
    assert!(step >= 2, "stopped at step {step}");
    assert!(err.to_string().contains("not finite"), "{err}");
    // The checkpoint `latest` names is a good one: its state is before the failing step.
    let latest = train::checkpoint::latest(out.path()).unwrap().unwrap();
    let state = train::checkpoint::read_state(&latest).unwrap();
    assert!(state.step < step);
    assert_eq!(
        last.as_ref(),
        Some(&latest),
        "the error names the last good checkpoint"
    );
    // A poisoned weight (NaN) fails at once, before any checkpoint.
    let (model, tr) = tiny_with_lora();
    let key = tr
        .vars
        .keys()
        .find(|k| k.contains("lora_A"))
        .unwrap()
        .clone();
    let var = &tr.vars[&key];
    let poisoned = (var.as_tensor().detach() * f64::NAN).unwrap();
    var.set(&poisoned).unwrap();
    let out = tempfile::tempdir().unwrap();
    match run(&config(), &model, &tr, out.path(), false, None) {
        Err(TrainError::NonFiniteLoss {
            step: 1,
            last_checkpoint: None,
            ..
        }) => {}
        other => panic!("expected NonFiniteLoss at step 1, got {other:?}"),
    }
    assert!(train::checkpoint::latest(out.path()).unwrap().is_none());
}

/// The examples with every other one a retain example.
fn retain_examples() -> Vec<TokenizedExample> {
    examples()
        .into_iter()
        .enumerate()
        .map(|(i, e)| TokenizedExample {
            retain: i % 2 == 0,
            ..e
        })
        .collect()
}

#[test]
fn retain_kl_run_logs_the_kl_keeps_the_held_out_loss_nll_and_must_resume_with_it() {
    let cfg = TrainConfig {
        retain_kl: 0.5,
        ..config()
    };
    let data = retain_examples();
    let (model, tr) = tiny_with_lora();
    let out = tempfile::tempdir().unwrap();
    run_on(&data, &cfg, &model, &tr, out.path(), false, None).unwrap();
    let records = curve(out.path());
    let kls: Vec<Option<f64>> = records
        .iter()
        .filter_map(|r| match r {
            CurveRecord::Train { retain_kl, .. } => Some(*retain_kl),
            _ => None,
        })
        .collect();
    assert_eq!(kls.len(), 6);
    // Kaiming init has B = 0: the first step's adapter is the base, so its KL is exactly 0.
    assert_eq!(kls[0], Some(0.0));
    assert!(kls[1..].iter().flatten().any(|&kl| kl > 0.0), "{kls:?}");
    // The held-out loss is the NLL alone: the last one equals `eval_loss` of the final model.
    let last_eval = records
        .iter()
        .rev()
        .find_map(|r| match r {
            CurveRecord::Eval { loss, .. } => Some(*loss),
            _ => None,
        })
        .unwrap();
    let (nll, _) = train::eval_loss(&model, &data[8..], cfg.batch_size, 0).unwrap();
    assert_eq!(last_eval.to_bits(), nll.to_bits());

    // A run without the term writes no retain_kl field at all.
    let (model, tr) = tiny_with_lora();
    let plain = tempfile::tempdir().unwrap();
    run(&config(), &model, &tr, plain.path(), false, None).unwrap();
    let text = std::fs::read_to_string(plain.path().join("loss_curve.jsonl")).unwrap();
    assert!(!text.contains("retain_kl"), "{text}");

    // Resuming the λ = 0.5 run without the term is refused, naming it.
    let (model, tr) = tiny_with_lora();
    match run_on(&data, &config(), &model, &tr, out.path(), true, None) {
        Err(TrainError::ConfigChanged { field, saved, now }) => assert_eq!(
            (field.as_str(), saved.as_str(), now.as_str()),
            ("retain_kl", "0.5", "absent")
        ),
        other => panic!("expected ConfigChanged, got {other:?}"),
    }
}

#[test]
fn retain_kl_settings_are_validated() {
    let (model, tr) = tiny_with_lora();
    let out = tempfile::tempdir().unwrap();
    let with = |retain_kl| TrainConfig {
        retain_kl,
        ..config()
    };
    for bad in [-0.1, f64::NAN, f64::INFINITY] {
        match run_on(
            &retain_examples(),
            &with(bad),
            &model,
            &tr,
            out.path(),
            false,
            None,
        ) {
            Err(TrainError::Config(m)) => assert!(m.contains("retain_kl"), "{m}"),
            other => panic!("retain_kl {bad}: expected a config error, got {other:?}"),
        }
    }
    // No retain example: the term would silently do nothing.
    match run(&with(0.5), &model, &tr, out.path(), false, None) {
        Err(TrainError::Config(m)) => assert!(m.contains("no training example"), "{m}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    // Full fine-tuning has no adapter to switch off.
    let dir = golden_dir().join("tiny-llama");
    let dcfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut w = WeightMap::from_safetensors_dir(&dir, &Device::Cpu).unwrap();
    let mut full = Decoder::load(dcfg, &mut w, &Device::Cpu, DType::F32).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into()],
        rslora: false,
        init: LoraInit::Full,
    };
    let full_tr = inject(&mut full, &lora, 0).unwrap();
    match run_on(
        &retain_examples(),
        &with(0.5),
        &full,
        &full_tr,
        out.path(),
        false,
        None,
    ) {
        Err(TrainError::Config(m)) => assert!(m.contains("LoRA adapter"), "{m}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}
