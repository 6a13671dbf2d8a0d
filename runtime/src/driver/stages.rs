//! The stage loop: each stage of the plan in order, on one shared context, with the held-out
//! evaluation before the first RL stage. Around each stage: its metric at the start and the end
//! (the held-out accuracy of its environments), its row in the ledger's `stages` table, its
//! final policy saved as a checkpoint, and `stages/<name>/summary.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{Device, Tensor};
use chorus_model::tokenizer::Tokenizer;
use chorus_model::{NemotronHConfig, Params, checkpoint};
use chorus_orchestrator::confidence;
use chorus_orchestrator::config::{EnvironmentSource, Stage, StageKind};
use chorus_orchestrator::ledger::{NewStage, StageEnd, StageStatus};
use chorus_orchestrator::remote::RemoteLearner;
use chorus_orchestrator::scheduler::{
    Accuracy, StageContext, run_mtp_heal_stage, run_rl_stage, run_sft_stage,
};
use tracing::Instrument;

use super::acceptance::{AcceptanceProbe, acceptance_line, pooled};
use super::evaluation::{Evaluator, GoalOn};
use super::resume::Resumed;
use super::reward_model::run_reward_model_stage;
use crate::error::{Result, RunError};
use crate::judge::Judging;
use crate::plan::RunPlan;
use crate::summary::{StageSummary, accuracy_line, mean_accuracy};

/// A stage without environments (transcripts alone) has nothing to measure with.
const NO_METRIC: &str = "none";

/// Where a stage's outputs go and where its weights come from.
pub(crate) struct StageOutputs<'a> {
    /// The run's output directory; stage `s` writes `stages/<s>/`.
    pub out_dir: &'a Path,
    /// The learner, for the stages' final weights.
    pub learner: &'a Arc<RemoteLearner>,
    /// The policy's architecture, written with each checkpoint.
    pub model: &'a NemotronHConfig,
    /// The run's tokenizer, written with each checkpoint.
    pub tokenizer: &'a Tokenizer,
    /// The ledger's URL, for errors.
    pub db: &'a str,
}

/// Where the stage loop begins.
pub(crate) struct StartAt<'a> {
    /// Stages before this index are not run (`--from-stage`).
    pub first_stage: usize,
    /// A run resumed after a crash.
    pub resumed: Option<&'a Resumed>,
}

/// Runs every stage of `plan` from `start`; `ctx.stage_index` follows the stage being run. A
/// resumed run's finished stages are not run again: their summaries are read back.
pub(crate) async fn run_stages(
    plan: &RunPlan,
    ctx: &mut StageContext,
    evaluator: &mut Evaluator,
    outputs: &StageOutputs<'_>,
    start: &StartAt<'_>,
) -> Result<Vec<StageSummary>> {
    let mut summaries = vec![];
    // A resumed run whose first RL stage had begun measured "before RL" there, before the crash.
    if let Some(r) = start.resumed
        && let Some(v) = plan
            .config
            .stages
            .iter()
            .enumerate()
            .find(|(_, s)| s.kind.is_rl())
            .and_then(|(i, _)| r.first_version(i))
    {
        evaluator.resume_before_rl(v);
    }
    for (i, stage) in plan.config.stages.iter().enumerate() {
        if i < start.first_stage {
            tracing::info!("stage {} skipped (--from-stage)", stage.name);
            continue;
        }
        if let Some(r) = start.resumed
            && r.finished(i)
        {
            // The ledger's copy of its summary; a ledger older than migration 0006 has none,
            // and then the stage's summary.json is read.
            let path = outputs
                .out_dir
                .join("stages")
                .join(&stage.name)
                .join("summary.json");
            let (text, from) = match r.stages.get(&i).and_then(|s| s.summary_json.clone()) {
                Some(text) => (
                    text,
                    format!("the ledger's summary of stage {}", stage.name),
                ),
                None => (
                    std::fs::read_to_string(&path)
                        .map_err(RunError::io(format!("reading {}", path.display())))?,
                    path.display().to_string(),
                ),
            };
            let summary: StageSummary = serde_json::from_str(&text)
                .map_err(|e| RunError::Invalid(format!("{from}: {e}")))?;
            tracing::info!(
                "stage {} finished before the crash; not run again",
                stage.name
            );
            summaries.push(summary);
            continue;
        }
        ctx.stage_index = i;
        evaluator.enter_stage(i);
        ctx.first_version = start.resumed.and_then(|r| r.first_version(i));
        ctx.transcripts = plan.transcripts.get(&i).cloned();
        // An mtp_heal stage measures its policies' speculative acceptance, not their accuracy.
        let probe = (stage.kind == StageKind::MtpHeal).then(|| {
            AcceptanceProbe::new(
                outputs.learner.clone(),
                plan.model.clone(),
                plan.evaluation.clone(),
                stage_environments(stage),
            )
        });
        ctx.goal = stage.until.as_ref().map(|until| match &probe {
            Some(p) => p.goal(until),
            None => evaluator.goal(&stage_environments(stage), until, GoalOn::Accuracy),
        });
        let shared = Arc::new(ctx.clone());
        if stage.kind.is_rl() {
            evaluator.before_rl(&shared).await?;
        }
        let span = tracing::info_span!(
            "stage",
            stage = stage.name,
            stage_index = i,
            kind = ?stage.kind
        );
        let summary = match (&stage.reward_model, stage.judge) {
            (Some(spec), _) => {
                run_reward_model_stage(plan, stage, spec, &shared, outputs)
                    .instrument(span)
                    .await?
            }
            (None, Some(judge)) => {
                let (judged, ctx) = judged_stage(plan, stage, judge, &shared, evaluator, outputs)?;
                run_stage(&judged, &ctx, evaluator, None, outputs)
                    .instrument(span)
                    .await?
            }
            (None, None) => {
                run_stage(stage, &shared, evaluator, probe.as_ref(), outputs)
                    .instrument(span)
                    .await?
            }
        };
        summaries.push(summary);
    }
    Ok(summaries)
}

/// An `rlhf` stage as it runs: each environment of its mixture replaced by the same environment
/// judged by the reward model stage `judge` saved (`<env>@<judge>`), in a context whose registry
/// holds them.
fn judged_stage(
    plan: &RunPlan,
    stage: &Stage,
    judge: usize,
    ctx: &Arc<StageContext>,
    evaluator: &Evaluator,
    outputs: &StageOutputs<'_>,
) -> Result<(Stage, Arc<StageContext>)> {
    let judge_name = &plan.config.stages[judge].name;
    let dir = outputs
        .out_dir
        .join("stages")
        .join(judge_name)
        .join("checkpoint");
    let judging = Judging::load(plan, stage, judge, &dir)?;
    let mut registry = (*ctx.registry).clone();
    let mut judged = stage.clone();
    for spec in &mut judged.environments {
        let inner = registry
            .get(spec.key())
            .map_err(|e| RunError::Invalid(format!("stage {}: {e}", stage.name)))?;
        let env = judging.judge(inner);
        spec.source = EnvironmentSource::Builtin(env.info().name);
        registry.replace(env);
    }
    tracing::info!(
        "stage {}: rewards from the reward model of stage {judge_name} ({})",
        stage.name,
        dir.display()
    );
    let mut local = (**ctx).clone();
    local.registry = Arc::new(registry);
    // The goal is on the judged environments' mean score.
    local.goal = stage
        .until
        .as_ref()
        .map(|until| evaluator.goal(&stage_environments(&judged), until, GoalOn::MeanReward));
    Ok((judged, Arc::new(local)))
}

/// The stage's environments as the evaluation names them: (registry key, difficulty).
fn stage_environments(stage: &Stage) -> Vec<(String, u32)> {
    let mut seen = BTreeMap::new();
    for e in &stage.environments {
        seen.entry(e.key().to_string()).or_insert(e.difficulty);
    }
    seen.into_iter().collect()
}

/// A stage's metric over `acc` with its interval: the mean held-out accuracy (an `rlhf`
/// stage: the mean reward-model score; an `mtp_heal` stage: the acceptance rate over all its
/// drafts; neither with an interval); `None` without environments.
fn mean_of(
    kind: StageKind,
    acc: &BTreeMap<String, Accuracy>,
) -> Option<(f64, Option<confidence::Interval>)> {
    if acc.is_empty() {
        return None;
    }
    if kind == StageKind::Rlhf {
        let mean = acc.values().map(|a| a.mean_reward).sum::<f64>() / acc.len() as f64;
        return Some((mean, None));
    }
    if kind == StageKind::MtpHeal {
        return Some((pooled(acc), None));
    }
    let (mean, interval) = mean_accuracy(acc);
    Some((mean, Some(interval)))
}

/// The stage's metric of policy `version`: held-out accuracy, or with `probe` (an `mtp_heal`
/// stage) speculative acceptance.
async fn measure(
    ctx: &Arc<StageContext>,
    evaluator: &Evaluator,
    probe: Option<&AcceptanceProbe>,
    environments: &[(String, u32)],
    version: u64,
) -> Result<BTreeMap<String, Accuracy>> {
    match probe {
        Some(p) => p.at(ctx, version).await,
        None => evaluator.accuracy_at(ctx, environments, version).await,
    }
}

/// What a resumed `mtp_heal` stage measured at its start before the crash: the ledger's
/// `metric_start` (its policy is gone, and acceptance is not kept per environment).
async fn resumed_metric_start(ctx: &StageContext, db: &str) -> Result<Option<f64>> {
    let stages = ctx
        .ledger
        .list_stages(&ctx.run_id)
        .await
        .map_err(RunError::ledger(db))?;
    Ok(stages
        .into_iter()
        .find(|s| s.stage.stage_index == ctx.stage_index as u64)
        .and_then(|s| s.stage.metric_start))
}

async fn run_stage(
    stage: &Stage,
    ctx: &Arc<StageContext>,
    evaluator: &Evaluator,
    probe: Option<&AcceptanceProbe>,
    outputs: &StageOutputs<'_>,
) -> Result<StageSummary> {
    let i = ctx.stage_index;
    let kind = stage.kind.name();
    let environments = stage_environments(stage);
    let metric = if environments.is_empty() {
        NO_METRIC
    } else {
        stage.kind.metrics()[0]
    };
    let started = Instant::now();
    let line = |acc: &BTreeMap<String, Accuracy>| match probe {
        Some(_) => format!("MTP acceptance {}", acceptance_line(acc)),
        None => accuracy_line(acc),
    };
    let first_version = ctx.first_version.unwrap_or_else(|| ctx.learning.version());
    // A resumed stage's start was measured before the crash (if at all): its policy is gone.
    let (start, resumed_start) = match (ctx.first_version.is_some(), probe) {
        (true, None) => (evaluator.measured_at(&environments, first_version), None),
        (true, Some(_)) => (
            BTreeMap::new(),
            resumed_metric_start(ctx, outputs.db).await?,
        ),
        (false, _) => (
            measure(ctx, evaluator, probe, &environments, first_version).await?,
            None,
        ),
    };
    if !start.is_empty() {
        tracing::info!(
            version = first_version,
            "stage {} starts at: {}",
            stage.name,
            line(&start)
        );
    }
    ctx.ledger
        .start_stage(NewStage {
            run_id: ctx.run_id.clone(),
            stage_index: i as u64,
            name: stage.name.clone(),
            kind: kind.into(),
            first_step: first_version,
            metric: Some(metric.into()),
            metric_start: mean_of(stage.kind, &start).map(|m| m.0),
        })
        .await
        .map_err(RunError::ledger(outputs.db))?;
    let completions = if stage.kind.is_rl() {
        stage.group_size
    } else {
        1
    };
    tracing::info!(
        steps = stage.steps,
        prompts_per_step = stage.prompts_per_step,
        completions,
        "stage {} ({kind}): {} steps x {} prompts x {completions}",
        stage.name,
        stage.steps,
        stage.prompts_per_step,
    );
    let submitted_before = ctx.stats.trajectories_submitted.load(Ordering::Relaxed);
    let st = Arc::new(stage.clone());
    let ran = if stage.kind.is_rl() {
        run_rl_stage(ctx.clone(), st).await
    } else if stage.kind == StageKind::MtpHeal {
        run_mtp_heal_stage(ctx.clone(), st).await
    } else {
        run_sft_stage(ctx.clone(), st).await
    };
    // Every step advances the policy version (a skipped one too), so the stage ends at this one.
    let steps = *ran.as_ref().unwrap_or(&stage.steps);
    let last_version = first_version + steps;
    let finished = match ran {
        Ok(_) => ctx
            .learning
            .wait_version(last_version)
            .await
            .map_err(RunError::from),
        Err(e) => Err(e.into()),
    };
    let trajectories = ctx
        .stats
        .trajectories_submitted
        .load(Ordering::Relaxed)
        .saturating_sub(submitted_before);
    if let Err(e) = finished {
        let end = StageEnd {
            run_id: ctx.run_id.clone(),
            stage_index: i as u64,
            status: StageStatus::Failed,
            last_step: ctx.learning.version(),
            metric_start: None,
            metric_end: None,
            trajectories,
            checkpoint_path: None,
            summary_json: None,
        };
        if let Err(le) = ctx.ledger.finish_stage(end).await {
            tracing::warn!(error = %le, "the ledger did not take the failed stage");
        }
        return Err(e);
    }
    let end = measure(ctx, evaluator, probe, &environments, last_version).await?;
    if !end.is_empty() {
        tracing::info!(
            version = last_version,
            "stage {} ends at:   {}",
            stage.name,
            line(&end)
        );
    }
    let dir = outputs.out_dir.join("stages").join(&stage.name);
    let checkpoint = dir.join("checkpoint");
    save_checkpoint(outputs, &ctx.run_id, last_version, &checkpoint).await?;
    let start_mean = mean_of(stage.kind, &start).or(resumed_start.map(|m| (m, None)));
    let end_mean = mean_of(stage.kind, &end);
    let mean_kl = if stage.kind.is_rl() {
        stage_mean_kl(ctx, outputs.db).await?
    } else {
        None
    };
    let summary = StageSummary {
        name: stage.name.clone(),
        kind: kind.into(),
        metric: metric.into(),
        start: start_mean.map(|m| m.0),
        start_interval: start_mean.and_then(|m| m.1),
        end: end_mean.map(|m| m.0),
        end_interval: end_mean.and_then(|m| m.1),
        environments: start
            .iter()
            .map(|(n, a)| {
                let after = end.get(n).map_or(f64::NAN, |e| e.accuracy);
                (n.clone(), (a.accuracy, after))
            })
            .collect(),
        steps,
        planned_steps: stage.steps,
        reached_goal: stage.until.as_ref().map(|_| steps < stage.steps),
        first_version,
        last_version,
        trajectories,
        wall_seconds: started.elapsed().as_secs_f64(),
        checkpoint: checkpoint.clone(),
        mean_kl,
    };
    let path = dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).expect("a stage summary always serialises");
    std::fs::write(&path, &text).map_err(RunError::io(format!("writing {}", path.display())))?;
    ctx.ledger
        .finish_stage(StageEnd {
            run_id: ctx.run_id.clone(),
            stage_index: i as u64,
            status: StageStatus::Succeeded,
            last_step: last_version,
            metric_start: None,
            metric_end: end_mean.map(|m| m.0),
            trajectories,
            checkpoint_path: Some(checkpoint.display().to_string()),
            summary_json: Some(text),
        })
        .await
        .map_err(RunError::ledger(outputs.db))?;
    let pct = |m: Option<(f64, Option<confidence::Interval>)>| match m {
        None => "-".to_string(),
        Some((v, None)) => format!("{v:.4}"),
        Some((v, Some(_))) => format!("{:.1}%", 100.0 * v),
    };
    tracing::info!(
        checkpoint = %checkpoint.display(),
        "stage {}: {metric} {} -> {} in {:.0} s; checkpoint {}",
        stage.name,
        pct(start_mean),
        pct(end_mean),
        summary.wall_seconds,
        checkpoint.display()
    );
    Ok(summary)
}

/// The mean KL estimate of the running stage's learner steps recorded so far.
async fn stage_mean_kl(ctx: &StageContext, db: &str) -> Result<Option<f64>> {
    // The step reports are recorded as they stream in; flushing first takes the last ones.
    ctx.ledger.flush().await.map_err(RunError::ledger(db))?;
    let kl: Vec<f64> = ctx
        .ledger
        .list_learner_steps(&ctx.run_id)
        .await
        .map_err(RunError::ledger(db))?
        .into_iter()
        .filter(|s| s.stage_index == Some(ctx.stage_index as u64))
        .filter_map(|s| s.step.kl)
        .filter(|k| k.is_finite())
        .collect();
    Ok((!kl.is_empty()).then(|| kl.iter().sum::<f64>() / kl.len() as f64))
}

/// Fetches policy `version` from the learner and writes it to `dir` in HF layout, with the
/// run's tokenizer and the tokenizer and generation configs transformers and vLLM read.
pub(crate) async fn save_checkpoint(
    outputs: &StageOutputs<'_>,
    run_id: &str,
    version: u64,
    dir: &Path,
) -> Result<()> {
    let params = policy_params(outputs, run_id, version).await?;
    checkpoint::save_checkpoint(dir, outputs.model, &params, None)?;
    checkpoint::save_tokenizer_files(dir, outputs.model, outputs.tokenizer)?;
    Ok(())
}

/// The policy's weights at `version`, fetched from the learner.
pub(crate) async fn policy_params(
    outputs: &StageOutputs<'_>,
    run_id: &str,
    version: u64,
) -> Result<Params> {
    fetch_params(outputs.learner, run_id, version).await
}

/// The policy's weights at `version`, fetched from `learner`.
pub(crate) async fn fetch_params(
    learner: &RemoteLearner,
    run_id: &str,
    version: u64,
) -> Result<Params> {
    let tensors = learner.fetch_weights(run_id, version).await?;
    let mut named = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let tensor = Tensor::from_vec(t.data, t.shape, &Device::Cpu)
            .map_err(|e| RunError::Invalid(format!("weight `{name}` of version {version}: {e}")))?;
        named.push((name, tensor));
    }
    Ok(Params::from_tensors(named, &Device::Cpu)?)
}
