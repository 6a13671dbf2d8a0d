//! Held-out evaluation during a run: before the first RL stage, after the last stage, at each
//! stage's start and end (its metric) and, with `every`, each `every`-th policy version as soon
//! as the learner publishes it, alongside training (the learning curve). An environment is
//! evaluated once per policy version: a stage's end is the next stage's start, and the last
//! stage's end is the run's final evaluation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chorus_orchestrator::scheduler::{Accuracy, StageContext, evaluate};
use tokio::task::JoinHandle;

use crate::error::{Result, RunError};
use crate::plan::EvalPlan;
use crate::summary::{CurvePoint, accuracy_line};

/// Held-out accuracy of policy `version` by `plan`.
async fn held_out(
    ctx: &Arc<StageContext>,
    plan: &EvalPlan,
    version: u64,
) -> Result<BTreeMap<String, Accuracy>> {
    held_out_of(ctx, plan, &plan.environments, version).await
}

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
        plan.max_new_tokens,
        plan.max_prompt_tokens,
        version,
    )
    .await?)
}

/// Accuracies already measured, by (policy version, environment, difficulty).
type Measured = BTreeMap<(u64, String, u32), Accuracy>;

/// The evaluations of one run and the curve they make.
pub(crate) struct Evaluator {
    plan: EvalPlan,
    started: Instant,
    before: Option<BTreeMap<String, Accuracy>>,
    curve: Arc<Mutex<Vec<CurvePoint>>>,
    curve_task: Option<JoinHandle<Result<()>>>,
    measured: Measured,
}

impl Evaluator {
    /// Evaluations by `plan`, their times counted from `started`.
    pub(crate) fn new(plan: EvalPlan, started: Instant) -> Self {
        Self {
            plan,
            started,
            before: None,
            curve: Arc::default(),
            curve_task: None,
            measured: Measured::new(),
        }
    }

    fn remember(
        &mut self,
        version: u64,
        environments: &[(String, u32)],
        acc: &BTreeMap<String, Accuracy>,
    ) {
        for (name, difficulty) in environments {
            if let Some(a) = acc.get(name) {
                self.measured
                    .insert((version, name.clone(), *difficulty), a.clone());
            }
        }
    }

    /// Held-out accuracy of policy `version` on `environments`, measuring only what was not
    /// measured at that version before.
    pub(crate) async fn accuracy_at(
        &mut self,
        ctx: &Arc<StageContext>,
        environments: &[(String, u32)],
        version: u64,
    ) -> Result<BTreeMap<String, Accuracy>> {
        let missing: Vec<(String, u32)> = environments
            .iter()
            .filter(|(n, d)| !self.measured.contains_key(&(version, n.clone(), *d)))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let acc = held_out_of(ctx, &self.plan, &missing, version).await?;
            self.remember(version, &missing, &acc);
        }
        Ok(environments
            .iter()
            .filter_map(|(n, d)| {
                self.measured
                    .get(&(version, n.clone(), *d))
                    .map(|a| (n.clone(), a.clone()))
            })
            .collect())
    }

    /// Called before each stage; evaluates once, before the first RL stage, and starts
    /// following the versions for the curve.
    pub(crate) async fn before_rl(&mut self, ctx: &Arc<StageContext>) -> Result<()> {
        if self.before.is_some() {
            return Ok(());
        }
        tracing::info!(
            tasks = self.plan.tasks,
            "evaluating {} held-out tasks per environment before RL ...",
            self.plan.tasks
        );
        let base = ctx.learning.version();
        let environments = self.plan.environments.clone();
        let before = self.accuracy_at(ctx, &environments, base).await?;
        tracing::info!(version = base, "before RL: {}", accuracy_line(&before));
        self.push(CurvePoint::new(
            base,
            self.started.elapsed().as_secs_f64(),
            &before,
        ));
        self.before = Some(before);
        if self.plan.every > 0 {
            self.curve_task = Some(self.spawn_curve(ctx.clone(), base));
        }
        Ok(())
    }

    fn push(&self, point: CurvePoint) {
        self.curve
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(point);
    }

    /// Evaluates each `every`-th version after `base` as soon as the learner publishes it.
    fn spawn_curve(&self, ctx: Arc<StageContext>, base: u64) -> JoinHandle<Result<()>> {
        let (plan, started, curve) = (self.plan.clone(), self.started, self.curve.clone());
        tokio::spawn(async move {
            let mut k = plan.every;
            while k < plan.rl_steps {
                ctx.learning.wait_version(base + k).await?;
                let at = started.elapsed().as_secs_f64();
                let acc = held_out(&ctx, &plan, base + k).await?;
                tracing::info!(
                    rl_step = k,
                    version = base + k,
                    "RL step {k}: {}",
                    accuracy_line(&acc)
                );
                curve
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(CurvePoint::new(base + k, at, &acc));
                k += plan.every;
            }
            Ok(())
        })
    }

    /// Evaluates the final policy and returns the accuracies before RL and after, and the curve
    /// in version order.
    #[allow(clippy::type_complexity)]
    pub(crate) async fn finish(
        mut self,
        ctx: &Arc<StageContext>,
    ) -> Result<(
        BTreeMap<String, Accuracy>,
        BTreeMap<String, Accuracy>,
        Vec<CurvePoint>,
    )> {
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
        self.push(CurvePoint::new(
            version,
            self.started.elapsed().as_secs_f64(),
            &after,
        ));
        let mut curve = std::mem::take(&mut *self.curve.lock().unwrap_or_else(|p| p.into_inner()));
        curve.sort_by_key(|p| p.version);
        Ok((self.before.unwrap_or_default(), after, curve))
    }
}
