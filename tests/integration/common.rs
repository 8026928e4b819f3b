//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The golden reference folder: `$SAILS_GOLDEN`, else `../shared/golden` beside the checkout.
pub fn golden_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SAILS_GOLDEN") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden")
}

/// `|got − want| ≤ atol + rtol·|want|` elementwise; on failure names the worst index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // NaN counts as infinitely far off.
        let excess = match (g - w).abs() - (atol + rtol * w.abs()) {
            e if e.is_nan() => f32::INFINITY,
            e => e,
        };
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: index {} got {} want {} (tolerance {atol} + {rtol}·|want|)",
        worst.0,
        got[worst.0],
        want[worst.0]
    );
}

/// Values of `x: (b, t, d)` at real-token positions only (`mask[b][t] == 1`); pad positions are
/// unspecified in the references.
pub fn real_positions(x: &candle_core::Tensor, mask: &[Vec<i64>]) -> Vec<f32> {
    let rows = x
        .to_dtype(candle_core::DType::F32)
        .and_then(|x| x.to_vec3::<f32>())
        .expect("a (b, t, d) tensor");
    let mut out = Vec::new();
    for (b, row) in rows.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            if mask[b][t] == 1 {
                out.extend_from_slice(v);
            }
        }
    }
    out
}

/// A random TopK SAE (k = 8, encoder weights N(0, 0.05²), decoder = encoderᵀ, zero biases) on
/// `hook` of a model with hidden size `d_in`, for tests that need an SAE but no trained one.
pub fn random_topk_sae(
    hook: sails::model::Resid,
    d_in: usize,
    d_sae: usize,
    seed: u64,
) -> sails::sae::Sae {
    use candle_core::{DType, Device, Tensor};
    use sails::sae::{Architecture, Normalization, Sae, SaeConfig};
    let mut g = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let w: Vec<f32> = sails::linalg::standard_normals(&mut g, d_in * d_sae)
        .iter()
        .map(|v| (*v * 0.05) as f32)
        .collect();
    let w_enc = Tensor::from_vec(w, (d_in, d_sae), &Device::Cpu).unwrap();
    let w_dec = w_enc.t().unwrap().contiguous().unwrap();
    let cfg = SaeConfig {
        architecture: Architecture::TopK {
            k: 8,
            rescale_acts_by_decoder_norm: false,
        },
        d_in,
        d_sae,
        hook,
        apply_b_dec_to_input: false,
        normalize_activations: Normalization::None,
        metadata: Default::default(),
    };
    let zeros = |n| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
    Sae::new(cfg, w_enc, zeros(d_sae), w_dec, zeros(d_in), None).unwrap()
}

/// Runs the `sails` binary with `args`, waiting for it.
pub fn run_sails(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sails"))
        .args(args)
        .output()
        .unwrap()
}
