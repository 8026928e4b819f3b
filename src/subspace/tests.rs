use super::*;
use crate::linalg::projector_distance;

const D: usize = 32;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A random orthonormal `D × r` basis.
fn planted(r: usize, seed: u64) -> DMatrix<f64> {
    let g = DMatrix::from_vec(D, r, linalg::standard_normals(&mut rng(seed), D * r));
    linalg::orthonormalize("planted", &g).unwrap()
}

/// A decoder `(d_sae, D)`: rows `0..k` are random combinations of `plane`'s columns plus
/// `noise`-sized jitter, the rest random directions.
fn decoder(plane: &DMatrix<f64>, k: usize, d_sae: usize, noise: f64, seed: u64) -> Tensor {
    let mut g = rng(seed);
    let r = plane.ncols();
    let mut data = Vec::with_capacity(d_sae * D);
    for i in 0..d_sae {
        let row: Vec<f64> = if i < k {
            let c = DVector::from_vec(linalg::standard_normals(&mut g, r));
            let jitter = DVector::from_vec(linalg::standard_normals(&mut g, D));
            (plane * c + jitter * noise).iter().copied().collect()
        } else {
            linalg::standard_normals(&mut g, D)
        };
        data.extend(row.iter().map(|&v| v as f32));
    }
    Tensor::from_vec(data, (d_sae, D), &Device::Cpu).unwrap()
}

fn cfg(rank: usize, energy_frac: f64) -> SubspaceConfig {
    SubspaceConfig {
        method: Method::Sails,
        rank,
        energy_frac,
        seed: 0,
    }
}

fn assert_orthonormal(b: &DMatrix<f64>) {
    let gram = b.transpose() * b;
    let err = (gram - DMatrix::<f64>::identity(b.ncols(), b.ncols()))
        .abs()
        .max();
    assert!(err < 1e-10, "UᵀU deviates from I by {err}");
}

#[test]
fn sails_basis_is_orthonormal_and_spans_the_planted_directions() {
    let plane = planted(4, 1);
    let w_dec = decoder(&plane, 12, 50, 1e-3, 2);
    let features: Vec<usize> = (0..12).collect();
    let (basis, report) =
        from_decoder_rows(Resid::In(3), &w_dec, &features, &cfg(4, 0.99), &mut rng(0)).unwrap();
    assert_eq!(basis.shape(), (D, 4));
    assert_orthonormal(&basis);
    let dist = projector_distance(&basis, &plane).unwrap();
    assert!(
        dist < 1e-2,
        "projector distance to the planted plane {dist}"
    );
    // 12 rows in a 4-dimensional plane: 4 components hold all but the jitter's energy.
    assert_eq!(report.components_for_tau, 4);
    assert!(report.energy_kept > 0.999, "{report:?}");
    assert_eq!(
        (report.truncated, report.padded, report.padded_random),
        (0, 0, 0)
    );
    assert_eq!(report.block_input, 3);
}

#[test]
fn tau_sets_the_component_count_and_the_rank_cuts_or_pads() {
    let plane = planted(6, 3);
    let w_dec = decoder(&plane, 20, 40, 1e-3, 4);
    let features: Vec<usize> = (0..20).collect();
    let mut kept = Vec::new();
    for tau in [0.3, 0.6, 0.9] {
        let (_, r) =
            from_decoder_rows(Resid::Out(1), &w_dec, &features, &cfg(3, tau), &mut rng(0)).unwrap();
        let needed: f64 = r.component_energy[..r.components_for_tau.min(3)]
            .iter()
            .sum();
        if r.components_for_tau <= 3 {
            assert!(needed >= tau - 1e-12, "τ={tau}: {r:?}");
        }
        assert_eq!(r.truncated, r.components_for_tau.saturating_sub(3));
        kept.push(r.components_for_tau);
    }
    assert!(kept[0] <= kept[1] && kept[1] <= kept[2], "{kept:?}");
    assert!(
        kept[2] > 3,
        "τ = 0.9 of a 6-dim spread needs more than 3 components"
    );

    // Rank above what τ asks for: padded with the next components, still orthonormal.
    let (b, r) =
        from_decoder_rows(Resid::In(0), &w_dec, &features, &cfg(8, 0.3), &mut rng(0)).unwrap();
    assert_orthonormal(&b);
    assert_eq!(r.padded, 8 - r.components_for_tau);
    assert_eq!(r.padded_random, 0);

    // Fewer features than the rank: random orthogonal directions fill it up, and say so.
    let (b, r) =
        from_decoder_rows(Resid::In(0), &w_dec, &[0, 1], &cfg(5, 0.8), &mut rng(0)).unwrap();
    assert_orthonormal(&b);
    assert_eq!(r.padded_random, 3);
}

#[test]
fn direct_identification_finds_a_planted_mean_shift() {
    let mut g = rng(7);
    let shift = planted(1, 8);
    let mut harmful = PooledSet::new(D);
    let mut harmless = PooledSet::new(D);
    for i in 0..120 {
        let noise: Vec<f64> = linalg::standard_normals(&mut g, D);
        let row: Vec<f32> = noise
            .iter()
            .enumerate()
            .map(|(j, n)| (0.1 * n + if i % 2 == 0 { 3.0 * shift[(j, 0)] } else { 0.0 }) as f32)
            .collect();
        let set = if i % 2 == 0 {
            &mut harmful
        } else {
            &mut harmless
        };
        set.push(&row, &[true; D]);
    }
    let cfg = SubspaceConfig {
        method: Method::Direct,
        ..cfg(4, 0.8)
    };
    let (b, r) = direct(Resid::In(2), &harmful, &harmless, &cfg, &mut rng(0)).unwrap();
    assert_orthonormal(&b);
    let first = b.column(0).dot(&shift.column(0)).abs();
    assert!(first > 0.99, "first column · planted shift = {first}");
    assert!(r.component_energy[0] > 0.9, "{r:?}");
}

#[test]
fn random_bases_are_orthonormal_and_seeded() {
    let c = SubspaceConfig {
        method: Method::Random,
        ..cfg(16, 0.8)
    };
    let hooks = [Resid::In(2), Resid::In(5)];
    let inputs = || Inputs::Random {
        hooks: &hooks,
        d_model: D,
    };
    let a = run(&c, inputs(), None).unwrap();
    let again = run(&c, inputs(), None).unwrap();
    assert_eq!(a, again);
    for b in a.bases.values() {
        assert_orthonormal(b);
    }
    let other = run(&SubspaceConfig { seed: 1, ..c }, inputs(), None).unwrap();
    let dist = projector_distance(&a.bases[&2], &other.bases[&2]).unwrap();
    assert!(dist > 1.0, "two seeds gave nearly the same basis ({dist})");
}

#[test]
fn save_then_load_is_identity_and_feeds_the_lora_init_layout() {
    let c = SubspaceConfig {
        method: Method::Random,
        ..cfg(3, 0.8)
    };
    let hooks = [Resid::In(1), Resid::Out(4)];
    let s = run(
        &c,
        Inputs::Random {
            hooks: &hooks,
            d_model: D,
        },
        Some("abc".into()),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    s.save(dir.path()).unwrap();
    let back = Subspace::load(dir.path()).unwrap();
    assert_eq!(back.summary, s.summary);
    assert_eq!(back.bases.keys().copied().collect::<Vec<_>>(), vec![1, 5]);
    for (l, b) in &s.bases {
        // stored as f32
        assert!((b - &back.bases[l]).abs().max() < 1e-6);
    }
    let t = s.tensors(&Device::Cpu).unwrap();
    let row0: Vec<f32> = t[&1].get(0).unwrap().to_vec1().unwrap();
    for (j, v) in row0.iter().enumerate() {
        assert_eq!(
            *v,
            s.bases[&1][(0, j)] as f32,
            "tensor is (d_model, rank), row-major"
        );
    }
}

#[test]
fn bad_inputs_are_errors_that_name_the_problem() {
    let w_dec = decoder(&planted(2, 0), 4, 10, 0.0, 0);
    let c = cfg(2, 0.8);
    assert!(matches!(
        from_decoder_rows(Resid::In(0), &w_dec, &[3, 10], &c, &mut rng(0)),
        Err(SubspaceError::FeatureIndex {
            index: 10,
            d_sae: 10,
            ..
        })
    ));
    assert!(matches!(
        from_decoder_rows(Resid::In(0), &w_dec, &[0, 1], &cfg(D + 1, 0.8), &mut rng(0)),
        Err(SubspaceError::RankTooLarge { .. })
    ));
    let hooks = [Resid::In(0)];
    let err = run(
        &c,
        Inputs::Random {
            hooks: &hooks,
            d_model: D,
        },
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("inputs of another method"),
        "{err}"
    );
    assert!(matches!(
        run(
            &cfg(2, 1.5),
            Inputs::Random {
                hooks: &hooks,
                d_model: D
            },
            None
        ),
        Err(SubspaceError::Config(_))
    ));
}
