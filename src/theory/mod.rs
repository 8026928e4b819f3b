//! theory — the recovery-error experiment: SAE-based vs direct identification of a safety subspace.
//!
//! The paper claims that under monosemanticity, identifying the safety subspace through SAE
//! features reaches arbitrarily small error, while identifying it directly in the polysemantic
//! activation space has an irreducible floor. This module makes that checkable on synthetic data
//! whose ground truth is known:
//!
//! * [`generator`] — concepts in superposition, a known r-dimensional safety subspace U, sparse
//!   firing, aligned/unaligned labels, entanglement ρ between safety and nuisance concepts.
//! * [`methods`] — direct estimators (difference of means, PCA of differences, logistic probe) and
//!   Δ-based selection through a dictionary (the true concepts, or a trained TopK SAE: [`sae_method`]).
//! * [`experiment`] — sweeps over sample size, entanglement, superposition n/d and SAE quality, with
//!   several seeds; recovery error ‖P_Û − P_U‖_F and principal angles ([`crate::linalg`]).
//! * [`report`] / [`plot`] — results.json, results.md and hand-written SVG figures.
//!
//! In: a [`TheoryConfig`]. Out: [`TheoryResults`] (saved with [`TheoryResults::save`]).

pub mod experiment;
pub mod generator;
pub mod methods;
pub mod plot;
pub mod report;
pub mod sae_method;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use experiment::{run, PopulationFloor, Record, Summary, Sweep, TheoryResults};
pub use generator::{ConceptGeometry, ConceptModel, GeneratorConfig, Samples};
pub use methods::{Method, MethodConfig};
pub use sae_method::{SaeSettings, SaeVariant};

#[derive(Debug, Error)]
pub enum TheoryError {
    /// A config value outside what the experiment can realise.
    #[error("config field {field} = {value}: expected {expected}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{path}: {message}")]
    ConfigParse { path: PathBuf, message: String },
    /// A draw too small for an estimator (e.g. a harm category with no sample).
    #[error("too few {what}: {got}, need at least {min}")]
    TooFewSamples {
        what: &'static str,
        got: usize,
        min: usize,
    },
    /// Δ-based selection found fewer features with a non-zero class difference than it must keep.
    #[error("Δ-based selection: only {got} features differ between the classes, {wanted} needed")]
    TooFewFeatures { wanted: usize, got: usize },
    #[error("degenerate draw: {what}")]
    Degenerate { what: &'static str },
    /// The SAE route failed (training or encoding); carries the SAE stage's own message.
    #[error("SAE method: {message}")]
    Sae { message: String },
    #[error("building the job thread pool: {message}")]
    Threads { message: String },
    #[error(transparent)]
    Linalg(#[from] crate::linalg::LinalgError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serialising {what}: {message}")]
    Serialize { what: &'static str, message: String },
}

/// Which values each sweep visits. The non-swept parameters come from `generator`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// Sample sizes N (total, both classes) of the error-vs-samples sweep.
    pub sample_sizes: Vec<usize>,
    /// Entanglement values ρ of the error-vs-entanglement sweep (at `fixed_samples`).
    pub entanglements: Vec<f64>,
    /// Superposition ratios n/d of the superposition sweep (at `fixed_samples`); n = round(ratio·d).
    pub superposition_ratios: Vec<f64>,
    /// N used by the entanglement, superposition and SAE-quality sweeps.
    pub fixed_samples: usize,
    /// SAE settings compared by the SAE-quality sweep (SAE method only, at `fixed_samples`).
    pub sae_variants: Vec<SaeVariant>,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            sample_sizes: vec![100, 300, 1000, 3000, 10000, 20000],
            entanglements: vec![0.0, 0.2, 0.4, 0.6, 0.8],
            superposition_ratios: vec![1.0, 2.0, 4.0, 8.0],
            fixed_samples: 10000,
            sae_variants: SaeVariant::defaults(),
        }
    }
}

/// The whole experiment. Defaults live here once; configs/theory.toml spells them out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TheoryConfig {
    /// Seeds per point (concept geometry, samples and SAE init all change with the seed).
    pub seeds: usize,
    /// Base seed; seed s of a point derives its RNG streams from (base_seed, s, point).
    pub base_seed: u64,
    pub generator: GeneratorConfig,
    pub methods: MethodConfig,
    pub sae: SaeSettings,
    pub sweep: SweepConfig,
}

impl Default for TheoryConfig {
    fn default() -> Self {
        Self {
            seeds: 3,
            base_seed: 0,
            generator: GeneratorConfig::default(),
            methods: MethodConfig::default(),
            sae: SaeSettings::default(),
            sweep: SweepConfig::default(),
        }
    }
}

impl TheoryConfig {
    /// Parses a TOML config; fields not given keep their defaults, unknown fields are errors.
    pub fn from_toml(path: &std::path::Path) -> Result<Self, TheoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| TheoryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| TheoryError::ConfigParse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// A smoke-test sized version of this config: two seeds, three sample sizes, two values per
    /// other sweep, one SAE variant, SAE training cut to a quarter. Generator settings are kept.
    pub fn quick(mut self) -> Self {
        self.seeds = self.seeds.min(2);
        let s = &mut self.sweep;
        s.sample_sizes = vec![300, 3000];
        s.fixed_samples = s.fixed_samples.min(3000);
        let keep_ends = |v: &mut Vec<f64>| {
            if v.len() > 2 {
                *v = vec![v[0], v[v.len() - 1]];
            }
        };
        keep_ends(&mut s.entanglements);
        keep_ends(&mut s.superposition_ratios);
        s.sae_variants.truncate(1);
        self.sae.steps = (self.sae.steps / 4).max(1);
        for v in &mut s.sae_variants {
            v.steps = v.steps.map(|steps| (steps / 4).max(1));
        }
        self
    }

    /// Checks everything the sweeps will ask of the generator before any work starts.
    pub fn validate(&self) -> Result<(), TheoryError> {
        if self.seeds == 0 {
            return Err(TheoryError::InvalidConfig {
                field: "seeds",
                value: "0".into(),
                expected: "≥ 1",
            });
        }
        self.generator.validate()?;
        methods::effective_k(&self.methods, self.generator.r)?;
        self.sae.validate("sae")?;
        for v in &self.sweep.sae_variants {
            v.apply(&self.sae).validate("sweep.sae_variants")?;
        }
        for &rho in &self.sweep.entanglements {
            GeneratorConfig {
                entanglement: rho,
                ..self.generator.clone()
            }
            .validate()?;
        }
        for &ratio in &self.sweep.superposition_ratios {
            experiment::with_ratio(&self.generator, ratio).validate()?;
        }
        for &n in self
            .sweep
            .sample_sizes
            .iter()
            .chain([&self.sweep.fixed_samples])
        {
            if n < 2 {
                return Err(TheoryError::InvalidConfig {
                    field: "sweep.sample_sizes / fixed_samples",
                    value: n.to_string(),
                    expected: "≥ 2",
                });
            }
        }
        Ok(())
    }
}
