//! `countdown`: reach a target from given numbers with `+ - * /`, each number used at most once,
//! every division exact. `Make 10 from 3 7 with +.` → `3+7`.
//!
//! Instances are built backwards from a random expression over the numbers, so every task is
//! solvable. Difficulty raises the count of numbers (2 + (level+1)/3, at most 6), their range
//! (1–9, then 1–25, then up to 100) and the operators (level 0 `+`, level 1 `+ -`, level 2
//! `+ - *`, from level 3 all four).

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use super::expr::{Expr, Op, parse_expression};
use crate::chat::{Message, final_answer};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "countdown";
const MAX_DIFFICULTY: u32 = 12;
/// Targets above this are rejected when generating: they make for unnatural puzzles.
const MAX_TARGET: i128 = 10_000;

/// The countdown numbers game.
#[derive(Debug, Clone, Default)]
pub struct Countdown;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    numbers: Vec<i128>,
    target: i128,
    solution: String,
}

fn operators(level: u32) -> &'static [Op] {
    match level {
        0 => &[Op::Add],
        1 => &[Op::Add, Op::Sub],
        2 => &[Op::Add, Op::Sub, Op::Mul],
        _ => &[Op::Add, Op::Sub, Op::Mul, Op::Div],
    }
}

fn random_number(rng: &mut TaskRng, level: u32) -> i128 {
    match level {
        0..=3 => rng.random_range(1..=9),
        4..=6 => rng.random_range(1..=25),
        _ if rng.random_bool(0.25) => *[25, 50, 75, 100].choose(rng).unwrap_or(&25),
        _ => rng.random_range(1..=10),
    }
}

/// Combines `leaves` into a random tree whose every intermediate value is a positive integer.
fn random_tree(rng: &mut TaskRng, leaves: &[i128], ops: &[Op]) -> Option<Expr> {
    if let [only] = leaves {
        return Some(Expr::Number(*only));
    }
    let split = rng.random_range(1..leaves.len());
    let left = random_tree(rng, &leaves[..split], ops)?;
    let right = random_tree(rng, &leaves[split..], ops)?;
    let op = *ops.choose(rng)?;
    let tree = Expr::binary(op, left, right);
    let value = tree.eval(true).ok()?.as_integer()?;
    (value > 0).then_some(tree)
}

/// Whether every number in `used` can be taken from `given` without reuse.
fn uses_given_numbers(used: &[i128], given: &[i128]) -> Result<(), String> {
    let mut available = given.to_vec();
    for number in used {
        match available.iter().position(|n| n == number) {
            Some(index) => {
                available.swap_remove(index);
            }
            None => {
                return Err(format!(
                    "{number} is not available (given {given:?}, each at most once)"
                ));
            }
        }
    }
    Ok(())
}

fn numbers_text(numbers: &[i128]) -> String {
    numbers
        .iter()
        .map(i128::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Environment for Countdown {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Math,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description: "Reach a target from given numbers with + - * /, each number at most once"
                .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let count = (2 + (level + 1) / 3).min(6) as usize;
        let ops = operators(level);
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let mut numbers: Vec<i128> = (0..count).map(|_| random_number(rng, level)).collect();
            // From level 3 the solution may leave one number unused.
            let used = if level >= 3 && count > 2 && rng.random_bool(0.5) {
                count - 1
            } else {
                count
            };
            let tree = random_tree(rng, &numbers[..used], ops)?;
            let target = tree.eval(true).ok()?.as_integer()?;
            if target > MAX_TARGET || numbers.contains(&target) {
                return None;
            }
            numbers.shuffle(rng);
            let mut sorted = numbers.clone();
            sorted.sort_unstable();
            let key = format!("{target}:{sorted:?}");
            Some((
                key,
                Verification {
                    numbers,
                    target,
                    solution: tree.to_string(),
                },
            ))
        })?;
        let symbols: String = ops.iter().map(|op| format!(" {}", op.symbol())).collect();
        let prompt = vec![Message::user(format!(
            "Make {} from {} with{symbols}.",
            verification.target,
            numbers_text(&verification.numbers)
        ))];
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(origin, &key, prompt, &verification)
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        // Accept `3+7=10`: the expression is what precedes the first `=`.
        let answer = final_answer(&response);
        let expression_text = answer.split('=').next().unwrap_or(answer);
        let expr = match parse_expression(expression_text) {
            Ok(expr) => expr,
            Err(err) => {
                return Ok(
                    Score::zero(format!("{expression_text:?} is not an expression: {err}"))
                        .with_component("parsed", 0.0),
                );
            }
        };
        if let Err(reason) = uses_given_numbers(&expr.numbers(), &expected.numbers) {
            return Ok(Score::zero(reason)
                .with_component("parsed", 1.0)
                .with_component("numbers_valid", 0.0));
        }
        let score = match expr.eval(true) {
            Err(err) => Score::zero(format!("{expr} cannot be evaluated: {err}")),
            Ok(value) if value.as_integer() == Some(expected.target) => {
                Score::full(format!("{expr} = {}", expected.target))
            }
            Ok(value) => Score::zero(format!("{expr} = {value}, not {}", expected.target)),
        };
        Ok(score
            .with_component("parsed", 1.0)
            .with_component("numbers_valid", 1.0))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Ok(task.verification_as::<Verification>()?.solution)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let mut wrong = vec![
            expected.target.to_string(),
            format!("{}+1-1", expected.solution),
        ];
        // Reusing a number is only wrong when that number is given once.
        if let Some(first) = expected.numbers.first()
            && expected.numbers.iter().filter(|n| *n == first).count() == 1
        {
            wrong.push(format!("{first}+{first}"));
        }
        Ok(wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes_across_levels() {
        assert_self_check_passes(&Countdown, &[0, 1, 2, 3, 6, 12], 12);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Countdown, 0, 200);
        assert_splits_disjoint(&Countdown, 5, 200);
    }

    #[test]
    fn level_zero_prompt_is_short() {
        let task = train_task(&Countdown, 1, 0);
        assert!(
            task.prompt[0].content.len() <= 24,
            "{}",
            task.prompt[0].content
        );
    }

    #[test]
    fn any_correct_expression_counts_and_rules_are_enforced() {
        let task = Task {
            verification: serde_json::json!({"numbers": [3, 7, 4], "target": 25, "solution": "3*7+4"}),
            ..train_task(&Countdown, 0, 3)
        };
        assert_eq!(reward(&Countdown, &task, "4+7*3"), 1.0);
        assert_eq!(
            reward(&Countdown, &task, "(7-3)*4+9"),
            0.0,
            "9 is not given"
        );
        assert_eq!(reward(&Countdown, &task, "3*7+4 = 25"), 1.0);
        assert_eq!(
            reward(&Countdown, &task, "7*3+3+1"),
            0.0,
            "3 reused, 1 not given"
        );
        let score = Countdown.score(&task, "3*7+4/4").unwrap();
        assert_eq!(score.reward, 0.0, "{}", score.reason);
        let inexact = Countdown.score(&task, "7/3*4").unwrap();
        assert!(inexact.reason.contains("not exact"), "{}", inexact.reason);
        assert_eq!(reward(&Countdown, &task, "((((3"), 0.0);
    }
}
