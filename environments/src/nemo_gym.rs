//! `nemo_gym`: NeMo Gym resources servers as Chorus environments.
//!
//! A NeMo Gym environment is a JSONL file of data rows and an HTTP server that verifies answers.
//! Each row holds `responses_create_params` (OpenAI Responses create params, whose `input` is
//! the prompt) and the server's own fields (`expected_answer`, `options`, `schema_str`…).
//! [`NemoGym`] samples rows (train/heldout by a hash of the row, like every dataset-reading
//! environment), shows the model the row's `input` through Chorus' chat template, and scores a
//! completion by
//!
//! 1. `POST /seed_session` with `{}`, keeping the session cookie it sets;
//! 2. `POST /verify` with the cookie and a body that is the row's own fields (with
//!    `responses_create_params` exactly as the row has it) plus `response`: an OpenAI Responses
//!    `Response` whose one output message holds the model's answer (think block removed) as an
//!    `output_text` part;
//! 3. reading the answer's `reward` as the score, with the server's other numeric fields as
//!    components and `extracted_answer` / `error_type` in the reason.
//!
//! Servers may be slow or fail: each request has a deadline and connection errors, timeouts and
//! 5xx answers are retried a bounded number of times, after which only that completion fails
//! (an [`EnvError::Remote`] naming the server and the request). NeMo Gym rows carry no reference
//! solutions, so these environments serve RL stages, evaluation and `chorus env score`, not SFT
//! warm-up.

use std::path::Path;
use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value, json};

use crate::chat::{Message, Role, ToolCall};
use crate::env::{Category, EnvInfo, Environment, response_or_zero};
use crate::error::EnvError;
use crate::nemo_gym_http::{BaseUrl, post_json};
use crate::plugin::runtime::BlockingRuntime;
use crate::sampling::{split_of, stable_hash, task_rng};
use crate::task::{Score, ScoreComponent, Split, Task};

/// The namespace of the content-hash split of NeMo Gym rows.
const SPLIT_NAMESPACE: &str = "nemo_gym";

/// Deadlines and retries of the HTTP calls.
#[derive(Debug, Clone, PartialEq)]
pub struct NemoGymOptions {
    /// Longest wait for one HTTP request.
    pub timeout: Duration,
    /// Further attempts after a connection error, a timeout or a 5xx answer.
    pub retries: u32,
}

impl Default for NemoGymOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            retries: 3,
        }
    }
}

#[derive(Debug, Clone)]
struct Row {
    /// 1-based line in the file.
    line: usize,
    /// The row as read.
    value: Value,
    prompt: Vec<Message>,
    split: Split,
    /// Hash of the row's content.
    key: String,
}

/// A NeMo Gym resources server and its data rows, as one environment (see the module docs).
pub struct NemoGym {
    name: String,
    url: String,
    base: BaseUrl,
    source_name: String,
    rows: Vec<Row>,
    category: Category,
    options: NemoGymOptions,
    runtime: BlockingRuntime,
}

impl std::fmt::Debug for NemoGym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NemoGym")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("rows", &self.rows.len())
            .finish_non_exhaustive()
    }
}

impl NemoGym {
    /// Reads the JSONL data rows at `path` for the server at `url` (`http://host:port`); the
    /// environment is registered and reported as `name`. Nothing is sent to the server yet.
    pub fn from_jsonl_file(
        name: impl Into<String>,
        url: &str,
        path: impl AsRef<Path>,
    ) -> Result<Self, EnvError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| EnvError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_jsonl_str(name, url, &text, &path.display().to_string())
    }

    /// [`from_jsonl_file`](Self::from_jsonl_file) from text; `source_name` labels errors.
    pub fn from_jsonl_str(
        name: impl Into<String>,
        url: &str,
        text: &str,
        source_name: &str,
    ) -> Result<Self, EnvError> {
        let name = name.into();
        let base = BaseUrl::parse(url).map_err(|message| EnvError::InvalidConfig {
            env: name.clone(),
            message: format!("url `{url}`: {message}"),
        })?;
        let mut rows = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            rows.push(parse_row(line, index + 1, source_name)?);
        }
        if rows.is_empty() {
            return Err(EnvError::DatasetRow {
                source_name: source_name.to_string(),
                line: 0,
                message: "the dataset has no rows".into(),
            });
        }
        Ok(Self {
            runtime: BlockingRuntime::new(url)?,
            name,
            url: url.to_string(),
            base,
            source_name: source_name.to_string(),
            rows,
            category: Category::Knowledge,
            options: NemoGymOptions::default(),
        })
    }

    /// The same environment in another category (default `knowledge`).
    pub fn with_category(mut self, category: Category) -> Self {
        self.category = category;
        self
    }

    /// The same environment with other deadlines and retries.
    pub fn with_options(mut self, options: NemoGymOptions) -> Self {
        self.options = options;
        self
    }

    /// How many data rows there are.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are none (never true for a constructed environment).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The task of the row on 1-based `line` of the file, if a row is there (for scoring given
    /// completions of a dataset offline).
    pub fn task_at_line(&self, line: usize) -> Option<Task> {
        let row = self.rows.iter().find(|r| r.line == line)?;
        self.task_of(row, 0).ok()
    }

    fn task_of(&self, row: &Row, seed: u64) -> Result<Task, EnvError> {
        Ok(Task {
            id: format!("{}-{}-{}", self.name, row.split, row.key),
            env: self.name.clone(),
            split: row.split,
            difficulty: 0,
            seed,
            prompt: row.prompt.clone(),
            verification: json!({ "row": row.value }),
        })
    }

    fn remote_error(&self, call: &str, message: impl Into<String>) -> EnvError {
        EnvError::Remote {
            url: self.url.clone(),
            call: call.to_string(),
            message: message.into(),
        }
    }

    /// `/seed_session` then `/verify`; the verify answer's JSON.
    fn verify(&self, body: Value) -> Result<Map<String, Value>, EnvError> {
        let base = self.base.clone();
        let timeout = self.options.timeout;
        let retries = self.options.retries;
        let body = bytes::Bytes::from(body.to_string());
        let answer = self.runtime.run(async move {
            let seeded = post_json(
                &base,
                "/seed_session",
                bytes::Bytes::from_static(b"{}"),
                None,
                timeout,
                retries,
            )
            .await
            .map_err(|m| ("POST /seed_session", m))?;
            let cookie = (!seeded.cookies.is_empty()).then(|| seeded.cookies.join("; "));
            post_json(&base, "/verify", body, cookie.as_deref(), timeout, retries)
                .await
                .map_err(|m| ("POST /verify", m))
        });
        let answer = answer.map_err(|(call, message)| self.remote_error(call, message))?;
        match serde_json::from_slice::<Value>(&answer.body) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(other) => Err(self.remote_error(
                "POST /verify",
                format!("the answer is not a JSON object: {other}"),
            )),
            Err(e) => {
                Err(self.remote_error("POST /verify", format!("the answer is not JSON: {e}")))
            }
        }
    }
}

/// An OpenAI Responses `Response` object holding `text` as the one output message, with every
/// field NeMo Gym's validation requires.
pub fn response_object(text: &str, id: &str) -> Value {
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "id": format!("resp_{id}"),
        "created_at": created_at,
        "model": "chorus-policy",
        "object": "response",
        "parallel_tool_calls": false,
        "tool_choice": "auto",
        "tools": [],
        "output": [{
            "id": format!("msg_{id}"),
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }],
    })
}

fn parse_row(line_text: &str, line: usize, source_name: &str) -> Result<Row, EnvError> {
    let err = |message: String| EnvError::DatasetRow {
        source_name: source_name.to_string(),
        line,
        message,
    };
    let value: Value =
        serde_json::from_str(line_text).map_err(|e| err(format!("not JSON: {e}")))?;
    let params = value
        .get("responses_create_params")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            err("missing object `responses_create_params` (NeMo Gym rows carry the prompt in responses_create_params.input)".into())
        })?;
    let mut prompt = Vec::new();
    if let Some(instructions) = params.get("instructions").and_then(Value::as_str) {
        prompt.push(Message::system(instructions));
    }
    match params.get("input") {
        Some(Value::String(text)) => prompt.push(Message::user(text.clone())),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                prompt.push(
                    input_item(item)
                        .map_err(|m| err(format!("responses_create_params.input[{i}]: {m}")))?,
                );
            }
        }
        _ => {
            return Err(err(
                "missing `responses_create_params.input` (a string or a list of messages)".into(),
            ));
        }
    }
    if !prompt.iter().any(|m| m.role == Role::User) {
        return Err(err(
            "responses_create_params.input has no user message".into()
        ));
    }
    let canonical = value.to_string();
    let split = split_of(SPLIT_NAMESPACE, &canonical);
    Ok(Row {
        line,
        key: format!("{:016x}", stable_hash(canonical.as_bytes())),
        value,
        prompt,
        split,
    })
}

/// One item of a Responses `input` list as a chat message.
fn input_item(item: &Value) -> Result<Message, String> {
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    match kind {
        "message" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                other => {
                    return Err(format!(
                        "role {other:?}; allowed: system, developer, user, assistant"
                    ));
                }
            };
            let content = match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
                _ => return Err("`content` is neither a string nor a list of parts".into()),
            };
            Ok(Message::new(role, content))
        }
        "function_call" => {
            let name = item.get("name").and_then(Value::as_str).unwrap_or_default();
            let arguments = item
                .get("arguments")
                .and_then(Value::as_str)
                .and_then(|a| serde_json::from_str(a).ok())
                .unwrap_or(Value::Null);
            Ok(Message::assistant(
                ToolCall {
                    name: name.to_string(),
                    arguments,
                }
                .render(),
            ))
        }
        "function_call_output" => Ok(Message::tool(
            item.get("output")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        )),
        other => Err(format!(
            "item type `{other}`; allowed: message, function_call, function_call_output"
        )),
    }
}

impl Environment for NemoGym {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: self.name.clone(),
            category: self.category,
            turns: crate::env::Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: 0,
            description: format!(
                "{} NeMo Gym rows from {}, verified by {}",
                self.rows.len(),
                self.source_name,
                self.url
            ),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        // Rows carry no difficulty: every level draws from the whole split.
        let in_split: Vec<&Row> = self.rows.iter().filter(|r| r.split == split).collect();
        if in_split.is_empty() {
            return Err(EnvError::SplitExhausted {
                env: self.name.clone(),
                split,
                difficulty,
                seed,
                attempts: self.rows.len(),
            });
        }
        let index = task_rng(&self.name, seed, 0).random_range(0..in_split.len());
        let mut task = self.task_of(in_split[index], seed)?;
        task.difficulty = difficulty;
        Ok(task)
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let row = match task.verification.get("row") {
            Some(Value::Object(row)) => row.clone(),
            _ => return Err(task.invalid_verification("no NeMo Gym `row` object")),
        };
        let text = match response_or_zero(completion) {
            Ok(text) => text,
            Err(zero) => return Ok(zero),
        };
        let id = format!(
            "{:016x}",
            stable_hash(format!("{}\0{completion}", task.id).as_bytes())
        );
        let mut body = row.clone();
        body.insert("response".into(), response_object(&text, &id));
        let answer = self.verify(Value::Object(body))?;
        let reward = answer
            .get("reward")
            .and_then(Value::as_f64)
            .filter(|r| r.is_finite())
            .ok_or_else(|| {
                self.remote_error("POST /verify", "the answer has no finite numeric `reward`")
            })?;
        let mut components = vec![ScoreComponent {
            name: "reward".into(),
            value: reward,
        }];
        for (key, value) in &answer {
            if key != "reward"
                && !row.contains_key(key)
                && let Some(v) = value.as_f64()
            {
                components.push(ScoreComponent {
                    name: key.clone(),
                    value: v,
                });
            }
        }
        let mut reason = format!("NeMo Gym verify: reward {reward}");
        for key in ["extracted_answer", "error_type"] {
            match answer.get(key) {
                Some(Value::Null) | None => {}
                Some(Value::String(s)) => reason.push_str(&format!(", {key} {s:?}")),
                Some(other) => reason.push_str(&format!(", {key} {other}")),
            }
        }
        Ok(Score {
            reward,
            components,
            reason,
        })
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Err(EnvError::NoReference {
            env: self.name.clone(),
            task_id: task.id.clone(),
            reason: "NeMo Gym rows carry no reference solution; use nemo_gym environments in RL \
                     stages and evaluation, not SFT warm-up"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROWS: &str = r#"{"responses_create_params": {"input": [{"role": "system", "content": "Answer in \\boxed{}."}, {"role": "user", "content": [{"type": "input_text", "text": "2+2?"}]}]}, "expected_answer": "4"}

{"responses_create_params": {"input": "Capital of France?", "instructions": "Be brief."}, "expected_answer": "Paris"}
"#;

    #[test]
    fn rows_become_chat_prompts_with_their_line_numbers() {
        let env = NemoGym::from_jsonl_str("gym", "http://127.0.0.1:1", ROWS, "rows.jsonl").unwrap();
        assert_eq!(env.len(), 2);
        let first = env.task_at_line(1).unwrap();
        assert_eq!(
            first.prompt,
            vec![
                Message::system("Answer in \\boxed{}."),
                Message::user("2+2?")
            ]
        );
        let third = env.task_at_line(3).unwrap();
        assert_eq!(
            third.prompt,
            vec![
                Message::system("Be brief."),
                Message::user("Capital of France?")
            ]
        );
        assert_eq!(third.verification["row"]["expected_answer"], "Paris");
        assert!(env.task_at_line(2).is_none());
        // The task of a line is the one sampling gives when it draws that row.
        let sampled = env.sample(0, first.split, 0).unwrap();
        assert!(sampled.id == first.id || sampled.id == third.id);
    }

    #[test]
    fn malformed_rows_name_the_line_and_what_is_missing() {
        for (text, wanted) in [
            ("{\"x\": 1}", "responses_create_params"),
            ("{\"responses_create_params\": {}}", "input"),
            ("not json", "not JSON"),
            (
                "{\"responses_create_params\": {\"input\": [{\"role\": \"robot\", \"content\": \"x\"}]}}",
                "robot",
            ),
        ] {
            let text = format!("\n{text}\n");
            let err = NemoGym::from_jsonl_str("gym", "http://h:1", &text, "d.jsonl")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("d.jsonl line 2") && err.contains(wanted),
                "{err}"
            );
        }
        let err = NemoGym::from_jsonl_str("gym", "https://h:1", ROWS, "d.jsonl")
            .unwrap_err()
            .to_string();
        assert!(err.contains("https"), "{err}");
    }

    #[test]
    fn empty_answers_score_zero_without_calling_the_server() {
        // Nothing listens on port 1; an empty answer must not need the server.
        let env = NemoGym::from_jsonl_str("gym", "http://127.0.0.1:1", ROWS, "d").unwrap();
        let task = env.task_at_line(1).unwrap();
        assert_eq!(env.score(&task, "<think>hmm").unwrap().reward, 0.0);
        let err = env
            .with_options(NemoGymOptions {
                timeout: Duration::from_secs(5),
                retries: 0,
            })
            .score(&task, "4")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("127.0.0.1:1") && err.contains("seed_session"),
            "{err}"
        );
    }
}
