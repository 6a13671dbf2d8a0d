//! A pass-rate curriculum for RL stages (`curriculum = "pass_rate"`): before its first step the
//! stage estimates each candidate prompt's pass rate under the policy it starts from, drops the
//! prompts that policy always solves (they carry no signal), and then draws from easy to hard as
//! training proceeds: at progress `p` through the stage, uniformly from a window of a quarter of
//! the ranked candidates that slides from the easiest end to the hardest.

use std::collections::BTreeMap;
use std::sync::Arc;

use chorus_environments::{Split as EnvSplit, Task, Turns, chat};
use chorus_proto::v1::SamplingParams;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::config::{CurriculumSettings, Stage};
use crate::scheduler::{
    BoxFuture, Drawn, Member, Rollout, SchedulerError, StageContext, futures_join, pick, play,
    stop_tokens, think_budget, turn_limit,
};

/// One candidate prompt and its estimated pass rate.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The task.
    pub task: Arc<Task>,
    /// Fraction of the estimate's samples that earned the full reward.
    pub pass_rate: f64,
}

/// A stage's candidates per environment, easiest first.
#[derive(Debug, Default)]
pub struct Curriculum {
    ranked: BTreeMap<String, Vec<Candidate>>,
    /// Candidates estimated.
    pub estimated: usize,
    /// Candidates dropped because every sample solved them.
    pub always_solved: usize,
}

impl Curriculum {
    /// Estimates the pass rates of `settings.pool` candidates drawn by the stage's weights, with
    /// `settings.samples` completions each from policy `version`, sampled as the stage samples.
    pub async fn estimate(
        ctx: &Arc<StageContext>,
        stage: &Stage,
        settings: &CurriculumSettings,
        version: u64,
    ) -> Result<Self, SchedulerError> {
        let stop = stop_tokens(&ctx.tokenizer);
        let budget = think_budget(&ctx.tokenizer, stage);
        let weights: Vec<f64> = stage.environments.iter().map(|e| e.weight).collect();
        let mut candidates = vec![];
        let mut rollouts = vec![];
        for i in 0..settings.pool {
            let seed = ctx.seed ^ ((ctx.stage_index as u64) << 56) ^ (0xC0FFEE << 24) ^ i as u64;
            let mut rng = StdRng::seed_from_u64(seed);
            let spec = &stage.environments[pick(&weights, &mut rng)];
            let env_name = spec.key().to_string();
            let env = ctx
                .registry
                .get(&env_name)
                .map_err(|e| SchedulerError::Environment {
                    name: env_name.clone(),
                    message: e.to_string(),
                })?;
            let (task_seed, difficulty) = (rng.random::<u64>(), spec.difficulty);
            let sampled = {
                let env = env.clone();
                ctx.faults
                    .call(&env_name, move || {
                        Ok((
                            env.sample(task_seed, EnvSplit::Train, difficulty)?,
                            env.info(),
                        ))
                    })
                    .await
            };
            // A candidate its environment cannot give is left out, as a training draw would be.
            let Ok((task, info)) = sampled else {
                continue;
            };
            let prompt_ids = ctx
                .tokenizer
                .encode(&chat::render_prompt(&task.prompt))
                .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
            if prompt_ids.len() > stage.max_prompt_tokens {
                continue;
            }
            let drawn = Arc::new(Drawn {
                seed,
                env_name: env_name.clone(),
                env,
                multi_turn: (info.turns == Turns::Multi).then_some(turn_limit(stage, &info)),
                task: Arc::new(task),
            });
            let prompt_ids = Arc::new(prompt_ids);
            for j in 0..settings.samples {
                let id = format!("{}:s{}:curriculum:{i}:r{j}", ctx.run_id, ctx.stage_index);
                let m = Member {
                    trajectory_id: id.clone(),
                    request_id: id,
                    prompt_id: format!("{}:s{}:curriculum:{i}", ctx.run_id, ctx.stage_index),
                    sampling: SamplingParams {
                        temperature: stage.temperature,
                        top_p: stage.top_p,
                        top_k: stage.top_k as u32,
                        seed: Some(seed.wrapping_mul(31).wrapping_add(j as u64)),
                        think_budget: budget,
                    },
                    max_new_tokens: stage.max_new_tokens,
                    max_context_tokens: stage.max_prompt_tokens,
                    stop: stop.clone(),
                    min_version: version,
                    exact_version: ctx.deterministic.then_some(version),
                };
                rollouts.push((
                    candidates.len(),
                    play(ctx.clone(), drawn.clone(), prompt_ids.clone(), m),
                ));
            }
            candidates.push(drawn);
        }
        tracing::info!(
            candidates = candidates.len(),
            samples = settings.samples,
            version,
            "curriculum: estimating the pass rates of {} prompts ({} samples each)",
            candidates.len(),
            settings.samples
        );
        let (owners, futures): (Vec<usize>, Vec<_>) = rollouts.into_iter().unzip();
        let results: Vec<Rollout> = futures_join(
            futures
                .into_iter()
                .map(|f| Box::pin(f) as BoxFuture<Rollout>)
                .collect(),
        )
        .await;
        let mut solved = vec![0usize; candidates.len()];
        let mut scored = vec![0usize; candidates.len()];
        for (owner, r) in owners.into_iter().zip(&results) {
            if let Ok(score) = &r.verdict {
                scored[owner] += 1;
                solved[owner] += usize::from(candidates[owner].env.is_solved(score));
            }
        }
        let mut curriculum = Self {
            estimated: candidates.len(),
            ..Self::default()
        };
        for ((drawn, solved), scored) in candidates.into_iter().zip(solved).zip(scored) {
            if scored == 0 {
                // Every sample failed to generate or score: no estimate, no candidate.
                continue;
            }
            let pass_rate = solved as f64 / scored as f64;
            if solved == scored {
                curriculum.always_solved += 1;
                continue;
            }
            curriculum
                .ranked
                .entry(drawn.env_name.clone())
                .or_default()
                .push(Candidate {
                    task: drawn.task.clone(),
                    pass_rate,
                });
        }
        for list in curriculum.ranked.values_mut() {
            // Stable: equal pass rates keep their draw order.
            list.sort_by(|a, b| b.pass_rate.total_cmp(&a.pass_rate));
        }
        tracing::info!(
            kept = curriculum.len(),
            always_solved = curriculum.always_solved,
            "curriculum: {} prompts kept, {} always solved and dropped",
            curriculum.len(),
            curriculum.always_solved
        );
        Ok(curriculum)
    }

    /// Candidates kept, over every environment.
    pub fn len(&self) -> usize {
        self.ranked.values().map(Vec::len).sum()
    }

    /// Whether no candidate was kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The candidates of `env`, easiest first.
    pub fn ranked(&self, env: &str) -> &[Candidate] {
        self.ranked.get(env).map_or(&[], Vec::as_slice)
    }

    /// A candidate of `env` for `progress` (0 at the stage's first step, 1 at its end): uniform
    /// in the window of a quarter of the ranking that starts at the easiest end and reaches the
    /// hardest at the end. `None` when `env` kept no candidate (the stage then samples it
    /// directly).
    pub fn draw(&self, env: &str, progress: f64, rng: &mut StdRng) -> Option<&Candidate> {
        let list = self.ranked(env);
        let n = list.len();
        if n == 0 {
            return None;
        }
        let window = n.div_ceil(4).max(1);
        let lo = ((n - window) as f64 * progress.clamp(0.0, 1.0)).round() as usize;
        Some(&list[lo + rng.random_range(0..window)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curriculum(rates: &[f64]) -> Curriculum {
        let task = |i: usize| {
            Arc::new(Task {
                id: format!("t{i}"),
                env: "e".into(),
                split: EnvSplit::Train,
                difficulty: 0,
                seed: i as u64,
                prompt: vec![],
                verification: serde_json::Value::Null,
            })
        };
        let mut list: Vec<Candidate> = rates
            .iter()
            .enumerate()
            .map(|(i, &pass_rate)| Candidate {
                task: task(i),
                pass_rate,
            })
            .collect();
        list.sort_by(|a, b| b.pass_rate.total_cmp(&a.pass_rate));
        Curriculum {
            ranked: [("e".to_string(), list)].into(),
            estimated: rates.len(),
            always_solved: 0,
        }
    }

    #[test]
    fn draws_slide_from_easy_to_hard() {
        let rates: Vec<f64> = (0..40).map(|i| f64::from(i) / 40.0).collect();
        let c = curriculum(&rates);
        let mut rng = StdRng::seed_from_u64(0);
        let mean = |progress: f64, rng: &mut StdRng| {
            (0..200)
                .map(|_| c.draw("e", progress, rng).unwrap().pass_rate)
                .sum::<f64>()
                / 200.0
        };
        let (start, middle, end) = (
            mean(0.0, &mut rng),
            mean(0.5, &mut rng),
            mean(1.0, &mut rng),
        );
        assert!(start > middle && middle > end, "{start} {middle} {end}");
        // The first window holds the easiest quarter, the last the hardest.
        for _ in 0..100 {
            assert!(c.draw("e", 0.0, &mut rng).unwrap().pass_rate >= 0.75);
            assert!(c.draw("e", 1.0, &mut rng).unwrap().pass_rate < 0.25);
        }
        assert!(c.draw("other", 0.5, &mut rng).is_none());
    }
}
