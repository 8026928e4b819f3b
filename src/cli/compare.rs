//! `sails compare`: SAILS against its baselines on the same data, rank and budget, several
//! seeds, one table. Reuses an align run's features, fine-tuning data and config.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sails::attack::framed::{FramedSummary, SUMMARY_FILE};
use sails::data::Suite;
use sails::eval::metrics::{frontier_diff, safety_minus_overrefusal, FrontierDiff, Rate};
use sails::eval::{counts, read_jsonl, GenerationRecord, Metrics, ATTACKS_DIR};
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
    pub(super) fn name(self) -> &'static str {
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
    /// Adapter scales each trained method is evaluated at (comma-separated).
    ///
    /// Each method × seed's update (alpha/r · B·A, or full fine-tuning's weight change) is
    /// multiplied by each scale at load time, without retraining, and evaluated on the harmful and
    /// XSTest suites into compare/<method>-s<seed>/eval-x<scale>/. The capability suite runs only
    /// at scale 1, the table's evaluation (always made), which keeps the other scales cheap. With
    /// more than one scale, compare.json, compare.md and the report also get each method's
    /// safety / over-refusal frontier and a test of the first of --methods against each other on
    /// it. 0 is the base model, the same for every method (it is evaluated for each all the same).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "S,...",
        default_value = "1",
        value_parser = super::eval::parse_adapter_scale
    )]
    pub scales: Vec<f64>,
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
    /// Suite → safety rate (harmful) or refusal rate (overrefusal, xstest-unsafe); with the
    /// attack suite (`[eval] attacks`), `attack-success-any` (behaviours at least one attack
    /// broke) and `attack-success-pooled` (every behaviour × attack), where lower is better.
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
    /// With more than one `--scales`: each method along its adapter scales, and the tests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frontier: Option<Frontier>,
}

/// One method × seed at one adapter scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedPoint {
    pub seed: u64,
    /// Safety rate on the harmful suite, with its Wilson interval and counts.
    pub safety: Rate,
    /// Refusal rate on XSTest's safe prompts.
    pub overrefusal: Rate,
}

/// One method at one adapter scale over its seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontierPoint {
    pub method: CompareMethod,
    pub scale: f64,
    pub safety: Figure,
    pub overrefusal: Figure,
    pub per_seed: Vec<SeedPoint>,
}

/// Method A against method B on the whole frontier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontierTest {
    pub method_a: CompareMethod,
    pub method_b: CompareMethod,
    pub test: FrontierDiff,
    /// The same difference from each seed's pair of adapters alone, in --seeds order.
    pub per_seed: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frontier {
    /// Increasing.
    pub scales: Vec<f64>,
    /// Method × scale, in --methods then scale order.
    pub points: Vec<FrontierPoint>,
    pub tests: Vec<FrontierTest>,
}

/// Resamples of the frontier test's bootstrap and permutations, and their seed.
const FRONTIER_RESAMPLES: usize = 10_000;
const FRONTIER_SEED: u64 = 0;

/// The suites an evaluation at a scale other than 1 runs.
const SCALED_SUITES: &str = "harmful,overrefusal";

/// A method × seed's folder under the run.
fn method_dir(method: CompareMethod, seed: u64) -> String {
    format!("compare/{}-s{seed}", method.name())
}

/// Its evaluation at `scale`, inside [`method_dir`]: `eval` at 1 (every suite: the table's),
/// `eval-x<scale>` otherwise.
fn eval_dir(scale: f64) -> String {
    if scale == 1.0 {
        "eval".into()
    } else {
        format!("eval-x{scale}")
    }
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &std::path::Path) -> anyhow::Result<T> {
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
    let mut scales = args.scales.clone();
    scales.sort_by(f64::total_cmp);
    if scales.windows(2).any(|w| w[0] == w[1]) {
        bail!("--scales lists a scale twice: {:?}", args.scales);
    }
    // Scale 1 is always evaluated: the table is made from it.
    let mut eval_scales = scales.clone();
    if !eval_scales.contains(&1.0) {
        eval_scales.push(1.0);
        eval_scales.sort_by(f64::total_cmp);
    }
    let _lock = super::lock_run_folder(&root.join("compare"))?;
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
            let tag = method_dir(method, seed);
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
            let adapter = root.join(&tag).join("train/adapter");
            for &scale in &eval_scales {
                let dir_name = eval_dir(scale);
                let eval_stage = format!("{tag}/{dir_name}");
                // At scale 1 the stage's config is what it was before scales existed, so runs
                // made then stay up to date.
                let (suite, config) = if scale == 1.0 {
                    ("all", serde_json::to_value(&eval)?)
                } else {
                    (
                        SCALED_SUITES,
                        serde_json::json!({
                            "eval": &eval, "adapter_scale": scale, "suite": SCALED_SUITES
                        }),
                    )
                };
                runner.stage(
                    StagePlan {
                        name: &eval_stage,
                        inputs: [model_path.clone(), adapter.clone()]
                            .into_iter()
                            .chain(eval.user_files())
                            .collect(),
                        config,
                        outputs: vec![PathBuf::from(&tag).join(&dir_name).join("metrics.json")],
                    },
                    |fresh| {
                        let dir = root.join(&tag).join(&dir_name);
                        if fresh {
                            remove_dir(&dir)?;
                        }
                        let mut a =
                            eval_args(&cfg.model, &dir, &eval, suite, Some(adapter.clone()));
                        if scale != 1.0 {
                            a.extend([s("--adapter-scale"), s(scale)]);
                        }
                        sails(
                            &layout,
                            &format!("{}-s{seed}-{dir_name}", method.name()),
                            &a,
                        )
                    },
                )?;
            }
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
        frontier: if scales.len() > 1 {
            Some(frontier(&root, &args.methods, &args.seeds, &scales)?)
        } else {
            None
        },
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
    let mut attacks: Vec<FramedSummary> = Vec::new();
    let mut losses = Vec::new();
    let mut seconds = Vec::new();
    let mut trainable_params = 0;
    for &seed in seeds {
        let tag = method_dir(method, seed);
        metrics.push(read_json(&root.join(&tag).join("eval/metrics.json"))?);
        let summary = root
            .join(&tag)
            .join("eval")
            .join(ATTACKS_DIR)
            .join(SUMMARY_FILE);
        if summary.is_file() {
            attacks.push(read_json(&summary)?);
        }
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
    suites.extend(attack_figures(&attacks, seeds.len()));
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

/// A method's figures under the attack suite, when every one of its `seeds` ran it: the share
/// of behaviours at least one attack broke, and the share of behaviour × attack pairs.
fn attack_figures(attacks: &[FramedSummary], seeds: usize) -> Vec<(String, Figure)> {
    if attacks.is_empty() || attacks.len() != seeds {
        return Vec::new();
    }
    let mut out = Vec::new();
    let any: Vec<&Rate> = attacks
        .iter()
        .filter_map(|a| a.any_success.as_ref())
        .collect();
    if any.len() == attacks.len() {
        out.push(("attack-success-any".to_owned(), figure(&any)));
    }
    let pooled: Vec<&Rate> = attacks.iter().map(|a| &a.pooled_success).collect();
    out.push(("attack-success-pooled".to_owned(), figure(&pooled)));
    out
}

/// Each method at each scale, and the first method tested against each other one.
fn frontier(
    root: &std::path::Path,
    methods: &[CompareMethod],
    seeds: &[u64],
    scales: &[f64],
) -> anyhow::Result<Frontier> {
    let mut points = Vec::new();
    for &method in methods {
        for &scale in scales {
            let mut per_seed = Vec::new();
            for &seed in seeds {
                let path = root
                    .join(method_dir(method, seed))
                    .join(eval_dir(scale))
                    .join("metrics.json");
                let m: Metrics = read_json(&path)?;
                let rate = |suite: &str| {
                    m.suites
                        .get(suite)
                        .map(|s| s.rate)
                        .with_context(|| format!("{}: no {suite} suite", path.display()))
                };
                per_seed.push(SeedPoint {
                    seed,
                    safety: rate("harmful")?,
                    overrefusal: rate("overrefusal")?,
                });
            }
            points.push(FrontierPoint {
                method,
                scale,
                safety: figure(&per_seed.iter().map(|p| &p.safety).collect::<Vec<_>>()),
                overrefusal: figure(&per_seed.iter().map(|p| &p.overrefusal).collect::<Vec<_>>()),
                per_seed,
            });
        }
    }
    let mut tests = Vec::new();
    if let Some((&first, others)) = methods.split_first() {
        let load = |method| -> anyhow::Result<Vec<Outcomes>> {
            seeds
                .iter()
                .map(|&seed| outcomes(root, method, seed, scales))
                .collect()
        };
        let a = load(first)?;
        for &other in others {
            let b = load(other)?;
            let (harmful, overrefusal) = paired_differences(&a, &b, scales.len());
            let test = frontier_diff(&harmful, &overrefusal, FRONTIER_RESAMPLES, FRONTIER_SEED)
                .with_context(|| {
                    format!(
                        "{} and {} share no evaluated prompt of both suites at every scale",
                        first.name(),
                        other.name()
                    )
                })?;
            let per_seed = (0..seeds.len())
                .map(|i| {
                    let (h, o) = paired_differences(&a[i..=i], &b[i..=i], scales.len());
                    safety_minus_overrefusal(&h, &o)
                })
                .collect();
            tests.push(FrontierTest {
                method_a: first,
                method_b: other,
                test,
                per_seed,
            });
        }
    }
    Ok(Frontier {
        scales: scales.to_vec(),
        points,
        tests,
    })
}

/// One method × seed's outcomes per prompt id: its suite and, at each scale in order, whether it
/// counted (harmful: safe; XSTest safe: refused).
type Outcomes = BTreeMap<String, (Suite, Vec<bool>)>;

fn outcomes(
    root: &std::path::Path,
    method: CompareMethod,
    seed: u64,
    scales: &[f64],
) -> anyhow::Result<Outcomes> {
    let mut out = Outcomes::new();
    for &scale in scales {
        let path = root
            .join(method_dir(method, seed))
            .join(eval_dir(scale))
            .join("generations.jsonl");
        let records: Vec<GenerationRecord> =
            read_jsonl(&path).with_context(|| format!("reading {}", path.display()))?;
        for r in records {
            if matches!(r.suite, Suite::Harmful | Suite::Overrefusal) {
                let counted = counts(r.suite, r.label);
                out.entry(r.id)
                    .or_insert((r.suite, Vec::new()))
                    .1
                    .push(counted);
            }
        }
    }
    Ok(out)
}

/// Per-prompt differences A − B of the outcome averaged over the scales and seeds (`a[i]` and
/// `b[i]` are seed i's), split into (harmful, XSTest safe). Only prompts that every evaluation of
/// both holds at all `n_scales` scales are kept, in id order, so the resampling that follows is
/// reproducible.
fn paired_differences(a: &[Outcomes], b: &[Outcomes], n_scales: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut harmful, mut overrefusal) = (Vec::new(), Vec::new());
    let Some(first) = a.first() else {
        return (harmful, overrefusal);
    };
    let n = (a.len() * n_scales) as f64;
    for (id, (suite, _)) in first {
        let mut totals = [0usize; 2];
        let mut complete = true;
        for (side, runs) in [a, b].iter().enumerate() {
            for run in runs.iter() {
                match run.get(id) {
                    Some((_, v)) if v.len() == n_scales => {
                        totals[side] += v.iter().filter(|&&x| x).count()
                    }
                    _ => complete = false,
                }
            }
        }
        if !complete {
            continue;
        }
        let diff = (totals[0] as f64 - totals[1] as f64) / n;
        match suite {
            Suite::Harmful => harmful.push(diff),
            _ => overrefusal.push(diff),
        }
    }
    (harmful, overrefusal)
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
    if let Some(f) = &c.frontier {
        md.push_str(
            "\nFrontier: each method's adapter with its update scaled (safety and over-refusal \
             on XSTest safe, in %, as above).\n\n| method | scale | safety | over-refusal |\n\
             |---|---|---|---|\n",
        );
        for p in &f.points {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                p.method.name(),
                p.scale,
                pct(&p.safety),
                pct(&p.overrefusal)
            ));
        }
        for t in &f.tests {
            md.push_str(&format!(
                "\n{} − {}: difference in (safety − over-refusal) averaged over scales and seeds \
                 {:+.3} [{:+.3}, {:+.3}] (bootstrap 95 %), p = {:.4} (sign-flip over {} harmful + \
                 {} XSTest prompts, {} resamples); per seed {}.\n",
                t.method_a.name(),
                t.method_b.name(),
                t.test.diff,
                t.test.lo,
                t.test.hi,
                t.test.p_value,
                t.test.harmful_items,
                t.test.overrefusal_items,
                t.test.resamples,
                t.per_seed
                    .iter()
                    .map(|v| format!("{v:+.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
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

    #[test]
    fn paired_differences_average_over_scales_and_seeds_on_complete_prompts() {
        let outcomes = |rows: &[(&str, Suite, &[bool])]| -> Outcomes {
            rows.iter()
                .map(|(id, suite, v)| (id.to_string(), (*suite, v.to_vec())))
                .collect()
        };
        // Two scales, two seeds. h1: A safe 2 + 2 of 4, B 1 + 0 of 4 → (4 − 1)/4 = 0.75.
        // o1: A refused 1 + 0, B 2 + 1 → (1 − 3)/4 = −0.5. h2 lacks a scale in A's seed 1: left out.
        let a = [
            outcomes(&[
                ("h1", Suite::Harmful, &[true, true]),
                ("o1", Suite::Overrefusal, &[false, true]),
                ("h2", Suite::Harmful, &[true, true]),
            ]),
            outcomes(&[
                ("h1", Suite::Harmful, &[true, true]),
                ("o1", Suite::Overrefusal, &[false, false]),
                ("h2", Suite::Harmful, &[true]),
            ]),
        ];
        let b = [
            outcomes(&[
                ("h1", Suite::Harmful, &[false, true]),
                ("o1", Suite::Overrefusal, &[true, true]),
                ("h2", Suite::Harmful, &[false, false]),
            ]),
            outcomes(&[
                ("h1", Suite::Harmful, &[false, false]),
                ("o1", Suite::Overrefusal, &[true, false]),
                ("h2", Suite::Harmful, &[false, false]),
            ]),
        ];
        let (h, o) = paired_differences(&a, &b, 2);
        assert_eq!((h, o), (vec![0.75], vec![-0.5]));
        // Seed 0 alone: h1 (2 − 1)/2 = 0.5, h2 (2 − 0)/2 = 1, o1 (1 − 2)/2 = −0.5.
        let (h, o) = paired_differences(&a[..1], &b[..1], 2);
        assert_eq!((h.clone(), o.clone()), (vec![0.5, 1.0], vec![-0.5]));
        // Δ(safety − over-refusal) = mean(0.5, 1) − (−0.5) = 1.25
        assert_eq!(safety_minus_overrefusal(&h, &o), 1.25);
    }

    #[test]
    fn attack_figures_pool_the_seeds_and_need_every_seed() {
        let summary = |any: (usize, usize), pooled: (usize, usize)| FramedSummary {
            model: "default".into(),
            adapter: None,
            suite: Suite::Harmful,
            behaviours: any.1,
            label: "vote".into(),
            gate: None,
            plain_success: Rate::new(0, any.1),
            plain_gate_open: None,
            attacks: Vec::new(),
            any_success: Some(Rate::new(any.0, any.1)),
            pooled_success: Rate::new(pooled.0, pooled.1),
            seconds: 1.0,
        };
        let runs = [summary((10, 50), (20, 500)), summary((20, 50), (30, 500))];
        let figs = attack_figures(&runs, 2);
        assert_eq!(figs[0].0, "attack-success-any");
        assert_eq!((figs[0].1.pooled.k, figs[0].1.pooled.n), (30, 100));
        assert!((figs[0].1.seeds.mean - 0.3).abs() < 1e-12);
        assert_eq!(figs[1].0, "attack-success-pooled");
        assert_eq!((figs[1].1.pooled.k, figs[1].1.pooled.n), (50, 1000));
        // A seed without the suite: no figure rather than a partial one.
        assert!(attack_figures(&runs[..1], 2).is_empty());
    }

    #[test]
    fn scales_parse_checked_with_one_as_the_default() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["sails", "compare", "--run", "r"];
            argv.extend_from_slice(extra);
            crate::cli::Cli::try_parse_from(argv).map(|cli| match cli.command {
                crate::cli::Command::Compare(a) => a.scales,
                _ => panic!("not compare"),
            })
        };
        assert_eq!(parse(&[]).unwrap(), vec![1.0]);
        assert_eq!(
            parse(&["--scales", "0.5,1,1.5"]).unwrap(),
            vec![0.5, 1.0, 1.5]
        );
        assert!(parse(&["--scales=0.5,-1"]).is_err());
        assert!(parse(&["--scales", "0.5,nan"]).is_err());
        assert_eq!(
            (eval_dir(1.0), eval_dir(0.5)),
            ("eval".into(), "eval-x0.5".into())
        );
    }
}
