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
