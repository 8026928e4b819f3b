//! Estimators of the safety subspace, each returning an orthonormal basis Û (`d × r̂`).
//!
//! Direct identification works on the raw (polysemantic) activations:
//! * [`mean_diff`] — μ_unaligned − μ_aligned, a single direction (r̂ = 1), the usual
//!   "refusal direction". Being rank 1, its error can never fall below √(r − 1).
//! * [`class_mean_diff`] — one difference of means per harm category (μ_c − μ_aligned), r of them,
//!   orthonormalised. Uses the category labels.
//! * [`pca_diff`] — top-r eigenvectors of the uncentred second moment of the differences
//!   x_i − μ_aligned over the unaligned samples. Binary labels only.
//! * [`probe`] — L2-regularised logistic regression, one-vs-rest per category (category c vs the
//!   aligned samples), weights of the r probes orthonormalised. Uses the category labels.
//!
//! Dictionary-based identification (the method): score each feature by
//! Δ_i = |mean_unaligned a_i − mean_aligned a_i|, keep the top-k (k ≥ r), stack their unit decoder
//! directions and reduce them to rank r ([`basis_from_directions`]). [`ideal_dictionary`] does this
//! with the true concept activations and directions (the monosemantic limit); `sae` with a trained
//! SAE's encodings and decoder rows.

use nalgebra::{DMatrix, DVector};
use serde::{Deserialize, Serialize};

use super::generator::{ConceptModel, Samples};
use super::TheoryError;
use crate::linalg;

/// The estimators compared by the experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    MeanDiff,
    ClassMeanDiff,
    PcaDiff,
    Probe,
    IdealDictionary,
    Sae,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::MeanDiff,
        Method::ClassMeanDiff,
        Method::PcaDiff,
        Method::Probe,
        Method::IdealDictionary,
        Method::Sae,
    ];

    /// The spelling used in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::MeanDiff => "mean_diff",
            Method::ClassMeanDiff => "class_mean_diff",
            Method::PcaDiff => "pca_diff",
            Method::Probe => "probe",
            Method::IdealDictionary => "ideal_dictionary",
            Method::Sae => "sae",
        }
    }

    /// Direct (raw activation space) or through a dictionary.
    pub fn is_direct(self) -> bool {
        matches!(
            self,
            Method::MeanDiff | Method::ClassMeanDiff | Method::PcaDiff | Method::Probe
        )
    }
}

/// Settings of the estimators themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodConfig {
    /// Features kept by Δ-based selection (k ≥ r; 0 means k = r). With k > r the k decoder
    /// directions are reduced to r by uncentred PCA, as the method does with its energy cut.
    pub select_k: usize,
    /// L2 penalty λ on the probe weights (loss = mean log-loss + λ/2 ‖w‖²).
    pub probe_l2: f64,
    /// Full-batch Nesterov gradient steps per probe.
    pub probe_steps: usize,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            select_k: 0,
            probe_l2: 1e-3,
            probe_steps: 300,
        }
    }
}

fn class_indices(s: &Samples) -> (Vec<usize>, Vec<usize>) {
    let aligned = (0..s.len()).filter(|&i| !s.unaligned[i]).collect();
    let unaligned = (0..s.len()).filter(|&i| s.unaligned[i]).collect();
    (aligned, unaligned)
}

fn mean_of_rows(x: &DMatrix<f64>, rows: &[usize]) -> DVector<f64> {
    let mut m = DVector::zeros(x.ncols());
    for &i in rows {
        m += x.row(i).transpose();
    }
    m / rows.len().max(1) as f64
}

fn need(what: &'static str, got: usize, min: usize) -> Result<(), TheoryError> {
    if got < min {
        return Err(TheoryError::TooFewSamples { what, got, min });
    }
    Ok(())
}

/// μ_unaligned − μ_aligned, normalised: a `d × 1` basis.
pub fn mean_diff(s: &Samples) -> Result<DMatrix<f64>, TheoryError> {
    let (a, u) = class_indices(s);
    need("aligned samples", a.len(), 1)?;
    need("unaligned samples", u.len(), 1)?;
    let diff = mean_of_rows(&s.x, &u) - mean_of_rows(&s.x, &a);
    Ok(linalg::orthonormalize(
        "mean_diff",
        &DMatrix::from_column_slice(diff.len(), 1, diff.as_slice()),
    )?)
}

fn category_rows(s: &Samples, r: usize) -> Result<Vec<Vec<usize>>, TheoryError> {
    let mut rows = vec![Vec::new(); r];
    for (i, c) in s.category.iter().enumerate() {
        if let Some(c) = c {
            rows[*c].push(i);
        }
    }
    for cat in &rows {
        need("unaligned samples in every category", cat.len(), 1)?;
    }
    Ok(rows)
}

/// One difference of means per harm category, orthonormalised: `d × r`.
pub fn class_mean_diff(s: &Samples, r: usize) -> Result<DMatrix<f64>, TheoryError> {
    let (a, _) = class_indices(s);
    need("aligned samples", a.len(), 1)?;
    let mu_a = mean_of_rows(&s.x, &a);
    let cats = category_rows(s, r)?;
    let mut diffs = DMatrix::zeros(s.x.ncols(), r);
    for (c, rows) in cats.iter().enumerate() {
        diffs.set_column(c, &(mean_of_rows(&s.x, rows) - &mu_a));
    }
    Ok(linalg::orthonormalize("class_mean_diff", &diffs)?)
}

/// Top-r eigenvectors of (1/N_u) Σ_unaligned (x_i − μ_aligned)(x_i − μ_aligned)ᵀ: `d × r`.
pub fn pca_diff(s: &Samples, r: usize) -> Result<DMatrix<f64>, TheoryError> {
    let (a, u) = class_indices(s);
    need("aligned samples", a.len(), 1)?;
    need("unaligned samples", u.len(), r)?;
    let mu_a = mean_of_rows(&s.x, &a);
    let mut diffs = s.x.select_rows(&u); // (N_u, d)
    for mut row in diffs.row_iter_mut() {
        row -= mu_a.transpose();
    }
    let second = diffs.tr_mul(&diffs) / u.len() as f64; // (d, d)
    let (basis, _) = linalg::top_eigenvectors("pca_diff", &second, r)?;
    Ok(basis)
}

fn sigmoid(t: f64) -> f64 {
    if t >= 0.0 {
        1.0 / (1.0 + (-t).exp())
    } else {
        let e = t.exp();
        e / (1.0 + e)
    }
}

/// Weight vector of an L2-regularised logistic regression of `y` on the rows of `x`, fitted by
/// full-batch Nesterov gradient descent with step 1/L (L bounds the loss's curvature).
///
/// The features are centred first (the bias absorbs the mean), so only the direction matters.
pub fn logistic_weights(x: &DMatrix<f64>, y: &[f64], l2: f64, steps: usize) -> DVector<f64> {
    let (n, d) = x.shape();
    let mean = x.row_mean();
    let mut xc = x.clone();
    for mut row in xc.row_iter_mut() {
        row -= &mean;
    }
    let y = DVector::from_column_slice(y);
    // L ≤ (λ_max(XᵀX/N) + 1)/4 + λ for the log-loss with a bias column; λ_max by power iteration.
    let gram = xc.tr_mul(&xc) / n as f64;
    let mut v = DVector::from_element(d, 1.0 / (d as f64).sqrt());
    let mut lam_max = 0.0;
    for _ in 0..50 {
        let w = &gram * &v;
        lam_max = w.norm();
        if lam_max == 0.0 {
            break;
        }
        v = w / lam_max;
    }
    let step = 1.0 / ((lam_max + 1.0) / 4.0 + l2);
    let (mut w, mut b) = (DVector::zeros(d), 0.0);
    let (mut w_prev, mut b_prev) = (w.clone(), b);
    for t in 0..steps {
        let momentum = t as f64 / (t as f64 + 3.0);
        let wl = &w + (&w - &w_prev) * momentum;
        let bl = b + (b - b_prev) * momentum;
        let mut resid = &xc * &wl;
        for (i, z) in resid.iter_mut().enumerate() {
            *z = sigmoid(*z + bl) - y[i];
        }
        let gw = xc.tr_mul(&resid) / n as f64 + &wl * l2;
        let gb = resid.sum() / n as f64;
        w_prev = std::mem::replace(&mut w, wl - gw * step);
        b_prev = std::mem::replace(&mut b, bl - gb * step);
    }
    w
}

/// One-vs-rest logistic probes (category c against the aligned samples), weights orthonormalised:
/// `d × r`.
pub fn probe(s: &Samples, r: usize, cfg: &MethodConfig) -> Result<DMatrix<f64>, TheoryError> {
    let (a, _) = class_indices(s);
    need("aligned samples", a.len(), 1)?;
    let cats = category_rows(s, r)?;
    let mut weights = DMatrix::zeros(s.x.ncols(), r);
    for (c, rows) in cats.iter().enumerate() {
        let idx: Vec<usize> = a.iter().chain(rows).copied().collect();
        let y: Vec<f64> = (0..idx.len())
            .map(|i| if i < a.len() { 0.0 } else { 1.0 })
            .collect();
        let w = logistic_weights(&s.x.select_rows(&idx), &y, cfg.probe_l2, cfg.probe_steps);
        weights.set_column(c, &w);
    }
    Ok(linalg::orthonormalize("probe", &weights)?)
}

/// Per-feature Δ_i = |mean_unaligned a_i − mean_aligned a_i| from sparse feature activations.
pub fn feature_deltas(
    acts: &[Vec<(usize, f64)>],
    unaligned: &[bool],
    n_features: usize,
) -> Result<Vec<f64>, TheoryError> {
    let mut sum_u = vec![0.0; n_features];
    let mut sum_a = vec![0.0; n_features];
    let (mut n_u, mut n_a) = (0usize, 0usize);
    for (row, &u) in acts.iter().zip(unaligned) {
        let (sum, count) = if u {
            (&mut sum_u, &mut n_u)
        } else {
            (&mut sum_a, &mut n_a)
        };
        *count += 1;
        for &(i, v) in row {
            sum[i] += v;
        }
    }
    need("aligned samples", n_a, 1)?;
    need("unaligned samples", n_u, 1)?;
    Ok(sum_u
        .iter()
        .zip(&sum_a)
        .map(|(su, sa)| (su / n_u as f64 - sa / n_a as f64).abs())
        .collect())
}

/// Indices of the `k` largest Δ (descending; ties by index). Features with Δ = 0 are never kept.
pub fn select_top_k(deltas: &[f64], k: usize) -> Result<Vec<usize>, TheoryError> {
    let mut order: Vec<usize> = (0..deltas.len()).filter(|&i| deltas[i] > 0.0).collect();
    if order.len() < k {
        return Err(TheoryError::TooFewFeatures {
            wanted: k,
            got: order.len(),
        });
    }
    order.sort_by(|&i, &j| deltas[j].total_cmp(&deltas[i]).then(i.cmp(&j)));
    order.truncate(k);
    Ok(order)
}

/// Rank-r basis from k ≥ r direction columns (`d × k`): unit-normalise each, then orthonormalise
/// them when k = r, else keep the top-r uncentred principal directions.
pub fn basis_from_directions(dirs: &DMatrix<f64>, r: usize) -> Result<DMatrix<f64>, TheoryError> {
    let mut unit = dirs.clone();
    for mut col in unit.column_iter_mut() {
        let norm = col.norm();
        if norm > 0.0 {
            col /= norm;
        }
    }
    if unit.ncols() == r {
        Ok(linalg::orthonormalize(
            "selected decoder directions",
            &unit,
        )?)
    } else {
        let (basis, _) =
            linalg::top_row_directions("selected decoder directions", &unit.transpose(), r)?;
        Ok(basis)
    }
}

/// The effective k of Δ-based selection.
pub fn effective_k(cfg: &MethodConfig, r: usize) -> Result<usize, TheoryError> {
    match cfg.select_k {
        0 => Ok(r),
        k if k >= r => Ok(k),
        k => Err(TheoryError::InvalidConfig {
            field: "methods.select_k",
            value: k.to_string(),
            expected: "0 (= r) or k ≥ r",
        }),
    }
}

/// Δ-based selection with the true concepts as the dictionary (the monosemantic limit).
pub fn ideal_dictionary(
    model: &ConceptModel,
    s: &Samples,
    cfg: &MethodConfig,
) -> Result<DMatrix<f64>, TheoryError> {
    let r = model.cfg.r;
    let deltas = feature_deltas(&s.concepts, &s.unaligned, model.cfg.n)?;
    let kept = select_top_k(&deltas, effective_k(cfg, r)?)?;
    basis_from_directions(&model.directions.select_columns(&kept), r)
}

/// Δ-based selection through any dictionary: `codes` are per-sample sparse feature activations,
/// `decoder` holds one decoder direction per feature as a column (`d × n_features`).
pub fn dictionary_selection(
    codes: &[Vec<(usize, f64)>],
    unaligned: &[bool],
    decoder: &DMatrix<f64>,
    r: usize,
    cfg: &MethodConfig,
) -> Result<(DMatrix<f64>, Vec<usize>), TheoryError> {
    let deltas = feature_deltas(codes, unaligned, decoder.ncols())?;
    let kept = select_top_k(&deltas, effective_k(cfg, r)?)?;
    let basis = basis_from_directions(&decoder.select_columns(&kept), r)?;
    Ok((basis, kept))
}
