//! A `reward_model` stage: a Bradley–Terry reward model trained from the current policy on
//! preference pairs (a user's JSONL and pairs drawn from verifiable environments: the reference
//! answer chosen, a wrong one rejected), measured by held-out pair accuracy before and after, and
//! saved as the stage's checkpoint (the policy's HF layout plus `score_head.safetensors`). The
//! policy being post-trained is not changed: the next stage starts from the same version.
//!
//! The reward model trains in this process (on the CPU, with the learner's own code), beside
//! the learner service rather than in it: it is a second model whose weights the workers never
//! need. A stage with `rm = "genrm"` trains a generative judge instead, on the same pairs
//! ([`preference_rows`]), in [`super::genrm`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chorus_environments::preference::{Preference, PreferenceRow, pairs_from_environment_up_to};
use chorus_environments::{Split, builtin_registry, chat};
use chorus_learner::{PreferencePair, RewardModel, RewardTrainer};
use chorus_model::Params;
use chorus_model::tokenizer::Tokenizer;
use chorus_orchestrator::config::{PAIR_ACCURACY, RewardModelKind, RewardModelSpec, Stage};
use chorus_orchestrator::ledger::{NewStage, StageEnd, StageStatus};
use chorus_orchestrator::scheduler::StageContext;
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};

use super::genrm::run_genrm_stage;
use super::stages::{StageOutputs, policy_params};
use crate::error::{Result, RunError};
use crate::plan::RunPlan;
use crate::summary::StageSummary;

/// Where the stage's pairs of one source came from (an environment's name, or `data`).
const USER_DATA: &str = "data";

/// Tokenized pairs by source.
type Sources = BTreeMap<String, Vec<PreferencePair>>;

/// Preference rows by source (an environment's name, or `data`).
pub(crate) type RowSources = BTreeMap<String, Vec<PreferenceRow>>;

/// Runs reward-model stage `i` (`spec` says what it trains on) and returns its summary.
pub(crate) async fn run_reward_model_stage(
    plan: &RunPlan,
    stage: &Stage,
    spec: &RewardModelSpec,
    ctx: &Arc<StageContext>,
    outputs: &StageOutputs<'_>,
) -> Result<StageSummary> {
    if spec.rm == RewardModelKind::Genrm {
        return run_genrm_stage(plan, stage, spec, ctx, outputs).await;
    }
    let i = ctx.stage_index;
    let begun = begin_training(stage, ctx, outputs, "a Bradley-Terry reward model", {
        let rows = plan.preferences.get(&i).cloned();
        let (spec, tokenizer, seed) = (spec.clone(), plan.tokenizer.clone(), ctx.seed);
        move || pairs(&spec, rows.as_deref().map(Vec::as_slice), &tokenizer, seed)
    })
    .await?;
    let Begun {
        train,
        heldout,
        params,
        start,
    } = begun;
    let trained = {
        let (stage, plan_model, optimizer) = (
            stage.clone(),
            plan.model.clone(),
            plan.learner.optimizer.clone(),
        );
        let (seed, checkpoint) = (ctx.seed ^ (i as u64) << 48, start.checkpoint.clone());
        tokio::task::spawn_blocking(move || -> Result<Trained> {
            let model = RewardModel::from_policy(plan_model, params, seed)?;
            let start = accuracies(&model, &heldout)?;
            let mut trainer = RewardTrainer::new(model, optimizer)?;
            let all: Vec<PreferencePair> = train.into_values().flatten().collect();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut order: Vec<usize> = vec![];
            let mut reached = None;
            let mut steps = 0;
            for step in 0..stage.steps {
                if let Some(until) = &stage.until
                    && step > 0
                    && step.is_multiple_of(until.every)
                {
                    let acc = mean(&accuracies(trainer.model(), &heldout)?);
                    tracing::info!(step, "reward model: held-out pair accuracy {acc:.3}");
                    if acc >= until.at_least {
                        reached = Some(step);
                        break;
                    }
                }
                let mut batch = Vec::with_capacity(stage.prompts_per_step);
                while batch.len() < stage.prompts_per_step {
                    if order.is_empty() {
                        order = (0..all.len()).collect();
                        order.shuffle(&mut rng);
                    }
                    let k = order.pop().expect("refilled");
                    batch.push(all[k].clone());
                }
                let report = trainer.step(&batch, stage.lr_at(step))?;
                steps = step + 1;
                if step % 10 == 0 || step + 1 == stage.steps {
                    tracing::info!(
                        step = step + 1,
                        loss = report.loss,
                        accuracy = report.accuracy,
                        "reward model step {}/{}: loss {:.4}, batch pair accuracy {:.2}{}",
                        step + 1,
                        stage.steps,
                        report.loss,
                        report.accuracy,
                        report
                            .skipped
                            .as_deref()
                            .map(|s| format!(" (skipped: {s})"))
                            .unwrap_or_default()
                    );
                }
            }
            let model = trainer.into_model();
            let end = accuracies(&model, &heldout)?;
            model.save(&checkpoint)?;
            Ok(Trained {
                start,
                end,
                steps: reached.unwrap_or(steps),
                reached: reached.is_some(),
            })
        })
        .await
        .map_err(|source| RunError::Task {
            what: "training the reward model",
            source,
        })?
    };
    finish_stage(stage, ctx, outputs, start, trained).await
}

/// A reward-model stage's training set, held-out set and starting point, once it has begun.
pub(crate) struct Begun<T> {
    pub train: BTreeMap<String, Vec<T>>,
    pub heldout: BTreeMap<String, Vec<T>>,
    /// The policy's weights the model starts from.
    pub params: Params,
    pub start: StageStart,
}

/// Where and when a reward-model stage began.
#[derive(Clone)]
pub(crate) struct StageStart {
    /// Where the stage's checkpoint goes.
    pub checkpoint: PathBuf,
    /// The policy version the stage starts (and, the policy unchanged, ends) at.
    pub version: u64,
    pub started: Instant,
}

/// Begins a reward-model stage training `what`: draws its pairs (`draw`, off the async
/// runtime), refuses a stage without training or held-out pairs, fetches the policy's weights
/// and records the stage's start.
pub(crate) async fn begin_training<T: Send + 'static>(
    stage: &Stage,
    ctx: &StageContext,
    outputs: &StageOutputs<'_>,
    what: &str,
    draw: impl FnOnce() -> Result<(BTreeMap<String, Vec<T>>, BTreeMap<String, Vec<T>>)> + Send + 'static,
) -> Result<Begun<T>> {
    let started = Instant::now();
    let version = ctx.learning.version();
    let (train, heldout) =
        tokio::task::spawn_blocking(draw)
            .await
            .map_err(|source| RunError::Task {
                what: "drawing a reward model's pairs",
                source,
            })??;
    let train_n: usize = train.values().map(Vec::len).sum();
    let heldout_n: usize = heldout.values().map(Vec::len).sum();
    tracing::info!(
        train = train_n,
        heldout = heldout_n,
        "stage {}: {what} on {train_n} pairs ({heldout_n} held out), from policy version \
         {version}",
        stage.name
    );
    if train_n == 0 || heldout_n == 0 {
        return Err(RunError::Invalid(format!(
            "stage {}: {train_n} training and {heldout_n} held-out pairs; {what} needs both \
             (add `pairs_from` environments or rows to `data`)",
            stage.name
        )));
    }
    let params = policy_params(outputs, &ctx.run_id, version).await?;
    let checkpoint = begin_stage(stage, ctx, outputs, version).await?;
    Ok(Begun {
        train,
        heldout,
        params,
        start: StageStart {
            checkpoint,
            version,
            started,
        },
    })
}

/// Records a reward-model stage begun at policy `version` in the ledger and returns where its
/// checkpoint goes (`stages/<name>/checkpoint`).
pub(crate) async fn begin_stage(
    stage: &Stage,
    ctx: &StageContext,
    outputs: &StageOutputs<'_>,
    version: u64,
) -> Result<PathBuf> {
    ctx.ledger
        .start_stage(NewStage {
            run_id: ctx.run_id.clone(),
            stage_index: ctx.stage_index as u64,
            name: stage.name.clone(),
            kind: stage.kind.name().into(),
            first_step: version,
            metric: Some(PAIR_ACCURACY.into()),
            metric_start: None,
        })
        .await
        .map_err(RunError::ledger(outputs.db))?;
    Ok(outputs
        .out_dir
        .join("stages")
        .join(&stage.name)
        .join("checkpoint"))
}

/// Ends a reward-model stage begun at policy `version`: a failure is recorded as the stage's
/// end and returned; a success writes `summary.json` and the ledger's row and returns the
/// summary. The policy did not move, so the stage ends at `version` too.
pub(crate) async fn finish_stage(
    stage: &Stage,
    ctx: &StageContext,
    outputs: &StageOutputs<'_>,
    start: StageStart,
    trained: Result<Trained>,
) -> Result<StageSummary> {
    let i = ctx.stage_index;
    let StageStart {
        checkpoint,
        version,
        started,
    } = start;
    let trained = match trained {
        Ok(t) => t,
        Err(e) => {
            let end = StageEnd {
                run_id: ctx.run_id.clone(),
                stage_index: i as u64,
                status: StageStatus::Failed,
                last_step: version,
                metric_start: None,
                metric_end: None,
                trajectories: 0,
                checkpoint_path: None,
                summary_json: None,
            };
            if let Err(le) = ctx.ledger.finish_stage(end).await {
                tracing::warn!(error = %le, "the ledger did not take the failed stage");
            }
            return Err(e);
        }
    };
    let (metric_start, metric_end) = (mean(&trained.start), mean(&trained.end));
    let summary = StageSummary {
        name: stage.name.clone(),
        kind: stage.kind.name().into(),
        metric: PAIR_ACCURACY.into(),
        start: Some(metric_start),
        start_interval: None,
        end: Some(metric_end),
        end_interval: None,
        environments: trained
            .start
            .iter()
            .map(|(source, (a, _))| (source.clone(), (*a, trained.end[source].0)))
            .collect(),
        steps: trained.steps,
        planned_steps: stage.steps,
        reached_goal: stage.until.as_ref().map(|_| trained.reached),
        first_version: version,
        last_version: version,
        trajectories: 0,
        wall_seconds: started.elapsed().as_secs_f64(),
        checkpoint: checkpoint.clone(),
        mean_kl: None,
    };
    let path = outputs
        .out_dir
        .join("stages")
        .join(&stage.name)
        .join("summary.json");
    let text = serde_json::to_string_pretty(&summary).expect("a stage summary always serialises");
    std::fs::write(&path, &text).map_err(RunError::io(format!("writing {}", path.display())))?;
    ctx.ledger
        .finish_stage(StageEnd {
            run_id: ctx.run_id.clone(),
            stage_index: i as u64,
            status: StageStatus::Succeeded,
            last_step: version,
            metric_start: Some(metric_start),
            metric_end: Some(metric_end),
            trajectories: 0,
            checkpoint_path: Some(checkpoint.display().to_string()),
            summary_json: Some(text),
        })
        .await
        .map_err(RunError::ledger(outputs.db))?;
    tracing::info!(
        checkpoint = %checkpoint.display(),
        "stage {}: {PAIR_ACCURACY} {:.1}% -> {:.1}% in {:.0} s; reward model ({}) in {}",
        stage.name,
        100.0 * metric_start,
        100.0 * metric_end,
        summary.wall_seconds,
        stage
            .reward_model
            .as_ref()
            .map_or("bradley_terry", |spec| match spec.rm {
                RewardModelKind::BradleyTerry => "bradley_terry",
                RewardModelKind::Genrm => "genrm",
            }),
        checkpoint.display()
    );
    Ok(summary)
}

/// What training left: held-out accuracy per source before and after (with the pair count),
/// steps taken and whether the goal was reached.
pub(crate) struct Trained {
    pub(crate) start: BTreeMap<String, (f64, usize)>,
    pub(crate) end: BTreeMap<String, (f64, usize)>,
    pub(crate) steps: u64,
    pub(crate) reached: bool,
}

/// Pair accuracy of `model` on each source's held-out pairs.
fn accuracies(model: &RewardModel, heldout: &Sources) -> Result<BTreeMap<String, (f64, usize)>> {
    let mut out = BTreeMap::new();
    for (source, pairs) in heldout {
        out.insert(source.clone(), (model.pair_accuracy(pairs)?, pairs.len()));
    }
    Ok(out)
}

/// The accuracy over all held-out pairs (each source weighted by its pairs).
pub(crate) fn mean(acc: &BTreeMap<String, (f64, usize)>) -> f64 {
    let n: usize = acc.values().map(|a| a.1).sum();
    acc.values().map(|(a, k)| a * *k as f64).sum::<f64>() / n.max(1) as f64
}

/// The stage's training and held-out pairs by source, tokenized as the policy reads a prompt
/// and its answer.
fn pairs(
    spec: &RewardModelSpec,
    rows: Option<&[PreferenceRow]>,
    tokenizer: &Tokenizer,
    seed: u64,
) -> Result<(Sources, Sources)> {
    let (train, heldout) = preference_rows(spec, rows, seed)?;
    let tokenized = |sources: RowSources| -> Result<Sources> {
        sources
            .into_iter()
            .map(|(source, rows)| {
                let pairs = rows
                    .iter()
                    .map(|row| tokenize(row, tokenizer))
                    .collect::<Result<Vec<_>>>()?;
                Ok((source, pairs))
            })
            .collect()
    };
    Ok((tokenized(train)?, tokenized(heldout)?))
}

/// The stage's training and held-out preference rows by source: the user's rows (`data`, split
/// by [`PreferenceRow::split`]) and, for each `pairs_from` environment, `train_pairs` rows from
/// its train tasks and `heldout_pairs` from its held-out ones.
pub(crate) fn preference_rows(
    spec: &RewardModelSpec,
    rows: Option<&[PreferenceRow]>,
    seed: u64,
) -> Result<(RowSources, RowSources)> {
    let (mut train, mut heldout) = (RowSources::new(), RowSources::new());
    for row in rows.unwrap_or_default() {
        let into = match row.split() {
            Split::Train => &mut train,
            Split::Heldout => &mut heldout,
        };
        into.entry(USER_DATA.into()).or_default().push(row.clone());
    }
    let registry = builtin_registry();
    for name in &spec.pairs_from {
        let env = registry
            .get(name)
            .map_err(|e| RunError::Invalid(format!("pairs_from: {e}")))?;
        for (split, n, into) in [
            (Split::Train, spec.train_pairs, &mut train),
            (Split::Heldout, spec.heldout_pairs, &mut heldout),
        ] {
            let rows = pairs_from_environment_up_to(env.as_ref(), split, 0, seed, n)
                .map_err(|e| RunError::Invalid(format!("pairs_from `{name}`: {e}")))?;
            if rows.len() < n {
                tracing::info!(
                    "pairs_from `{name}`: its {split} tasks at difficulty 0 give {} of the {n} \
                     pairs asked for (their distinct prompts run out)",
                    rows.len()
                );
            }
            into.entry(name.clone()).or_default().extend(rows);
        }
    }
    Ok((train, heldout))
}

/// A row as the policy reads it: the rendered prompt, then the response and the end of the
/// turn; the better response of a rated row (ranking 1-3) is its first.
fn tokenize(row: &PreferenceRow, tokenizer: &Tokenizer) -> Result<PreferencePair> {
    let (chosen, rejected) = match &row.preference {
        Preference::ChosenRejected { chosen, rejected } => (chosen, rejected),
        Preference::Rated {
            response_1,
            response_2,
            truth,
        } => {
            if truth.prefers_first() {
                (response_1, response_2)
            } else {
                (response_2, response_1)
            }
        }
    };
    let prompt = chat::render_prompt(&row.prompt);
    let encode = |response: &str| {
        tokenizer
            .encode(&format!("{prompt}{response}{}", chat::END_OF_TURN))
            .map_err(|e| RunError::Invalid(format!("tokenizing a preference pair: {e}")))
    };
    Ok(PreferencePair {
        chosen: encode(chosen)?,
        rejected: encode(rejected)?,
    })
}
