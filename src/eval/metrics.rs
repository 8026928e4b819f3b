//! Rates with Wilson intervals, and McNemar's test for paired outcomes. Each statistic is defined
//! once here.

use serde::{Deserialize, Serialize};

/// z for a two-sided 95 % interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// A proportion k/n with its Wilson 95 % score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub k: usize,
    pub n: usize,
    /// k/n; NaN when n = 0 (serialised as null).
    pub rate: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Rate {
    pub fn new(k: usize, n: usize) -> Self {
        let (lo, hi) = wilson(k, n, Z95);
        Self {
            k,
            n,
            rate: if n == 0 {
                f64::NAN
            } else {
                k as f64 / n as f64
            },
            lo,
            hi,
        }
    }

    /// The complementary rate (n − k)/n, e.g. safety rate = 1 − attack success rate.
    pub fn complement(&self) -> Self {
        Self::new(self.n - self.k, self.n)
    }

    /// `80.0 % [71.2, 86.7] (80/100)`.
    pub fn pretty(&self) -> String {
        if self.n == 0 {
            return "n/a (0 items)".into();
        }
        format!(
            "{:5.1} % [{:5.1}, {:5.1}] ({}/{})",
            100.0 * self.rate,
            100.0 * self.lo,
            100.0 * self.hi,
            self.k,
            self.n
        )
    }
}

/// Wilson score interval for k successes in n trials:
/// `(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)`. (0, 1) when n = 0.
pub fn wilson(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n_f = n as f64;
    let p = k as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let center = (p + z2 / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// Which form of McNemar's test was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum McNemarMethod {
    /// Two-sided exact binomial test on the discordant pairs (b + c < 25).
    ExactBinomial,
    /// χ² with one degree of freedom and continuity correction, (|b − c| − 1)² / (b + c).
    ChiSquareCorrected,
    /// No discordant pairs: p = 1.
    NoDiscordant,
}

/// Below this many discordant pairs the exact test is used.
pub const MCNEMAR_EXACT_BELOW: usize = 25;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McNemar {
    /// Pairs where A succeeded and B did not.
    pub b: usize,
    /// Pairs where B succeeded and A did not.
    pub c: usize,
    pub statistic: Option<f64>,
    pub p_value: f64,
    pub method: McNemarMethod,
}

/// McNemar's test for `b` and `c` discordant pairs.
pub fn mcnemar(b: usize, c: usize) -> McNemar {
    let n = b + c;
    if n == 0 {
        return McNemar {
            b,
            c,
            statistic: None,
            p_value: 1.0,
            method: McNemarMethod::NoDiscordant,
        };
    }
    if n < MCNEMAR_EXACT_BELOW {
        // Two-sided: 2·P(X ≤ min(b, c)) for X ~ Binomial(n, 1/2), capped at 1.
        let m = b.min(c);
        let tail: f64 = (0..=m).map(|i| binomial(n, i)).sum::<f64>() / 2f64.powi(n as i32);
        return McNemar {
            b,
            c,
            statistic: None,
            p_value: (2.0 * tail).min(1.0),
            method: McNemarMethod::ExactBinomial,
        };
    }
    let d = (b as f64 - c as f64).abs() - 1.0;
    let chi2 = d.max(0.0).powi(2) / n as f64;
    McNemar {
        b,
        c,
        statistic: Some(chi2),
        // P(χ²₁ > x) = erfc(sqrt(x / 2)).
        p_value: erfc((chi2 / 2.0).sqrt()),
        method: McNemarMethod::ChiSquareCorrected,
    }
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// Complementary error function (Chebyshev fit, fractional error below 1.2e-7 everywhere).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// A paired difference of success rates, B − A, with a Wald 95 % interval for paired proportions
/// and McNemar's test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairedDiff {
    pub n: usize,
    pub rate_a: f64,
    pub rate_b: f64,
    pub diff: f64,
    pub lo: f64,
    pub hi: f64,
    pub mcnemar: McNemar,
}

/// Compares paired outcomes `(a, b)` (true = success).
pub fn paired_diff(pairs: &[(bool, bool)]) -> PairedDiff {
    let n = pairs.len();
    let b = pairs.iter().filter(|&&(a, b)| a && !b).count();
    let c = pairs.iter().filter(|&&(a, b)| !a && b).count();
    let ka = pairs.iter().filter(|p| p.0).count();
    let kb = pairs.iter().filter(|p| p.1).count();
    let n_f = n.max(1) as f64;
    let diff = (c as f64 - b as f64) / n_f;
    // Var(d̂) = ((b + c) − (c − b)²/n) / n².
    let var = ((b + c) as f64 - (c as f64 - b as f64).powi(2) / n_f).max(0.0) / (n_f * n_f);
    let half = Z95 * var.sqrt();
    PairedDiff {
        n,
        rate_a: ka as f64 / n_f,
        rate_b: kb as f64 / n_f,
        diff,
        // The Wald interval can pass ±1 near the edges; a difference of proportions cannot.
        lo: (diff - half).max(-1.0),
        hi: (diff + half).min(1.0),
        mcnemar: mcnemar(b, c),
    }
}

/// Two methods' safety / over-refusal frontiers compared: A − B, with its uncertainty over prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontierDiff {
    /// Mean over scales (and seeds) of (safety − over-refusal) of A minus the same for B.
    pub diff: f64,
    /// Percentile bootstrap 95 % interval, prompts resampled within each suite.
    pub lo: f64,
    pub hi: f64,
    /// Two-sided sign-flip permutation p-value, `(1 + #{|T*| ≥ |T|}) / (1 + resamples)`.
    pub p_value: f64,
    pub harmful_items: usize,
    pub overrefusal_items: usize,
    /// Resamples of the bootstrap and of the permutation test each.
    pub resamples: usize,
    /// Seed of both (the figures are reproducible).
    pub seed: u64,
}

/// `mean(harmful) − mean(overrefusal)`: the difference in (safety − over-refusal) from per-prompt
/// differences. NaN if either is empty.
pub fn safety_minus_overrefusal(harmful: &[f64], overrefusal: &[f64]) -> f64 {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    mean(harmful) - mean(overrefusal)
}

/// Compares two methods' frontiers from per-prompt differences on the same prompts.
///
/// `harmful[i]` is A's minus B's outcome on harmful prompt i (1 = safe), `overrefusal[j]` the same
/// on XSTest safe prompt j (1 = refused), each averaged over the adapter scales and the seeds
/// (seed s of A paired with seed s of B). The statistic is the mean over scales of the difference
/// in Youden's J = safety − over-refusal. Why this one:
/// - J is the height of a point above the chance diagonal of the safety-against-over-refusal plane,
///   so a frontier that reaches more safety at equal over-refusal has the higher J at matched
///   points; averaging over the scale grid summarises the whole frontier, not one operating point.
/// - It is a sum of per-prompt terms, so the two methods are paired on the very same prompts (item
///   difficulty cancels) and the test needs no interpolation between points at different
///   over-refusal, which a frontier area would (its value depends on the x-range each curve spans).
///
/// p: each prompt's difference has its sign flipped at random (under "no difference" the two
/// methods' labels are exchangeable on every prompt), exact in finite samples and free of a
/// distribution assumption. Interval: percentile bootstrap over prompts, resampled within each
/// suite. Both read prompts as the sampled units and the trained adapters as given: seed-to-seed
/// variation of training shows in the per-seed figures beside it, not in this p. Returns None if
/// either suite has no prompts.
pub fn frontier_diff(
    harmful: &[f64],
    overrefusal: &[f64],
    resamples: usize,
    seed: u64,
) -> Option<FrontierDiff> {
    use rand::{Rng, SeedableRng};
    if harmful.is_empty() || overrefusal.is_empty() {
        return None;
    }
    let diff = safety_minus_overrefusal(harmful, overrefusal);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Ties count as at least as extreme (|T*| = |T| up to rounding): identical methods give p = 1.
    let tol = 1e-12;
    // One buffer per suite, refilled by every resample of either kind.
    let mut h = vec![0.0; harmful.len()];
    let mut o = vec![0.0; overrefusal.len()];
    let mut extreme = 0;
    for _ in 0..resamples {
        for (f, v) in h.iter_mut().zip(harmful) {
            *f = if rng.random::<bool>() { *v } else { -v };
        }
        for (f, v) in o.iter_mut().zip(overrefusal) {
            *f = if rng.random::<bool>() { *v } else { -v };
        }
        if safety_minus_overrefusal(&h, &o).abs() >= diff.abs() - tol {
            extreme += 1;
        }
    }
    let mut boot = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for f in h.iter_mut() {
            *f = harmful[rng.random_range(0..harmful.len())];
        }
        for f in o.iter_mut() {
            *f = overrefusal[rng.random_range(0..overrefusal.len())];
        }
        boot.push(safety_minus_overrefusal(&h, &o));
    }
    boot.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        boot.get(((boot.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(diff)
    };
    Some(FrontierDiff {
        diff,
        lo: quantile(0.025),
        hi: quantile(0.975),
        p_value: (1 + extreme) as f64 / (1 + resamples) as f64,
        harmful_items: harmful.len(),
        overrefusal_items: overrefusal.len(),
        resamples,
        seed,
    })
}

/// The ratio of two means over paired items, `mean(a) / mean(b)`, with a percentile bootstrap
/// 95 % interval (items resampled with their pairs kept together).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatioOfMeans {
    pub n: usize,
    /// Mean of the first member of each pair (NaN, written as null, when n = 0).
    pub mean_a: f64,
    /// Mean of the second member: the reference.
    pub mean_b: f64,
    /// `mean_a / mean_b`; None when `mean_b ≤ 0`, where a ratio says nothing.
    pub ratio: Option<f64>,
    /// The interval; None without a ratio, or when more than 2.5 % of the resamples have a
    /// reference mean ≤ 0 (the interval would then be cut by the undefined resamples).
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub resamples: usize,
    pub seed: u64,
}

/// [`RatioOfMeans`] of `pairs` `(a, b)`.
pub fn ratio_of_means(pairs: &[(f64, f64)], resamples: usize, seed: u64) -> RatioOfMeans {
    use rand::{Rng, SeedableRng};
    let n = pairs.len();
    let means = |idx: &mut dyn Iterator<Item = usize>| {
        let (mut sa, mut sb) = (0.0, 0.0);
        for i in idx {
            sa += pairs[i].0;
            sb += pairs[i].1;
        }
        (sa / n as f64, sb / n as f64)
    };
    let (mean_a, mean_b) = means(&mut (0..n));
    let ratio = (n > 0 && mean_b > 0.0).then(|| mean_a / mean_b);
    let mut boot = Vec::with_capacity(resamples);
    if ratio.is_some() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..resamples {
            let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            let (a, b) = means(&mut idx.into_iter());
            if b > 0.0 {
                boot.push(a / b);
            }
        }
    }
    boot.sort_by(f64::total_cmp);
    let usable = resamples > 0 && boot.len() as f64 >= 0.975 * resamples as f64;
    let quantile = |q: f64| usable.then(|| boot[((boot.len() - 1) as f64 * q).round() as usize]);
    RatioOfMeans {
        n,
        mean_a,
        mean_b,
        ratio,
        lo: quantile(0.025),
        hi: quantile(0.975),
        resamples,
        seed,
    }
}

/// Area under the ROC curve of a score that should be higher on `pos` than on `neg`: the chance
/// that a random `pos` item scores above a random `neg` item, ties counting half (Mann–Whitney
/// U over |pos|·|neg|). 0.5: no separation. None when either group is empty.
pub fn auc(pos: &[f64], neg: &[f64]) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let mut u = 0.0;
    for p in pos {
        for n in neg {
            u += match p.total_cmp(n) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            };
        }
    }
    Some(u / (pos.len() * neg.len()) as f64)
}

/// How much of a gap between two groups survives a change of condition: the gap
/// `mean(target) − mean(control)` in the new condition over the same gap in the reference
/// condition, each item measured in both (pairs `(new, reference)`), with a percentile bootstrap
/// 95 % interval (targets and controls resampled apart, each item's pair kept together).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapRatio {
    pub n_target: usize,
    pub n_control: usize,
    /// `mean(target) − mean(control)` in the new condition.
    pub gap: f64,
    /// The same in the reference condition.
    pub gap_reference: f64,
    /// `gap / gap_reference`; None when the reference gap is ≤ 0 or a group is empty.
    pub ratio: Option<f64>,
    /// None without a ratio, or when more than 2.5 % of the resamples have a reference gap ≤ 0.
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub resamples: usize,
    pub seed: u64,
}

/// [`GapRatio`] of `target` and `control` pairs `(new, reference)`.
pub fn gap_ratio(
    target: &[(f64, f64)],
    control: &[(f64, f64)],
    resamples: usize,
    seed: u64,
) -> GapRatio {
    use rand::{Rng, SeedableRng};
    let mean = |v: &[(f64, f64)], idx: &[usize]| {
        let (mut a, mut b) = (0.0, 0.0);
        for &i in idx {
            a += v[i].0;
            b += v[i].1;
        }
        (a / idx.len() as f64, b / idx.len() as f64)
    };
    let all = |n: usize| (0..n).collect::<Vec<_>>();
    let gaps = |t: &[usize], c: &[usize]| {
        let ((tn, tr), (cn, cr)) = (mean(target, t), mean(control, c));
        (tn - cn, tr - cr)
    };
    let (nt, nc) = (target.len(), control.len());
    let (gap, gap_reference) = gaps(&all(nt), &all(nc));
    let ratio = (nt > 0 && nc > 0 && gap_reference > 0.0).then(|| gap / gap_reference);
    let mut boot = Vec::with_capacity(resamples);
    if ratio.is_some() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..resamples {
            let t: Vec<usize> = (0..nt).map(|_| rng.random_range(0..nt)).collect();
            let c: Vec<usize> = (0..nc).map(|_| rng.random_range(0..nc)).collect();
            let (g, r) = gaps(&t, &c);
            if r > 0.0 {
                boot.push(g / r);
            }
        }
    }
    boot.sort_by(f64::total_cmp);
    let usable = resamples > 0 && boot.len() as f64 >= 0.975 * resamples as f64;
    let quantile = |q: f64| usable.then(|| boot[((boot.len() - 1) as f64 * q).round() as usize]);
    GapRatio {
        n_target: nt,
        n_control: nc,
        gap,
        gap_reference,
        ratio,
        lo: quantile(0.025),
        hi: quantile(0.975),
        resamples,
        seed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_by_hand() {
        // pairs: (3>1) (3>2) (2>1) (2=2: half) (1=1: half) (1<2) → (1+1+1+0.5+0.5+0)/6
        assert_eq!(auc(&[3.0, 2.0, 1.0], &[1.0, 2.0]), Some(4.0 / 6.0));
        assert_eq!(auc(&[5.0], &[1.0, 2.0]), Some(1.0));
        assert_eq!(auc(&[0.0], &[1.0, 2.0]), Some(0.0));
        assert_eq!(auc(&[], &[1.0]), None);
    }

    #[test]
    fn gap_ratio_by_hand() {
        // reference: targets 1.0, controls 0.2 → gap 0.8; new: targets 0.6, controls 0.2 → 0.4.
        let target = [(0.5, 1.0), (0.7, 1.0)];
        let control = [(0.1, 0.1), (0.3, 0.3)];
        let g = gap_ratio(&target, &control, 200, 3);
        assert!((g.gap - 0.4).abs() < 1e-12 && (g.gap_reference - 0.8).abs() < 1e-12);
        assert!((g.ratio.unwrap() - 0.5).abs() < 1e-12);
        let (lo, hi) = (g.lo.unwrap(), g.hi.unwrap());
        assert!(lo <= 0.5 && 0.5 <= hi && lo < hi, "{lo} {hi}");
        assert_eq!(gap_ratio(&target, &control, 200, 3), g);
        // No gap to begin with: no ratio.
        let g = gap_ratio(&[(1.0, 0.2)], &[(0.0, 0.3)], 50, 0);
        assert_eq!((g.ratio, g.lo), (None, None));
        assert_eq!(gap_ratio(&target, &[], 50, 0).ratio, None);
    }

    #[test]
    fn ratio_of_means_by_hand() {
        // means 3 and 2 → 1.5.
        let r = ratio_of_means(&[(3.0, 2.0), (6.0, 4.0), (0.0, 0.0)], 200, 7);
        assert_eq!((r.n, r.mean_a, r.mean_b), (3, 3.0, 2.0));
        assert_eq!(r.ratio, Some(1.5));
        // Every pair has the ratio 1.5 and resamples keep pairs together, so the interval is a
        // point (up to rounding).
        let r = ratio_of_means(&[(3.0, 2.0), (6.0, 4.0), (1.5, 1.0)], 200, 7);
        for v in [r.lo.unwrap(), r.hi.unwrap()] {
            assert!((v - 1.5).abs() < 1e-12, "{v}");
        }
        // An interval that varies covers the point estimate.
        let pairs: Vec<(f64, f64)> = (0..30)
            .map(|i| (1.0 + (i % 7) as f64, 2.0 + (i % 5) as f64))
            .collect();
        let r = ratio_of_means(&pairs, 500, 1);
        let (lo, hi, p) = (r.lo.unwrap(), r.hi.unwrap(), r.ratio.unwrap());
        assert!(lo < p && p < hi, "{lo} {p} {hi}");
        // The same seed gives the same interval.
        assert_eq!(ratio_of_means(&pairs, 500, 1), r);
    }

    #[test]
    fn no_interval_when_many_resamples_lack_a_reference() {
        // A resample of only the (0, 0) pair has no ratio: 1/27 of them, above 2.5 %.
        let r = ratio_of_means(&[(3.0, 2.0), (6.0, 4.0), (0.0, 0.0)], 4000, 7);
        assert_eq!(r.ratio, Some(1.5));
        assert_eq!((r.lo, r.hi), (None, None));
    }

    #[test]
    fn a_ratio_to_a_non_positive_reference_is_none() {
        let r = ratio_of_means(&[(1.0, -1.0), (1.0, 0.5)], 100, 0);
        assert_eq!(r.ratio, None);
        assert_eq!((r.lo, r.hi), (None, None));
        let r = ratio_of_means(&[], 100, 0);
        assert_eq!((r.n, r.ratio), (0, None));
    }
}
