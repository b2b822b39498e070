//! The statistics an experiment report rests on: Wilson score intervals for a rate, the pooled
//! two-proportion z-test for a difference, and the sample size that would detect it.
//!
//! Wilson rather than the normal ("Wald") interval: it stays inside [0, 1] and keeps close to
//! its nominal coverage at small n and at rates near 0 or 1, which is where new arms live.

use serde::{Deserialize, Serialize};

/// z for a two-sided 95% interval: the 97.5th percentile of the standard normal.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// z for 80% power (the 80th percentile of the standard normal), the usual design target.
pub const Z_POWER_80: f64 = 0.841_621_233_572_914_3;

/// A rate with its 95% Wilson interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Successes.
    pub successes: u64,
    /// Trials.
    pub n: u64,
    /// successes / n; null when n = 0.
    pub rate: Option<f64>,
    /// Lower and upper 95% bounds; null when n = 0.
    pub ci95: Option<[f64; 2]>,
}

impl Rate {
    /// `successes` of `n`.
    pub fn new(successes: u64, n: u64) -> Self {
        Self {
            successes,
            n,
            rate: (n > 0).then(|| successes as f64 / n as f64),
            ci95: wilson(successes, n, Z_95),
        }
    }
}

/// The Wilson score interval for `successes` of `n` at normal quantile `z`; `None` for n = 0.
pub fn wilson(successes: u64, n: u64, z: f64) -> Option<[f64; 2]> {
    if n == 0 {
        return None;
    }
    let n = n as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some([(centre - half).max(0.0), (centre + half).min(1.0)])
}

/// An arm's rate against the control's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// arm rate - control rate.
    pub difference: f64,
    /// The pooled two-proportion z statistic; 0 when both rates are 0 or 1.
    pub z: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// Units per group that would detect this difference at 95% confidence and 80% power;
    /// null when the difference is 0.
    pub samples_needed_per_arm: Option<u64>,
}

/// The pooled two-proportion z-test of `s1/n1` (the arm) against `s2/n2` (the control); `None`
/// when either group is empty.
pub fn two_proportion(s1: u64, n1: u64, s2: u64, n2: u64) -> Option<Comparison> {
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let (p1, p2) = (s1 as f64 / n1f, s2 as f64 / n2f);
    let pooled = (s1 + s2) as f64 / (n1f + n2f);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n2f)).sqrt();
    let z = if se > 0.0 { (p1 - p2) / se } else { 0.0 };
    Some(Comparison {
        difference: p1 - p2,
        z,
        p_value: (2.0 * (1.0 - normal_cdf(z.abs()))).clamp(0.0, 1.0),
        samples_needed_per_arm: samples_needed(p1, p2),
    })
}

/// Units per group for a two-sided test at 95% to detect `p1` vs `p2` with 80% power (the
/// standard formula with the pooled variance under the null); `None` when they are equal.
pub fn samples_needed(p1: f64, p2: f64) -> Option<u64> {
    let d = (p1 - p2).abs();
    if d < 1e-12 {
        return None;
    }
    let mean = (p1 + p2) / 2.0;
    let a = Z_95 * (2.0 * mean * (1.0 - mean)).sqrt();
    let b = Z_POWER_80 * (p1 * (1.0 - p1) + p2 * (1.0 - p2)).sqrt();
    Some(((a + b).powi(2) / (d * d)).ceil() as u64)
}

/// The standard normal CDF, from erfc.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The complementary error function: the Chebyshev fit of Numerical Recipes (3rd ed., 6.2.2),
/// fractional error below 1.2e-7 everywhere, ample for p-values.
fn erfc(x: f64) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn wilson_matches_hand_computation() {
        // 81 of 263 (Wilson 1927's style of example), worked by hand:
        // p = 0.307985, z^2 = 3.841459, centre = (p + z^2/526) / (1 + z^2/263) = 0.310749,
        // half = z / (1 + z^2/263) * sqrt(p(1-p)/263 + z^2/(4*263^2)) = 0.055461.
        let [lo, hi] = wilson(81, 263, Z_95).unwrap_or_default();
        assert!(close(lo, 0.255_289, 2e-6), "{lo}");
        assert!(close(hi, 0.366_210, 2e-6), "{hi}");
        // Edges stay inside [0, 1]: 0 of 10 is [0, 0.2775], 10 of 10 is [0.7225, 1].
        let [lo, hi] = wilson(0, 10, Z_95).unwrap_or_default();
        assert!(lo == 0.0 && close(hi, 0.277_533, 2e-6), "{hi}");
        let [lo, hi] = wilson(10, 10, Z_95).unwrap_or_default();
        assert!(close(lo, 0.722_467, 2e-6) && close(hi, 1.0, 1e-12), "{lo}");
        assert_eq!(wilson(0, 0, Z_95), None);
        assert_eq!(Rate::new(1, 4).rate, Some(0.25));
    }

    #[test]
    fn two_proportion_test_matches_hand_computation() {
        // 60/100 against 45/100: pooled 0.525, se = sqrt(0.525 * 0.475 * 0.02) = 0.070622,
        // z = 0.15 / 0.070622 = 2.12398, p = 2 * (1 - Phi(2.12398)) = 0.033672.
        let c = two_proportion(60, 100, 45, 100).unwrap_or_else(|| unreachable!());
        assert!(close(c.difference, 0.15, 1e-12));
        assert!(close(c.z, 2.123_977, 2e-6), "{}", c.z);
        assert!(close(c.p_value, 0.033_672, 2e-6), "{}", c.p_value);
        // Sample size for 0.60 vs 0.45 at 95% / 80%: mean 0.525,
        // ((1.959964 * sqrt(2 * 0.525 * 0.475) + 0.841621 * sqrt(0.24 + 0.2475)) / 0.15)^2
        // = ((1.384170 + 0.587630) / 0.15)^2 = 172.80 -> 173 per arm.
        assert_eq!(c.samples_needed_per_arm, Some(173));
        // The sign follows the arm.
        let worse = two_proportion(45, 100, 60, 100).unwrap_or_else(|| unreachable!());
        assert!(close(worse.z, -2.123_977, 2e-6));
        assert!(close(worse.p_value, c.p_value, 1e-12));
        // Equal rates: z = 0, p = 1, no sample size; an empty group: no test.
        let same = two_proportion(5, 10, 50, 100).unwrap_or_else(|| unreachable!());
        assert!(close(same.p_value, 1.0, 1e-7) && same.samples_needed_per_arm.is_none());
        assert_eq!(two_proportion(1, 0, 1, 1), None);
        let all = two_proportion(10, 10, 20, 20).unwrap_or_else(|| unreachable!());
        assert_eq!((all.z, all.samples_needed_per_arm), (0.0, None));
    }

    #[test]
    fn the_normal_cdf_matches_tables() {
        for (x, want) in [
            (0.0, 0.5),
            (1.0, 0.841_344_746),
            (1.959_963_985, 0.975),
            (-1.644_853_627, 0.05),
            (3.0, 0.998_650_102),
        ] {
            assert!(close(normal_cdf(x), want, 2e-7), "{x}: {}", normal_cdf(x));
        }
    }
}
