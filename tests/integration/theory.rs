//! The recovery-error experiment: the metric against closed forms, the generator against its
//! configured statistics, and the estimators on cases whose answer is known by hand.

use nalgebra::DMatrix;
use sails::linalg::{orthonormalize, principal_angles, projector_distance};
use sails::theory::experiment::population_errors;
use sails::theory::methods::{self, MethodConfig};
use sails::theory::{
    ConceptGeometry, ConceptModel, GeneratorConfig, Method, SaeSettings, SweepConfig, TheoryConfig,
    TheoryResults,
};

/// Columns e_i of the identity in R^d for the given indices.
fn axes(d: usize, idx: &[usize]) -> DMatrix<f64> {
    let mut m = DMatrix::zeros(d, idx.len());
    for (c, &i) in idx.iter().enumerate() {
        m[(i, c)] = 1.0;
    }
    m
}

/// A fixed, well-mixed orthogonal matrix (QR of a deterministic dense matrix).
fn rotation(d: usize) -> DMatrix<f64> {
    let a = DMatrix::from_fn(d, d, |i, j| {
        ((i * 7 + j * 13) % 11) as f64 - 5.0 + if i == j { 3.0 } else { 0.0 }
    });
    orthonormalize("rotation", &a).expect("the test matrix is invertible")
}

#[test]
fn identical_subspaces_have_zero_error_and_zero_angles() {
    let q = rotation(8);
    let u = q.columns(0, 3).into_owned();
    // Another basis of the same span: mix the columns by an invertible 3×3 matrix.
    let mix = DMatrix::from_row_slice(3, 3, &[2.0, 1.0, 0.0, 0.0, 1.0, -1.0, 1.0, 0.0, 3.0]);
    let v = orthonormalize("mixed", &(&u * mix)).unwrap();
    assert!(projector_distance(&u, &v).unwrap() < 1e-12);
    let angles = principal_angles(&u, &v).unwrap();
    assert_eq!(angles.len(), 3);
    assert!(angles.iter().all(|a| a.abs() < 1e-6), "{angles:?}");
}

#[test]
fn orthogonal_r_dim_subspaces_are_sqrt_2r_apart() {
    // P_U P_V = 0 ⇒ ‖P_U − P_V‖² = tr P_U + tr P_V = 2r; every principal angle is 90°.
    let q = rotation(10);
    for r in 1..=5 {
        let u = &q * axes(10, &(0..r).collect::<Vec<_>>());
        let v = &q * axes(10, &(r..2 * r).collect::<Vec<_>>());
        let got = projector_distance(&u, &v).unwrap();
        let want = (2.0 * r as f64).sqrt();
        assert!(
            (got - want).abs() < 1e-12,
            "r = {r}: {got} vs √(2r) = {want}"
        );
        let angles = principal_angles(&u, &v).unwrap();
        assert!(angles
            .iter()
            .all(|a| (a - std::f64::consts::FRAC_PI_2).abs() < 1e-6));
    }
}

#[test]
fn principal_angles_of_a_known_rotation() {
    // U = span(e1, e2); V = span(cos a·e1 + sin a·e3, cos b·e2 + sin b·e4).
    // Then Uᵀ V = diag(cos a, cos b): angles {a, b}, and ‖P_U − P_V‖ = √(2 (sin²a + sin²b)).
    let (a, b) = (0.3f64, 1.1f64);
    let u = axes(4, &[0, 1]);
    let mut v = DMatrix::zeros(4, 2);
    v[(0, 0)] = a.cos();
    v[(2, 0)] = a.sin();
    v[(1, 1)] = b.cos();
    v[(3, 1)] = b.sin();
    let angles = principal_angles(&u, &v).unwrap();
    assert!(
        (angles[0] - a).abs() < 1e-9 && (angles[1] - b).abs() < 1e-9,
        "{angles:?}"
    );
    let want = (2.0 * (a.sin().powi(2) + b.sin().powi(2))).sqrt();
    assert!((projector_distance(&u, &v).unwrap() - want).abs() < 1e-12);
}

fn orthogonal_setting(entanglement: f64) -> GeneratorConfig {
    GeneratorConfig {
        d: 16,
        n: 16,
        r: 2,
        geometry: ConceptGeometry::Orthogonal,
        background_active: 2.0,
        entanglement,
        ..GeneratorConfig::default()
    }
}

#[test]
fn zero_entanglement_and_orthogonal_concepts_every_method_recovers_the_subspace() {
    let model = ConceptModel::draw(&orthogonal_setting(0.0), 7).unwrap();
    let s = model.sample(8000, 8);
    let u = &model.safety_basis;
    let cfg = MethodConfig::default();
    let r = 2;
    // Statistical error of a difference of means here: signal (0.8 − 0.02)·1 ≈ 0.78, noise per
    // coordinate ≈ √(0.1/2000 + 0.1/4000) ≈ 0.009 over 14 coordinates ⇒ angle ≈ 0.04 rad,
    // error ≈ √(2·2·0.04²) ≈ 0.08. 0.2 leaves room for the noisier probe and PCA.
    for (name, basis) in [
        ("class_mean_diff", methods::class_mean_diff(&s, r).unwrap()),
        ("pca_diff", methods::pca_diff(&s, r).unwrap()),
        ("probe", methods::probe(&s, r, &cfg).unwrap()),
        (
            "ideal_dictionary",
            methods::ideal_dictionary(&model, &s, &cfg).unwrap(),
        ),
    ] {
        let err = projector_distance(&basis, u).unwrap();
        assert!(err < 0.2, "{name}: error {err}");
    }
    // The pooled difference of means is one direction: it lies in U (angle ≈ 0), so its error is
    // the rank deficit √(r − 1) = 1 exactly, not more.
    let md = methods::mean_diff(&s).unwrap();
    let angle = principal_angles(&md, u).unwrap()[0];
    assert!(angle < 0.06, "mean_diff leaves U by {angle} rad");
    assert!((projector_distance(&md, u).unwrap() - 1.0).abs() < 0.01);
    // The ideal dictionary selects exactly the safety concepts: zero error.
    let ideal = methods::ideal_dictionary(&model, &s, &cfg).unwrap();
    assert!(projector_distance(&ideal, u).unwrap() < 1e-12);
}

#[test]
fn entanglement_gives_difference_of_means_a_floor_that_samples_do_not_remove() {
    let g = orthogonal_setting(0.6);
    let model = ConceptModel::draw(&g, 3).unwrap();
    // Closed form with orthogonal concepts: the class-c difference of means is proportional to
    // f_c + ρ' Σ_{k∈N_c} f_k with ρ' = ρ (1 − p_bg) (p_bg = 2/14), so each estimated direction
    // makes an angle θ with tan θ = ρ' √m (m = 2 nuisance concepts) to U, and
    // ‖P_Û − P_U‖ = √(2 r sin²θ).
    let rho: f64 = 0.6 * (1.0 - 2.0 / 14.0);
    let tan2 = rho * rho * 2.0;
    let want = (2.0 * 2.0 * tan2 / (1.0 + tan2)).sqrt();
    let [(_, pooled), (m, floor)] = population_errors(&model).unwrap();
    assert_eq!(m, Method::ClassMeanDiff);
    assert!(
        (floor - want).abs() < 1e-9,
        "population floor {floor} vs closed form {want}"
    );
    // The pooled (rank 1) estimate has the rank deficit on top: ‖·‖² = (r − 1) + 2 sin²θ.
    let want_pooled = (1.0 + 2.0 * tan2 / (1.0 + tan2)).sqrt();
    assert!(
        (pooled - want_pooled).abs() < 1e-9,
        "{pooled} vs {want_pooled}"
    );
    // Sampling converges to that floor, while Δ-selection on the true concepts is exact.
    let s = model.sample(20000, 4);
    let got = projector_distance(
        &methods::class_mean_diff(&s, 2).unwrap(),
        &model.safety_basis,
    )
    .unwrap();
    assert!(
        (got - floor).abs() < 0.05,
        "sampled {got} vs population {floor}"
    );
    let ideal = methods::ideal_dictionary(&model, &s, &MethodConfig::default()).unwrap();
    assert!(projector_distance(&ideal, &model.safety_basis).unwrap() < 1e-12);
}

#[test]
fn generator_firing_rates_match_the_config() {
    let g = GeneratorConfig {
        d: 32,
        n: 64,
        r: 2,
        entanglement: 0.5,
        ..GeneratorConfig::default()
    };
    let model = ConceptModel::draw(&g, 11).unwrap();
    let n = 40_000;
    let s = model.sample(n, 12);
    let fires = |i: usize, k: usize| s.concepts[i].iter().any(|&(c, _)| c == k);
    let rate = |rows: &[usize], k: usize| {
        rows.iter().filter(|&&i| fires(i, k)).count() as f64 / rows.len() as f64
    };
    let aligned: Vec<usize> = (0..n).filter(|&i| !s.unaligned[i]).collect();
    let cat0: Vec<usize> = (0..n).filter(|&i| s.category[i] == Some(0)).collect();
    let p_bg = 4.0 / 62.0;
    // binomial sd at these counts is ≤ 0.004; tolerances are ~4 sd
    assert!((aligned.len() as f64 / n as f64 - 0.5).abs() < 0.01);
    assert!((cat0.len() as f64 / (n as f64 / 2.0) - 0.5).abs() < 0.02);
    assert!(
        (rate(&cat0, 0) - 0.8).abs() < 0.015,
        "on-rate {}",
        rate(&cat0, 0)
    );
    assert!(
        (rate(&aligned, 0) - 0.02).abs() < 0.005,
        "base rate {}",
        rate(&aligned, 0)
    );
    assert!(
        (rate(&aligned, 40) - p_bg).abs() < 0.006,
        "background {}",
        rate(&aligned, 40)
    );
    // Nuisance 2 belongs to safety concept 0: given 0 fires, it fires w.p. 1 − (1 − p_bg)(1 − ρ).
    let with0: Vec<usize> = (0..n).filter(|&i| fires(i, 0)).collect();
    let want = 1.0 - (1.0 - p_bg) * (1.0 - 0.5);
    assert!(
        (rate(&with0, 2) - want).abs() < 0.02,
        "co-firing {} vs {want}",
        rate(&with0, 2)
    );
    // Magnitudes are Uniform[0.5, 1.5]: mean 1.
    let mags: Vec<f64> = s.concepts.iter().flatten().map(|&(_, m)| m).collect();
    let mean = mags.iter().sum::<f64>() / mags.len() as f64;
    assert!(mags.iter().all(|m| (0.5..=1.5).contains(m)) && (mean - 1.0).abs() < 0.01);
    // Sample class means agree with the closed-form population means.
    let (mu_a, _) = model.population_class_means();
    let mut emp = nalgebra::DVector::zeros(32);
    for &i in &aligned {
        emp += s.x.row(i).transpose();
    }
    emp /= aligned.len() as f64;
    assert!((emp - mu_a).norm() < 0.05);
}

#[test]
fn invalid_configs_are_rejected_with_the_field_named() {
    let g = GeneratorConfig {
        n: 40,
        geometry: ConceptGeometry::Orthogonal,
        ..orthogonal_setting(0.0)
    };
    let err = ConceptModel::draw(&g, 0).unwrap_err().to_string();
    assert!(err.contains("generator.n"), "{err}");
    let g = GeneratorConfig {
        entanglement: 1.5,
        ..GeneratorConfig::default()
    };
    assert!(g
        .validate()
        .unwrap_err()
        .to_string()
        .contains("entanglement"));
    let cfg = TheoryConfig {
        methods: MethodConfig {
            select_k: 1,
            ..MethodConfig::default()
        },
        ..TheoryConfig::default()
    };
    assert!(cfg.validate().unwrap_err().to_string().contains("select_k"));
}

#[test]
fn the_shipped_config_is_the_built_in_default() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/theory.toml");
    assert_eq!(
        TheoryConfig::from_toml(&path).unwrap(),
        TheoryConfig::default()
    );
}

fn tiny_config() -> TheoryConfig {
    TheoryConfig {
        seeds: 2,
        generator: GeneratorConfig {
            d: 16,
            n: 32,
            r: 2,
            ..GeneratorConfig::default()
        },
        sae: SaeSettings {
            enabled: false,
            ..SaeSettings::default()
        },
        sweep: SweepConfig {
            sample_sizes: vec![200, 2000],
            entanglements: vec![0.0, 0.8],
            superposition_ratios: vec![2.0],
            fixed_samples: 1000,
            sae_variants: vec![],
        },
        ..TheoryConfig::default()
    }
}

#[test]
fn results_round_trip_through_the_written_files() {
    let cfg = tiny_config();
    let results = sails::theory::run(&cfg).unwrap();
    // 2 seeds × (2 + 2 + 1 points) × 5 methods
    assert_eq!(results.records.len(), 2 * 5 * 5);
    assert!(results.failures.is_empty(), "{:?}", results.failures);
    assert!((results.paper_floor - 1.0).abs() < 1e-12 && (results.max_error - 2.0).abs() < 1e-12);
    let dir = tempfile::tempdir().unwrap();
    results.save(dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("results.json")).unwrap();
    let back: TheoryResults = serde_json::from_str(&text).unwrap();
    // serde_json parses floats to within an ulp, not always bit-exactly: compare with a tolerance.
    assert_eq!(back.config, results.config);
    assert_eq!(back.records.len(), results.records.len());
    for (b, r) in back.records.iter().zip(&results.records) {
        assert!(b.sweep == r.sweep && b.method == r.method && b.seed == r.seed && b.x == r.x);
        assert!((b.error - r.error).abs() < 1e-12);
    }
    assert_eq!(back.summaries.len(), results.summaries.len());
    for name in [
        "error_vs_samples.svg",
        "error_vs_entanglement.svg",
        "error_vs_superposition.svg",
    ] {
        let svg = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        for m in [
            "mean_diff",
            "class_mean_diff",
            "pca_diff",
            "probe",
            "ideal_dictionary",
        ] {
            assert!(svg.contains(m), "{name} lacks {m}");
        }
    }
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    assert!(md.contains("| 2000 |") && md.contains("| 0.80 |"));
    // Same config, same seeds ⇒ same numbers.
    let again = sails::theory::run(&cfg).unwrap();
    assert!(
        again.records == results.records,
        "a rerun with the same seeds differs"
    );
}

#[test]
fn cli_json_summary_deserialises_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("tiny.toml");
    std::fs::write(&cfg_path, toml::to_string(&tiny_config()).unwrap()).unwrap();
    let out = dir.path().join("out");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(["theory", "--json", "--seeds", "1", "--config"])
        .arg(&cfg_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: sails::theory::report::TheorySummary =
        serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary.out_dir, out);
    assert_eq!(
        summary.summaries.iter().filter(|s| s.seeds == 1).count(),
        summary.summaries.len()
    );
    assert!(out.join("results.json").exists() && out.join("results.md").exists());
}

#[test]
fn sae_route_recovers_the_subspace_without_entanglement() {
    // Orthogonal concepts, no entanglement, an SAE twice as wide as the concept count: the
    // project's TopK trainer should find a latent per safety concept, and Δ-selection picks them.
    let g = GeneratorConfig {
        d: 16,
        n: 16,
        r: 2,
        geometry: ConceptGeometry::Orthogonal,
        background_active: 2.0,
        entanglement: 0.0,
        ..GeneratorConfig::default()
    };
    let model = ConceptModel::draw(&g, 5).unwrap();
    let s = model.sample(4000, 6);
    let settings = SaeSettings {
        width_per_concept: 2.0,
        k: 4,
        steps: 400,
        batch_size: 256,
        lr: 3e-3,
        enabled: true,
    };
    let out =
        sails::theory::sae_method::sae_basis(&settings, &model, &s, &MethodConfig::default(), 9)
            .unwrap();
    let err = projector_distance(&out.basis, &model.safety_basis).unwrap();
    let d = &out.diagnostics;
    assert_eq!(d.d_sae, 32);
    assert!(d.fvu < 0.2, "FVU {}", d.fvu);
    assert!(err < 0.3, "SAE route error {err}, diagnostics {d:?}");
    assert!(d.kept_best_cos.iter().all(|c| *c > 0.95), "{d:?}");
}
