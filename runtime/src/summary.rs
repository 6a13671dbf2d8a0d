//! [`Summary`]: how a run ended, as written to `runs/<run>/summary.json` and returned by
//! [`orchestrate`](crate::orchestrate).
//!
//! Every held-out accuracy carries its 95% interval (Wilson for one environment, Newcombe's for
//! a change, a normal interval for means over environments; see
//! [`chorus_orchestrator::confidence`]), so that a reader can tell a gain from noise.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chorus_orchestrator::confidence::{self, Interval};
use chorus_orchestrator::config::StageKind;
use chorus_orchestrator::faults::Health;
use chorus_orchestrator::ledger::Ledger;
use chorus_orchestrator::scheduler::Accuracy;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RunError};

/// A finished run: held-out accuracy before and after RL, counts, and the learning curve.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// The run's id in the ledger.
    pub run: String,
    /// Held-out accuracy per evaluated environment.
    pub environments: BTreeMap<String, EnvironmentResult>,
    /// Mean over environments of the accuracy before RL.
    pub mean_before: f64,
    /// Its 95% interval.
    pub mean_before_interval: Interval,
    /// Mean over environments of the accuracy after the last stage.
    pub mean_after: f64,
    /// Its 95% interval.
    pub mean_after_interval: Interval,
    /// `mean_after - mean_before`.
    pub mean_gain: f64,
    /// Its 95% interval.
    pub mean_gain_interval: Interval,
    /// Learner steps taken (the final policy version).
    pub steps: u64,
    /// Trajectories the learner consumed.
    pub trajectories: u64,
    /// Seconds from the start of the run to its end.
    pub wall_seconds: f64,
    /// The CPU the run's process ran on (model, threads, kernel backend).
    pub cpu: String,
    /// The largest lag of any trajectory trained on: the version of the weights the learner
    /// trained it against (the step that consumed it) minus the oldest policy version among its
    /// tokens.
    pub max_lag: u64,
    /// Every environment that faulted, with its record.
    pub environment_faults: BTreeMap<String, Health>,
    /// Held-out accuracy by policy version, in version order.
    pub curve: Vec<CurvePoint>,
    /// Each stage, in order (also written to `runs/<run>/stages/<stage>/summary.json`).
    pub stages: Vec<StageSummary>,
    /// The trained policy: the final version in HF layout with its tokenizer
    /// (`runs/<run>/checkpoint`), which `chorus generate --checkpoint` and transformers open.
    pub checkpoint: PathBuf,
}

impl Summary {
    /// Its accuracies before RL and after, as an [`Outcome`].
    pub fn outcome(&self) -> Outcome {
        Outcome {
            environments: self.environments.clone(),
            mean_before: (self.mean_before, self.mean_before_interval),
            mean_after: (self.mean_after, self.mean_after_interval),
            mean_gain: (self.mean_gain, self.mean_gain_interval),
        }
    }
}

/// How one stage went: what `runs/<run>/stages/<stage>/summary.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// The stage's name.
    pub name: String,
    /// `sft`, `rlvr`, ...
    pub kind: String,
    /// What `start` and `end` measure: `heldout_accuracy`, the mean over the stage's
    /// environments of the held-out accuracy (`none` for a stage of transcripts alone, which
    /// has no verifier to measure with).
    pub metric: String,
    /// The metric under the policy the stage started from.
    pub start: Option<f64>,
    /// Its 95% interval.
    pub start_interval: Option<Interval>,
    /// The metric under the policy the stage ended with.
    pub end: Option<f64>,
    /// Its 95% interval.
    pub end_interval: Option<Interval>,
    /// The metric per environment, at the start and the end.
    pub environments: BTreeMap<String, (f64, f64)>,
    /// Learner steps the stage took.
    pub steps: u64,
    /// Steps it was given (`steps` in the config); it took fewer when it reached its goal.
    pub planned_steps: u64,
    /// With `until`: whether the stage ended by reaching it.
    pub reached_goal: Option<bool>,
    /// The policy version the stage started from (its steps are the ones after it).
    pub first_version: u64,
    /// The policy version it ended with.
    pub last_version: u64,
    /// Trajectories it sent to the learner.
    pub trajectories: u64,
    /// Seconds from its start to its checkpoint, the evaluations included.
    pub wall_seconds: f64,
    /// Its final policy in HF layout (`chorus generate --checkpoint DIR` loads it).
    pub checkpoint: PathBuf,
    /// RL stages: the mean over the stage's recorded learner steps of their KL estimate (to the
    /// stage's starting policy when the stage penalises it, else between sampler and learner),
    /// so that a user sees how far RLHF moved the policy beside what it cost in accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_kl: Option<f64>,
}

/// One environment's held-out accuracy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EnvironmentResult {
    /// Tasks evaluated.
    pub heldout_n: usize,
    /// Accuracy before RL (0 when the run has no RL stage).
    pub before: f64,
    /// Its 95% Wilson interval.
    pub before_interval: Interval,
    /// Accuracy after the last stage.
    pub after: f64,
    /// Its 95% Wilson interval.
    pub after_interval: Interval,
    /// `after - before`.
    pub gain: f64,
    /// Its 95% interval (Newcombe's hybrid score method).
    pub gain_interval: Interval,
}

/// The accuracies of a run, before RL and after its last stage, with their intervals.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Per environment (those evaluated after the last stage).
    pub environments: BTreeMap<String, EnvironmentResult>,
    /// Mean before, with its interval.
    pub mean_before: (f64, Interval),
    /// Mean after, with its interval.
    pub mean_after: (f64, Interval),
    /// Mean gain, with its interval.
    pub mean_gain: (f64, Interval),
}

impl Outcome {
    /// Compares `after` with `before` environment by environment; an environment missing
    /// from `before` (a run without an RL stage) counts as 0 of the same number of tasks.
    pub fn new(before: &BTreeMap<String, Accuracy>, after: &BTreeMap<String, Accuracy>) -> Self {
        let mut environments = BTreeMap::new();
        let (mut counts_before, mut counts_after) = (vec![], vec![]);
        for (name, acc) in after {
            let b = before
                .get(name)
                .cloned()
                .unwrap_or_else(|| Accuracy::new(0, acc.heldout_n, 0.0));
            counts_before.push(b.counts());
            counts_after.push(acc.counts());
            environments.insert(
                name.clone(),
                EnvironmentResult {
                    heldout_n: acc.heldout_n,
                    before: b.accuracy,
                    before_interval: b.interval,
                    after: acc.accuracy,
                    after_interval: acc.interval,
                    gain: acc.accuracy - b.accuracy,
                    gain_interval: confidence::change(b.counts(), acc.counts()),
                },
            );
        }
        Self {
            environments,
            mean_before: confidence::mean(&counts_before),
            mean_after: confidence::mean(&counts_after),
            mean_gain: confidence::mean_change(&counts_before, &counts_after),
        }
    }
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
    /// Its 95% interval.
    pub mean_interval: Interval,
    /// Accuracy per environment.
    pub environments: BTreeMap<String, f64>,
    /// Their 95% Wilson intervals.
    pub intervals: BTreeMap<String, Interval>,
}

impl CurvePoint {
    /// The point of `version`, reached `seconds` into the run, with these accuracies.
    pub(crate) fn new(version: u64, seconds: f64, acc: &BTreeMap<String, Accuracy>) -> Self {
        let (mean_accuracy, mean_interval) = mean_accuracy(acc);
        Self {
            version,
            seconds,
            mean_accuracy,
            mean_interval,
            environments: acc.iter().map(|(k, v)| (k.clone(), v.accuracy)).collect(),
            intervals: acc.iter().map(|(k, v)| (k.clone(), v.interval)).collect(),
        }
    }
}

/// The summary of run `run_id` as the ledger at `db` holds it, for the held-out environments
/// `environments` (name, difficulty; the run's [`EvalPlan`](crate::EvalPlan)): `summary.json`
/// is this, serialised, so that it can never disagree with the ledger.
///
/// - before RL: the `evaluations` rows at the version the first RL stage began from (nothing
///   when the run has no RL stage); after: those at the final version;
/// - the curve: every version at which each of `environments` was measured, timed by when the
///   version was published (`policy_versions`) since the run began;
/// - steps: the final version; trajectories: those a learner step consumed;
/// - `max_lag`: [`Ledger::max_trained_lag`];
/// - the stages: their `summary_json`; the CPU, checkpoint and environment faults: what the run
///   recorded at its end ([`Ledger::record_run_outputs`]);
/// - wall seconds: from the run's creation to its end (to now while it is running).
pub async fn from_ledger(
    ledger: &Ledger,
    db: &str,
    run_id: &str,
    environments: &[(String, u32)],
) -> Result<Summary> {
    let run = ledger
        .get_run(run_id)
        .await
        .map_err(RunError::ledger(db))?
        .ok_or_else(|| RunError::Invalid(format!("run {run_id} is not in the ledger {db}")))?;
    let versions = ledger
        .list_policy_versions(run_id)
        .await
        .map_err(RunError::ledger(db))?;
    let stages = ledger
        .list_stages(run_id)
        .await
        .map_err(RunError::ledger(db))?;
    let mut measured: BTreeMap<(u64, String, u32), Accuracy> = BTreeMap::new();
    for e in ledger
        .list_evaluations(run_id)
        .await
        .map_err(RunError::ledger(db))?
    {
        let accuracy = Accuracy::from_ledger(&e);
        measured.insert((e.policy_version, e.environment, e.difficulty), accuracy);
    }
    // Every environment measured at `version`, or nothing.
    let at = |version: u64| -> Option<BTreeMap<String, Accuracy>> {
        environments
            .iter()
            .map(|(name, difficulty)| {
                measured
                    .get(&(version, name.clone(), *difficulty))
                    .map(|a| (name.clone(), a.clone()))
            })
            .collect()
    };
    let final_version = versions
        .iter()
        .map(|v| v.version.version)
        .chain(stages.iter().filter_map(|s| s.last_step))
        .max()
        .unwrap_or(0);
    let is_rl = |kind: &str| {
        serde_json::from_value::<StageKind>(serde_json::Value::from(kind))
            .is_ok_and(StageKind::is_rl)
    };
    let before = stages
        .iter()
        .find(|s| is_rl(&s.stage.kind))
        .and_then(|s| at(s.stage.first_step))
        .unwrap_or_default();
    let after = at(final_version).unwrap_or_default();
    let published: BTreeMap<u64, i64> = versions
        .iter()
        .map(|v| (v.version.version, v.created_at_ms))
        .collect();
    let seconds = |ms: i64| (ms - run.created_at_ms).max(0) as f64 / 1e3;
    let mut curve_versions: Vec<u64> = measured.keys().map(|(v, _, _)| *v).collect();
    curve_versions.dedup();
    let curve = if environments.is_empty() {
        vec![]
    } else {
        curve_versions
            .into_iter()
            .filter_map(|v| {
                let acc = at(v)?;
                let published_at = published.get(&v).map_or(0.0, |ms| seconds(*ms));
                Some(CurvePoint::new(v, published_at, &acc))
            })
            .collect()
    };
    let mut stage_summaries = vec![];
    for s in &stages {
        if let Some(text) = &s.summary_json {
            let summary = serde_json::from_str(text).map_err(|e| {
                RunError::Invalid(format!(
                    "the ledger {db} holds an unreadable summary of stage {} of run {run_id}: {e}",
                    s.stage.name
                ))
            })?;
            stage_summaries.push(summary);
        }
    }
    let environment_faults = match &run.outputs.environment_faults {
        None => BTreeMap::new(),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            RunError::Invalid(format!(
                "the ledger {db} holds unreadable environment faults for run {run_id}: {e}"
            ))
        })?,
    };
    let ended_ms = run.finished_at_ms.unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(run.created_at_ms, |d| d.as_millis() as i64)
    });
    let outcome = Outcome::new(&before, &after);
    Ok(Summary {
        run: run.id.clone(),
        environments: outcome.environments,
        mean_before: outcome.mean_before.0,
        mean_before_interval: outcome.mean_before.1,
        mean_after: outcome.mean_after.0,
        mean_after_interval: outcome.mean_after.1,
        mean_gain: outcome.mean_gain.0,
        mean_gain_interval: outcome.mean_gain.1,
        steps: final_version,
        trajectories: ledger
            .count_consumed(run_id)
            .await
            .map_err(RunError::ledger(db))?,
        wall_seconds: seconds(ended_ms),
        cpu: run.outputs.cpu.clone().unwrap_or_default(),
        max_lag: ledger
            .max_trained_lag(run_id)
            .await
            .map_err(RunError::ledger(db))?,
        environment_faults,
        curve,
        stages: stage_summaries,
        checkpoint: run
            .outputs
            .checkpoint_path
            .clone()
            .map(PathBuf::from)
            .unwrap_or_default(),
    })
}

/// The mean over environments of held-out accuracy and its 95% interval (0 when there are
/// none).
pub(crate) fn mean_accuracy(acc: &BTreeMap<String, Accuracy>) -> (f64, Interval) {
    let counts: Vec<_> = acc.values().map(Accuracy::counts).collect();
    confidence::mean(&counts)
}

/// One line of accuracies with their intervals, `name 12.5% [8.4, 18.2], …, mean …`, for
/// progress output.
pub(crate) fn accuracy_line(m: &BTreeMap<String, Accuracy>) -> String {
    let mut parts: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{k} {:.1}% {}", 100.0 * v.accuracy, v.interval.percent()))
        .collect();
    if m.len() > 1 {
        let (mean, interval) = mean_accuracy(m);
        parts.push(format!("mean {:.1}% {}", 100.0 * mean, interval.percent()));
    }
    parts.join(", ")
}

/// The closing line of a run: the mean gain and its interval, `mean 18.0% -> 35.2%: +17.2
/// points [+12.1, +22.3] (95%)`.
pub(crate) fn gain_line(outcome: &Outcome) -> String {
    format!(
        "mean {:.1}% -> {:.1}%: {:+.1} points {} (95%)",
        100.0 * outcome.mean_before.0,
        100.0 * outcome.mean_after.0,
        100.0 * outcome.mean_gain.0,
        outcome.mean_gain.1.points()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(solved: usize) -> Accuracy {
        Accuracy::new(solved, 4, solved as f64 / 4.0)
    }

    #[test]
    fn summary_json_keeps_the_keys_readers_use() {
        let before = BTreeMap::from([("countdown".to_string(), acc(1))]);
        let after = BTreeMap::from([("countdown".to_string(), acc(2))]);
        let outcome = Outcome::new(&before, &after);
        let summary = Summary {
            run: "r".into(),
            environments: outcome.environments.clone(),
            mean_before: outcome.mean_before.0,
            mean_before_interval: outcome.mean_before.1,
            mean_after: outcome.mean_after.0,
            mean_after_interval: outcome.mean_after.1,
            mean_gain: outcome.mean_gain.0,
            mean_gain_interval: outcome.mean_gain.1,
            steps: 3,
            trajectories: 12,
            wall_seconds: 1.5,
            cpu: "test".into(),
            max_lag: 1,
            environment_faults: BTreeMap::new(),
            stages: vec![],
            curve: vec![CurvePoint::new(3, 1.5, &after)],
            checkpoint: "runs/r/checkpoint".into(),
        };
        let v = serde_json::to_value(&summary).unwrap();
        for key in [
            "run",
            "environments",
            "mean_before",
            "mean_before_interval",
            "mean_after",
            "mean_after_interval",
            "mean_gain",
            "mean_gain_interval",
            "steps",
            "trajectories",
            "checkpoint",
            "wall_seconds",
            "cpu",
            "max_lag",
            "environment_faults",
            "curve",
        ] {
            assert!(v.get(key).is_some(), "summary.json lacks `{key}`: {v}");
        }
        let env = &v["environments"]["countdown"];
        assert_eq!(env["before"], 0.25);
        assert_eq!(env["after"], 0.5);
        assert_eq!(env["gain"], 0.25);
        for key in ["before_interval", "after_interval", "gain_interval"] {
            let iv = env[key]
                .as_array()
                .unwrap_or_else(|| panic!("{key}: {env}"));
            assert_eq!(iv.len(), 2, "{key} is [lo, hi]");
            assert!(iv[0].as_f64() <= iv[1].as_f64());
        }
        assert_eq!(v["curve"][0]["environments"]["countdown"], 0.5);
        assert_eq!(v["curve"][0]["mean_accuracy"], 0.5);
        assert_eq!(
            accuracy_line(&after),
            format!("countdown 50.0% {}", confidence::wilson(2, 4).percent())
        );
    }

    #[test]
    fn outcome_counts_a_missing_before_as_nothing_solved() {
        let after = BTreeMap::from([
            ("a".to_string(), Accuracy::new(64, 256, 0.25)),
            ("b".to_string(), Accuracy::new(128, 256, 0.5)),
        ]);
        let before = BTreeMap::from([("a".to_string(), Accuracy::new(32, 256, 0.125))]);
        let o = Outcome::new(&before, &after);
        assert_eq!(o.environments["b"].before, 0.0);
        assert_eq!(o.environments["a"].gain, 0.125);
        assert!((o.mean_gain.0 - (0.125 + 0.5) / 2.0).abs() < 1e-12);
        assert!(o.mean_gain.1.contains(o.mean_gain.0));
        assert!(
            o.environments["a"].gain_interval.lo() > 0.0,
            "32 -> 64 of 256 is a real gain"
        );
        let line = gain_line(&o);
        assert!(
            line.starts_with("mean 6.2% -> 37.5%: +31.2 points [+"),
            "{line}"
        );
    }
}
