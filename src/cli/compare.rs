//! `sails compare`: SAILS against its baselines on the same data, rank and budget, several
//! seeds, one table. Reuses an align run's features, fine-tuning data and config.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sails::eval::metrics::Rate;
use sails::eval::Metrics;
use sails::manifest::{RunManifest, StagePlan};
use serde::{Deserialize, Serialize};

use super::align::{
    eval_args, remove_dir, s, sails, train_data, write_toml, AlignConfig, Layout, Runner,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareMethod {
    /// LoRA initialised from the SAE-feature subspace (the method).
    Sails,
    /// Standard LoRA: Kaiming-uniform A, zero B.
    Lora,
    /// LoRA initialised from a random orthonormal basis.
    Random,
    /// LoRA initialised from difference-of-means + PCA of raw activations.
    Direct,
    /// Full fine-tuning of the targeted weights (learning rate a tenth of LoRA's).
    Full,
}

impl CompareMethod {
    fn name(self) -> &'static str {
        match self {
            CompareMethod::Sails => "sails",
            CompareMethod::Lora => "lora",
            CompareMethod::Random => "random",
            CompareMethod::Direct => "direct",
            CompareMethod::Full => "full",
        }
    }

    /// The `sails subspace --method` that builds its basis, if it has one.
    fn basis_method(self) -> Option<&'static str> {
        match self {
            CompareMethod::Sails => Some("sails"),
            CompareMethod::Random => Some("random"),
            CompareMethod::Direct => Some("direct"),
            CompareMethod::Lora | CompareMethod::Full => None,
        }
    }
}

/// Train and evaluate SAILS and the baselines with the same data, rank and steps.
///
/// Needs an align run folder (`sails align --until data` is enough): its features/, data/ and
/// config are reused, so every method sees the same prompts, examples, rank, targets and steps.
/// Each method × seed is a stage in the run's manifest (skipped when done, resumed when
/// interrupted); the table goes to <run>/compare/compare.md and compare.json.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The align run folder.
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
    /// Methods to compare.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sails,lora,random,direct,full"
    )]
    pub methods: Vec<CompareMethod>,
    /// Seeds (data order, adapter init, random basis).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Optimizer steps per run [default: the run's train.max_steps].
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Items per evaluation suite [default: the run's eval.limit].
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Redo every method's stages.
    #[arg(long)]
    pub force: bool,
    /// Print compare.json on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Mean and sample standard deviation over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    pub sd: f64,
    pub per_seed: Vec<f64>,
}

impl Spread {
    fn of(xs: &[f64]) -> Self {
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let sd = if xs.len() > 1 {
            (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Spread {
            mean,
            sd,
            per_seed: xs.to_vec(),
        }
    }
}

/// One figure: its spread over seeds and the Wilson interval of all seeds' items pooled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub seeds: Spread,
    pub pooled: Rate,
}

fn figure(rates: &[&Rate]) -> Figure {
    let k = rates.iter().map(|r| r.k).sum();
    let n = rates.iter().map(|r| r.n).sum();
    Figure {
        seeds: Spread::of(&rates.iter().map(|r| r.rate).collect::<Vec<_>>()),
        pooled: Rate::new(k, n),
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodRow {
    pub method: CompareMethod,
    pub seeds: Vec<u64>,
    pub trainable_params: usize,
    /// Share of the model's parameters trained.
    pub params_share: f64,
    /// Suite → safety rate (harmful) or refusal rate (overrefusal, xstest-unsafe).
    pub suites: BTreeMap<String, Figure>,
    pub facts_accuracy: Option<Figure>,
    pub alpaca_nll: Option<Spread>,
    pub final_heldout_loss: Option<Spread>,
    pub train_seconds: Spread,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub run: String,
    pub rank: usize,
    pub targets: Vec<String>,
    pub max_steps: usize,
    pub eval_limit: Option<usize>,
    pub model_params: usize,
    pub rows: Vec<MethodRow>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &std::path::Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The last held-out loss in a run's `loss_curve.jsonl`.
fn last_eval_loss(path: &std::path::Path) -> anyhow::Result<Option<f64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut last = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let sails::train::CurveRecord::Eval { loss, .. } =
            serde_json::from_str(line).with_context(|| format!("parsing {}", path.display()))?
        {
            last = Some(loss);
        }
    }
    Ok(last)
}

pub fn run(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let root = args.run.clone();
    let manifest = RunManifest::load(&root)?.with_context(|| {
        format!(
            "{} is not an align run (no manifest.json); run `sails align --until data --out {}` first",
            root.display(),
            root.display()
        )
    })?;
    let cfg: AlignConfig = serde_json::from_value(manifest.config.clone())
        .context("the run's manifest holds no align config")?;
    for need in ["features", "data/train.jsonl", "data/heldout.jsonl"] {
        if !root.join(need).exists() {
            bail!(
                "{} lacks {need}; run `sails align --until data` on it first",
                root.display()
            );
        }
    }
    if args.methods.is_empty() || args.seeds.is_empty() {
        bail!("give at least one method and one seed");
    }
    let layout = Layout { root: root.clone() };
    let mut runner = Runner {
        run: &layout,
        manifest,
        force: args.force,
        timings: Vec::new(),
    };
    let mut train_cfg = cfg.train.clone();
    if let Some(n) = args.max_steps {
        train_cfg.max_steps = n;
        train_cfg.warmup_steps = train_cfg.warmup_steps.min(n);
    }
    let mut eval = cfg.eval.clone();
    if args.eval_limit.is_some() {
        eval.limit = args.eval_limit;
    }
    let model_path = sails::model::load::ModelSource::resolve(&cfg.model)?
        .path()
        .to_path_buf();
    let start = Instant::now();
    for &method in &args.methods {
        for &seed in &args.seeds {
            let tag = format!("compare/{}-s{seed}", method.name());
            let mut tc = train_cfg.clone();
            tc.seed = seed;
            if method == CompareMethod::Full {
                tc.lr_peak /= 10.0;
                tc.lr_min /= 10.0;
            }
            let basis = method.basis_method().map(|m| {
                let mut sub = cfg.subspace.clone();
                sub.seed = seed;
                (m, sub)
            });
            let (data_args, data_inputs) = train_data(&root.join("data"), &tc);
            let mut inputs = vec![model_path.clone()];
            inputs.extend(data_inputs);
            if basis.is_some() {
                inputs.push(root.join("features"));
            }
            let train_stage = format!("{tag}/train");
            runner.stage(
                StagePlan {
                    name: &train_stage,
                    inputs,
                    config: serde_json::json!({
                        "method": method, "basis": basis, "lora": &cfg.lora, "train": &tc
                    }),
                    outputs: vec![PathBuf::from(&tag).join("train/adapter")],
                },
                |fresh| {
                    let dir = root.join(&tag);
                    if fresh {
                        remove_dir(&dir)?;
                    }
                    std::fs::create_dir_all(&dir)?;
                    let mut a = vec![s("train"), s("--model"), cfg.model.clone()];
                    a.extend(data_args.iter().cloned());
                    a.extend([
                        s("--out"),
                        s(dir.join("train").display()),
                        s("--rank"),
                        s(cfg.lora.rank),
                        s("--alpha"),
                        s(cfg.lora.alpha),
                        s("--targets"),
                        cfg.lora.targets.join(","),
                        s("--init-seed"),
                        s(seed),
                        s("--resume"),
                    ]);
                    if let Some((m, sub)) = &basis {
                        let sub_dir = dir.join("subspace");
                        sails(
                            &layout,
                            &format!("{}-s{seed}-subspace", method.name()),
                            &[
                                s("subspace"),
                                s("--features"),
                                s(root.join("features").display()),
                                s("--method"),
                                s(m),
                                s("--rank"),
                                s(sub.rank),
                                s("--energy-frac"),
                                s(sub.energy_frac),
                                s("--seed"),
                                s(sub.seed),
                                s("--out"),
                                s(sub_dir.display()),
                            ],
                        )?;
                        a.extend([
                            s("--init"),
                            s("subspace"),
                            s("--basis"),
                            s(sub_dir.join("subspace.safetensors").display()),
                        ]);
                        if cfg.lora.freeze_basis {
                            a.push(s("--freeze-basis"));
                        }
                    } else {
                        let init = if method == CompareMethod::Full {
                            "full"
                        } else {
                            "kaiming"
                        };
                        a.extend([s("--init"), s(init)]);
                    }
                    let cfg_path = dir.join("train-config.toml");
                    write_toml(&cfg_path, &tc)?;
                    a.extend([s("--config"), s(cfg_path.display())]);
                    sails(&layout, &format!("{}-s{seed}-train", method.name()), &a)
                },
            )?;
            let eval_stage = format!("{tag}/eval");
            runner.stage(
                StagePlan {
                    name: &eval_stage,
                    inputs: vec![model_path.clone(), root.join(&tag).join("train/adapter")],
                    config: serde_json::to_value(&eval)?,
                    outputs: vec![PathBuf::from(&tag).join("eval/metrics.json")],
                },
                |fresh| {
                    let dir = root.join(&tag).join("eval");
                    if fresh {
                        remove_dir(&dir)?;
                    }
                    let a = eval_args(
                        &cfg.model,
                        &dir,
                        &eval,
                        Some(root.join(&tag).join("train/adapter")),
                    );
                    sails(&layout, &format!("{}-s{seed}-eval", method.name()), &a)
                },
            )?;
        }
    }
    let model = sails::model::load::ChatModel::load(
        &sails::model::load::ModelSource::resolve(&cfg.model)?,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    let model_params = model_param_count(&model.decoder)?;
    let mut rows = Vec::new();
    for &method in &args.methods {
        rows.push(method_row(
            &root,
            &runner.manifest,
            method,
            &args.seeds,
            model_params,
        )?);
    }
    let comparison = Comparison {
        run: root.display().to_string(),
        rank: cfg.lora.rank,
        targets: cfg.lora.targets.clone(),
        max_steps: train_cfg.max_steps,
        eval_limit: eval.limit,
        model_params,
        rows,
    };
    let out = root.join("compare");
    std::fs::create_dir_all(&out)?;
    sails::model::write_atomic(
        &out.join("compare.json"),
        serde_json::to_string_pretty(&comparison)?.as_bytes(),
    )?;
    let md = markdown(&comparison);
    sails::model::write_atomic(&out.join("compare.md"), md.as_bytes())?;
    runner.manifest.last_invocation = std::mem::take(&mut runner.timings);
    runner.manifest.save(&root)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&comparison)?);
    } else {
        let mut o = std::io::stdout().lock();
        writeln!(o, "{md}")?;
        writeln!(
            o,
            "compared in {:.0} s; table in {}",
            start.elapsed().as_secs_f64(),
            out.join("compare.md").display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Parameters of the model's linear layers and embeddings (norm weights are left out: < 0.1 %).
fn model_param_count(d: &sails::model::decoder::Decoder) -> anyhow::Result<usize> {
    let linear: usize = d
        .linear_layers()
        .iter()
        .map(|(_, l)| l.weight.elem_count())
        .sum();
    let head = d.lm_head.as_ref().map_or(0, |t| t.elem_count());
    Ok(linear + d.embed_tokens.elem_count() + head)
}

fn method_row(
    root: &std::path::Path,
    manifest: &RunManifest,
    method: CompareMethod,
    seeds: &[u64],
    model_params: usize,
) -> anyhow::Result<MethodRow> {
    let mut metrics: Vec<Metrics> = Vec::new();
    let mut losses = Vec::new();
    let mut seconds = Vec::new();
    let mut trainable_params = 0;
    for seed in seeds {
        let tag = format!("compare/{}-s{seed}", method.name());
        metrics.push(read_json(&root.join(&tag).join("eval/metrics.json"))?);
        if let Some(l) = last_eval_loss(&root.join(&tag).join("train/loss_curve.jsonl"))? {
            losses.push(l);
        }
        let prov: serde_json::Value =
            read_json(&root.join(&tag).join("train/adapter/sails_lora.json"))?;
        trainable_params = prov["trainable_params"].as_u64().unwrap_or(0) as usize;
        if let Some(rec) = manifest.record(&format!("{tag}/train")) {
            seconds.push(rec.seconds);
        }
    }
    let mut suites = BTreeMap::new();
    if let Some(first) = metrics.first() {
        for name in first.suites.keys() {
            let rates: Vec<&Rate> = metrics
                .iter()
                .filter_map(|m| m.suites.get(name).map(|s| &s.rate))
                .collect();
            suites.insert(name.clone(), figure(&rates));
        }
    }
    let caps: Vec<_> = metrics
        .iter()
        .filter_map(|m| m.capability.as_ref())
        .collect();
    let facts = (!caps.is_empty())
        .then(|| figure(&caps.iter().map(|c| &c.facts_accuracy).collect::<Vec<_>>()));
    let nll = (!caps.is_empty())
        .then(|| Spread::of(&caps.iter().map(|c| c.alpaca_nll).collect::<Vec<_>>()));
    Ok(MethodRow {
        method,
        seeds: seeds.to_vec(),
        trainable_params,
        params_share: trainable_params as f64 / model_params.max(1) as f64,
        suites,
        facts_accuracy: facts,
        alpaca_nll: nll,
        final_heldout_loss: (!losses.is_empty()).then(|| Spread::of(&losses)),
        train_seconds: Spread::of(&seconds),
    })
}

fn pct(f: &Figure) -> String {
    format!(
        "{:.1} ± {:.1} [{:.1}, {:.1}]",
        100.0 * f.seeds.mean,
        100.0 * f.seeds.sd,
        100.0 * f.pooled.lo,
        100.0 * f.pooled.hi
    )
}

/// The table: mean ± sd over seeds, then the 95 % Wilson interval of all seeds' items pooled.
pub fn markdown(c: &Comparison) -> String {
    let suites: Vec<String> = c
        .rows
        .first()
        .map(|r| r.suites.keys().cloned().collect())
        .unwrap_or_default();
    let mut md = format!(
        "Rank {} on {}, {} steps, {} items per suite; figures in %: mean ± sd over seeds \
         [95 % Wilson interval of all seeds' items pooled].\n\n",
        c.rank,
        c.targets.join(","),
        c.max_steps,
        c.eval_limit.map_or("all".into(), |n| n.to_string())
    );
    md.push_str("| method | seeds |");
    for s in &suites {
        md.push_str(&format!(" {s} |"));
    }
    md.push_str(
        " Statement accuracy | Alpaca NLL | held-out loss | params trained | train time |\n|---|---|",
    );
    for _ in 0..suites.len() + 5 {
        md.push_str("---|");
    }
    md.push('\n');
    for r in &c.rows {
        md.push_str(&format!("| {} | {} |", r.method.name(), r.seeds.len()));
        for s in &suites {
            md.push_str(&format!(" {} |", r.suites.get(s).map_or("–".into(), pct)));
        }
        md.push_str(&format!(
            " {} | {} | {} | {} ({:.2} %) | {:.0} s |\n",
            r.facts_accuracy.as_ref().map_or("–".into(), pct),
            r.alpaca_nll
                .as_ref()
                .map_or("–".into(), |s| format!("{:.3} ± {:.3}", s.mean, s.sd)),
            r.final_heldout_loss
                .as_ref()
                .map_or("–".into(), |s| format!("{:.3} ± {:.3}", s.mean, s.sd)),
            r.trainable_params,
            100.0 * r.params_share,
            r.train_seconds.mean
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_pooled_interval_are_computed_by_hand() {
        // rates 0.5 (5/10) and 1.0 (10/10): mean 0.75, sd = √((0.25²·2)/1) = 0.3536
        let a = Rate::new(5, 10);
        let b = Rate::new(10, 10);
        let f = figure(&[&a, &b]);
        assert!((f.seeds.mean - 0.75).abs() < 1e-12);
        assert!((f.seeds.sd - 0.125f64.sqrt()).abs() < 1e-12);
        assert_eq!((f.pooled.k, f.pooled.n), (15, 20));
        assert!(f.pooled.lo < 0.75 && f.pooled.hi > 0.75);
    }
}
