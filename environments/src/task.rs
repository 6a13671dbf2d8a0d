//! Tasks (what the orchestrator samples, stores and ships) and scores (what a verifier returns).

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::chat::{Message, render_prompt};
use crate::error::EnvError;

/// Which side of the train/heldout partition a task comes from. The two are disjoint by task
/// content: a heldout task's content never appears in train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Tasks to train on.
    Train,
    /// Tasks kept for evaluation.
    Heldout,
}

impl Split {
    /// Both splits, train first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Heldout];

    /// The split's name: `train` or `heldout`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Heldout => "heldout",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = EnvError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Split::Train),
            "heldout" => Ok(Split::Heldout),
            other => Err(EnvError::UnknownSplit(other.to_string())),
        }
    }
}

/// One task: serialisable so it can travel over the wire and be stored in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Stable id: environment, split, difficulty and a hash of the task's content.
    pub id: String,
    /// The environment that made the task and can score it.
    pub env: String,
    /// The split the task belongs to.
    pub split: Split,
    /// The difficulty level it was sampled at (0 = easiest).
    pub difficulty: u32,
    /// The seed it was sampled from.
    pub seed: u64,
    /// The conversation the model sees (render with [`Task::prompt_text`]).
    pub prompt: Vec<Message>,
    /// Private data the verifier needs (the answer, the constraints…); never shown to the model.
    pub verification: serde_json::Value,
}

impl Task {
    /// The prompt rendered with the chat template, ready for generation.
    pub fn prompt_text(&self) -> String {
        render_prompt(&self.prompt)
    }

    /// The error for verification data that decodes but makes no sense (an empty choice list, a
    /// grid of the wrong size…).
    pub fn invalid_verification(&self, message: impl std::fmt::Display) -> EnvError {
        EnvError::BadVerification {
            env: self.env.clone(),
            task_id: self.id.clone(),
            source: serde::de::Error::custom(message),
        }
    }

    /// Decodes the verification data into the environment's own type.
    pub fn verification_as<T: DeserializeOwned>(&self) -> Result<T, EnvError> {
        serde_json::from_value(self.verification.clone()).map_err(|source| {
            EnvError::BadVerification {
                env: self.env.clone(),
                task_id: self.id.clone(),
                source,
            }
        })
    }
}

/// One named part of a score, e.g. one instruction-following constraint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreComponent {
    /// What was checked.
    pub name: String,
    /// Its value (1.0 = satisfied for pass/fail checks).
    pub value: f64,
}

/// What a verifier says about a completion.
///
/// Built-in environments give rewards in `[0, 1]` with 1.0 the full reward; an environment may
/// give signed rewards, but 1.0 stays "fully solved".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The reward.
    pub reward: f64,
    /// Named parts of the reward, for metrics and debugging.
    pub components: Vec<ScoreComponent>,
    /// A human-readable explanation.
    pub reason: String,
}

/// Tolerance when comparing a reward with the full reward.
const FULL_REWARD_TOLERANCE: f64 = 1e-9;

impl Score {
    /// The full reward, 1.0.
    pub const FULL: f64 = 1.0;

    /// A full reward.
    pub fn full(reason: impl Into<String>) -> Self {
        Self {
            reward: Self::FULL,
            components: Vec::new(),
            reason: reason.into(),
        }
    }

    /// A zero reward.
    pub fn zero(reason: impl Into<String>) -> Self {
        Self {
            reward: 0.0,
            components: Vec::new(),
            reason: reason.into(),
        }
    }

    /// 1.0 if `correct`, else 0.0.
    pub fn binary(correct: bool, reason: impl Into<String>) -> Self {
        if correct {
            Self::full(reason)
        } else {
            Self::zero(reason)
        }
    }

    /// Adds a named component.
    pub fn with_component(mut self, name: impl Into<String>, value: f64) -> Self {
        self.components.push(ScoreComponent {
            name: name.into(),
            value,
        });
        self
    }

    /// Whether this is the full reward.
    pub fn is_full(&self) -> bool {
        self.reward >= Self::FULL - FULL_REWARD_TOLERANCE
    }

    /// The components as a name → value map (the wire's `map<string, double>`); a repeated
    /// name keeps its last value.
    pub fn components_map(&self) -> std::collections::BTreeMap<String, f64> {
        self.components
            .iter()
            .map(|c| (c.name.clone(), c.value))
            .collect()
    }

    /// The value of a component, if present.
    pub fn component(&self, name: &str) -> Option<f64> {
        self.components
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_parses_and_prints() {
        for split in Split::ALL {
            assert_eq!(split.to_string().parse::<Split>().unwrap(), split);
        }
        let err = "test".parse::<Split>().unwrap_err();
        assert!(err.to_string().contains("train"), "{err}");
    }

    #[test]
    fn task_round_trips_through_json() {
        let task = Task {
            id: "x".into(),
            env: "arithmetic".into(),
            split: Split::Heldout,
            difficulty: 3,
            seed: 9,
            prompt: vec![Message::user("1+1=")],
            verification: serde_json::json!({"answer": 2}),
        };
        let json = serde_json::to_string(&task).unwrap();
        assert!(json.contains("\"split\":\"heldout\""), "{json}");
        assert_eq!(serde_json::from_str::<Task>(&json).unwrap(), task);
    }

    #[test]
    fn bad_verification_names_the_task() {
        let task = Task {
            id: "t1".into(),
            env: "e".into(),
            split: Split::Train,
            difficulty: 0,
            seed: 0,
            prompt: vec![],
            verification: serde_json::json!("nope"),
        };
        let err = task.verification_as::<Vec<u32>>().unwrap_err();
        assert!(err.to_string().contains("t1"), "{err}");
    }

    #[test]
    fn score_fullness() {
        assert!(Score::full("ok").is_full());
        assert!(!Score::zero("no").is_full());
        let score = Score::binary(false, "x").with_component("parsed", 1.0);
        assert_eq!(score.component("parsed"), Some(1.0));
        assert_eq!(score.component("missing"), None);
        let map = score.with_component("valid", 0.0).components_map();
        assert_eq!(map.len(), 2);
        assert_eq!(map["valid"], 0.0);
    }
}
