//! The SAE route: train a TopK SAE on the samples with the project's trainer (`crate::sae`),
//! encode the samples, select features by Δ and turn their decoder rows into a rank-r basis.
//!
//! Everything SAE-specific the experiment needs passes through [`sae_basis`]; the SAE and its
//! trainer are the project's own, nothing here re-implements them.

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use super::generator::{ConceptModel, Samples};
use super::methods::{self, MethodConfig};
use super::TheoryError;
use crate::model::Resid;
use crate::sae::train::{train_topk, InMemoryActivations, SaeTrainConfig};
use candle_core::{Device, Tensor};

/// How the experiment trains its TopK SAE. Every field is written into results.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaeSettings {
    /// Run the SAE method at all (it dominates the run time).
    pub enabled: bool,
    /// SAE width per true concept: d_sae = round(width_per_concept · n). Below 1 the SAE must merge
    /// concepts; above 1 it may split them.
    pub width_per_concept: f64,
    /// Active latents per sample (TopK's k).
    pub k: usize,
    /// Optimiser steps (batch_size samples each).
    pub steps: usize,
    /// Samples per step (drawn with reshuffling from the training samples).
    pub batch_size: usize,
    /// Peak Adam learning rate. 3e-3 for 1000 steps reached the error of 1e-3 for 3000 steps on
    /// the default problem (d = 64, n = 256, ρ = 0.2, N = 10000).
    pub lr: f64,
}

impl Default for SaeSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            width_per_concept: 1.0,
            k: 8,
            steps: 1000,
            batch_size: 256,
            lr: 3e-3,
        }
    }
}

impl SaeSettings {
    pub fn validate(&self, at: &'static str) -> Result<(), TheoryError> {
        let bad = |value: String, expected: &'static str| {
            Err(TheoryError::InvalidConfig {
                field: at,
                value,
                expected,
            })
        };
        if !(self.width_per_concept > 0.0 && self.width_per_concept.is_finite()) {
            return bad(
                format!("width_per_concept = {}", self.width_per_concept),
                "> 0",
            );
        }
        if self.k == 0 || self.steps == 0 || self.batch_size == 0 {
            return bad(
                format!(
                    "k = {}, steps = {}, batch_size = {}",
                    self.k, self.steps, self.batch_size
                ),
                "k, steps and batch_size ≥ 1",
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr = {}", self.lr), "> 0");
        }
        Ok(())
    }

    /// d_sae for `n` concepts (at least k, so TopK is well defined).
    pub fn d_sae(&self, n: usize) -> usize {
        ((self.width_per_concept * n as f64).round() as usize).max(self.k)
    }
}

/// One point of the SAE-quality sweep: a name and the settings it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeVariant {
    pub name: String,
    pub width_per_concept: Option<f64>,
    pub k: Option<usize>,
    pub steps: Option<usize>,
    pub lr: Option<f64>,
}

impl SaeVariant {
    pub fn defaults() -> Vec<SaeVariant> {
        let v =
            |name: &str, width: Option<f64>, k: Option<usize>, steps: Option<usize>| SaeVariant {
                name: name.into(),
                width_per_concept: width,
                k,
                steps,
                lr: None,
            };
        vec![
            v("default", None, None, None),
            v("narrow (width n/4)", Some(0.25), None, None),
            v("wide (width 2n)", Some(2.0), None, None),
            v("undertrained (100 steps)", None, None, Some(100)),
            v("dense (k = 32)", None, Some(32), None),
        ]
    }

    /// The base settings with this variant's changes.
    pub fn apply(&self, base: &SaeSettings) -> SaeSettings {
        SaeSettings {
            width_per_concept: self.width_per_concept.unwrap_or(base.width_per_concept),
            k: self.k.unwrap_or(base.k),
            steps: self.steps.unwrap_or(base.steps),
            lr: self.lr.unwrap_or(base.lr),
            ..base.clone()
        }
    }
}

/// What the SAE route produced, with diagnostics that explain its failures.
#[derive(Debug, Clone)]
pub struct SaeOutcome {
    /// Orthonormal basis of the estimated subspace: (d, r).
    pub basis: DMatrix<f64>,
    pub diagnostics: SaeDiagnostics,
}

/// How good the trained SAE is, measured against the known concepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeDiagnostics {
    pub d_sae: usize,
    /// Fraction of variance unexplained by the reconstruction, on the training samples.
    pub fvu: f64,
    /// For each safety concept, the largest |cos| between its direction and any decoder row:
    /// near 1 means the SAE has a latent for it; lower means it was absorbed or split.
    pub safety_best_cos: Vec<f64>,
    /// For each kept latent, the largest |cos| between its decoder row and a safety direction.
    pub kept_best_cos: Vec<f64>,
}

/// Trains a TopK SAE on `samples` with the project's trainer (`crate::sae::train::train_topk`),
/// encodes the same samples, selects latents by Δ and returns the rank-r basis of their decoder
/// rows, with diagnostics against the true concepts.
///
/// The trainer's schedule is scaled to this small problem: warm-up of a tenth of the steps (at most
/// 100), a latent counts as dead after 20 batches without firing (so auxiliary-k acts within the
/// run), the input scale and `b_dec` are initialised from up to 4096 samples.
pub fn sae_basis(
    settings: &SaeSettings,
    model: &ConceptModel,
    samples: &Samples,
    cfg: &MethodConfig,
    seed: u64,
) -> Result<SaeOutcome, TheoryError> {
    let sae_err = |e: &dyn std::fmt::Display| TheoryError::Sae {
        message: e.to_string(),
    };
    let (n_samples, d) = samples.x.shape();
    let device = Device::Cpu;
    // (N, d) row-major f32 for candle; nalgebra stores column-major, so go row by row.
    let mut data = Vec::with_capacity(n_samples * d);
    for row in samples.x.row_iter() {
        data.extend(row.iter().map(|v| *v as f32));
    }
    let x = Tensor::from_vec(data, (n_samples, d), &device).map_err(|e| sae_err(&e))?;
    let d_sae = settings.d_sae(model.cfg.n);
    let train_cfg = SaeTrainConfig {
        d_sae,
        k: settings.k.min(d_sae),
        batch_size: settings.batch_size,
        total_tokens: (settings.steps * settings.batch_size) as u64,
        lr: settings.lr,
        lr_warmup_steps: (settings.steps / 10).min(100),
        dead_tokens_threshold: (20 * settings.batch_size) as u64,
        init_sample_tokens: n_samples.clamp(2, 4096),
        seed,
        checkpoint_every: 0,
        log_every: (settings.steps / 10).max(1),
        ..SaeTrainConfig::default()
    };
    // The hook is irrelevant for synthetic activations; Resid::In(0) only labels the SAE.
    let mut source =
        InMemoryActivations::new(x.clone(), Resid::In(0), seed ^ 0x5AE).map_err(|e| sae_err(&e))?;
    let (sae, _report) =
        train_topk(&train_cfg, &mut source, &device, None).map_err(|e| sae_err(&e))?;

    let codes = sae.encode(&x).map_err(|e| sae_err(&e))?; // (N, d_sae)
    let recon = sae.decode(&codes).map_err(|e| sae_err(&e))?; // (N, d)
    let codes: Vec<Vec<f32>> = codes.to_vec2().map_err(|e| sae_err(&e))?;
    let recon: Vec<Vec<f32>> = recon.to_vec2().map_err(|e| sae_err(&e))?;
    let sparse: Vec<Vec<(usize, f64)>> = codes
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, v)| **v != 0.0)
                .map(|(i, v)| (i, *v as f64))
                .collect()
        })
        .collect();
    let mean = samples.x.row_mean();
    let (mut resid, mut total) = (0.0, 0.0);
    for (i, rec) in recon.iter().enumerate() {
        for (j, v) in rec.iter().enumerate() {
            resid += (samples.x[(i, j)] - *v as f64).powi(2);
            total += (samples.x[(i, j)] - mean[j]).powi(2);
        }
    }
    let fvu = if total > 0.0 { resid / total } else { 0.0 };
    let w_dec: Vec<Vec<f32>> = sae.w_dec.to_vec2().map_err(|e| sae_err(&e))?; // (d_sae, d)
    let decoder = DMatrix::from_fn(d, d_sae, |i, j| w_dec[j][i] as f64); // columns = latents
    let (basis, kept) =
        methods::dictionary_selection(&sparse, &samples.unaligned, &decoder, model.cfg.r, cfg)?;
    Ok(SaeOutcome {
        basis,
        diagnostics: diagnose(model, &decoder, &kept, fvu),
    })
}

/// Diagnostics from a decoder (`d × d_sae`, columns = latent directions) against the concepts.
pub fn diagnose(
    model: &ConceptModel,
    decoder: &DMatrix<f64>,
    kept: &[usize],
    fvu: f64,
) -> SaeDiagnostics {
    let r = model.cfg.r;
    let mut unit = decoder.clone();
    for mut col in unit.column_iter_mut() {
        let norm = col.norm();
        if norm > 0.0 {
            col /= norm;
        }
    }
    let safety = model.directions.columns(0, r);
    let cos = unit.transpose() * safety; // (d_sae, r)
    let safety_best_cos = (0..r)
        .map(|j| cos.column(j).iter().fold(0.0f64, |m, v| m.max(v.abs())))
        .collect();
    let kept_best_cos = kept
        .iter()
        .map(|&i| cos.row(i).iter().fold(0.0f64, |m, v| m.max(v.abs())))
        .collect();
    SaeDiagnostics {
        d_sae: decoder.ncols(),
        fvu,
        safety_best_cos,
        kept_best_cos,
    }
}
