//! `math_word`: word problems with a numeric answer, generated from templates or read from a
//! GSM8K JSONL file (`question`, `answer` ending in `#### N`).
//!
//! Answers are compared as exact rationals, so `1,200`, `$1200.00`, `\boxed{1200}`, `#### 1200`
//! and `1200 dollars` are all the same answer; `3/4`, `0.75` and `\frac{3}{4}` too. Generated
//! problems grow with difficulty from one-step addition of single digits (level 0) through
//! multiplication, sharing, money and change, to fractions, percentages and rates in several
//! steps.

use std::path::Path;

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use super::datasets::{Row, parse_jsonl, read_jsonl, row_error, string_field};
use super::expr::Rational;
use super::numeric::{parse_number_token, parse_numeric_answer};
use crate::chat::Message;
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task, split_of, task_rng};
use crate::task::{Score, Split, Task};

const NAME: &str = "math_word";
const MAX_DIFFICULTY: u32 = 9;
/// Namespace for the content-hash split of dataset rows (independent of the environment name,
/// so renaming an environment never moves a row between splits).
const DATASET_SPLIT_NAMESPACE: &str = "dataset";

const NAMES: [&str; 12] = [
    "Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu",
];
const ITEMS: [&str; 10] = [
    "apples", "pens", "cards", "eggs", "books", "shells", "coins", "cups", "stamps", "beads",
];

/// Word problems with numeric answers.
#[derive(Debug, Clone)]
pub struct MathWord {
    name: String,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Generated,
    Dataset(Vec<DatasetProblem>),
}

#[derive(Debug, Clone)]
struct DatasetProblem {
    question: String,
    solution: String,
    answer: String,
    split: Split,
}

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    /// The exact answer, `7` or `3/4`.
    answer: String,
    /// A worked solution ending in `#### answer` (plain answer at the lowest levels).
    solution: String,
}

impl Default for MathWord {
    fn default() -> Self {
        Self::generated()
    }
}

/// One generated problem.
struct Problem {
    question: String,
    steps: Vec<String>,
    answer: Rational,
}

fn int(value: i128) -> Rational {
    Rational::integer(value)
}

/// Level 0: one addition of single digits.
fn add_more(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let (who, item) = (*NAMES.choose(rng)?, *ITEMS.choose(rng)?);
    let (a, b) = (rng.random_range(1..=scale), rng.random_range(1..=scale));
    Some(Problem {
        question: format!("{who} has {a} {item} and gets {b} more. How many now?"),
        steps: vec![format!("{a}+{b}={}", a + b)],
        answer: int(a + b),
    })
}

/// Level 1: one subtraction.
fn give_away(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let (who, item) = (*NAMES.choose(rng)?, *ITEMS.choose(rng)?);
    let a = rng.random_range(2..=scale.max(2) * 2);
    let b = rng.random_range(1..a);
    Some(Problem {
        question: format!("{who} has {a} {item} and gives away {b}. How many are left?"),
        steps: vec![format!("{a}-{b}={}", a - b)],
        answer: int(a - b),
    })
}

/// Level 2: groups of equal size.
fn groups(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let (who, item) = (*NAMES.choose(rng)?, *ITEMS.choose(rng)?);
    let (boxes, each) = (
        rng.random_range(2..=scale.min(12)),
        rng.random_range(2..=scale),
    );
    Some(Problem {
        question: format!(
            "{who} has {boxes} boxes with {each} {item} in each. How many {item} in all?"
        ),
        steps: vec![format!("{boxes}*{each}={}", boxes * each)],
        answer: int(boxes * each),
    })
}

/// Level 3: groups, then some used up.
fn groups_then_use(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let (who, item) = (*NAMES.choose(rng)?, *ITEMS.choose(rng)?);
    let (packs, each) = (rng.random_range(2..=9), rng.random_range(2..=scale));
    let total = packs * each;
    let used = rng.random_range(1..total);
    Some(Problem {
        question: format!(
            "{who} buys {packs} packs of {each} {item} and uses {used} of them. How many {item} are left?"
        ),
        steps: vec![
            format!("{packs}*{each}={total}"),
            format!("{total}-{used}={}", total - used),
        ],
        answer: int(total - used),
    })
}

/// Level 4: fair sharing after a purchase.
fn share(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let (who, item) = (*NAMES.choose(rng)?, *ITEMS.choose(rng)?);
    let friends = rng.random_range(2..=8);
    let each = rng.random_range(2..=scale);
    let had = rng.random_range(1..=scale);
    let bought = friends * each - had;
    if bought <= 0 {
        return None;
    }
    Some(Problem {
        question: format!(
            "{who} has {had} {item} and buys {bought} more, then shares them equally among {friends} friends. How many does each friend get?"
        ),
        steps: vec![
            format!("{had}+{bought}={}", had + bought),
            format!("{}/{friends}={each}", had + bought),
        ],
        answer: int(each),
    })
}

/// Level 5: money and change.
fn change(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let (who, item) = (*NAMES.choose(rng)?, *ITEMS.choose(rng)?);
    let (price, count) = (rng.random_range(2..=scale.min(40)), rng.random_range(2..=9));
    let cost = price * count;
    let paid = (cost / 10 + 1 + rng.random_range(0..3)) * 10;
    Some(Problem {
        question: format!(
            "{item} cost ${price} each. {who} buys {count} and pays with ${paid}. How much change, in dollars?"
        ),
        steps: vec![
            format!("{count}*{price}={cost}"),
            format!("{paid}-{cost}={}", paid - cost),
        ],
        answer: int(paid - cost),
    })
}

/// Level 6: a fraction of a whole.
fn fraction_of(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let who = *NAMES.choose(rng)?;
    let denominator = rng.random_range(2..=8);
    let numerator = rng.random_range(1..denominator);
    let total = denominator * rng.random_range(2..=scale.min(30));
    let part = total / denominator * numerator;
    Some(Problem {
        question: format!(
            "{who}'s class has {total} students and {numerator}/{denominator} of them walk to school. How many students do not walk?"
        ),
        steps: vec![
            format!("{total}*{numerator}/{denominator}={part}"),
            format!("{total}-{part}={}", total - part),
        ],
        answer: int(total - part),
    })
}

/// Level 7: a percentage discount, possibly with cents.
fn discount(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let (who, item) = (*NAMES.choose(rng)?, *ITEMS.choose(rng)?);
    let percent = *[10, 15, 20, 25, 30, 40, 50].choose(rng)?;
    let price = rng.random_range(10..=scale.max(11) * 5);
    let count = rng.random_range(1..=4);
    let full = price * count;
    let paid = Rational::new(full * (100 - percent), 100)?;
    Some(Problem {
        question: format!(
            "A box of {item} costs ${price}. {who} buys {count} boxes with a {percent}% discount. How many dollars does {who} pay?"
        ),
        steps: vec![
            format!("{count}*{price}={full}"),
            format!("{full}*{}/100={paid}", 100 - percent),
        ],
        answer: paid,
    })
}

/// Level 8: a rate over two legs of a trip.
fn trip(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let who = *NAMES.choose(rng)?;
    let (speed1, hours1) = (
        rng.random_range(20..=scale.max(21) * 2),
        rng.random_range(1..=5),
    );
    let (speed2, hours2) = (
        rng.random_range(20..=scale.max(21) * 2),
        rng.random_range(1..=5),
    );
    let (d1, d2) = (speed1 * hours1, speed2 * hours2);
    Some(Problem {
        question: format!(
            "{who} drives {hours1} hours at {speed1} km/h, then {hours2} hours at {speed2} km/h. How many km in total?"
        ),
        steps: vec![
            format!("{hours1}*{speed1}={d1}"),
            format!("{hours2}*{speed2}={d2}"),
            format!("{d1}+{d2}={}", d1 + d2),
        ],
        answer: int(d1 + d2),
    })
}

/// Level 9: savings over weeks with spending, then a split.
fn savings(rng: &mut TaskRng, scale: i128) -> Option<Problem> {
    let who = *NAMES.choose(rng)?;
    let (weekly, weeks) = (rng.random_range(5..=scale.max(6)), rng.random_range(3..=12));
    let saved = weekly * weeks;
    let spent = rng.random_range(1..saved);
    let left = saved - spent;
    let people = rng.random_range(2..=4);
    let each = Rational::new(left, people)?;
    Some(Problem {
        question: format!(
            "{who} saves ${weekly} a week for {weeks} weeks, spends ${spent}, and splits the rest equally with {} friends ({people} people in all). How many dollars does each get?",
            people - 1
        ),
        steps: vec![
            format!("{weekly}*{weeks}={saved}"),
            format!("{saved}-{spent}={left}"),
            format!("{left}/{people}={each}"),
        ],
        answer: each,
    })
}

type Template = fn(&mut TaskRng, i128) -> Option<Problem>;

/// Templates in order of difficulty; level `l` draws from the template at `l` or, with some
/// probability, an easier one (so skills are revisited).
const TEMPLATES: [Template; 10] = [
    add_more,
    give_away,
    groups,
    groups_then_use,
    share,
    change,
    fraction_of,
    discount,
    trip,
    savings,
];

impl MathWord {
    /// Problems generated from templates.
    pub fn generated() -> Self {
        Self {
            name: NAME.to_string(),
            source: Source::Generated,
        }
    }

    /// Problems read from GSM8K-style JSONL text: one `{"question", "answer"}` object a line,
    /// the answer ending in `#### N`. `source_name` labels errors.
    pub fn from_gsm8k_str(text: &str, source_name: &str) -> Result<Self, EnvError> {
        let rows = parse_jsonl(text, source_name)?;
        let problems = rows
            .iter()
            .map(|row| gsm8k_problem(row, source_name))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: NAME.to_string(),
            source: Source::Dataset(problems),
        })
    }

    /// Problems read from a GSM8K-style JSONL file.
    pub fn from_gsm8k_file(path: impl AsRef<Path>) -> Result<Self, EnvError> {
        let path = path.as_ref();
        let rows = read_jsonl(path)?;
        let source_name = path.display().to_string();
        let problems = rows
            .iter()
            .map(|row| gsm8k_problem(row, &source_name))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: NAME.to_string(),
            source: Source::Dataset(problems),
        })
    }

    /// The same environment registered under another name (e.g. `gsm8k`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

fn gsm8k_problem(row: &Row, source_name: &str) -> Result<DatasetProblem, EnvError> {
    let question = string_field(row, "question", source_name)?
        .trim()
        .to_string();
    let raw_answer = string_field(row, "answer", source_name)?;
    let (_, final_part) = raw_answer
        .rsplit_once("####")
        .ok_or_else(|| row_error(source_name, row.line, "`answer` does not end in `#### N`"))?;
    let token: String = final_part
        .trim()
        .chars()
        .filter(|c| !matches!(c, ',' | '$' | ' '))
        .collect();
    let answer = parse_number_token(&token).ok_or_else(|| {
        row_error(
            source_name,
            row.line,
            format!("final answer {:?} is not a number", final_part.trim()),
        )
    })?;
    let split = split_of(DATASET_SPLIT_NAMESPACE, &question);
    Ok(DatasetProblem {
        question,
        solution: strip_calculator_annotations(raw_answer),
        answer: answer.to_string(),
        split,
    })
}

/// GSM8K solutions carry calculator annotations `<<48/2=24>>`; a model should not learn them.
fn strip_calculator_annotations(solution: &str) -> String {
    let mut out = String::new();
    let mut rest = solution;
    while let Some(open) = rest.find("<<") {
        out.push_str(&rest[..open]);
        match rest[open..].find(">>") {
            Some(close) => rest = &rest[open + close + 2..],
            None => {
                rest = &rest[open..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

impl Environment for MathWord {
    fn info(&self) -> EnvInfo {
        let description = match &self.source {
            Source::Generated => {
                "Generated word problems with a numeric answer (fractions, money, rates)"
                    .to_string()
            }
            Source::Dataset(rows) => format!(
                "{} GSM8K-style word problems with a numeric answer",
                rows.len()
            ),
        };
        EnvInfo {
            name: self.name.clone(),
            category: Category::Math,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: match self.source {
                Source::Generated => MAX_DIFFICULTY,
                Source::Dataset(_) => 0,
            },
            description,
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let origin = TaskOrigin {
            env: &self.name,
            seed,
            split,
            difficulty,
        };
        match &self.source {
            Source::Generated => {
                let level = difficulty.min(MAX_DIFFICULTY) as usize;
                let scale = 9 * (1 + level as i128 / 2);
                let (key, problem) = draw_in_split(&self.name, seed, split, difficulty, |rng| {
                    let index = if level > 0 && rng.random_bool(0.25) {
                        rng.random_range(0..level)
                    } else {
                        level
                    };
                    let problem = TEMPLATES[index](rng, scale)?;
                    Some((problem.question.clone(), problem))
                })?;
                let solution = if level < 3 {
                    problem.answer.to_string()
                } else {
                    format!("{}\n#### {}", problem.steps.join("\n"), problem.answer)
                };
                let verification = Verification {
                    answer: problem.answer.to_string(),
                    solution,
                };
                make_task(
                    origin,
                    &key,
                    vec![Message::user(problem.question)],
                    &verification,
                )
            }
            Source::Dataset(problems) => {
                // Dataset rows carry no difficulty: every level draws from the whole split.
                let in_split: Vec<&DatasetProblem> =
                    problems.iter().filter(|p| p.split == split).collect();
                if in_split.is_empty() {
                    return Err(EnvError::SplitExhausted {
                        env: self.name.clone(),
                        split,
                        difficulty,
                        seed,
                        attempts: problems.len(),
                    });
                }
                let index = task_rng(&self.name, seed, 0).random_range(0..in_split.len());
                let problem = in_split[index];
                let verification = Verification {
                    answer: problem.answer.clone(),
                    solution: problem.solution.clone(),
                };
                make_task(
                    origin,
                    &problem.question,
                    vec![Message::user(problem.question.clone())],
                    &verification,
                )
            }
        }
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let expected_value = parse_number_token(&expected.answer).ok_or_else(|| {
            task.invalid_verification(format!("answer {:?} is not a number", expected.answer))
        })?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let Some(given) = parse_numeric_answer(&response) else {
            return Ok(Score::zero("no number in the answer").with_component("format", 0.0));
        };
        let correct = given == expected_value;
        let reason = if correct {
            format!("{given} is correct")
        } else {
            format!("{given} is not {}", expected.answer)
        };
        Ok(Score::binary(correct, reason).with_component("format", 1.0))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Ok(task.verification_as::<Verification>()?.solution)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let value = parse_number_token(&expected.answer).unwrap_or(Rational::integer(0));
        let off_by_one = value.checked_add(Rational::integer(1)).unwrap_or(value);
        Ok(vec![
            off_by_one.to_string(),
            format!("\\boxed{{{off_by_one}}}"),
            "no idea".to_string(),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes_at_every_level() {
        let levels: Vec<u32> = (0..=MAX_DIFFICULTY).collect();
        assert_self_check_passes(&MathWord::generated(), &levels, 6);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&MathWord::generated(), 0, 200);
        assert_splits_disjoint(&MathWord::generated(), 7, 200);
    }

    #[test]
    fn equivalent_spellings_score_full() {
        let env = MathWord::generated();
        let task = Task {
            verification: serde_json::json!({"answer": "1200", "solution": "1200"}),
            ..train_task(&env, 0, 0)
        };
        for good in [
            "1200",
            "1,200",
            "$1,200.00",
            "\\boxed{1200}",
            "so...\n#### 1200",
            "1200 dollars",
            "<think>x</think>1200",
        ] {
            assert_eq!(reward(&env, &task, good), 1.0, "{good}");
        }
        for bad in ["120", "12,000", "twelve hundred", "\\boxed{1201}"] {
            assert_eq!(reward(&env, &task, bad), 0.0, "{bad}");
        }
        let half = Task {
            verification: serde_json::json!({"answer": "3/4", "solution": "3/4"}),
            ..task
        };
        for good in ["3/4", "0.75", "\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}"] {
            assert_eq!(reward(&env, &half, good), 1.0, "{good}");
        }
    }

    const GSM8K: &str = r#####"{"question": "Tom has 3 bags of 4 marbles. How many marbles?", "answer": "3*4=<<3*4=12>>12\n#### 12"}
{"question": "A pen costs $1,250 in a fancy shop. Price in dollars?", "answer": "It is 1,250.\n#### 1,250"}
{"question": "Q3: 10 - 7?", "answer": "10-7=3\n#### 3"}
{"question": "Q4: 2 + 2?", "answer": "#### 4"}
{"question": "Q5: 6 / 3?", "answer": "#### 2"}
{"question": "Q6: 9 - 1?", "answer": "#### 8"}
{"question": "Q7: 5 + 5?", "answer": "#### 10"}
{"question": "Q8: 7 * 7?", "answer": "#### 49"}
{"question": "Q9: 8 + 1?", "answer": "#### 9"}
{"question": "Q10: 3 * 3?", "answer": "#### 9"}
{"question": "Q11: 1 + 1?", "answer": "#### 2"}
{"question": "Q12: 4 * 4?", "answer": "#### 16"}"#####;

    #[test]
    fn gsm8k_rows_are_sampled_scored_and_stripped_of_annotations() {
        let env = MathWord::from_gsm8k_str(GSM8K, "test.jsonl")
            .unwrap()
            .with_name("gsm8k");
        assert_eq!(env.info().name, "gsm8k");
        let mut seen = std::collections::BTreeSet::new();
        for split in Split::ALL {
            for seed in 0..40 {
                let Ok(task) = env.sample(seed, split, 0) else {
                    continue;
                };
                assert_eq!(
                    task.split,
                    split_of(DATASET_SPLIT_NAMESPACE, &task.prompt[0].content)
                );
                let reference = env.reference(&task).unwrap();
                assert!(!reference.contains("<<"), "{reference}");
                assert!(env.score(&task, &reference).unwrap().is_full());
                seen.insert(task.prompt[0].content.clone());
            }
        }
        assert!(seen.len() > 6, "{seen:?}");
        let options = crate::CheckOptions {
            tasks_per_split: 6,
            difficulties: Some(vec![0]),
            base_seed: 0,
        };
        let report = crate::check_environment(&env, &options);
        assert!(report.passed, "{:#?}", report.failures);
    }

    #[test]
    fn gsm8k_errors_name_the_line() {
        let err = MathWord::from_gsm8k_str(
            "{\"question\": \"q\", \"answer\": \"no marker\"}",
            "x.jsonl",
        )
        .unwrap_err();
        assert!(err.to_string().contains("x.jsonl line 1"), "{err}");
        let err = MathWord::from_gsm8k_str("\n{\"question\": \"q\"}", "x.jsonl").unwrap_err();
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("answer"),
            "{err}"
        );
        assert!(MathWord::from_gsm8k_file("/nonexistent/gsm8k.jsonl").is_err());
    }
}
