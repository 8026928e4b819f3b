//! Δ scores, per-set statistics and bootstrap intervals from pooled feature activations.
//!
//! Pure arithmetic on `(n_prompts × d_sae)` matrices, so selection can be tested on planted
//! features without a model.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{FeatureError, Result};

/// Pooled activations of one prompt set at one layer: `values[p * width + i]` is feature (or
/// residual dimension) `i` of prompt `p`; `fired` says whether the feature was active on any of
/// the prompt's content tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledSet {
    pub width: usize,
    pub values: Vec<f32>,
    pub fired: Vec<bool>,
}

impl PooledSet {
    pub fn new(width: usize) -> Self {
        PooledSet {
            width,
            values: Vec::new(),
            fired: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.values.len().checked_div(self.width).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Appends one prompt's pooled row and its firing mask.
    pub fn push(&mut self, row: &[f32], fired: &[bool]) {
        debug_assert_eq!(row.len(), self.width);
        debug_assert_eq!(fired.len(), self.width);
        self.values.extend_from_slice(row);
        self.fired.extend_from_slice(fired);
    }

    fn column(&self, i: usize) -> impl Iterator<Item = f64> + '_ {
        self.values
            .iter()
            .skip(i)
            .step_by(self.width)
            .map(|&v| v as f64)
    }

    /// Mean of every column, in f64.
    pub fn means(&self) -> Vec<f64> {
        let mut sums = vec![0.0f64; self.width];
        for row in self.values.chunks_exact(self.width) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        let n = self.len().max(1) as f64;
        sums.iter().map(|s| s / n).collect()
    }
}

/// One kept feature's evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureScore {
    /// Latent index in the SAE.
    pub index: usize,
    /// Position in this layer's ranking (0 = largest Δ).
    pub rank: usize,
    /// `Δ = |mean_harmful − mean_harmless|` of the pooled activation.
    pub delta: f64,
    /// `mean_harmful − mean_harmless` (positive: the feature is a harmful-prompt feature).
    pub diff: f64,
    pub mean_harmful: f64,
    pub mean_harmless: f64,
    /// Share of harmful prompts on whose content tokens the feature fired at least once.
    pub freq_harmful: f64,
    pub freq_harmless: f64,
    /// Cohen's d: `diff` over the pooled standard deviation of the two sets (0 when both sets
    /// are constant).
    pub effect_size: f64,
    /// Percentile bootstrap 95 % interval of `diff` (prompts resampled within each set).
    pub diff_ci95: [f64; 2],
    /// Whether that interval excludes zero.
    pub robust: bool,
}

/// `|mean_a − mean_b|` per column.
pub fn deltas(harmful: &PooledSet, harmless: &PooledSet) -> Result<Vec<f64>> {
    check_sets(harmful, harmless)?;
    Ok(harmful
        .means()
        .iter()
        .zip(harmless.means())
        .map(|(a, b)| (a - b).abs())
        .collect())
}

fn check_sets(harmful: &PooledSet, harmless: &PooledSet) -> Result<()> {
    if harmful.width != harmless.width {
        return Err(FeatureError::WidthMismatch {
            harmful: harmful.width,
            harmless: harmless.width,
        });
    }
    for (set, s) in [("harmful", harmful), ("harmless", harmless)] {
        if s.len() < 2 {
            return Err(FeatureError::TooFewPrompts {
                set,
                got: s.len(),
                min: 2,
            });
        }
    }
    Ok(())
}

/// Indices of the `k` largest Δ, descending, ties by index. Features with Δ = 0 are never kept.
pub fn top_k(deltas: &[f64], k: usize) -> Result<Vec<usize>> {
    let mut order: Vec<usize> = (0..deltas.len()).filter(|&i| deltas[i] > 0.0).collect();
    if order.len() < k {
        return Err(FeatureError::TooFewFeatures {
            wanted: k,
            got: order.len(),
        });
    }
    order.sort_by(|&i, &j| deltas[j].total_cmp(&deltas[i]).then(i.cmp(&j)));
    order.truncate(k);
    Ok(order)
}

fn mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var)
}

/// The `q`-quantile of sorted values by linear interpolation (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Scores the top-`k` features by Δ, with statistics and a `bootstrap`-sample interval each.
///
/// The interval is computed for the kept features only (after selection, so it describes how
/// stable their difference is, not how likely they were to be selected).
pub fn score(
    harmful: &PooledSet,
    harmless: &PooledSet,
    k: usize,
    bootstrap: usize,
    seed: u64,
) -> Result<Vec<FeatureScore>> {
    let all = deltas(harmful, harmless)?;
    let kept = top_k(&all, k)?;
    let (nh, nb) = (harmful.len(), harmless.len());
    let mut rng = StdRng::seed_from_u64(seed);
    // One set of resampled prompt indices shared by every feature keeps the features' intervals
    // jointly consistent (and costs one draw per resample, not one per feature).
    let resamples: Vec<(Vec<usize>, Vec<usize>)> = (0..bootstrap)
        .map(|_| {
            (
                (0..nh).map(|_| rng.random_range(0..nh)).collect(),
                (0..nb).map(|_| rng.random_range(0..nb)).collect(),
            )
        })
        .collect();
    let freq = |s: &PooledSet, i: usize| {
        s.fired
            .iter()
            .skip(i)
            .step_by(s.width)
            .filter(|f| **f)
            .count() as f64
            / s.len() as f64
    };
    kept.iter()
        .enumerate()
        .map(|(rank, &i)| {
            let h: Vec<f64> = harmful.column(i).collect();
            let b: Vec<f64> = harmless.column(i).collect();
            let (mh, vh) = mean_var(&h);
            let (mb, vb) = mean_var(&b);
            let pooled_var = ((nh - 1) as f64 * vh + (nb - 1) as f64 * vb) / (nh + nb - 2) as f64;
            let diff = mh - mb;
            let effect_size = if pooled_var > 0.0 {
                diff / pooled_var.sqrt()
            } else {
                0.0
            };
            let mut boot: Vec<f64> = resamples
                .iter()
                .map(|(rh, rb)| {
                    let sh: f64 = rh.iter().map(|&p| h[p]).sum::<f64>() / nh as f64;
                    let sb: f64 = rb.iter().map(|&p| b[p]).sum::<f64>() / nb as f64;
                    sh - sb
                })
                .collect();
            boot.sort_by(f64::total_cmp);
            let ci = if boot.is_empty() {
                [diff, diff]
            } else {
                [quantile(&boot, 0.025), quantile(&boot, 0.975)]
            };
            Ok(FeatureScore {
                index: i,
                rank,
                delta: diff.abs(),
                diff,
                mean_harmful: mh,
                mean_harmless: mb,
                freq_harmful: freq(harmful, i),
                freq_harmless: freq(harmless, i),
                effect_size,
                diff_ci95: ci,
                robust: ci[0] > 0.0 || ci[1] < 0.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` prompts, `width` features of uniform noise in [0, 0.1); feature `i` gets `+shift` on
    /// every prompt for each `(i, shift)` in `planted`.
    fn noisy(n: usize, width: usize, planted: &[(usize, f32)], seed: u64) -> PooledSet {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut set = PooledSet::new(width);
        for _ in 0..n {
            let mut row: Vec<f32> = (0..width).map(|_| rng.random::<f32>() * 0.1).collect();
            for &(i, s) in planted {
                row[i] += s;
            }
            let fired: Vec<bool> = row.iter().map(|v| *v > 0.05).collect();
            set.push(&row, &fired);
        }
        set
    }

    #[test]
    fn selection_picks_the_planted_features_in_order_of_their_shift() {
        let harmful = noisy(60, 50, &[(7, 2.0), (31, 1.0), (12, 0.5)], 1);
        let harmless = noisy(80, 50, &[(40, 0.25)], 2);
        let scores = score(&harmful, &harmless, 4, 200, 0).unwrap();
        let picked: Vec<usize> = scores.iter().map(|s| s.index).collect();
        assert_eq!(picked, vec![7, 31, 12, 40]);
        // Δ of a planted shift s is s up to the noise's mean difference (|·| < 0.03 here).
        assert!((scores[0].delta - 2.0).abs() < 0.03, "{}", scores[0].delta);
        assert!(
            scores[3].diff < 0.0,
            "feature 40 is a harmless-prompt feature"
        );
        for s in &scores {
            assert!(s.robust, "planted feature {} not robust: {:?}", s.index, s);
            assert!(s.diff_ci95[0] <= s.diff && s.diff <= s.diff_ci95[1]);
            // noise sd is 0.1/√12 ≈ 0.029, so d ≈ shift / 0.029
            assert!(s.effect_size.abs() > 5.0, "{s:?}");
        }
        assert_eq!(scores[0].freq_harmful, 1.0);
    }

    #[test]
    fn hand_computed_statistics() {
        // feature 0: harmful [1, 3] (mean 2, var 2), harmless [0, 0, 0] (mean 0, var 0)
        // pooled var = (1·2 + 2·0) / 3 = 2/3, d = 2 / √(2/3) = √6
        let mut h = PooledSet::new(2);
        h.push(&[1.0, 0.0], &[true, false]);
        h.push(&[3.0, 0.0], &[true, false]);
        let mut b = PooledSet::new(2);
        for _ in 0..3 {
            b.push(&[0.0, 0.5], &[false, true]);
        }
        let s = score(&h, &b, 2, 0, 0).unwrap();
        assert_eq!(s[0].index, 0);
        assert!((s[0].effect_size - 6f64.sqrt()).abs() < 1e-12);
        assert_eq!((s[0].freq_harmful, s[0].freq_harmless), (1.0, 0.0));
        assert_eq!(s[1].index, 1);
        assert_eq!(s[1].diff, -0.5);
        // both sets constant in feature 1: no spread, effect size reported as 0
        assert_eq!(s[1].effect_size, 0.0);
    }

    #[test]
    fn pure_noise_gives_intervals_that_cover_zero() {
        let harmful = noisy(40, 30, &[], 3);
        let harmless = noisy(40, 30, &[], 4);
        let scores = score(&harmful, &harmless, 30, 500, 0).unwrap();
        let robust = scores.iter().filter(|s| s.robust).count();
        // 95 % intervals on null features: a few may exclude 0 by chance, most must not.
        assert!(robust <= 6, "{robust} of 30 null features called robust");
    }

    #[test]
    fn errors_name_the_problem() {
        let a = noisy(5, 4, &[], 0);
        let b = noisy(5, 3, &[], 0);
        assert!(matches!(
            score(&a, &b, 1, 0, 0),
            Err(FeatureError::WidthMismatch { .. })
        ));
        let one = noisy(1, 4, &[], 0);
        assert!(matches!(
            score(&one, &a, 1, 0, 0),
            Err(FeatureError::TooFewPrompts { got: 1, .. })
        ));
        assert!(matches!(
            score(&a, &a.clone(), 1, 0, 0),
            Err(FeatureError::TooFewFeatures { got: 0, .. })
        ));
    }
}
