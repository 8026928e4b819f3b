//! SAE quality metrics, each defined once. Inputs are (n, d) tensors of raw activations `x`,
//! reconstructions `x̂` and feature activations `f`; results are f64.

use candle_core::{DType, Tensor, D};

use super::{Result, SaeError};

/// A latent is *dense* when it fires on more than this fraction of tokens (10 %).
pub const DENSE_FIRING_RATE: f64 = 0.1;

fn to_f64(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?)
}

fn same_shape(metric: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() || a.rank() != 2 {
        return Err(SaeError::Metric {
            metric,
            message: format!(
                "shapes {:?} and {:?} must be equal (n, d)",
                a.dims(),
                b.dims()
            ),
        });
    }
    Ok(())
}

/// Mean number of non-zero features per input: `(1/n) Σ_i #{j : f_ij ≠ 0}`.
pub fn l0(f: &Tensor) -> Result<f64> {
    let (n, _) = f.dims2()?;
    let nz = to_f64(&f.ne(0f64)?)?.sum_all()?.to_scalar::<f64>()?;
    Ok(nz / n as f64)
}

/// Explained variance about the mean: `1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`, where `x̄` is the mean
/// input over the n rows.
pub fn explained_variance(x: &Tensor, x_hat: &Tensor) -> Result<f64> {
    same_shape("explained_variance", x, x_hat)?;
    let (x, x_hat) = (to_f64(x)?, to_f64(x_hat)?);
    let err = (&x - &x_hat)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let var = x
        .broadcast_sub(&x.mean_keepdim(0)?)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    if var <= 0.0 {
        return Err(SaeError::Metric {
            metric: "explained_variance",
            message: "the inputs have zero variance".into(),
        });
    }
    Ok(1.0 - err / var)
}

/// Mean over rows of `cos(x_i, x̂_i)`; a row where either vector is zero counts as 0.
pub fn mean_cosine(x: &Tensor, x_hat: &Tensor) -> Result<f64> {
    same_shape("mean_cosine", x, x_hat)?;
    let (x, x_hat) = (to_f64(x)?, to_f64(x_hat)?);
    let dot: Vec<f64> = (&x * &x_hat)?.sum(D::Minus1)?.to_vec1()?;
    let nx: Vec<f64> = x.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec1()?;
    let ny: Vec<f64> = x_hat.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec1()?;
    let n = dot.len();
    let total: f64 = (0..n)
        .map(|i| {
            let den = nx[i] * ny[i];
            if den > 0.0 {
                dot[i] / den
            } else {
                0.0
            }
        })
        .sum();
    Ok(total / n as f64)
}

/// Per-latent firing counts over a set of inputs, `f` (n, d_sae) → d_sae counts.
pub fn fire_counts(f: &Tensor) -> Result<Vec<u64>> {
    let c: Vec<f64> = to_f64(&f.ne(0f64)?)?.sum(0)?.to_vec1()?;
    Ok(c.into_iter().map(|v| v as u64).collect())
}

/// Fraction of latents that never fired (count 0).
pub fn dead_fraction(fire_counts: &[u64]) -> Result<f64> {
    if fire_counts.is_empty() {
        return Err(SaeError::Metric {
            metric: "dead_fraction",
            message: "no latents".into(),
        });
    }
    Ok(fire_counts.iter().filter(|&&c| c == 0).count() as f64 / fire_counts.len() as f64)
}

/// Fraction of latents firing on more than [`DENSE_FIRING_RATE`] of `n_tokens` tokens.
/// With no tokens counted, no latent is dense.
pub fn dense_fraction(fire_counts: &[u64], n_tokens: u64) -> Result<f64> {
    if fire_counts.is_empty() {
        return Err(SaeError::Metric {
            metric: "dense_fraction",
            message: "no latents".into(),
        });
    }
    if n_tokens == 0 {
        return Ok(0.0);
    }
    let dense = fire_counts
        .iter()
        .filter(|&&c| c as f64 / n_tokens as f64 > DENSE_FIRING_RATE)
        .count();
    Ok(dense as f64 / fire_counts.len() as f64)
}

/// Cross-entropy loss recovered by splicing the SAE into the model:
/// `(CE_zero_ablation − CE_spliced) / (CE_zero_ablation − CE_clean)`. 1 means the reconstruction
/// is as good as the real activations, 0 as bad as zeroing them.
pub fn ce_loss_recovered(ce_clean: f64, ce_spliced: f64, ce_zero_ablation: f64) -> Result<f64> {
    let den = ce_zero_ablation - ce_clean;
    if den.abs() < 1e-12 || !den.is_finite() || !ce_spliced.is_finite() {
        return Err(SaeError::Metric {
            metric: "ce_loss_recovered",
            message: format!(
                "undefined: CE clean {ce_clean}, zero-ablated {ce_zero_ablation}, spliced {ce_spliced}"
            ),
        });
    }
    Ok((ce_zero_ablation - ce_spliced) / den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn l0_counts_nonzeros_per_row() {
        let f = Tensor::new(&[[0f32, 1.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.1]], &Device::Cpu).unwrap();
        // (2 + 1) / 2
        assert_eq!(l0(&f).unwrap(), 1.5);
        assert_eq!(fire_counts(&f).unwrap(), vec![0, 1, 0, 2]);
    }

    #[test]
    fn explained_variance_by_hand() {
        // x = (0,0), (2,0): mean (1,0); Σ‖x−x̄‖² = 1 + 1 = 2
        // x̂ = (0,1), (2,0): Σ‖x−x̂‖² = 1 → EV = 1 − 1/2 = 0.5
        let x = t(&[[0.0, 0.0], [2.0, 0.0]]);
        let xh = t(&[[0.0, 1.0], [2.0, 0.0]]);
        assert!((explained_variance(&x, &xh).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(explained_variance(&x, &x).unwrap(), 1.0);
        // predicting the mean explains nothing: EV 0
        let mean = t(&[[1.0, 0.0], [1.0, 0.0]]);
        assert!(explained_variance(&x, &mean).unwrap().abs() < 1e-12);
    }

    #[test]
    fn mean_cosine_by_hand() {
        // row 0: (1,0)·(1,1) / (1·√2) = 1/√2; row 1: (0,2) vs (0,−3) → −1
        let x = t(&[[1.0, 0.0], [0.0, 2.0]]);
        let xh = t(&[[1.0, 1.0], [0.0, -3.0]]);
        let want = (std::f64::consts::FRAC_1_SQRT_2 - 1.0) / 2.0;
        assert!((mean_cosine(&x, &xh).unwrap() - want).abs() < 1e-7);
    }

    #[test]
    fn dead_and_dense_fractions_by_hand() {
        // 100 tokens; dense means > 10 firings: only 11 and 50 → 2/5; dead: the two zeros → 2/5
        let counts = [0, 10, 11, 50, 0];
        assert_eq!(dead_fraction(&counts).unwrap(), 0.4);
        assert_eq!(dense_fraction(&counts, 100).unwrap(), 0.4);
    }

    #[test]
    fn ce_loss_recovered_by_hand() {
        // clean 2, zero-ablated 6, spliced 3: (6 − 3)/(6 − 2) = 0.75
        assert_eq!(ce_loss_recovered(2.0, 3.0, 6.0).unwrap(), 0.75);
        assert_eq!(ce_loss_recovered(2.0, 2.0, 6.0).unwrap(), 1.0);
        assert_eq!(ce_loss_recovered(2.0, 6.0, 6.0).unwrap(), 0.0);
        assert!(ce_loss_recovered(2.0, 3.0, 2.0).is_err());
    }
}
