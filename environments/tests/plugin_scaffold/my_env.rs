//! `my_env`: a Chorus environment (made by `chorus env new my_env --lang rust`).
//!
//! It asks the model to repeat a word and gives reward 1 for exactly that word. Change
//! `sample`, `score` and `reference` into your task; keep sampling deterministic (the same
//! seed, split and difficulty give the same task) and never fail on bad model output (score 0
//! with a reason instead).
//!
//! Register it where the run builds its registry (`environment_registry` in
//! `src/cli/run.rs`), or in your own program:
//!
//! ```ignore
//! let mut registry = chorus_environments::builtin_registry();
//! registry.register(MyEnv)?;
//! ```
//!
//! then use `{ name = "my_env" }` in a run config. Or serve it to runs as a plugin:
//! `chorus_environments::plugin::serve_environment(Arc::new(MyEnv), "127.0.0.1:7100", token)`.

use chorus_environments::chat::{Message, parse_completion};
use chorus_environments::{
    Category, EnvError, EnvInfo, Environment, Score, Split, Task, Turns, split_of, stable_hash,
    task_rng,
};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The environment's name: the registry key and what run configs say.
pub const NAME: &str = "my_env";

const WORDS: &[&str] = &["cat", "dog", "sun", "sky", "tea", "owl", "map", "fig"];

/// What the verifier needs to know about a task; the model never sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Verification {
    word: String,
}

/// The `my_env` environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct MyEnv;

impl Environment for MyEnv {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.to_string(),
            category: Category::Knowledge,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: 2,
            description: "Repeat a word (or several); exact match".to_string(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let mut rng = task_rng(NAME, seed, difficulty);
        // Draw until the content falls in the requested split: the split is a hash of the
        // content, so train and heldout never share a task.
        for _ in 0..1000 {
            let count = 1 + difficulty.min(2) as usize;
            let word = (0..count)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ");
            if split_of(NAME, &word) != split {
                continue;
            }
            let verification =
                serde_json::to_value(Verification { word: word.clone() }).map_err(|source| {
                    EnvError::Serialize {
                        env: NAME.to_string(),
                        source,
                    }
                })?;
            return Ok(Task {
                id: format!(
                    "{NAME}-{split}-d{difficulty}-{:016x}",
                    stable_hash(word.as_bytes())
                ),
                env: NAME.to_string(),
                split,
                difficulty,
                seed,
                prompt: vec![Message::user(format!("Repeat: {word}"))],
                verification,
            });
        }
        Err(EnvError::SplitExhausted {
            env: NAME.to_string(),
            split,
            difficulty,
            seed,
            attempts: 1000,
        })
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let parsed = parse_completion(completion);
        if parsed.unterminated_think || parsed.response.is_empty() {
            return Ok(Score::zero("no answer"));
        }
        let correct = parsed.response == expected.word;
        Ok(Score::binary(
            correct,
            if correct {
                format!("repeated {:?}", expected.word)
            } else {
                format!("said {:?}, expected {:?}", parsed.response, expected.word)
            },
        ))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Ok(task.verification_as::<Verification>()?.word)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        let word = self.reference(task)?;
        Ok(vec![format!("{word} {word}"), word.to_uppercase()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_self_check() {
        let report = chorus_environments::check_environment(
            &MyEnv,
            &chorus_environments::CheckOptions::default(),
        );
        assert!(report.passed, "{:#?}", report.failures);
    }

    #[test]
    fn registers_under_its_name() {
        let mut registry = chorus_environments::Registry::new();
        registry.register(MyEnv).unwrap();
        assert_eq!(registry.get(NAME).unwrap().info().name, NAME);
    }
}
