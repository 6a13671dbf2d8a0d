//! [`Summary`]: how a run ended, as written to `runs/<run>/summary.json` and returned by
//! [`orchestrate`](crate::orchestrate).

use std::collections::BTreeMap;

use chorus_orchestrator::faults::Health;
use chorus_orchestrator::scheduler::Accuracy;
use serde::Serialize;

/// A finished run: held-out accuracy before and after RL, counts, and the learning curve.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// The run's id in the ledger.
    pub run: String,
    /// Held-out accuracy per evaluated environment.
    pub environments: BTreeMap<String, EnvironmentResult>,
    /// Mean over environments of the accuracy before RL.
    pub mean_before: f64,
    /// Mean over environments of the accuracy after the last stage.
    pub mean_after: f64,
    /// Learner steps taken (the final policy version).
    pub steps: u64,
    /// Trajectories the learner consumed.
    pub trajectories: u64,
    /// Seconds from the start of the run to its end.
    pub wall_seconds: f64,
    /// The largest lag of any trajectory (learner version minus the oldest version among its
    /// tokens).
    pub max_lag: u64,
    /// Every environment that faulted, with its record.
    pub environment_faults: BTreeMap<String, Health>,
    /// Held-out accuracy by policy version, in version order.
    pub curve: Vec<CurvePoint>,
}

/// One environment's held-out accuracy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EnvironmentResult {
    /// Tasks evaluated.
    pub heldout_n: usize,
    /// Accuracy before RL (0 when the run has no RL stage).
    pub before: f64,
    /// Accuracy after the last stage.
    pub after: f64,
}

/// One point of the learning curve.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CurvePoint {
    /// The policy version evaluated.
    pub version: u64,
    /// Seconds since the start of the run when that version was published.
    pub seconds: f64,
    /// Mean over environments of its accuracy.
    pub mean_accuracy: f64,
    /// Accuracy per environment.
    pub environments: BTreeMap<String, f64>,
}

impl CurvePoint {
    /// The point of `version`, reached `seconds` into the run, with these accuracies.
    pub(crate) fn new(version: u64, seconds: f64, acc: &BTreeMap<String, Accuracy>) -> Self {
        Self {
            version,
            seconds,
            mean_accuracy: mean_accuracy(acc),
            environments: acc.iter().map(|(k, v)| (k.clone(), v.accuracy)).collect(),
        }
    }
}

/// The mean over environments of held-out accuracy (0 when there are none).
pub(crate) fn mean_accuracy(acc: &BTreeMap<String, Accuracy>) -> f64 {
    if acc.is_empty() {
        0.0
    } else {
        acc.values().map(|x| x.accuracy).sum::<f64>() / acc.len() as f64
    }
}

/// One line of accuracies, `name 12.5%, …`, for progress output.
pub(crate) fn accuracy_line(m: &BTreeMap<String, Accuracy>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {:.1}%", 100.0 * v.accuracy))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(a: f64) -> Accuracy {
        Accuracy {
            heldout_n: 4,
            accuracy: a,
            mean_reward: a,
        }
    }

    #[test]
    fn summary_json_keeps_the_keys_readers_use() {
        let after = BTreeMap::from([("countdown".to_string(), acc(0.5))]);
        let summary = Summary {
            run: "r".into(),
            environments: BTreeMap::from([(
                "countdown".into(),
                EnvironmentResult {
                    heldout_n: 4,
                    before: 0.25,
                    after: 0.5,
                },
            )]),
            mean_before: 0.25,
            mean_after: mean_accuracy(&after),
            steps: 3,
            trajectories: 12,
            wall_seconds: 1.5,
            max_lag: 1,
            environment_faults: BTreeMap::new(),
            curve: vec![CurvePoint::new(3, 1.5, &after)],
        };
        let v = serde_json::to_value(&summary).unwrap();
        for key in [
            "run",
            "environments",
            "mean_before",
            "mean_after",
            "steps",
            "trajectories",
            "wall_seconds",
            "max_lag",
            "environment_faults",
            "curve",
        ] {
            assert!(v.get(key).is_some(), "summary.json lacks `{key}`: {v}");
        }
        assert_eq!(v["environments"]["countdown"]["before"], 0.25);
        assert_eq!(v["curve"][0]["environments"]["countdown"], 0.5);
        assert_eq!(v["curve"][0]["mean_accuracy"], 0.5);
        assert_eq!(accuracy_line(&after), "countdown 50.0%");
    }
}
