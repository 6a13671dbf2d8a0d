//! 95% confidence intervals for held-out accuracies and their changes.
//!
//! A held-out accuracy is `k` solved out of `n` tasks, a binomial proportion. With `n = 64` one
//! environment's accuracy moves by about ±6 points between equally good policies, so every
//! accuracy Chorus reports carries its interval:
//! - one accuracy: the Wilson score interval, which stays inside [0, 1] and behaves at 0 and
//!   `n` solved, where the normal ("Wald") interval collapses to a point;
//! - the change between two independent evaluations (before and after RL, on the same number of
//!   held-out tasks but independent policies): Newcombe's hybrid score interval, built from the
//!   two Wilson intervals;
//! - the mean over environments (and its change): a normal interval from the summed binomial
//!   variances, which the environments' independence allows.

use serde::Serialize;

/// The two-sided 95% normal quantile.
const Z95: f64 = 1.959_963_984_540_054;

/// A closed interval `[lo, hi]`, serialised as a two-element array.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Interval(pub f64, pub f64);

impl Interval {
    /// The lower end.
    pub fn lo(&self) -> f64 {
        self.0
    }

    /// The upper end.
    pub fn hi(&self) -> f64 {
        self.1
    }

    /// Whether `x` lies inside (ends included).
    pub fn contains(&self, x: f64) -> bool {
        self.0 <= x && x <= self.1
    }

    /// `[lo, hi]` in percent with one decimal, for progress lines: `[12.3, 25.0]`.
    pub fn percent(&self) -> String {
        format!("[{:.1}, {:.1}]", 100.0 * self.0, 100.0 * self.1)
    }

    /// `[lo, hi]` in signed points with one decimal, for changes: `[-3.1, +12.0]`.
    pub fn points(&self) -> String {
        format!("[{:+.1}, {:+.1}]", 100.0 * self.0, 100.0 * self.1)
    }
}

/// The 95% Wilson score interval of `solved` successes in `n` trials (`[0, 1]` when `n = 0`:
/// nothing was measured).
pub fn wilson(solved: usize, n: usize) -> Interval {
    if n == 0 {
        return Interval(0.0, 1.0);
    }
    let (k, n) = (solved.min(n) as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    // At k = 0 or k = n one end is exactly 0 or 1; rounding must not move it past.
    let lo = if k == 0.0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if k == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    Interval(lo, hi)
}

/// The 95% interval of `after - before` for two independent binomial proportions, `k1` of `n1`
/// (before) and `k2` of `n2` (after), by Newcombe's hybrid score method (his method 10).
pub fn change(before: (usize, usize), after: (usize, usize)) -> Interval {
    let (k1, n1) = before;
    let (k2, n2) = after;
    let p1 = if n1 == 0 { 0.0 } else { k1 as f64 / n1 as f64 };
    let p2 = if n2 == 0 { 0.0 } else { k2 as f64 / n2 as f64 };
    let w1 = wilson(k1, n1);
    let w2 = wilson(k2, n2);
    let d = p2 - p1;
    let lower = ((p2 - w2.lo()).powi(2) + (w1.hi() - p1).powi(2)).sqrt();
    let upper = ((w2.hi() - p2).powi(2) + (p1 - w1.lo()).powi(2)).sqrt();
    Interval((d - lower).max(-1.0), (d + upper).min(1.0))
}

/// The mean of several environments' accuracies and its 95% normal interval, from each
/// environment's `(solved, n)`. The environments are evaluated independently, so the variance
/// of the mean is the sum of their binomial variances over the count squared. Empty input
/// gives `(0, [0, 0])`.
pub fn mean(counts: &[(usize, usize)]) -> (f64, Interval) {
    let (m, var) = mean_and_variance(counts);
    let half = Z95 * var.sqrt();
    (m, Interval((m - half).max(0.0), (m + half).min(1.0)))
}

/// The change of the mean accuracy from `before` to `after` (the same environments in the same
/// order) and its 95% normal interval.
pub fn mean_change(before: &[(usize, usize)], after: &[(usize, usize)]) -> (f64, Interval) {
    let (m1, v1) = mean_and_variance(before);
    let (m2, v2) = mean_and_variance(after);
    let d = m2 - m1;
    let half = Z95 * (v1 + v2).sqrt();
    (d, Interval((d - half).max(-1.0), (d + half).min(1.0)))
}

fn mean_and_variance(counts: &[(usize, usize)]) -> (f64, f64) {
    let used: Vec<(f64, f64)> = counts
        .iter()
        .map(|&(k, n)| {
            let n = n.max(1) as f64;
            (k as f64 / n, n)
        })
        .collect();
    if used.is_empty() {
        return (0.0, 0.0);
    }
    let m = used.len() as f64;
    let mean = used.iter().map(|(p, _)| p).sum::<f64>() / m;
    let var = used.iter().map(|(p, n)| p * (1.0 - p) / n).sum::<f64>() / (m * m);
    (mean, var)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-4
    }

    #[test]
    fn wilson_matches_published_values() {
        // Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605.
        let w = wilson(81, 263);
        assert!(close(w.lo(), 0.2553) && close(w.hi(), 0.3662), "{w:?}");
        let w = wilson(15, 148);
        assert!(close(w.lo(), 0.0624) && close(w.hi(), 0.1605), "{w:?}");
    }

    #[test]
    fn wilson_is_bounded_at_the_extremes() {
        let none = wilson(0, 64);
        assert_eq!(none.lo(), 0.0);
        assert!(none.hi() > 0.04 && none.hi() < 0.07, "{none:?}");
        let all = wilson(64, 64);
        assert_eq!(all.hi(), 1.0);
        assert!(all.lo() > 0.93, "{all:?}");
        assert_eq!(wilson(0, 0), Interval(0.0, 1.0));
    }

    #[test]
    fn wilson_narrows_with_more_tasks() {
        let small = wilson(16, 64);
        let large = wilson(64, 256);
        assert!(small.contains(0.25) && large.contains(0.25));
        assert!(large.hi() - large.lo() < small.hi() - small.lo());
        // 256 tasks at 25%: 20.1% to 30.6%, about ±5.3 points.
        assert!(
            close(large.lo(), 0.2009) && close(large.hi(), 0.3065),
            "{large:?}"
        );
    }

    #[test]
    fn change_matches_newcombe_method_10() {
        // Newcombe (1998), table II example (a): 56/70 - 48/80 = 0.2, interval 0.0524 to 0.3339.
        let d = change((48, 80), (56, 70));
        assert!(close(d.lo(), 0.0524) && close(d.hi(), 0.3339), "{d:?}");
        // Swapping the roles flips the sign.
        let back = change((56, 70), (48, 80));
        assert!(
            close(back.lo(), -0.3339) && close(back.hi(), -0.0524),
            "{back:?}"
        );
    }

    #[test]
    fn a_change_of_zero_is_inside_its_interval() {
        let d = change((40, 256), (40, 256));
        assert!(d.contains(0.0) && d.lo() < 0.0 && d.hi() > 0.0);
    }

    #[test]
    fn mean_interval_shrinks_with_environments() {
        let (m1, one) = mean(&[(64, 256)]);
        let (m3, three) = mean(&[(64, 256), (64, 256), (64, 256)]);
        assert!(close(m1, 0.25) && close(m3, 0.25));
        assert!(three.hi() - three.lo() < one.hi() - one.lo());
        // One environment: the normal interval 0.25 ± 1.96 * sqrt(0.25 * 0.75 / 256).
        assert!(close(one.hi() - 0.25, 0.05305), "{one:?}");
        let (d, iv) = mean_change(&[(64, 256), (32, 256)], &[(128, 256), (64, 256)]);
        assert!(close(d, 0.1875), "{d}");
        assert!(iv.contains(d) && iv.lo() > 0.0);
        assert_eq!(mean(&[]), (0.0, Interval(0.0, 0.0)));
    }

    #[test]
    fn formatting_reads_as_percent_and_points() {
        assert_eq!(Interval(0.125, 0.25).percent(), "[12.5, 25.0]");
        assert_eq!(Interval(-0.031, 0.12).points(), "[-3.1, +12.0]");
    }
}
