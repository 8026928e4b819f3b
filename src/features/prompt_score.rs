//! A prompt's reading on the kept safety features and on the direct-identification direction,
//! both on a 0–1 axis from the training harmless mean to the training harmful mean: what the
//! phrasing probe compares across wordings and what the adapter's gate thresholds.

use serde::{Deserialize, Serialize};

use super::{collect, FeatureError, LayerSelection, PooledResiduals, Pooling, Result, Selection};
use crate::model::load::ChatModel;
use crate::model::Resid;
use crate::sae::Sae;

/// One prompt's scores at one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerScore {
    pub hook: Resid,
    pub feature_score: f64,
    /// None when no kept feature of this layer fires more on harmful prompts.
    pub harm_activation: Option<f64>,
    pub direct: f64,
}

/// The kept features of one layer, as the probe reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    pub hook: Resid,
    pub kept: usize,
    /// Kept features that fire more on harmful training prompts (`d_j > 0`).
    pub harm_features: usize,
    /// `‖μ_harmful − μ_harmless‖` of the training residuals (the direct direction's length).
    pub direct_norm: f64,
}

/// One layer's reading of pooled rows.
struct LayerProbe {
    hook: Resid,
    /// (index, sign of d, harmless mean)
    features: Vec<(usize, f64, f64)>,
    abs_diff_sum: f64,
    harm: Vec<usize>,
    mu_harmless: Vec<f64>,
    /// μ_harmful − μ_harmless.
    direction: Vec<f64>,
    direction_norm2: f64,
}

impl LayerProbe {
    fn new(layer: &LayerSelection, residuals: &PooledResiduals) -> Result<Self> {
        let hook = layer.hook;
        if let Some(f) = layer.features.iter().find(|f| f.index >= layer.d_sae) {
            return Err(FeatureError::FeatureIndex {
                hook,
                index: f.index,
                d_sae: layer.d_sae,
            });
        }
        let abs_diff_sum: f64 = layer.features.iter().map(|f| f.diff.abs()).sum();
        if abs_diff_sum == 0.0 || !abs_diff_sum.is_finite() {
            return Err(FeatureError::NoFeatureDifference { hook });
        }
        let (h, b) = residuals
            .layers
            .get(&hook)
            .ok_or(FeatureError::MissingResiduals { hook })?;
        let mu_harmless = b.means();
        let direction: Vec<f64> = h
            .means()
            .iter()
            .zip(&mu_harmless)
            .map(|(h, b)| h - b)
            .collect();
        let direction_norm2: f64 = direction.iter().map(|v| v * v).sum();
        if direction_norm2 == 0.0 {
            return Err(FeatureError::NoDirection { hook });
        }
        Ok(Self {
            hook,
            features: layer
                .features
                .iter()
                .map(|f| (f.index, f.diff.signum(), f.mean_harmless))
                .collect(),
            abs_diff_sum,
            harm: layer
                .features
                .iter()
                .filter(|f| f.diff > 0.0)
                .map(|f| f.index)
                .collect(),
            mu_harmless,
            direction,
            direction_norm2,
        })
    }

    fn score(&self, features: &[f32], resid: &[f32]) -> LayerScore {
        let feature_score = self
            .features
            .iter()
            .map(|&(i, sign, b)| sign * (features[i] as f64 - b))
            .sum::<f64>()
            / self.abs_diff_sum;
        let harm_activation = (!self.harm.is_empty())
            .then(|| self.harm.iter().map(|&i| features[i] as f64).sum::<f64>());
        let direct = resid
            .iter()
            .zip(&self.mu_harmless)
            .zip(&self.direction)
            .map(|((&r, b), d)| (r as f64 - b) * d)
            .sum::<f64>()
            / self.direction_norm2;
        LayerScore {
            hook: self.hook,
            feature_score,
            harm_activation,
            direct,
        }
    }
}

/// A prompt's feature score over the selection's layers (their mean).
pub fn mean_feature_score(layers: &[LayerScore]) -> f64 {
    layers.iter().map(|l| l.feature_score).sum::<f64>() / layers.len().max(1) as f64
}

/// A prompt's direct-direction score over the selection's layers (their mean).
pub fn mean_direct(layers: &[LayerScore]) -> f64 {
    layers.iter().map(|l| l.direct).sum::<f64>() / layers.len().max(1) as f64
}

/// The selection's layers read from pooled prompts: one [`LayerScore`] per layer and prompt.
pub struct PromptScorer {
    probes: Vec<LayerProbe>,
    saes: Vec<Sae>,
    pooling: Pooling,
}

impl PromptScorer {
    pub fn new(selection: &Selection, saes: &[Sae], residuals: &PooledResiduals) -> Result<Self> {
        let probes = selection
            .layers
            .iter()
            .map(|l| LayerProbe::new(l, residuals))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            probes,
            saes: saes_for(selection, saes)?,
            pooling: selection.config.pooling,
        })
    }

    /// What each layer reads, in the selection's order.
    pub fn layers(&self) -> Vec<LayerInfo> {
        self.probes
            .iter()
            .map(|p| LayerInfo {
                hook: p.hook,
                kept: p.features.len(),
                harm_features: p.harm.len(),
                direct_norm: p.direction_norm2.sqrt(),
            })
            .collect()
    }

    /// Every prompt's scores, layer by layer in the selection's order.
    pub fn score(
        &self,
        model: &ChatModel,
        prompts: &[String],
        batch_size: usize,
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<LayerScore>>> {
        let pooled = collect(
            model,
            &self.saes,
            prompts,
            self.pooling,
            batch_size,
            on_batch,
        )?;
        (0..prompts.len())
            .map(|p| {
                self.probes
                    .iter()
                    .map(|probe| {
                        let missing = || FeatureError::Capture { hook: probe.hook };
                        let f = pooled.features.get(&probe.hook).ok_or_else(missing)?;
                        let x = pooled.resid.get(&probe.hook).ok_or_else(missing)?;
                        Ok(probe.score(
                            &f.values[p * f.width..(p + 1) * f.width],
                            &x.values[p * x.width..(p + 1) * x.width],
                        ))
                    })
                    .collect()
            })
            .collect()
    }
}

/// The SAEs of the selected layers, in the selection's order, checked against it.
fn saes_for(selection: &Selection, saes: &[Sae]) -> Result<Vec<Sae>> {
    selection
        .layers
        .iter()
        .map(|l| {
            let sae = saes
                .iter()
                .find(|s| s.hook() == l.hook)
                .ok_or(FeatureError::MissingSae { hook: l.hook })?;
            if sae.d_sae() != l.d_sae {
                return Err(FeatureError::SaeWidth {
                    hook: l.hook,
                    sae: sae.d_sae(),
                    selection: l.d_sae,
                });
            }
            Ok(sae.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::features::{FeatureScore, PooledSet};

    fn feature(index: usize, mean_harmful: f64, mean_harmless: f64) -> FeatureScore {
        FeatureScore {
            index,
            rank: 0,
            delta: (mean_harmful - mean_harmless).abs(),
            diff: mean_harmful - mean_harmless,
            mean_harmful,
            mean_harmless,
            freq_harmful: 1.0,
            freq_harmless: 1.0,
            effect_size: 1.0,
            diff_ci95: [0.0, 0.0],
            robust: true,
        }
    }

    #[test]
    fn scores_put_the_training_means_at_zero_and_one() {
        let hook = Resid::In(3);
        let layer = LayerSelection {
            hook,
            hook_name: "blocks.3.hook_resid_pre".into(),
            sae: "x".into(),
            d_sae: 4,
            // feature 0 fires on harmful prompts (0.5 → 2.5), feature 2 on harmless ones (3 → 1)
            features: vec![feature(0, 2.5, 0.5), feature(2, 1.0, 3.0)],
        };
        let set = |rows: &[[f32; 2]]| {
            let mut s = PooledSet::new(2);
            for r in rows {
                s.push(r, &[true, true]);
            }
            s
        };
        let mut residuals = PooledResiduals {
            layers: BTreeMap::new(),
        };
        // harmful mean (2, 1), harmless mean (0, 1): direction (2, 0)
        residuals.layers.insert(
            hook,
            (
                set(&[[1.0, 1.0], [3.0, 1.0]]),
                set(&[[0.0, 0.0], [0.0, 2.0]]),
            ),
        );
        let p = LayerProbe::new(&layer, &residuals).unwrap();
        // At the harmful means: 1; at the harmless means: 0; halfway: 0.5.
        let s = p.score(&[2.5, 9.0, 1.0, 9.0], &[2.0, 5.0]);
        assert!((s.feature_score - 1.0).abs() < 1e-12 && (s.direct - 1.0).abs() < 1e-12);
        assert_eq!(s.harm_activation, Some(2.5));
        let s = p.score(&[0.5, 0.0, 3.0, 0.0], &[0.0, -4.0]);
        assert!(s.feature_score.abs() < 1e-12 && s.direct.abs() < 1e-12);
        let s = p.score(&[1.5, 0.0, 2.0, 0.0], &[1.0, 1.0]);
        assert!((s.feature_score - 0.5).abs() < 1e-12 && (s.direct - 0.5).abs() < 1e-12);
        // A selection layer the features stage has no residuals for is named.
        let other = LayerSelection {
            hook: Resid::In(4),
            ..layer.clone()
        };
        let e = LayerProbe::new(&other, &residuals)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("activations.safetensors"), "{e}");
        let outside = LayerSelection {
            features: vec![feature(9, 1.0, 0.0)],
            ..layer.clone()
        };
        let e = LayerProbe::new(&outside, &residuals)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("outside the SAE's 4 latents"), "{e}");
    }
}
