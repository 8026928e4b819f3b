//! `sails gate`: fit the threshold that switches an adapter on per prompt.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sails::data::{Splits, Suite};
use sails::eval::judge::Label;
use sails::eval::{read_jsonl, GenerationRecord};
use sails::features::gate::{self, Gate, GateRow, GateScore};
use sails::features::{PromptScorer, SELECTION_FILE};

use super::features::load_feature_reader;
use super::model_args::ModelArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GateScoreArg {
    /// The kept safety features' shift (0 at the training harmless mean, 1 at the harmful one).
    Features,
    /// The projection on the direct-identification direction (same axis).
    Direct,
}

/// Fit a gate that switches an adapter on only for prompts the safety features call harmful.
///
/// The base model reads every validation prompt (`sails eval --suite validation` wrote them,
/// with the base model into --base-validation and with the adapter into --adapter-validation)
/// on the kept features of --features. Under a gate at threshold t a prompt scoring at least t
/// gets the adapter's saved response and any other the base model's, so the gated model's
/// validation safety and over-refusal are known exactly for every t without generating again.
/// The threshold chosen is the one with the highest validation safety whose validation
/// over-refusal is at most --max-overrefusal (the rule `align` uses for the adapter's scale).
///
/// Writes the gate (JSON, through a temporary file) to --out; `sails eval --adapter DIR --gate
/// FILE` evaluates the gated model.
#[derive(Debug, Args)]
pub struct GateArgs {
    /// The base model (any --adapter is ignored: the gate reads prompts with the base model).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder written by `sails features` (features.json, activations.safetensors); the SAEs it
    /// names are loaded.
    #[arg(long, value_name = "DIR")]
    pub features: PathBuf,
    /// `sails eval --suite validation` output of the base model.
    #[arg(long, value_name = "DIR")]
    pub base_validation: PathBuf,
    /// `sails eval --suite validation` output of the adapted model.
    #[arg(long, value_name = "DIR")]
    pub adapter_validation: PathBuf,
    #[arg(long, value_enum, default_value = "features")]
    pub score: GateScoreArg,
    /// Largest acceptable refusal rate on the benign validation prompts.
    #[arg(long, value_name = "RATE", default_value_t = 0.2)]
    pub max_overrefusal: f64,
    /// Where the gate is written.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Print the gate as JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// Loads a gate and checks that its features folder still holds the selection it was fitted on.
pub fn load_gate(path: &Path) -> anyhow::Result<Gate> {
    let gate = Gate::load(path).with_context(|| format!("loading the gate {}", path.display()))?;
    let selection = Path::new(&gate.features_dir).join(SELECTION_FILE);
    let now = sails::manifest::hash_file(&selection)?;
    if now != gate.selection_sha256 {
        bail!(
            "{} changed since the gate {} was fitted on it (sha256 {now}, fitted on {}); fit the gate again",
            selection.display(),
            path.display(),
            gate.selection_sha256
        );
    }
    Ok(gate)
}

/// A gate with what reads prompts for it: its features and the base model.
pub struct LoadedGate {
    pub gate: Gate,
    pub scorer: PromptScorer,
    pub base: sails::model::load::ChatModel,
}

impl LoadedGate {
    /// The gate at `path`, its features' reader and `model` without its adapter.
    pub fn load(path: &Path, model: &ModelArgs) -> anyhow::Result<Self> {
        let gate = load_gate(path)?;
        let (selection, residuals, saes) = load_feature_reader(Path::new(&gate.features_dir), &[])?;
        let scorer = PromptScorer::new(&selection, &saes, &residuals)
            .context("reading the gate's features")?;
        let mut base_args = model.clone();
        base_args.adapter = None;
        Ok(Self {
            gate,
            scorer,
            base: base_args.load()?,
        })
    }

    /// Without `base_responses`, every prompt the gate leaves closed is generated again.
    pub fn as_gated(
        &self,
        base_responses: HashMap<String, GenerationRecord>,
    ) -> sails::eval::Gated<'_> {
        sails::eval::Gated {
            gate: &self.gate,
            scorer: &self.scorer,
            base: &self.base,
            base_responses,
        }
    }
}

/// The responses of a saved evaluation of the base model (`dir`, written by `sails eval`
/// without an adapter), checked to come from `model` with `max_new_tokens`, for the prompts a
/// gate leaves closed.
pub fn base_responses(
    dir: &Path,
    model: &str,
    max_new_tokens: usize,
) -> anyhow::Result<HashMap<String, GenerationRecord>> {
    let path = dir.join("eval-config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: sails::eval::EvalConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if cfg.adapter.is_some() || cfg.model != model || cfg.max_new_tokens != max_new_tokens {
        bail!(
            "{} is not an evaluation of the base model {model} with {max_new_tokens} new tokens \
             (it has model {}, adapter {:?}, {} new tokens)",
            dir.display(),
            cfg.model,
            cfg.adapter,
            cfg.max_new_tokens
        );
    }
    responses_by_id(dir)
}

/// The saved responses of one evaluation folder, by prompt id.
fn responses_by_id(dir: &Path) -> anyhow::Result<HashMap<String, GenerationRecord>> {
    let path = dir.join("generations.jsonl");
    let records: Vec<GenerationRecord> =
        read_jsonl(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(records.into_iter().map(|r| (r.id.clone(), r)).collect())
}

pub fn run(args: GateArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.max_overrefusal) {
        bail!("--max-overrefusal must be a rate in [0, 1]");
    }
    let base = responses_by_id(&args.base_validation)?;
    let adapted = responses_by_id(&args.adapter_validation)?;
    // Only the prompts the validation split holds now (a folder may keep responses to others).
    let splits = Splits::load().context("loading the data sets")?;
    let current: HashSet<&str> = [Suite::ValHarmful, Suite::ValBenign]
        .iter()
        .flat_map(|&s| splits.eval_suite(s))
        .map(|r| r.id.as_str())
        .collect();
    let mut both: Vec<(&GenerationRecord, &GenerationRecord)> = base
        .values()
        .filter(|b| current.contains(b.id.as_str()))
        .filter_map(|b| adapted.get(&b.id).map(|a| (b, a)))
        .collect();
    both.sort_by(|x, y| x.0.id.cmp(&y.0.id));
    if both.is_empty() {
        bail!(
            "{} and {} share no validation responses; run `sails eval --suite validation` into both",
            args.base_validation.display(),
            args.adapter_validation.display()
        );
    }
    let (selection, residuals, saes) = load_feature_reader(&args.features, &[])?;
    let scorer = PromptScorer::new(&selection, &saes, &residuals)
        .context("reading the features for the gate")?;
    let mut base_args = args.model.clone();
    base_args.adapter = None;
    let model = base_args.load()?;
    let texts: Vec<String> = both.iter().map(|(b, _)| b.prompt.clone()).collect();
    let layers = scorer
        .score(&model, &texts, 16, &mut |_| {})
        .context("reading the validation prompts")?;
    let score = match args.score {
        GateScoreArg::Features => GateScore::Features,
        GateScoreArg::Direct => GateScore::Direct,
    };
    let rows: Vec<GateRow> = both
        .iter()
        .zip(&layers)
        .map(|((b, a), l)| GateRow {
            value: score.value(l),
            harmful: b.suite == Suite::ValHarmful,
            adapter_refused: a.label == Label::Refused,
            base_refused: b.label == Label::Refused,
        })
        .collect();
    let (chosen, tried) = gate::fit(&rows, args.max_overrefusal)?;
    let gate = Gate {
        format_version: gate::FORMAT_VERSION,
        features_dir: args.features.display().to_string(),
        selection_sha256: sails::manifest::hash_file(&args.features.join(SELECTION_FILE))?,
        score,
        threshold: chosen.threshold,
        rule: format!(
            "highest validation safety with validation over-refusal <= {}",
            args.max_overrefusal
        ),
        chosen,
        tried,
        validation_harmful: rows.iter().filter(|r| r.harmful).count(),
        validation_benign: rows.iter().filter(|r| !r.harmful).count(),
    };
    gate.save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&gate)?);
    } else {
        let ungated = gate::point(&rows, f64::NEG_INFINITY);
        println!(
            "gate on the {} score: threshold {:.3} ({} harmful, {} benign validation prompts)",
            score.name(),
            gate.threshold,
            gate.validation_harmful,
            gate.validation_benign
        );
        for (what, p) in [("adapter always on", ungated), ("gated", chosen)] {
            println!(
                "  {what:<18} validation safety {:5.1} %  over-refusal {:5.1} %  (gate open: harmful {:5.1} %, benign {:5.1} %)",
                100.0 * p.val_safety,
                100.0 * p.val_overrefusal,
                100.0 * p.harmful_open,
                100.0 * p.benign_open
            );
        }
        println!("written to {}", args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}
