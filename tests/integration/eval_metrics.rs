//! Metrics against worked examples computed by hand (derivations beside the numbers).

use sails::eval::metrics::{erfc, mcnemar, paired_diff, wilson, McNemarMethod, Rate, Z95};

#[test]
fn wilson_interval_matches_hand_computation() {
    // k = 8, n = 10, z = 1.96: p̂ = 0.8, z² = 3.8416, 1 + z²/n = 1.38416.
    // centre = (0.8 + 3.8416/20) / 1.38416 = 0.99208 / 1.38416 = 0.716737
    // half   = 1.96 · sqrt(0.8·0.2/10 + 3.8416/400) / 1.38416
    //        = 1.96 · sqrt(0.016 + 0.009604) / 1.38416 = 1.96 · 0.160012 / 1.38416 = 0.226580
    // → [0.490157, 0.943317]
    let (lo, hi) = wilson(8, 10, 1.96);
    assert!((lo - 0.490157).abs() < 1e-5, "{lo}");
    assert!((hi - 0.943317).abs() < 1e-5, "{hi}");
    // k = 0, n = 10: centre = (z²/2n)/(1+z²/n) = 0.19208/1.38416 = 0.138771,
    // half = 1.96·sqrt(0.009604)/1.38416 = 1.96·0.0980/1.38416 = 0.138771 → [0, 0.277542].
    let (lo, hi) = wilson(0, 10, 1.96);
    assert!(lo.abs() < 1e-12);
    assert!((hi - 0.277542).abs() < 1e-5, "{hi}");
    // Symmetry: the interval for k/n mirrors the one for (n−k)/n.
    let (a, b) = wilson(3, 17, Z95);
    let (c, d) = wilson(14, 17, Z95);
    assert!((a - (1.0 - d)).abs() < 1e-12 && (b - (1.0 - c)).abs() < 1e-12);
    // No data: the whole range.
    assert_eq!(wilson(0, 0, Z95), (0.0, 1.0));
    let r = Rate::new(8, 10);
    assert_eq!((r.k, r.n), (8, 10));
    assert!((r.rate - 0.8).abs() < 1e-12);
    assert_eq!(r.complement().k, 2);
}

#[test]
fn mcnemar_exact_binomial_for_few_discordant_pairs() {
    // b = 1, c = 6, n = 7: P(X ≤ 1) = (C(7,0) + C(7,1)) / 2⁷ = 8/128 = 0.0625; two-sided 0.125.
    let m = mcnemar(1, 6);
    assert_eq!(m.method, McNemarMethod::ExactBinomial);
    assert!((m.p_value - 0.125).abs() < 1e-12, "{}", m.p_value);
    // b = 5, c = 15, n = 20: 2·Σ_{i≤5} C(20,i) / 2²⁰ = 2·21700/1048576 = 0.0413895.
    let m = mcnemar(5, 15);
    assert!((m.p_value - 0.041389465).abs() < 1e-8, "{}", m.p_value);
    // Balanced: capped at 1.
    assert_eq!(mcnemar(3, 3).p_value, 1.0);
    assert_eq!(mcnemar(0, 0).method, McNemarMethod::NoDiscordant);
}

#[test]
fn mcnemar_chi_square_with_continuity_correction() {
    // b = 10, c = 30: χ² = (|10 − 30| − 1)² / 40 = 361/40 = 9.025;
    // p = P(χ²₁ > 9.025) = erfc(sqrt(9.025/2)) = 0.0026631 (math.erfc in Python).
    let m = mcnemar(10, 30);
    assert_eq!(m.method, McNemarMethod::ChiSquareCorrected);
    assert!((m.statistic.unwrap() - 9.025).abs() < 1e-12);
    assert!((m.p_value - 0.002663119).abs() < 1e-6, "{}", m.p_value);
    // erfc(0) = 1, erfc(1) = 0.157299207, erfc(−1) = 1.842700793.
    assert!((erfc(0.0) - 1.0).abs() < 1e-7);
    assert!((erfc(1.0) - 0.157_299_207).abs() < 1e-7);
    assert!((erfc(-1.0) - 1.842_700_793).abs() < 1e-7);
}

#[test]
fn paired_difference_counts_discordant_pairs() {
    // 10 pairs: 2 where only A succeeds (b), 5 where only B does (c), 3 both.
    let mut pairs = vec![(true, false); 2];
    pairs.extend(vec![(false, true); 5]);
    pairs.extend(vec![(true, true); 3]);
    let d = paired_diff(&pairs);
    // rate A = 5/10, rate B = 8/10, diff = (c − b)/n = 0.3
    assert!((d.rate_a - 0.5).abs() < 1e-12 && (d.rate_b - 0.8).abs() < 1e-12);
    assert!((d.diff - 0.3).abs() < 1e-12);
    // Var = ((b + c) − (c − b)²/n)/n² = (7 − 0.9)/100 = 0.061; half = 1.96·0.246982 = 0.484076
    assert!((d.hi - d.diff - 1.959964 * 0.061f64.sqrt()).abs() < 1e-6);
    assert_eq!((d.mcnemar.b, d.mcnemar.c), (2, 5));
    // exact: 2·(C(7,0)+C(7,1)+C(7,2))/128 = 2·29/128 = 0.453125
    assert!((d.mcnemar.p_value - 0.453125).abs() < 1e-12);
}

#[test]
fn paired_difference_interval_stays_within_plus_minus_one() {
    // 21 of 24 items flip from not counted to counted, none the other way, as in the quick run.
    let mut pairs = vec![(false, true); 21];
    pairs.extend([(false, false), (false, false), (true, true)]);
    let d = paired_diff(&pairs);
    assert!((d.diff - 21.0 / 24.0).abs() < 1e-12);
    assert!(d.hi <= 1.0 && d.hi > d.diff, "{}", d.hi);
    assert!(d.lo < d.diff && d.lo > 0.5, "{}", d.lo);
}

#[test]
fn frontier_diff_of_identical_methods_is_zero_with_a_large_p() {
    use sails::eval::metrics::frontier_diff;
    // Every prompt the same for both methods: T = 0, every flip gives 0 as well, so p = 1 and the
    // bootstrap never leaves 0.
    let d = frontier_diff(&[0.0; 20], &[0.0; 30], 2000, 7).unwrap();
    assert_eq!((d.diff, d.lo, d.hi, d.p_value), (0.0, 0.0, 0.0, 1.0));
    // Methods that differ prompt by prompt but not on balance: harmful +1, −1, … (mean 0),
    // XSTest +0.5, −0.5, … (mean 0). T = 0; p stays 1 (ties count) and the interval covers 0.
    let h: Vec<f64> = (0..40)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let o: Vec<f64> = (0..40)
        .map(|i| if i % 2 == 0 { 0.5 } else { -0.5 })
        .collect();
    let d = frontier_diff(&h, &o, 2000, 7).unwrap();
    assert!(d.diff.abs() < 1e-12);
    assert!(d.p_value > 0.5, "{d:?}");
    assert!(d.lo < 0.0 && d.hi > 0.0, "{d:?}");
    assert_eq!((d.harmful_items, d.overrefusal_items), (40, 40));
}

#[test]
fn frontier_diff_of_a_method_better_on_every_prompt_is_significant() {
    use sails::eval::metrics::frontier_diff;
    // A safe where B complied on all 25 harmful prompts (+1 each) and A answered where B refused
    // on all 25 XSTest prompts (−1 each): T = 1 − (−1) = 2. A random flip reaches |T*| = 2 only
    // when all 50 signs agree, P = 2·2⁻⁵⁰, so no resample does and p = 1/(1 + 2000).
    let d = frontier_diff(&[1.0; 25], &[-1.0; 25], 2000, 7).unwrap();
    assert_eq!(d.diff, 2.0);
    assert_eq!(d.p_value, 1.0 / 2001.0);
    assert_eq!((d.lo, d.hi), (2.0, 2.0));
    // Worked example: harmful diffs mean (1 + 0 + 0 + 1)/4 = 0.5, XSTest (−0.5 + 0.5)/2 = 0:
    // T = 0.5 − 0 = 0.5; the same seed gives the same figures.
    let a = frontier_diff(&[1.0, 0.0, 0.0, 1.0], &[-0.5, 0.5], 500, 3).unwrap();
    assert_eq!(a.diff, 0.5);
    assert_eq!(
        a,
        frontier_diff(&[1.0, 0.0, 0.0, 1.0], &[-0.5, 0.5], 500, 3).unwrap()
    );
    assert!(a.lo <= 0.5 && a.hi >= 0.5);
    // No prompts in a suite: nothing to compare.
    assert!(frontier_diff(&[], &[1.0], 10, 0).is_none());
}
