//! `sails eval frames` end to end on the real default model with a small random SAE, a hand-made
//! selection and a zero adapter: the report deserialises into its type, the files are written, the
//! original wording is the reference of every ratio, and an adapter that changes nothing gives
//! the base model's figures in every frame.

use crate::common;

use crate::common::run_sails;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use sails::data::frames::Frame;
use sails::eval::frames::{FramesReport, PromptScore, Variant};
use sails::features::{
    FeatureConfig, FeatureScore, LayerSelection, PooledResiduals, PooledSet, PromptSetInfo,
    Selection,
};
use sails::model::lora::{Adapter, AdapterConfig};
use sails::model::Resid;

const HOOK: Resid = Resid::In(6);
const D_MODEL: usize = 576;
const D_SAE: usize = 64;

/// features.json and activations.safetensors for a random SAE at `Resid::In(6)`: four kept
/// features, two on each side, and training residual means that differ along dimension 0.
pub(crate) fn write_features(dir: &Path) {
    let sae_dir = dir.join("sae");
    common::random_topk_sae(HOOK, D_MODEL, D_SAE, 3)
        .save_saelens(&sae_dir)
        .unwrap();
    // The harmless mean of a harmless-side feature well above anything a random feature
    // reaches, so that every prompt's feature score is positive and its ratios are defined.
    let score = |rank: usize, index: usize, diff: f64| {
        let mean_harmless = if diff > 0.0 { 0.0 } else { 10.0 };
        FeatureScore {
            index,
            rank,
            delta: diff.abs(),
            diff,
            mean_harmful: mean_harmless + diff,
            mean_harmless,
            freq_harmful: 1.0,
            freq_harmless: 1.0,
            effect_size: 1.0,
            diff_ci95: [diff, diff],
            robust: true,
        }
    };
    let selection = Selection {
        format_version: 1,
        config: FeatureConfig::default(),
        model: "default".into(),
        harmful: PromptSetInfo::of(&[]),
        harmless: PromptSetInfo::of(&[]),
        layers: vec![LayerSelection {
            hook: HOOK,
            hook_name: sails::sae::hook_name(HOOK),
            sae: sae_dir.display().to_string(),
            d_sae: D_SAE,
            features: vec![
                score(0, 3, 0.2),
                score(1, 11, -0.2),
                score(2, 17, 0.1),
                score(3, 40, -0.1),
            ],
        }],
    };
    let features = dir.join("features");
    std::fs::create_dir_all(&features).unwrap();
    selection.save(&features.join("features.json")).unwrap();
    let set = |shift: f32| {
        let mut s = PooledSet::new(D_MODEL);
        for _ in 0..2 {
            let mut row = vec![0.0; D_MODEL];
            row[0] = shift;
            s.push(&row, &vec![true; D_MODEL]);
        }
        s
    };
    let residuals = PooledResiduals {
        layers: [(HOOK, (set(1.0), set(0.0)))].into_iter().collect(),
    };
    residuals
        .save(&features.join("activations.safetensors"))
        .unwrap();
}

/// A LoRA adapter on every q_proj of SmolLM2 with B = 0: the model it makes is the base model.
fn write_zero_adapter(dir: &Path) {
    write_adapter(dir, 0.0);
}

/// A rank-2 LoRA adapter on every q_proj of SmolLM2, B drawn with standard deviation `b_std`.
pub(crate) fn write_adapter(dir: &Path, b_std: f64) {
    let (r, d) = (2, D_MODEL);
    let mut g = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(4);
    let mut weights = HashMap::new();
    for l in 0..30 {
        let mut draw = |n: usize, std: f64| {
            let v: Vec<f32> = sails::linalg::standard_normals(&mut g, n)
                .iter()
                .map(|v| (*v * std) as f32)
                .collect();
            v
        };
        let a = Tensor::from_vec(draw(r * d, 0.05), (r, d), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(draw(d * r, b_std), (d, r), &Device::Cpu).unwrap();
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
    .save(dir)
    .unwrap();
}

#[test]
fn frames_probe_writes_its_report_and_a_zero_adapter_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    write_features(tmp.path());
    let adapter = tmp.path().join("adapter");
    write_zero_adapter(&adapter);
    let out_dir = tmp.path().join("out");
    let path = |p: &Path| p.display().to_string();
    let out = run_sails(&[
        "eval",
        "frames",
        "--features",
        &path(&tmp.path().join("features")),
        "--adapter",
        &path(&adapter),
        "--behaviours",
        "2",
        "--control",
        "1",
        "--frames",
        "past,hypothetical",
        "--max-new-tokens",
        "3",
        "--bootstrap",
        "20",
        "--out",
        &path(&out_dir),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "frames failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The wire format is the report type, field for field.
    let report: FramesReport = serde_json::from_slice(&out.stdout).unwrap();
    let on_disk: FramesReport =
        serde_json::from_slice(&std::fs::read(out_dir.join("frames.json")).unwrap()).unwrap();
    assert_eq!(report, on_disk);
    assert_eq!(report.behaviours.len(), 2);
    assert_eq!(report.controls.len(), 1);
    assert!(report.controls[0].id.starts_with("xstest:"));
    assert_eq!(
        report.config.frames,
        vec![Frame::Original, Frame::Past, Frame::Hypothetical]
    );
    assert_eq!(report.layers[0].kept, 4);
    assert_eq!(report.layers[0].harm_features, 2);
    assert!((report.layers[0].direct_norm - 1.0).abs() < 1e-6);
    for row in &report.frames {
        assert_eq!((row.n, row.n_control), (2, 1));
        let base = &row.variants[&Variant::Base];
        let aligned = &row.variants[&Variant::Aligned];
        assert_eq!(base.refusal.n, 2, "{}", row.frame);
        if row.frame == Frame::Original {
            assert_eq!(
                base.feature_score.ratio.map(|r| (r - 1.0).abs() < 1e-12),
                Some(true)
            );
            assert_eq!(base.refusal_vs_original.diff, 0.0);
        }
        // B = 0: the aligned model is the base model.
        assert_eq!(aligned.refusal, base.refusal, "{}", row.frame);
        assert_eq!(
            aligned.control_refusal, base.control_refusal,
            "{}",
            row.frame
        );
        assert_eq!(base.control_refusal.map(|r| r.n), Some(1));
        let (a, b) = (aligned.control_feature_score, base.control_feature_score);
        assert!((a.unwrap() - b.unwrap()).abs() < 1e-5, "{a:?} {b:?}");
        let auc = base.feature_auc.unwrap();
        assert!((0.0..=1.0).contains(&auc), "{auc}");
        assert_eq!(aligned.feature_auc, base.feature_auc, "{}", row.frame);
        for (a, b) in [
            (&aligned.feature_score, &base.feature_score),
            (&aligned.direct, &base.direct),
            (&aligned.harm_activation, &base.harm_activation),
        ] {
            assert!(
                (a.mean_a - b.mean_a).abs() < 1e-5,
                "{}: {a:?} {b:?}",
                row.frame
            );
        }
    }
    let scores: Vec<PromptScore> = std::fs::read_to_string(out_dir.join("scores.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (2 behaviours + 1 control) × 3 frames, for each of 2 models
    assert_eq!(scores.len(), 3 * 3 * 2);
    for v in ["base", "aligned"] {
        let g = std::fs::read_to_string(out_dir.join(format!("generations-{v}.jsonl"))).unwrap();
        assert_eq!(g.lines().count(), 3 * 3, "{v}");
    }
    let md = std::fs::read_to_string(out_dir.join("frames.md")).unwrap();
    assert!(md.contains("| hypothetical | 2 + 1 |"), "{md}");
    // A dry run prints the same draw without loading a model.
    let dry = run_sails(&[
        "eval",
        "frames",
        "--features",
        "unused",
        "--behaviours",
        "2",
        "--control",
        "1",
        "--dry-run",
        "--json",
    ]);
    assert!(dry.status.success());
    let draw: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    let ids: Vec<&str> = draw["behaviours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = report.behaviours.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, want);
}

#[test]
fn frames_probe_errors_name_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    let out = run_sails(&[
        "eval",
        "frames",
        "--features",
        &missing.display().to_string(),
        "--behaviours",
        "1",
        "--out",
        &tmp.path().join("out").display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("features.json"), "{err}");
    // Nothing was written.
    assert!(!tmp.path().join("out").exists());
    let out = run_sails(&[
        "eval",
        "frames",
        "--behaviours",
        "100000",
        "--dry-run",
        "--features",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("100000 were asked for"), "{err}");
}

/// Every rewrite of every prompt of the harmful suite and of XSTest's safe prompts that the rules
/// read: the task is made of the original's own words (besides the asker's pronouns and the "go
/// about" before a gerund), and every frame is one sentence or two, ending as a sentence does.
#[test]
fn every_rewrite_of_the_real_suites_keeps_the_originals_words() {
    use sails::data::frames::parse;
    use sails::data::{Splits, Suite};
    let splits = Splits::load().unwrap();
    let words = |t: &str| -> Vec<String> {
        t.split_whitespace()
            .map(|w| {
                w.trim_matches(|c: char| !c.is_alphanumeric())
                    .to_lowercase()
            })
            .filter(|w| !w.is_empty())
            .collect()
    };
    let pronouns = [
        "my",
        "me",
        "myself",
        "their",
        "them",
        "themselves",
        "go",
        "about",
    ];
    let mut read = 0;
    for suite in [Suite::Harmful, Suite::Overrefusal] {
        for r in splits.eval_suite(suite) {
            let Ok(req) = parse(&r.text) else { continue };
            read += 1;
            let original: std::collections::HashSet<String> = words(&r.text).into_iter().collect();
            for w in words(&req.task_text()) {
                assert!(
                    original.contains(&w) || pronouns.contains(&w.as_str()),
                    "{}: {w:?} is not in {:?}",
                    r.id,
                    r.text
                );
            }
            for f in Frame::ALL {
                let text = req.render(f, &r.text);
                if f == Frame::Original {
                    assert_eq!(text, r.text.trim());
                    continue;
                }
                assert!(
                    text.ends_with(['.', '?']) && !text.contains("  ") && !text.contains(" ,"),
                    "{} {f}: {text:?}",
                    r.id
                );
            }
        }
    }
    // Most of the harmful suite's commands and questions are read (the measured share is in
    // EVALUATION.md); a rule change that reads far fewer shows here.
    assert!(read > 450, "only {read} prompts read");
}
