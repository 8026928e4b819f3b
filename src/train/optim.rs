//! The optimizer and its helpers, each small and checked against PyTorch's formulas:
//! AdamW (as `torch.optim.AdamW`), global-norm clipping (as `clip_grad_norm_`), and the
//! warm-up + cosine learning-rate schedule.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::{Result, TrainConfig, TrainError};

/// AdamW with f32 master weights (the `Var`s themselves) and exportable moments.
///
/// Per step t (from 1), for each parameter with gradient g:
/// `p ← p·(1 − lr·wd)` (decoupled decay, first); `m ← β1·m + (1−β1)·g`; `v ← β2·v + (1−β2)·g²`;
/// `p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)` (eps after the bias correction, as torch).
#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken so far.
    pub t: u64,
    /// First and second moments by parameter name.
    pub exp_avg: BTreeMap<String, Tensor>,
    pub exp_avg_sq: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
        }
    }

    pub fn from_config(cfg: &TrainConfig) -> Self {
        Self::new(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)
    }

    /// One update of every parameter with its gradient (same order as `params`).
    pub fn step(&mut self, params: &[(&String, &Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != grads.len() {
            return Err(TrainError::Internal(format!(
                "{} parameters but {} gradients",
                params.len(),
                grads.len()
            )));
        }
        self.t += 1;
        let t = self.t as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        for ((name, var), g) in params.iter().zip(grads) {
            let g = g.to_dtype(DType::F32)?;
            let zeros = || g.zeros_like();
            let m = match self.exp_avg.get(*name) {
                Some(m) => m.clone(),
                None => zeros()?,
            };
            let v = match self.exp_avg_sq.get(*name) {
                Some(v) => v.clone(),
                None => zeros()?,
            };
            let m = ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let p = (var.as_tensor().detach() * (1.0 - lr * self.weight_decay))?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + self.eps)?;
            let p = (p - (m.div(&denom)? * step_size)?)?;
            var.set(&p)?;
            self.exp_avg.insert((*name).clone(), m);
            self.exp_avg_sq.insert((*name).clone(), v);
        }
        Ok(())
    }
}

/// Scales the gradients in place so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`: `coef = min(1, max_norm / (norm + 1e-6))`. Returns the norm
/// before clipping (accumulated in f64).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: Option<f64>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if let Some(max_norm) = max_norm {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// The learning rate of optimizer step `step` (0-based): linear warm-up reaching `lr_peak` at
/// step `warmup_steps − 1`, then a cosine from `lr_peak` down to `lr_min` at step `max_steps`.
pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr_peak * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = cfg.max_steps.saturating_sub(cfg.warmup_steps).max(1);
    let progress = ((step - cfg.warmup_steps) as f64 / span as f64).min(1.0);
    cfg.lr_min + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (cfg.lr_peak - cfg.lr_min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_rises_in_warmup_peaks_and_ends_at_the_floor() {
        let cfg = TrainConfig {
            lr_peak: 1e-3,
            lr_min: 1e-4,
            warmup_steps: 10,
            max_steps: 110,
            ..TrainConfig::default()
        };
        let lrs: Vec<f64> = (0..=110).map(|s| lr_at(&cfg, s)).collect();
        assert!(lrs[..10].windows(2).all(|w| w[0] < w[1]));
        assert!((lrs[0] - 1e-4).abs() < 1e-15); // 1e-3 · 1/10
        assert!((lrs[9] - 1e-3).abs() < 1e-15);
        assert!((lrs[10] - 1e-3).abs() < 1e-15); // cosine starts at the peak
        assert!(lrs[10..].windows(2).all(|w| w[0] >= w[1]));
        // Halfway through the decay: (peak + floor) / 2.
        assert!((lrs[60] - 5.5e-4).abs() < 1e-12);
        assert!((lrs[110] - 1e-4).abs() < 1e-15);
    }

    #[test]
    fn clipping_matches_torch_formula() {
        // ‖(3, 4)‖ = 5; max 1 → coef 1/(5 + 1e-6).
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()];
        let norm = clip_grad_norm(&mut g, Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let v = g[0].to_vec1::<f32>().unwrap();
        assert!((v[0] as f64 - 3.0 / (5.0 + 1e-6)).abs() < 1e-7);
        // Below the threshold nothing changes.
        let mut g = vec![Tensor::new(&[0.3f32, 0.4], &Device::Cpu).unwrap()];
        clip_grad_norm(&mut g, Some(1.0)).unwrap();
        assert_eq!(g[0].to_vec1::<f32>().unwrap(), vec![0.3, 0.4]);
    }
}
