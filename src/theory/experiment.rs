//! The sweeps: one job per (sweep point, seed), every method on the same draw, then mean ± sd.

use std::collections::BTreeMap;
use std::time::Instant;

use nalgebra::DMatrix;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::generator::{ConceptModel, GeneratorConfig};
use super::methods::{self, Method};
use super::sae_method::{self, SaeDiagnostics, SaeSettings};
use super::{TheoryConfig, TheoryError};
use crate::linalg;

/// Which parameter a record's point varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sweep {
    /// x = N, the number of samples.
    Samples,
    /// x = ρ, at `fixed_samples`.
    Entanglement,
    /// x = n/d, at `fixed_samples`.
    Superposition,
    /// x = index of the SAE variant (its name in `variant`), at `fixed_samples`; SAE method only.
    SaeQuality,
}

impl Sweep {
    pub fn name(self) -> &'static str {
        match self {
            Sweep::Samples => "samples",
            Sweep::Entanglement => "entanglement",
            Sweep::Superposition => "superposition",
            Sweep::SaeQuality => "sae_quality",
        }
    }
}

/// One method on one draw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub sweep: Sweep,
    /// The swept value (N, ρ, n/d or the SAE variant's index).
    pub x: f64,
    /// SAE variant name (SAE-quality sweep only).
    pub variant: Option<String>,
    pub seed: usize,
    pub n_samples: usize,
    pub n_concepts: usize,
    pub entanglement: f64,
    pub method: Method,
    /// ‖P_Û − P_U‖_F.
    pub error: f64,
    /// Principal angles between Û and U in degrees, ascending.
    pub angles_deg: Vec<f64>,
    /// Present for the SAE method.
    pub sae: Option<SaeDiagnostics>,
}

/// A method that could not produce an estimate on a draw (recorded, never silently dropped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub sweep: Sweep,
    pub x: f64,
    pub seed: usize,
    pub method: Method,
    pub message: String,
}

/// Mean ± sd of the error over seeds at one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub sweep: Sweep,
    pub x: f64,
    pub variant: Option<String>,
    pub method: Method,
    pub mean: f64,
    /// Sample standard deviation over seeds (0 with one seed).
    pub sd: f64,
    pub min: f64,
    pub max: f64,
    /// Mean of the largest principal angle, degrees.
    pub max_angle_deg: f64,
    pub seeds: usize,
}

/// The infinite-sample error of a difference-of-means estimator, from the closed-form class means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PopulationFloor {
    pub sweep: Sweep,
    pub x: f64,
    pub method: Method,
    pub mean: f64,
    pub sd: f64,
}

/// Everything the command writes: the effective config, raw records, summaries, floors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TheoryResults {
    pub format_version: u32,
    pub config: TheoryConfig,
    /// √(r − 1): the floor the paper states for direct identification.
    pub paper_floor: f64,
    /// √(2r): the largest possible error (orthogonal subspaces).
    pub max_error: f64,
    pub records: Vec<Record>,
    pub failures: Vec<Failure>,
    pub summaries: Vec<Summary>,
    pub floors: Vec<PopulationFloor>,
    pub elapsed_ms: u64,
}

/// The generator with n = round(ratio · d) concepts.
pub fn with_ratio(g: &GeneratorConfig, ratio: f64) -> GeneratorConfig {
    GeneratorConfig {
        n: (ratio * g.d as f64).round().max(0.0) as usize,
        ..g.clone()
    }
}

/// SplitMix64 finaliser over a running hash: independent, reproducible RNG streams per point.
fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        let mut z = h ^ p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// One unit of work: a point of a sweep under one seed.
#[derive(Debug, Clone)]
struct Job {
    sweep: Sweep,
    x: f64,
    variant: Option<String>,
    seed: usize,
    generator: GeneratorConfig,
    n_samples: usize,
    methods: Vec<Method>,
    sae: SaeSettings,
}

fn jobs(cfg: &TheoryConfig) -> Vec<Job> {
    let all: Vec<Method> = Method::ALL
        .into_iter()
        .filter(|m| *m != Method::Sae || cfg.sae.enabled)
        .collect();
    let mut out = Vec::new();
    for seed in 0..cfg.seeds {
        let job = |sweep, x, generator, n_samples, methods: Vec<Method>| Job {
            sweep,
            x,
            variant: None,
            seed,
            generator,
            n_samples,
            methods,
            sae: cfg.sae.clone(),
        };
        for &n in &cfg.sweep.sample_sizes {
            out.push(job(
                Sweep::Samples,
                n as f64,
                cfg.generator.clone(),
                n,
                all.clone(),
            ));
        }
        for &rho in &cfg.sweep.entanglements {
            let g = GeneratorConfig {
                entanglement: rho,
                ..cfg.generator.clone()
            };
            out.push(job(
                Sweep::Entanglement,
                rho,
                g,
                cfg.sweep.fixed_samples,
                all.clone(),
            ));
        }
        for &ratio in &cfg.sweep.superposition_ratios {
            let g = with_ratio(&cfg.generator, ratio);
            out.push(job(
                Sweep::Superposition,
                ratio,
                g,
                cfg.sweep.fixed_samples,
                all.clone(),
            ));
        }
        if cfg.sae.enabled {
            for (i, v) in cfg.sweep.sae_variants.iter().enumerate() {
                let mut j = job(
                    Sweep::SaeQuality,
                    i as f64,
                    cfg.generator.clone(),
                    cfg.sweep.fixed_samples,
                    vec![Method::Sae],
                );
                j.variant = Some(v.name.clone());
                j.sae = v.apply(&cfg.sae);
                out.push(j);
            }
        }
    }
    out
}

/// The geometry seed depends on (base, seed, d, n) only, so points that differ in N or ρ share
/// their concept directions: the comparison along those sweeps is controlled.
fn geometry_seed(base: u64, seed: usize, g: &GeneratorConfig) -> u64 {
    mix(&[base, seed as u64, g.d as u64, g.n as u64])
}

type JobOutput = (Vec<Record>, Vec<Failure>);

fn run_job(job: &Job, cfg: &TheoryConfig) -> Result<JobOutput, TheoryError> {
    let geo_seed = geometry_seed(cfg.base_seed, job.seed, &job.generator);
    let model = ConceptModel::draw(&job.generator, geo_seed)?;
    let data_seed = mix(&[
        geo_seed,
        job.n_samples as u64,
        job.generator.entanglement.to_bits(),
        job.sweep as u64,
    ]);
    let samples = model.sample(job.n_samples, data_seed);
    let r = job.generator.r;
    let mut records = Vec::new();
    let mut failures = Vec::new();
    for &method in &job.methods {
        let started = Instant::now();
        let estimate: Result<(DMatrix<f64>, Option<SaeDiagnostics>), TheoryError> = match method {
            Method::MeanDiff => methods::mean_diff(&samples).map(|b| (b, None)),
            Method::ClassMeanDiff => methods::class_mean_diff(&samples, r).map(|b| (b, None)),
            Method::PcaDiff => methods::pca_diff(&samples, r).map(|b| (b, None)),
            Method::Probe => methods::probe(&samples, r, &cfg.methods).map(|b| (b, None)),
            Method::IdealDictionary => {
                methods::ideal_dictionary(&model, &samples, &cfg.methods).map(|b| (b, None))
            }
            Method::Sae => sae_method::sae_basis(
                &job.sae,
                &model,
                &samples,
                &cfg.methods,
                mix(&[data_seed, 1]),
            )
            .map(|o| (o.basis, Some(o.diagnostics))),
        };
        tracing::debug!(
            sweep = job.sweep.name(),
            x = job.x,
            seed = job.seed,
            method = method.name(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "estimated"
        );
        match estimate {
            Ok((basis, sae)) => {
                let error = linalg::projector_distance(&basis, &model.safety_basis)?;
                let angles_deg = linalg::principal_angles(&basis, &model.safety_basis)?
                    .into_iter()
                    .map(f64::to_degrees)
                    .collect();
                records.push(Record {
                    sweep: job.sweep,
                    x: job.x,
                    variant: job.variant.clone(),
                    seed: job.seed,
                    n_samples: job.n_samples,
                    n_concepts: job.generator.n,
                    entanglement: job.generator.entanglement,
                    method,
                    error,
                    angles_deg,
                    sae,
                });
            }
            // A draw on which an estimator is undefined (or the SAE route is unavailable) is a
            // result to report, not a reason to abort the other methods and points.
            Err(
                e @ (TheoryError::TooFewSamples { .. }
                | TheoryError::TooFewFeatures { .. }
                | TheoryError::Sae { .. }
                | TheoryError::Linalg(_)),
            ) => failures.push(Failure {
                sweep: job.sweep,
                x: job.x,
                seed: job.seed,
                method,
                message: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
    }
    Ok((records, failures))
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

/// Mean ± sd per (sweep, x, variant, method), in sweep and x order.
pub fn summarize(records: &[Record]) -> Vec<Summary> {
    let mut groups: BTreeMap<(Sweep, u64, Method), Vec<&Record>> = BTreeMap::new();
    for rec in records {
        // f64 keys ordered by their bits: all x here are non-negative, where bit order = value order.
        groups
            .entry((rec.sweep, rec.x.to_bits(), rec.method))
            .or_default()
            .push(rec);
    }
    groups
        .into_iter()
        .map(|((sweep, x, method), recs)| {
            let errors: Vec<f64> = recs.iter().map(|r| r.error).collect();
            let (mean, sd) = mean_sd(&errors);
            let max_angles: Vec<f64> = recs
                .iter()
                .map(|r| r.angles_deg.last().copied().unwrap_or(90.0))
                .collect();
            Summary {
                sweep,
                x: f64::from_bits(x),
                variant: recs[0].variant.clone(),
                method,
                mean,
                sd,
                min: errors.iter().cloned().fold(f64::INFINITY, f64::min),
                max: errors.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                max_angle_deg: mean_sd(&max_angles).0,
                seeds: recs.len(),
            }
        })
        .collect()
}

/// Infinite-sample errors of `mean_diff` and `class_mean_diff` from the closed-form class means.
pub fn population_errors(model: &ConceptModel) -> Result<[(Method, f64); 2], TheoryError> {
    let (mu_a, mu_c) = model.population_class_means();
    let r = model.cfg.r;
    let d = model.cfg.d;
    let mut diffs = DMatrix::zeros(d, r);
    for (c, mu) in mu_c.iter().enumerate() {
        diffs.set_column(c, &(mu - &mu_a));
    }
    // Categories are uniform, so the pooled unaligned mean is the average of the category means.
    let pooled = diffs.column_mean();
    let one = linalg::orthonormalize(
        "population mean_diff",
        &DMatrix::from_column_slice(d, 1, pooled.as_slice()),
    )?;
    let all = linalg::orthonormalize("population class_mean_diff", &diffs)?;
    Ok([
        (
            Method::MeanDiff,
            linalg::projector_distance(&one, &model.safety_basis)?,
        ),
        (
            Method::ClassMeanDiff,
            linalg::projector_distance(&all, &model.safety_basis)?,
        ),
    ])
}

fn floors(cfg: &TheoryConfig) -> Result<Vec<PopulationFloor>, TheoryError> {
    let mut points: Vec<(Sweep, f64, GeneratorConfig)> = vec![(
        Sweep::Samples,
        cfg.generator.entanglement,
        cfg.generator.clone(),
    )];
    for &rho in &cfg.sweep.entanglements {
        let g = GeneratorConfig {
            entanglement: rho,
            ..cfg.generator.clone()
        };
        points.push((Sweep::Entanglement, rho, g));
    }
    for &ratio in &cfg.sweep.superposition_ratios {
        points.push((
            Sweep::Superposition,
            ratio,
            with_ratio(&cfg.generator, ratio),
        ));
    }
    let mut out = Vec::new();
    for (sweep, x, g) in points {
        let mut per_method: BTreeMap<Method, Vec<f64>> = BTreeMap::new();
        for seed in 0..cfg.seeds {
            let model = ConceptModel::draw(&g, geometry_seed(cfg.base_seed, seed, &g))?;
            for (m, e) in population_errors(&model)? {
                per_method.entry(m).or_default().push(e);
            }
        }
        for (method, errs) in per_method {
            let (mean, sd) = mean_sd(&errs);
            out.push(PopulationFloor {
                sweep,
                x,
                method,
                mean,
                sd,
            });
        }
    }
    Ok(out)
}

/// Runs every sweep of `cfg` (jobs in parallel on rayon's pool) and summarises.
pub fn run(cfg: &TheoryConfig) -> Result<TheoryResults, TheoryError> {
    cfg.validate()?;
    let started = Instant::now();
    let jobs = jobs(cfg);
    tracing::info!(jobs = jobs.len(), "theory experiment");
    // One job per thread, one thread per core. The SAE's tensors are small, so `sails theory`
    // turns candle's per-matmul threading off (it cost ~4× the CPU here) and parallelises across
    // jobs instead.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| TheoryError::Threads {
            message: e.to_string(),
        })?;
    let outputs: Vec<JobOutput> = pool.install(|| {
        jobs.par_iter()
            .map(|job| {
                let out = run_job(job, cfg);
                tracing::info!(
                    sweep = job.sweep.name(),
                    x = job.x,
                    seed = job.seed,
                    "point done"
                );
                out
            })
            .collect::<Result<_, _>>()
    })?;
    let mut records = Vec::new();
    let mut failures = Vec::new();
    for (r, f) in outputs {
        records.extend(r);
        failures.extend(f);
    }
    let r = cfg.generator.r as f64;
    Ok(TheoryResults {
        format_version: 1,
        config: cfg.clone(),
        paper_floor: (r - 1.0).sqrt(),
        max_error: (2.0 * r).sqrt(),
        summaries: summarize(&records),
        floors: floors(cfg)?,
        records,
        failures,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}
