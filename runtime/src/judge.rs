//! An `rlhf` stage's environments: each of the stage's environments with its reward replaced by
//! a trained reward model's score of the completion. The environment still gives the prompts,
//! and its verifier still runs: its reward is kept as the score component `verifier`, and a
//! completion counts as solved when the verifier says so, so the held-out accuracy of an RLHF'd
//! policy stays measurable beside its reward-model score.

use std::sync::Arc;

use chorus_environments::{
    EnvError, EnvInfo, Environment, Episode, Score, Split, StepOutcome, Task, chat,
};
use chorus_learner::RewardModel;
use chorus_model::tokenizer::Tokenizer;

/// The score component holding the environment's own reward.
pub const VERIFIER: &str = "verifier";
/// The score component that is 1 when the environment's verifier counts the completion solved.
pub const VERIFIED: &str = "verified";

/// `inner` judged by `model`, registered as `<inner>@<judge>`.
pub struct RewardModelJudge {
    inner: Arc<dyn Environment>,
    model: Arc<RewardModel>,
    tokenizer: Arc<Tokenizer>,
    name: String,
}

impl RewardModelJudge {
    /// `inner` judged by `model` (trained by stage `judge`), reading text with `tokenizer`.
    pub fn new(
        inner: Arc<dyn Environment>,
        model: Arc<RewardModel>,
        tokenizer: Arc<Tokenizer>,
        judge: &str,
    ) -> Self {
        let name = judged_name(&inner.info().name, judge);
        Self {
            inner,
            model,
            tokenizer,
            name,
        }
    }

    /// The task as the inner environment made it.
    fn inner_task(&self, task: &Task) -> Task {
        Task {
            env: self.inner.info().name,
            ..task.clone()
        }
    }

    /// The reward model's score of `completion`'s response after the task's prompt, read as the
    /// model was trained: the rendered prompt, the response, the end of the turn.
    fn judge(&self, task: &Task, completion: &str) -> Result<f64, EnvError> {
        let response = chat::parse_completion(completion).response;
        let text = format!(
            "{}{response}{}",
            chat::render_prompt(&task.prompt),
            chat::END_OF_TURN
        );
        let ids = self
            .tokenizer
            .encode(&text)
            .map_err(|e| EnvError::InvalidConfig {
                env: self.name.clone(),
                message: format!("tokenizing a completion for the reward model: {e}"),
            })?;
        let scores = self
            .model
            .score(&[ids])
            .map_err(|e| EnvError::InvalidConfig {
                env: self.name.clone(),
                message: format!("the reward model: {e}"),
            })?;
        Ok(f64::from(scores[0]))
    }
}

/// The name an environment judged by a reward-model stage is registered under.
pub fn judged_name(env: &str, judge: &str) -> String {
    format!("{env}@{judge}")
}

impl Environment for RewardModelJudge {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: self.name.clone(),
            ..self.inner.info()
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let task = self.inner.sample(seed, split, difficulty)?;
        Ok(Task {
            env: self.name.clone(),
            ..task
        })
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let verified = self.inner.score(&self.inner_task(task), completion)?;
        let solved = self.inner.is_solved(&verified);
        let reward = self.judge(task, completion)?;
        Ok(Score {
            reward,
            components: vec![],
            reason: format!(
                "reward model {reward:.4}; verifier {} ({})",
                verified.reward, verified.reason
            ),
        }
        .with_component(VERIFIER, verified.reward)
        .with_component(VERIFIED, f64::from(u8::from(solved))))
    }

    fn is_solved(&self, score: &Score) -> bool {
        score.component(VERIFIED) == Some(1.0)
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        self.inner.reference(&self.inner_task(task))
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        self.inner.wrong_completions(&self.inner_task(task))
    }

    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        self.check_task(task)?;
        self.inner.start(&self.inner_task(task))
    }

    fn step(
        &self,
        task: &Task,
        episode: &mut Episode,
        action: &str,
    ) -> Result<StepOutcome, EnvError> {
        self.check_task(task)?;
        let mut outcome = self.inner.step(&self.inner_task(task), episode, action)?;
        // A finished episode is judged on its final answer.
        if let Some(verified) = outcome.score.take() {
            let solved = self.inner.is_solved(&verified);
            let reward = self.judge(task, action)?;
            outcome.score = Some(
                Score {
                    reward,
                    components: vec![],
                    reason: format!("reward model {reward:.4}; verifier {}", verified.reward),
                }
                .with_component(VERIFIER, verified.reward)
                .with_component(VERIFIED, f64::from(u8::from(solved))),
            );
        }
        Ok(outcome)
    }

    fn reference_action(&self, task: &Task, episode: &Episode) -> Result<String, EnvError> {
        self.inner.reference_action(&self.inner_task(task), episode)
    }
}
