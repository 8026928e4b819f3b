//! explain — name the safety subspace through its features, and say where a trained adapter put
//! its update.
//!
//! In: `features::Selection` + the SAEs (feature cards), a PEFT adapter + optionally the
//! `subspace::Subspace` (attribution), the model with and without the adapter (activation shift).
//! Out: [`Explanations`] (`explain.json`).
//!
//! - [`feature_cards`]: per selected feature, the prompts of a corpus on which it fires most (with
//!   the per-token activation over the prompt's own tokens) and the tokens its decoder direction
//!   promotes and suppresses through the unembedding (logit lens).
//! - [`attribution`]: per adapted module, `‖ΔW‖_F`, the share of `‖ΔW‖²_F` that lies in the
//!   subspace, and the share along each selected feature's decoder direction.
//! - [`activation_shift`]: per selected feature, the pooled mean activation on the harmful and
//!   harmless prompts before and after the adapter.

mod attribution;
mod cards;
mod shift;

use std::path::{Path, PathBuf};

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use attribution::{
    attribution, Attribution, FeatureShare, LayerAttribution, ModuleAttribution, Side,
};
pub use cards::{feature_cards, logit_lens, Context, FeatureCard, Lens, LensToken};
pub use shift::{activation_shift, activation_shift_with_adapter, FeatureShift};

use crate::features::{FeatureError, Selection};
use crate::model::{ModelError, Resid};
use crate::sae::{Sae, SaeError};
use crate::subspace::SubspaceError;

pub const EXPLAIN_FILE: &str = "explain.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum ExplainError {
    #[error("{hook}: no SAE given for a selected layer (the selection names {sae})")]
    MissingSae { hook: Resid, sae: String },
    #[error("{hook}: the selection says the SAE has {selection} latents, the SAE given has {sae}")]
    SaeWidth {
        hook: Resid,
        selection: usize,
        sae: usize,
    },
    #[error("{hook}: feature {index} is outside the {width} latents")]
    FeatureIndex {
        hook: Resid,
        index: usize,
        width: usize,
    },
    #[error("the forward pass did not capture {hook}")]
    Capture { hook: Resid },
    #[error("{hook}: no pooled activations in the {set} set")]
    MissingPooled { hook: Resid, set: &'static str },
    #[error("{what}: width {got}, expected {expected}")]
    Width {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("adapter module {module}: {why}")]
    Module { module: String, why: String },
    #[error("invalid explain config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Subspace(#[from] SubspaceError),
    #[error(transparent)]
    Sae(#[from] SaeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<crate::model::tokenizer::TokenizerError> for ExplainError {
    fn from(e: crate::model::tokenizer::TokenizerError) -> Self {
        ExplainError::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, ExplainError>;

/// Every field lands in `explain.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainConfig {
    /// Top-activating prompts kept per feature.
    pub contexts: usize,
    /// Tokens listed on each side (promoted, suppressed) of a feature's logit lens.
    pub lens_tokens: usize,
    /// Prompts per forward pass over the corpus.
    pub batch_size: usize,
}

impl Default for ExplainConfig {
    fn default() -> Self {
        ExplainConfig {
            contexts: 5,
            lens_tokens: 10,
            batch_size: 8,
        }
    }
}

/// `explain.json`: everything this stage says about a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Explanations {
    pub format_version: u32,
    pub config: ExplainConfig,
    /// Number of corpus prompts the top contexts were drawn from.
    pub corpus_prompts: usize,
    /// One card per selected feature, in the selection's order (layer, then rank).
    pub cards: Vec<FeatureCard>,
    /// Where a trained adapter's update lies (absent without an adapter).
    pub attribution: Option<Attribution>,
    /// Feature activations before and after the adapter (absent without an adapter).
    pub shift: Option<Vec<FeatureShift>>,
}

impl Explanations {
    pub fn new(
        config: ExplainConfig,
        corpus_prompts: usize,
        cards: Vec<FeatureCard>,
        attribution: Option<Attribution>,
        shift: Option<Vec<FeatureShift>>,
    ) -> Self {
        Explanations {
            format_version: FORMAT_VERSION,
            config,
            corpus_prompts,
            cards,
            attribution,
            shift,
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ExplainError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        crate::model::write_atomic(path, &bytes)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ExplainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let e: Explanations = serde_json::from_str(&text).map_err(|e| ExplainError::Format {
            path: path.to_path_buf(),
            message: format!("not an explain.json: {e}"),
        })?;
        if e.format_version != FORMAT_VERSION {
            return Err(ExplainError::Format {
                path: path.to_path_buf(),
                message: format!(
                    "format_version {} (this build reads {FORMAT_VERSION})",
                    e.format_version
                ),
            });
        }
        Ok(e)
    }
}

/// The selected features of one SAE as unit decoder directions.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureDirections {
    pub hook: Resid,
    /// Latent indices, in the selection's order.
    pub indices: Vec<usize>,
    /// `(d_model, k)`: column j is `W_dec[indices[j]] / ‖W_dec[indices[j]]‖` (a zero row stays 0).
    pub directions: DMatrix<f64>,
}

/// The SAE of each selected layer, matched by hook, with its width checked against the selection.
fn sae_for<'a>(saes: &'a [Sae], layer: &crate::features::LayerSelection) -> Result<&'a Sae> {
    let sae = saes
        .iter()
        .find(|s| s.hook() == layer.hook)
        .ok_or_else(|| ExplainError::MissingSae {
            hook: layer.hook,
            sae: layer.sae.clone(),
        })?;
    if sae.d_sae() != layer.d_sae {
        return Err(ExplainError::SaeWidth {
            hook: layer.hook,
            selection: layer.d_sae,
            sae: sae.d_sae(),
        });
    }
    if let Some(f) = layer.features.iter().find(|f| f.index >= sae.d_sae()) {
        return Err(ExplainError::FeatureIndex {
            hook: layer.hook,
            index: f.index,
            width: sae.d_sae(),
        });
    }
    Ok(sae)
}

/// Unit decoder directions of every selected feature, one entry per selected layer.
pub fn feature_directions(selection: &Selection, saes: &[Sae]) -> Result<Vec<FeatureDirections>> {
    selection
        .layers
        .iter()
        .map(|layer| {
            let sae = sae_for(saes, layer)?;
            let indices: Vec<usize> = layer.features.iter().map(|f| f.index).collect();
            let rows = decoder_rows(sae, &indices)?; // (k, d_model)
            let d_model = sae.d_in();
            let mut directions = DMatrix::from_fn(d_model, indices.len(), |i, j| rows[j][i]);
            for mut col in directions.column_iter_mut() {
                let n = col.norm();
                if n > 0.0 {
                    col /= n;
                }
            }
            Ok(FeatureDirections {
                hook: layer.hook,
                indices,
                directions,
            })
        })
        .collect()
}

/// Rows `indices` of the SAE's `W_dec`, as f64.
fn decoder_rows(sae: &Sae, indices: &[usize]) -> Result<Vec<Vec<f64>>> {
    let index = candle_core::Tensor::from_vec(
        indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        indices.len(),
        sae.w_dec.device(),
    )?;
    Ok(sae
        .w_dec
        .index_select(&index, 0)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec2::<f64>()?)
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Device, Tensor};

    use crate::features::{FeatureConfig, FeatureScore, LayerSelection, PromptSetInfo, Selection};
    use crate::model::Resid;
    use crate::sae::{Architecture, Normalization, Sae, SaeConfig};

    /// A TopK SAE with the given decoder rows `(d_sae, d_in)` and the encoder its transpose.
    pub fn sae_with_decoder(hook: Resid, rows: &[Vec<f32>]) -> Sae {
        let (d_sae, d_in) = (rows.len(), rows[0].len());
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let w_dec = Tensor::from_vec(flat, (d_sae, d_in), &Device::Cpu).unwrap();
        let w_enc = w_dec.t().unwrap().contiguous().unwrap();
        let cfg = SaeConfig {
            architecture: Architecture::TopK {
                k: 1,
                rescale_acts_by_decoder_norm: false,
            },
            d_in,
            d_sae,
            hook,
            apply_b_dec_to_input: false,
            normalize_activations: Normalization::None,
            metadata: Default::default(),
        };
        let zeros = |n| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        Sae::new(cfg, w_enc, zeros(d_sae), w_dec, zeros(d_in), None).unwrap()
    }

    pub fn score(index: usize, rank: usize) -> FeatureScore {
        FeatureScore {
            index,
            rank,
            delta: 1.0,
            diff: 1.0,
            mean_harmful: 1.0,
            mean_harmless: 0.0,
            freq_harmful: 1.0,
            freq_harmless: 0.0,
            effect_size: 2.0,
            diff_ci95: [0.5, 1.5],
            robust: true,
        }
    }

    pub fn selection(hook: Resid, d_sae: usize, indices: &[usize]) -> Selection {
        Selection {
            format_version: 1,
            config: FeatureConfig::default(),
            model: "m".into(),
            harmful: PromptSetInfo::of(&[]),
            harmless: PromptSetInfo::of(&[]),
            layers: vec![LayerSelection {
                hook,
                hook_name: crate::sae::hook_name(hook),
                sae: "sae".into(),
                d_sae,
                features: indices
                    .iter()
                    .enumerate()
                    .map(|(r, &i)| score(i, r))
                    .collect(),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::selection;
    use super::*;

    #[test]
    fn directions_are_the_unit_decoder_rows_in_selection_order() {
        // rows (3,4,0) and (0,0,2) → units (0.6,0.8,0) and (0,0,1)
        let sae = test_util::sae_with_decoder(
            Resid::In(2),
            &[
                vec![1.0, 0.0, 0.0],
                vec![3.0, 4.0, 0.0],
                vec![0.0, 0.0, 2.0],
            ],
        );
        let sel = selection(Resid::In(2), 3, &[2, 1]);
        let dirs = feature_directions(&sel, &[sae]).unwrap();
        assert_eq!(dirs[0].indices, vec![2, 1]);
        let d = &dirs[0].directions;
        assert_eq!(d.shape(), (3, 2));
        assert_eq!(d.column(0).as_slice(), &[0.0, 0.0, 1.0]);
        assert!((d[(0, 1)] - 0.6).abs() < 1e-7 && (d[(1, 1)] - 0.8).abs() < 1e-7);
    }

    #[test]
    fn a_missing_sae_or_a_wrong_width_is_named() {
        let sae = test_util::sae_with_decoder(Resid::In(2), &[vec![1.0, 0.0], vec![0.0, 1.0]]);
        let sel = selection(Resid::In(3), 2, &[0]);
        assert!(matches!(
            feature_directions(&sel, std::slice::from_ref(&sae)),
            Err(ExplainError::MissingSae {
                hook: Resid::In(3),
                ..
            })
        ));
        let sel = selection(Resid::In(2), 5, &[0]);
        assert!(matches!(
            feature_directions(&sel, std::slice::from_ref(&sae)),
            Err(ExplainError::SaeWidth {
                selection: 5,
                sae: 2,
                ..
            })
        ));
        let mut sel = selection(Resid::In(2), 2, &[0]);
        sel.layers[0].features[0].index = 7;
        assert!(matches!(
            feature_directions(&sel, &[sae]),
            Err(ExplainError::FeatureIndex { index: 7, .. })
        ));
    }

    #[test]
    fn save_then_load_is_identity_and_unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EXPLAIN_FILE);
        let e = Explanations::new(ExplainConfig::default(), 3, Vec::new(), None, None);
        e.save(&path).unwrap();
        assert_eq!(Explanations::load(&path).unwrap(), e);
        let text = std::fs::read_to_string(&path).unwrap();
        let bad = text.replacen("{", "{\"extra\": 1,", 1);
        std::fs::write(&path, bad).unwrap();
        assert!(matches!(
            Explanations::load(&path),
            Err(ExplainError::Format { .. })
        ));
    }
}
