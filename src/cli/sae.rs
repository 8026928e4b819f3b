//! `sails sae train` and `sails sae eval`: activation collection, TopK training, evaluation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use super::model_args::ModelArgs;
use sails::model::load::ChatModel;
use sails::model::Resid;
use sails::sae::corpus::{default_corpus, CorpusConfig};
use sails::sae::eval::{evaluate, evaluated_tokens, table, EvalBatching, SaeEvalReport};
use sails::sae::store::{self, Sequence, ShardedActivations, StoreConfig};
use sails::sae::train::{train_topk, SaeTrainConfig, TrainReport};
use sails::sae::{hook_name, parse_hook, Sae};

#[derive(Debug, Args)]
pub struct SaeArgs {
    #[command(subcommand)]
    pub command: SaeCommand,
}

#[derive(Debug, Subcommand)]
pub enum SaeCommand {
    /// Collect residual activations over the corpus and train one TopK SAE per layer.
    Train(TrainArgs),
    /// Evaluate trained SAEs on the held-out conversations (reconstruction and spliced CE/KL).
    Eval(EvalArgs),
    /// Measure SAE training throughput (tokens/s) of the host step and the autodiff reference.
    Bench(BenchArgs),
}

/// Measure SAE training-step throughput on synthetic activations.
///
/// Times optimiser steps (loss, gradients, Adam, decoder renormalisation) of a fresh TopK SAE on
/// Gaussian inputs, for the training path (host loss with sparse exact gradients) and for the
/// same loss through candle autodiff, and prints tokens/s for each. --aux counts every latent as
/// dead, so the auxiliary-k loss runs too (its cost grows with k_aux = d_in/2).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Input width (SmolLM2: 576).
    #[arg(long, default_value_t = 576)]
    pub d_in: usize,
    /// Latents.
    #[arg(long, default_value_t = 4608)]
    pub width: usize,
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    /// Tokens per step.
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Also run the auxiliary loss (all latents dead).
    #[arg(long)]
    pub aux: bool,
    /// Skip the autodiff reference (slow).
    #[arg(long)]
    pub host_only: bool,
}

/// Everything a run needs; written to `<out>/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeRunConfig {
    pub corpus: CorpusConfig,
    pub store: StoreConfig,
    pub train: SaeTrainConfig,
    /// Shards mixed together by the shuffled reader.
    pub window_shards: usize,
}

impl SaeRunConfig {
    /// SmolLM2-135M defaults: Resid::In at 6, 12, 18, 24 of 30 blocks; 8×576 latents, k = 64;
    /// the whole default corpus (≈0.19M content tokens) collected once, 1.5M training tokens per
    /// layer, a dead-latent window small enough for the auxiliary loss to act.
    pub fn preset_default() -> Self {
        SaeRunConfig {
            corpus: CorpusConfig::default(),
            store: StoreConfig::default(),
            train: SaeTrainConfig {
                d_sae: 4608,
                // k = 32 left held-out explained variance at 0.83 (layer 12); 64 is the L0 budget
                k: 64,
                batch_size: 4096,
                // ~8 passes over the training side of the splits (~190k tokens)
                total_tokens: 1_500_000,
                lr: 1e-3,
                lr_warmup_steps: 50,
                dead_tokens_threshold: 200_000,
                checkpoint_every: 50,
                log_every: 25,
                ..Default::default()
            },
            window_shards: 8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The project's default SAEs for the default model.
    Default,
}

/// Collect activations and train TopK SAEs.
///
/// Builds the default corpus from the training side of the splits only (alpaca-gpt4-demo
/// conversations, AdvBench training goals and benign-edgy prompts, the model's own greedy answers
/// to some instructions; BOS and special positions excluded),
/// caches the residual activations at the chosen layers in <out>/store (resumable), trains one
/// SAE per layer into <out>/<hook>/ (SAELens format; resumes from <out>/<hook>/checkpoint) and
/// evaluates each on the held-out conversations. Layers already trained are skipped, so the
/// pipeline trains the default SAEs once.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Built-in settings; the default preset writes to $SAILS_HOME/sae/<model>-default.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// TOML run config (corpus, store, train, window_shards); unknown keys are errors.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output folder (required without --preset).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Layers as hooks, comma-separated: `in:6,out:11` or `blocks.6.hook_resid_pre`.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Train only these of the collected layers (same spelling as --layers).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Number of latents (d_sae).
    #[arg(long, value_name = "N")]
    pub width: Option<usize>,
    /// Active latents per token.
    #[arg(long, value_name = "K")]
    pub k: Option<usize>,
    /// Training tokens per layer.
    #[arg(long, value_name = "N")]
    pub tokens: Option<u64>,
    /// Activations to collect (stored tokens).
    #[arg(long, value_name = "N")]
    pub collect_tokens: Option<u64>,
    /// Evaluate on at most this many held-out conversations (all when absent; each costs three
    /// full forwards per layer).
    #[arg(long, value_name = "N")]
    pub eval_sequences: Option<usize>,
    /// Skip the held-out evaluation after training.
    #[arg(long)]
    pub no_eval: bool,
    /// Print the results as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Evaluate trained SAEs on held-out conversations.
///
/// Reports L0, explained variance, cosine, dead and dense fractions on the held-out tokens, and
/// the next-token cross-entropy with the reconstruction spliced in place of the residual at
/// content positions, against the clean model and zero-ablation:
/// recovered = (CE_zero − CE_spliced)/(CE_zero − CE_clean); plus KL(clean ‖ spliced).
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A run folder written by `sails sae train` (uses its held-out corpus and SAEs).
    #[arg(long, value_name = "DIR")]
    pub run: Option<PathBuf>,
    /// Use the default preset's run folder.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Held-out conversations to use (all when absent).
    #[arg(long, value_name = "N")]
    pub max_sequences: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: SaeArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        SaeCommand::Train(a) => run_train(a),
        SaeCommand::Eval(a) => run_eval(a),
        SaeCommand::Bench(a) => run_bench(a),
    }
}

/// `in:6` / `out:11` / SAELens hook names.
pub fn parse_layer(s: &str) -> anyhow::Result<Resid> {
    let s = s.trim();
    if let Some(n) = s.strip_prefix("in:") {
        return Ok(Resid::In(
            n.parse().with_context(|| format!("layer {s:?}"))?,
        ));
    }
    if let Some(n) = s.strip_prefix("out:") {
        return Ok(Resid::Out(
            n.parse().with_context(|| format!("layer {s:?}"))?,
        ));
    }
    parse_hook(s).with_context(|| format!("layer {s:?} (use in:L, out:L or a hook name)"))
}

/// The default preset's run folder for `model`.
/// The evaluation an unchanged SAE already has, if it covered this many held-out tokens
/// (re-running the preset, as `sails align` does, then costs no model passes).
fn saved_eval(sae_dir: &Path, heldout_tokens: u64) -> Option<SaeEvalReport> {
    let bytes = std::fs::read(sae_dir.join("eval.json")).ok()?;
    let r: SaeEvalReport = serde_json::from_slice(&bytes).ok()?;
    (r.tokens == heldout_tokens).then_some(r)
}

pub fn preset_dir(model: &str) -> PathBuf {
    let name = if model == "default" {
        "smollm2-135m-instruct".to_string()
    } else {
        Path::new(model)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into())
    };
    sails::assets::sails_home()
        .join("sae")
        .join(format!("{name}-default"))
}

impl TrainArgs {
    /// defaults (preset) < config file < flags.
    pub fn resolve(&self) -> anyhow::Result<(SaeRunConfig, PathBuf)> {
        let mut cfg = SaeRunConfig::preset_default();
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            cfg = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        }
        if !self.layers.is_empty() {
            cfg.store.layers = self
                .layers
                .iter()
                .map(|s| parse_layer(s))
                .collect::<anyhow::Result<_>>()?;
        }
        if let Some(w) = self.width {
            cfg.train.d_sae = w;
        }
        if let Some(k) = self.k {
            cfg.train.k = k;
        }
        if let Some(t) = self.tokens {
            cfg.train.total_tokens = t;
        }
        if let Some(t) = self.collect_tokens {
            cfg.store.token_budget = t;
        }
        let out = match (&self.out, self.preset) {
            (Some(o), _) => o.clone(),
            (None, Some(Preset::Default)) => preset_dir(&self.model.model),
            (None, None) => bail!("give --out DIR or --preset default"),
        };
        Ok((cfg, out))
    }
}

#[derive(Serialize, Deserialize)]
struct SavedCorpus {
    config: CorpusConfig,
    train: Vec<(Vec<u32>, Vec<bool>)>,
    heldout: Vec<(Vec<u32>, Vec<bool>)>,
    sources: Vec<(String, usize)>,
}

fn to_pairs(s: &[Sequence]) -> Vec<(Vec<u32>, Vec<bool>)> {
    s.iter().map(|s| (s.ids.clone(), s.keep.clone())).collect()
}

fn from_pairs(p: Vec<(Vec<u32>, Vec<bool>)>) -> Vec<Sequence> {
    p.into_iter()
        .map(|(ids, keep)| Sequence { ids, keep })
        .collect()
}

/// The corpus, built once per run folder (generation is the slow part) and cached as JSON.
fn corpus(model: &ChatModel, cfg: &CorpusConfig, out: &Path) -> anyhow::Result<SavedCorpus> {
    let path = out.join("corpus.json");
    if path.is_file() {
        let saved: SavedCorpus = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        if &saved.config == cfg {
            return Ok(saved);
        }
        bail!(
            "{} was built with another corpus config; use another --out",
            path.display()
        );
    }
    let started = Instant::now();
    let c = default_corpus(model, cfg).context("building the corpus")?;
    tracing::info!(
        train = c.train.len(),
        heldout = c.heldout.len(),
        seconds = started.elapsed().as_secs_f64(),
        "corpus built"
    );
    let saved = SavedCorpus {
        config: cfg.clone(),
        train: to_pairs(&c.train),
        heldout: to_pairs(&c.heldout),
        sources: c.sources,
    };
    sails::model::write_atomic(&path, &serde_json::to_vec(&saved)?)?;
    Ok(saved)
}

#[derive(Serialize)]
struct LayerResult {
    hook: String,
    sae_dir: PathBuf,
    train: Option<TrainReport>,
    eval: Option<SaeEvalReport>,
}

#[derive(Serialize)]
struct TrainOutput {
    out: PathBuf,
    config: SaeRunConfig,
    collected_tokens: u64,
    collect_tokens_per_s: f64,
    layers: Vec<LayerResult>,
}

fn model_hash(model: &ChatModel) -> anyhow::Result<String> {
    let p = model.source.path();
    if p.is_file() {
        Ok(store::file_hash(p)?)
    } else {
        // a directory: hash its config and weight file names + sizes
        let mut parts = Vec::new();
        for e in std::fs::read_dir(p)?.flatten() {
            let md = e.metadata()?;
            parts.push(format!("{}:{}", e.file_name().to_string_lossy(), md.len()));
        }
        parts.sort();
        Ok(parts.join(","))
    }
}

fn run_train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let (cfg, out) = args.resolve()?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    sails::model::write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&cfg)?)?;
    let model = args.model.load()?;
    let corpus = corpus(&model, &cfg.corpus, &out)?;
    let train_seqs = from_pairs(corpus.train);
    let mut heldout = from_pairs(corpus.heldout);
    if let Some(n) = args.eval_sequences {
        heldout.truncate(n);
    }
    let hash = model_hash(&model)?;
    let store_dir = out.join("store");
    let man = store::collect(
        &model.decoder,
        &train_seqs,
        &hash,
        &cfg.store,
        &store_dir,
        None,
    )
    .context("collecting activations")?;
    eprintln!(
        "activations: {} tokens in {} shards at {} layers, {:.0} tokens/s",
        man.tokens,
        man.shards.len(),
        man.hooks.len(),
        man.tokens_per_s
    );
    let only: Vec<Resid> = args
        .only
        .iter()
        .map(|s| parse_layer(s))
        .collect::<anyhow::Result<_>>()?;
    let heldout_tokens = evaluated_tokens(&heldout, EvalBatching::default());
    let mut results = Vec::new();
    for &hook in &cfg.store.layers {
        if !only.is_empty() && !only.contains(&hook) {
            continue;
        }
        let sae_dir = out.join(hook_name(hook));
        let cfg_path = sae_dir.join("train_config.json");
        let (sae, report) = if sae_dir.join("cfg.json").is_file() {
            let saved: SaeTrainConfig = serde_json::from_slice(
                &std::fs::read(&cfg_path)
                    .with_context(|| format!("reading {}", cfg_path.display()))?,
            )
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
            if saved != cfg.train {
                bail!(
                    "{} was trained with another config ({}); remove the folder to retrain",
                    sae_dir.display(),
                    cfg_path.display()
                );
            }
            eprintln!("{}: already trained, loading", hook_name(hook));
            (Sae::load_saelens(&sae_dir, &Device::Cpu)?, None)
        } else {
            let mut src =
                ShardedActivations::open(&store_dir, hook, cfg.train.seed, cfg.window_shards, 0)?;
            let (sae, report) = train_topk(
                &cfg.train,
                &mut src,
                &Device::Cpu,
                Some(&sae_dir.join("checkpoint")),
            )
            .with_context(|| format!("training the SAE for {hook}"))?;
            sae.save_saelens(&sae_dir)?;
            sails::model::write_atomic(&cfg_path, &serde_json::to_vec_pretty(&cfg.train)?)?;
            sails::model::write_atomic(
                &sae_dir.join("train_report.json"),
                &serde_json::to_vec_pretty(&report)?,
            )?;
            let last = report.last.as_ref().map_or(String::new(), |l| {
                format!(
                    "; last batch: loss {:.4}, L0 {:.1}, explained variance {:.3}, dead {:.1} %",
                    l.loss,
                    l.l0,
                    l.explained_variance,
                    100.0 * l.dead_frac
                )
            });
            eprintln!(
                "{}: {} steps, {:.0} tokens/s{last}",
                hook_name(hook),
                report.steps,
                report.tokens_per_s,
            );
            (sae, Some(report))
        };
        // only an SAE loaded unchanged can keep its evaluation
        let saved = match (&report, args.no_eval) {
            (None, false) => saved_eval(&sae_dir, heldout_tokens),
            _ => None,
        };
        let eval = if args.no_eval {
            None
        } else if let Some(r) = saved {
            eprintln!("{}: evaluation up to date (eval.json)", hook_name(hook));
            eprint!("{}", table(std::slice::from_ref(&r)));
            Some(r)
        } else {
            let r = evaluate(&model.decoder, &sae, &heldout, EvalBatching::default())?;
            sails::model::write_atomic(
                &sae_dir.join("eval.json"),
                &serde_json::to_vec_pretty(&r)?,
            )?;
            eprint!("{}", table(std::slice::from_ref(&r)));
            Some(r)
        };
        results.push(LayerResult {
            hook: hook_name(hook),
            sae_dir,
            train: report,
            eval,
        });
    }
    let output = TrainOutput {
        out: out.clone(),
        config: cfg,
        collected_tokens: man.tokens,
        collect_tokens_per_s: man.tokens_per_s,
        layers: results,
    };
    if args.json {
        println!("{}", serde_json::to_string(&output)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let dir = match (&args.run, args.preset) {
        (Some(d), _) => d.clone(),
        (None, Some(Preset::Default)) => preset_dir(&args.model.model),
        (None, None) => bail!("give --run DIR or --preset default"),
    };
    let path = dir.join("corpus.json");
    let saved: SavedCorpus = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let mut heldout = from_pairs(saved.heldout);
    if let Some(n) = args.max_sequences {
        heldout.truncate(n);
    }
    let model = args.model.load()?;
    let mut reports = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cfg.json").is_file())
        .collect();
    entries.sort();
    if entries.is_empty() {
        bail!("{}: no trained SAE folders (with cfg.json)", dir.display());
    }
    for sae_dir in entries {
        let sae = Sae::load_saelens(&sae_dir, &Device::Cpu)
            .with_context(|| format!("loading {}", sae_dir.display()))?;
        let r = evaluate(&model.decoder, &sae, &heldout, EvalBatching::default())
            .with_context(|| format!("evaluating {}", sae_dir.display()))?;
        reports.push(r);
    }
    if args.json {
        println!("{}", serde_json::to_string(&reports)?);
    } else {
        print!("{}", table(&reports));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    use rand::{Rng, SeedableRng};
    use sails::sae::train::{bench_steps, InMemoryActivations, StepImpl};
    let n = a.batch * 4;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let data: Vec<f32> = (0..n * a.d_in)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let data = candle_core::Tensor::from_vec(data, (n, a.d_in), &Device::Cpu)?;
    let cfg = SaeTrainConfig {
        d_sae: a.width,
        k: a.k,
        batch_size: a.batch,
        total_tokens: (a.batch * (a.steps + 2)) as u64,
        init_sample_tokens: a.batch.min(4096),
        ..Default::default()
    };
    let mut imps = vec![StepImpl::Host];
    if !a.host_only {
        imps.push(StepImpl::Autodiff);
    }
    for imp in imps {
        let mut src = InMemoryActivations::new(data.clone(), Resid::In(0), 0)?;
        let tps = bench_steps(&cfg, &mut src, &Device::Cpu, imp, a.steps, a.aux)?;
        println!(
            "{imp:?}: d_in {} d_sae {} k {} batch {} aux {}: {tps:.0} tokens/s",
            a.d_in, a.width, a.k, a.batch, a.aux
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(subcommand)]
        c: SaeCommand,
    }

    #[test]
    fn train_flags_layer_over_the_preset() {
        let t = T::try_parse_from([
            "x",
            "train",
            "--preset",
            "default",
            "--layers",
            "in:3,out:5",
            "--width",
            "64",
            "--k",
            "4",
            "--tokens",
            "1000",
        ])
        .unwrap();
        let SaeCommand::Train(a) = t.c else {
            panic!("train expected")
        };
        let (cfg, out) = a.resolve().unwrap();
        assert_eq!(cfg.store.layers, vec![Resid::In(3), Resid::Out(5)]);
        assert_eq!((cfg.train.d_sae, cfg.train.k), (64, 4));
        assert_eq!(cfg.train.total_tokens, 1000);
        assert!(out.ends_with("sae/smollm2-135m-instruct-default"));
    }

    #[test]
    fn preset_is_the_documented_default_and_out_is_required_without_it() {
        let t = T::try_parse_from(["x", "train"]).unwrap();
        let SaeCommand::Train(a) = t.c else {
            panic!("train expected")
        };
        assert!(a.resolve().is_err());
        let cfg = SaeRunConfig::preset_default();
        assert_eq!(
            cfg.store.layers,
            vec![Resid::In(6), Resid::In(12), Resid::In(18), Resid::In(24)]
        );
        assert_eq!((cfg.train.d_sae, cfg.train.k), (4608, 64));
    }

    #[test]
    fn a_saved_evaluation_is_reused_only_for_the_same_held_out_tokens() {
        let dir = tempfile::tempdir().unwrap();
        assert!(saved_eval(dir.path(), 100).is_none(), "no eval.json yet");
        std::fs::write(dir.path().join("eval.json"), b"{ truncated").unwrap();
        assert!(saved_eval(dir.path(), 100).is_none(), "corrupt eval.json");
        let report = SaeEvalReport {
            hook: "blocks.12.hook_resid_pre".into(),
            d_sae: 4608,
            tokens: 100,
            l0: 61.5,
            explained_variance: 0.87,
            mean_cosine: 0.97,
            dead_frac: 0.001,
            dense_frac: 0.002,
            splice: sails::sae::eval::SpliceResult {
                ce_clean: 2.5,
                ce_spliced: 2.7,
                ce_zero_ablation: 13.7,
                ce_loss_recovered: 0.98,
                kl_spliced: 0.25,
                kl_zero_ablation: 11.9,
                predicted_tokens: 103,
            },
            formula: sails::sae::eval::CE_RECOVERED_FORMULA.into(),
        };
        std::fs::write(
            dir.path().join("eval.json"),
            serde_json::to_vec(&report).unwrap(),
        )
        .unwrap();
        assert_eq!(saved_eval(dir.path(), 100), Some(report));
        assert!(
            saved_eval(dir.path(), 101).is_none(),
            "other held-out tokens"
        );
    }

    #[test]
    fn layer_spellings() {
        assert_eq!(parse_layer("in:6").unwrap(), Resid::In(6));
        assert_eq!(parse_layer("out:2").unwrap(), Resid::Out(2));
        assert_eq!(
            parse_layer("blocks.4.hook_resid_pre").unwrap(),
            Resid::In(4)
        );
        assert!(parse_layer("mid:3").is_err());
    }

    #[test]
    fn eval_parses() {
        let t = T::try_parse_from(["x", "eval", "--run", "r", "--max-sequences", "5", "--json"])
            .unwrap();
        let SaeCommand::Eval(a) = t.c else {
            panic!("eval expected")
        };
        assert_eq!(a.max_sequences, Some(5));
        assert!(a.json);
    }
}
