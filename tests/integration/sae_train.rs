//! TopK training: gradient coverage, recovery of a known sparse dictionary, bit-identical resume.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sails::model::Resid;
use sails::sae::metrics;
use sails::sae::train::{
    initial_gradients, train_topk, train_topk_until, AuxK, InMemoryActivations, SaeTrainConfig,
};

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box–Muller
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// `n_dirs` random unit directions in R^d (rows), and `n` samples, each a sum of 3–5 distinct
/// directions with magnitudes in [0.5, 1.5], times `scale`.
fn sparse_dictionary_data(
    n_dirs: usize,
    d: usize,
    n: usize,
    scale: f32,
    seed: u64,
) -> (Vec<f32>, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dirs: Vec<f32> = (0..n_dirs * d).map(|_| gaussian(&mut rng)).collect();
    for row in dirs.chunks_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    let mut data = vec![0f32; n * d];
    for sample in data.chunks_mut(d) {
        let active = rng.random_range(3..=5);
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < active {
            let j = rng.random_range(0..n_dirs);
            if !chosen.contains(&j) {
                chosen.push(j);
            }
        }
        for j in chosen {
            let a: f32 = rng.random_range(0.5..1.5);
            for (s, v) in sample.iter_mut().zip(&dirs[j * d..(j + 1) * d]) {
                *s += scale * a * v;
            }
        }
    }
    (dirs, Tensor::from_vec(data, (n, d), &Device::Cpu).unwrap())
}

fn small_cfg() -> SaeTrainConfig {
    SaeTrainConfig {
        d_sae: 128,
        k: 4,
        batch_size: 64,
        total_tokens: 64 * 20,
        lr: 1e-3,
        lr_warmup_steps: 3,
        lr_decay_frac: 0.3,
        aux_k: AuxK::Fixed(16),
        // small enough that latents go dead within the run, so the aux-k path and its
        // bookkeeping are part of what resume must reproduce
        dead_tokens_threshold: 64 * 3,
        init_sample_tokens: 256,
        seed: 11,
        checkpoint_every: 4,
        log_every: 5,
        ..Default::default()
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let (_, data) = sparse_dictionary_data(64, 32, 512, 3.0, 1);
    let cfg = SaeTrainConfig {
        d_sae: 96,
        ..small_cfg()
    };
    for all_dead in [false, true] {
        let mut src = InMemoryActivations::new(data.clone(), Resid::In(0), 0).unwrap();
        let grads = initial_gradients(&cfg, &mut src, &Device::Cpu, all_dead).unwrap();
        let names: Vec<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["W_enc", "b_enc", "W_dec", "b_dec"]);
        for (name, g) in grads {
            let v = flat(&g);
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient"
            );
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 1e-8, "{name}: zero gradient (all_dead = {all_dead})");
        }
    }
}

#[test]
fn topk_recovers_a_known_sparse_dictionary() {
    // 256 unit directions in R^64, 3–5 active per sample, inputs scaled by 40 so that the
    // input normalisation and its folding back into the weights matter
    let (d, n_dirs) = (64, 256);
    let (dirs, data) = sparse_dictionary_data(n_dirs, d, 60_000, 40.0, 7);
    let cfg = SaeTrainConfig {
        d_sae: 512,
        k: 5,
        batch_size: 256,
        total_tokens: 256 * 500,
        lr: 4e-3,
        lr_warmup_steps: 20,
        lr_decay_frac: 0.3,
        aux_k: AuxK::Fixed(32),
        dead_tokens_threshold: 256 * 20,
        init_sample_tokens: 4096,
        seed: 3,
        checkpoint_every: 0,
        log_every: 100,
        ..Default::default()
    };
    let mut src = InMemoryActivations::new(data.clone(), Resid::Out(2), 5).unwrap();
    let t0 = std::time::Instant::now();
    let (sae, report) = train_topk(&cfg, &mut src, &Device::Cpu, None).unwrap();
    eprintln!(
        "synthetic: {} steps in {:.1} s, {:.0} tokens/s, last {:?}",
        report.steps,
        t0.elapsed().as_secs_f64(),
        report.tokens_per_s,
        report.last
    );
    assert_eq!(sae.hook(), Resid::Out(2));
    // input_scale = sqrt(d / E‖x‖²); E‖x‖² ≈ 40² · E[Σa²] ≈ 1600 · 4 · 13/12 → s ≈ 0.0961
    assert!(
        (report.input_scale - 0.096).abs() < 0.01,
        "{}",
        report.input_scale
    );

    // decoder rows: unit norm; each true direction's best cosine with a learned row
    let w_dec = sae.w_dec.to_vec2::<f32>().unwrap();
    for row in &w_dec {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "decoder row norm {norm}");
    }
    let mean_best: f32 = dirs
        .chunks(d)
        .map(|t| {
            w_dec
                .iter()
                .map(|w| w.iter().zip(t).map(|(a, b)| a * b).sum::<f32>())
                .fold(f32::MIN, f32::max)
        })
        .sum::<f32>()
        / n_dirs as f32;
    eprintln!("mean best cosine {mean_best}");
    assert!(mean_best >= 0.95, "mean best cosine {mean_best}");

    // the saved-form SAE takes raw (unscaled) activations
    let x = data.narrow(0, 0, 4096).unwrap();
    let f = sae.encode(&x).unwrap();
    let x_hat = sae.decode(&f).unwrap();
    let ev = metrics::explained_variance(&x, &x_hat).unwrap();
    eprintln!(
        "explained variance on raw inputs {ev}, L0 {}",
        metrics::l0(&f).unwrap()
    );
    // ≈ 0.90 when the scale is folded correctly (superposition interference limits it); a wrong
    // fold of the 1/0.096 input scale leaves the reconstruction off by a factor and EV far below 0
    assert!(ev > 0.85, "explained variance {ev}");
    assert!(metrics::l0(&f).unwrap() <= 5.0);
}

#[test]
fn resumed_training_is_bit_identical_to_an_uninterrupted_run() {
    let (_, data) = sparse_dictionary_data(64, 32, 700, 5.0, 2);
    let cfg = small_cfg();
    let dir_a = tempfile::tempdir().unwrap();
    let mut src = InMemoryActivations::new(data.clone(), Resid::In(1), 9).unwrap();
    let (full, full_report) = train_topk(&cfg, &mut src, &Device::Cpu, Some(dir_a.path())).unwrap();

    let dir_b = tempfile::tempdir().unwrap();
    let mut src = InMemoryActivations::new(data.clone(), Resid::In(1), 9).unwrap();
    let (_, part) =
        train_topk_until(&cfg, &mut src, &Device::Cpu, Some(dir_b.path()), Some(7)).unwrap();
    assert_eq!(part.steps, 7);
    drop(src);
    // a fresh source: its position comes from the checkpoint
    let mut src = InMemoryActivations::new(data, Resid::In(1), 9).unwrap();
    let (resumed, resumed_report) =
        train_topk(&cfg, &mut src, &Device::Cpu, Some(dir_b.path())).unwrap();
    assert_eq!(resumed_report.resumed_from_step, Some(7));
    assert_eq!(resumed_report.steps, 20);
    assert!(
        full_report.history.iter().any(|l| l.dead_frac > 0.0),
        "the run should have dead latents so the aux-k state is exercised: {:?}",
        full_report.history
    );
    for (what, a, b) in [
        ("W_enc", &full.w_enc, &resumed.w_enc),
        ("b_enc", &full.b_enc, &resumed.b_enc),
        ("W_dec", &full.w_dec, &resumed.w_dec),
        ("b_dec", &full.b_dec, &resumed.b_dec),
    ] {
        assert!(flat(a) == flat(b), "{what} differs after resume");
    }
    assert_eq!(full_report.history, resumed_report.history);

    // resuming with a changed config is refused
    let other = SaeTrainConfig { lr: 2e-3, ..cfg };
    let (_, data) = sparse_dictionary_data(64, 32, 700, 5.0, 2);
    let mut src = InMemoryActivations::new(data, Resid::In(1), 9).unwrap();
    let err = train_topk(&other, &mut src, &Device::Cpu, Some(dir_b.path())).unwrap_err();
    assert!(
        err.to_string().contains("different training config"),
        "{err}"
    );
}
