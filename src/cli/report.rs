//! Gathers a run folder's artifacts into the report's inputs and writes report.html and
//! summary.md. Used by `sails align` (its last stage) and `sails report`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use sails::attack::framed::{FramedSummary, SUMMARY_FILE};
use sails::eval::judge::Label;
use sails::eval::metrics::Rate;
use sails::eval::{GenerationRecord, Metrics, ATTACKS_DIR};
use sails::features::Selection;
use sails::manifest::RunManifest;
use sails::report::{self, Estimate, ReportInputs};
use sails::subspace::Subspace;
use sails::train::CurveRecord;

use super::compare::{Comparison, Figure, Frontier};

/// Write report.html and summary.md for a run folder (align's last stage, on its own).
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run folder.
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
}

pub fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let manifest = RunManifest::load(&args.run)?;
    let (model, preset) = manifest
        .as_ref()
        .map(|m| {
            (
                m.config["model"].as_str().unwrap_or("").to_string(),
                m.config["preset"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_default();
    write_run_report(&args.run, &model, &preset)?;
    println!("{}", args.run.join(report::HTML_FILE).display());
    Ok(ExitCode::SUCCESS)
}

fn read_json<T: for<'de> serde::Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
    ))
}

/// The attack suites of `eval-base` and `eval-aligned` side by side, paired where both ran.
fn attack_lines(root: &Path) -> anyhow::Result<Vec<report::AttackLine>> {
    let summary = |stage: &str| -> anyhow::Result<Option<FramedSummary>> {
        read_json(&root.join(stage).join(ATTACKS_DIR).join(SUMMARY_FILE))
    };
    let (base, aligned) = (summary("eval-base")?, summary("eval-aligned")?);
    let paired = match (&base, &aligned) {
        (Some(_), Some(_)) => {
            sails::eval::compare(&root.join("eval-base"), &root.join("eval-aligned"))?.attacks
        }
        _ => BTreeMap::new(),
    };
    // Each attack once, in the order the runs list them (the plain run first).
    let success = |s: &Option<FramedSummary>, folder: &str| -> Option<Rate> {
        let s = s.as_ref()?;
        if folder == "plain" {
            return Some(s.plain_success);
        }
        s.attacks
            .iter()
            .find(|a| a.attack == folder)
            .map(|a| a.success)
    };
    let mut order: Vec<(String, String)> = Vec::new();
    for s in [&base, &aligned].into_iter().flatten() {
        let rows = std::iter::once(("plain".to_owned(), "no attack".to_owned())).chain(
            s.attacks
                .iter()
                .map(|a| (a.attack.clone(), a.description.clone())),
        );
        for row in rows {
            if !order.iter().any(|(folder, _)| *folder == row.0) {
                order.push(row);
            }
        }
    }
    Ok(order
        .into_iter()
        .map(|(folder, attack)| report::AttackLine {
            base: success(&base, &folder),
            aligned: success(&aligned, &folder),
            paired: paired.get(&folder).cloned(),
            attack,
        })
        .collect())
}

fn loss_curve(label: &str, path: &Path) -> anyhow::Result<Option<report::LossCurve>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut curve = report::LossCurve {
        label: label.to_string(),
        train: Vec::new(),
        eval: Vec::new(),
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str(line).with_context(|| format!("parsing {}", path.display()))? {
            CurveRecord::Train { step, loss, .. } => curve.train.push((step as u64, loss)),
            CurveRecord::Eval { step, loss, .. } => curve.eval.push((step as u64, loss)),
        }
    }
    Ok(Some(curve))
}

fn generations(path: &Path) -> anyhow::Result<Vec<GenerationRecord>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    sails::eval::read_jsonl(path).with_context(|| format!("reading {}", path.display()))
}

/// Prompts both evaluations answered: the harmful ones the aligned model now refuses first, then
/// over-refusal changes, at most 3 per suite.
fn examples(base: &[GenerationRecord], aligned: &[GenerationRecord]) -> Vec<report::Example> {
    let by_id: BTreeMap<&str, &GenerationRecord> =
        aligned.iter().map(|g| (g.id.as_str(), g)).collect();
    let mut pairs: Vec<(&GenerationRecord, &GenerationRecord)> = base
        .iter()
        .filter_map(|b| by_id.get(b.id.as_str()).map(|a| (b, *a)))
        .collect();
    // changed verdicts first, then in file order
    pairs.sort_by_key(|(b, a)| (b.label == a.label, b.suite.name()));
    let mut per_suite: BTreeMap<&str, usize> = BTreeMap::new();
    pairs
        .into_iter()
        .filter(|(b, _)| {
            let n = per_suite.entry(b.suite.name()).or_default();
            *n += 1;
            *n <= 3
        })
        .map(|(b, a)| report::Example {
            prompt: b.prompt.clone(),
            suite: b.suite.name().to_string(),
            base_response: b.response.clone(),
            aligned_response: a.response.clone(),
            base_refused: b.label == Label::Refused,
            aligned_refused: a.label == Label::Refused,
        })
        .collect()
}

fn explanations(path: &Path) -> anyhow::Result<Option<report::Explanations>> {
    if !path.exists() {
        return Ok(None);
    }
    let e = sails::explain::Explanations::load(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let cards = e
        .cards
        .iter()
        .map(|c| report::FeatureCard {
            hook_name: c.hook_name.clone(),
            index: c.score.index,
            delta: c.score.delta,
            diff_ci95: c.score.diff_ci95,
            freq_harmful: c.score.freq_harmful,
            freq_harmless: c.score.freq_harmless,
            contexts: c
                .top_contexts
                .iter()
                .map(|x| report::Context {
                    tokens: x.tokens.clone(),
                    activations: x.activations.clone(),
                })
                .collect(),
            promoted: c.promoted_tokens.iter().map(|t| t.token.clone()).collect(),
            suppressed: c
                .suppressed_tokens
                .iter()
                .map(|t| t.token.clone())
                .collect(),
        })
        .collect();
    let attribution = e.attribution.as_ref().map(|a| {
        let mut layers: Vec<usize> = a.modules.iter().map(|m| m.layer).collect();
        layers.sort_unstable();
        layers.dedup();
        let mut columns: Vec<String> = Vec::new();
        for m in &a.modules {
            let short = m.module.rsplit('.').next().unwrap_or(&m.module).to_string();
            if !columns.contains(&short) {
                columns.push(short);
            }
        }
        let mut values = vec![vec![None; columns.len()]; layers.len()];
        for m in &a.modules {
            let short = m.module.rsplit('.').next().unwrap_or(&m.module);
            if let (Ok(r), Some(c)) = (
                layers.binary_search(&m.layer),
                columns.iter().position(|x| x == short),
            ) {
                values[r][c] = m.share_in_subspace;
            }
        }
        report::Attribution {
            rows: layers.iter().map(|l| format!("layer {l}")).collect(),
            columns,
            values,
        }
    });
    let shifts = e
        .shift
        .iter()
        .flatten()
        .map(|s| report::ActivationShift {
            hook_name: sails::sae::hook_name(s.hook),
            index: s.index,
            harmful_before: s.harmful_before,
            harmful_after: s.harmful_after,
            harmless_before: s.harmless_before,
            harmless_after: s.harmless_after,
        })
        .collect();
    Ok(Some(report::Explanations {
        cards,
        attribution,
        shifts,
    }))
}

fn estimate(f: &Figure) -> Estimate {
    Estimate {
        value: f.seeds.mean,
        spread: if f.seeds.per_seed.len() > 1 {
            report::Spread::Sd(f.seeds.sd)
        } else {
            report::Spread::Interval {
                lo: f.pooled.lo,
                hi: f.pooled.hi,
            }
        },
    }
}

/// The compare run's frontier as the report draws it: seed means with the pooled Wilson
/// intervals (the per-seed points show the spread).
fn frontier(f: &Frontier) -> report::Frontier {
    let mut methods: Vec<report::FrontierMethod> = Vec::new();
    for p in &f.points {
        let name = p.method.name();
        let point = report::FrontierPoint {
            scale: p.scale,
            safety: pooled(&p.safety),
            over_refusal: pooled(&p.overrefusal),
            per_seed: p
                .per_seed
                .iter()
                .map(|s| (s.overrefusal.rate, s.safety.rate))
                .collect(),
        };
        match methods.iter_mut().find(|m| m.method == name) {
            Some(m) => m.points.push(point),
            None => methods.push(report::FrontierMethod {
                method: name.into(),
                points: vec![point],
            }),
        }
    }
    report::Frontier {
        methods,
        tests: f
            .tests
            .iter()
            .map(|t| report::FrontierTest {
                method_a: t.method_a.name().into(),
                method_b: t.method_b.name().into(),
                diff: t.test,
                per_seed: t.per_seed.clone(),
            })
            .collect(),
    }
}

fn pooled(f: &Figure) -> Estimate {
    Estimate {
        value: f.seeds.mean,
        spread: report::Spread::Interval {
            lo: f.pooled.lo,
            hi: f.pooled.hi,
        },
    }
}

fn method_rows(c: &Comparison) -> Vec<report::MethodRow> {
    c.rows
        .iter()
        .map(|r| report::MethodRow {
            method: r.method.name().into(),
            seeds: r.seeds.len(),
            safety: r.suites.get("harmful").map(estimate),
            over_refusal: r.suites.get("overrefusal").map(estimate),
            attack_success: r.suites.get("attack-success-any").map(estimate),
            facts_accuracy: r.facts_accuracy.as_ref().map(estimate),
            alpaca_nll: r
                .alpaca_nll
                .as_ref()
                .and_then(|s| Estimate::mean_sd(&s.per_seed)),
            trained_share: Some(r.params_share),
            wall_seconds: Some(r.train_seconds.mean),
        })
        .collect()
}

/// Reads whatever the run folder holds and writes its report.
pub fn write_run_report(root: &Path, model: &str, preset: &str) -> anyhow::Result<()> {
    let manifest = RunManifest::load(root)?;
    let selection = root
        .join("features/features.json")
        .exists()
        .then(|| Selection::load(&root.join("features/features.json")))
        .transpose()?;
    let subspace = root
        .join("subspace/subspace.json")
        .exists()
        .then(|| Subspace::load(&root.join("subspace")))
        .transpose()?
        .map(|s| s.summary);
    let base: Option<Metrics> = read_json(&root.join("eval-base/metrics.json"))?;
    let aligned: Option<Metrics> = read_json(&root.join("eval-aligned/metrics.json"))?;
    let comparison: Option<Comparison> = read_json(&root.join("compare/compare.json"))?;
    let mut curves = Vec::new();
    if let Some(c) = loss_curve("sails (this run)", &root.join("train/loss_curve.jsonl"))? {
        curves.push(c);
    }
    if let Some(c) = &comparison {
        for r in &c.rows {
            if let Some(seed) = r.seeds.first() {
                let name = format!("{:?}", r.method).to_lowercase();
                let path = root.join(format!("compare/{name}-s{seed}/train/loss_curve.jsonl"));
                if let Some(curve) = loss_curve(&format!("{name} (seed {seed})"), &path)? {
                    curves.push(curve);
                }
            }
        }
    }
    let trained_share = match (
        read_json::<serde_json::Value>(&root.join("train/adapter/sails_lora.json"))?,
        &comparison,
    ) {
        (Some(p), Some(c)) => p["trainable_params"]
            .as_u64()
            .map(|n| n as f64 / c.model_params.max(1) as f64),
        _ => None,
    };
    let attacks = attack_lines(root)?;
    let evaluation =
        (base.is_some() || aligned.is_some() || comparison.is_some() || !attacks.is_empty()).then(
            || report::Evaluation {
                attacks,
                base: base.as_ref(),
                aligned: aligned.as_ref(),
                aligned_trained_share: trained_share,
                methods: comparison.as_ref().map(method_rows).unwrap_or_default(),
                frontier: comparison
                    .as_ref()
                    .and_then(|c| c.frontier.as_ref())
                    .map(frontier),
            },
        );
    let base_gen = generations(&root.join("eval-base/generations.jsonl"))?;
    let aligned_gen = generations(&root.join("eval-aligned/generations.jsonl"))?;
    let examples = (!base_gen.is_empty() && !aligned_gen.is_empty())
        .then(|| examples(&base_gen, &aligned_gen));
    let run = report::RunInfo {
        name: root
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| root.display().to_string()),
        model: (!model.is_empty()).then(|| model.to_string()),
        preset: (!preset.is_empty()).then(|| preset.to_string()),
        created: None,
        stages: manifest
            .as_ref()
            .map(|m| {
                m.stages
                    .iter()
                    .map(|(name, rec)| report::StageTiming {
                        stage: name.clone(),
                        seconds: rec.seconds,
                        skipped: false,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        manifest_path: manifest
            .as_ref()
            .map(|_| root.join(sails::manifest::MANIFEST_FILE)),
        versions: manifest
            .as_ref()
            .map(|m| m.versions.clone().into_iter().collect())
            .unwrap_or_default(),
    };
    let inputs = ReportInputs {
        run,
        selection: selection.as_ref(),
        subspace: subspace.as_ref(),
        explanations: explanations(&root.join("explain/explanations.json"))?,
        training: (!curves.is_empty()).then_some(curves),
        evaluation,
        examples,
    };
    report::write(&inputs, root)
        .with_context(|| format!("writing the report in {}", root.display()))?;
    Ok(())
}
