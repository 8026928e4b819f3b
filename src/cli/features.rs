//! `sails features` (score SAE features on harmful vs harmless prompts, keep the top-k) and
//! `sails subspace` (selected features → orthonormal LoRA bases; baselines from the same data).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, ValueEnum};
use sails::data::hash_unit;
use sails::features::{
    self, FeatureConfig, LabelledSae, PooledResiduals, Pooling, Selection, ACTIVATIONS_FILE,
    SELECTION_FILE,
};
use sails::sae::Sae;
use sails::subspace::{self, Inputs, Method, Subspace, SubspaceConfig};

use super::model_args::ModelArgs;
use super::sae::{parse_layer, preset_dir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolingArg {
    /// Mean over the prompt's own tokens (no system prompt, no template markers).
    Mean,
    /// The prompt's last token.
    Last,
    /// Element-wise maximum over the prompt's tokens.
    Max,
}

impl From<PoolingArg> for Pooling {
    fn from(p: PoolingArg) -> Self {
        match p {
            PoolingArg::Mean => Pooling::Mean,
            PoolingArg::Last => Pooling::Last,
            PoolingArg::Max => Pooling::Max,
        }
    }
}

#[derive(Debug, Args)]
pub struct FeaturesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub keep_out: super::eval::KeepOutArgs,
    /// SAEs to score: SAELens folders (cfg.json + sae_weights.safetensors), a folder holding
    /// several of them (one per layer, as `sails sae train` writes), or a Gemma Scope
    /// params.npz with its layer after `@` (`params.npz@out:20`).
    ///
    /// Default: the default preset's SAEs of the model ($SAILS_HOME/sae/<model>-default).
    #[arg(long, value_name = "PATH", value_delimiter = ',')]
    pub sae: Vec<String>,
    /// Keep only these layers of the SAEs found (`in:12,out:20` or hook names).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Output folder: features.json and activations.safetensors.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Features kept per layer [default: 64].
    ///
    /// Keep more than the LoRA rank: the subspace stage reduces them to rank directions by
    /// their decoder energy.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// How a prompt's token activations become one row [default: mean].
    #[arg(long, value_enum)]
    pub pooling: Option<PoolingArg>,
    /// Bootstrap resamples for each kept feature's 95 % interval (0: none) [default: 1000].
    #[arg(long)]
    pub bootstrap: Option<usize>,
    /// Seed of the bootstrap and of the harmless-prompt sample [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompts per forward pass [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Harmful prompts, one per line. Default: the training split of the harmful sets
    /// (evaluation prompts are never used).
    #[arg(long, value_name = "FILE")]
    pub harmful_file: Option<PathBuf>,
    /// Harmless prompts, one per line. Default: Alpaca training instructions, as many as there
    /// are harmful prompts, sampled by a seeded hash.
    #[arg(long, value_name = "FILE")]
    pub harmless_file: Option<PathBuf>,
    /// Use at most this many prompts from each set (quick runs).
    #[arg(long, value_name = "N")]
    pub max_prompts: Option<usize>,
    /// Print features.json on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// SAE feature decoder directions (the method).
    Sails,
    /// A random orthonormal basis (baseline).
    Random,
    /// Difference of means + PCA of raw activations (baseline).
    Direct,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Sails => Method::Sails,
            MethodArg::Random => Method::Random,
            MethodArg::Direct => Method::Direct,
        }
    }
}

#[derive(Debug, Args)]
pub struct SubspaceArgs {
    /// Folder written by `sails features` (features.json, activations.safetensors). The SAEs
    /// are reloaded from the paths it records.
    #[arg(long, value_name = "DIR")]
    pub features: PathBuf,
    /// Where the basis comes from.
    #[arg(long, value_enum, default_value = "sails")]
    pub method: MethodArg,
    /// LoRA rank: columns of each basis [default: 16].
    #[arg(long)]
    pub rank: Option<usize>,
    /// Fraction of decoder energy the kept components must hold (τ) [default: 0.8].
    ///
    /// Principal components of the selected features' unit decoder rows are kept until they
    /// hold this share of the energy (the paper uses 0.8); the basis is then cut or padded to
    /// exactly --rank, and subspace.json says which, per layer.
    #[arg(long, value_name = "FRAC")]
    pub energy_frac: Option<f64>,
    /// Seed of the random basis and of random padding [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder: subspace.safetensors (`layers.<l>`, (d_model, rank)) and subspace.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Print subspace.json on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Loads every SAE named by `specs` (see `--sae`).
/// What reads prompts on a features stage's output: its selection, its pooled training
/// residuals and the SAE of every selected layer (the ones it names, or `sae_specs`).
pub fn load_feature_reader(
    features_dir: &Path,
    sae_specs: &[String],
) -> anyhow::Result<(Selection, PooledResiduals, Vec<Sae>)> {
    let sel_path = features_dir.join(SELECTION_FILE);
    let selection =
        Selection::load(&sel_path).with_context(|| format!("loading {}", sel_path.display()))?;
    let act_path = features_dir.join(ACTIVATIONS_FILE);
    let residuals = PooledResiduals::load(&act_path).with_context(|| {
        format!(
            "loading the pooled training residuals {}",
            act_path.display()
        )
    })?;
    let specs: Vec<String> = if sae_specs.is_empty() {
        selection.layers.iter().map(|l| l.sae.clone()).collect()
    } else {
        sae_specs.to_vec()
    };
    let saes = load_saes(&specs, &Device::Cpu)
        .context("loading the SAEs of the selection (--sae PATH reads others)")?
        .into_iter()
        .map(|s| s.sae)
        .collect();
    Ok((selection, residuals, saes))
}

pub fn load_saes(specs: &[String], device: &Device) -> anyhow::Result<Vec<LabelledSae>> {
    let mut out = Vec::new();
    for spec in specs {
        if let Some((path, layer)) = spec.rsplit_once('@') {
            let hook = parse_layer(layer)?;
            let sae = Sae::load_gemma_scope(Path::new(path), hook, device)
                .with_context(|| format!("loading Gemma Scope SAE {path}"))?;
            out.push(LabelledSae {
                sae,
                source: spec.clone(),
            });
            continue;
        }
        let path = Path::new(spec);
        let dirs: Vec<PathBuf> = if path.join("cfg.json").is_file() {
            vec![path.to_path_buf()]
        } else if path.is_dir() {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("cfg.json").is_file())
                .collect();
            dirs.sort();
            if dirs.is_empty() {
                bail!(
                    "{} holds no SAE (no cfg.json in it or its sub-folders); train some with \
                     `sails sae train --preset default`",
                    path.display()
                );
            }
            dirs
        } else {
            bail!("{}: no such SAE folder", path.display());
        };
        for dir in dirs {
            let sae = Sae::load_saelens(&dir, device)
                .with_context(|| format!("loading SAE {}", dir.display()))?;
            out.push(LabelledSae {
                sae,
                source: dir.display().to_string(),
            });
        }
    }
    out.sort_by_key(|s| s.sae.hook());
    Ok(out)
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// The two prompt sets: files if given, else the training splits.
fn prompt_sets(args: &FeaturesArgs, seed: u64) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let splits = if args.harmful_file.is_none() || args.harmless_file.is_none() {
        Some(args.keep_out.splits()?)
    } else {
        None
    };
    let mut harmful = match (&args.harmful_file, &splits) {
        (Some(p), _) => read_lines(p)?,
        (None, Some(s)) => s.train_harmful().iter().map(|r| r.text.clone()).collect(),
        (None, None) => unreachable!("splits are loaded when a file is missing"),
    };
    if let Some(n) = args.max_prompts {
        harmful.truncate(n);
    }
    let mut harmless = match (&args.harmless_file, &splits) {
        (Some(p), _) => read_lines(p)?,
        (None, Some(s)) => {
            let mut pool: Vec<(f64, String)> = s
                .alpaca_train()
                .iter()
                .map(|p| (hash_unit(seed, &p.prompt), p.prompt.clone()))
                .collect();
            pool.sort_by(|a, b| a.0.total_cmp(&b.0));
            pool.into_iter()
                .take(harmful.len())
                .map(|(_, p)| p)
                .collect()
        }
        (None, None) => unreachable!("splits are loaded when a file is missing"),
    };
    if let Some(n) = args.max_prompts {
        harmless.truncate(n);
    }
    Ok((harmful, harmless))
}

fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} prompts {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

pub fn run_features(args: FeaturesArgs) -> anyhow::Result<ExitCode> {
    let defaults = FeatureConfig::default();
    let cfg = FeatureConfig {
        top_k: args.top_k.unwrap_or(defaults.top_k),
        pooling: args.pooling.map(Into::into).unwrap_or(defaults.pooling),
        bootstrap: args.bootstrap.unwrap_or(defaults.bootstrap),
        seed: args.seed.unwrap_or(defaults.seed),
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
    };
    let specs = if args.sae.is_empty() {
        vec![preset_dir(&args.model.model).display().to_string()]
    } else {
        args.sae.clone()
    };
    let mut saes = load_saes(&specs, &Device::Cpu)?;
    if !args.layers.is_empty() {
        let wanted = args
            .layers
            .iter()
            .map(|l| parse_layer(l))
            .collect::<anyhow::Result<Vec<_>>>()?;
        saes.retain(|s| wanted.contains(&s.sae.hook()));
        if saes.len() != wanted.len() {
            bail!("--layers names a layer none of the given SAEs reads");
        }
    }
    let (harmful, harmless) = prompt_sets(&args, cfg.seed)?;
    let model = args.model.load()?;
    tracing::info!(
        saes = saes.len(),
        harmful = harmful.len(),
        harmless = harmless.len(),
        "scoring features"
    );
    let bar = progress((harmful.len() + harmless.len()) as u64, "features");
    let (selection, residuals) =
        features::run(&model, &saes, &harmful, &harmless, &cfg, &mut |done, _| {
            bar.set_position(done as u64)
        })?;
    bar.finish_and_clear();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    selection.save(&args.out.join(SELECTION_FILE))?;
    residuals.save(&args.out.join(ACTIVATIONS_FILE))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&selection)?);
    } else {
        print_selection(&selection)?;
        println!("wrote {}", args.out.join(SELECTION_FILE).display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_selection(sel: &Selection) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} harmful vs {} harmless prompts, pooling {:?}, top {}",
        sel.harmful.count, sel.harmless.count, sel.config.pooling, sel.config.top_k
    )?;
    for layer in &sel.layers {
        let robust = layer.features.iter().filter(|f| f.robust).count();
        writeln!(
            out,
            "{:<26} {robust}/{} robust; strongest:",
            layer.hook_name,
            layer.features.len()
        )?;
        writeln!(
            out,
            "  {:>6} {:>8} {:>8} {:>7} {:>7} {:>6} {:>19}",
            "latent", "Δ", "diff", "f_harm", "f_safe", "d", "95% CI of diff"
        )?;
        for f in layer.features.iter().take(5) {
            writeln!(
                out,
                "  {:>6} {:>8.4} {:>+8.4} {:>7.2} {:>7.2} {:>6.2} [{:+.4}, {:+.4}]",
                f.index,
                f.delta,
                f.diff,
                f.freq_harmful,
                f.freq_harmless,
                f.effect_size,
                f.diff_ci95[0],
                f.diff_ci95[1]
            )?;
        }
    }
    Ok(())
}

pub fn run_subspace(args: SubspaceArgs) -> anyhow::Result<ExitCode> {
    let defaults = SubspaceConfig::default();
    let cfg = SubspaceConfig {
        method: args.method.into(),
        rank: args.rank.unwrap_or(defaults.rank),
        energy_frac: args.energy_frac.unwrap_or(defaults.energy_frac),
        seed: args.seed.unwrap_or(defaults.seed),
    };
    let sel_path = args.features.join(SELECTION_FILE);
    let selection =
        Selection::load(&sel_path).with_context(|| format!("loading {}", sel_path.display()))?;
    let features_sha = Some(sails::manifest::hash_file(&sel_path)?);
    let act_path = args.features.join(ACTIVATIONS_FILE);
    let subspace = match cfg.method {
        Method::Sails => {
            let specs: Vec<String> = selection.layers.iter().map(|l| l.sae.clone()).collect();
            let saes: Vec<Sae> = load_saes(&specs, &Device::Cpu)?
                .into_iter()
                .map(|s| s.sae)
                .collect();
            subspace::run(
                &cfg,
                Inputs::Sails {
                    selection: &selection,
                    saes: &saes,
                },
                features_sha,
            )?
        }
        Method::Direct => {
            let activations = PooledResiduals::load(&act_path)
                .with_context(|| format!("loading {}", act_path.display()))?;
            subspace::run(
                &cfg,
                Inputs::Direct {
                    selection: &selection,
                    activations: &activations,
                },
                features_sha,
            )?
        }
        Method::Random => {
            let activations = PooledResiduals::load(&act_path)
                .with_context(|| format!("loading {}", act_path.display()))?;
            let d_model = activations
                .layers
                .values()
                .next()
                .map(|(h, _)| h.width)
                .context("activations.safetensors holds no layer")?;
            let hooks: Vec<_> = selection.layers.iter().map(|l| l.hook).collect();
            subspace::run(
                &cfg,
                Inputs::Random {
                    hooks: &hooks,
                    d_model,
                },
                features_sha,
            )?
        }
    };
    subspace
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&subspace.summary)?);
    } else {
        print_subspace(&subspace)?;
        println!("wrote {}", args.out.join(subspace::BASIS_FILE).display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_subspace(s: &Subspace) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let c = &s.summary.config;
    writeln!(
        out,
        "method {}, rank {}, τ = {}",
        c.method.name(),
        c.rank,
        c.energy_frac
    )?;
    writeln!(
        out,
        "{:>6} {:>6} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "block", "rows", "for τ", "energy", "truncated", "padded", "random"
    )?;
    for l in &s.summary.layers {
        writeln!(
            out,
            "{:>6} {:>6} {:>8} {:>8.3} {:>9} {:>7} {:>7}",
            l.block_input,
            l.rows_used,
            l.components_for_tau,
            l.energy_kept,
            l.truncated,
            l.padded,
            l.padded_random
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct F {
        #[command(flatten)]
        a: FeaturesArgs,
    }

    #[derive(Parser)]
    struct S {
        #[command(flatten)]
        a: SubspaceArgs,
    }

    #[test]
    fn features_flags_are_optional_over_the_config_defaults() {
        let f = F::try_parse_from(["x", "--out", "o"]).unwrap().a;
        assert_eq!((f.top_k, f.pooling, f.bootstrap), (None, None, None));
        let f = F::try_parse_from([
            "x",
            "--out",
            "o",
            "--sae",
            "a,b@in:3",
            "--pooling",
            "last",
            "--top-k",
            "8",
        ])
        .unwrap()
        .a;
        assert_eq!(f.sae, vec!["a".to_string(), "b@in:3".to_string()]);
        assert_eq!(f.pooling, Some(PoolingArg::Last));
        assert!(F::try_parse_from(["x"]).is_err(), "--out is required");
    }

    #[test]
    fn subspace_method_spellings() {
        for (s, m) in [
            ("sails", Method::Sails),
            ("random", Method::Random),
            ("direct", Method::Direct),
        ] {
            let a = S::try_parse_from(["x", "--features", "f", "--out", "o", "--method", s])
                .unwrap()
                .a;
            assert_eq!(Method::from(a.method), m);
        }
    }
}
