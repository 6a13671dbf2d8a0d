//! `arithmetic`: exact integer arithmetic, `12+7=` → `19`.
//!
//! Difficulty raises the number of digits (1 + level/2, at most 7), the number of operands
//! (2 + level/3, at most 6) and the operators (level 0: `+`; level 1: `+ -`; from level 2: `+ - *`).

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use super::expr::{Expr, Op};
use crate::chat::{Message, final_answer};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "arithmetic";
const MAX_DIFFICULTY: u32 = 12;

/// Multi-digit integer arithmetic with an exact answer.
#[derive(Debug, Clone, Default)]
pub struct Arithmetic;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    expression: String,
    /// A string: JSON numbers cannot hold every i128.
    answer: String,
}

fn operators(level: u32) -> &'static [Op] {
    match level {
        0 => &[Op::Add],
        1 => &[Op::Add, Op::Sub],
        _ => &[Op::Add, Op::Sub, Op::Mul],
    }
}

fn random_operand(rng: &mut TaskRng, digits: u32) -> i128 {
    let high = 10_i128.pow(digits) - 1;
    rng.random_range(0..=high)
}

/// A random expression tree with `leaves` operands.
fn random_tree(rng: &mut TaskRng, leaves: u32, digits: u32, ops: &[Op]) -> Expr {
    if leaves == 1 {
        return Expr::Number(random_operand(rng, digits));
    }
    let left_leaves = rng.random_range(1..leaves);
    let op = *ops.choose(rng).unwrap_or(&Op::Add);
    let left = random_tree(rng, left_leaves, digits, ops);
    let right = random_tree(rng, leaves - left_leaves, digits, ops);
    Expr::binary(op, left, right)
}

/// Reads an integer answer, allowing `1,234`, `1 234`, a leading `=` and a trailing `.`.
fn parse_integer(answer: &str) -> Option<i128> {
    let cleaned: String = answer
        .trim()
        .trim_start_matches('=')
        .trim_end_matches('.')
        .chars()
        .filter(|c| !matches!(c, ',' | ' ' | '_'))
        .collect();
    let cleaned = cleaned.replace('−', "-");
    cleaned.parse::<i128>().ok()
}

impl Environment for Arithmetic {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Math,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description:
                "Integer arithmetic (+ - *), exact answer; digits and operands grow with difficulty"
                    .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let digits = (1 + level / 2).min(7);
        let operands = (2 + level / 3).min(6);
        let (key, (expression, answer)) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let tree = random_tree(rng, operands, digits, operators(level));
            let answer = tree.eval(false).ok()?.as_integer()?;
            let expression = tree.to_string();
            Some((expression.clone(), (expression, answer)))
        })?;
        let prompt = vec![Message::user(format!("{expression}="))];
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(
            origin,
            &key,
            prompt,
            &Verification {
                expression,
                answer: answer.to_string(),
            },
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let expected_value = parse_integer(&expected.answer).ok_or_else(|| {
            task.invalid_verification(format!("answer {:?} is not an integer", expected.answer))
        })?;
        let Some(given) = parse_integer(final_answer(&response)) else {
            return Ok(
                Score::zero(format!("answer {response:?} is not an integer"))
                    .with_component("format", 0.0),
            );
        };
        let correct = given == expected_value;
        let reason = if correct {
            format!("{} = {given}", expected.expression)
        } else {
            format!("{} = {}, not {given}", expected.expression, expected.answer)
        };
        Ok(Score::binary(correct, reason).with_component("format", 1.0))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        Ok(expected.answer)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let answer = parse_integer(&expected.answer).unwrap_or(0);
        Ok(vec![
            answer.saturating_add(1).to_string(),
            answer.saturating_sub(10).to_string(),
            expected.expression.clone(),
            format!("<think>{}</think>", expected.answer),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes_across_levels() {
        assert_self_check_passes(&Arithmetic, &[0, 1, 2, 5, 12], 12);
    }

    #[test]
    fn level_zero_is_one_digit_addition_with_a_tiny_prompt() {
        for seed in 0..50 {
            let task = train_task(&Arithmetic, seed, 0);
            let content = &task.prompt[0].content;
            let (a, b) = content.trim_end_matches('=').split_once('+').unwrap();
            assert!(a.len() == 1 && b.len() == 1, "{content}");
            assert!(task.prompt_text().len() < 48, "{}", task.prompt_text());
        }
    }

    #[test]
    fn splits_are_disjoint_even_in_the_tiny_level_zero_space() {
        assert_splits_disjoint(&Arithmetic, 0, 300);
        assert_splits_disjoint(&Arithmetic, 4, 300);
    }

    #[test]
    fn answers_are_read_leniently_but_checked_exactly() {
        let task = train_task(&Arithmetic, 3, 6);
        let answer: i128 = Arithmetic.reference(&task).unwrap().parse().unwrap();
        assert_eq!(
            reward(
                &Arithmetic,
                &task,
                &format!("<think>hmm</think>\\boxed{{{answer}}}")
            ),
            1.0
        );
        assert_eq!(reward(&Arithmetic, &task, &format!("{answer}<|end|>")), 1.0);
        assert_eq!(reward(&Arithmetic, &task, &format!("{}", answer + 2)), 0.0);
        assert_eq!(reward(&Arithmetic, &task, "nineteen"), 0.0);
        assert_eq!(parse_integer("1,234"), Some(1234));
        assert_eq!(parse_integer("= -5."), Some(-5));
        assert_eq!(parse_integer("5 apples"), None);
    }

    #[test]
    fn foreign_tasks_are_rejected() {
        let mut task = train_task(&Arithmetic, 0, 0);
        task.env = "countdown".into();
        assert!(matches!(
            Arithmetic.score(&task, "1"),
            Err(EnvError::WrongEnvironment { .. })
        ));
    }
}
