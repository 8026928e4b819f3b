//! subspace — selected SAE features → one orthonormal basis `U_l` (`d_model × r`) per layer, the
//! space the LoRA adapters start in; and the baselines built from the same data.
//!
//! In: `features::Selection` + the SAEs' decoders (SAILS), `features::PooledResiduals` (direct
//! identification), or only the layers and `d_model` (random). Out: [`Subspace`]
//! (`subspace.safetensors`, one `(d_model, r)` tensor `layers.<l>` per block input `l`, plus
//! `subspace.json` with what each layer kept, cut or padded).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::features::{PooledResiduals, PooledSet, Selection};
use crate::linalg::{self, LinalgError};
use crate::model::{ModelError, Resid};
use crate::sae::{Sae, SaeError};

pub const BASIS_FILE: &str = "subspace.safetensors";
pub const SUMMARY_FILE: &str = "subspace.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum SubspaceError {
    #[error("{hook}: no SAE given for a selected layer")]
    MissingSae { hook: Resid },
    #[error("{hook}: no pooled activations for a selected layer")]
    MissingActivations { hook: Resid },
    #[error("{hook}: feature {index} is outside the SAE's {d_sae} latents")]
    FeatureIndex {
        hook: Resid,
        index: usize,
        d_sae: usize,
    },
    #[error("{hook}: rank {rank} exceeds d_model {d_model}")]
    RankTooLarge {
        hook: Resid,
        rank: usize,
        d_model: usize,
    },
    #[error("two selected layers feed the same block input {block}")]
    DuplicateLayer { block: usize },
    #[error("invalid subspace config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Linalg(#[from] LinalgError),
    #[error(transparent)]
    Sae(#[from] SaeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, SubspaceError>;

/// Where the basis comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The selected features' unit decoder directions → principal components holding τ of their
    /// energy → QR (the method).
    Sails,
    /// A uniformly random orthonormal basis (baseline: is the subspace's content what helps?).
    Random,
    /// "Direct identification" in the raw activation space (baseline): the difference of the
    /// harmful and harmless mean activations, then the principal directions of the harmful
    /// activations taken relative to the harmless mean, with the mean difference projected out.
    Direct,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sails => "sails",
            Method::Random => "random",
            Method::Direct => "direct",
        }
    }
}

/// Every field lands in `subspace.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubspaceConfig {
    pub method: Method,
    /// Columns of each `U_l`: the LoRA rank.
    pub rank: usize,
    /// τ: the share of the decoder directions' energy the kept components must hold (the paper
    /// uses 0.8). The basis is then cut or padded to exactly `rank`, and the summary says which.
    pub energy_frac: f64,
    /// Seed of the random basis and of random padding.
    pub seed: u64,
}

impl Default for SubspaceConfig {
    fn default() -> Self {
        SubspaceConfig {
            method: Method::Sails,
            rank: 16,
            energy_frac: 0.8,
            seed: 0,
        }
    }
}

/// What one layer's basis is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerReport {
    pub hook: Resid,
    /// The block whose read-side modules see this basis (`Resid::In(l)` → l, `Out(l)` → l + 1).
    pub block_input: usize,
    /// Input rows the components came from (features for SAILS, prompts for direct; 0 random).
    pub rows_used: usize,
    /// Components needed to reach τ (SAILS and direct).
    pub components_for_tau: usize,
    /// Share of the input rows' energy held by the components in the basis.
    pub energy_kept: f64,
    /// Components needed for τ that the rank cut off.
    pub truncated: usize,
    /// Lower-energy components added to reach the rank.
    pub padded: usize,
    /// Random orthogonal directions added because the input spans fewer than `rank` dimensions.
    pub padded_random: usize,
    /// Share of each basis column's energy (descending), as a record of the spectrum.
    pub component_energy: Vec<f64>,
}

/// The subspace of every selected layer: `bases[l]` is `(d_model, rank)` with orthonormal
/// columns for block input `l`.
#[derive(Debug, Clone, PartialEq)]
pub struct Subspace {
    pub summary: SubspaceSummary,
    pub bases: BTreeMap<usize, DMatrix<f64>>,
}

/// `subspace.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubspaceSummary {
    pub format_version: u32,
    pub config: SubspaceConfig,
    pub d_model: usize,
    /// sha256 of the `features.json` this came from (none for a random basis built without one).
    pub features_sha256: Option<String>,
    /// Basis columns are unit directions in the raw residual stream; the read-side modules see it
    /// after the block's RMSNorm, whose per-dimension weight this basis does not fold in.
    pub norm_weight_folded: bool,
    pub layers: Vec<LayerReport>,
}

/// Principal directions of the rows of `rows` (`k × d`, uncentred), descending, with each one's
/// share of the total energy; only directions with non-negligible energy are returned.
///
/// Works through the `k × k` Gram matrix, so it stays cheap when `d` is large (Gemma's 3584).
fn row_components(rows: &DMatrix<f64>) -> Result<Vec<(DVector<f64>, f64)>> {
    if rows.iter().any(|v| !v.is_finite()) {
        return Err(LinalgError::NonFinite {
            what: "subspace input rows",
        }
        .into());
    }
    let gram = rows * rows.transpose(); // (k, k)
    let total = gram.trace();
    if total <= 0.0 {
        return Ok(Vec::new());
    }
    let eig = SymmetricEigen::new(gram);
    let mut order: Vec<usize> = (0..rows.nrows()).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    let largest = eig.eigenvalues[order[0]];
    Ok(order
        .into_iter()
        .filter(|&i| eig.eigenvalues[i] > linalg::RANK_TOL * largest)
        .map(|i| {
            let lambda = eig.eigenvalues[i];
            // right singular vector v = Dᵀ u / σ
            let v = rows.transpose() * eig.eigenvectors.column(i) / lambda.sqrt();
            (v, lambda / total)
        })
        .collect())
}

/// `rank` orthonormal columns from components (descending energy): enough for τ, cut or padded
/// with the next components, then random directions if the components run out.
fn basis_from_components(
    hook: Resid,
    components: &[(DVector<f64>, f64)],
    rows_used: usize,
    d_model: usize,
    cfg: &SubspaceConfig,
    rng: &mut StdRng,
) -> Result<(DMatrix<f64>, LayerReport)> {
    let r = cfg.rank;
    let mut cumulative = 0.0;
    let mut for_tau = components.len();
    for (j, (_, share)) in components.iter().enumerate() {
        cumulative += share;
        if cumulative >= cfg.energy_frac - 1e-12 {
            for_tau = j + 1;
            break;
        }
    }
    let from_components = r.min(components.len());
    let mut columns: Vec<DVector<f64>> = components[..from_components]
        .iter()
        .map(|(v, _)| v.clone())
        .collect();
    let padded_random = r - from_components;
    if padded_random > 0 {
        columns.extend(random_complement(&columns, d_model, padded_random, rng)?);
    }
    let basis = linalg::orthonormalize("subspace basis", &DMatrix::from_columns(&columns))?;
    let component_energy: Vec<f64> = components[..from_components]
        .iter()
        .map(|(_, s)| *s)
        .collect();
    let report = LayerReport {
        hook,
        block_input: hook.block_input_index(),
        rows_used,
        components_for_tau: for_tau,
        // `+ 0.0` turns the empty sum's −0.0 into 0.0
        energy_kept: component_energy.iter().sum::<f64>() + 0.0,
        truncated: for_tau.saturating_sub(r),
        padded: from_components.saturating_sub(for_tau),
        padded_random,
        component_energy,
    };
    Ok((basis, report))
}

/// `n` random unit directions orthogonal to `existing` and to each other.
fn random_complement(
    existing: &[DVector<f64>],
    d: usize,
    n: usize,
    rng: &mut StdRng,
) -> Result<Vec<DVector<f64>>> {
    let mut all: Vec<DVector<f64>> = existing.to_vec();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut v = DVector::from_vec(linalg::standard_normals(rng, d));
        for u in &all {
            let dot = u.dot(&v) / u.norm_squared();
            v -= u * dot;
        }
        let norm = v.norm();
        if norm > 1e-6 {
            v /= norm;
            all.push(v.clone());
            out.push(v);
        }
    }
    Ok(out)
}

fn check_rank(hook: Resid, rank: usize, d_model: usize) -> Result<()> {
    if rank == 0 || rank > d_model {
        return Err(SubspaceError::RankTooLarge {
            hook,
            rank,
            d_model,
        });
    }
    Ok(())
}

/// SAILS: the selected features' unit decoder rows `(k, d_model)` → τ components → `rank`.
pub fn from_decoder_rows(
    hook: Resid,
    w_dec: &Tensor,
    features: &[usize],
    cfg: &SubspaceConfig,
    rng: &mut StdRng,
) -> Result<(DMatrix<f64>, LayerReport)> {
    let (d_sae, d_model) = w_dec.dims2()?;
    check_rank(hook, cfg.rank, d_model)?;
    if let Some(&index) = features.iter().find(|&&i| i >= d_sae) {
        return Err(SubspaceError::FeatureIndex { hook, index, d_sae });
    }
    let index = Tensor::from_vec(
        features.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        features.len(),
        w_dec.device(),
    )?;
    let rows = w_dec
        .index_select(&index, 0)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let mut m = DMatrix::from_fn(rows.len(), d_model, |i, j| rows[i][j]);
    for mut row in m.row_iter_mut() {
        let norm = row.norm();
        if norm > 0.0 {
            row /= norm;
        }
    }
    basis_from_components(
        hook,
        &row_components(&m)?,
        features.len(),
        d_model,
        cfg,
        rng,
    )
}

fn to_matrix(s: &PooledSet) -> DMatrix<f64> {
    DMatrix::from_row_iterator(s.len(), s.width, s.values.iter().map(|&v| v as f64))
}

/// Direct identification from pooled raw activations: `μ_h − μ_b` normalised as the first
/// column, then the principal directions of `{x_i − μ_b}` over the harmful prompts with that
/// direction projected out.
pub fn direct(
    hook: Resid,
    harmful: &PooledSet,
    harmless: &PooledSet,
    cfg: &SubspaceConfig,
    rng: &mut StdRng,
) -> Result<(DMatrix<f64>, LayerReport)> {
    let d_model = harmful.width;
    check_rank(hook, cfg.rank, d_model)?;
    let h = to_matrix(harmful);
    let b = to_matrix(harmless);
    let mu_b = b.row_mean();
    let mut centred = h.clone();
    for mut row in centred.row_iter_mut() {
        row -= &mu_b;
    }
    let diff = h.row_mean() - &mu_b;
    let diff_norm = diff.norm();
    if diff_norm == 0.0 {
        return Err(LinalgError::RankDeficient {
            what: "difference of means",
            expected: 1,
            got: 0,
            tol: 0.0,
        }
        .into());
    }
    let dir = diff.transpose() / diff_norm; // (d, 1)
    let total_energy: f64 = centred.iter().map(|v| v * v).sum();
    let along: f64 = (&centred * &dir).iter().map(|v| v * v).sum();
    let mut deflated = centred.clone();
    deflated -= (&centred * &dir) * dir.transpose();
    // The deflated rows' components, with shares rescaled to the undeflated total so that the
    // first column's energy (along the mean difference) counts too.
    let rest = row_components(&deflated)?;
    let rest_total: f64 = deflated.iter().map(|v| v * v).sum();
    let mut components = vec![(
        DVector::from_column_slice(dir.as_slice()),
        along / total_energy,
    )];
    components.extend(
        rest.into_iter()
            .map(|(v, s)| (v, s * rest_total / total_energy)),
    );
    basis_from_components(hook, &components, harmful.len(), d_model, cfg, rng)
}

/// A uniformly random orthonormal basis (QR of a Gaussian matrix).
pub fn random(
    hook: Resid,
    d_model: usize,
    cfg: &SubspaceConfig,
    rng: &mut StdRng,
) -> Result<(DMatrix<f64>, LayerReport)> {
    check_rank(hook, cfg.rank, d_model)?;
    basis_from_components(hook, &[], 0, d_model, cfg, rng)
}

/// What a subspace is built from.
pub enum Inputs<'a> {
    Sails {
        selection: &'a Selection,
        saes: &'a [Sae],
    },
    Direct {
        selection: &'a Selection,
        activations: &'a PooledResiduals,
    },
    Random {
        hooks: &'a [Resid],
        d_model: usize,
    },
}

/// Builds one basis per layer with `cfg.method` from `inputs` (which must match the method).
pub fn run(
    cfg: &SubspaceConfig,
    inputs: Inputs<'_>,
    features_sha256: Option<String>,
) -> Result<Subspace> {
    if !(cfg.energy_frac > 0.0 && cfg.energy_frac <= 1.0) {
        return Err(SubspaceError::Config(format!(
            "energy_frac must be in (0, 1], got {}",
            cfg.energy_frac
        )));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut bases = BTreeMap::new();
    let mut reports = Vec::new();
    let mut d_model = 0;
    let mut add = |basis: DMatrix<f64>, report: LayerReport| -> Result<()> {
        d_model = basis.nrows();
        if bases.insert(report.block_input, basis).is_some() {
            return Err(SubspaceError::DuplicateLayer {
                block: report.block_input,
            });
        }
        reports.push(report);
        Ok(())
    };
    match (cfg.method, inputs) {
        (Method::Sails, Inputs::Sails { selection, saes }) => {
            for layer in &selection.layers {
                let sae = saes
                    .iter()
                    .find(|s| s.hook() == layer.hook)
                    .ok_or(SubspaceError::MissingSae { hook: layer.hook })?;
                let kept: Vec<usize> = layer.features.iter().map(|f| f.index).collect();
                let (b, r) = from_decoder_rows(layer.hook, &sae.w_dec, &kept, cfg, &mut rng)?;
                add(b, r)?;
            }
        }
        (
            Method::Direct,
            Inputs::Direct {
                selection,
                activations,
            },
        ) => {
            for layer in &selection.layers {
                let (h, b) = activations
                    .layers
                    .get(&layer.hook)
                    .ok_or(SubspaceError::MissingActivations { hook: layer.hook })?;
                let (basis, r) = direct(layer.hook, h, b, cfg, &mut rng)?;
                add(basis, r)?;
            }
        }
        (Method::Random, Inputs::Random { hooks, d_model }) => {
            for &hook in hooks {
                let (b, r) = random(hook, d_model, cfg, &mut rng)?;
                add(b, r)?;
            }
        }
        (method, _) => {
            return Err(SubspaceError::Config(format!(
                "method {} was given the inputs of another method",
                method.name()
            )))
        }
    }
    Ok(Subspace {
        summary: SubspaceSummary {
            format_version: FORMAT_VERSION,
            config: cfg.clone(),
            d_model,
            features_sha256,
            norm_weight_folded: false,
            layers: reports,
        },
        bases,
    })
}

impl Subspace {
    /// `(d_model, rank)` f32 tensors named `layers.<l>`, the form `LoraInit::Subspace` takes.
    pub fn tensors(&self, device: &Device) -> Result<BTreeMap<usize, Tensor>> {
        self.bases
            .iter()
            .map(|(&l, b)| {
                let (d, r) = b.shape();
                // nalgebra is column-major: the transpose's storage is the row-major (d, r).
                let data: Vec<f32> = b.transpose().iter().map(|&v| v as f32).collect();
                Ok((l, Tensor::from_vec(data, (d, r), device)?))
            })
            .collect()
    }

    /// Writes `subspace.safetensors` and `subspace.json` into `dir`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: std::collections::HashMap<String, Tensor> = self
            .tensors(&Device::Cpu)?
            .into_iter()
            .map(|(l, t)| (format!("layers.{l}"), t))
            .collect();
        crate::model::weights::save_safetensors_atomic(&tensors, &dir.join(BASIS_FILE))?;
        let json = serde_json::to_vec_pretty(&self.summary).map_err(|e| SubspaceError::Format {
            path: dir.join(SUMMARY_FILE),
            message: e.to_string(),
        })?;
        crate::model::write_atomic(&dir.join(SUMMARY_FILE), &json)?;
        Ok(())
    }

    /// Reads what [`Subspace::save`] wrote, checking that every basis has the summary's shape.
    pub fn load(dir: &Path) -> Result<Self> {
        let summary_path = dir.join(SUMMARY_FILE);
        let text = std::fs::read_to_string(&summary_path).map_err(|source| SubspaceError::Io {
            path: summary_path.clone(),
            source,
        })?;
        let bad = |path: &Path, message: String| SubspaceError::Format {
            path: path.to_path_buf(),
            message,
        };
        let summary: SubspaceSummary = serde_json::from_str(&text)
            .map_err(|e| bad(&summary_path, format!("not a subspace.json: {e}")))?;
        if summary.format_version != FORMAT_VERSION {
            return Err(bad(
                &summary_path,
                format!("format_version {}", summary.format_version),
            ));
        }
        let basis_path = dir.join(BASIS_FILE);
        let tensors = crate::model::weights::load_safetensors_file(&basis_path, &Device::Cpu)?;
        let mut bases = BTreeMap::new();
        for (name, t) in tensors {
            let l: usize = name
                .strip_prefix("layers.")
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| bad(&basis_path, format!("tensor {name:?} is not layers.<l>")))?;
            let (d, r) = t.dims2()?;
            if d != summary.d_model || r != summary.config.rank {
                return Err(bad(
                    &basis_path,
                    format!(
                        "{name} is {d}×{r}, expected {}×{}",
                        summary.d_model, summary.config.rank
                    ),
                ));
            }
            let rows = t.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            bases.insert(l, DMatrix::from_fn(d, r, |i, j| rows[i][j]));
        }
        let listed: Vec<usize> = summary.layers.iter().map(|l| l.block_input).collect();
        let stored: Vec<usize> = bases.keys().copied().collect();
        let mut listed_sorted = listed.clone();
        listed_sorted.sort_unstable();
        if listed_sorted != stored {
            return Err(bad(
                &basis_path,
                format!("holds layers {stored:?} but {SUMMARY_FILE} lists {listed:?}"),
            ));
        }
        Ok(Subspace { summary, bases })
    }
}

#[cfg(test)]
mod tests;
