//! The environment contract: what every environment, built-in or user-written, implements.

use serde::{Deserialize, Serialize};

use crate::chat::{Message, parse_completion};
use crate::error::EnvError;
use crate::task::{Score, Split, Task};

/// The broad kind of skill an environment trains, used for per-batch domain ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Exact-answer mathematics.
    Math,
    /// Retrieval and reasoning over long inputs.
    LongContext,
    /// Deductive puzzles.
    Logic,
    /// Question answering.
    Knowledge,
    /// Following verifiable formatting and content constraints.
    InstructionFollowing,
    /// Producing machine-readable output.
    StructuredOutput,
    /// Calling tools, possibly over several turns.
    ToolUse,
    /// Scheduling and planning under constraints.
    Planning,
    /// Refusing what should be refused, and only that.
    Safety,
    /// Playing a game against an opponent.
    Game,
    /// Writing or reading code; model-written code runs in the [`crate::sandbox`].
    Code,
    /// Querying data (text-to-SQL).
    Data,
    /// Software engineering: reading, searching and fixing a code base.
    Software,
    /// Open-ended chat judged by a reward model (RLHF).
    Rlhf,
}

/// Whether an episode is one completion or several turns of actions and observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Turns {
    /// One prompt, one completion, one score.
    Single,
    /// Actions and observations alternate through [`Environment::step`] until the episode ends.
    Multi,
}

/// How an environment describes itself (also the row of `chorus env list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvInfo {
    /// Unique name, the registry key.
    pub name: String,
    /// Kind of skill.
    pub category: Category,
    /// Single- or multi-turn.
    pub turns: Turns,
    /// Most actions an episode can take (1 for single-turn environments).
    pub max_turns: u32,
    /// Default sampling weight in a blend of environments.
    pub default_weight: f64,
    /// Highest meaningful difficulty; higher levels behave like this one.
    pub max_difficulty: u32,
    /// One-line description.
    pub description: String,
}

/// A multi-turn episode in progress. Serialisable so it can live on the far side of a wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// The task being played.
    pub task_id: String,
    /// The conversation so far: the prompt, then alternating actions and observations.
    pub messages: Vec<Message>,
    /// How many actions have been taken.
    pub turn: u32,
    /// Whether the episode has ended.
    pub done: bool,
    /// The environment's own state between steps (board, tool history…).
    pub state: serde_json::Value,
}

impl Episode {
    /// A fresh episode on `task`, its conversation the task's prompt.
    pub fn new(task: &Task, state: serde_json::Value) -> Self {
        Self {
            task_id: task.id.clone(),
            messages: task.prompt.clone(),
            turn: 0,
            done: false,
            state,
        }
    }
}

/// What one step returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    /// The environment's reply (a tool result, the opponent's move); `None` when it ends silently.
    pub observation: Option<Message>,
    /// Whether the episode has ended.
    pub done: bool,
    /// The final score, present exactly when `done`.
    pub score: Option<Score>,
}

/// A verifiable environment.
///
/// Implementations must be deterministic: the same `(seed, split, difficulty)` always gives the
/// same task, and train and heldout tasks never share content. Scoring must never panic on
/// malformed model output; garbage scores 0 with a reason. Errors are reserved for problems with
/// the task itself (wrong environment, corrupt verification data).
///
/// Single-turn environments implement `info`, `sample`, `score` and `reference`; the default
/// `start`/`step` make them one-step episodes. Multi-turn environments override `start`, `step`
/// and `reference_action`.
pub trait Environment: Send + Sync {
    /// Who this environment is.
    fn info(&self) -> EnvInfo;

    /// Samples a task deterministically from `seed` in `split` at `difficulty`.
    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError>;

    /// Scores a completion (the text generated after the assistant header, think block
    /// included). For a multi-turn environment this scores a final answer.
    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError>;

    /// A completion that earns the full reward: for SFT warm-up and for testing the verifier.
    /// For a multi-turn environment, the reference first action.
    fn reference(&self, task: &Task) -> Result<String, EnvError>;

    /// Completions that must not earn the full reward (used by the self-check, beside generic
    /// garbage). Default: none beyond the generic ones.
    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        Ok(Vec::new())
    }

    /// Starts an episode.
    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        self.check_task(task)?;
        Ok(Episode::new(task, serde_json::Value::Null))
    }

    /// Advances an episode with the model's `action`. The default ends the episode at once,
    /// scoring the action as the completion.
    fn step(
        &self,
        task: &Task,
        episode: &mut Episode,
        action: &str,
    ) -> Result<StepOutcome, EnvError> {
        step_once(self, task, episode, action)
    }

    /// The reference policy's next action in an episode. Default: the reference completion.
    fn reference_action(&self, task: &Task, episode: &Episode) -> Result<String, EnvError> {
        let _ = episode;
        self.reference(task)
    }

    /// Scores a finished group's completions together, for rewards that compare a prompt's
    /// completions with one another (a generative judge's pairwise verdicts, see
    /// [`crate::preference::aggregate_scores`]): given the completions of one task and the
    /// score [`Environment::score`] gave each alone, the group's scores, one per completion in
    /// the same order. `None` (the default) keeps each completion's own score. The scheduler
    /// asks once per training group, after its rollouts are scored and before advantages are
    /// computed, passing only the rollouts that scored; held-out evaluation never asks.
    fn score_group(
        &self,
        task: &Task,
        completions: &[String],
        scores: &[Score],
    ) -> Result<Option<Vec<Score>>, EnvError> {
        let _ = (task, completions, scores);
        Ok(None)
    }

    /// Whether `score` is the best this environment gives, the task solved. Default:
    /// [`Score::is_full`] (reward 1.0). An environment with a signed reward whose best is not 1.0
    /// overrides it (the GenRM reward is 0 for a perfect judgement, see
    /// [`crate::preference::GenRm`]); the self-check asks this of references and wrong
    /// completions.
    fn is_solved(&self, score: &Score) -> bool {
        score.is_full()
    }

    /// Fails unless `task` was made by this environment.
    fn check_task(&self, task: &Task) -> Result<(), EnvError> {
        let name = self.info().name;
        if task.env == name {
            Ok(())
        } else {
            Err(EnvError::WrongEnvironment {
                env: name,
                task_env: task.env.clone(),
                task_id: task.id.clone(),
            })
        }
    }
}

/// A one-step episode's step: scores `action` as the completion and ends the episode (the
/// default [`Environment::step`], and what an environment that is single-turn only in some
/// configurations falls back to).
pub(crate) fn step_once<E: Environment + ?Sized>(
    env: &E,
    task: &Task,
    episode: &mut Episode,
    action: &str,
) -> Result<StepOutcome, EnvError> {
    if episode.done {
        return Err(EnvError::EpisodeFinished {
            task_id: task.id.clone(),
        });
    }
    let score = env.score(task, action)?;
    episode.messages.push(Message::assistant(action));
    episode.turn += 1;
    episode.done = true;
    Ok(StepOutcome {
        observation: None,
        done: true,
        score: Some(score),
    })
}

/// The response of a completion, or the zero score to return when there is none (an empty
/// answer or an unterminated think block). Saves every scorer repeating the same guard.
pub(crate) fn response_or_zero(completion: &str) -> Result<String, Score> {
    let parsed = parse_completion(completion);
    if parsed.unterminated_think {
        return Err(
            Score::zero("the <think> block is never closed, so there is no answer")
                .with_component("format", 0.0),
        );
    }
    if parsed.response.is_empty() {
        return Err(Score::zero("empty response").with_component("format", 0.0));
    }
    Ok(parsed.response)
}
