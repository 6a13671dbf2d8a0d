//! `mcqa`: multiple choice answerable from a given context, scored by letter match; or
//! ARC/MMLU-style JSONL (`question`, `choices`, `answer`/`answerKey`).
//!
//! Generated tasks state a few facts about people and ask about one of them; the wrong choices
//! are other values that appear in the context, so matching words is not enough. Level 0 has two
//! people and two choices; higher levels add people, facts per person and choices (up to 5).

use std::path::Path;

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use super::datasets::{Row, parse_jsonl, read_jsonl, row_error};
use crate::chat::{Message, final_answer};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task, split_of, task_rng};
use crate::task::{Score, Split, Task};

const NAME: &str = "mcqa";
const MAX_DIFFICULTY: u32 = 8;
const LETTERS: &str = "ABCDEFGHIJ";
const DATASET_SPLIT_NAMESPACE: &str = "dataset";

const NAMES: [&str; 10] = [
    "Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo",
];
/// (verb phrase for the statement, question, possible values).
const ATTRIBUTES: [(&str, &str, [&str; 8]); 4] = [
    (
        "likes",
        "What does {} like?",
        ["tea", "milk", "jam", "rice", "figs", "soup", "nuts", "cake"],
    ),
    (
        "lives in",
        "Where does {} live?",
        [
            "Oslo", "Lima", "Pune", "Kiev", "Bern", "Cork", "Nice", "Faro",
        ],
    ),
    (
        "has a",
        "What pet does {} have?",
        ["cat", "dog", "fish", "bird", "frog", "hare", "goat", "duck"],
    ),
    (
        "plays",
        "What does {} play?",
        [
            "chess", "golf", "polo", "judo", "darts", "tennis", "cricket", "bridge",
        ],
    ),
];

/// Multiple-choice questions.
#[derive(Debug, Clone)]
pub struct Mcqa {
    name: String,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Generated,
    Dataset(Vec<Question>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Question {
    context: Option<String>,
    question: String,
    choices: Vec<String>,
    /// Index of the right choice.
    answer: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    choices: Vec<String>,
    answer: usize,
}

impl Default for Mcqa {
    fn default() -> Self {
        Self::generated()
    }
}

fn letter(index: usize) -> char {
    LETTERS
        .as_bytes()
        .get(index)
        .map(|b| char::from(*b))
        .unwrap_or('?')
}

fn render(question: &Question) -> String {
    let mut text = String::new();
    if let Some(context) = &question.context {
        text.push_str(context);
        text.push('\n');
    }
    text.push_str(&question.question);
    for (i, choice) in question.choices.iter().enumerate() {
        text.push_str(&format!("\n{}) {choice}", letter(i)));
    }
    text
}

fn generate(rng: &mut TaskRng, level: u32) -> Option<Question> {
    let people = (2 + level as usize).min(NAMES.len());
    let attributes = (1 + level as usize / 3).min(ATTRIBUTES.len());
    let choices = (2 + level as usize).min(5);
    let mut names = NAMES.to_vec();
    names.shuffle(rng);
    names.truncate(people);
    let mut kinds: Vec<usize> = (0..ATTRIBUTES.len()).collect();
    kinds.shuffle(rng);
    kinds.truncate(attributes);
    let mut facts = Vec::new();
    // values[k][p] = value of attribute kinds[k] for person p.
    let mut values: Vec<Vec<&str>> = Vec::new();
    for &kind in &kinds {
        let pool = ATTRIBUTES[kind].2;
        let row: Vec<&str> = (0..people)
            .map(|_| *pool.choose(rng).unwrap_or(&pool[0]))
            .collect();
        for (person, value) in row.iter().enumerate() {
            facts.push(format!("{} {} {value}.", names[person], ATTRIBUTES[kind].0));
        }
        values.push(row);
    }
    facts.shuffle(rng);
    let asked_kind = rng.random_range(0..kinds.len());
    let asked_person = rng.random_range(0..people);
    let right = values[asked_kind][asked_person];
    // Wrong choices: first values from the context, then others from the pool.
    let mut wrong: Vec<&str> = values[asked_kind]
        .iter()
        .copied()
        .filter(|v| *v != right)
        .collect();
    wrong.sort_unstable();
    wrong.dedup();
    wrong.shuffle(rng);
    let mut extra: Vec<&str> = ATTRIBUTES[kinds[asked_kind]]
        .2
        .iter()
        .copied()
        .filter(|v| *v != right && !wrong.contains(v))
        .collect();
    extra.shuffle(rng);
    wrong.extend(extra);
    let mut options: Vec<String> = wrong
        .into_iter()
        .take(choices - 1)
        .map(str::to_string)
        .collect();
    let answer = rng.random_range(0..=options.len());
    options.insert(answer, right.to_string());
    Some(Question {
        context: Some(facts.join(" ")),
        question: ATTRIBUTES[kinds[asked_kind]]
            .1
            .replace("{}", names[asked_person]),
        choices: options,
        answer,
    })
}

/// Finds the chosen letter: a bare letter (`B`, `(B)`, `B)`, `B.`), `answer is B`/`Answer: B`,
/// the only standalone choice letter in the text, or the text of exactly one choice.
fn parse_choice(response: &str, choices: &[String]) -> Result<usize, String> {
    let answer = final_answer(response);
    let valid = |c: char| {
        LETTERS
            .get(..choices.len())
            .and_then(|letters| letters.find(c))
    };
    let stripped =
        answer.trim_matches(|c: char| matches!(c, '(' | ')' | '.' | ':' | '*' | ' ' | '[' | ']'));
    if stripped.chars().count() == 1
        && let Some(index) = stripped.chars().next().and_then(valid)
    {
        return Ok(index);
    }
    let lower = answer.to_lowercase();
    // Positions in `lower` are positions in `answer` only when lowercasing kept every length.
    let same_layout = lower.len() == answer.len();
    for marker in ["answer is", "answer:"] {
        if let Some(at) = lower.rfind(marker).filter(|_| same_layout) {
            let after = answer[at + marker.len()..]
                .trim_start_matches(|c: char| c.is_whitespace() || c == '(');
            let mut chars = after.chars();
            if let (Some(c), next) = (chars.next(), chars.next())
                && next.is_none_or(|n| !n.is_alphanumeric())
                && let Some(index) = valid(c)
            {
                return Ok(index);
            }
        }
    }
    let mut standalone: Vec<usize> = answer
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| word.chars().count() == 1)
        .filter_map(|word| word.chars().next().and_then(valid))
        .collect();
    standalone.dedup();
    if let [only] = standalone.as_slice() {
        return Ok(*only);
    }
    let matching: Vec<usize> = (0..choices.len())
        .filter(|i| {
            choices[*i]
                .trim()
                .eq_ignore_ascii_case(answer.trim_end_matches('.'))
        })
        .collect();
    if let [only] = matching.as_slice() {
        return Ok(*only);
    }
    Err(format!(
        "no single choice letter (A-{}) in the answer",
        letter(choices.len() - 1)
    ))
}

/// One ARC/MMLU-style row.
fn dataset_question(row: &Row, source_name: &str) -> Result<Question, EnvError> {
    let fail = |message: &str| row_error(source_name, row.line, message);
    let value = &row.value;
    let (question, nested_choices) = match value.get("question") {
        Some(serde_json::Value::String(text)) => (text.clone(), None),
        Some(serde_json::Value::Object(object)) => {
            let stem = object
                .get("stem")
                .and_then(|s| s.as_str())
                .ok_or_else(|| fail("`question` object has no `stem`"))?;
            (stem.to_string(), object.get("choices"))
        }
        _ => {
            return Err(fail(
                "missing `question` (a string, or an object with `stem`)",
            ));
        }
    };
    let raw_choices = nested_choices
        .or(value.get("choices"))
        .ok_or_else(|| fail("missing `choices`"))?;
    // Three spellings: ["a", "b"], [{"text", "label"}], {"text": [..], "label": [..]}.
    let (texts, labels): (Vec<String>, Vec<String>) = match raw_choices {
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                serde_json::Value::String(text) => Ok((text.clone(), letter(i).to_string())),
                serde_json::Value::Object(object) => {
                    let text = object
                        .get("text")
                        .and_then(|t| t.as_str())
                        .ok_or_else(|| fail("choice without `text`"))?;
                    let label = object
                        .get("label")
                        .and_then(|l| l.as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| letter(i).to_string());
                    Ok((text.to_string(), label))
                }
                _ => Err(fail("a choice is neither a string nor an object")),
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip(),
        serde_json::Value::Object(object) => {
            let strings = |key: &str| -> Result<Vec<String>, EnvError> {
                object
                    .get(key)
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| fail(&format!("`choices` object has no `{key}` list")))?
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| fail(&format!("`choices.{key}` holds a non-string")))
                    })
                    .collect()
            };
            (strings("text")?, strings("label")?)
        }
        _ => return Err(fail("`choices` must be a list or an object")),
    };
    if texts.len() < 2 || texts.len() > LETTERS.len() || labels.len() != texts.len() {
        return Err(fail(&format!(
            "need 2 to {} choices with matching labels",
            LETTERS.len()
        )));
    }
    let answer = match value.get("answerKey").or(value.get("answer")) {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| n as usize).filter(|n| *n < texts.len())
        }
        Some(serde_json::Value::String(key)) => labels.iter().position(|label| label == key.trim()),
        _ => None,
    }
    .ok_or_else(|| fail("`answer`/`answerKey` must be a choice index or one of the labels"))?;
    let context = value
        .get("context")
        .and_then(|c| c.as_str())
        .map(str::to_string);
    Ok(Question {
        context,
        question,
        choices: texts,
        answer,
    })
}

impl Mcqa {
    /// Generated context questions.
    pub fn generated() -> Self {
        Self {
            name: NAME.to_string(),
            source: Source::Generated,
        }
    }

    /// Questions from ARC/MMLU-style JSONL text. `source_name` labels errors.
    pub fn from_jsonl_str(text: &str, source_name: &str) -> Result<Self, EnvError> {
        let rows = parse_jsonl(text, source_name)?;
        let questions = rows
            .iter()
            .map(|row| dataset_question(row, source_name))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: NAME.to_string(),
            source: Source::Dataset(questions),
        })
    }

    /// Questions from an ARC/MMLU-style JSONL file.
    pub fn from_jsonl_file(path: impl AsRef<Path>) -> Result<Self, EnvError> {
        let path = path.as_ref();
        let source_name = path.display().to_string();
        let questions = read_jsonl(path)?
            .iter()
            .map(|row| dataset_question(row, &source_name))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: NAME.to_string(),
            source: Source::Dataset(questions),
        })
    }

    /// The same environment under another name (e.g. `arc`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl Environment for Mcqa {
    fn info(&self) -> EnvInfo {
        let (description, max_difficulty) = match &self.source {
            Source::Generated => (
                "Multiple choice answerable from a short context; letter match".to_string(),
                MAX_DIFFICULTY,
            ),
            Source::Dataset(rows) => (
                format!(
                    "{} multiple-choice questions from a dataset; letter match",
                    rows.len()
                ),
                0,
            ),
        };
        EnvInfo {
            name: self.name.clone(),
            category: Category::Knowledge,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty,
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
        let (key, question) = match &self.source {
            Source::Generated => {
                let level = difficulty.min(MAX_DIFFICULTY);
                draw_in_split(&self.name, seed, split, difficulty, |rng| {
                    let question = generate(rng, level)?;
                    Some((render(&question), question))
                })?
            }
            Source::Dataset(questions) => {
                // Dataset rows carry no difficulty: every level draws from the whole split.
                let in_split: Vec<&Question> = questions
                    .iter()
                    .filter(|q| split_of(DATASET_SPLIT_NAMESPACE, &render(q)) == split)
                    .collect();
                if in_split.is_empty() {
                    return Err(EnvError::SplitExhausted {
                        env: self.name.clone(),
                        split,
                        difficulty,
                        seed,
                        attempts: questions.len(),
                    });
                }
                let question =
                    in_split[task_rng(&self.name, seed, 0).random_range(0..in_split.len())].clone();
                (render(&question), question)
            }
        };
        let verification = Verification {
            choices: question.choices,
            answer: question.answer,
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
        let choices = expected.choices.len();
        if !(2..=LETTERS.len()).contains(&choices) || expected.answer >= choices {
            return Err(
                task.invalid_verification(format!("{choices} choices, answer {}", expected.answer))
            );
        }
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let chosen = match parse_choice(&response, &expected.choices) {
            Ok(chosen) => chosen,
            Err(reason) => return Ok(Score::zero(reason).with_component("format", 0.0)),
        };
        let correct = chosen == expected.answer;
        let reason = format!(
            "chose {}, answer is {}) {}",
            letter(chosen),
            letter(expected.answer),
            expected
                .choices
                .get(expected.answer)
                .map(String::as_str)
                .unwrap_or("?")
        );
        Ok(Score::binary(correct, reason).with_component("format", 1.0))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Ok(letter(answer_of(task)?.answer).to_string())
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected = answer_of(task)?;
        let wrong = (expected.answer + 1) % expected.choices.len();
        let all: String = (0..expected.choices.len())
            .map(|i| format!("{} ", letter(i)))
            .collect();
        Ok(vec![
            letter(wrong).to_string(),
            format!("The answer is ({})", letter(wrong)),
            all,
        ])
    }
}

/// The task's verification, checked to name one of its choices as the answer.
fn answer_of(task: &Task) -> Result<Verification, EnvError> {
    let expected: Verification = task.verification_as()?;
    if expected.answer >= expected.choices.len() {
        return Err(task.invalid_verification(format!(
            "answer {} is not one of its {} choices",
            expected.answer,
            expected.choices.len()
        )));
    }
    Ok(expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn a_task_without_choices_is_refused_not_a_panic() {
        let env = Mcqa::default();
        let mut task = env.sample(1, Split::Train, 0).unwrap();
        task.verification["choices"] = serde_json::json!([]);
        let err = env.wrong_completions(&task).unwrap_err();
        assert!(err.to_string().contains("0 choices"), "{err}");
    }

    /// Found by the plugin property test: an answer index of u64::MAX overflowed.
    #[test]
    fn an_answer_outside_the_choices_is_refused_not_a_panic() {
        let env = Mcqa::default();
        let mut task = env.sample(1, Split::Train, 0).unwrap();
        task.verification["answer"] = serde_json::json!(u64::MAX);
        for err in [
            env.wrong_completions(&task).unwrap_err(),
            env.reference(&task).unwrap_err(),
        ] {
            assert!(err.to_string().contains("is not one of its"), "{err}");
        }
    }

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&Mcqa::generated(), &[0, 1, 3, 8], 10);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Mcqa::generated(), 0, 200);
        assert_splits_disjoint(&Mcqa::generated(), 4, 100);
    }

    #[test]
    fn the_right_choice_is_stated_in_the_context() {
        for seed in 0..30 {
            let task = train_task(&Mcqa::generated(), seed, 5);
            let v: Verification = task.verification_as().unwrap();
            let content = &task.prompt[0].content;
            let asked = content.lines().nth(1).unwrap();
            let person = NAMES.iter().find(|n| asked.contains(*n)).unwrap();
            let fact_found = content.lines().next().unwrap().split(". ").any(|fact| {
                fact.starts_with(person)
                    && fact
                        .trim_end_matches('.')
                        .ends_with(&format!(" {}", v.choices[v.answer]))
            });
            assert!(fact_found, "{content}");
        }
    }

    #[test]
    fn letters_are_read_in_common_styles() {
        let choices: Vec<String> = ["tea", "milk", "jam", "rice"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (text, want) in [
            ("B", 1),
            ("(C)", 2),
            ("D) rice", 3),
            ("The answer is A.", 0),
            ("\\boxed{B}", 1),
            ("Answer: (C)", 2),
            ("milk", 1),
        ] {
            assert_eq!(parse_choice(text, &choices), Ok(want), "{text}");
        }
        assert!(
            parse_choice("Answer: (c)", &choices).is_err(),
            "lowercase letters are words, not choices"
        );
        assert!(parse_choice("A or B", &choices).is_err());
        assert!(parse_choice("E", &choices).is_err());
    }

    #[test]
    fn arc_and_mmlu_rows_load() {
        let text = r#"{"question": {"stem": "Which is a gas?", "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}]}, "answerKey": "B"}
{"question": "2+2?", "choices": {"text": ["3", "4", "5"], "label": ["1", "2", "3"]}, "answerKey": "2"}
{"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": 1}
{"question": "Sky color?", "choices": ["blue", "red"], "answer": "A", "context": "The sky is blue."}"#;
        let env = Mcqa::from_jsonl_str(text, "arc.jsonl").unwrap();
        let Source::Dataset(questions) = &env.source else {
            panic!("not a dataset")
        };
        assert_eq!(
            questions.iter().map(|q| q.answer).collect::<Vec<_>>(),
            vec![1, 1, 1, 0]
        );
        assert_eq!(questions[3].context.as_deref(), Some("The sky is blue."));
        for split in Split::ALL {
            for seed in 0..10 {
                if let Ok(task) = env.sample(seed, split, 0) {
                    let reference = env.reference(&task).unwrap();
                    assert!(env.score(&task, &reference).unwrap().is_full());
                }
            }
        }
        let err = Mcqa::from_jsonl_str(
            r#"{"question": "q", "choices": ["a", "b"], "answer": "Z"}"#,
            "bad.jsonl",
        )
        .unwrap_err();
        assert!(err.to_string().contains("bad.jsonl line 1"), "{err}");
    }
}
