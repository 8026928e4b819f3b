//! `sails align`: every stage from SAEs to the report into one run folder, each stage skipped
//! when its inputs and config are unchanged, an interrupted run resumed where it stopped.
//!
//! Each stage runs as the matching `sails` subcommand in a child process (the same binary), so
//! a stage behaves exactly as it does on its own, with its own resume logic; this file only
//! decides what to run, with which flags, and records what went in and came out
//! (`manifest.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sails::data::sft::{HarmlessCount, HelpfulSource, SftConfig};
use sails::data::Suite;
use sails::features::gate::GateScore;
use sails::features::{FeatureConfig, Pooling};
use sails::manifest::{Freshness, RunManifest, StagePlan, StageTiming};
use sails::model::Resid;
use sails::subspace::{Method, SubspaceConfig};
use sails::train::TrainConfig;
use serde::{Deserialize, Serialize};

use super::compare::read_json;
use super::sae::SaeRunConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PresetArg {
    /// The whole pipeline in about 4 minutes on 2 CPU cores (234 s measured, release build,
    /// assets cached): one small SAE trained on a few thousand tokens, 64 prompts per set, a
    /// short training run, 24 items per evaluation suite.
    Quick,
    /// The best this machine allows: the default SAEs (4 layers, trained once into
    /// $SAILS_HOME and reused; ~37 min the first time), every training prompt, the full
    /// evaluation (65 min on 2 CPU cores measured, SAEs already trained).
    Default,
    /// A quick look at a configuration: the default preset's SAEs, features, data and adapter,
    /// trained for 100 steps instead of 300, then judged on the fixed validation suites only
    /// (training-side prompts held out of training; never an evaluation item), and the run stops
    /// there. 18-21 min on 2 CPU cores beside another job, with the default SAEs trained. Not a
    /// stand-in for the default preset when configurations differ in data size: on three data
    /// configurations it swapped two of them (EVALUATION.md). Combine with --config; its figures
    /// are printed at the end and kept in select/.
    Iterate,
    /// The paper's setting for users with a GPU and the weights: Gemma-2-9B, Gemma Scope 16k
    /// residual SAEs (give them with --sae PATH@out:L), rank-16 LoRA on q,k,v,o.
    #[value(name = "gemma-2-9b")]
    #[serde(rename = "gemma-2-9b")]
    Gemma2_9b,
}

impl PresetArg {
    /// The stage a run of this preset stops after when `--until` does not say.
    fn last_stage(self) -> Option<&'static str> {
        match self {
            PresetArg::Iterate => Some("select"),
            _ => None,
        }
    }
}

/// Where the SAEs come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SaePlan {
    /// Existing SAEs (`sails features --sae` spellings).
    Load { paths: Vec<String> },
    /// Train into `<run>/sae` with this config (`sails sae train`).
    Train(Box<SaeRunConfig>),
    /// The model's default-preset SAEs in $SAILS_HOME, trained there first if missing.
    DefaultPreset,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraPlan {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Keep the subspace factor fixed so every update stays inside the subspace.
    pub freeze_basis: bool,
    pub init_seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalPlan {
    /// First N items of each suite (`None`: all of them).
    pub limit: Option<usize>,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    /// Your own harmful prompts (`sails eval --harmful`): evaluated beside the built-in suites,
    /// and kept out of feature selection and of the fine-tuning data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harmful_file: Option<PathBuf>,
    /// Your own benign prompts (`sails eval --benign`), the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub benign_file: Option<PathBuf>,
    /// The CSV column holding each prompt in those files (default `prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_column: Option<String>,
    /// The CSV column holding each prompt's category (default: `category` when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_column: Option<String>,
    /// Run the attack suite (`sails eval --suite attacks`) in the base and the aligned
    /// evaluation too: the prefill and 10 jailbreak templates on 50 harmful behaviours (--limit
    /// of them where a limit is set), about 8 minutes per model on 2 CPU cores.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attacks: bool,
}

impl Default for EvalPlan {
    /// Every item, 64 new tokens, batches of 16: the default preset's evaluation.
    fn default() -> Self {
        Self {
            limit: None,
            max_new_tokens: 64,
            batch_size: 16,
            harmful_file: None,
            benign_file: None,
            prompt_column: None,
            category_column: None,
            attacks: false,
        }
    }
}

impl EvalPlan {
    /// The user's suite files, inputs of every stage that reads them.
    pub(super) fn user_files(&self) -> Vec<PathBuf> {
        self.harmful_file
            .iter()
            .chain(&self.benign_file)
            .cloned()
            .collect()
    }

    /// Flags that keep the user's suites out of a training-side stage (`data build`, `features`).
    fn keep_out_flags(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (flag, file) in [
            ("--eval-harmful", &self.harmful_file),
            ("--eval-benign", &self.benign_file),
        ] {
            if let Some(f) = file {
                a.extend([s(flag), s(f.display())]);
            }
        }
        if let Some(c) = &self.prompt_column {
            a.extend([s("--eval-prompt-column"), c.clone()]);
        }
        a
    }

    /// Flags that evaluate the user's suites (`sails eval`).
    fn user_suite_flags(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (flag, file) in [
            ("--harmful", &self.harmful_file),
            ("--benign", &self.benign_file),
        ] {
            if let Some(f) = file {
                a.extend([s(flag), s(f.display())]);
            }
        }
        for (flag, column) in [
            ("--prompt-column", &self.prompt_column),
            ("--category-column", &self.category_column),
        ] {
            if let Some(c) = column {
                a.extend([s(flag), c.clone()]);
            }
        }
        a
    }
}

/// Everything `sails align` does; saved into `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignConfig {
    pub preset: PresetArg,
    pub model: String,
    pub sae: SaePlan,
    pub features: FeatureConfig,
    /// At most this many prompts per set for feature scoring (`None`: every training prompt).
    pub feature_prompts: Option<usize>,
    pub subspace: SubspaceConfig,
    pub data: SftConfig,
    pub lora: LoraPlan,
    pub train: TrainConfig,
    pub eval: EvalPlan,
    /// Top-activating contexts shown per feature card.
    pub explain_contexts: usize,
    /// The adapter scale chosen on the validation suites (none: scale 1).
    #[serde(default, skip_serializing_if = "SelectPlan::is_off")]
    pub select: SelectPlan,
    /// A gate on the safety features that switches the adapter on per prompt (none: always on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GatePlan>,
}

/// The adapter's gate (`sails gate`): the base model's reading of each prompt on the kept safety
/// features switches the adapter on or leaves the base model answering. Its threshold is fitted
/// on the validation suites, where the base and the aligned model's saved responses give the
/// gated model's figures at every threshold; the rule is the one `select` uses: the highest
/// validation safety with validation over-refusal at most `max_overrefusal`. Recorded in
/// `gate/gate.json`; `eval-aligned` then evaluates the gated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatePlan {
    /// `features` (the kept features' shift) or `direct` (the direct-identification direction).
    pub score: GateScore,
    pub max_overrefusal: f64,
}

/// Model selection on the validation suites (training-side prompts held out of training, never
/// an evaluation item): the trained adapter is evaluated there at each scale, and the aligned
/// model is the adapter at the scale with the highest validation safety among those whose
/// validation over-refusal is at most `max_overrefusal` (ties: the smaller scale); when no scale
/// qualifies, the one with the least over-refusal. Recorded in `select/choice.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SelectPlan {
    /// Scales of the adapter's update to try (empty: no selection, scale 1).
    pub scales: Vec<f64>,
    /// Largest acceptable refusal rate on the benign validation prompts.
    pub max_overrefusal: f64,
}

impl SelectPlan {
    fn is_off(&self) -> bool {
        self.scales.is_empty()
    }
}

/// One scale's validation figures, and the choice (`select/choice.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectChoice {
    pub rule: String,
    pub tried: Vec<ScaleTried>,
    pub chosen: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleTried {
    pub scale: f64,
    /// Safety rate on the harmful validation prompts.
    pub val_safety: f64,
    /// Refusal rate on the benign validation prompts.
    pub val_overrefusal: f64,
}

impl SelectPlan {
    /// The scale the rule picks from `tried` (non-empty).
    pub fn choose(&self, tried: &[ScaleTried]) -> f64 {
        let better = |a: &&ScaleTried, b: &&ScaleTried| {
            a.val_safety
                .total_cmp(&b.val_safety)
                .then(b.scale.total_cmp(&a.scale))
        };
        let qualifying = tried
            .iter()
            .filter(|t| t.val_overrefusal <= self.max_overrefusal)
            .max_by(better);
        qualifying
            .or_else(|| {
                tried.iter().min_by(|a, b| {
                    a.val_overrefusal
                        .total_cmp(&b.val_overrefusal)
                        .then(a.scale.total_cmp(&b.scale))
                })
            })
            .map_or(1.0, |t| t.scale)
    }
}

impl AlignConfig {
    pub fn preset(preset: PresetArg) -> Self {
        let lora = LoraPlan {
            rank: 16,
            alpha: 32.0,
            targets: sails::lora::default_targets(),
            freeze_basis: false,
            init_seed: 0,
        };
        match preset {
            PresetArg::Quick => {
                let mut sae = SaeRunConfig::preset_default();
                sae.corpus.generated = 0;
                sae.corpus.alpaca_max = 300;
                sae.store.layers = vec![Resid::In(12)];
                sae.store.token_budget = 6_000;
                sae.train.d_sae = 2304;
                sae.train.k = 32;
                sae.train.total_tokens = 150_000;
                sae.train.batch_size = 2048;
                sae.train.lr_warmup_steps = 10;
                sae.train.checkpoint_every = 25;
                sae.train.init_sample_tokens = 4096;
                AlignConfig {
                    preset,
                    model: "default".into(),
                    sae: SaePlan::Train(Box::new(sae)),
                    features: FeatureConfig {
                        top_k: 32,
                        bootstrap: 200,
                        ..FeatureConfig::default()
                    },
                    feature_prompts: Some(64),
                    subspace: SubspaceConfig::default(),
                    data: SftConfig {
                        harmful: Some(64),
                        harmless: HarmlessCount::PerHarmful(1.0),
                        max_edgy: Some(8),
                        helpful: HelpfulSource::Reference,
                        max_new_tokens: 64,
                        ..SftConfig::default()
                    },
                    lora,
                    train: TrainConfig {
                        lr_peak: 1e-3,
                        lr_min: 1e-4,
                        warmup_steps: 3,
                        max_steps: 24,
                        batch_size: 4,
                        eval_every: Some(12),
                        checkpoint_every: Some(6),
                        max_seq_len: 1024,
                        ..TrainConfig::default()
                    },
                    eval: EvalPlan {
                        limit: Some(24),
                        max_new_tokens: 48,
                        batch_size: 12,
                        ..EvalPlan::default()
                    },
                    explain_contexts: 3,
                    select: SelectPlan::default(),
                    // Without it the quick adapter refuses two thirds of XSTest's safe questions
                    // (EVALUATION.md, "A gate on the safety features").
                    gate: Some(GatePlan {
                        score: GateScore::Features,
                        max_overrefusal: 0.2,
                    }),
                }
            }
            PresetArg::Default => AlignConfig {
                preset,
                model: "default".into(),
                sae: SaePlan::DefaultPreset,
                features: FeatureConfig::default(),
                feature_prompts: None,
                subspace: SubspaceConfig::default(),
                // Without question forms: with them (and 400 steps) StrongREJECT's refusals rose
                // from 45 % to 90 % but XSTest's safe questions were refused 64 % of the time
                // instead of 16 % (EVALUATION.md).
                data: SftConfig::default(),
                lora,
                train: TrainConfig {
                    lr_peak: 5e-4,
                    lr_min: 5e-5,
                    warmup_steps: 10,
                    max_steps: 300,
                    max_seq_len: 768,
                    ..TrainConfig::default()
                },
                eval: EvalPlan::default(),
                explain_contexts: 5,
                select: SelectPlan::default(),
                gate: None,
            },
            PresetArg::Iterate => {
                let default = AlignConfig::preset(PresetArg::Default);
                AlignConfig {
                    preset,
                    train: TrainConfig {
                        max_steps: 100,
                        ..default.train
                    },
                    // Scale 1 is the default preset's adapter; validation is what is judged.
                    select: SelectPlan {
                        scales: vec![1.0],
                        max_overrefusal: 0.08,
                    },
                    ..default
                }
            }
            PresetArg::Gemma2_9b => AlignConfig {
                preset,
                model: "google/gemma-2-9b-it".into(),
                sae: SaePlan::Load { paths: Vec::new() },
                features: FeatureConfig::default(),
                feature_prompts: None,
                subspace: SubspaceConfig::default(),
                data: SftConfig::default(),
                lora,
                train: TrainConfig::default(),
                eval: EvalPlan::default(),
                explain_contexts: 5,
                select: SelectPlan::default(),
                gate: None,
            },
        }
    }
}

/// Run the whole SAILS pipeline into one folder (the project's main job).
///
/// Stages: SAEs (trained or loaded) → features → subspace → fine-tuning data → LoRA training
/// from the subspace → (the adapter's scale, chosen on validation, with `[select]`) → (its gate on
/// the safety features, fitted on validation, with `[gate]`: the quick preset has one) →
/// evaluation of the base and the aligned model → explanations → report (report.html,
/// summary.md). manifest.json records every stage's input hashes, config, output
/// hashes and time; rerunning skips what is up to date and resumes what was interrupted.
#[derive(Debug, Args)]
pub struct AlignArgs {
    /// Built-in settings; --config and the flags below override them.
    #[arg(long, value_enum, default_value = "quick")]
    pub preset: PresetArg,
    /// TOML file overriding any part of the preset (sections: features, subspace, data, lora,
    /// train, eval, sae; top-level keys model, feature_prompts, explain_contexts).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Run folder [default: runs/<preset>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Model (`default`, a GGUF file, a Hugging Face folder or hub id in the local cache).
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Use these SAEs instead of training (`sails features --sae` spellings, comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PATH")]
    pub sae: Vec<String>,
    /// Redo every stage, ignoring what the manifest says is up to date.
    #[arg(long)]
    pub force: bool,
    /// Stop after this stage (sae, features, subspace, data, train, select, gate, eval-base,
    /// eval-aligned, explain, report).
    #[arg(long, value_name = "STAGE")]
    pub until: Option<String>,
    /// Leave the adapter on for every prompt: no gate on the safety features, even where the
    /// preset has one (the quick preset does; `[gate]` in --config sets one up elsewhere).
    #[arg(long)]
    pub no_gate: bool,
    /// Print the manifest on stdout at the end.
    #[arg(long)]
    pub json: bool,
}

/// Deep-merges `over` into `base` (tables merge key by key; anything else is replaced).
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        // A one-key table over a one-key table with another key is an enum changing variant
        // (`harmless = { exactly = 300 }` over `{ per_harmful = 1.0 }`): replaced, not merged.
        (toml::Value::Table(b), toml::Value::Table(o))
            if b.len() == 1 && o.len() == 1 && o.keys().all(|k| !b.contains_key(k)) =>
        {
            *b = o;
        }
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A `--config` TOML file's text merged over `preset` (`path` only names the file in errors).
pub fn config_over_preset(
    preset: AlignConfig,
    text: &str,
    path: &Path,
) -> anyhow::Result<AlignConfig> {
    let over: toml::Value =
        toml::from_str(text).with_context(|| format!("parsing {}", path.display()))?;
    let mut base = toml::Value::try_from(&preset).context("preset as TOML")?;
    merge(&mut base, over);
    base.try_into()
        .with_context(|| format!("{}: not an align config", path.display()))
}

impl AlignArgs {
    pub fn resolve(&self) -> anyhow::Result<AlignConfig> {
        let mut cfg = AlignConfig::preset(self.preset);
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            cfg = config_over_preset(cfg, &text, path)?;
        }
        if let Some(m) = &self.model {
            cfg.model = m.clone();
        }
        if !self.sae.is_empty() {
            cfg.sae = SaePlan::Load {
                paths: self.sae.clone(),
            };
        }
        if self.no_gate {
            cfg.gate = None;
        }
        if let Some(plan) = &cfg.gate {
            if !(0.0..=1.0).contains(&plan.max_overrefusal) {
                bail!(
                    "[gate]: max_overrefusal must be a rate in [0, 1] (got {})",
                    plan.max_overrefusal
                );
            }
        }
        // The basis is the adapter's read/write factor: its width is the LoRA rank. Checked
        // here so a mismatch fails before any stage runs, not at the train stage an hour in.
        if cfg.subspace.rank != cfg.lora.rank {
            bail!(
                "[subspace] rank = {} but [lora] rank = {}: the subspace basis is the adapter's \
                 factor, so the two must be equal",
                cfg.subspace.rank,
                cfg.lora.rank
            );
        }
        if cfg.preset == PresetArg::Gemma2_9b
            && matches!(&cfg.sae, SaePlan::Load { paths } if paths.is_empty())
        {
            bail!(
                "the gemma-2-9b preset needs Gemma Scope SAEs: --sae params.npz@out:L[,...] \
                 (and --model with the weights' folder)"
            );
        }
        Ok(cfg)
    }
}

/// The run folder and where each stage writes.
pub(super) struct Layout {
    pub(super) root: PathBuf,
}

impl Layout {
    pub(super) fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// `sails <args>` in a child process; its stdout goes to `<run>/logs/<stage>.log`, its
/// stderr (progress bars, logs) to ours.
pub(super) fn sails(run: &Layout, stage: &str, args: &[String]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the sails binary")?;
    // Linux names a binary replaced on disk while it runs "<path> (deleted)"; the path itself
    // then holds the new build.
    let exe = match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(p) => PathBuf::from(p),
        None => exe,
    };
    let logs = run.path("logs");
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{stage}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    tracing::info!(stage, cmd = %format!("sails {}", args.join(" ")), "running");
    let mut command = Command::new(exe);
    command
        .args(args)
        .stdout(Stdio::from(log))
        .stdin(Stdio::null());
    die_with_parent(&mut command);
    let status = command
        .status()
        .with_context(|| format!("starting stage {stage}"))?;
    if !status.success() {
        bail!(
            "stage {stage} failed ({status}); its output is in {}; rerun the same command to \
             resume",
            log_path.display()
        );
    }
    Ok(())
}

/// A stage outlives nothing: when this process dies, killed outright included, the kernel kills
/// the stage too. Otherwise a stage orphaned by a killed `sails align` would go on writing into
/// the run folder while the rerun that resumes it writes there too.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the hook calls only async-signal-safe functions (prctl,
    // getppid, _exit) and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the request took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}

pub(super) fn s(v: impl ToString) -> String {
    v.to_string()
}

pub(super) fn write_toml<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = toml::to_string(value).context("serialising a stage config")?;
    sails::model::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// `sails eval` arguments for one evaluation of `suite` (`all`, or a comma-separated list; with
/// `adapter`, the aligned model).
pub(super) fn eval_args(
    model: &str,
    out: &Path,
    e: &EvalPlan,
    suite: &str,
    adapter: Option<PathBuf>,
) -> Vec<String> {
    let mut a = vec![
        s("eval"),
        s("--model"),
        model.to_string(),
        s("--suite"),
        s(suite),
        s("--out"),
        s(out.display()),
        s("--max-new-tokens"),
        s(e.max_new_tokens),
        s("--batch-size"),
        s(e.batch_size),
    ];
    if let Some(n) = e.limit {
        a.extend([s("--limit"), s(n)]);
    }
    if e.attacks && suite == "all" {
        a.extend([s("--suite"), s("attacks")]);
    }
    // Validation is for model selection only: the user's suites go with the evaluation suites.
    if suite != "validation" {
        a.extend(e.user_suite_flags());
    }
    if let Some(ad) = adapter {
        a.extend([s("--adapter"), s(ad.display())]);
    }
    a
}

/// Runs one stage unless the manifest says it is up to date.
pub(super) struct Runner<'a> {
    pub(super) run: &'a Layout,
    pub(super) manifest: RunManifest,
    pub(super) force: bool,
    pub(super) timings: Vec<StageTiming>,
}

impl Runner<'_> {
    /// `work(fresh_start)`: `fresh_start` is true when earlier outputs must be discarded.
    pub(super) fn stage(
        &mut self,
        plan: StagePlan<'_>,
        work: impl FnOnce(bool) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let freshness = if self.force {
            Freshness::Stale("--force".into())
        } else {
            self.manifest.freshness(&self.run.root, &plan)?
        };
        if freshness == Freshness::UpToDate {
            tracing::info!(stage = plan.name, "up to date, skipped");
            eprintln!("[{}] up to date", plan.name);
            self.timings.push(StageTiming {
                stage: plan.name.into(),
                seconds: 0.0,
                skipped: true,
            });
            return Ok(());
        }
        let fresh_start = matches!(freshness, Freshness::Stale(_));
        match &freshness {
            Freshness::Stale(why) | Freshness::OutputsChanged(why) => {
                eprintln!("[{}] rerunning: {why}", plan.name);
                self.manifest.forget(plan.name);
                self.manifest.save(&self.run.root)?;
            }
            _ => eprintln!("[{}] running", plan.name),
        }
        work(fresh_start)?;
        let seconds = start.elapsed().as_secs_f64();
        self.manifest.finish(&self.run.root, &plan, seconds)?;
        self.timings.push(StageTiming {
            stage: plan.name.into(),
            seconds,
            skipped: false,
        });
        eprintln!("[{}] done in {seconds:.0} s", plan.name);
        Ok(())
    }
}

/// The fine-tuning data folder as `sails train` takes it (`--data <dir>`: train.jsonl, its held-out
/// part and the examples' kinds), and the files a training stage depends on. The manifest is one
/// of them only with a retain term, where its kinds change the loss, and the preference pairs only
/// with a DPO term; runs without them keep the inputs they recorded.
pub(super) fn train_data(dir: &Path, train: &TrainConfig) -> (Vec<String>, Vec<PathBuf>) {
    let mut inputs = vec![
        dir.join(sails::data::sft::TRAIN_FILE),
        dir.join(sails::data::sft::HELDOUT_FILE),
    ];
    if train.retain_kl > 0.0 {
        inputs.push(dir.join(sails::data::sft::MANIFEST_FILE));
    }
    if train.dpo_weight > 0.0 {
        inputs.push(dir.join(sails::data::sft::PAIRS_FILE));
        inputs.push(dir.join(sails::data::sft::HELDOUT_PAIRS_FILE));
    }
    (vec![s("--data"), s(dir.display())], inputs)
}

pub(super) fn remove_dir(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

fn pooling_flag(p: Pooling) -> &'static str {
    match p {
        Pooling::Mean => "mean",
        Pooling::Last => "last",
        Pooling::Max => "max",
    }
}

pub(super) fn versions() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert("sails".into(), env!("CARGO_PKG_VERSION").into());
    v.insert("candle".into(), "0.11.1".into());
    v.insert(
        "target".into(),
        format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
    );
    v.insert(
        "threads".into(),
        std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_default(),
    );
    v
}

/// Stages in order; `--until` names one of them.
pub const STAGES: &[&str] = &[
    "sae",
    "features",
    "subspace",
    "data",
    "train",
    "select",
    "gate",
    "eval-base",
    "eval-aligned",
    "explain",
    "report",
];

pub fn run(args: AlignArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.resolve()?;
    if let Some(u) = &args.until {
        if !STAGES.contains(&u.as_str()) {
            bail!("--until {u:?}: not a stage (one of {})", STAGES.join(", "));
        }
    }
    let root = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(match cfg.preset {
            PresetArg::Quick => "quick",
            PresetArg::Default => "default",
            PresetArg::Iterate => "iterate",
            PresetArg::Gemma2_9b => "gemma-2-9b",
        })
    });
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let _lock = super::lock_run_folder(&root)?;
    let run = Layout { root: root.clone() };
    let config_json = serde_json::to_value(&cfg)?;
    let mut manifest = RunManifest::load(&root)?
        .unwrap_or_else(|| RunManifest::new(config_json.clone(), versions()));
    manifest.config = config_json;
    manifest.versions = versions();
    let mut runner = Runner {
        run: &run,
        manifest,
        force: args.force,
        timings: Vec::new(),
    };
    let total = Instant::now();
    let model_path = sails::model::load::ModelSource::resolve(&cfg.model)
        .with_context(|| format!("resolving model {:?}", cfg.model))?
        .path()
        .to_path_buf();
    let last = args.until.as_deref().or(cfg.preset.last_stage());
    let until = |stage: &str| last == Some(stage);

    // 1. SAEs
    let sae_specs: Vec<String> = match &cfg.sae {
        SaePlan::Load { paths } => paths.clone(),
        SaePlan::Train(_) => vec![run.path("sae").display().to_string()],
        SaePlan::DefaultPreset => vec![super::sae::preset_dir(&cfg.model).display().to_string()],
    };
    let sae_inputs: Vec<PathBuf> = match &cfg.sae {
        SaePlan::Load { paths } => paths
            .iter()
            .map(|p| PathBuf::from(p.rsplit_once('@').map_or(p.as_str(), |(f, _)| f)))
            .collect(),
        _ => vec![model_path.clone()],
    };
    runner.stage(
        StagePlan {
            name: "sae",
            inputs: sae_inputs,
            config: serde_json::to_value(&cfg.sae)?,
            outputs: Vec::new(),
        },
        |fresh| match &cfg.sae {
            SaePlan::Load { .. } => Ok(()),
            SaePlan::Train(sae_cfg) => {
                if fresh {
                    remove_dir(&run.path("sae"))?;
                }
                let cfg_path = run.path("sae-config.toml");
                write_toml(&cfg_path, sae_cfg.as_ref())?;
                sails(
                    &run,
                    "sae",
                    &[
                        s("sae"),
                        s("train"),
                        s("--model"),
                        cfg.model.clone(),
                        s("--config"),
                        s(cfg_path.display()),
                        s("--out"),
                        s(run.path("sae").display()),
                        s("--no-eval"),
                    ],
                )
            }
            SaePlan::DefaultPreset => sails(
                &run,
                "sae",
                &[
                    s("sae"),
                    s("train"),
                    s("--model"),
                    cfg.model.clone(),
                    s("--preset"),
                    s("default"),
                ],
            ),
        },
    )?;
    if until("sae") {
        return finish(runner, &args, total);
    }

    // 2. features
    let sae_weight_inputs: Vec<PathBuf> = match &cfg.sae {
        SaePlan::Load { paths } => paths
            .iter()
            .map(|p| PathBuf::from(p.rsplit_once('@').map_or(p.as_str(), |(f, _)| f)))
            .collect(),
        _ => sae_specs.iter().map(PathBuf::from).collect(),
    };
    let mut inputs = vec![model_path.clone()];
    inputs.extend(sae_weight_inputs.iter().cloned());
    inputs.extend(cfg.eval.user_files());
    let f = &cfg.features;
    runner.stage(
        StagePlan {
            name: "features",
            inputs,
            config: serde_json::json!({ "features": f, "prompts": cfg.feature_prompts }),
            outputs: vec![PathBuf::from("features")],
        },
        |_| {
            let mut a = vec![
                s("features"),
                s("--model"),
                cfg.model.clone(),
                s("--sae"),
                sae_specs.join(","),
                s("--out"),
                s(run.path("features").display()),
                s("--top-k"),
                s(f.top_k),
                s("--pooling"),
                s(pooling_flag(f.pooling)),
                s("--bootstrap"),
                s(f.bootstrap),
                s("--seed"),
                s(f.seed),
                s("--batch-size"),
                s(f.batch_size),
            ];
            if let Some(n) = cfg.feature_prompts {
                a.extend([s("--max-prompts"), s(n)]);
            }
            a.extend(cfg.eval.keep_out_flags());
            sails(&run, "features", &a)
        },
    )?;
    if until("features") {
        return finish(runner, &args, total);
    }

    // 3. subspace
    let sub = &cfg.subspace;
    runner.stage(
        StagePlan {
            name: "subspace",
            inputs: vec![run.path("features")],
            config: serde_json::to_value(sub)?,
            outputs: vec![PathBuf::from("subspace")],
        },
        |_| {
            sails(
                &run,
                "subspace",
                &[
                    s("subspace"),
                    s("--features"),
                    s(run.path("features").display()),
                    s("--method"),
                    s(sub.method.name()),
                    s("--rank"),
                    s(sub.rank),
                    s("--energy-frac"),
                    s(sub.energy_frac),
                    s("--seed"),
                    s(sub.seed),
                    s("--out"),
                    s(run.path("subspace").display()),
                ],
            )
        },
    )?;
    if sub.method != Method::Sails {
        tracing::warn!(method = sub.method.name(), "align runs a baseline subspace");
    }
    if until("subspace") {
        return finish(runner, &args, total);
    }

    // 4. fine-tuning data
    let mut data_outputs = vec![
        PathBuf::from("data/train.jsonl"),
        PathBuf::from("data/heldout.jsonl"),
    ];
    if cfg.data.preference_pairs {
        data_outputs.push(PathBuf::from("data").join(sails::data::sft::PAIRS_FILE));
        data_outputs.push(PathBuf::from("data").join(sails::data::sft::HELDOUT_PAIRS_FILE));
    }
    runner.stage(
        StagePlan {
            name: "data",
            inputs: [model_path.clone()]
                .into_iter()
                .chain(cfg.eval.user_files())
                .collect(),
            config: serde_json::to_value(&cfg.data)?,
            outputs: data_outputs,
        },
        |fresh| {
            if fresh {
                remove_dir(&run.path("data"))?;
            }
            let cfg_path = run.path("data-config.toml");
            write_toml(&cfg_path, &cfg.data)?;
            let mut a = vec![
                s("data"),
                s("build"),
                s("--model"),
                cfg.model.clone(),
                s("--config"),
                s(cfg_path.display()),
                s("--out"),
                s(run.path("data").display()),
            ];
            a.extend(cfg.eval.keep_out_flags());
            sails(&run, "data", &a)
        },
    )?;
    if until("data") {
        return finish(runner, &args, total);
    }

    // 5. training from the subspace
    let lora = &cfg.lora;
    let (data_args, data_inputs) = train_data(&run.path("data"), &cfg.train);
    let mut inputs = vec![model_path.clone()];
    inputs.extend(data_inputs);
    inputs.push(run.path("subspace/subspace.safetensors"));
    runner.stage(
        StagePlan {
            name: "train",
            inputs,
            config: serde_json::json!({ "lora": lora, "train": &cfg.train }),
            outputs: vec![PathBuf::from("train/adapter")],
        },
        |fresh| {
            if fresh {
                remove_dir(&run.path("train"))?;
            }
            let cfg_path = run.path("train-config.toml");
            write_toml(&cfg_path, &cfg.train)?;
            let mut a = vec![s("train"), s("--model"), cfg.model.clone()];
            a.extend(data_args);
            a.extend([
                s("--out"),
                s(run.path("train").display()),
                s("--init"),
                s("subspace"),
                s("--basis"),
                s(run.path("subspace/subspace.safetensors").display()),
                s("--rank"),
                s(lora.rank),
                s("--alpha"),
                s(lora.alpha),
                s("--targets"),
                lora.targets.join(","),
                s("--init-seed"),
                s(lora.init_seed),
                s("--config"),
                s(cfg_path.display()),
                s("--resume"),
            ]);
            if lora.freeze_basis {
                a.push(s("--freeze-basis"));
            }
            sails(&run, "train", &a)
        },
    )?;
    if until("train") {
        return finish(runner, &args, total);
    }

    // 6. the adapter's scale, chosen on the validation suites
    let e = &cfg.eval;
    let choice_path = run.path("select/choice.json");
    if !cfg.select.is_off() {
        runner.stage(
            StagePlan {
                name: "select",
                inputs: vec![model_path.clone(), run.path("train/adapter")],
                config: serde_json::json!({ "select": &cfg.select, "eval": e }),
                outputs: vec![PathBuf::from("select/choice.json")],
            },
            |fresh| {
                if fresh {
                    remove_dir(&run.path("select"))?;
                }
                let unlimited = EvalPlan {
                    limit: None,
                    ..e.clone()
                };
                let mut tried = Vec::new();
                for &scale in &cfg.select.scales {
                    let dir = run.path(&format!("select/x{scale}"));
                    let mut a = eval_args(
                        &cfg.model,
                        &dir,
                        &unlimited,
                        "validation",
                        Some(run.path("train/adapter")),
                    );
                    a.extend([s("--adapter-scale"), s(scale)]);
                    sails(&run, &format!("select-x{scale}"), &a)?;
                    let m: sails::eval::Metrics = read_json(&dir.join("metrics.json"))?;
                    let rate = |suite: Suite| -> anyhow::Result<f64> {
                        m.suites
                            .get(suite.name())
                            .map(|r| r.rate.rate)
                            .with_context(|| {
                                format!("{}: no {} suite", dir.display(), suite.name())
                            })
                    };
                    tried.push(ScaleTried {
                        scale,
                        val_safety: rate(Suite::ValHarmful)?,
                        val_overrefusal: rate(Suite::ValBenign)?,
                    });
                }
                let choice = SelectChoice {
                    rule: format!(
                        "highest val-harmful safety with val-benign refusal <= {}; else the least \
                         val-benign refusal",
                        cfg.select.max_overrefusal
                    ),
                    chosen: cfg.select.choose(&tried),
                    tried,
                };
                tracing::info!(
                    chosen = choice.chosen,
                    "adapter scale selected on validation"
                );
                sails::model::write_atomic(
                    &choice_path,
                    serde_json::to_string_pretty(&choice)?.as_bytes(),
                )?;
                Ok(())
            },
        )?;
    }
    if until("select") {
        return finish(runner, &args, total);
    }
    let chosen_scale = if cfg.select.is_off() {
        None
    } else {
        let c: SelectChoice = read_json(&choice_path)?;
        Some(c.chosen)
    };

    // 7. the adapter's gate on the safety features, fitted on the validation suites
    let gate_path = run.path("gate/gate.json");
    if let Some(plan) = &cfg.gate {
        let mut inputs = vec![
            model_path.clone(),
            run.path("train/adapter"),
            run.path("features"),
        ];
        if chosen_scale.is_some() {
            inputs.push(choice_path.clone());
        }
        runner.stage(
            StagePlan {
                name: "gate",
                inputs,
                config: serde_json::json!({ "gate": plan, "eval": e }),
                outputs: vec![PathBuf::from("gate/gate.json")],
            },
            |fresh| {
                if fresh {
                    remove_dir(&run.path("gate"))?;
                }
                let unlimited = EvalPlan {
                    limit: None,
                    ..e.clone()
                };
                for (name, adapter) in [("val-base", None), ("val-aligned", Some("train/adapter"))]
                {
                    let mut a = eval_args(
                        &cfg.model,
                        &run.path(&format!("gate/{name}")),
                        &unlimited,
                        "validation",
                        adapter.map(|ad| run.path(ad)),
                    );
                    if let Some(scale) = adapter.and(chosen_scale) {
                        a.extend([s("--adapter-scale"), s(scale)]);
                    }
                    sails(&run, &format!("gate-{name}"), &a)?;
                }
                sails(
                    &run,
                    "gate",
                    &[
                        s("gate"),
                        s("--model"),
                        cfg.model.clone(),
                        s("--features"),
                        s(run.path("features").display()),
                        s("--base-validation"),
                        s(run.path("gate/val-base").display()),
                        s("--adapter-validation"),
                        s(run.path("gate/val-aligned").display()),
                        s("--score"),
                        s(plan.score.name()),
                        s("--max-overrefusal"),
                        s(plan.max_overrefusal),
                        s("--out"),
                        s(gate_path.display()),
                    ],
                )
            },
        )?;
    }
    if until("gate") {
        return finish(runner, &args, total);
    }

    // 8–9. evaluation of the base and the aligned model (at the chosen scale, behind the gate)
    for (stage, adapter) in [("eval-base", None), ("eval-aligned", Some("train/adapter"))] {
        let mut inputs = vec![model_path.clone()];
        inputs.extend(e.user_files());
        if let Some(a) = adapter {
            inputs.push(run.path(a));
        }
        let scale = adapter.and(chosen_scale);
        if scale.is_some() {
            inputs.push(choice_path.clone());
        }
        let gated = adapter.is_some() && cfg.gate.is_some();
        if gated {
            inputs.push(gate_path.clone());
            inputs.push(run.path("eval-base/metrics.json"));
        }
        runner.stage(
            StagePlan {
                name: stage,
                inputs,
                config: serde_json::to_value(e)?,
                outputs: vec![PathBuf::from(stage).join("metrics.json")],
            },
            |fresh| {
                if fresh {
                    remove_dir(&run.path(stage))?;
                }
                let mut a = eval_args(
                    &cfg.model,
                    &run.path(stage),
                    e,
                    "all",
                    adapter.map(|ad| run.path(ad)),
                );
                if let Some(scale) = scale {
                    a.extend([s("--adapter-scale"), s(scale)]);
                }
                if gated {
                    // Prompts the gate leaves closed take the base model's saved responses.
                    a.extend([
                        s("--gate"),
                        s(gate_path.display()),
                        s("--gate-base-responses"),
                        s(run.path("eval-base").display()),
                    ]);
                }
                sails(&run, stage, &a)
            },
        )?;
        if until(stage) {
            return finish(runner, &args, total);
        }
    }

    // 10. explanations
    runner.stage(
        StagePlan {
            name: "explain",
            inputs: vec![
                model_path.clone(),
                run.path("features"),
                run.path("subspace"),
                run.path("train/adapter"),
            ],
            config: serde_json::json!({ "contexts": cfg.explain_contexts }),
            outputs: vec![PathBuf::from("explain/explanations.json")],
        },
        |_| {
            sails(
                &run,
                "explain",
                &[
                    s("explain"),
                    s("--model"),
                    cfg.model.clone(),
                    s("--features"),
                    s(run.path("features").display()),
                    s("--subspace"),
                    s(run.path("subspace").display()),
                    s("--adapter"),
                    s(run.path("train/adapter").display()),
                    s("--contexts"),
                    s(cfg.explain_contexts),
                    s("--out"),
                    s(run.path("explain/explanations.json").display()),
                ],
            )
        },
    )?;
    if until("explain") {
        return finish(runner, &args, total);
    }

    // 11. report
    runner.stage(
        StagePlan {
            name: "report",
            inputs: vec![
                run.path("features"),
                run.path("subspace"),
                run.path("train/loss_curve.jsonl"),
                run.path("eval-base/metrics.json"),
                run.path("eval-aligned/metrics.json"),
                run.path("explain/explanations.json"),
            ],
            config: serde_json::json!({}),
            outputs: vec![PathBuf::from("report.html"), PathBuf::from("summary.md")],
        },
        |_| super::report::write_run_report(&run.root, &cfg.model, &format!("{:?}", cfg.preset)),
    )?;
    finish(runner, &args, total)
}

fn finish(mut runner: Runner<'_>, args: &AlignArgs, total: Instant) -> anyhow::Result<ExitCode> {
    runner.manifest.last_invocation = std::mem::take(&mut runner.timings);
    runner.manifest.save(&runner.run.root)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runner.manifest)?);
    } else {
        println!(
            "run {} finished in {:.0} s",
            runner.run.root.display(),
            total.elapsed().as_secs_f64()
        );
        for t in &runner.manifest.last_invocation {
            println!(
                "  {:<13} {}",
                t.stage,
                if t.skipped {
                    "up to date".to_string()
                } else {
                    format!("{:.0} s", t.seconds)
                }
            );
        }
        let choice = runner.run.path("select/choice.json");
        if choice.exists() {
            let c: SelectChoice = read_json(&choice)?;
            println!("validation (val-harmful safety, val-benign refusal):");
            for t in &c.tried {
                println!(
                    "  scale {:<5} {:.1} %, {:.1} %{}",
                    t.scale,
                    100.0 * t.val_safety,
                    100.0 * t.val_overrefusal,
                    if t.scale == c.chosen {
                        "  (chosen)"
                    } else {
                        ""
                    }
                );
            }
        }
        let report = runner.run.path("report.html");
        if report.exists() {
            println!("report: {}", report.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_takes_the_safest_scale_within_the_over_refusal_bound_else_the_least_refusing() {
        let t = |scale, val_safety, val_overrefusal| ScaleTried {
            scale,
            val_safety,
            val_overrefusal,
        };
        let plan = SelectPlan {
            scales: vec![0.5, 0.75, 1.0],
            max_overrefusal: 0.1,
        };
        let tried = [t(0.5, 0.6, 0.02), t(0.75, 0.9, 0.08), t(1.0, 0.97, 0.3)];
        assert_eq!(plan.choose(&tried), 0.75);
        // A tie in safety goes to the smaller scale.
        let tied = [t(0.5, 0.9, 0.02), t(0.75, 0.9, 0.05), t(1.0, 0.97, 0.3)];
        assert_eq!(plan.choose(&tied), 0.5);
        // Nothing within the bound: the least over-refusal.
        let none = [t(0.5, 0.6, 0.2), t(0.75, 0.9, 0.15), t(1.0, 0.97, 0.3)];
        assert_eq!(plan.choose(&none), 0.75);
        // Off by default, so a preset's config (and its manifest) is unchanged.
        assert!(AlignConfig::preset(PresetArg::Quick).select.is_off());
        let text = toml::to_string(&AlignConfig::preset(PresetArg::Default)).unwrap();
        assert!(!text.contains("select"), "{text}");
    }

    #[test]
    fn a_stage_starts_afresh_only_when_its_inputs_or_config_changed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            root: dir.path().to_path_buf(),
        };
        let input = dir.path().join("input.txt");
        std::fs::write(&input, "a").unwrap();
        let plan = |k: u32| StagePlan {
            name: "stage",
            inputs: vec![input.clone()],
            config: serde_json::json!({ "k": k }),
            outputs: vec![PathBuf::from("out.txt")],
        };
        let mut runner = Runner {
            run: &layout,
            manifest: RunManifest::new(serde_json::json!({}), Default::default()),
            force: false,
            timings: Vec::new(),
        };
        let mut starts = Vec::new();
        let run = |runner: &mut Runner, k: u32, starts: &mut Vec<bool>| {
            runner
                .stage(plan(k), |fresh| {
                    starts.push(fresh);
                    std::fs::write(dir.path().join("out.txt"), format!("{k}"))?;
                    Ok(())
                })
                .unwrap()
        };
        run(&mut runner, 1, &mut starts); // first run: resume whatever is there
        run(&mut runner, 1, &mut starts); // up to date: not called
        std::fs::write(dir.path().join("out.txt"), "edited").unwrap();
        run(&mut runner, 1, &mut starts); // outputs edited: rerun over them
        run(&mut runner, 2, &mut starts); // config changed: afresh
        assert_eq!(starts, vec![false, false, true]);
    }
    use clap::Parser;

    #[derive(Parser)]
    struct A {
        #[command(flatten)]
        a: AlignArgs,
    }

    #[test]
    fn presets_round_trip_through_toml_and_a_config_file_overrides_them() {
        for p in [
            PresetArg::Quick,
            PresetArg::Default,
            PresetArg::Iterate,
            PresetArg::Gemma2_9b,
        ] {
            let cfg = AlignConfig::preset(p);
            let text = toml::to_string(&cfg).unwrap();
            let back: AlignConfig = toml::from_str(&text).unwrap();
            assert_eq!(back, cfg, "{p:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "feature_prompts = 10\n[train]\nmax_steps = 7\n").unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        let cfg = a.resolve().unwrap();
        assert_eq!(cfg.train.max_steps, 7);
        assert_eq!(cfg.feature_prompts, Some(10));
        // untouched keys keep the preset's values
        assert_eq!(
            cfg.train.lr_peak,
            AlignConfig::preset(PresetArg::Quick).train.lr_peak
        );
        assert!(cfg.gate.is_some(), "the quick preset gates its adapter");
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap(), "--no-gate"])
            .unwrap()
            .a;
        assert_eq!(a.resolve().unwrap().gate, None);
        std::fs::write(
            &file,
            "[gate]\nscore = \"feature\"\nmax_overrefusal = 0.2\n",
        )
        .unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        let e = format!("{:#}", a.resolve().unwrap_err());
        assert!(e.contains("feature"), "an unknown score is named: {e}");
        std::fs::write(&file, "[gate]\nscore = \"direct\"\nmax_overrefusal = 1.5\n").unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        let e = a.resolve().unwrap_err().to_string();
        assert!(e.contains("[gate]"), "{e}");
        std::fs::write(&file, "[train]\nmax_stepz = 7\n").unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        assert!(a.resolve().is_err(), "unknown keys are errors");
        // One rank: a subspace and an adapter of different widths are refused at once.
        std::fs::write(&file, "[lora]\nrank = 8\n").unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        let e = a.resolve().unwrap_err().to_string();
        assert!(
            e.contains("[subspace] rank = 16 but [lora] rank = 8"),
            "{e}"
        );
        std::fs::write(&file, "[lora]\nrank = 8\n[subspace]\nrank = 8\n").unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        assert_eq!(a.resolve().unwrap().lora.rank, 8);
        // An enum's other variant replaces the preset's, where a merge would hold both.
        std::fs::write(&file, "[data]\nharmless = { exactly = 303 }\n").unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        assert_eq!(
            a.resolve().unwrap().data.harmless,
            HarmlessCount::Exactly(303)
        );
    }

    #[test]
    fn dpo_settings_pass_through_and_add_the_pairs_to_the_training_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "[data]\npreference_pairs = true\n[train]\ndpo_weight = 1.0\ndpo_beta = 0.2\n",
        )
        .unwrap();
        let cfg = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a
            .resolve()
            .unwrap();
        assert!(cfg.data.preference_pairs);
        assert_eq!((cfg.train.dpo_weight, cfg.train.dpo_beta), (1.0, 0.2));
        let (_, inputs) = train_data(Path::new("d"), &cfg.train);
        assert!(inputs.contains(&PathBuf::from("d/pairs.jsonl")));
        let quick = AlignConfig::preset(PresetArg::Quick);
        let (_, inputs) = train_data(Path::new("d"), &quick.train);
        assert_eq!(inputs.len(), 2, "{inputs:?}");
    }

    #[test]
    fn the_iteration_preset_is_the_default_shortened_and_judged_on_validation_only() {
        let default = AlignConfig::preset(PresetArg::Default);
        let iterate = AlignConfig::preset(PresetArg::Iterate);
        assert_eq!(iterate.train.max_steps, 100);
        assert_eq!(iterate.select.scales, [1.0]);
        assert_eq!(PresetArg::Iterate.last_stage(), Some("select"));
        assert_eq!(PresetArg::Default.last_stage(), None);
        // Everything else is the default preset's, so its choices carry over.
        let same = AlignConfig {
            preset: PresetArg::Default,
            train: default.train.clone(),
            select: SelectPlan::default(),
            ..iterate.clone()
        };
        assert_eq!(same, default);
        // A configuration tried with it keeps the shortening.
        let cfg = config_over_preset(iterate, "[data]\nmany_shot = 44\n", Path::new("x")).unwrap();
        assert_eq!((cfg.data.many_shot, cfg.train.max_steps), (44, 100));
    }

    #[test]
    fn your_suites_in_a_config_are_evaluated_and_kept_out_of_the_training_stages() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "[eval]\nharmful_file = \"red.jsonl\"\nbenign_file = \"ok.csv\"\nprompt_column = \"q\"\n",
        )
        .unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        let e = a.resolve().unwrap().eval;
        assert_eq!(
            e.user_files(),
            [PathBuf::from("red.jsonl"), PathBuf::from("ok.csv")]
        );
        assert_eq!(
            e.keep_out_flags(),
            [
                "--eval-harmful",
                "red.jsonl",
                "--eval-benign",
                "ok.csv",
                "--eval-prompt-column",
                "q"
            ]
        );
        let all = eval_args("default", Path::new("o"), &e, "all", None);
        assert!(
            all.windows(2).any(|w| w == ["--harmful", "red.jsonl"]),
            "{all:?}"
        );
        assert!(
            all.windows(2).any(|w| w == ["--prompt-column", "q"]),
            "{all:?}"
        );
        // Validation is for model selection: the user's suites are not judged there.
        let val = eval_args("default", Path::new("o"), &e, "validation", None);
        assert!(
            !val.iter().any(|f| f == "--harmful" || f == "--benign"),
            "{val:?}"
        );
        // Without them a preset's config serialises as before (old manifests stay up to date).
        let text = serde_json::to_string(&AlignConfig::preset(PresetArg::Default).eval).unwrap();
        assert_eq!(
            text,
            r#"{"limit":null,"max_new_tokens":64,"batch_size":16}"#
        );
    }

    #[test]
    fn the_attack_suite_in_a_config_joins_the_evaluations_not_validation() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "[eval]\nattacks = true\n").unwrap();
        let a = A::try_parse_from(["x", "--config", file.to_str().unwrap()])
            .unwrap()
            .a;
        let e = a.resolve().unwrap().eval;
        assert!(e.attacks);
        let all = eval_args("default", Path::new("o"), &e, "all", None);
        let suites: Vec<&str> = all
            .windows(2)
            .filter(|w| w[0] == "--suite")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(suites, ["all", "attacks"]);
        let val = eval_args("default", Path::new("o"), &e, "validation", None);
        assert!(!val.iter().any(|f| f == "attacks"), "{val:?}");
        // A changed plan is a changed stage: the evaluations run again with the attacks.
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.contains("\"attacks\":true"), "{text}");
    }

    #[test]
    fn gemma_preset_needs_saes() {
        let a = A::try_parse_from(["x", "--preset", "gemma-2-9b"])
            .unwrap()
            .a;
        assert!(a.resolve().unwrap_err().to_string().contains("Gemma Scope"));
        let a = A::try_parse_from(["x", "--preset", "gemma-2-9b", "--sae", "p.npz@out:20"])
            .unwrap()
            .a;
        assert!(matches!(a.resolve().unwrap().sae, SaePlan::Load { .. }));
    }

    /// Every `--config` file the fuzzer kept (`fuzz/corpus/align_config/`) and its seeds, merged
    /// over each preset: accepted or refused, never a panic.
    #[test]
    fn fuzz_corpus_align_configs_replay_without_panics() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut replayed = 0;
        for sub in ["corpus/align_config", "seeds/align_config"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(sub)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let Ok(text) = String::from_utf8(std::fs::read(&path).unwrap()) else {
                    continue;
                };
                for preset in [
                    PresetArg::Quick,
                    PresetArg::Default,
                    PresetArg::Iterate,
                    PresetArg::Gemma2_9b,
                ] {
                    let _ = config_over_preset(AlignConfig::preset(preset), &text, &path);
                }
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no align_config corpus under {fuzz:?}");
    }
}
