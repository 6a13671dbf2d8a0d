//! `multi_hop`: follow a chain of variable assignments to a value, among distractor chains.
//! `a=3\nb=a\nb?` → `3`.
//!
//! Level `l` has a chain of `1 + l` hops (at most 12) and `l*l + 1` distractor assignments (at
//! most 200), shuffled together; names grow from one to two letters and values from one digit to
//! two as the level rises.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use crate::chat::{Message, final_answer};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "multi_hop";
const MAX_DIFFICULTY: u32 = 14;
const MAX_HOPS: usize = 12;
const MAX_DISTRACTORS: usize = 200;

/// Variable-chain following over a shuffled list of assignments.
#[derive(Debug, Clone, Default)]
pub struct MultiHop;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    query: String,
    answer: String,
    /// The chain from the query back to the literal, for the reason and the reference.
    chain: Vec<String>,
}

fn name_pool(rng: &mut TaskRng, two_letters: bool, count: usize) -> Vec<String> {
    let letters: Vec<char> = ('a'..='z').collect();
    let mut pool: Vec<String> = if two_letters {
        letters
            .iter()
            .flat_map(|a| letters.iter().map(move |b| format!("{a}{b}")))
            .collect()
    } else {
        letters.iter().map(|c| c.to_string()).collect()
    };
    pool.shuffle(rng);
    pool.truncate(count);
    pool
}

struct Puzzle {
    lines: Vec<String>,
    query: String,
    answer: String,
    chain: Vec<String>,
}

fn build(rng: &mut TaskRng, level: u32) -> Option<Puzzle> {
    let hops = (1 + level as usize).min(MAX_HOPS);
    let distractors = ((level * level) as usize + 1).min(MAX_DISTRACTORS);
    let two_letters = hops + distractors > 20;
    let mut names = name_pool(rng, two_letters, hops + distractors);
    if names.len() < hops + distractors {
        return None;
    }
    let max_value = if level < 2 { 9 } else { 99 };
    let mut lines = Vec::new();
    // The chain: names[0] = literal, names[i] = names[i-1].
    let chain_names: Vec<String> = names.drain(..hops).collect();
    let answer = rng.random_range(0..=max_value).to_string();
    lines.push(format!("{}={answer}", chain_names[0]));
    for pair in chain_names.windows(2) {
        lines.push(format!("{}={}", pair[1], pair[0]));
    }
    // Distractors: short chains of their own, so following any name means real work.
    let mut defined: Vec<String> = Vec::new();
    for name in names {
        let refer = !defined.is_empty() && rng.random_bool(0.5);
        let line = if refer {
            format!("{name}={}", defined.choose(rng)?)
        } else {
            format!("{name}={}", rng.random_range(0..=max_value))
        };
        lines.push(line);
        defined.push(name);
    }
    lines.shuffle(rng);
    let query = chain_names.last()?.clone();
    let mut chain = chain_names;
    chain.reverse();
    Some(Puzzle {
        lines,
        query,
        answer,
        chain,
    })
}

impl Environment for MultiHop {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::LongContext,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description: "Follow a chain of variable assignments among distractors; exact value"
                .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, puzzle) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let puzzle = build(rng, level)?;
            let content = format!("{}\n{}?", puzzle.lines.join("\n"), puzzle.query);
            Some((content, puzzle))
        })?;
        let verification = Verification {
            query: puzzle.query,
            answer: puzzle.answer,
            chain: puzzle.chain,
        };
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
        // Accept `b=3` as well as `3`.
        let answer = final_answer(&response);
        let value = answer
            .rsplit('=')
            .next()
            .unwrap_or(answer)
            .trim()
            .trim_end_matches('.');
        let correct = value == expected.answer;
        let reason = if correct {
            format!("{} = {}", expected.chain.join(" = "), expected.answer)
        } else {
            format!(
                "{value:?} is wrong: {} = {}",
                expected.chain.join(" = "),
                expected.answer
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
        let other = if expected.answer == "1" { "2" } else { "1" };
        Ok(vec![
            other.to_string(),
            expected.query.clone(),
            format!("{}0", expected.answer),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&MultiHop, &[0, 1, 3, 7, 14], 10);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&MultiHop, 0, 200);
        assert_splits_disjoint(&MultiHop, 6, 100);
    }

    /// Resolves the query by actually following the assignments in the prompt, so the stored
    /// answer is checked against the text the model sees.
    fn resolve(prompt: &str) -> String {
        let mut lines: Vec<&str> = prompt.lines().collect();
        let query = lines.pop().unwrap().trim_end_matches('?').to_string();
        let table: std::collections::HashMap<&str, &str> = lines
            .iter()
            .map(|line| line.split_once('=').unwrap())
            .collect();
        let mut current = query;
        while let Some(next) = table.get(current.as_str()) {
            current = next.to_string();
        }
        current
    }

    #[test]
    fn stored_answer_matches_the_prompt() {
        for level in [0, 2, 9] {
            for seed in 0..20 {
                let task = train_task(&MultiHop, seed, level);
                assert_eq!(
                    resolve(&task.prompt[0].content),
                    MultiHop.reference(&task).unwrap()
                );
            }
        }
    }

    #[test]
    fn level_zero_is_tiny_and_levels_grow() {
        let small = train_task(&MultiHop, 0, 0).prompt[0].content.len();
        let large = train_task(&MultiHop, 0, 14).prompt[0].content.len();
        assert!(small <= 12, "{small}");
        assert!(large > 1000, "{large}");
    }

    #[test]
    fn accepts_assignment_form() {
        let task = train_task(&MultiHop, 4, 2);
        let expected: Verification = task.verification_as().unwrap();
        assert_eq!(
            reward(
                &MultiHop,
                &task,
                &format!("{}={}", expected.query, expected.answer)
            ),
            1.0
        );
    }
}
