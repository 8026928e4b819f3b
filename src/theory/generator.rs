//! The generative model: sparse concepts in superposition, a known safety subspace, entanglement.
//!
//! * **Concepts.** `n` unit directions f_1 … f_n in R^d (n may exceed d: superposition). The first
//!   `r` are the *safety* concepts; U = span(f_1 … f_r) is the subspace to recover. Directions are
//!   i.i.d. uniform on the sphere (`ConceptGeometry::Random`, optionally with the r safety directions
//!   orthonormalised among themselves) or exactly orthonormal (`Orthogonal`, needs n ≤ d).
//! * **Nuisance concepts.** Each safety concept j owns `nuisance_per_safety` non-safety concepts
//!   N_j (indices r + j·m … r + (j+1)·m − 1). They are ordinary concepts with their own directions.
//! * **Labels.** A sample is *unaligned* with probability `unaligned_frac`, else *aligned*. An
//!   unaligned sample belongs to a harm category c, uniform over the r safety concepts.
//! * **Firing.** Safety concept j fires with probability `safety_rate_on` in an unaligned sample of
//!   category j and `safety_rate_base` otherwise (both classes). Every non-safety concept fires
//!   independently with `p_bg = background_active / (n − r)`. *Entanglement* ρ: whenever safety
//!   concept j fires, each nuisance concept in N_j also fires with probability ρ (on top of its
//!   background rate). So nuisance concepts are more frequent in unaligned samples, and their
//!   directions leak into any statistic that contrasts the classes in activation space.
//! * **Activations.** A firing concept gets a magnitude ~ Uniform[magnitude_min, magnitude_max];
//!   x = Σ_k z_k f_k + σ·ε with ε ~ N(0, I_d), σ = `noise_sd`.
//!
//! Population class means follow in closed form (see [`ConceptModel::population_class_means`]),
//! which gives the infinite-sample floor of difference-of-means identification.

use nalgebra::{DMatrix, DVector};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::TheoryError;
use crate::linalg;

/// How the concept directions are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConceptGeometry {
    /// i.i.d. uniform unit vectors: with n > d they overlap (superposition).
    Random,
    /// An orthonormal set (n ≤ d): no superposition, the textbook-easy case.
    Orthogonal,
}

/// The generator's parameters. Every field is written into results.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Ambient (activation) dimension d.
    pub d: usize,
    /// Number of concepts n; n / d is the superposition ratio.
    pub n: usize,
    /// Dimension r of the safety subspace (the first r concepts).
    pub r: usize,
    /// Layout of the concept directions.
    pub geometry: ConceptGeometry,
    /// Orthonormalise the r safety directions among themselves (Random geometry only). Keeps U
    /// well conditioned so that errors come from the estimators, not from nearly parallel f_j.
    pub orthogonalize_safety: bool,
    /// Fraction of samples that are unaligned.
    pub unaligned_frac: f64,
    /// Firing probability of safety concept c in an unaligned sample of category c.
    pub safety_rate_on: f64,
    /// Firing probability of a safety concept otherwise (aligned samples, other categories).
    pub safety_rate_base: f64,
    /// Expected number of non-safety concepts firing per sample from the background alone;
    /// p_bg = background_active / (n − r). Held fixed when n varies, so sparsity stays comparable.
    pub background_active: f64,
    /// Nuisance concepts per safety concept (m). Needs n ≥ r·(1 + m).
    pub nuisance_per_safety: usize,
    /// Entanglement ρ ∈ [0, 1]: probability that each nuisance concept of j co-fires when j fires.
    pub entanglement: f64,
    /// Lower end of the uniform firing magnitude.
    pub magnitude_min: f64,
    /// Upper end of the uniform firing magnitude.
    pub magnitude_max: f64,
    /// Standard deviation of the isotropic Gaussian noise per coordinate.
    pub noise_sd: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            d: 64,
            n: 256,
            r: 4,
            geometry: ConceptGeometry::Random,
            orthogonalize_safety: true,
            unaligned_frac: 0.5,
            safety_rate_on: 0.8,
            safety_rate_base: 0.02,
            background_active: 4.0,
            nuisance_per_safety: 2,
            entanglement: 0.2,
            magnitude_min: 0.5,
            magnitude_max: 1.5,
            noise_sd: 0.05,
        }
    }
}

impl GeneratorConfig {
    /// Rejects parameter combinations the model cannot realise, naming the field.
    pub fn validate(&self) -> Result<(), TheoryError> {
        let bad = |field: &'static str, value: String, expected: &'static str| {
            Err(TheoryError::InvalidConfig {
                field,
                value,
                expected,
            })
        };
        if self.d == 0 {
            return bad("generator.d", self.d.to_string(), "d ≥ 1");
        }
        if self.r == 0 || self.r > self.d {
            return bad("generator.r", self.r.to_string(), "1 ≤ r ≤ d");
        }
        let need = self.r * (1 + self.nuisance_per_safety);
        if self.n < need || self.n == self.r {
            return bad(
                "generator.n",
                format!(
                    "{} (r = {}, m = {})",
                    self.n, self.r, self.nuisance_per_safety
                ),
                "n ≥ r·(1 + nuisance_per_safety) and n > r",
            );
        }
        if self.geometry == ConceptGeometry::Orthogonal && self.n > self.d {
            return bad(
                "generator.n",
                format!("{} with d = {}", self.n, self.d),
                "n ≤ d for orthogonal geometry",
            );
        }
        for (field, p) in [
            ("generator.unaligned_frac", self.unaligned_frac),
            ("generator.safety_rate_on", self.safety_rate_on),
            ("generator.safety_rate_base", self.safety_rate_base),
            ("generator.entanglement", self.entanglement),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(field, p.to_string(), "a probability in [0, 1]");
            }
        }
        if !(0.0 < self.unaligned_frac && self.unaligned_frac < 1.0) {
            return bad(
                "generator.unaligned_frac",
                self.unaligned_frac.to_string(),
                "strictly between 0 and 1 (both classes needed)",
            );
        }
        let p_bg = self.background_rate();
        if !(0.0..=1.0).contains(&p_bg) || !p_bg.is_finite() {
            return bad(
                "generator.background_active",
                self.background_active.to_string(),
                "0 ≤ background_active ≤ n − r",
            );
        }
        if !(self.magnitude_min >= 0.0 && self.magnitude_max >= self.magnitude_min) {
            return bad(
                "generator.magnitude_min/max",
                format!("[{}, {}]", self.magnitude_min, self.magnitude_max),
                "0 ≤ magnitude_min ≤ magnitude_max",
            );
        }
        if !(self.noise_sd >= 0.0 && self.noise_sd.is_finite()) {
            return bad("generator.noise_sd", self.noise_sd.to_string(), "≥ 0");
        }
        Ok(())
    }

    /// Background firing probability of each non-safety concept.
    pub fn background_rate(&self) -> f64 {
        self.background_active / (self.n - self.r) as f64
    }

    /// Mean firing magnitude.
    pub fn magnitude_mean(&self) -> f64 {
        0.5 * (self.magnitude_min + self.magnitude_max)
    }
}

/// A drawn concept geometry: the directions and the known safety subspace.
#[derive(Debug, Clone)]
pub struct ConceptModel {
    pub cfg: GeneratorConfig,
    /// Concept directions as columns, unit norm: (d, n).
    pub directions: DMatrix<f64>,
    /// Orthonormal basis of the safety subspace U: (d, r).
    pub safety_basis: DMatrix<f64>,
}

/// Samples drawn from a [`ConceptModel`].
#[derive(Debug, Clone)]
pub struct Samples {
    /// Activations, one sample per row: (N, d).
    pub x: DMatrix<f64>,
    /// true = unaligned, false = aligned.
    pub unaligned: Vec<bool>,
    /// Harm category (index of a safety concept) of each unaligned sample; None when aligned.
    pub category: Vec<Option<usize>>,
    /// True concept activations of each sample, sparse: (concept index, magnitude).
    pub concepts: Vec<Vec<(usize, f64)>>,
}

impl Samples {
    pub fn len(&self) -> usize {
        self.unaligned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.unaligned.is_empty()
    }
}

/// One standard normal draw (Box–Muller); avoids a distribution crate for one function.
pub fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl ConceptModel {
    /// Draws the concept directions from `seed`.
    pub fn draw(cfg: &GeneratorConfig, seed: u64) -> Result<Self, TheoryError> {
        cfg.validate()?;
        let (d, n, r) = (cfg.d, cfg.n, cfg.r);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut dirs = DMatrix::from_fn(d, n, |_, _| standard_normal(&mut rng));
        match cfg.geometry {
            ConceptGeometry::Orthogonal => {
                dirs = linalg::orthonormalize("orthogonal concepts", &dirs)?;
            }
            ConceptGeometry::Random => {
                if cfg.orthogonalize_safety {
                    let q =
                        linalg::orthonormalize("safety directions", &dirs.columns(0, r).into())?;
                    dirs.columns_mut(0, r).copy_from(&q);
                }
            }
        }
        for mut col in dirs.column_iter_mut() {
            let norm = col.norm();
            if norm == 0.0 {
                return Err(TheoryError::Degenerate {
                    what: "a concept direction drew the zero vector",
                });
            }
            col /= norm;
        }
        let safety_basis = linalg::orthonormalize("safety subspace", &dirs.columns(0, r).into())?;
        Ok(Self {
            cfg: cfg.clone(),
            directions: dirs,
            safety_basis,
        })
    }

    /// Indices of the nuisance concepts of safety concept `j`.
    pub fn nuisance_of(&self, j: usize) -> std::ops::Range<usize> {
        let m = self.cfg.nuisance_per_safety;
        let start = self.cfg.r + j * m;
        start..start + m
    }

    /// Draws `n_samples` labelled activations from `seed`.
    pub fn sample(&self, n_samples: usize, seed: u64) -> Samples {
        let c = &self.cfg;
        let (d, n, r) = (c.d, c.n, c.r);
        let p_bg = c.background_rate();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = DMatrix::zeros(n_samples, d);
        let mut unaligned = Vec::with_capacity(n_samples);
        let mut category = Vec::with_capacity(n_samples);
        let mut concepts = Vec::with_capacity(n_samples);
        let mut fired = vec![false; n];
        for i in 0..n_samples {
            let is_unaligned = rng.random::<f64>() < c.unaligned_frac;
            let cat = is_unaligned.then(|| rng.random_range(0..r));
            fired.iter_mut().for_each(|f| *f = false);
            for (j, f) in fired.iter_mut().enumerate().take(r) {
                let p = if cat == Some(j) {
                    c.safety_rate_on
                } else {
                    c.safety_rate_base
                };
                *f = rng.random::<f64>() < p;
            }
            for f in fired.iter_mut().skip(r) {
                *f = rng.random::<f64>() < p_bg;
            }
            for j in 0..r {
                if fired[j] {
                    for k in self.nuisance_of(j) {
                        if rng.random::<f64>() < c.entanglement {
                            fired[k] = true;
                        }
                    }
                }
            }
            let mut active = Vec::new();
            for (k, _) in fired.iter().enumerate().filter(|(_, f)| **f) {
                let mag =
                    c.magnitude_min + (c.magnitude_max - c.magnitude_min) * rng.random::<f64>();
                active.push((k, mag));
            }
            let mut row = DVector::<f64>::zeros(d);
            for &(k, mag) in &active {
                row.axpy(mag, &self.directions.column(k), 1.0);
            }
            if c.noise_sd > 0.0 {
                for v in row.iter_mut() {
                    *v += c.noise_sd * standard_normal(&mut rng);
                }
            }
            x.set_row(i, &row.transpose());
            unaligned.push(is_unaligned);
            category.push(cat);
            concepts.push(active);
        }
        Samples {
            x,
            unaligned,
            category,
            concepts,
        }
    }

    /// Expected concept activations E[z_k | class] in closed form: `(aligned, per_category)`, each
    /// a length-n vector (per_category has r of them).
    ///
    /// Safety j: P(fire) = q_j (rate_on for its own category, rate_base otherwise).
    /// Nuisance k ∈ N_j: P(fire) = 1 − (1 − p_bg)(1 − ρ q_j). Other concepts: p_bg.
    /// Every firing has mean magnitude (min + max) / 2.
    pub fn population_concept_means(&self) -> (DVector<f64>, Vec<DVector<f64>>) {
        let c = &self.cfg;
        let mag = c.magnitude_mean();
        let p_bg = c.background_rate();
        let means = |cat: Option<usize>| {
            let mut z = DVector::from_element(c.n, p_bg * mag);
            for j in 0..c.r {
                let q = if cat == Some(j) {
                    c.safety_rate_on
                } else {
                    c.safety_rate_base
                };
                z[j] = q * mag;
                for k in self.nuisance_of(j) {
                    z[k] = (1.0 - (1.0 - p_bg) * (1.0 - c.entanglement * q)) * mag;
                }
            }
            z
        };
        (means(None), (0..c.r).map(|j| means(Some(j))).collect())
    }

    /// Population class means in activation space (noise has mean zero): `(aligned, per_category)`.
    pub fn population_class_means(&self) -> (DVector<f64>, Vec<DVector<f64>>) {
        let (za, zc) = self.population_concept_means();
        (
            &self.directions * za,
            zc.iter().map(|z| &self.directions * z).collect(),
        )
    }
}
