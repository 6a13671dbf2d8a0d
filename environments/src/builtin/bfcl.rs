//! `function_calling` over a user's BFCL dataset (Berkeley Function Calling Leaderboard, the
//! single-turn AST categories: simple, multiple, parallel, parallel-multiple).
//!
//! BFCL keeps questions and answers in two files: question rows (`id`, `question` — turns, each a
//! list of `{role, content}` messages — and `function`, the JSON-schema documentation of the
//! callable functions) and `possible_answer` rows (`id`, `ground_truth`: a list of calls, each
//! `{function_name: {parameter: [acceptable values]}}`, where `""` among the values marks an
//! optional parameter that may be left out). [`Bfcl::from_files`] joins the two by `id`; rows that
//! already carry `ground_truth` (joined by the user) are read by [`Bfcl::from_jsonl_str`].
//!
//! The functions are listed in a system message; the model answers with one `<tool_call>` per
//! expected call. A call is right when its name matches and every argument is one of the
//! acceptable values (strings ignoring case and surrounding space, numbers by value, lists and
//! objects element by element); required parameters must be present and unknown ones absent.
//! Parallel calls are matched in any order.

use std::collections::BTreeMap;
use std::path::Path;

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::datasets::{Row, parse_jsonl, read_jsonl, row_error};
use crate::chat::{self, Message, Role, ToolCall, parse_tool_calls};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, make_task, split_of, task_rng};
use crate::task::{Score, Split, Task};

const NAME: &str = "function_calling";
const DATASET_SPLIT_NAMESPACE: &str = "dataset";

/// One expected call: the function and, per parameter, the values that are accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ExpectedCall {
    name: String,
    /// Acceptable values per parameter; `""` among them means the parameter may be omitted.
    arguments: BTreeMap<String, Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Verification {
    calls: Vec<ExpectedCall>,
    /// Parameters each listed function declares, to tell a wrong argument from an unknown one.
    parameters: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone)]
struct Item {
    id: String,
    prompt: Vec<Message>,
    verification: Verification,
}

/// Function calling on BFCL rows.
#[derive(Debug, Clone)]
pub struct Bfcl {
    items: Vec<Item>,
}

fn parse_calls(
    ground_truth: &Value,
    source: &str,
    line: usize,
) -> Result<Vec<ExpectedCall>, EnvError> {
    let calls = ground_truth
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            row_error(
                source,
                line,
                "`ground_truth` must be a non-empty list of calls",
            )
        })?;
    calls
        .iter()
        .map(|call| {
            let object = call.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
                row_error(
                    source,
                    line,
                    "each `ground_truth` call must be {\"function_name\": {\"param\": [values]}}",
                )
            })?;
            let (name, params) = object.iter().next().expect("one entry");
            let params = params.as_object().ok_or_else(|| {
                row_error(
                    source,
                    line,
                    format!("the parameters of `{name}` must be an object"),
                )
            })?;
            let arguments = params
                .iter()
                .map(|(k, v)| {
                    let values = match v {
                        Value::Array(values) if !values.is_empty() => values.clone(),
                        _ => {
                            return Err(row_error(
                                source,
                                line,
                                format!("`{name}.{k}` must list its acceptable values"),
                            ));
                        }
                    };
                    Ok((k.clone(), values))
                })
                .collect::<Result<_, _>>()?;
            Ok(ExpectedCall {
                name: name.clone(),
                arguments,
            })
        })
        .collect()
}

fn item(row: &Row, ground_truth: &Value, source: &str) -> Result<Item, EnvError> {
    let line = row.line;
    let id = row
        .value
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let turns = row
        .value
        .get("question")
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| row_error(source, line, "missing `question` (a list of turns)"))?;
    if turns.len() > 1 {
        return Err(row_error(
            source,
            line,
            format!(
                "{} turns: multi-turn BFCL categories are not supported, only single-turn ones",
                turns.len()
            ),
        ));
    }
    let functions = row
        .value
        .get("function")
        .and_then(Value::as_array)
        .filter(|f| !f.is_empty())
        .ok_or_else(|| row_error(source, line, "missing `function` (the function docs)"))?;
    let mut parameters = BTreeMap::new();
    for f in functions {
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| row_error(source, line, "a `function` entry has no `name`"))?;
        let declared: Vec<String> = f
            .pointer("/parameters/properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        parameters.insert(name.to_string(), declared);
    }
    let mut prompt = vec![Message::system(chat::tool_section(functions))];
    for message in turns[0].as_array().into_iter().flatten() {
        let content = message
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| row_error(source, line, "a question message has no `content`"))?;
        let role = match message.get("role").and_then(Value::as_str) {
            Some("system") => Role::System,
            Some("user") | None => Role::User,
            Some(other) => {
                return Err(row_error(
                    source,
                    line,
                    format!("question role `{other}`; allowed: system, user"),
                ));
            }
        };
        prompt.push(Message::new(role, content));
    }
    if prompt.len() < 2 {
        return Err(row_error(source, line, "the question has no message"));
    }
    let calls = parse_calls(ground_truth, source, line)?;
    for call in &calls {
        if !parameters.contains_key(&call.name) {
            return Err(row_error(
                source,
                line,
                format!(
                    "`ground_truth` calls `{}`, which `function` does not list",
                    call.name
                ),
            ));
        }
    }
    Ok(Item {
        id,
        prompt,
        verification: Verification { calls, parameters },
    })
}

impl Bfcl {
    /// Rows that carry `question`, `function` and `ground_truth` (question and answer files
    /// already joined by `id`). `source_name` labels errors.
    pub fn from_jsonl_str(text: &str, source_name: &str) -> Result<Self, EnvError> {
        let items = parse_jsonl(text, source_name)?
            .iter()
            .map(|row| {
                let truth = row.value.get("ground_truth").ok_or_else(|| {
                    row_error(
                        source_name,
                        row.line,
                        "missing `ground_truth`: join the question row with its possible_answer \
                         row (same `id`), or pass both files to Bfcl::from_files",
                    )
                })?;
                item(row, truth, source_name)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { items })
    }

    /// A BFCL question file and its possible_answer file, joined by `id`.
    pub fn from_files(questions: &Path, answers: &Path) -> Result<Self, EnvError> {
        let answer_name = answers.display().to_string();
        let mut truths = BTreeMap::new();
        for row in read_jsonl(answers)? {
            let id = row
                .value
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| row_error(&answer_name, row.line, "missing string `id`"))?
                .to_string();
            let truth = row
                .value
                .get("ground_truth")
                .cloned()
                .ok_or_else(|| row_error(&answer_name, row.line, "missing `ground_truth`"))?;
            truths.insert(id, truth);
        }
        let question_name = questions.display().to_string();
        let items = read_jsonl(questions)?
            .iter()
            .map(|row| {
                let id = row
                    .value
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let truth = truths.get(id).ok_or_else(|| {
                    row_error(
                        &question_name,
                        row.line,
                        format!("no possible_answer row with id `{id}` in {answer_name}"),
                    )
                })?;
                item(row, truth, &question_name)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { items })
    }
}

/// Whether `given` is the same value as `want`, BFCL-style: strings ignoring case and
/// surrounding space, numbers by value (a quoted number too), lists and objects element-wise.
/// The generated `function_calling` tasks compare their arguments with it too.
pub(super) fn same_value(want: &Value, given: &Value) -> bool {
    match (want, given) {
        (Value::String(a), Value::String(b)) => a.trim().eq_ignore_ascii_case(b.trim()),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Number(a), Value::String(b)) => b.trim().parse::<f64>().ok() == a.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_value(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            // Nested objects list acceptable values per key, like top-level parameters.
            a.iter().all(|(k, v)| match (v, b.get(k)) {
                (Value::Array(options), Some(g)) => options.iter().any(|o| same_value(o, g)),
                (Value::Array(options), None) => options.iter().any(is_omittable),
                (v, Some(g)) => same_value(v, g),
                (_, None) => false,
            }) && b.keys().all(|k| a.contains_key(k))
        }
        (a, b) => a == b,
    }
}

fn is_omittable(v: &Value) -> bool {
    v.as_str() == Some("")
}

/// Why `call` does not satisfy `want`, if it does not.
fn mismatch(want: &ExpectedCall, call: &ToolCall, declared: &[String]) -> Option<String> {
    if call.name != want.name {
        return Some(format!("called {}, expected {}", call.name, want.name));
    }
    let given: Map<String, Value> = call.arguments.as_object().cloned().unwrap_or_default();
    let mut problems = vec![];
    for (key, options) in &want.arguments {
        match given.get(key) {
            Some(g) if options.iter().any(|o| !is_omittable(o) && same_value(o, g)) => {}
            Some(g) => problems.push(format!("{}.{key}={g} is not an accepted value", want.name)),
            None if options.iter().any(is_omittable) => {}
            None => problems.push(format!("{}: missing {key}", want.name)),
        }
    }
    for key in given.keys().filter(|k| !want.arguments.contains_key(*k)) {
        if declared.contains(key) {
            problems.push(format!("{}.{key} was not asked for", want.name));
        } else {
            problems.push(format!("{} has no parameter {key}", want.name));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

impl Environment for Bfcl {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::ToolUse,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: 0,
            description: format!(
                "{} BFCL function-calling questions from a dataset; calls compared by value",
                self.items.len()
            ),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let key = |it: &Item| {
            serde_json::to_string(&(&it.prompt, &it.verification.calls)).unwrap_or_default()
        };
        let in_split: Vec<&Item> = self
            .items
            .iter()
            .filter(|it| split_of(DATASET_SPLIT_NAMESPACE, &key(it)) == split)
            .collect();
        if in_split.is_empty() {
            return Err(EnvError::SplitExhausted {
                env: NAME.into(),
                split,
                difficulty,
                seed,
                attempts: self.items.len(),
            });
        }
        let it = in_split[task_rng(NAME, seed, 0).random_range(0..in_split.len())];
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        let mut task = make_task(origin, &key(it), it.prompt.clone(), &it.verification)?;
        if !it.id.is_empty() {
            task.id = format!("{}-{}", task.id, it.id);
        }
        Ok(task)
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let calls = match parse_tool_calls(&response) {
            Err(err) => {
                return Ok(Score::zero(format!("malformed tool call: {err}"))
                    .with_component("called", 0.0));
            }
            Ok(calls) if calls.is_empty() => {
                return Ok(Score::zero("no tool call").with_component("called", 0.0));
            }
            Ok(calls) => calls,
        };
        if calls.len() != expected.calls.len() {
            return Ok(Score::zero(format!(
                "{} tool calls, expected {}",
                calls.len(),
                expected.calls.len()
            ))
            .with_component("called", 1.0)
            .with_component("calls", 0.0));
        }
        // Parallel calls in any order: match each expected call to a distinct given one.
        let mut used = vec![false; calls.len()];
        let mut problems = vec![];
        let mut right = 0;
        for want in &expected.calls {
            let declared = expected
                .parameters
                .get(&want.name)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let found = (0..calls.len())
                .find(|&i| !used[i] && mismatch(want, &calls[i], declared).is_none());
            match found {
                Some(i) => {
                    used[i] = true;
                    right += 1;
                }
                None => {
                    let why = calls
                        .iter()
                        .enumerate()
                        .filter(|(i, c)| !used[*i] && c.name == want.name)
                        .find_map(|(_, c)| mismatch(want, c, declared))
                        .unwrap_or_else(|| format!("no call to {}", want.name));
                    let accepted = serde_json::to_string(&want.arguments).unwrap_or_default();
                    problems.push(format!("{why} (accepted {}: {accepted})", want.name));
                }
            }
        }
        let fraction = right as f64 / expected.calls.len() as f64;
        let reason = if problems.is_empty() {
            format!("{right} correct call(s)")
        } else {
            problems.join("; ")
        };
        Ok(Score::binary(problems.is_empty(), reason)
            .with_component("called", 1.0)
            .with_component("calls", fraction))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        Ok(expected
            .calls
            .iter()
            .map(|call| {
                let arguments: Map<String, Value> = call
                    .arguments
                    .iter()
                    .filter_map(|(k, options)| {
                        options
                            .iter()
                            .find(|o| !is_omittable(o))
                            .map(|v| (k.clone(), v.clone()))
                    })
                    .collect();
                ToolCall {
                    name: call.name.clone(),
                    arguments: Value::Object(arguments),
                }
                .render()
            })
            .collect())
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        let reference = self.reference(task)?;
        let expected: Verification = task.verification_as()?;
        let first = &expected.calls[0];
        let renamed = ToolCall {
            name: format!("{}_x", first.name),
            arguments: Value::Object(Map::new()),
        }
        .render();
        Ok(vec![
            renamed,
            format!("{reference}{reference}"),
            reference.replace("</tool_call>", ""),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROWS: &str = r#"{"id": "simple_0", "question": [[{"role": "user", "content": "Find the area of a triangle with base 10 and height 5."}]], "function": [{"name": "calculate_triangle_area", "description": "Area of a triangle.", "parameters": {"type": "dict", "properties": {"base": {"type": "integer"}, "height": {"type": "integer"}, "unit": {"type": "string"}}, "required": ["base", "height"]}}], "ground_truth": [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]}
{"id": "parallel_0", "question": [[{"role": "user", "content": "Weather in Boston and in Paris?"}]], "function": [{"name": "get_weather", "parameters": {"type": "dict", "properties": {"city": {"type": "string"}}, "required": ["city"]}}], "ground_truth": [{"get_weather": {"city": ["Boston", "Boston, MA"]}}, {"get_weather": {"city": ["Paris"]}}]}
"#;

    fn task_for(env: &Bfcl, id: &str) -> Task {
        for split in Split::ALL {
            for seed in 0..50 {
                if let Ok(t) = env.sample(seed, split, 0)
                    && t.id.ends_with(id)
                {
                    return t;
                }
            }
        }
        panic!("no task {id}");
    }

    fn call(name: &str, args: Value) -> String {
        ToolCall {
            name: name.into(),
            arguments: args,
        }
        .render()
    }

    #[test]
    fn reads_rows_and_scores_calls_by_accepted_values() {
        let env = Bfcl::from_jsonl_str(ROWS, "bfcl.jsonl").unwrap();
        let t = task_for(&env, "simple_0");
        assert_eq!(t.prompt[0].role, Role::System);
        assert!(t.prompt[0].content.contains("calculate_triangle_area"));
        let score = |c: String| env.score(&t, &c).unwrap();
        assert!(score(env.reference(&t).unwrap()).is_full());
        // The optional unit may be omitted or given; numbers compare by value.
        assert!(
            score(call(
                "calculate_triangle_area",
                serde_json::json!({"base": 10.0, "height": "5"})
            ))
            .is_full()
        );
        assert!(
            score(call(
                "calculate_triangle_area",
                serde_json::json!({"base": 10, "height": 5, "unit": "UNITS"})
            ))
            .is_full()
        );
        let wrong = score(call(
            "calculate_triangle_area",
            serde_json::json!({"base": 10, "height": 6}),
        ));
        assert!(
            !wrong.is_full() && wrong.reason.contains("height"),
            "{}",
            wrong.reason
        );
        let missing = score(call(
            "calculate_triangle_area",
            serde_json::json!({"base": 10}),
        ));
        assert!(
            missing.reason.contains("missing height"),
            "{}",
            missing.reason
        );
        let extra = score(call(
            "calculate_triangle_area",
            serde_json::json!({"base": 10, "height": 5, "color": "red"}),
        ));
        assert!(
            extra.reason.contains("no parameter color"),
            "{}",
            extra.reason
        );
        for w in env.wrong_completions(&t).unwrap() {
            assert!(!score(w).is_full());
        }
    }

    #[test]
    fn parallel_calls_match_in_any_order() {
        let env = Bfcl::from_jsonl_str(ROWS, "bfcl.jsonl").unwrap();
        let t = task_for(&env, "parallel_0");
        let paris = call("get_weather", serde_json::json!({"city": "Paris"}));
        let boston = call("get_weather", serde_json::json!({"city": "Boston, MA"}));
        assert!(
            env.score(&t, &format!("{paris}{boston}"))
                .unwrap()
                .is_full()
        );
        assert!(
            env.reference(&t)
                .map(|r| env.score(&t, &r).unwrap().is_full())
                .unwrap()
        );
        let one = env.score(&t, &paris).unwrap();
        assert!(!one.is_full() && one.reason.contains("expected 2"));
        let twice = env.score(&t, &format!("{paris}{paris}")).unwrap();
        assert!(
            !twice.is_full() && twice.reason.contains("Boston"),
            "{}",
            twice.reason
        );
    }

    #[test]
    fn question_and_answer_files_join_by_id_and_bad_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q.json");
        let a = dir.path().join("a.json");
        std::fs::write(&q, r#"{"id": "s1", "question": [[{"role": "user", "content": "Play Blue Sky"}]], "function": [{"name": "play", "parameters": {"properties": {"title": {}}}}]}"#).unwrap();
        std::fs::write(
            &a,
            r#"{"id": "s1", "ground_truth": [{"play": {"title": ["Blue Sky"]}}]}"#,
        )
        .unwrap();
        let env = Bfcl::from_files(&q, &a).unwrap();
        let t = task_for(&env, "s1");
        assert!(
            env.score(&t, &env.reference(&t).unwrap())
                .unwrap()
                .is_full()
        );
        std::fs::write(&a, r#"{"id": "other", "ground_truth": []}"#).unwrap();
        let err = Bfcl::from_files(&q, &a).unwrap_err().to_string();
        assert!(err.contains("s1") && err.contains("line 1"), "{err}");
        let err = Bfcl::from_jsonl_str(r#"{"id": "x", "question": [[{"role": "user", "content": "hi"}]], "function": [{"name": "f"}]}"#, "joined.jsonl").unwrap_err().to_string();
        assert!(
            err.contains("ground_truth") && err.contains("joined.jsonl"),
            "{err}"
        );
    }
}
