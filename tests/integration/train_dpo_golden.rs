//! The DPO term against `tests/fixtures/golden/tiny-llama-dpo-step`: one step computed with
//! PyTorch, transformers and PEFT in float64 on the shared tiny Llama (its README says how). The
//! starting adapter, the pairs, β and w come from the fixture; the reference log-probs are this
//! crate's own (the adapter switched off), so the comparison is end to end. Both gradient paths
//! (the hand-written step and candle's autodiff) are compared, with the pairs in one micro-batch
//! and split over two.
//!
//! Tolerances, from the fixture's README (stock float32 transformers + PEFT is ~10× inside each):
//! log-probs `5e-4` absolute (|ref| ≤ 330), margins `1e-4`, the loss `1e-5 + 1e-4·|ref|`, every
//! LoRA gradient `5e-6 + 1e-4·|ref|` (|ref| ≤ 0.28).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::common::golden_dir;
use crate::train_dpo::without_adapter;
use candle_core::{DType, Device, Tensor, Var};
use sails::lora::{inject_adapter, Trainable};
use sails::model::config::DecoderConfig;
use sails::model::decoder::Decoder;
use sails::model::lora::Adapter;
use sails::model::weights::{load_safetensors_file, WeightMap};
use sails::train::dpo::{self, autodiff_dpo_loss_and_grads, DpoStats, PairBatch};
use sails::train::{fast, response_token_loss, TokenizedExample, TokenizedPair};
use serde_json::Value;
use sha2::{Digest, Sha256};

const LOGP_ATOL: f64 = 5e-4;
const MARGIN_ATOL: f64 = 1e-4;
const LOSS_TOL: (f64, f64) = (1e-5, 1e-4);
const GRAD_TOL: (f64, f64) = (5e-6, 1e-4);

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/tiny-llama-dpo-step")
}

struct Golden {
    meta: Value,
    pairs: Vec<TokenizedPair>,
    beta: f64,
    weight: f64,
    reference: HashMap<String, Tensor>,
}

impl Golden {
    fn load() -> Self {
        let dir = fixture_dir();
        let meta: Value =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
        let side = |v: &Value| TokenizedExample {
            ids: v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect(),
            target_start: v["target_start"].as_u64().unwrap() as usize,
            target_end: v["target_end"].as_u64().unwrap() as usize,
            retain: false,
        };
        let pairs = meta["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| TokenizedPair {
                id: p["id"].as_str().unwrap().into(),
                chosen: side(&p["chosen"]),
                rejected: side(&p["rejected"]),
            })
            .collect();
        let reference = load_safetensors_file(&dir.join("reference.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
            .collect();
        Self {
            beta: meta["dpo"]["beta"].as_f64().unwrap(),
            weight: meta["dpo"]["weight"].as_f64().unwrap(),
            meta,
            pairs,
            reference,
        }
    }

    fn values(&self, key: &str) -> Vec<f64> {
        self.reference[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    fn scalar(&self, key: &str) -> f64 {
        self.reference[key].to_scalar::<f64>().unwrap()
    }

    /// The tiny model (checked to be the file the fixture was made from) with the fixture's
    /// starting adapter as training `Var`s.
    fn model(&self) -> (Decoder, Trainable) {
        let dir = golden_dir().join("tiny-llama");
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            self.meta["base"]["model.safetensors_sha256"]
                .as_str()
                .unwrap(),
            "{}: not the model the DPO golden was made from",
            dir.display()
        );
        let cfg = DecoderConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let mut w = WeightMap::from_safetensors_dir(&dir, &Device::Cpu).unwrap();
        let mut model = Decoder::load(cfg, &mut w, &Device::Cpu, DType::F32).unwrap();
        let adapter = Adapter::load(&fixture_dir(), &Device::Cpu).unwrap();
        assert_eq!(adapter.config.scale(), 2.0);
        let trainable = inject_adapter(&mut model, &adapter).unwrap();
        assert_eq!(trainable.vars.len(), 28);
        (model, trainable)
    }
}

/// The largest `|got − want|` and `|got − want| / |want|`, and the largest excess over
/// `atol + rtol·|want|` (≤ 0 when every value is inside the tolerance).
#[derive(Debug, Default, Clone, Copy)]
struct Diff {
    abs: f64,
    rel: f64,
    excess: f64,
}

impl Diff {
    fn of(got: &[f64], want: &[f64], atol: f64, rtol: f64) -> Self {
        assert_eq!(got.len(), want.len());
        let mut d = Diff {
            excess: f64::NEG_INFINITY,
            ..Diff::default()
        };
        for (g, w) in got.iter().zip(want) {
            let e = (g - w).abs();
            let e = if e.is_nan() { f64::INFINITY } else { e };
            d.abs = d.abs.max(e);
            d.rel = d.rel.max(e / w.abs().max(f64::MIN_POSITIVE));
            d.excess = d.excess.max(e - (atol + rtol * w.abs()));
        }
        d
    }

    fn max(self, o: Diff) -> Diff {
        Diff {
            abs: self.abs.max(o.abs),
            rel: self.rel.max(o.rel),
            excess: self.excess.max(o.excess),
        }
    }
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn params(tr: &Trainable) -> Vec<(&String, &Var)> {
    tr.vars.iter().collect()
}

type DpoStep = fn(
    &Decoder,
    &[(&String, &Var)],
    &[PairBatch],
    f64,
    f64,
) -> sails::train::Result<(DpoStats, Vec<Tensor>)>;

const PATHS: [(&str, DpoStep); 3] = [
    ("hand-written", fast::dpo_loss_and_grads),
    ("autodiff", autodiff_dpo_loss_and_grads),
    ("dispatch", dpo::dpo_loss_and_grads),
];

/// The fixture's pairs as micro-batches: all three in one, or `[p0, p1]` then `[p2]`.
fn layouts(golden: &Golden, reference: &[[f64; 2]]) -> Vec<(&'static str, Vec<PairBatch>)> {
    let p: Vec<&TokenizedPair> = golden.pairs.iter().collect();
    let batch = |range: std::ops::Range<usize>| {
        PairBatch::new(
            &p[range.clone()],
            reference[range].to_vec(),
            0,
            &Device::Cpu,
        )
        .unwrap()
    };
    vec![
        ("one micro-batch", vec![batch(0..3)]),
        ("two micro-batches", vec![batch(0..2), batch(2..3)]),
    ]
}

/// `weight` × the mean pair loss, the mean margin and every gradient of one path against the
/// golden.
struct Comparison {
    loss: Diff,
    margin: Diff,
    grad: Diff,
    /// The largest `|got − want|` of a tensor over that tensor's largest `|want|`.
    grad_rel_to_tensor_max: f64,
}

impl Comparison {
    fn new(
        golden: &Golden,
        tr: &Trainable,
        stats: &DpoStats,
        grads: &[Tensor],
        weight: f64,
    ) -> Self {
        assert_eq!(stats.pairs, 3);
        let loss = Diff::of(
            &[weight * stats.loss()],
            &[golden.scalar("loss")],
            LOSS_TOL.0,
            LOSS_TOL.1,
        );
        let mean_margin = golden.values("margin").iter().sum::<f64>() / 3.0;
        let margin = Diff::of(&[stats.margin()], &[mean_margin], MARGIN_ATOL, 0.0);
        let mut grad = Diff {
            excess: f64::NEG_INFINITY,
            ..Diff::default()
        };
        let mut grad_rel_to_tensor_max = 0f64;
        for ((name, _), g) in params(tr).iter().zip(grads) {
            let want = golden.values(&format!("{name}.grad"));
            let d = Diff::of(&f64s(g), &want, GRAD_TOL.0, GRAD_TOL.1);
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            grad_rel_to_tensor_max = grad_rel_to_tensor_max.max(d.abs / scale);
            grad = grad.max(d);
        }
        Self {
            loss,
            margin,
            grad,
            grad_rel_to_tensor_max,
        }
    }

    fn passes(&self) -> bool {
        self.loss.excess <= 0.0 && self.margin.excess <= 0.0 && self.grad.excess <= 0.0
    }
}

/// The fixture's padded batch is `PairBatch`'s layout: rows [c0, r0, c1, r1, c2, r2], left
/// padded, the same targets.
#[test]
fn fixture_batch_is_the_pair_batch_layout() {
    let golden = Golden::load();
    let inputs =
        load_safetensors_file(&fixture_dir().join("inputs.safetensors"), &Device::Cpu).unwrap();
    let refs: Vec<&TokenizedPair> = golden.pairs.iter().collect();
    let pb = PairBatch::new(&refs, vec![[0.0; 2]; 3], 0, &Device::Cpu).unwrap();
    let u = |t: &Tensor| t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    assert_eq!(u(&pb.batch.input_ids), u(&inputs["input_ids"]));
    assert_eq!(u(&pb.batch.attention_mask), u(&inputs["attention_mask"]));
    let spans = u(&inputs["target_spans"]);
    let mut want = Vec::new();
    for (row, s) in spans.iter().enumerate() {
        for pos in s[0]..s[1] {
            want.push((row, pos as usize - 1));
        }
    }
    let got: Vec<(usize, usize)> = pb.batch.targets.iter().map(|x| (x.row, x.pos)).collect();
    assert_eq!(got, want);
    // Some rows are padded, and some sequences have a token after their last target.
    let mask = u(&inputs["attention_mask"]);
    assert!(mask.iter().filter(|r| r[0] == 0).count() >= 2);
    assert!(golden
        .pairs
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .any(|e| e.target_end < e.ids.len()));
}

/// `pair_outcome` on the golden float64 log-probs gives the golden margins and pair losses to
/// float64 rounding: the formula alone, without any f32 forward.
#[test]
fn pair_outcome_on_golden_log_probs_matches_in_f64() {
    let golden = Golden::load();
    let (policy, reference) = (
        golden.values("policy_logps"),
        golden.values("reference_logps"),
    );
    let (margins, losses) = (golden.values("margin"), golden.values("pair_loss"));
    let mut mean = 0.0;
    for i in 0..3 {
        let o = dpo::pair_outcome(
            golden.beta,
            [policy[2 * i], policy[2 * i + 1]],
            [reference[2 * i], reference[2 * i + 1]],
        );
        assert!((o.margin - margins[i]).abs() < 1e-12, "pair {i}: {o:?}");
        assert!((o.loss - losses[i]).abs() < 1e-12, "pair {i}: {o:?}");
        let sigmoid = 1.0 / (1.0 + margins[i].exp());
        assert!(
            (o.pull - golden.beta * sigmoid).abs() < 1e-15,
            "pair {i}: {o:?}"
        );
        mean += o.loss / 3.0;
    }
    assert!((golden.weight * mean - golden.scalar("loss")).abs() < 1e-14);
}

/// The reference (adapter off, one pair per batch) and the policy log-probs, through the
/// hand-written forward and candle's.
#[test]
fn dpo_log_probs_match_golden() {
    let golden = Golden::load();
    let (model, _tr) = golden.model();
    let reference = dpo::reference_logps(&without_adapter(&model), &golden.pairs, 0).unwrap();
    let flat: Vec<f64> = reference.iter().flatten().copied().collect();
    let d = Diff::of(&flat, &golden.values("reference_logps"), LOGP_ATOL, 0.0);
    println!("reference log-probs: max abs {:.3e}", d.abs);
    assert!(d.excess <= 0.0, "reference log-probs {flat:?}: {d:?}");

    let refs: Vec<&TokenizedPair> = golden.pairs.iter().collect();
    let pb = PairBatch::new(&refs, reference, 0, &Device::Cpu).unwrap();
    assert!(fast::forward_applies(&model));
    let hand_written = dpo::sequence_logps(&model, &pb.batch).unwrap();
    let nll = f64s(&response_token_loss(&model, &pb.batch).unwrap().token_nll);
    let candle = dpo::row_logps(&pb.batch.targets, &nll, 6);
    let want = golden.values("policy_logps");
    for (path, got) in [("hand-written", hand_written), ("candle", candle)] {
        let d = Diff::of(&got, &want, LOGP_ATOL, 0.0);
        println!("{path} policy log-probs: max abs {:.3e}", d.abs);
        assert!(d.excess <= 0.0, "{path} policy log-probs {got:?}: {d:?}");
    }
}

/// Loss, margins and all 28 LoRA gradients of `w · mean ℓ_i`, both paths, both layouts.
#[test]
fn dpo_loss_and_gradients_match_golden() {
    let golden = Golden::load();
    let (model, tr) = golden.model();
    let p = params(&tr);
    assert!(fast::applies(&model, &p));
    let reference = dpo::reference_logps(&without_adapter(&model), &golden.pairs, 0).unwrap();
    for (layout, batches) in layouts(&golden, &reference) {
        for (path, step) in PATHS {
            let (stats, grads) = step(&model, &p, &batches, golden.beta, golden.weight).unwrap();
            // Pairs 0 and 1 have positive margins, pair 2 a negative one.
            assert_eq!(stats.preferred, 2, "{path}, {layout}");
            let c = Comparison::new(&golden, &tr, &stats, &grads, golden.weight);
            println!(
                "{path}, {layout}: loss {:.9} |Δ| {:.2e} (rel {:.2e}); mean margin |Δ| {:.2e}; \
                 gradients max |Δ| {:.2e}, max |Δ|/|ref| {:.2e}, max |Δ|/tensor max {:.2e}",
                golden.weight * stats.loss(),
                c.loss.abs,
                c.loss.rel,
                c.margin.abs,
                c.grad.abs,
                c.grad.rel,
                c.grad_rel_to_tensor_max
            );
            assert!(c.loss.excess <= 0.0, "{path}, {layout}: loss {:?}", c.loss);
            assert!(
                c.margin.excess <= 0.0,
                "{path}, {layout}: margin {:?}",
                c.margin
            );
            assert!(
                c.grad.excess <= 0.0,
                "{path}, {layout}: gradients {:?}",
                c.grad
            );
        }
    }
}

/// The comparison can fail: the gradients are large against the tolerance, and β = 0.11
/// instead of 0.1, a DPO weight of 1 or the pairs' sides swapped each move the results far
/// outside it on both paths.
#[test]
fn dpo_golden_comparison_detects_wrong_settings() {
    let golden = Golden::load();
    let (model, tr) = golden.model();
    let p = params(&tr);
    let smallest_tensor_max = p
        .iter()
        .map(|(name, _)| {
            golden
                .values(&format!("{name}.grad"))
                .iter()
                .fold(0f64, |m, x| m.max(x.abs()))
        })
        .fold(f64::INFINITY, f64::min);
    // Even the tensor with the smallest gradients has entries far above the tolerance.
    assert!(
        smallest_tensor_max > 100.0 * GRAD_TOL.0,
        "smallest tensor max {smallest_tensor_max}"
    );

    let reference = dpo::reference_logps(&without_adapter(&model), &golden.pairs, 0).unwrap();
    let swapped: Vec<TokenizedPair> = golden
        .pairs
        .iter()
        .map(|x| TokenizedPair {
            chosen: x.rejected.clone(),
            rejected: x.chosen.clone(),
            ..x.clone()
        })
        .collect();
    let swapped_reference: Vec<[f64; 2]> = reference.iter().map(|[c, r]| [*r, *c]).collect();
    let (_, batches) = layouts(&golden, &reference).remove(0);
    let swapped_batches = vec![PairBatch::new(
        &swapped.iter().collect::<Vec<_>>(),
        swapped_reference,
        0,
        &Device::Cpu,
    )
    .unwrap()];
    for (path, step) in PATHS.into_iter().take(2) {
        for (what, batches, beta, weight) in [
            ("β 0.11", &batches, 0.11, golden.weight),
            ("weight 1", &batches, golden.beta, 1.0),
            (
                "sides swapped",
                &swapped_batches,
                golden.beta,
                golden.weight,
            ),
        ] {
            let (stats, grads) = step(&model, &p, batches, beta, weight).unwrap();
            let c = Comparison::new(&golden, &tr, &stats, &grads, weight);
            assert!(
                !c.passes() && c.loss.excess > 0.0 && c.grad.excess > 100.0 * GRAD_TOL.0,
                "{path}, {what}: not detected (loss {:?}, gradients {:?})",
                c.loss,
                c.grad
            );
        }
    }
}
