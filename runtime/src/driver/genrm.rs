//! A `reward_model` stage with `rm = "genrm"`: a generative judge trained from the current
//! policy, as in Nemotron 3. The judge reads a conversation and two responses
//! ([`genrm_prompt`]), may think, and ends with `[[score_1, score_2, ranking]]`; it is trained
//! with on-policy RL (the stage's objective, GRPO by default) on the reward [`genrm_reward`]
//! (`-10` malformed, else minus the distance to the truth; a chosen/rejected row's truth is
//! `[[5, 1, 1]]` or `[[1, 5, 6]]` by the order it is shown in, drawn per step and row).
//!
//! The pairs are the Bradley–Terry stage's ([`preference_rows`]: the user's `data` and
//! `pairs_from` environments). Each step draws `prompts_per_step` training rows, samples
//! `group_size` verdicts per row at the stage's sampling settings (`max_new_tokens` each) with
//! an engine built from the judge's current weights, turns the rewards into group-relative
//! advantages with the stage's shaping ([`group_advantages`]; a group whose verdicts all score
//! the same carries no signal and is left out) and takes one learner step
//! ([`Trainer::rl_step`]). Everything runs in this process, synchronously, like the
//! Bradley–Terry stage: the judge is a second model the workers never serve.
//!
//! The metric is held-out pair accuracy: on each held-out row, shown in one seeded order, the
//! greedy verdict's ranking prefers the right response (a malformed verdict counts as wrong),
//! before training and after. The judge is saved as the stage's checkpoint in the policy's HF
//! layout with the run's `tokenizer.json` (so `chorus generate --checkpoint` loads it, and an
//! `rlhf` stage judges with it, see [`crate::judge::GenRmJudge`]). The policy being
//! post-trained is not changed: the next stage starts from the same version.
//!
//! A judge prompt holds the conversation and both responses, so `max_prompt_tokens` does not
//! cut it (with the byte-level tokenizer the instructions alone are several hundred tokens).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chorus_environments::chat;
use chorus_environments::preference::{
    Judgement, PreferenceRow, genrm_prompt, genrm_reward, parse_judgement,
};
use chorus_environments::stable_hash;
use chorus_learner::{LearnerConfig, LrSchedule, RlSequence, Trainer};
use chorus_model::engine::{Engine, Generation, GenerationRequest};
use chorus_model::sampling::SamplingParams;
use chorus_model::tokenizer::Tokenizer;
use chorus_model::{NemotronHConfig, Params, checkpoint};
use chorus_orchestrator::advantage::{Scored, group_advantages};
use chorus_orchestrator::config::{RewardModelSpec, Stage};
use chorus_orchestrator::scheduler::StageContext;
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};

use super::reward_model::{
    RowSources, Trained, begin_training, finish_stage, mean, preference_rows,
};
use super::stages::StageOutputs;
use crate::error::{Result, RunError};
use crate::judge::stop_tokens;
use crate::plan::RunPlan;
use crate::summary::StageSummary;

/// Sequences the judge's engine advances together.
const MAX_BATCH: usize = 64;

/// Runs genrm stage `ctx.stage_index` (`spec` says what it trains on) and returns its summary.
pub(crate) async fn run_genrm_stage(
    plan: &RunPlan,
    stage: &Stage,
    spec: &RewardModelSpec,
    ctx: &Arc<StageContext>,
    outputs: &StageOutputs<'_>,
) -> Result<StageSummary> {
    let i = ctx.stage_index;
    let begun = begin_training(stage, ctx, outputs, "a generative reward model (GenRM)", {
        let rows = plan.preferences.get(&i).cloned();
        let (spec, seed) = (spec.clone(), ctx.seed);
        move || preference_rows(&spec, rows.as_deref().map(Vec::as_slice), seed)
    })
    .await?;
    let setup = Setup {
        stage: stage.clone(),
        model: plan.model.clone(),
        learner: plan.learner.clone(),
        tokenizer: plan.tokenizer.clone(),
        seed: ctx.seed ^ ((i as u64) << 48),
    };
    let trained = {
        let checkpoint = begun.start.checkpoint.clone();
        let (train, heldout, params) = (begun.train, begun.heldout, begun.params);
        tokio::task::spawn_blocking(move || setup.train(params, &train, &heldout, &checkpoint))
            .await
            .map_err(|source| RunError::Task {
                what: "training the GenRM",
                source,
            })?
    };
    finish_stage(stage, ctx, outputs, begun.start, trained).await
}

/// What training a judge needs from the plan.
struct Setup {
    stage: Stage,
    model: NemotronHConfig,
    learner: LearnerConfig,
    tokenizer: Arc<Tokenizer>,
    seed: u64,
}

/// One judge prompt: a row's two responses in a drawn order, tokenized, with the truth for that
/// order.
struct JudgeTask {
    prompt: Vec<u32>,
    truth: Judgement,
}

/// What one step's verdicts were like.
#[derive(Default)]
struct StepStats {
    verdicts: usize,
    reward: f64,
    well_formed: usize,
    pair_correct: usize,
    without_signal: usize,
}

impl Setup {
    /// Trains the judge from `params` on `train`, measures it on `heldout` before and after,
    /// and saves it to `checkpoint`.
    fn train(
        &self,
        params: Params,
        train: &RowSources,
        heldout: &RowSources,
        checkpoint: &Path,
    ) -> Result<Trained> {
        let stage = &self.stage;
        let objective = stage.objective.clone().ok_or_else(|| {
            RunError::Invalid(format!(
                "stage {}: a genrm stage trains with an RL objective and has none",
                stage.name
            ))
        })?;
        let config = LearnerConfig {
            objective: objective.clone(),
            // The stage's rate is set per step (`set_peak_lr`), so the schedule stays flat.
            schedule: LrSchedule {
                peak_lr: stage.lr,
                ..Default::default()
            },
            nvfp4_forward: None,
            ..self.learner.clone()
        };
        let mut trainer = Trainer::new(self.model.clone(), params, config)?;
        trainer.enter_stage(0, objective.kl_coef > 0.0)?;
        let heldout = heldout
            .iter()
            .map(|(source, rows)| {
                let tasks = rows
                    .iter()
                    .map(|row| self.judge_task(row, self.seed))
                    .collect::<Result<Vec<_>>>()?;
                Ok((source.clone(), tasks))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let start = self.accuracies(&self.engine(&trainer)?, &heldout)?;
        tracing::info!(
            "GenRM before training: held-out pair accuracy {:.3}",
            mean(&start)
        );
        let rows: Vec<&PreferenceRow> = train.values().flatten().collect();
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut order: Vec<usize> = vec![];
        let (mut reached, mut steps) = (None, 0);
        for step in 0..stage.steps {
            if let Some(until) = &stage.until
                && step > 0
                && step.is_multiple_of(until.every)
            {
                let acc = mean(&self.accuracies(&self.engine(&trainer)?, &heldout)?);
                tracing::info!(step, "GenRM: held-out pair accuracy {acc:.3}");
                if acc >= until.at_least {
                    reached = Some(step);
                    break;
                }
            }
            let mut tasks = Vec::with_capacity(stage.prompts_per_step);
            for k in 0..stage.prompts_per_step {
                if order.is_empty() {
                    order = (0..rows.len()).collect();
                    order.shuffle(&mut rng);
                }
                let row = rows[order.pop().expect("refilled")];
                // A fresh order per step and slot: a judge cannot learn a position.
                let seed = self.seed ^ stable_hash(format!("genrm:{step}:{k}").as_bytes());
                tasks.push(self.judge_task(row, seed)?);
            }
            let (batch, stats) = self.rollouts(&self.engine(&trainer)?, &tasks, step)?;
            steps = step + 1;
            let report = if batch.is_empty() {
                None
            } else {
                trainer.set_peak_lr(Some(stage.lr_at(step)));
                Some(trainer.rl_step(&batch)?)
            };
            if step % 10 == 0 || step + 1 == stage.steps {
                let n = stats.verdicts.max(1) as f64;
                tracing::info!(
                    step = step + 1,
                    reward = stats.reward / n,
                    "GenRM step {}/{}: mean reward {:.2}, well-formed {:.2}, right pair {:.2}, \
                     {} of {} groups without signal{}",
                    step + 1,
                    stage.steps,
                    stats.reward / n,
                    stats.well_formed as f64 / n,
                    stats.pair_correct as f64 / n,
                    stats.without_signal,
                    tasks.len(),
                    match &report {
                        None => " (no update)".to_string(),
                        Some(r) => format!(
                            ", loss {:.4}{}",
                            r.stats.loss,
                            r.skipped
                                .as_deref()
                                .map(|s| format!(" (skipped: {s})"))
                                .unwrap_or_default()
                        ),
                    }
                );
            }
        }
        let end = self.accuracies(&self.engine(&trainer)?, &heldout)?;
        checkpoint::save_checkpoint(checkpoint, &self.model, trainer.params(), None)?;
        checkpoint::save_tokenizer_files(checkpoint, &self.model, &self.tokenizer)?;
        Ok(Trained {
            start,
            end,
            steps: reached.unwrap_or(steps),
            reached: reached.is_some(),
        })
    }

    /// An engine over the judge's current weights.
    fn engine(&self, trainer: &Trainer) -> Result<Engine> {
        Ok(Engine::from_params(&self.model, trainer.params())?)
    }

    /// `row` shown in the order `seed` draws, as the judge reads it.
    fn judge_task(&self, row: &PreferenceRow, seed: u64) -> Result<JudgeTask> {
        let shown = row.present(seed);
        let messages = genrm_prompt(&row.prompt, &shown.first, &shown.second);
        let prompt = self
            .tokenizer
            .encode(&chat::render_prompt(&messages))
            .map_err(|e| RunError::Invalid(format!("tokenizing a GenRM prompt: {e}")))?;
        Ok(JudgeTask {
            prompt,
            truth: shown.truth,
        })
    }

    fn decode(&self, generation: &Generation) -> Result<String> {
        self.tokenizer
            .decode(&generation.tokens, false)
            .map_err(|e| RunError::Invalid(format!("decoding a verdict: {e}")))
    }

    /// `group_size` sampled verdicts per task, scored, as the learner's sequences (groups
    /// without signal left out).
    fn rollouts(
        &self,
        engine: &Engine,
        tasks: &[JudgeTask],
        step: u64,
    ) -> Result<(Vec<RlSequence>, StepStats)> {
        let stage = &self.stage;
        let sampling = SamplingParams {
            temperature: stage.temperature,
            top_p: stage.top_p,
            top_k: stage.top_k,
            think_budget: None,
        };
        let stop = stop_tokens(&self.tokenizer);
        let requests: Vec<GenerationRequest> = tasks
            .iter()
            .enumerate()
            .flat_map(|(k, task)| (0..stage.group_size).map(move |m| (k, m, task)))
            .map(|(k, m, task)| GenerationRequest {
                prompt: task.prompt.clone(),
                max_new_tokens: stage.max_new_tokens,
                sampling: sampling.clone(),
                seed: self.seed ^ stable_hash(format!("genrm:{step}:{k}:{m}").as_bytes()),
                stop_tokens: stop.clone(),
            })
            .collect();
        let generations = engine.generate_batch(&requests, MAX_BATCH)?;
        let think_close = self.tokenizer.token_id(chat::THINK_CLOSE);
        let mut stats = StepStats::default();
        let mut batch = vec![];
        for (task, group) in tasks.iter().zip(generations.chunks(stage.group_size)) {
            let mut scored = Vec::with_capacity(group.len());
            for generation in group {
                let text = self.decode(generation)?;
                let score = genrm_reward(&text, task.truth);
                stats.verdicts += 1;
                stats.reward += score.reward;
                stats.well_formed += usize::from(score.component("format") == Some(1.0));
                stats.pair_correct += usize::from(score.component("pair_correct") == Some(1.0));
                let reasoning = think_close
                    .and_then(|close| generation.tokens.iter().position(|&t| t == close))
                    .map_or(0, |at| at + 1);
                scored.push(Scored {
                    reward: score.reward,
                    invalid: chat::malformed_think(&text).is_some(),
                    answer_tokens: generation.tokens.len() - reasoning,
                    reasoning_tokens: reasoning,
                });
            }
            let Some(advantages) = group_advantages(&scored, &stage.advantage) else {
                stats.without_signal += 1;
                continue;
            };
            for (generation, advantage) in group.iter().zip(advantages) {
                batch.push(RlSequence {
                    tokens: [task.prompt.as_slice(), &generation.tokens].concat(),
                    prompt_len: task.prompt.len(),
                    behavior_logprobs: generation.logprobs.clone(),
                    advantage: advantage as f32,
                    ref_logprobs: None,
                    loss_mask: None,
                });
            }
        }
        Ok((batch, stats))
    }

    /// Held-out pair accuracy of `engine`'s greedy verdicts per source (with the pair count).
    fn accuracies(
        &self,
        engine: &Engine,
        heldout: &BTreeMap<String, Vec<JudgeTask>>,
    ) -> Result<BTreeMap<String, (f64, usize)>> {
        let stop = stop_tokens(&self.tokenizer);
        let mut out = BTreeMap::new();
        for (source, tasks) in heldout {
            let requests: Vec<GenerationRequest> = tasks
                .iter()
                .map(|task| GenerationRequest {
                    prompt: task.prompt.clone(),
                    max_new_tokens: self.stage.max_new_tokens,
                    sampling: SamplingParams::greedy(),
                    seed: 0,
                    stop_tokens: stop.clone(),
                })
                .collect();
            let generations = engine.generate_batch(&requests, MAX_BATCH)?;
            let mut right = 0usize;
            for (task, generation) in tasks.iter().zip(&generations) {
                right += usize::from(pair_correct(&self.decode(generation)?, task.truth));
            }
            out.insert(
                source.clone(),
                (right as f64 / tasks.len().max(1) as f64, tasks.len()),
            );
        }
        Ok(out)
    }
}

/// Whether a verdict prefers the response `truth` prefers; a malformed one never does.
fn pair_correct(verdict: &str, truth: Judgement) -> bool {
    parse_judgement(verdict).is_ok_and(|v| v.prefers_first() == truth.prefers_first())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_or_reversed_verdict_is_a_wrong_pair() {
        assert!(pair_correct(
            "<think>a</think>[[5, 1, 2]]",
            Judgement::CHOSEN_FIRST
        ));
        assert!(pair_correct("[[3, 3, 4]]", Judgement::CHOSEN_SECOND));
        assert!(!pair_correct("[[1, 5, 6]]", Judgement::CHOSEN_FIRST));
        assert!(!pair_correct("[[5, 1]]", Judgement::CHOSEN_FIRST));
        assert!(!pair_correct("<think>[[5, 1, 1]]", Judgement::CHOSEN_FIRST));
    }
}
