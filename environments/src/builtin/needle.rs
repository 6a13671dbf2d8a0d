//! `needle`: one fact hidden in filler text, then a question about it.
//!
//! The filler length is configurable ([`NeedleConfig`]): level 0 has no filler at all, level `l`
//! has `first_filler_sentences * growth^(l-1)` sentences, capped. From level 2, decoy facts about
//! other codes are mixed in, so the model must match the right one.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use crate::chat::{Message, final_answer};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "needle";
const MAX_DIFFICULTY: u32 = 12;

const COLORS: [&str; 12] = [
    "red", "blue", "green", "gold", "gray", "pink", "teal", "tan", "black", "white", "jade", "plum",
];
const SUBJECTS: [&str; 10] = [
    "The cat",
    "A farmer",
    "The old man",
    "Our team",
    "The river",
    "A child",
    "The wind",
    "My aunt",
    "The bus",
    "A bird",
];
const VERBS: [&str; 10] = [
    "walked", "sang", "waited", "slept", "looked", "ran", "turned", "rested", "drifted", "worked",
];
const PLACES: [&str; 10] = [
    "near the hill",
    "by the sea",
    "in the town",
    "under a tree",
    "at dawn",
    "past the mill",
    "after lunch",
    "in the rain",
    "along the road",
    "for an hour",
];

/// How long the haystack grows with difficulty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeedleConfig {
    /// Filler sentences at level 1.
    pub first_filler_sentences: usize,
    /// Factor by which the filler grows per level.
    pub growth: f64,
    /// Upper bound on filler sentences (about 30 bytes each).
    pub max_filler_sentences: usize,
}

impl Default for NeedleConfig {
    fn default() -> Self {
        Self {
            first_filler_sentences: 2,
            growth: 2.0,
            max_filler_sentences: 4096,
        }
    }
}

impl NeedleConfig {
    /// Filler sentences at `level`.
    pub fn filler_sentences(&self, level: u32) -> usize {
        if level == 0 {
            return 0;
        }
        let count = self.first_filler_sentences as f64 * self.growth.powi(level as i32 - 1);
        if count.is_finite() {
            (count.round() as usize).min(self.max_filler_sentences)
        } else {
            self.max_filler_sentences
        }
    }
}

/// A fact in a haystack of filler.
#[derive(Debug, Clone, Default)]
pub struct Needle {
    config: NeedleConfig,
}

impl Needle {
    /// A needle environment with its own haystack sizes.
    pub fn with_config(config: NeedleConfig) -> Result<Self, EnvError> {
        if !(config.growth.is_finite() && config.growth >= 1.0) {
            return Err(EnvError::InvalidConfig {
                env: NAME.into(),
                message: format!("growth must be a finite number >= 1, got {}", config.growth),
            });
        }
        Ok(Self { config })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    color: String,
    answer: String,
}

fn filler_sentence(rng: &mut TaskRng) -> Option<String> {
    Some(format!(
        "{} {} {}.",
        SUBJECTS.choose(rng)?,
        VERBS.choose(rng)?,
        PLACES.choose(rng)?
    ))
}

impl Environment for Needle {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::LongContext,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description:
                "Retrieve a code hidden in filler text among decoys; length grows with difficulty"
                    .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let filler = self.config.filler_sentences(level);
        let decoys = (level as usize / 2).min(COLORS.len() - 1);
        let digits = (1 + level / 2).min(4);
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let mut colors = COLORS.to_vec();
            colors.shuffle(rng);
            let code = |rng: &mut TaskRng| rng.random_range(0..10_u32.pow(digits)).to_string();
            let answer = code(rng);
            let mut sentences: Vec<String> = (0..filler)
                .map(|_| filler_sentence(rng))
                .collect::<Option<_>>()?;
            let mut facts = vec![format!("The {} code is {answer}.", colors[0])];
            facts.extend(
                colors[1..=decoys]
                    .iter()
                    .map(|color| format!("The {color} code is {}.", code(rng))),
            );
            for fact in facts {
                let at = rng.random_range(0..=sentences.len());
                sentences.insert(at, fact);
            }
            let content = format!("{}\nWhat is the {} code?", sentences.join(" "), colors[0]);
            Some((
                content,
                Verification {
                    color: colors[0].to_string(),
                    answer,
                },
            ))
        })?;
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(
            origin,
            &key,
            vec![Message::user(key.clone())],
            &verification,
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        // The answer is the last whitespace-separated word, so `The red code is 42.` counts.
        let answer = final_answer(&response);
        let last_word = answer
            .split_whitespace()
            .last()
            .unwrap_or("")
            .trim_end_matches('.');
        let correct = last_word == expected.answer;
        let reason = if correct {
            format!("the {} code is {}", expected.color, expected.answer)
        } else {
            format!(
                "{last_word:?} is not the {} code {}",
                expected.color, expected.answer
            )
        };
        Ok(Score::binary(correct, reason))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Ok(task.verification_as::<Verification>()?.answer)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        Ok(vec![
            format!("{}1", expected.answer),
            format!("{} is the code", expected.answer),
            expected.color,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&Needle::default(), &[0, 1, 4, 8], 10);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Needle::default(), 0, 200);
        assert_splits_disjoint(&Needle::default(), 3, 200);
    }

    #[test]
    fn length_follows_the_config() {
        let short = Needle::default();
        let long = Needle::with_config(NeedleConfig {
            first_filler_sentences: 50,
            growth: 1.0,
            max_filler_sentences: 50,
        })
        .unwrap();
        let level_zero = train_task(&short, 0, 0).prompt[0].content.len();
        assert!(level_zero < 50, "{level_zero}");
        assert_eq!(short.config.filler_sentences(12), 4096);
        let long_len = train_task(&long, 0, 3).prompt[0].content.len();
        assert!(long_len > 50 * 15, "{long_len}");
        assert!(
            Needle::with_config(NeedleConfig {
                growth: 0.5,
                ..NeedleConfig::default()
            })
            .is_err()
        );
    }

    #[test]
    fn the_fact_is_in_the_prompt_and_decoys_do_not_score() {
        let task = train_task(&Needle::default(), 2, 6);
        let expected: Verification = task.verification_as().unwrap();
        let fact = format!("The {} code is {}.", expected.color, expected.answer);
        assert!(task.prompt[0].content.contains(&fact));
        assert_eq!(
            reward(
                &Needle::default(),
                &task,
                &format!("The {} code is {}.", expected.color, expected.answer)
            ),
            1.0
        );
        let decoy = task.prompt[0]
            .content
            .split(". ")
            .find(|s| s.contains(" code is ") && !s.contains(&expected.color))
            .map(str::to_string);
        let decoy_code = decoy
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .trim_end_matches('.')
            .to_string();
        if decoy_code != expected.answer {
            assert_eq!(reward(&Needle::default(), &task, &decoy_code), 0.0);
        }
    }
}
