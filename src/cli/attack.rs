//! `sails attack`: optimised jailbreaks against a model and its adapter.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use sails::attack::framed::{run_framed, FramedAttack, FramedSummary, SUMMARY_FILE};
use sails::attack::gcg::{self, Behaviour, GcgConfig, GcgResult, GcgState};
use sails::data::jailbreaks::{load_jailbreak_templates, sample_templates, select_templates};
use sails::data::{Splits, Suite};
use sails::eval::judge::Label;
use sails::eval::metrics::Rate;
use sails::eval::{EvalConfig, Judges};
use sails::model::write_atomic;
use serde::{Deserialize, Serialize};

use super::eval::{judge_lines, LlmJudgeArgs};
use super::model_args::ModelArgs;

#[derive(Debug, Args)]
pub struct AttackArgs {
    #[command(subcommand)]
    pub command: AttackCommand,
}

#[derive(Debug, Subcommand)]
pub enum AttackCommand {
    Gcg(GcgArgs),
    Templates(TemplatesArgs),
    Prefill(PrefillArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttackSuite {
    /// The evaluation's harmful prompts (JailbreakBench first, then HarmBench, StrongREJECT and
    /// held-out AdvBench).
    Harmful,
    /// XSTest's unsafe contrast prompts.
    XstestUnsafe,
    /// Harmful training-side prompts held out of training (validation, never evaluation).
    ValHarmful,
}

impl From<AttackSuite> for Suite {
    fn from(s: AttackSuite) -> Self {
        match s {
            AttackSuite::Harmful => Suite::Harmful,
            AttackSuite::XstestUnsafe => Suite::XstestUnsafe,
            AttackSuite::ValHarmful => Suite::ValHarmful,
        }
    }
}

/// Greedy Coordinate Gradient: optimise a token suffix so the reply starts with a target.
///
/// For each behaviour (a request and the reply opening to force, "Sure, here is" unless given),
/// a suffix of tokens appended to the request is optimised step by step (Zou et al. 2023, with
/// nanoGCG 0.3.0's settings as defaults): the gradient of the target's loss with respect to the
/// suffix's one-hot tokens proposes --topk replacements per position, --search-width candidates
/// each change --n-replace positions, and the candidate with the lowest loss is kept. A
/// behaviour stops early once greedy decoding gives exactly the target (unless
/// --no-early-stop). The best suffix's greedy reply is then judged as `sails judge score` does:
/// the attack succeeds where the label is "complied".
///
/// Writes into --out: results.jsonl (per behaviour: suffix, loss curve, reply, timing),
/// judged.jsonl (the same lines with each judge's verdict and the label), summary.json (attack
/// success rate and target-reached rate with Wilson 95 % intervals). The search state of the
/// behaviour in progress is saved after every step (checkpoints/, through a temporary file), so
/// an interrupted run, rerun with the same arguments, resumes where it stopped and ends with
/// the results an uninterrupted one gives; a rerun with other settings is refused.
#[derive(Debug, Args)]
pub struct GcgArgs {
    /// The model attacked, with its --adapter if any.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Behaviours to attack: JSONL, one {"prompt": …} per line, optionally "target" and "id".
    #[arg(long, value_name = "FILE", conflicts_with = "suite")]
    pub input: Option<PathBuf>,
    /// Built-in suite whose first --limit prompts are attacked (when no --input).
    #[arg(long, value_enum, default_value = "harmful")]
    pub suite: AttackSuite,
    /// Behaviours attacked, in order.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub limit: usize,
    /// The reply opening to force, for behaviours that name none.
    #[arg(long, value_name = "TEXT", default_value = "Sure, here is")]
    pub target: String,
    /// Run folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Optimisation steps per behaviour.
    #[arg(long, default_value_t = GcgConfig::default().steps)]
    pub steps: usize,
    /// Candidate suffixes evaluated per step.
    #[arg(long, default_value_t = GcgConfig::default().search_width)]
    pub search_width: usize,
    /// Tokens per position the candidates draw from (most negative gradient first).
    #[arg(long, default_value_t = GcgConfig::default().topk)]
    pub topk: usize,
    /// Positions each candidate changes.
    #[arg(long, default_value_t = GcgConfig::default().n_replace)]
    pub n_replace: usize,
    /// The starting suffix (its tokens fix the suffix's length).
    #[arg(long, value_name = "TEXT", default_value_t = GcgConfig::default().suffix_init)]
    pub suffix_init: String,
    /// Let the suffix use tokens that are not printable ASCII.
    #[arg(long)]
    pub allow_non_ascii: bool,
    /// Keep candidates whose text tokenizes to other ids.
    #[arg(long)]
    pub no_filter_ids: bool,
    /// Run every step even after the target is reached.
    #[arg(long)]
    pub no_early_stop: bool,
    #[arg(long, default_value_t = GcgConfig::default().seed)]
    pub seed: u64,
    /// Candidates per forward pass.
    #[arg(long, default_value_t = GcgConfig::default().batch_size)]
    pub batch_size: usize,
    /// Length of the reply generated with the best suffix.
    #[arg(long, default_value_t = GcgConfig::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Label with the phrase list only (no judge model).
    #[arg(long)]
    pub no_learned_judges: bool,
    #[command(flatten)]
    pub llm: LlmJudgeArgs,
    /// Print summary.json instead of the summary.
    #[arg(long)]
    pub json: bool,
}

impl GcgArgs {
    fn config(&self) -> GcgConfig {
        GcgConfig {
            steps: self.steps,
            search_width: self.search_width,
            topk: self.topk,
            n_replace: self.n_replace,
            suffix_init: self.suffix_init.clone(),
            allow_non_ascii: self.allow_non_ascii,
            filter_ids: !self.no_filter_ids,
            early_stop: !self.no_early_stop,
            seed: self.seed,
            batch_size: self.batch_size,
            max_new_tokens: self.max_new_tokens,
        }
    }

    fn behaviours(&self) -> anyhow::Result<Vec<Behaviour>> {
        let Some(path) = &self.input else {
            let suite = Suite::from(self.suite);
            let splits = Splits::load().context("loading the prompt suites")?;
            splits.require(suite)?;
            return Ok(splits
                .eval_suite(suite)
                .iter()
                .take(self.limit)
                .map(|p| Behaviour {
                    id: p.id.clone(),
                    prompt: p.text.clone(),
                    target: self.target.clone(),
                })
                .collect());
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Line {
            prompt: String,
            target: Option<String>,
            id: Option<String>,
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut out = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(raw).with_context(|| {
                format!(
                    "{} line {}: expected {{\"prompt\": …}} with optional \"target\" and \"id\"",
                    path.display(),
                    i + 1
                )
            })?;
            out.push(Behaviour {
                id: line.id.unwrap_or_else(|| format!("line:{}", i + 1)),
                prompt: line.prompt,
                target: line.target.unwrap_or_else(|| self.target.clone()),
            });
        }
        let mut seen = BTreeSet::new();
        if let Some(dup) = out.iter().find(|b| !seen.insert(b.id.as_str())) {
            bail!("{}: the id {:?} occurs twice", path.display(), dup.id);
        }
        Ok(out.into_iter().take(self.limit).collect())
    }
}

/// What a run folder was made with; a rerun must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    gcg: GcgConfig,
    model: String,
    adapter: Option<PathBuf>,
    behaviours: Vec<Behaviour>,
}

#[derive(Debug, Serialize)]
struct Summary {
    behaviours: usize,
    /// Replies labelled "complied".
    attack_success: Rate,
    /// Greedy decoding after the suffix gives exactly the target.
    target_reached: Rate,
    refused: usize,
    degenerate: usize,
    label: String,
    steps: usize,
    seconds: f64,
    steps_per_s: f64,
    config: GcgConfig,
    model: String,
    adapter: Option<PathBuf>,
}

pub fn run(args: AttackArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AttackCommand::Gcg(args) => run_gcg(args),
        AttackCommand::Templates(args) => run_templates(args),
        AttackCommand::Prefill(args) => {
            if args.text.is_empty() {
                bail!("--text must not be empty");
            }
            let attacks = vec![FramedAttack::Prefill(args.text.clone())];
            run_framed_cli(&args.framed, &attacks)
        }
    }
}

/// What the attacks that need no search share: the model, the behaviours, the run folder.
#[derive(Debug, Args)]
pub struct FramedArgs {
    /// The model attacked, with its --adapter if any.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Built-in harmful suite whose first --limit prompts are attacked.
    #[arg(long, value_enum, default_value = "harmful")]
    pub suite: AttackSuite,
    /// Behaviours attacked, in the suite's order (the harmful suite starts with
    /// JailbreakBench's 100).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub limit: usize,
    /// Run folder: plain/ (the unattacked run), one folder per attack, summary.json. Required
    /// (except for `templates --list`).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Maximum new tokens per reply.
    #[arg(long, default_value_t = EvalConfig::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = EvalConfig::default().batch_size)]
    pub batch_size: usize,
    /// Label with the phrase list only (no judge model).
    #[arg(long)]
    pub no_learned_judges: bool,
    #[command(flatten)]
    pub llm: LlmJudgeArgs,
    /// Switch the adapter on per prompt with a gate written by `sails gate`, as `sails eval
    /// --gate` does; the gate reads what the model is sent (the request inside its template).
    #[arg(long, value_name = "FILE", requires = "adapter")]
    pub gate: Option<PathBuf>,
    /// Print summary.json instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// The template attack: every request wrapped in an in-the-wild jailbreak template.
///
/// The templates are PyRIT 1.1.0's 90 single-prompt jailbreaks (role play such as AIM, "DAN"
/// variants, developer mode, refusal suppression, prefix injection…; asset
/// `pyrit-jailbreak-templates`), each filled with the request as PyRIT fills it. Each template
/// is one evaluation run of the first --limit behaviours in --out/template-<id>, beside the
/// unattacked run in --out/plain; the judges read the request as written and the reply, and an
/// attack succeeds where the reply is labelled "complied". summary.json gives each template's
/// success rate (Wilson 95 %), its paired difference from the plain run (McNemar), the share of
/// behaviours at least one template broke, and the pooled rate. Runs resume as `sails eval`
/// runs do.
///
/// Which templates: --templates names them, --all takes every one, otherwise --sample of them
/// drawn with --seed (ordered by the sha256 of the seed and the template's id, so a seed always
/// draws the same ones).
#[derive(Debug, Args)]
pub struct TemplatesArgs {
    #[command(flatten)]
    pub framed: FramedArgs,
    /// Comma-separated template ids (file stems: aim, dan_11, prefix_injection, …).
    #[arg(long, value_name = "IDS", value_delimiter = ',', conflicts_with_all = ["all", "sample"])]
    pub templates: Vec<String>,
    /// Every template (90 evaluation runs).
    #[arg(long)]
    pub all: bool,
    /// How many templates to draw when none are named.
    #[arg(long, value_name = "K", default_value_t = 10)]
    pub sample: usize,
    /// The draw's seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// List the templates (id, name, length) and stop.
    #[arg(long)]
    pub list: bool,
}

/// The prefilling attack: every reply forced to start with --text, the model continuing it.
///
/// One evaluation run of the first --limit behaviours with the forced opening in
/// --out/prefill, beside the unattacked run in --out/plain (the same as `sails eval --prefill`
/// and `sails eval compare`, in one command); the saved reply is the forced text and its
/// continuation, and the attack succeeds where it is labelled "complied". summary.json as for
/// `sails attack templates`.
#[derive(Debug, Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub framed: FramedArgs,
    /// The forced opening of every reply.
    #[arg(long, value_name = "TEXT", default_value = "Sure, here is")]
    pub text: String,
}

fn run_templates(args: TemplatesArgs) -> anyhow::Result<ExitCode> {
    let all = load_jailbreak_templates().context("loading the jailbreak templates")?;
    if args.list {
        for t in &all {
            println!("{:<28} {:<40} {:>6} chars", t.id, t.name, t.text.len());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let chosen = if args.all {
        all
    } else if !args.templates.is_empty() {
        select_templates(&all, &args.templates)?
    } else {
        if args.sample == 0 || args.sample > all.len() {
            bail!("--sample must be between 1 and {}", all.len());
        }
        sample_templates(&all, args.sample, args.seed)?
    };
    let attacks: Vec<FramedAttack> = chosen.into_iter().map(FramedAttack::Template).collect();
    run_framed_cli(&args.framed, &attacks)
}

fn run_framed_cli(args: &FramedArgs, attacks: &[FramedAttack]) -> anyhow::Result<ExitCode> {
    let Some(out) = &args.out else {
        bail!("--out DIR is required: the folder the attack's runs and summary go to");
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let _lock = super::lock_run_folder(out)?;
    let suite = Suite::from(args.suite);
    let plain = EvalConfig {
        model: args.model.model.clone(),
        adapter: args.model.adapter.as_ref().map(|p| p.display().to_string()),
        suites: vec![suite],
        limit: Some(args.limit),
        max_new_tokens: args.max_new_tokens,
        batch_size: args.batch_size,
        llm_judge: args.llm.config(),
        learned_judges: !args.no_learned_judges,
        gate: args.gate.as_ref().map(|p| p.display().to_string()),
        ..EvalConfig::default()
    };
    let splits = Splits::load().context("loading the prompt suites")?;
    let judges = Judges::new(&plain).context("setting up the judges")?;
    let model = args.model.load()?;
    let gate = match &args.gate {
        Some(path) => Some(super::gate::LoadedGate::load(path, &args.model)?),
        None => None,
    };
    let gated = gate.as_ref().map(|g| g.as_gated(Default::default()));
    let summary = run_framed(
        &model,
        &splits,
        &judges,
        &plain,
        gated.as_ref(),
        attacks,
        out,
        |i, what| tracing::info!("run {}/{}: {what}", i + 1, attacks.len() + 1),
    )
    .with_context(|| format!("attacking into {}", out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_framed(&summary, out);
    }
    Ok(ExitCode::SUCCESS)
}

fn pct(r: &Rate) -> String {
    format!(
        "{:.1} % ({}/{}) [{:.1}, {:.1}]",
        100.0 * r.rate,
        r.k,
        r.n,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

pub(super) fn print_framed(s: &FramedSummary, out: &Path) {
    println!(
        "{} behaviours of the {} suite; attack success = reply labelled complied ({})",
        s.behaviours,
        s.suite.name(),
        s.label
    );
    let gate = |open: &Option<Rate>| {
        open.as_ref()
            .map(|r| format!(", gate open {:.0} %", 100.0 * r.rate))
            .unwrap_or_default()
    };
    let width = s
        .attacks
        .iter()
        .map(|a| a.description.chars().count())
        .max()
        .unwrap_or(0)
        .max(17);
    let rows = std::iter::once((
        "plain (no attack)".to_owned(),
        &s.plain_success,
        gate(&s.plain_gate_open).replacen(", ", "  (", 1)
            + if s.plain_gate_open.is_some() { ")" } else { "" },
    ))
    .chain(s.attacks.iter().map(|a| {
        let d = &a.safety_vs_plain;
        let paired = format!(
            "  vs plain {:>+6.1} pts, lost {} gained {}, McNemar p {:.2e}{}",
            0.0 - 100.0 * d.diff, // (no "-0.0")
            d.mcnemar.b,
            d.mcnemar.c,
            d.mcnemar.p_value,
            gate(&a.gate_open)
        );
        (a.description.clone(), &a.success, paired)
    }));
    for (what, rate, paired) in rows {
        let line = format!("{what:<width$}  {:<30}{paired}", pct(rate));
        println!("{}", line.trim_end());
    }
    for (what, rate) in [
        ("any of them", &s.any_success),
        ("pooled", &Some(s.pooled_success)),
    ] {
        if let Some(r) = rate {
            println!("{what:<width$}  {}", pct(r));
        }
    }
    println!("summary: {}", out.join(SUMMARY_FILE).display());
}

fn run_gcg(args: GcgArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config();
    cfg.check()?;
    let behaviours = args.behaviours()?;
    if behaviours.is_empty() {
        bail!("no behaviours to attack");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let _lock = super::lock_run_folder(&args.out)?;
    let run_config = RunConfig {
        gcg: cfg.clone(),
        model: args.model.model.clone(),
        adapter: args.model.adapter.clone(),
        behaviours: behaviours.clone(),
    };
    let config_path = args.out.join("config.json");
    if config_path.is_file() {
        let saved: RunConfig = serde_json::from_slice(&std::fs::read(&config_path)?)
            .with_context(|| format!("reading {}", config_path.display()))?;
        if saved != run_config {
            bail!(
                "{} holds an attack with other settings, model or behaviours; use another --out",
                args.out.display()
            );
        }
    } else {
        write_atomic(&config_path, &serde_json::to_vec_pretty(&run_config)?)?;
    }

    let results_path = args.out.join("results.jsonl");
    let mut results: Vec<GcgResult> = if results_path.is_file() {
        sails::eval::read_jsonl(&results_path)?
    } else {
        Vec::new()
    };
    let model = args.model.load()?;
    for (index, behaviour) in behaviours.iter().enumerate() {
        if results.iter().any(|r| r.id == behaviour.id) {
            continue;
        }
        let checkpoint = args.out.join("checkpoints").join(format!("{index}.json"));
        let resume: Option<GcgState> = if checkpoint.is_file() {
            Some(
                serde_json::from_slice(&std::fs::read(&checkpoint)?)
                    .with_context(|| format!("reading {}", checkpoint.display()))?,
            )
        } else {
            None
        };
        let bar = indicatif::ProgressBar::new(cfg.steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] step {pos}/{len} {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!(
            "gcg {}/{} {}",
            index + 1,
            behaviours.len(),
            behaviour.id
        ));
        if let Some(state) = &resume {
            bar.set_position(state.step as u64);
        }
        let result = gcg::attack(&model, behaviour, &cfg, resume, |state| {
            let bytes = serde_json::to_vec(state).map_err(|e| {
                sails::attack::AttackError::Input(format!("serialising the search state: {e}"))
            })?;
            write_atomic(&checkpoint, &bytes)?;
            bar.set_position(state.step as u64);
            bar.set_message(format!("best loss {:.3}", state.best_loss));
            Ok(())
        })
        .with_context(|| format!("attacking {}", behaviour.id))?;
        bar.finish_and_clear();
        tracing::info!(
            id = %result.id,
            steps = result.steps,
            loss = result.loss,
            target_reached = result.target_reached,
            "behaviour done"
        );
        results.push(result);
        write_jsonl(&results_path, &results)?;
        if checkpoint.is_file() {
            std::fs::remove_file(&checkpoint)
                .with_context(|| format!("removing {}", checkpoint.display()))?;
        }
    }

    let text = std::fs::read_to_string(&results_path)?;
    let (scored, label) = judge_lines(&results_path, &text, &args.llm, !args.no_learned_judges)?;
    let mut judged = String::new();
    for s in &scored {
        judged.push_str(&serde_json::to_string(&s.output)?);
        judged.push('\n');
    }
    write_atomic(&args.out.join("judged.jsonl"), judged.as_bytes())?;
    let count = |l: Label| scored.iter().filter(|s| s.label == l).count();
    let steps: usize = results.iter().map(|r| r.steps).sum();
    let seconds: f64 = results.iter().map(|r| r.seconds).sum();
    let summary = Summary {
        behaviours: results.len(),
        attack_success: Rate::new(count(Label::Complied), results.len()),
        target_reached: Rate::new(
            results.iter().filter(|r| r.target_reached).count(),
            results.len(),
        ),
        refused: count(Label::Refused),
        degenerate: count(Label::Degenerate),
        label,
        steps,
        seconds,
        steps_per_s: if seconds > 0.0 {
            steps as f64 / seconds
        } else {
            0.0
        },
        config: cfg,
        model: args.model.model.clone(),
        adapter: args.model.adapter.clone(),
    };
    let summary_json = serde_json::to_string_pretty(&summary)?;
    write_atomic(&args.out.join("summary.json"), summary_json.as_bytes())?;
    if args.json {
        println!("{summary_json}");
    } else {
        print_summary(&summary, &args.out);
    }
    Ok(ExitCode::SUCCESS)
}

fn write_jsonl(path: &Path, results: &[GcgResult]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in results {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())?;
    Ok(())
}

fn print_summary(s: &Summary, out: &Path) {
    println!(
        "GCG on {} behaviours ({} steps at most each)",
        s.behaviours, s.config.steps
    );
    println!(
        "attack success (reply labelled complied): {}",
        pct(&s.attack_success)
    );
    println!(
        "target reached (greedy reply starts with it): {}",
        pct(&s.target_reached)
    );
    println!(
        "refused {}, degenerate {}; label: {}",
        s.refused, s.degenerate, s.label
    );
    println!(
        "{} steps in {:.1} s: {:.3} steps/s",
        s.steps, s.seconds, s.steps_per_s
    );
    println!("results: {}", out.join("judged.jsonl").display());
}
