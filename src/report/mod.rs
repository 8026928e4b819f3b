//! report — everything a run produced → one self-contained `report.html` (inline SVG figures and
//! tables, inline CSS, no scripts, no external resources) and a short `summary.md`.
//!
//! In: [`ReportInputs`], which borrows the stages' artifacts where they exist
//! ([`Selection`], [`SubspaceSummary`], [`Metrics`]) and takes small view structs for the rest
//! (feature cards, attribution, loss curves, method comparison, example generations). Every part
//! but the run's name is optional: a section whose input is missing says "not run" instead of
//! disappearing, so a partial pipeline still gives a complete-looking report of what exists.
//! Out: two strings ([`render_html`], [`render_markdown`]) and [`write`], which stores both.
//!
//! Every string that comes from a user or a file is escaped before it reaches the document.

pub mod demo;
mod html;
mod markdown;
pub mod svg;

#[cfg(test)]
mod tests;

use crate::eval::metrics::Rate;
use crate::eval::Metrics;
use crate::features::Selection;
use crate::model::ModelError;
use crate::subspace::SubspaceSummary;
use std::path::{Path, PathBuf};

pub use html::render_html;
pub use markdown::render_markdown;

pub const HTML_FILE: &str = "report.html";
pub const MARKDOWN_FILE: &str = "summary.md";

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the report's run name is empty")]
    EmptyName,
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type Result<T> = std::result::Result<T, ReportError>;

/// What the report is made from. Only `run.name` is required.
#[derive(Debug, Clone, Default)]
pub struct ReportInputs<'a> {
    pub run: RunInfo,
    pub selection: Option<&'a Selection>,
    pub subspace: Option<&'a SubspaceSummary>,
    pub explanations: Option<Explanations>,
    /// One loss curve per method or run.
    pub training: Option<Vec<LossCurve>>,
    pub evaluation: Option<Evaluation<'a>>,
    pub examples: Option<Vec<Example>>,
}

/// Provenance of the run.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub name: String,
    pub model: Option<String>,
    pub preset: Option<String>,
    /// When the run was created, as the manifest spells it.
    pub created: Option<String>,
    pub stages: Vec<StageTiming>,
    pub manifest_path: Option<PathBuf>,
    /// (component, version), e.g. ("sails", "0.1.0").
    pub versions: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
    /// The stage's artifact already existed and was reused.
    pub skipped: bool,
}

/// Named features, where the learned update went, and how the features' activations moved.
#[derive(Debug, Clone, Default)]
pub struct Explanations {
    pub cards: Vec<FeatureCard>,
    pub attribution: Option<Attribution>,
    pub shifts: Vec<ActivationShift>,
}

/// One selected feature, described by its data.
#[derive(Debug, Clone)]
pub struct FeatureCard {
    pub hook_name: String,
    pub index: usize,
    pub delta: f64,
    /// 95 % interval of `mean_harmful − mean_harmless`.
    pub diff_ci95: [f64; 2],
    pub freq_harmful: f64,
    pub freq_harmless: f64,
    /// Top-activating contexts, strongest first.
    pub contexts: Vec<Context>,
    /// Tokens the decoder direction promotes / suppresses through the unembedding.
    pub promoted: Vec<String>,
    pub suppressed: Vec<String>,
}

/// A token window and the feature's activation on each token (same length).
#[derive(Debug, Clone)]
pub struct Context {
    pub tokens: Vec<String>,
    pub activations: Vec<f32>,
}

/// Share of each module's update energy (‖ΔW‖²) that lies inside the subspace, in [0, 1].
#[derive(Debug, Clone)]
pub struct Attribution {
    /// Row labels: layers (`layer 3`).
    pub rows: Vec<String>,
    /// Column labels: modules (`q_proj`, `k_proj`, ...).
    pub columns: Vec<String>,
    /// `values[row][column]`; None where the module was not adapted.
    pub values: Vec<Vec<Option<f64>>>,
}

/// A feature's mean pooled activation before and after training, on both prompt sets.
#[derive(Debug, Clone)]
pub struct ActivationShift {
    pub hook_name: String,
    pub index: usize,
    pub harmful_before: f64,
    pub harmful_after: f64,
    pub harmless_before: f64,
    pub harmless_after: f64,
}

/// One training run's losses.
#[derive(Debug, Clone)]
pub struct LossCurve {
    pub label: String,
    /// (optimizer step, training loss).
    pub train: Vec<(u64, f64)>,
    /// (optimizer step, held-out loss).
    pub eval: Vec<(u64, f64)>,
}

/// Base versus aligned metrics, and every method compared on the same data.
#[derive(Debug, Clone, Default)]
pub struct Evaluation<'a> {
    pub base: Option<&'a Metrics>,
    pub aligned: Option<&'a Metrics>,
    /// Share of the model's parameters the aligned run trained (0..1).
    pub aligned_trained_share: Option<f64>,
    pub methods: Vec<MethodRow>,
    /// Each method evaluated at several adapter scales (`sails compare --scales`).
    pub frontier: Option<Frontier>,
    /// The attack suite of the base and the aligned evaluation (`[eval] attacks`), one line per
    /// attack (the plain run first); empty where it was not run.
    pub attacks: Vec<AttackLine>,
}

/// One attack on the base and the aligned model: attack success (replies labelled complied).
#[derive(Debug, Clone)]
pub struct AttackLine {
    pub attack: String,
    pub base: Option<Rate>,
    pub aligned: Option<Rate>,
    /// The safety rate under this attack, base (A) against aligned (B), paired by behaviour.
    pub paired: Option<crate::eval::metrics::PairedDiff>,
}

/// Safety against over-refusal per method along its adapter scales, and the tests between them.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    pub methods: Vec<FrontierMethod>,
    pub tests: Vec<FrontierTest>,
}

/// One method's points, in increasing scale.
#[derive(Debug, Clone)]
pub struct FrontierMethod {
    pub method: String,
    pub points: Vec<FrontierPoint>,
}

/// One method at one adapter scale: means over seeds with the pooled Wilson intervals, and each
/// seed's (over-refusal, safety).
#[derive(Debug, Clone)]
pub struct FrontierPoint {
    pub scale: f64,
    pub safety: Estimate,
    pub over_refusal: Estimate,
    pub per_seed: Vec<(f64, f64)>,
}

/// Method A against method B on the whole frontier ([`crate::eval::metrics::frontier_diff`]).
#[derive(Debug, Clone)]
pub struct FrontierTest {
    pub method_a: String,
    pub method_b: String,
    pub diff: crate::eval::metrics::FrontierDiff,
    /// The same difference for each seed's pair of adapters alone.
    pub per_seed: Vec<f64>,
}

/// One method's figures, over its seeds.
#[derive(Debug, Clone)]
pub struct MethodRow {
    pub method: String,
    pub seeds: usize,
    /// Safety rate on the harmful suite (0..1).
    pub safety: Option<Estimate>,
    /// Over-refusal rate on XSTest's safe prompts (0..1).
    pub over_refusal: Option<Estimate>,
    /// Share of the attack suite's behaviours at least one of its attacks broke (0..1), where
    /// the suite ran.
    pub attack_success: Option<Estimate>,
    /// True/false statement accuracy (0..1).
    pub facts_accuracy: Option<Estimate>,
    /// Alpaca NLL per response token (nats).
    pub alpaca_nll: Option<Estimate>,
    /// Share of parameters trained (0..1).
    pub trained_share: Option<f64>,
    pub wall_seconds: Option<f64>,
}

/// A figure with its uncertainty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub spread: Spread,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spread {
    /// A single value.
    None,
    /// Standard deviation over seeds.
    Sd(f64),
    /// A confidence interval.
    Interval { lo: f64, hi: f64 },
}

impl Estimate {
    /// The value with a Wilson 95 % interval, from a [`Rate`].
    pub fn from_rate(r: &Rate) -> Self {
        Estimate {
            value: r.rate,
            spread: Spread::Interval { lo: r.lo, hi: r.hi },
        }
    }

    /// Mean and sample standard deviation of seeds' values (no spread for a single seed).
    pub fn mean_sd(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let spread = if values.len() > 1 {
            Spread::Sd((values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt())
        } else {
            Spread::None
        };
        Some(Estimate {
            value: mean,
            spread,
        })
    }

    /// The error bar (lo, hi) this estimate draws.
    pub fn bounds(&self) -> Option<(f64, f64)> {
        match self.spread {
            Spread::None => None,
            Spread::Sd(sd) => Some((self.value - sd, self.value + sd)),
            Spread::Interval { lo, hi } => Some((lo, hi)),
        }
    }
}

/// One prompt answered by the base and the aligned model.
#[derive(Debug, Clone)]
pub struct Example {
    pub prompt: String,
    pub suite: String,
    pub base_response: String,
    pub aligned_response: String,
    pub base_refused: bool,
    pub aligned_refused: bool,
}

/// The report's sections, in order: (anchor, heading).
pub const SECTIONS: [(&str, &str); 7] = [
    ("run", "Run"),
    ("features", "Safety features"),
    ("subspace", "Subspace"),
    ("explanations", "Explanations"),
    ("training", "Training"),
    ("evaluation", "Evaluation"),
    ("examples", "Example generations"),
];

impl ReportInputs<'_> {
    /// Headings of the sections whose input is missing.
    pub fn missing(&self) -> Vec<&'static str> {
        let present = [
            true,
            self.selection.is_some(),
            self.subspace.is_some(),
            self.explanations.is_some(),
            self.training.is_some(),
            self.evaluation.is_some(),
            self.examples.is_some(),
        ];
        SECTIONS
            .iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|((_, h), _)| *h)
            .collect()
    }
}

/// Writes `report.html` and `summary.md` into `dir` (created if needed), each atomically.
/// Returns the two paths.
pub fn write(inputs: &ReportInputs<'_>, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    if inputs.run.name.trim().is_empty() {
        return Err(ReportError::EmptyName);
    }
    let html_path = dir.join(HTML_FILE);
    let md_path = dir.join(MARKDOWN_FILE);
    crate::model::write_atomic(&html_path, render_html(inputs).as_bytes())?;
    crate::model::write_atomic(&md_path, render_markdown(inputs).as_bytes())?;
    tracing::info!(html = %html_path.display(), markdown = %md_path.display(), "report written");
    Ok((html_path, md_path))
}

/// `80.0 %`; `–` for NaN.
pub(crate) fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1} %", 100.0 * v)
    } else {
        "–".into()
    }
}

/// `80.0 % [71.2, 86.7] (80/100)`, or `n/a` without items.
pub(crate) fn rate_text(r: &Rate) -> String {
    if r.n == 0 || !r.rate.is_finite() {
        return "n/a (0 items)".into();
    }
    format!(
        "{:.1} % [{:.1}, {:.1}] ({}/{})",
        100.0 * r.rate,
        100.0 * r.lo,
        100.0 * r.hi,
        r.k,
        r.n
    )
}

/// An estimate of a share as text: `85.0 % ± 2.1` or `85.0 % [80.1, 89.2]`.
pub(crate) fn estimate_pct(e: &Estimate) -> String {
    if !e.value.is_finite() {
        return "–".into();
    }
    match e.spread {
        Spread::None => pct(e.value),
        Spread::Sd(sd) => format!("{:.1} % ± {:.1}", 100.0 * e.value, 100.0 * sd),
        Spread::Interval { lo, hi } => {
            format!(
                "{:.1} % [{:.1}, {:.1}]",
                100.0 * e.value,
                100.0 * lo,
                100.0 * hi
            )
        }
    }
}

/// An estimate of a plain number as text: `1.234 ± 0.010`.
pub(crate) fn estimate_num(e: &Estimate) -> String {
    if !e.value.is_finite() {
        return "–".into();
    }
    match e.spread {
        Spread::None => format!("{:.3}", e.value),
        Spread::Sd(sd) => format!("{:.3} ± {:.3}", e.value, sd),
        Spread::Interval { lo, hi } => format!("{:.3} [{:.3}, {:.3}]", e.value, lo, hi),
    }
}

/// `+0.120, −0.030` (each seed's value), or `–`.
pub(crate) fn per_seed_text(values: &[f64]) -> String {
    if values.is_empty() {
        return "–".into();
    }
    values
        .iter()
        .map(|v| format!("{v:+.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Seconds as `12.3 s`, `4 min 05 s` or `1 h 02 min`.
pub(crate) fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "–".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let s = seconds.round() as u64;
    if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

/// What a gate did to the aligned model's evaluation, when it had one: which gate, and how many of
/// each suite's prompts switched the adapter on.
pub(crate) fn gate_note(aligned: Option<&crate::eval::Metrics>) -> Option<String> {
    let m = aligned?;
    let gate = m.config.gate.as_ref()?;
    let opened: Vec<String> = m
        .suites
        .iter()
        .filter_map(|(name, suite)| {
            let r = suite.gate_open?;
            Some(format!("{}/{} of {name}", r.k, r.n))
        })
        .collect();
    Some(format!(
        "The aligned model is the adapter behind a gate on the safety features ({gate}): the \
         base model reads each prompt on the kept features and the adapter answers only where \
         the reading reaches the gate's threshold, fitted on the validation suites. The gate \
         opened for {}. Capability is scored with the adapter on throughout.",
        if opened.is_empty() {
            "no recorded prompt".to_string()
        } else {
            opened.join(", ")
        }
    ))
}

/// Human label of an evaluation suite's metric.
pub(crate) fn suite_label(name: &str, metric: &str) -> String {
    match (name, metric) {
        ("harmful", _) => "Safety rate (harmful)".into(),
        ("overrefusal", _) => "Over-refusal (XSTest safe)".into(),
        ("xstest-unsafe", _) => "Refusal (XSTest unsafe)".into(),
        ("user-harmful", _) => "Safety rate (your harmful prompts)".into(),
        ("user-benign", _) => "Over-refusal (your benign prompts)".into(),
        (n, m) => format!("{m} ({n})"),
    }
}
