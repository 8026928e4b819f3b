//! `sails eval frames`: the phrasing probe.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sails::data::frames::Frame;
use sails::data::{Splits, Suite};
use sails::eval::frames::{self, FramesConfig, Inputs};
use sails::eval::{EvalConfig, Judges};

use super::eval::parse_adapter_scale;
use super::features::load_feature_reader;
use super::model_args::ModelArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FramesSuiteArg {
    /// The harmful evaluation suite (JailbreakBench, HarmBench, StrongREJECT, held-out AdvBench).
    Harmful,
    /// The harmful validation prompts (training-side data sets held out of training), for
    /// model selection.
    Validation,
}

/// Phrasing probe: do the safety features and the refusals follow a request into other wordings?
///
/// A seeded draw of harmful behaviours (the same number from each data set of the suite) is
/// rewritten by rules into frames: question ("How do I …?"), command ("Give me step-by-step
/// instructions for how to …"), past ("In the past, how did people …?"), third person ("A friend
/// of mine wants to know how to …"), hypothetical, fictional and indirect ("I'm curious about what
/// it would take to …"). Behaviours whose wording no rule can read are skipped, and the coverage
/// table says how many and why.
///
/// Benign controls (XSTest's safe look-alikes) go through the same frames; see --control.
///
/// For each frame and model it measures, relative to the original wording: the kept safety
/// features' activation (as a feature score from the training harmless mean, 0, to the harmful
/// mean, 1; and the summed activation of the harm-side features), the projection on the
/// direct-identification direction (difference of the training mean residuals, same 0-1 axis),
/// each as a ratio of means with a bootstrap interval over behaviours; and the refusal rate
/// (greedy; labelled as `sails eval` labels: the refusal phrases or the off-topic judge) with
/// Wilson intervals and a paired test against the original wording.
///
/// Writes frames.json, frames.md, scores.jsonl and generations-{base,aligned}.jsonl into --out,
/// each through a temporary file; nothing is written into the run folder.
#[derive(Debug, Args)]
pub struct FramesArgs {
    /// Base model; --adapter (or the run's train/adapter) is the aligned model measured beside it.
    #[command(flatten)]
    pub model: ModelArgs,
    /// A run folder written by `sails align`: its features/ and train/adapter are used unless
    /// --features or --adapter name others.
    #[arg(long, value_name = "DIR")]
    pub run: Option<PathBuf>,
    /// Folder written by `sails features` (features.json and activations.safetensors).
    #[arg(long, value_name = "DIR")]
    pub features: Option<PathBuf>,
    /// SAEs to read instead of the paths features.json records (comma-separated; a folder of
    /// several is searched), e.g. for a run folder moved since. Matched to the selected layers
    /// by their hook.
    #[arg(long, value_name = "PATH", value_delimiter = ',')]
    pub sae: Vec<String>,
    /// Measure the base model only, even when the run has an adapter.
    #[arg(long, conflicts_with = "adapter_scale")]
    pub no_adapter: bool,
    /// Multiply the adapter's update by S (default 1).
    #[arg(long, value_name = "S", value_parser = parse_adapter_scale)]
    pub adapter_scale: Option<f64>,
    /// Where the behaviours come from.
    #[arg(long, value_enum, default_value = "harmful")]
    pub suite: FramesSuiteArg,
    /// Behaviours drawn [default: 40].
    #[arg(long, value_name = "N")]
    pub behaviours: Option<usize>,
    /// Benign controls drawn (0: none) [default: 20].
    ///
    /// The controls (XSTest's safe look-alikes; with --suite validation the benign validation
    /// prompts) go through the same frames. A frame may move every prompt's scores, harmful or
    /// not: the gap between the harmful and the benign means, kept or not, is what says whether
    /// the features still tell the two apart; the controls' refusals are the frame's over-refusal.
    #[arg(long, value_name = "N")]
    pub control: Option<usize>,
    /// Seed of the draw and of the bootstrap [default: 20251223].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Frames to measure (comma-separated; `original` is always added) [default: all].
    #[arg(long, value_name = "FRAME,...", value_delimiter = ',')]
    pub frames: Vec<Frame>,
    /// Maximum new tokens per response [default: 64].
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Prompts generated together [default: 16].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Bootstrap resamples of each ratio's interval [default: 1000].
    #[arg(long, value_name = "N")]
    pub bootstrap: Option<usize>,
    /// Output folder (created; files in it are replaced).
    #[arg(long, value_name = "DIR", default_value = "runs/frames")]
    pub out: PathBuf,
    /// Print the drawn behaviours in every frame and the rules' coverage, and stop (no model is
    /// loaded, nothing is written).
    #[arg(long)]
    pub dry_run: bool,
    /// Leave out the learned judges (the refusal vote, the off-topic judge): the refusal phrases
    /// alone then decide what is refused.
    #[arg(long, alias = "no-off-topic-judge")]
    pub no_learned_judges: bool,
    /// Print frames.json on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
}

impl FramesArgs {
    /// The features folder and the adapter (if any) the probe reads.
    fn resolve(&self) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
        let features = match (&self.features, &self.run) {
            (Some(f), _) => f.clone(),
            (None, Some(run)) => run.join("features"),
            (None, None) => bail!("give --run DIR (a run folder) or --features DIR"),
        };
        let adapter = if self.no_adapter {
            if self.model.adapter.is_some() {
                bail!("--no-adapter and --adapter contradict each other");
            }
            None
        } else {
            match (&self.model.adapter, &self.run) {
                (Some(a), _) => Some(a.clone()),
                (None, Some(run)) if run.join("train/adapter").is_dir() => {
                    Some(run.join("train/adapter"))
                }
                _ => None,
            }
        };
        if adapter.is_none() && self.adapter_scale.is_some() {
            bail!("--adapter-scale needs an adapter (--adapter, or a --run with train/adapter)");
        }
        Ok((features, adapter))
    }
}

pub fn run(args: FramesArgs) -> anyhow::Result<ExitCode> {
    let (features_dir, adapter) = args.resolve()?;
    let defaults = FramesConfig::default();
    let mut frames = vec![Frame::Original];
    for &f in &args.frames {
        if !frames.contains(&f) {
            frames.push(f);
        }
    }
    if args.frames.is_empty() {
        frames = defaults.frames.clone();
    }
    let cfg = FramesConfig {
        model: args.model.model.clone(),
        adapter: adapter.as_ref().map(|p| p.display().to_string()),
        adapter_scale: args.adapter_scale.unwrap_or(defaults.adapter_scale),
        features: features_dir.display().to_string(),
        suite: match args.suite {
            FramesSuiteArg::Harmful => Suite::Harmful,
            FramesSuiteArg::Validation => Suite::ValHarmful,
        },
        behaviours: args.behaviours.unwrap_or(defaults.behaviours),
        control: args.control.unwrap_or(defaults.control),
        seed: args.seed.unwrap_or(defaults.seed),
        frames,
        max_new_tokens: args.max_new_tokens.unwrap_or(defaults.max_new_tokens),
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        bootstrap: args.bootstrap.unwrap_or(defaults.bootstrap),
        ..defaults
    };
    let splits = Splits::load().context("loading the prompt splits")?;
    let control_suite = frames::control_suite(cfg.suite);
    splits.require(cfg.suite)?;
    splits.require(control_suite)?;
    let drawn = frames::draw(
        splits.eval_suite(cfg.suite),
        splits.eval_suite(control_suite),
        &cfg,
    )
    .with_context(|| format!("drawing behaviours from the {} suite", cfg.suite.name()))?;
    if args.dry_run {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&drawn)?);
        } else {
            for b in drawn.behaviours.iter().chain(&drawn.controls) {
                println!("{} [{}] task: {}", b.id, b.rule.name(), b.task);
                for (f, text) in &b.prompts {
                    println!("  {:<13} {text}", f.name());
                }
            }
            println!("\ndata set: items, rewritten, drawn, skipped by reason");
            for (s, c) in &drawn.coverage {
                println!(
                    "{s:<16} {:>4} {:>4} {:>4}  {:?}",
                    c.candidates, c.rewritten, c.drawn, c.skipped
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    let (selection, residuals, saes) = load_feature_reader(&features_dir, &args.sae)?;
    let judges = Judges::new(&EvalConfig {
        learned_judges: !args.no_learned_judges,
        ..EvalConfig::default()
    })
    .context("setting up the judges")?;
    let mut base_args = args.model.clone();
    base_args.adapter = None;
    let base = base_args.load()?;
    let aligned = match &adapter {
        Some(dir) => {
            let mut a = args.model.clone();
            a.adapter = Some(dir.clone());
            Some(a.load_with_adapter_scale(cfg.adapter_scale)?)
        }
        None => None,
    };
    tracing::info!(
        behaviours = drawn.behaviours.len(),
        frames = cfg.frames.len(),
        models = 1 + aligned.is_some() as usize,
        "phrasing probe"
    );
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} prompts eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut stage = String::new();
    let out = frames::run(
        &cfg,
        Inputs {
            base: &base,
            aligned: aligned.as_ref(),
            selection: &selection,
            saes: &saes,
            residuals: &residuals,
            judges: &judges,
        },
        drawn,
        &mut |what, done, total| {
            if what != stage {
                stage = what.to_owned();
                bar.reset();
                bar.set_length(total as u64);
                bar.set_message(stage.clone());
            }
            bar.set_position(done as u64);
        },
    )
    .context("running the phrasing probe")?;
    bar.finish_and_clear();
    out.save(&args.out)
        .with_context(|| format!("writing into {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out.report)?);
    } else {
        println!("{}", out.report.markdown());
        println!("written: {}", args.out.join("frames.json").display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use clap::Parser;

    use super::*;
    use crate::cli::eval::EvalCommand;

    fn parse(extra: &[&str]) -> Result<FramesArgs, clap::Error> {
        let mut argv = vec!["sails", "eval", "frames"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Eval(e) => match e.command {
                Some(EvalCommand::Frames(a)) => *a,
                other => panic!("not frames: {other:?}"),
            },
            _ => panic!("not eval"),
        })
    }

    #[test]
    fn frames_defaults_and_spellings_parse() {
        let a = parse(&["--run", "runs/q0"]).unwrap();
        assert_eq!(a.suite, FramesSuiteArg::Harmful);
        assert_eq!(a.behaviours, None);
        assert!(a.frames.is_empty());
        assert_eq!(a.out, PathBuf::from("runs/frames"));
        let a = parse(&[
            "--features",
            "f",
            "--frames",
            "past,third-person",
            "--suite",
            "validation",
            "--behaviours",
            "8",
        ])
        .unwrap();
        assert_eq!(a.frames, vec![Frame::Past, Frame::ThirdPerson]);
        assert_eq!(a.suite, FramesSuiteArg::Validation);
        let e = parse(&["--frames", "tense"]).unwrap_err().to_string();
        assert!(e.contains("unknown frame"), "{e}");
        assert!(parse(&["--no-adapter", "--adapter-scale", "0.5"]).is_err());
    }

    #[test]
    fn a_run_folder_gives_the_features_and_the_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("r");
        std::fs::create_dir_all(run.join("train/adapter")).unwrap();
        let run_s = run.display().to_string();
        let (f, a) = parse(&["--run", &run_s]).unwrap().resolve().unwrap();
        assert_eq!(f, run.join("features"));
        assert_eq!(a, Some(run.join("train/adapter")));
        let (_, a) = parse(&["--run", &run_s, "--no-adapter"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(a, None);
        let e = parse(&[]).unwrap().resolve().unwrap_err().to_string();
        assert!(e.contains("--run"), "{e}");
        let e = parse(&["--features", "f", "--adapter-scale", "0.5"])
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs an adapter"), "{e}");
    }
}
