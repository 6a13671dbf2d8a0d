//! Held-out evaluation during a run: before the first RL stage, after the last stage, at each
//! stage's start and end (its metric) and, with `every`, each `every`-th policy version as soon
//! as the learner publishes it, alongside training (the learning curve). An environment is
//! evaluated once per policy version: a stage's end is the next stage's start, and the last
//! stage's end is the run's final evaluation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use chorus_orchestrator::config::Until;
use chorus_orchestrator::ledger::Evaluation;
use chorus_orchestrator::scheduler::{
    Accuracy, BoxFuture, SchedulerError, StageContext, StageGoal, evaluate,
};
use tokio::task::JoinHandle;

use crate::error::{Result, RunError};
use crate::plan::EvalPlan;
use crate::summary::{accuracy_line, mean_accuracy};

/// Held-out accuracy of policy `version` on `environments` (name, difficulty), with `plan`'s
/// task count and token limits.
async fn held_out_of(
    ctx: &Arc<StageContext>,
    plan: &EvalPlan,
    environments: &[(String, u32)],
    version: u64,
) -> Result<BTreeMap<String, Accuracy>> {
    Ok(evaluate(
        ctx,
        environments,
        plan.tasks,
        plan.sampling,
        plan.max_new_tokens,
        plan.max_prompt_tokens,
        version,
    )
    .await?)
}

/// Accuracies already measured, by (policy version, environment, difficulty).
type Measured = BTreeMap<(u64, String, u32), Accuracy>;

/// Held-out accuracies by `plan`, each (version, environment, difficulty) measured once and
/// shared by the run's evaluations and its stages' goals. With a file, every measurement is
/// also written there, so a resumed run has the ones of policies it can no longer load (a
/// stage's start, the run's "before RL").
pub(crate) struct Measurements {
    plan: EvalPlan,
    measured: Mutex<Measured>,
    file: Option<PathBuf>,
}

/// One line of the measurements file.
#[derive(Serialize, Deserialize)]
struct MeasuredLine {
    version: u64,
    environment: String,
    difficulty: u32,
    accuracy: Accuracy,
}

/// The measurements written to `file` by an earlier process of the run (none if it is absent).
fn read_measured(file: &Path) -> Result<Measured> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Measured::new()),
        Err(e) => return Err(RunError::io(format!("reading {}", file.display()))(e)),
    };
    let mut measured = Measured::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        // A line cut short by a crash is the last one; anything else is damage worth naming.
        let Ok(m) = serde_json::from_str::<MeasuredLine>(line) else {
            tracing::warn!(file = %file.display(), line = i + 1, "skipping an unreadable measurement");
            continue;
        };
        measured.insert((m.version, m.environment, m.difficulty), m.accuracy);
    }
    Ok(measured)
}

impl Measurements {
    /// Held-out accuracy of policy `version` on `environments`, measuring only what was not
    /// measured at that version before.
    pub(crate) async fn accuracy_at(
        &self,
        ctx: &Arc<StageContext>,
        environments: &[(String, u32)],
        version: u64,
    ) -> Result<BTreeMap<String, Accuracy>> {
        let key = |n: &String, d: &u32| (version, n.clone(), *d);
        let missing: Vec<(String, u32)> = {
            let measured = self.measured.lock().unwrap_or_else(|p| p.into_inner());
            environments
                .iter()
                .filter(|(n, d)| !measured.contains_key(&key(n, d)))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            let acc = held_out_of(ctx, &self.plan, &missing, version).await?;
            let mut lines = String::new();
            let mut rows = vec![];
            {
                let mut measured = self.measured.lock().unwrap_or_else(|p| p.into_inner());
                for (name, difficulty) in &missing {
                    if let Some(a) = acc.get(name) {
                        measured.insert(key(name, difficulty), a.clone());
                        rows.push(Evaluation {
                            run_id: ctx.run_id.clone(),
                            policy_version: version,
                            environment: name.clone(),
                            difficulty: *difficulty,
                            stage_index: Some(ctx.stage_index as u64),
                            tasks: a.heldout_n as u64,
                            correct: a.solved as u64,
                            accuracy: a.accuracy,
                            accuracy_lo: a.interval.lo(),
                            accuracy_hi: a.interval.hi(),
                            mean_reward: a.mean_reward,
                            samples_per_task: a.samples_per_task as u64,
                            effective_tasks: a.effective_n,
                        });
                        let line = MeasuredLine {
                            version,
                            environment: name.clone(),
                            difficulty: *difficulty,
                            accuracy: a.clone(),
                        };
                        lines.push_str(&serde_json::to_string(&line).expect("serialises"));
                        lines.push('\n');
                    }
                }
            }
            if let Some(file) = &self.file {
                use std::io::Write;
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)
                    .and_then(|mut f| f.write_all(lines.as_bytes()));
                appended.map_err(RunError::io(format!("appending to {}", file.display())))?;
            }
            for row in rows {
                ctx.ledger
                    .record_evaluation(row)
                    .await
                    .map_err(RunError::ledger("the run's ledger"))?;
            }
        }
        let measured = self.measured.lock().unwrap_or_else(|p| p.into_inner());
        Ok(environments
            .iter()
            .filter_map(|(n, d)| measured.get(&key(n, d)).map(|a| (n.clone(), a.clone())))
            .collect())
    }
}

/// What a goal compares with its `at_least`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum GoalOn {
    /// The mean held-out accuracy of the environments.
    Accuracy,
    /// The mean of the environments' mean held-out reward (an `rlhf` stage's reward-model
    /// score).
    MeanReward,
}

/// A stage's `until` on its mean held-out accuracy or reward.
struct AccuracyGoal {
    measurements: Arc<Measurements>,
    environments: Vec<(String, u32)>,
    on: GoalOn,
    at_least: f64,
    every: u64,
}

impl StageGoal for AccuracyGoal {
    fn every(&self) -> u64 {
        self.every
    }

    fn reached(
        &self,
        ctx: Arc<StageContext>,
        version: u64,
    ) -> BoxFuture<std::result::Result<bool, SchedulerError>> {
        let (measurements, environments, at_least, on) = (
            self.measurements.clone(),
            self.environments.clone(),
            self.at_least,
            self.on,
        );
        Box::pin(async move {
            let acc = measurements
                .accuracy_at(&ctx, &environments, version)
                .await
                .map_err(|e| SchedulerError::Goal(e.to_string()))?;
            let mean = match on {
                GoalOn::Accuracy => {
                    let mean = mean_accuracy(&acc).0;
                    tracing::info!(
                        version,
                        goal = at_least,
                        "stage goal check: held-out accuracy {:.1}% (goal {:.1}%)",
                        100.0 * mean,
                        100.0 * at_least
                    );
                    mean
                }
                GoalOn::MeanReward => {
                    let mean =
                        acc.values().map(|a| a.mean_reward).sum::<f64>() / acc.len().max(1) as f64;
                    tracing::info!(
                        version,
                        goal = at_least,
                        "stage goal check: held-out mean score {mean:.4} (goal {at_least:.4})"
                    );
                    mean
                }
            };
            Ok(mean >= at_least)
        })
    }
}

/// The evaluations of one run: before RL, every `every` RL steps (the learning curve) and at
/// the end, each recorded in the ledger (where the run's summary reads them).
pub(crate) struct Evaluator {
    plan: EvalPlan,
    before: Option<BTreeMap<String, Accuracy>>,
    curve_task: Option<JoinHandle<Result<()>>>,
    measurements: Arc<Measurements>,
    /// The stage the run is in, for the curve's ledger rows (the curve task outlives stages).
    stage: Arc<AtomicUsize>,
}

impl Evaluator {
    /// Evaluations by `plan`, each measurement also appended to `file` (whose earlier
    /// measurements, from a run being resumed, are read first).
    pub(crate) fn new(plan: EvalPlan, file: Option<PathBuf>) -> Result<Self> {
        let measured = match &file {
            Some(f) => read_measured(f)?,
            None => Measured::new(),
        };
        Ok(Self {
            measurements: Arc::new(Measurements {
                plan: plan.clone(),
                measured: Mutex::new(measured),
                file,
            }),
            plan,
            before: None,
            curve_task: None,
            stage: Arc::default(),
        })
    }

    /// The run entered stage `index`: the curve's measurements from now on belong to it.
    pub(crate) fn enter_stage(&self, index: usize) {
        self.stage.store(index, Ordering::Relaxed);
    }

    /// What was measured of policy `version` on `environments` (by this process or one before
    /// it), without measuring anything: for policies that can no longer be loaded.
    pub(crate) fn measured_at(
        &self,
        environments: &[(String, u32)],
        version: u64,
    ) -> BTreeMap<String, Accuracy> {
        let measured = self
            .measurements
            .measured
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        environments
            .iter()
            .filter_map(|(n, d)| {
                measured
                    .get(&(version, n.clone(), *d))
                    .map(|a| (n.clone(), a.clone()))
            })
            .collect()
    }

    /// A resumed run: the held-out accuracy before RL is what was measured at `version` (where
    /// its first RL stage began) before the crash.
    pub(crate) fn resume_before_rl(&mut self, version: u64) {
        let environments = self.plan.environments.clone();
        self.before = Some(self.measured_at(&environments, version));
    }

    /// Held-out accuracy of policy `version` on `environments` (measured once per version).
    pub(crate) async fn accuracy_at(
        &self,
        ctx: &Arc<StageContext>,
        environments: &[(String, u32)],
        version: u64,
    ) -> Result<BTreeMap<String, Accuracy>> {
        self.measurements
            .accuracy_at(ctx, environments, version)
            .await
    }

    /// The goal of a stage that ends once the mean held-out measure `on` of `environments` is
    /// at least `until.at_least`: accuracy, or for an `rlhf` stage the mean score of its judged
    /// environments (`<env>@<reward stage>`). Its measurements are the run's own.
    pub(crate) fn goal(
        &self,
        environments: &[(String, u32)],
        until: &Until,
        on: GoalOn,
    ) -> Arc<dyn StageGoal> {
        Arc::new(AccuracyGoal {
            measurements: self.measurements.clone(),
            environments: environments.to_vec(),
            on,
            at_least: until.at_least,
            every: until.every,
        })
    }

    /// Called before each stage; evaluates once, before the first RL stage, and starts
    /// following the versions for the curve.
    pub(crate) async fn before_rl(&mut self, ctx: &Arc<StageContext>) -> Result<()> {
        if self.before.is_some() {
            return Ok(());
        }
        let sampling = self.plan.sampling;
        let how = match sampling.samples {
            1 => "one greedy answer each".to_string(),
            k => format!(
                "{k} samples each at temperature {}, accuracy = mean solved fraction",
                sampling.temperature
            ),
        };
        tracing::info!(
            tasks = self.plan.tasks,
            samples = sampling.samples,
            "evaluating {} held-out tasks per environment before RL ({how}) ...",
            self.plan.tasks
        );
        let base = ctx.learning.version();
        let environments = self.plan.environments.clone();
        let before = self.accuracy_at(ctx, &environments, base).await?;
        tracing::info!(version = base, "before RL: {}", accuracy_line(&before));
        self.before = Some(before);
        if self.plan.every > 0 {
            self.curve_task = Some(self.spawn_curve(ctx.clone(), base));
        }
        Ok(())
    }

    /// Evaluates each `every`-th version after `base` as soon as the learner publishes it,
    /// recording each measurement like every other (ledger, measurements file).
    fn spawn_curve(&self, ctx: Arc<StageContext>, base: u64) -> JoinHandle<Result<()>> {
        let plan = self.plan.clone();
        let (measurements, stage) = (self.measurements.clone(), self.stage.clone());
        tokio::spawn(async move {
            let mut k = plan.every;
            while k < plan.rl_steps {
                ctx.learning.wait_version(base + k).await?;
                let mut in_stage = (*ctx).clone();
                in_stage.stage_index = stage.load(Ordering::Relaxed);
                let acc = measurements
                    .accuracy_at(&Arc::new(in_stage), &plan.environments, base + k)
                    .await?;
                tracing::info!(
                    rl_step = k,
                    version = base + k,
                    "RL step {k}: {}",
                    accuracy_line(&acc)
                );
                k += plan.every;
            }
            Ok(())
        })
    }

    /// Evaluates the final policy once the curve's measurements are all in; returns whether
    /// the run measured its policy before RL (it had an RL stage).
    pub(crate) async fn finish(mut self, ctx: &Arc<StageContext>) -> Result<bool> {
        let version = ctx.learning.version();
        let environments = self.plan.environments.clone();
        let after = self.accuracy_at(ctx, &environments, version).await?;
        tracing::info!(version, "after RL:  {}", accuracy_line(&after));
        if let Some(task) = self.curve_task.take() {
            task.await.map_err(|source| RunError::Task {
                what: "the learning-curve evaluation",
                source,
            })??;
        }
        Ok(self.before.is_some_and(|b| !b.is_empty()))
    }
}
