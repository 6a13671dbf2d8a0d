//! The self-check behind `chorus env check`: samples tasks from both splits and confirms that
//! sampling is deterministic and split-disjoint, that reference solutions earn the full reward
//! and that corrupted completions do not (full as the environment reads it,
//! [`Environment::is_solved`]).

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::{Deserialize, Serialize};

use crate::env::Environment;
use crate::error::EnvError;
use crate::task::{Score, Split, Task};

/// Completions no environment may fully reward.
const GENERIC_GARBAGE: [&str; 5] = [
    "",
    "<think>still thinking",
    "\u{fffd}\u{0}}{][ garbage ))(",
    "<|end|>",
    "</s>",
];

/// What to check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckOptions {
    /// Tasks sampled per split and difficulty.
    pub tasks_per_split: usize,
    /// Difficulties to sample; `None` = 0, the middle level and the maximum.
    pub difficulties: Option<Vec<u32>>,
    /// Seeds used are `base_seed .. base_seed + tasks_per_split`.
    pub base_seed: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            tasks_per_split: 8,
            difficulties: None,
            base_seed: 0,
        }
    }
}

/// What went wrong in one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Sampling returned an error.
    SampleFailed,
    /// The same seed gave two different tasks.
    NotDeterministic,
    /// The task names another environment or split than asked for.
    WrongLabels,
    /// The task does not survive a JSON round trip.
    NotSerialisable,
    /// A task's content appears in both splits.
    SplitOverlap,
    /// The reference solution (or reference policy) failed to run.
    ReferenceFailed,
    /// The reference solution did not earn the full reward ([`Environment::is_solved`]).
    ReferenceNotFull,
    /// A corrupted completion earned the full reward ([`Environment::is_solved`]).
    CorruptedScoredFull,
    /// Scoring returned an error or a non-finite reward for model output.
    ScoringFailed,
    /// Something panicked.
    Panicked,
}

/// One failed check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The task involved, if one was sampled.
    pub task_id: Option<String>,
    /// The split sampled.
    pub split: Split,
    /// The difficulty sampled.
    pub difficulty: u32,
    /// The seed sampled.
    pub seed: u64,
    /// Details.
    pub message: String,
}

/// Prompt sizes at one difficulty (tiny models need short prompts at low levels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptStats {
    /// The difficulty.
    pub difficulty: u32,
    /// Mean rendered prompt length in bytes.
    pub mean_prompt_bytes: f64,
    /// Longest rendered prompt in bytes.
    pub max_prompt_bytes: usize,
}

/// The outcome of checking one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The environment checked.
    pub env: String,
    /// True when there are no failures.
    pub passed: bool,
    /// Tasks sampled successfully.
    pub tasks_checked: usize,
    /// Difficulties sampled.
    pub difficulties: Vec<u32>,
    /// Prompt sizes per difficulty.
    pub prompt_stats: Vec<PromptStats>,
    /// Every failure found.
    pub failures: Vec<CheckFailure>,
}

fn guarded<T>(what: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(what)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".to_string())
    })
}

/// Plays the reference policy through an episode and returns its final score; fails if the
/// episode outlasts the environment's `max_turns`.
pub fn run_reference_episode(env: &dyn Environment, task: &Task) -> Result<Score, EnvError> {
    let max_turns = env.info().max_turns.max(1);
    let mut episode = env.start(task)?;
    while episode.turn < max_turns {
        let action = env.reference_action(task, &episode)?;
        let outcome = env.step(task, &mut episode, &action)?;
        if outcome.done {
            return outcome.score.ok_or_else(|| EnvError::BadEpisodeState {
                task_id: task.id.clone(),
                message: "episode ended without a score".to_string(),
            });
        }
    }
    Err(EnvError::BadEpisodeState {
        task_id: task.id.clone(),
        message: format!("reference policy did not finish within {max_turns} turns"),
    })
}

struct Checker<'a> {
    env: &'a dyn Environment,
    failures: Vec<CheckFailure>,
}

impl Checker<'_> {
    fn fail(
        &mut self,
        kind: FailureKind,
        task: Option<&Task>,
        at: (Split, u32, u64),
        message: String,
    ) {
        self.failures.push(CheckFailure {
            kind,
            task_id: task.map(|t| t.id.clone()),
            split: at.0,
            difficulty: at.1,
            seed: at.2,
            message,
        });
    }

    /// Samples and checks one task; returns it when sampling worked.
    fn check_one(&mut self, split: Split, difficulty: u32, seed: u64) -> Option<Task> {
        let at = (split, difficulty, seed);
        let env = self.env;
        let task = match guarded(|| env.sample(seed, split, difficulty)) {
            Err(panic) => {
                self.fail(FailureKind::Panicked, None, at, format!("sample: {panic}"));
                return None;
            }
            Ok(Err(err)) => {
                self.fail(FailureKind::SampleFailed, None, at, err.to_string());
                return None;
            }
            Ok(Ok(task)) => task,
        };
        match guarded(|| env.sample(seed, split, difficulty)) {
            Ok(Ok(again)) if again == task => {}
            _ => self.fail(
                FailureKind::NotDeterministic,
                Some(&task),
                at,
                "second sample differs".into(),
            ),
        }
        if task.env != env.info().name || task.split != split || task.difficulty != difficulty {
            let message = format!(
                "task says env {} split {} difficulty {}",
                task.env, task.split, task.difficulty
            );
            self.fail(FailureKind::WrongLabels, Some(&task), at, message);
        }
        let round_trip = serde_json::to_string(&task)
            .ok()
            .and_then(|s| serde_json::from_str::<Task>(&s).ok());
        if round_trip.as_ref() != Some(&task) {
            self.fail(
                FailureKind::NotSerialisable,
                Some(&task),
                at,
                "JSON round trip changed the task".into(),
            );
        }
        match guarded(|| run_reference_episode(env, &task)) {
            Err(panic) => self.fail(
                FailureKind::Panicked,
                Some(&task),
                at,
                format!("reference: {panic}"),
            ),
            Ok(Err(err)) => self.fail(
                FailureKind::ReferenceFailed,
                Some(&task),
                at,
                err.to_string(),
            ),
            Ok(Ok(score)) if !env.is_solved(&score) => {
                let message = format!("reward {} ({})", score.reward, score.reason);
                self.fail(FailureKind::ReferenceNotFull, Some(&task), at, message);
            }
            Ok(Ok(_)) => {}
        }
        let mut corrupted: Vec<String> = GENERIC_GARBAGE.iter().map(|s| s.to_string()).collect();
        match guarded(|| env.wrong_completions(&task)) {
            Ok(Ok(wrong)) => corrupted.extend(wrong),
            Ok(Err(err)) => self.fail(
                FailureKind::ReferenceFailed,
                Some(&task),
                at,
                format!("wrong_completions: {err}"),
            ),
            Err(panic) => self.fail(
                FailureKind::Panicked,
                Some(&task),
                at,
                format!("wrong_completions: {panic}"),
            ),
        }
        for completion in &corrupted {
            match guarded(|| env.score(&task, completion)) {
                Err(panic) => self.fail(
                    FailureKind::Panicked,
                    Some(&task),
                    at,
                    format!("score {completion:?}: {panic}"),
                ),
                Ok(Err(err)) => self.fail(
                    FailureKind::ScoringFailed,
                    Some(&task),
                    at,
                    format!("score {completion:?}: {err}"),
                ),
                Ok(Ok(score)) if !score.reward.is_finite() => self.fail(
                    FailureKind::ScoringFailed,
                    Some(&task),
                    at,
                    format!("non-finite reward for {completion:?}"),
                ),
                Ok(Ok(score)) if env.is_solved(&score) => self.fail(
                    FailureKind::CorruptedScoredFull,
                    Some(&task),
                    at,
                    format!("{completion:?} scored full: {}", score.reason),
                ),
                Ok(Ok(_)) => {}
            }
        }
        Some(task)
    }
}

/// Checks every environment in `registry`, in name order (`chorus env check --all`).
pub fn check_all(registry: &crate::Registry, options: &CheckOptions) -> Vec<CheckReport> {
    registry
        .iter()
        .map(|env| check_environment(env.as_ref(), options))
        .collect()
}

/// Runs every check on `env` and reports the failures; never panics.
pub fn check_environment(env: &dyn Environment, options: &CheckOptions) -> CheckReport {
    let info = env.info();
    let difficulties = options.difficulties.clone().unwrap_or_else(|| {
        let levels: BTreeSet<u32> = [0, info.max_difficulty / 2, info.max_difficulty].into();
        levels.into_iter().collect()
    });
    let mut checker = Checker {
        env,
        failures: Vec::new(),
    };
    let mut tasks_checked = 0;
    let mut prompt_stats = Vec::new();
    for &difficulty in &difficulties {
        let mut prompts_by_split: Vec<(Split, BTreeSet<String>)> = Vec::new();
        let mut prompt_bytes = Vec::new();
        for split in Split::ALL {
            let mut prompts = BTreeSet::new();
            for offset in 0..options.tasks_per_split as u64 {
                let seed = options.base_seed.wrapping_add(offset);
                if let Some(task) = checker.check_one(split, difficulty, seed) {
                    tasks_checked += 1;
                    let text = task.prompt_text();
                    prompt_bytes.push(text.len());
                    prompts.insert(text);
                }
            }
            prompts_by_split.push((split, prompts));
        }
        if let [(_, train), (_, heldout)] = prompts_by_split.as_slice() {
            for shared in train.intersection(heldout) {
                let message = format!("prompt in both splits: {shared:?}");
                checker.fail(
                    FailureKind::SplitOverlap,
                    None,
                    (Split::Heldout, difficulty, options.base_seed),
                    message,
                );
            }
        }
        if !prompt_bytes.is_empty() {
            prompt_stats.push(PromptStats {
                difficulty,
                mean_prompt_bytes: prompt_bytes.iter().sum::<usize>() as f64
                    / prompt_bytes.len() as f64,
                max_prompt_bytes: prompt_bytes.iter().copied().max().unwrap_or(0),
            });
        }
    }
    CheckReport {
        env: info.name,
        passed: checker.failures.is_empty(),
        tasks_checked,
        difficulties,
        prompt_stats,
        failures: checker.failures,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::chat::Message;
    use crate::env::{Category, EnvInfo, Turns};

    /// A tiny environment ("echo the number") whose faults can be switched on one at a time.
    #[derive(Default)]
    struct Faulty {
        nondeterministic: bool,
        same_content_in_both_splits: bool,
        wrong_reference: bool,
        accepts_anything: bool,
        panics_on_garbage: bool,
        calls: AtomicU64,
    }

    impl Environment for Faulty {
        fn info(&self) -> EnvInfo {
            EnvInfo {
                name: "faulty".into(),
                category: Category::Math,
                turns: Turns::Single,
                max_turns: 1,
                default_weight: 1.0,
                max_difficulty: 2,
                description: "test double".into(),
            }
        }

        fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
            let drift = if self.nondeterministic {
                self.calls.fetch_add(1, Ordering::Relaxed)
            } else {
                0
            };
            let split_offset = if self.same_content_in_both_splits || split == Split::Train {
                0
            } else {
                1_000
            };
            let number = seed + split_offset + drift;
            Ok(Task {
                id: format!("faulty-{split}-{number}"),
                env: "faulty".into(),
                split,
                difficulty,
                seed,
                prompt: vec![Message::user(format!("say {number}"))],
                verification: serde_json::json!(number),
            })
        }

        fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
            if self.panics_on_garbage && completion.contains("garbage") {
                panic!("scorer fell over");
            }
            let want: u64 = task.verification_as()?;
            Ok(Score::binary(
                self.accepts_anything || completion.trim() == want.to_string(),
                "echo",
            ))
        }

        fn reference(&self, task: &Task) -> Result<String, EnvError> {
            let want: u64 = task.verification_as()?;
            Ok(if self.wrong_reference {
                (want + 1).to_string()
            } else {
                want.to_string()
            })
        }
    }

    fn kinds(env: &Faulty) -> BTreeSet<String> {
        let options = CheckOptions {
            tasks_per_split: 3,
            difficulties: Some(vec![0]),
            base_seed: 0,
        };
        check_environment(env, &options)
            .failures
            .iter()
            .map(|f| format!("{:?}", f.kind))
            .collect()
    }

    #[test]
    fn a_sound_environment_passes_at_default_difficulties() {
        let report = check_environment(&Faulty::default(), &CheckOptions::default());
        assert!(report.passed, "{:#?}", report.failures);
        assert_eq!(report.difficulties, vec![0, 1, 2]);
        assert_eq!(report.tasks_checked, 2 * 8 * 3);
        assert_eq!(report.prompt_stats.len(), 3);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["passed"], true);
    }

    #[test]
    fn each_fault_is_reported() {
        let nondeterministic = Faulty {
            nondeterministic: true,
            ..Faulty::default()
        };
        assert!(kinds(&nondeterministic).contains("NotDeterministic"));
        let overlapping = Faulty {
            same_content_in_both_splits: true,
            ..Faulty::default()
        };
        assert_eq!(
            kinds(&overlapping),
            BTreeSet::from(["SplitOverlap".to_string()])
        );
        let wrong_reference = Faulty {
            wrong_reference: true,
            ..Faulty::default()
        };
        assert_eq!(
            kinds(&wrong_reference),
            BTreeSet::from(["ReferenceNotFull".to_string()])
        );
        let lax = Faulty {
            accepts_anything: true,
            ..Faulty::default()
        };
        assert_eq!(
            kinds(&lax),
            BTreeSet::from(["CorruptedScoredFull".to_string()])
        );
        let fragile = Faulty {
            panics_on_garbage: true,
            ..Faulty::default()
        };
        assert_eq!(kinds(&fragile), BTreeSet::from(["Panicked".to_string()]));
    }
}
