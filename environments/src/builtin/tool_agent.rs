//! `tool_agent` (multi-turn): answer a question about hidden values by calling tools.
//!
//! The model sees `Tools: lookup(key), calc(expr).` and a question such as `What is k3+k7?`. The
//! values live only in the environment: the model must call
//! `<tool_call>{"name":"lookup","arguments":{"key":"k3"}}</tool_call>`, read the tool message that
//! comes back (`k3=7`), and finally answer with a number. `calc` evaluates `+ - * /` expressions
//! exactly. Level 0 asks for one value; higher levels combine up to four values with `+ - *`,
//! larger numbers and more keys in the table. Malformed or unknown tool calls get an error
//! message back and are counted in the score's `invalid_calls` component.

use std::collections::BTreeMap;

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use super::expr::parse_expression;
use super::numeric::{parse_number_token, parse_numeric_answer};
use crate::chat::{Message, TOOL_CALL_OPEN, ToolCall, parse_completion, parse_tool_calls};
use crate::env::{Category, EnvInfo, Environment, Episode, StepOutcome, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "tool_agent";
const MAX_DIFFICULTY: u32 = 8;
/// Turns allowed beyond the minimum (one per lookup plus the answer).
const SPARE_TURNS: u32 = 3;

/// A multi-turn tool-use environment with `lookup` and `calc` tools.
#[derive(Debug, Clone, Default)]
pub struct ToolAgent;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    /// The hidden key-value table.
    table: BTreeMap<String, i64>,
    /// Keys the question uses, in order.
    keys: Vec<String>,
    /// The question's expression over keys, e.g. `k3+k7`.
    expression: String,
    answer: String,
    max_turns: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AgentState {
    looked_up: Vec<String>,
    /// Whether a `calc` call has succeeded.
    #[serde(default)]
    calculated: bool,
    tool_calls: u32,
    invalid_calls: u32,
}

fn build(rng: &mut TaskRng, level: u32) -> Option<Verification> {
    let used = (1 + (level as usize).div_ceil(2)).min(4);
    let total = used + level as usize;
    let mut numbers: Vec<u32> = (0..100).collect();
    numbers.shuffle(rng);
    let names: Vec<String> = numbers
        .iter()
        .take(total)
        .map(|n| format!("k{n}"))
        .collect();
    let max_value = if level < 2 { 9 } else { 999 };
    let table: BTreeMap<String, i64> = names
        .iter()
        .map(|name| (name.clone(), rng.random_range(1..=max_value)))
        .collect();
    let keys: Vec<String> = names[..used].to_vec();
    let ops: &[char] = if level < 3 { &['+'] } else { &['+', '-', '*'] };
    let mut expression = keys[0].clone();
    for key in &keys[1..] {
        expression.push(*ops.choose(rng)?);
        expression.push_str(key);
    }
    let answer = evaluate_with(&expression, &table)?;
    Some(Verification {
        table,
        keys,
        expression,
        answer,
        max_turns: used as u32 + 1 + SPARE_TURNS,
    })
}

/// The key expression with each key replaced by its value (`k3+k7` → `4+9`).
fn substitute(expression: &str, table: &BTreeMap<String, i64>) -> Option<String> {
    let mut substituted = String::new();
    let mut token = String::new();
    for c in expression.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() {
            token.push(c);
            continue;
        }
        if !token.is_empty() {
            substituted.push_str(&table.get(&token)?.to_string());
            token.clear();
        }
        if c != ' ' {
            substituted.push(c);
        }
    }
    Some(substituted)
}

/// Evaluates a key expression exactly with the table's values.
fn evaluate_with(expression: &str, table: &BTreeMap<String, i64>) -> Option<String> {
    let substituted = substitute(expression, table)?;
    Some(
        parse_expression(&substituted)
            .ok()?
            .eval(false)
            .ok()?
            .to_string(),
    )
}

fn lookup_call(key: &str) -> String {
    ToolCall {
        name: "lookup".into(),
        arguments: serde_json::json!({ "key": key }),
    }
    .render()
}

impl ToolAgent {
    /// Runs one tool call, returning the tool's reply and whether the call was valid.
    fn execute(call: &ToolCall, expected: &Verification, state: &mut AgentState) -> (String, bool) {
        let argument = |name: &str| call.arguments.get(name).and_then(|v| v.as_str());
        match call.name.as_str() {
            "lookup" => match argument("key") {
                Some(key) => match expected.table.get(key.trim()) {
                    Some(value) => {
                        if !state.looked_up.iter().any(|k| k == key.trim()) {
                            state.looked_up.push(key.trim().to_string());
                        }
                        (format!("{}={value}", key.trim()), true)
                    }
                    None => (format!("error: no key {key}"), true),
                },
                None => ("error: lookup needs a string argument `key`".into(), false),
            },
            "calc" => match argument("expr") {
                Some(text) => match parse_expression(text).map(|e| e.eval(false)) {
                    Ok(Ok(value)) => {
                        state.calculated = true;
                        (format!("{text}={value}"), true)
                    }
                    Ok(Err(err)) => (format!("error: {err}"), true),
                    Err(err) => (format!("error: {err}"), true),
                },
                None => ("error: calc needs a string argument `expr`".into(), false),
            },
            other => (
                format!("error: unknown tool {other}; use lookup or calc"),
                false,
            ),
        }
    }

    fn score_answer(expected: &Verification, response: &str) -> Score {
        if response.contains(TOOL_CALL_OPEN) {
            return Score::zero("expected an answer, got a tool call")
                .with_component("correct", 0.0);
        }
        let want = parse_number_token(&expected.answer);
        match parse_numeric_answer(response) {
            None => Score::zero("no number in the answer").with_component("correct", 0.0),
            Some(given) if Some(given) == want => {
                Score::full(format!("{} = {}", expected.expression, expected.answer))
                    .with_component("correct", 1.0)
            }
            Some(given) => Score::zero(format!(
                "{given} is wrong: {} = {}",
                expected.expression, expected.answer
            ))
            .with_component("correct", 0.0),
        }
    }
}

fn load_state(task: &Task, episode: &Episode) -> Result<AgentState, EnvError> {
    if episode.state.is_null() {
        return Ok(AgentState::default());
    }
    serde_json::from_value(episode.state.clone()).map_err(|err| EnvError::BadEpisodeState {
        task_id: task.id.clone(),
        message: err.to_string(),
    })
}

impl Environment for ToolAgent {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::ToolUse,
            turns: Turns::Multi,
            // Four lookups, the answer, and the spare turns.
            max_turns: 4 + 1 + SPARE_TURNS,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description:
                "Look up hidden values with tools (lookup, calc) over several turns, then answer"
                    .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let verification = build(rng, level)?;
            // The split follows what the model sees (the question), not the hidden values, so a
            // heldout question is never asked in train, whatever the table holds.
            Some((verification.expression.clone(), verification))
        })?;
        let tools = if level == 0 {
            "lookup(key)"
        } else {
            "lookup(key), calc(expr)"
        };
        let prompt = vec![Message::user(format!(
            "Tools: {tools}.\nWhat is {}?",
            verification.expression
        ))];
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        let id_key = format!("{key}|{:?}", verification.table);
        make_task(origin, &id_key, prompt, &verification)
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        Ok(match response_or_zero(completion) {
            Ok(response) => Self::score_answer(&expected, &response),
            Err(zero) => zero,
        })
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        Ok(expected
            .keys
            .first()
            .map(|key| lookup_call(key))
            .unwrap_or(expected.answer))
    }

    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        self.check_task(task)?;
        let state =
            serde_json::to_value(AgentState::default()).map_err(|source| EnvError::Serialize {
                env: NAME.into(),
                source,
            })?;
        Ok(Episode::new(task, state))
    }

    fn step(
        &self,
        task: &Task,
        episode: &mut Episode,
        action: &str,
    ) -> Result<StepOutcome, EnvError> {
        self.check_task(task)?;
        if episode.done {
            return Err(EnvError::EpisodeFinished {
                task_id: task.id.clone(),
            });
        }
        let expected: Verification = task.verification_as()?;
        let mut state = load_state(task, episode)?;
        episode.messages.push(Message::assistant(action));
        episode.turn += 1;
        let parsed = parse_completion(action);
        let mut outcome = if parsed.response.contains(TOOL_CALL_OPEN) && !parsed.unterminated_think
        {
            let reply = match parse_tool_calls(&parsed.response) {
                Ok(calls) => {
                    let mut lines = Vec::new();
                    for call in &calls {
                        let (line, valid) = Self::execute(call, &expected, &mut state);
                        state.tool_calls += 1;
                        state.invalid_calls += u32::from(!valid);
                        lines.push(line);
                    }
                    lines.join("\n")
                }
                Err(err) => {
                    state.tool_calls += 1;
                    state.invalid_calls += 1;
                    format!("error: {err}")
                }
            };
            StepOutcome {
                observation: Some(Message::tool(reply)),
                done: false,
                score: None,
            }
        } else {
            let score = match response_or_zero(action) {
                Ok(response) => Self::score_answer(&expected, &response),
                Err(zero) => zero,
            };
            StepOutcome {
                observation: None,
                done: true,
                score: Some(score),
            }
        };
        if !outcome.done && episode.turn >= expected.max_turns {
            outcome.done = true;
            outcome.score = Some(
                Score::zero(format!("no answer within {} turns", expected.max_turns))
                    .with_component("correct", 0.0),
            );
        }
        if let Some(score) = outcome.score.take() {
            outcome.score = Some(
                score
                    .with_component("tool_calls", f64::from(state.tool_calls))
                    .with_component("invalid_calls", f64::from(state.invalid_calls)),
            );
        }
        if let Some(observation) = &outcome.observation {
            episode.messages.push(observation.clone());
        }
        episode.done = outcome.done;
        episode.state = serde_json::to_value(&state).map_err(|source| EnvError::Serialize {
            env: NAME.into(),
            source,
        })?;
        Ok(outcome)
    }

    /// Looks up every key, then (for more than one value) has `calc` do the arithmetic, then
    /// answers: the behaviour SFT warm-up should teach.
    fn reference_action(&self, task: &Task, episode: &Episode) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let state = load_state(task, episode)?;
        if let Some(key) = expected
            .keys
            .iter()
            .find(|key| !state.looked_up.contains(key))
        {
            return Ok(lookup_call(key));
        }
        if expected.keys.len() > 1 && !state.calculated {
            let substituted =
                substitute(&expected.expression, &expected.table).ok_or_else(|| {
                    task.invalid_verification("the expression names a key not in the table")
                })?;
            let call = ToolCall {
                name: "calc".into(),
                arguments: serde_json::json!({ "expr": substituted }),
            };
            return Ok(call.render());
        }
        Ok(expected.answer)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let answer: i64 = expected.answer.parse().unwrap_or(0);
        Ok(vec![
            (answer + 1).to_string(),
            self.reference(task)?,
            expected.expression,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;
    use crate::check::run_reference_episode;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&ToolAgent, &[0, 1, 3, 8], 10);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&ToolAgent, 0, 200);
        assert_splits_disjoint(&ToolAgent, 5, 100);
    }

    #[test]
    fn an_episode_alternates_calls_and_tool_results() {
        let task = train_task(&ToolAgent, 4, 2);
        let expected: Verification = task.verification_as().unwrap();
        let mut episode = ToolAgent.start(&task).unwrap();
        let first = ToolAgent
            .step(&task, &mut episode, &lookup_call(&expected.keys[0]))
            .unwrap();
        assert!(!first.done);
        let reply = first.observation.unwrap();
        assert_eq!(
            reply.content,
            format!("{}={}", expected.keys[0], expected.table[&expected.keys[0]])
        );
        let bad = ToolAgent
            .step(&task, &mut episode, "<tool_call>{oops}</tool_call>")
            .unwrap();
        assert!(bad.observation.unwrap().content.starts_with("error:"));
        let calc = ToolCall {
            name: "calc".into(),
            arguments: serde_json::json!({"expr": "6*7"}),
        }
        .render();
        let reply = ToolAgent
            .step(&task, &mut episode, &calc)
            .unwrap()
            .observation
            .unwrap();
        assert_eq!(reply.content, "6*7=42");
        let end = ToolAgent
            .step(
                &task,
                &mut episode,
                &format!("<think>done</think>{}", expected.answer),
            )
            .unwrap();
        assert!(end.done);
        let score = end.score.unwrap();
        assert!(score.is_full(), "{score:?}");
        assert_eq!(score.component("invalid_calls"), Some(1.0));
        assert_eq!(score.component("tool_calls"), Some(3.0));
        assert_eq!(episode.messages.len(), 1 + 2 * 3 + 1);
        assert!(matches!(
            ToolAgent.step(&task, &mut episode, "1"),
            Err(EnvError::EpisodeFinished { .. })
        ));
    }

    #[test]
    fn running_out_of_turns_scores_zero() {
        let task = train_task(&ToolAgent, 1, 0);
        let mut episode = ToolAgent.start(&task).unwrap();
        let call = lookup_call("k1000");
        let mut last = None;
        while !episode.done {
            last = Some(ToolAgent.step(&task, &mut episode, &call).unwrap());
        }
        let score = last.unwrap().score.unwrap();
        assert_eq!(score.reward, 0.0);
        assert!(score.reason.contains("turns"), "{}", score.reason);
    }

    #[test]
    fn reference_policy_looks_up_every_key_then_calculates() {
        let task = train_task(&ToolAgent, 2, 8);
        let expected: Verification = task.verification_as().unwrap();
        let score = run_reference_episode(&ToolAgent, &task).unwrap();
        assert!(score.is_full());
        assert_eq!(expected.keys.len(), 4);
        // Four lookups and one calc.
        assert_eq!(score.component("tool_calls"), Some(5.0));
    }
}
