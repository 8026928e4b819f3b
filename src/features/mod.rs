//! features — harmful and harmless prompts → SAE feature activations pooled per prompt →
//! `Δ = |mean_harmful − mean_harmless|` per feature → the top-k safety features of each layer.
//!
//! In: a chat model, one SAE per layer, two prompt sets (training splits only).
//! Out: [`Selection`] (`features.json`) and [`PooledResiduals`] (`activations.safetensors`, the
//! raw residual stream pooled the same way, which the direct-identification baseline of the
//! `subspace` stage needs).

mod collect;
pub mod gate;
mod prompt_score;
mod score;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use collect::{
    collect, for_each_content_batch, prompt_tokens, ContentBatch, Pooled, Pooling, PromptTokens,
};
pub use prompt_score::{mean_direct, mean_feature_score, LayerInfo, LayerScore, PromptScorer};
pub use score::{deltas, score, top_k, FeatureScore, PooledSet};

use crate::model::load::ChatModel;
use crate::model::{ModelError, Resid};
use crate::sae::{hook_name, Sae, SaeError};

pub const SELECTION_FILE: &str = "features.json";
pub const ACTIVATIONS_FILE: &str = "activations.safetensors";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum FeatureError {
    #[error("harmful prompts pool to width {harmful} but harmless ones to {harmless}")]
    WidthMismatch { harmful: usize, harmless: usize },
    #[error("the {set} prompt set has {got} prompts; at least {min} are needed")]
    TooFewPrompts {
        set: &'static str,
        got: usize,
        min: usize,
    },
    #[error("asked for the top {wanted} features but only {got} differ at all between the sets")]
    TooFewFeatures { wanted: usize, got: usize },
    #[error("cannot find the content tokens of prompt {prompt:?}: {why}")]
    ContentSpan { prompt: String, why: String },
    #[error("the forward pass did not capture {hook}")]
    Capture { hook: Resid },
    #[error("two SAEs read the same position {hook}")]
    DuplicateHook { hook: Resid },
    #[error("{hook}: no SAE given for this selected layer")]
    MissingSae { hook: Resid },
    #[error("{hook}: the SAE has {sae} latents but the selection was made with {selection}")]
    SaeWidth {
        hook: Resid,
        sae: usize,
        selection: usize,
    },
    #[error(
        "{hook}: the features stage's pooled residuals (activations.safetensors) lack this layer"
    )]
    MissingResiduals { hook: Resid },
    #[error("{hook}: the training harmful and harmless mean residuals are equal; no direction")]
    NoDirection { hook: Resid },
    #[error("{hook}: kept feature {index} is outside the SAE's {d_sae} latents")]
    FeatureIndex {
        hook: Resid,
        index: usize,
        d_sae: usize,
    },
    #[error("{hook}: the kept features do not differ between the training sets (Σ|d| = 0)")]
    NoFeatureDifference { hook: Resid },
    #[error("invalid feature config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sae(#[from] SaeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<crate::model::chat::ChatError> for FeatureError {
    fn from(e: crate::model::chat::ChatError) -> Self {
        FeatureError::Model(e.into())
    }
}

impl From<crate::model::tokenizer::TokenizerError> for FeatureError {
    fn from(e: crate::model::tokenizer::TokenizerError) -> Self {
        FeatureError::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, FeatureError>;

/// Every field lands in `features.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    /// Features kept per layer. More than the LoRA rank, so that the subspace stage's energy cut
    /// (τ) has directions to choose from; the paper's rank-16 adapters are built from them.
    pub top_k: usize,
    pub pooling: Pooling,
    /// Bootstrap resamples for each kept feature's 95 % interval (0 skips the interval).
    pub bootstrap: usize,
    /// Seed of the bootstrap resampling.
    pub seed: u64,
    /// Prompts per forward pass (memory grows with it; speed barely does on 2 cores).
    pub batch_size: usize,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            top_k: 64,
            pooling: Pooling::Mean,
            bootstrap: 1000,
            seed: 0,
            batch_size: 8,
        }
    }
}

/// A prompt set's size and the sha256 of its prompts (joined by `\n`), for provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSetInfo {
    pub count: usize,
    pub sha256: String,
}

impl PromptSetInfo {
    pub fn of(prompts: &[String]) -> Self {
        let mut h = Sha256::new();
        for p in prompts {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        PromptSetInfo {
            count: prompts.len(),
            sha256: hex::encode(h.finalize()),
        }
    }
}

/// The kept features of one SAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSelection {
    pub hook: Resid,
    /// TransformerLens spelling of `hook` (`blocks.12.hook_resid_pre`).
    pub hook_name: String,
    /// Where the SAE came from (its folder or file), as given.
    pub sae: String,
    pub d_sae: usize,
    /// Descending Δ.
    pub features: Vec<FeatureScore>,
}

/// `features.json`: the selected safety features of every layer and how they were found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    pub format_version: u32,
    pub config: FeatureConfig,
    /// The model's file or folder.
    pub model: String,
    pub harmful: PromptSetInfo,
    pub harmless: PromptSetInfo,
    pub layers: Vec<LayerSelection>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FeatureError + '_ {
    move |source| FeatureError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Selection {
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| FeatureError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        crate::model::write_atomic(path, &bytes)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let sel: Selection = serde_json::from_str(&text).map_err(|e| FeatureError::Format {
            path: path.to_path_buf(),
            message: format!("not a features.json: {e}"),
        })?;
        if sel.format_version != FORMAT_VERSION {
            return Err(FeatureError::Format {
                path: path.to_path_buf(),
                message: format!(
                    "format_version {} (this build reads {FORMAT_VERSION})",
                    sel.format_version
                ),
            });
        }
        Ok(sel)
    }

    pub fn layer(&self, hook: Resid) -> Option<&LayerSelection> {
        self.layers.iter().find(|l| l.hook == hook)
    }
}

/// The raw residual stream pooled per prompt at every selected layer: `(n_prompts, d_model)`
/// for each set.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledResiduals {
    pub layers: BTreeMap<Resid, (PooledSet, PooledSet)>,
}

impl PooledResiduals {
    fn key(set: &str, hook: Resid) -> String {
        format!("{set}.{}", hook_name(hook))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = std::collections::HashMap::new();
        for (&hook, (harmful, harmless)) in &self.layers {
            for (set, s) in [("harmful", harmful), ("harmless", harmless)] {
                let t = Tensor::from_vec(s.values.clone(), (s.len(), s.width), &Device::Cpu)?;
                tensors.insert(Self::key(set, hook), t);
            }
        }
        crate::model::weights::save_safetensors_atomic(&tensors, path)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let tensors = crate::model::weights::load_safetensors_file(path, &Device::Cpu)?;
        let bad = |message: String| FeatureError::Format {
            path: path.to_path_buf(),
            message,
        };
        let mut sets: BTreeMap<Resid, [Option<PooledSet>; 2]> = BTreeMap::new();
        for (name, t) in tensors {
            let (set, hook) = name
                .split_once('.')
                .ok_or_else(|| bad(format!("tensor {name:?} is not <set>.<hook>")))?;
            let slot = match set {
                "harmful" => 0,
                "harmless" => 1,
                other => return Err(bad(format!("unknown prompt set {other:?} in {name:?}"))),
            };
            let hook = crate::sae::parse_hook(hook)?;
            let (n, width) = t.dims2()?;
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            sets.entry(hook).or_default()[slot] = Some(PooledSet {
                width,
                values,
                fired: vec![true; n * width],
            });
        }
        let layers = sets
            .into_iter()
            .map(|(hook, [h, b])| match (h, b) {
                (Some(h), Some(b)) => Ok((hook, (h, b))),
                _ => Err(bad(format!(
                    "{} lacks the harmful or the harmless set",
                    hook_name(hook)
                ))),
            })
            .collect::<Result<_>>()?;
        Ok(PooledResiduals { layers })
    }
}

/// One SAE and a label saying where it came from.
pub struct LabelledSae {
    pub sae: Sae,
    pub source: String,
}

/// Scores every SAE's features on the two prompt sets and keeps the top-k of each.
///
/// `on_progress(done, total)` counts prompts over both sets.
pub fn run(
    model: &ChatModel,
    saes: &[LabelledSae],
    harmful: &[String],
    harmless: &[String],
    cfg: &FeatureConfig,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<(Selection, PooledResiduals)> {
    if cfg.top_k == 0 {
        return Err(FeatureError::Config("top_k must be at least 1".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in saes {
        if !seen.insert(s.sae.hook()) {
            return Err(FeatureError::DuplicateHook { hook: s.sae.hook() });
        }
    }
    for (set, prompts) in [("harmful", harmful), ("harmless", harmless)] {
        if prompts.len() < 2 {
            return Err(FeatureError::TooFewPrompts {
                set,
                got: prompts.len(),
                min: 2,
            });
        }
    }
    let only: Vec<Sae> = saes.iter().map(|s| s.sae.clone()).collect();
    let total = harmful.len() + harmless.len();
    let mut pooled_h = collect(
        model,
        &only,
        harmful,
        cfg.pooling,
        cfg.batch_size,
        &mut |n| on_progress(n, total),
    )?;
    let mut pooled_b = collect(
        model,
        &only,
        harmless,
        cfg.pooling,
        cfg.batch_size,
        &mut |n| on_progress(harmful.len() + n, total),
    )?;
    let mut layers = Vec::new();
    let mut residuals = BTreeMap::new();
    for s in saes {
        let hook = s.sae.hook();
        let missing = || FeatureError::Capture { hook };
        let fh = pooled_h.features.remove(&hook).ok_or_else(missing)?;
        let fb = pooled_b.features.remove(&hook).ok_or_else(missing)?;
        let features = score(&fh, &fb, cfg.top_k, cfg.bootstrap, cfg.seed)?;
        tracing::info!(
            %hook,
            top_delta = features.first().map(|f| f.delta),
            robust = features.iter().filter(|f| f.robust).count(),
            "features scored"
        );
        layers.push(LayerSelection {
            hook,
            hook_name: hook_name(hook),
            sae: s.source.clone(),
            d_sae: s.sae.d_sae(),
            features,
        });
        let rh = pooled_h.resid.remove(&hook).ok_or_else(missing)?;
        let rb = pooled_b.resid.remove(&hook).ok_or_else(missing)?;
        residuals.insert(hook, (rh, rb));
    }
    let selection = Selection {
        format_version: FORMAT_VERSION,
        config: cfg.clone(),
        model: model.source.path().display().to_string(),
        harmful: PromptSetInfo::of(harmful),
        harmless: PromptSetInfo::of(harmless),
        layers,
    };
    Ok((selection, PooledResiduals { layers: residuals }))
}
