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
//!
//! With several samples per task (`[evaluation] samples`) the accuracy is the mean over tasks of
//! each task's solved fraction, and a task's samples are not independent trials: a task the
//! policy can solve it mostly solves every time. The intervals then count an *effective* number
//! of tasks ([`effective_tasks`]): between the number of tasks (a task's samples all agree) and
//! tasks x samples (they vary as much as independent trials would), from the spread of the
//! per-task fractions; the formulas above take fractional counts.

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
    wilson_counts(solved as f64, n as f64)
}

/// [`wilson`] of effective counts (see the module docs): `solved` of `n`, not necessarily
/// whole numbers.
pub fn wilson_counts(solved: f64, n: f64) -> Interval {
    if n <= 0.0 {
        return Interval(0.0, 1.0);
    }
    let k = solved.clamp(0.0, n);
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
/// (before) and `k2` of `n2` (after; effective counts, see the module docs), by Newcombe's
/// hybrid score method (his method 10).
pub fn change(before: (f64, f64), after: (f64, f64)) -> Interval {
    let (k1, n1) = before;
    let (k2, n2) = after;
    let p1 = if n1 <= 0.0 { 0.0 } else { k1 / n1 };
    let p2 = if n2 <= 0.0 { 0.0 } else { k2 / n2 };
    let w1 = wilson_counts(k1, n1);
    let w2 = wilson_counts(k2, n2);
    let d = p2 - p1;
    let lower = ((p2 - w2.lo()).powi(2) + (w1.hi() - p1).powi(2)).sqrt();
    let upper = ((w2.hi() - p2).powi(2) + (p1 - w1.lo()).powi(2)).sqrt();
    Interval((d - lower).max(-1.0), (d + upper).min(1.0))
}

/// The mean of several environments' accuracies and its 95% normal interval, from each
/// environment's `(solved, n)` (effective counts). The environments are evaluated independently, so the variance
/// of the mean is the sum of their binomial variances over the count squared. Empty input
/// gives `(0, [0, 0])`.
pub fn mean(counts: &[(f64, f64)]) -> (f64, Interval) {
    let (m, var) = mean_and_variance(counts);
    let half = Z95 * var.sqrt();
    (m, Interval((m - half).max(0.0), (m + half).min(1.0)))
}

/// The change of the mean accuracy from `before` to `after` (the same environments in the same
/// order) and its 95% normal interval.
pub fn mean_change(before: &[(f64, f64)], after: &[(f64, f64)]) -> (f64, Interval) {
    let (m1, v1) = mean_and_variance(before);
    let (m2, v2) = mean_and_variance(after);
    let d = m2 - m1;
    let half = Z95 * (v1 + v2).sqrt();
    (d, Interval((d - half).max(-1.0), (d + half).min(1.0)))
}

fn mean_and_variance(counts: &[(f64, f64)]) -> (f64, f64) {
    let used: Vec<(f64, f64)> = counts
        .iter()
        .map(|&(k, n)| {
            let n = n.max(1.0);
            (k / n, n)
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

/// The effective number of independent tasks behind a sampled accuracy: `solved_per_task[i]`
/// of `samples` episodes of task `i` solved. The accuracy is the mean of the per-task fractions
/// `f_i`; its variance, estimated from their spread (`s^2 / n`, the tasks being the independent
/// units), equals a binomial proportion's `p (1 - p) / n_eff` at `n_eff` tasks. The result
/// lies between the number of tasks and tasks x samples; where the spread says nothing (fewer
/// than two tasks, or every episode solved or every one failed) it is the number of tasks,
/// the cautious end.
pub fn effective_tasks(solved_per_task: &[usize], samples: usize) -> f64 {
    let n = solved_per_task.len() as f64;
    let k = samples.max(1) as f64;
    let fractions: Vec<f64> = solved_per_task
        .iter()
        .map(|&s| (s as f64 / k).min(1.0))
        .collect();
    let p = fractions.iter().sum::<f64>() / n.max(1.0);
    if fractions.len() < 2 || p <= 0.0 || p >= 1.0 {
        return n;
    }
    let spread = fractions.iter().map(|f| (f - p).powi(2)).sum::<f64>() / (n - 1.0);
    if spread <= 0.0 {
        return n * k;
    }
    (p * (1.0 - p) / spread).clamp(n, n * k)
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
        let d = change((48.0, 80.0), (56.0, 70.0));
        assert!(close(d.lo(), 0.0524) && close(d.hi(), 0.3339), "{d:?}");
        // Swapping the roles flips the sign.
        let back = change((56.0, 70.0), (48.0, 80.0));
        assert!(
            close(back.lo(), -0.3339) && close(back.hi(), -0.0524),
            "{back:?}"
        );
    }

    #[test]
    fn a_change_of_zero_is_inside_its_interval() {
        let d = change((40.0, 256.0), (40.0, 256.0));
        assert!(d.contains(0.0) && d.lo() < 0.0 && d.hi() > 0.0);
    }

    #[test]
    fn mean_interval_shrinks_with_environments() {
        let (m1, one) = mean(&[(64.0, 256.0)]);
        let (m3, three) = mean(&[(64.0, 256.0), (64.0, 256.0), (64.0, 256.0)]);
        assert!(close(m1, 0.25) && close(m3, 0.25));
        assert!(three.hi() - three.lo() < one.hi() - one.lo());
        // One environment: the normal interval 0.25 ± 1.96 * sqrt(0.25 * 0.75 / 256).
        assert!(close(one.hi() - 0.25, 0.05305), "{one:?}");
        let (d, iv) = mean_change(
            &[(64.0, 256.0), (32.0, 256.0)],
            &[(128.0, 256.0), (64.0, 256.0)],
        );
        assert!(close(d, 0.1875), "{d}");
        assert!(iv.contains(d) && iv.lo() > 0.0);
        assert_eq!(mean(&[]), (0.0, Interval(0.0, 0.0)));
    }

    #[test]
    fn effective_tasks_run_from_tasks_to_episodes_with_the_samples_agreement() {
        // Every task's samples agree (solved all 4 times or never): the tasks are the evidence.
        let agree = [4, 0, 4, 0, 0, 4, 0, 4];
        assert!(close(effective_tasks(&agree, 4), 8.0));
        // Samples that vary as independent trials would: about tasks x samples. With p = 1/2
        // and every task at 2 of 4 the spread is zero, the far end.
        assert!(close(effective_tasks(&[2; 8], 4), 32.0));
        // In between: fractions 1/4 and 3/4 alternate, p = 1/2, spread 1/16 * 8/7:
        // n_eff = 0.25 / (0.0625 * 8 / 7) = 3.5, clamped up to the 8 tasks.
        assert!(close(effective_tasks(&[1, 3, 1, 3, 1, 3, 1, 3], 4), 8.0));
        // Fractions 2/4 and 3/4, p = 5/8, spread 1/16 * 8/7 / 4 = 1/56: 0.234375 * 56 = 13.125.
        assert!(close(effective_tasks(&[2, 3, 2, 3, 2, 3, 2, 3], 4), 13.125));
        // Nothing solved or everything solved says nothing about the spread: the tasks.
        assert!(close(effective_tasks(&[0; 8], 4), 8.0));
        assert!(close(effective_tasks(&[4; 8], 4), 8.0));
        // One sample per task is the plain count.
        assert!(close(effective_tasks(&[1, 0, 1, 1, 0], 1), 5.0));
    }

    #[test]
    fn fractional_counts_interpolate_the_whole_ones() {
        assert_eq!(wilson_counts(16.0, 64.0), wilson(16, 64));
        let (a, b, c) = (
            wilson_counts(16.0, 64.0),
            wilson_counts(24.0, 96.0),
            wilson_counts(32.0, 128.0),
        );
        let width = |w: Interval| w.hi() - w.lo();
        assert!(width(a) > width(b) && width(b) > width(c));
        assert_eq!(wilson_counts(0.0, 0.0), Interval(0.0, 1.0));
    }

    #[test]
    fn formatting_reads_as_percent_and_points() {
        assert_eq!(Interval(0.125, 0.25).percent(), "[12.5, 25.0]");
        assert_eq!(Interval(-0.031, 0.12).points(), "[-3.1, +12.0]");
    }
}
