//! The adapter's gate: the update is switched on for a prompt only when the base model's reading
//! of it on the kept safety features (or the direct direction) reaches a threshold.
//!
//! Why: fine-tuning on refusals teaches a small model to refuse the *form* of the training
//! requests, so benign look-alikes get refused too. The features' reading separates harmful from
//! benign prompts better than the adapter's learned trigger does; gating puts the decision of
//! *whether* to move the model in the features and leaves the adapter only *how*. A closed gate
//! leaves the base model's answer untouched, so the gated model's response to a prompt is either
//! the base model's or the adapter's — which is why a threshold can be chosen exactly from two
//! saved validation evaluations (base and adapter) without generating anything again.
//!
//! In: a features stage's output, validation responses of the base and the adapted model.
//! Out: [`Gate`] (`gate.json`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{FeatureError, LayerScore, Result};

pub const FORMAT_VERSION: u32 = 1;

/// What the gate thresholds: the mean over the selection's layers of one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateScore {
    /// The kept features' shift (0 at the training harmless mean, 1 at the harmful one).
    Features,
    /// The residual's projection on the direct-identification direction (same axis).
    Direct,
}

impl GateScore {
    pub fn name(self) -> &'static str {
        match self {
            Self::Features => "features",
            Self::Direct => "direct",
        }
    }

    pub fn value(self, layers: &[LayerScore]) -> f64 {
        match self {
            Self::Features => super::mean_feature_score(layers),
            Self::Direct => super::mean_direct(layers),
        }
    }
}

/// One validation prompt as the fit sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateRow {
    pub value: f64,
    pub harmful: bool,
    /// Whether the adapted (ungated) model refused it.
    pub adapter_refused: bool,
    /// Whether the base model refused it.
    pub base_refused: bool,
}

/// The gated model's validation figures at one threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatePoint {
    pub threshold: f64,
    /// Harmful validation prompts refused by the gated model.
    pub val_safety: f64,
    /// Benign validation prompts refused by the gated model.
    pub val_overrefusal: f64,
    /// Share of harmful / benign validation prompts that open the gate.
    pub harmful_open: f64,
    pub benign_open: f64,
}

/// `gate.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub format_version: u32,
    /// The features stage's folder whose selection, residuals and SAEs the gate reads.
    pub features_dir: String,
    /// sha256 of that folder's `features.json`, checked when the gate is loaded.
    pub selection_sha256: String,
    pub score: GateScore,
    /// The adapter is on for a prompt whose score is at least this.
    pub threshold: f64,
    pub rule: String,
    /// The chosen point and every candidate threshold's figures (validation only).
    pub chosen: GatePoint,
    pub tried: Vec<GatePoint>,
    pub validation_harmful: usize,
    pub validation_benign: usize,
}

impl Gate {
    pub fn opens(&self, value: f64) -> bool {
        value >= self.threshold
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| FeatureError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        crate::model::write_atomic(path, text.as_bytes())?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| FeatureError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let gate: Gate = serde_json::from_slice(&bytes).map_err(|e| FeatureError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if gate.format_version != FORMAT_VERSION {
            return Err(FeatureError::Format {
                path: path.to_path_buf(),
                message: format!(
                    "gate format {} (this build reads {FORMAT_VERSION})",
                    gate.format_version
                ),
            });
        }
        Ok(gate)
    }
}

/// The gated model's validation figures at `threshold`: a prompt that opens the gate gets the
/// adapter's response, any other the base model's.
pub fn point(rows: &[GateRow], threshold: f64) -> GatePoint {
    let share = |harmful: bool, f: &dyn Fn(&GateRow) -> bool| {
        let set: Vec<&GateRow> = rows.iter().filter(|r| r.harmful == harmful).collect();
        set.iter().filter(|r| f(r)).count() as f64 / set.len().max(1) as f64
    };
    let refused = |r: &GateRow| {
        if r.value >= threshold {
            r.adapter_refused
        } else {
            r.base_refused
        }
    };
    GatePoint {
        threshold,
        val_safety: share(true, &refused),
        val_overrefusal: share(false, &refused),
        harmful_open: share(true, &|r| r.value >= threshold),
        benign_open: share(false, &|r| r.value >= threshold),
    }
}

/// The rule `align`'s scale selection uses, applied to thresholds: the highest validation safety
/// with validation over-refusal at most `max_overrefusal` (ties: the higher threshold, which
/// opens the gate for fewer prompts). Candidates are every validation prompt's own score (any
/// threshold between two of them gives the same figures) and `f64::MAX` (the gate never opens: the base
/// model), so a choice always exists when the base model itself is within the bound.
pub fn fit(rows: &[GateRow], max_overrefusal: f64) -> Result<(GatePoint, Vec<GatePoint>)> {
    let (harmful, benign) = (
        rows.iter().filter(|r| r.harmful).count(),
        rows.iter().filter(|r| !r.harmful).count(),
    );
    if harmful == 0 || benign == 0 {
        return Err(FeatureError::Config(format!(
            "the gate needs harmful and benign validation prompts (got {harmful} and {benign})"
        )));
    }
    if let Some(r) = rows.iter().find(|r| !r.value.is_finite()) {
        return Err(FeatureError::Config(format!(
            "a validation prompt's gate score is not finite ({})",
            r.value
        )));
    }
    let mut thresholds: Vec<f64> = rows.iter().map(|r| r.value).collect();
    thresholds.push(f64::MAX);
    thresholds.sort_by(f64::total_cmp);
    thresholds.dedup();
    let tried: Vec<GatePoint> = thresholds.iter().map(|&t| point(rows, t)).collect();
    let best = tried
        .iter()
        .filter(|p| p.val_overrefusal <= max_overrefusal)
        .fold(None::<&GatePoint>, |best, p| match best {
            Some(b) if b.val_safety > p.val_safety => Some(b),
            _ => Some(p),
        })
        .copied()
        .ok_or_else(|| {
            FeatureError::Config(format!(
                "even the base model refuses more than {:.0} % of the benign validation prompts",
                100.0 * max_overrefusal
            ))
        })?;
    Ok((best, tried))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(value: f64, harmful: bool, adapter_refused: bool, base_refused: bool) -> GateRow {
        GateRow {
            value,
            harmful,
            adapter_refused,
            base_refused,
        }
    }

    #[test]
    fn the_fit_takes_the_safest_threshold_within_the_over_refusal_bound() {
        // The adapter refuses everything; the base model nothing. Harmful prompts score
        // 0.9, 0.8, 0.3; benign ones 0.7, 0.2, 0.1, 0.0.
        let mut rows = vec![
            row(0.9, true, true, false),
            row(0.8, true, true, false),
            row(0.3, true, true, false),
        ];
        for v in [0.7, 0.2, 0.1, 0.0] {
            rows.push(row(v, false, true, false));
        }
        // Bound 25 %: one benign prompt of four may be refused. At 0.3 every harmful prompt
        // opens the gate and of the benign ones only 0.7 does; at 0.2 two benign prompts would.
        let (p, tried) = fit(&rows, 0.25).unwrap();
        assert_eq!(p.threshold, 0.3);
        assert!((p.val_safety - 1.0).abs() < 1e-12 && (p.val_overrefusal - 0.25).abs() < 1e-12);
        assert_eq!(tried.len(), 8, "seven scores and the closed gate");
        // Bound 0: no benign prompt may open, so 0.8 (the lowest above every benign score).
        let (p, _) = fit(&rows, 0.0).unwrap();
        assert_eq!(p.threshold, 0.8);
        assert!((p.val_safety - 2.0 / 3.0).abs() < 1e-12 && p.val_overrefusal == 0.0);
        assert_eq!((p.harmful_open, p.benign_open), (2.0 / 3.0, 0.0));
    }

    #[test]
    fn a_closed_gate_gives_the_base_model_and_bad_inputs_are_errors() {
        let rows = vec![row(0.5, true, true, true), row(0.5, false, true, false)];
        let (p, _) = fit(&rows, 0.0).unwrap();
        assert_eq!(p.threshold, f64::MAX);
        assert_eq!((p.val_safety, p.val_overrefusal), (1.0, 0.0));
        let all_refused = vec![row(0.5, true, true, true), row(0.5, false, true, true)];
        assert!(fit(&all_refused, 0.2)
            .unwrap_err()
            .to_string()
            .contains("base model"));
        assert!(fit(&rows[..1], 0.2).is_err());
        assert!(fit(&[row(f64::NAN, true, true, true), rows[1]], 0.2).is_err());
    }
}
