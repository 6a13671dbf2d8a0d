//! `nemo_gym`: NeMo Gym resources servers as Chorus environments.
//!
//! A NeMo Gym environment is a JSONL file of data rows and an HTTP server that verifies answers
//! (and, for agentic rows, serves the tools the model calls). Each row holds
//! `responses_create_params` (OpenAI Responses create params: `input` is the prompt,
//! `instructions` a system message, `tools` the functions the model may call) and the server's
//! own fields (`expected_answer`, `options`, `schema_str`…). [`NemoGym`] samples rows
//! (train/heldout by a hash of the row, like every dataset-reading environment), shows the model
//! the row's instructions and `input` through Chorus' chat template, with the row's function
//! tools in the template's tool section ([`chat::tool_section`]), and scores by
//!
//! 1. `POST /seed_session` with `{}`, keeping the session cookie it sets;
//! 2. turning the policy's answer (think block removed) into Responses output items: each
//!    `<tool_call>` block, in order, a `function_call` item (`name`, `arguments` as a JSON
//!    string, `call_id`), the text around them `message` items;
//! 3. with `max_turns > 1` (NeMo Gym's agent loop), while an answer calls tools and turns are
//!    left: `POST /<tool name>` with the call's arguments and the session cookie, each reply a
//!    `function_call_output` item that the policy reads as a tool observation, then the
//!    policy's next turn;
//! 4. `POST /verify` with the cookie and a body that is the row's own fields (with
//!    `responses_create_params` exactly as the row has it) plus `response`: an OpenAI Responses
//!    `Response` holding every output item of the episode;
//! 5. reading the answer's `reward` as the score, with the server's other numeric fields as
//!    components and `extracted_answer` / `error_type` in the reason.
//!
//! Servers may be slow or fail: each request has a deadline and connection errors, timeouts and
//! 5xx answers are retried a bounded number of times, after which only that completion fails
//! (an [`EnvError::Remote`] naming the server and the request). A tool route's 4xx answer is a
//! tool result the model reads, as in NeMo Gym's own agents. NeMo Gym rows carry no reference
//! solutions, so these environments serve RL stages, evaluation and `chorus env score`, not SFT
//! warm-up. [`NemoGym::check_server`] is `chorus env check --kind nemo_gym`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::chat::{
    self, Message, Role, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, parse_completion,
};
use crate::env::{
    Category, EnvInfo, Environment, Episode, StepOutcome, Turns, response_or_zero, step_once,
};
use crate::error::EnvError;
use crate::nemo_gym_http::{Accept, Answer, BaseUrl, request_json, snippet};
use crate::plugin::runtime::BlockingRuntime;
use crate::sampling::{split_of, stable_hash, task_rng};
use crate::task::{Score, ScoreComponent, Split, Task};

/// The namespace of the content-hash split of NeMo Gym rows.
const SPLIT_NAMESPACE: &str = "nemo_gym";

/// The most turns an episode may be given (NeMo Gym's agents loop a few dozen times at most).
pub const MAX_TURNS_LIMIT: u32 = 256;

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
    /// Names of the function tools the row offers.
    tools: Vec<String>,
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
    max_turns: u32,
    runtime: BlockingRuntime,
}

impl std::fmt::Debug for NemoGym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NemoGym")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("rows", &self.rows.len())
            .field("max_turns", &self.max_turns)
            .finish_non_exhaustive()
    }
}

/// What an episode keeps between turns: the server session and the Responses output so far.
#[derive(Debug, Default, Serialize, Deserialize)]
struct EpisodeState {
    /// `name=value` of each cookie the server has set in this session.
    cookies: Vec<String>,
    /// Every output item of the episode, in order (messages, function calls, their outputs).
    output: Vec<Value>,
}

impl EpisodeState {
    fn cookie_header(&self) -> Option<String> {
        (!self.cookies.is_empty()).then(|| self.cookies.join("; "))
    }

    /// Keeps the cookies an answer sets, replacing earlier values of the same name.
    fn absorb(&mut self, set: &[String]) {
        for cookie in set {
            let name = cookie.split('=').next().unwrap_or_default();
            self.cookies
                .retain(|c| c.split('=').next().unwrap_or_default() != name);
            self.cookies.push(cookie.clone());
        }
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
            max_turns: 1,
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

    /// The same environment with episodes of up to `max_turns` policy turns (default 1): while
    /// an answer calls tools and turns are left, the calls go to the server's tool routes and
    /// their results come back to the policy. Fails outside 1..=[`MAX_TURNS_LIMIT`].
    pub fn with_max_turns(mut self, max_turns: u32) -> Result<Self, EnvError> {
        if !(1..=MAX_TURNS_LIMIT).contains(&max_turns) {
            return Err(EnvError::InvalidConfig {
                env: self.name,
                message: format!("max_turns {max_turns}; allowed: 1 to {MAX_TURNS_LIMIT}"),
            });
        }
        self.max_turns = max_turns;
        Ok(self)
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
        Some(self.task_of(row, 0))
    }

    fn task_of(&self, row: &Row, seed: u64) -> Task {
        Task {
            id: format!("{}-{}-{}", self.name, row.split, row.key),
            env: self.name.clone(),
            split: row.split,
            difficulty: 0,
            seed,
            prompt: row.prompt.clone(),
            verification: json!({ "row": row.value, "tools": row.tools }),
        }
    }

    fn remote_error(&self, call: &str, message: impl Into<String>) -> EnvError {
        EnvError::Remote {
            url: self.url.clone(),
            call: call.to_string(),
            message: message.into(),
        }
    }

    /// One request to the server through the retry policy.
    fn request(
        &self,
        path: &str,
        body: Option<Value>,
        cookie: Option<String>,
        accept: Accept,
    ) -> Result<Answer, EnvError> {
        let base = self.base.clone();
        let (timeout, retries) = (self.options.timeout, self.options.retries);
        let path_owned = path.to_string();
        let body = body.map(|b| bytes::Bytes::from(b.to_string()));
        let call = match body {
            Some(_) => format!("POST {path}"),
            None => format!("GET {path}"),
        };
        self.runtime
            .run(async move {
                request_json(
                    &base,
                    &path_owned,
                    body,
                    cookie.as_deref(),
                    timeout,
                    retries,
                    accept,
                )
                .await
            })
            .map_err(|message| self.remote_error(&call, message))
    }

    /// `POST /seed_session`: a new server session, as the cookies it sets.
    fn seed_session(&self) -> Result<Vec<String>, EnvError> {
        Ok(self
            .request("/seed_session", Some(json!({})), None, Accept::Success)?
            .cookies)
    }

    /// `POST /verify` in the session of `cookie`; the answer's JSON object.
    fn verify(&self, body: Value, cookie: Option<String>) -> Result<Map<String, Value>, EnvError> {
        let answer = self.request("/verify", Some(body), cookie, Accept::Success)?;
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

    /// Verifies the episode's `output` items against the task's row; the server's verdict.
    fn score_output(
        &self,
        task: &Task,
        output: Vec<Value>,
        cookie: Option<String>,
        id: &str,
    ) -> Result<Score, EnvError> {
        let row = match task.verification.get("row") {
            Some(Value::Object(row)) => row.clone(),
            _ => return Err(task.invalid_verification("no NeMo Gym `row` object")),
        };
        let mut body = row.clone();
        let params = row.get("responses_create_params").unwrap_or(&Value::Null);
        body.insert("response".into(), response_object(output, id, params));
        let answer = self.verify(Value::Object(body), cookie)?;
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

    /// Runs one tool call on the server's route for it; the `function_call_output` item.
    fn call_tool(
        &self,
        task: &Task,
        call: &Value,
        state: &mut EpisodeState,
    ) -> Result<Value, EnvError> {
        let name = call["name"].as_str().unwrap_or_default();
        let call_id = call["call_id"].clone();
        let offered: Vec<String> = task
            .verification
            .get("tools")
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default();
        let output = if !offered.iter().any(|t| t == name) {
            json!({"error": format!("no tool named `{name}`; this task offers: {}", offered.join(", "))})
                .to_string()
        } else {
            let arguments: Value = call["arguments"]
                .as_str()
                .and_then(|a| serde_json::from_str(a).ok())
                .unwrap_or_else(|| json!({}));
            let answer = self.request(
                &format!("/{name}"),
                Some(arguments),
                state.cookie_header(),
                Accept::ClientErrors,
            )?;
            state.absorb(&answer.cookies);
            String::from_utf8_lossy(&answer.body).into_owned()
        };
        Ok(json!({"type": "function_call_output", "call_id": call_id, "output": output}))
    }

    /// Checks the server against its dataset as `chorus env check --kind nemo_gym` does:
    /// the health route answers; sampling is deterministic and the splits disjoint; on up to
    /// `rows` rows (both splits), a session can be seeded and `/verify` accepts Chorus'
    /// response for a non-answer, a text answer and (where the row offers tools) a tool call,
    /// each with a finite reward, and gives no full reward to the non-answer; with
    /// `max_turns > 1`, every tool a checked row offers has a route on the server.
    pub fn check_server(&self, rows: usize) -> ServerCheck {
        let mut report = ServerCheck {
            env: self.name.clone(),
            url: self.url.clone(),
            rows: self.rows.len(),
            train_rows: self.rows.iter().filter(|r| r.split == Split::Train).count(),
            heldout_rows: self
                .rows
                .iter()
                .filter(|r| r.split == Split::Heldout)
                .count(),
            max_turns: self.max_turns,
            lines: Vec::new(),
            verify_calls: 0,
            verify_ms: 0.0,
        };
        let health = self.request("/", None, None, Accept::Success);
        report.line(
            "health",
            health
                .map(|a| format!("GET / answered {}", snippet(&a.body)))
                .map_err(|e| e.to_string()),
        );
        let deterministic = [Split::Train, Split::Heldout].iter().all(|&split| {
            (0..4).all(
                |seed| match (self.sample(seed, split, 0), self.sample(seed, split, 0)) {
                    (Ok(a), Ok(b)) => a == b,
                    (Err(_), Err(_)) => true,
                    _ => false,
                },
            )
        });
        report.line(
            "sampling",
            if deterministic {
                Ok(format!(
                    "deterministic; {} train and {} heldout rows (split by content){}",
                    report.train_rows,
                    report.heldout_rows,
                    if report.heldout_rows == 0 {
                        "; with no heldout row, held-out evaluation finds no task here"
                    } else {
                        ""
                    }
                ))
            } else {
                Err("the same seed gave two different rows".into())
            },
        );
        // Rows spread over the file, alternating splits as they come.
        let step = (self.rows.len() / rows.max(1)).max(1);
        let chosen: Vec<&Row> = self.rows.iter().step_by(step).take(rows).collect();
        let mut routes_checked = BTreeMap::new();
        for row in chosen {
            let task = self.task_of(row, 0);
            let at = format!("line {}", row.line);
            let mut answers = vec![("a non-answer", "I cannot answer this.".to_string())];
            answers.push(("a text answer", "42".to_string()));
            if let Some(tool) = row.tools.first() {
                answers.push((
                    "a tool call",
                    ToolCall {
                        name: tool.clone(),
                        arguments: json!({}),
                    }
                    .render(),
                ));
            }
            for (what, completion) in answers {
                let started = Instant::now();
                let scored = self.score(&task, &completion);
                report.verify_calls += 1;
                report.verify_ms += started.elapsed().as_secs_f64() * 1e3;
                let verdict = match scored {
                    Err(e) => Err(format!("{what}: {e}")),
                    Ok(score) if what == "a non-answer" && score.reward >= 1.0 => Err(format!(
                        "{what} got the full reward ({}); the verifier rewards anything",
                        score.reason
                    )),
                    Ok(score) => Ok(format!("{what}: reward {}", score.reward)),
                };
                report.line(&format!("verify {at}"), verdict);
            }
            if self.max_turns > 1 {
                for tool in &row.tools {
                    if routes_checked.contains_key(tool) {
                        continue;
                    }
                    let route = format!("/{tool}");
                    let verdict = match self.request(
                        &route,
                        Some(json!({})),
                        None,
                        Accept::ClientErrors,
                    ) {
                        Ok(a) if a.status == 404 || a.status == 405 => Err(format!(
                            "the row offers `{tool}` but POST {route} answered {}: with max_turns > 1 its calls would fail",
                            a.status
                        )),
                        Ok(a) => Ok(format!(
                            "POST {route} exists (answered {} to empty arguments)",
                            a.status
                        )),
                        Err(e) => Err(e.to_string()),
                    };
                    routes_checked.insert(tool.clone(), ());
                    report.line(&format!("tool {tool}"), verdict);
                }
            }
        }
        report
    }
}

/// What [`NemoGym::check_server`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerCheck {
    /// The environment's name.
    pub env: String,
    /// The server.
    pub url: String,
    /// Data rows, and how many fell in each split.
    pub rows: usize,
    /// Rows in the train split.
    pub train_rows: usize,
    /// Rows in the heldout split.
    pub heldout_rows: usize,
    /// Policy turns an episode may take.
    pub max_turns: u32,
    /// One line per check, in order.
    pub lines: Vec<CheckLine>,
    /// `/verify` calls made, and their total time in milliseconds (with the session seeding).
    pub verify_calls: usize,
    /// Milliseconds spent in `verify_calls`.
    pub verify_ms: f64,
}

/// One check of a [`ServerCheck`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckLine {
    /// What was checked (`health`, `verify line 3`, `tool get_weather`…).
    pub check: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen, or what was wrong.
    pub detail: String,
}

impl ServerCheck {
    fn line(&mut self, check: &str, verdict: Result<String, String>) {
        let (ok, detail) = match verdict {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.lines.push(CheckLine {
            check: check.to_string(),
            ok,
            detail,
        });
    }

    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.lines.iter().all(|l| l.ok)
    }
}

/// The Responses output items of one policy turn's answer (think block already removed): each
/// well-formed `<tool_call>` block, in order, a `function_call` item; the text around the
/// calls (a malformed block included, as the model wrote it) `message` items. Item and call
/// ids are `<kind>_<id>_<n>`, `n` counting from `first`.
pub fn output_items(response: &str, id: &str, first: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut text = String::new();
    let mut n = first;
    let flush_text = |text: &mut String, items: &mut Vec<Value>, n: &mut usize| {
        let trimmed = text.trim();
        if !trimmed.is_empty() {
            items.push(json!({
                "id": format!("msg_{id}_{n}"),
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": trimmed, "annotations": []}],
            }));
            *n += 1;
        }
        text.clear();
    };
    let mut rest = response;
    while let Some(open) = rest.find(TOOL_CALL_OPEN) {
        text.push_str(&rest[..open]);
        let body_start = open + TOOL_CALL_OPEN.len();
        let Some(close) = rest[body_start..].find(TOOL_CALL_CLOSE) else {
            // Never closed: the rest is text.
            text.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let block_end = body_start + close + TOOL_CALL_CLOSE.len();
        match serde_json::from_str::<ToolCall>(rest[body_start..body_start + close].trim()) {
            Ok(call) => {
                flush_text(&mut text, &mut items, &mut n);
                let arguments = match call.arguments {
                    Value::Null => "{}".to_string(),
                    other => other.to_string(),
                };
                items.push(json!({
                    "id": format!("fc_{id}_{n}"),
                    "type": "function_call",
                    "call_id": format!("call_{id}_{n}"),
                    "name": call.name,
                    "arguments": arguments,
                    "status": "completed",
                }));
                n += 1;
            }
            Err(_) => text.push_str(&rest[open..block_end]),
        }
        rest = &rest[block_end..];
    }
    text.push_str(rest);
    flush_text(&mut text, &mut items, &mut n);
    items
}

/// An OpenAI Responses `Response` object holding `output`, with every field NeMo Gym's
/// validation requires; `tools`, `tool_choice` and `parallel_tool_calls` are the row's
/// `responses_create_params` ones where it has them.
pub fn response_object(output: Vec<Value>, id: &str, params: &Value) -> Value {
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "id": format!("resp_{id}"),
        "created_at": created_at,
        "model": "chorus-policy",
        "object": "response",
        "parallel_tool_calls": params.get("parallel_tool_calls").cloned().unwrap_or(json!(true)),
        "tool_choice": params.get("tool_choice").cloned().unwrap_or(json!("auto")),
        "tools": params.get("tools").cloned().unwrap_or(json!([])),
        "output": output,
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
    match params.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(instructions)) => prompt.push(Message::system(instructions.clone())),
        Some(other) => {
            return Err(err(format!(
                "responses_create_params.instructions is {other}; allowed: a string"
            )));
        }
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
    let (tools, definitions) = match params.get("tools") {
        None | Some(Value::Null) => (Vec::new(), Vec::new()),
        Some(Value::Array(tools)) => {
            let mut names = Vec::new();
            let mut definitions = Vec::new();
            for (i, tool) in tools.iter().enumerate() {
                let (name, definition) = function_tool(tool)
                    .map_err(|m| err(format!("responses_create_params.tools[{i}]: {m}")))?;
                names.push(name);
                definitions.push(definition);
            }
            (names, definitions)
        }
        Some(other) => {
            return Err(err(format!(
                "responses_create_params.tools is {other}; allowed: a list of function tools"
            )));
        }
    };
    if !definitions.is_empty() {
        prompt = chat::with_tool_section(prompt, chat::tool_section(&definitions));
    }
    let canonical = value.to_string();
    let split = split_of(SPLIT_NAMESPACE, &canonical);
    Ok(Row {
        line,
        key: format!("{:016x}", stable_hash(canonical.as_bytes())),
        value,
        prompt,
        tools,
        split,
    })
}

/// A Responses function tool (`{"type": "function", "name", "description", "parameters",
/// "strict"}`): its name, and its definition as the template's tool section lists it.
fn function_tool(tool: &Value) -> Result<(String, Value), String> {
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(format!(
                "tool type `{other}`; allowed: function (Chorus shows the model function tools \
                 and sends their calls to the server's routes)"
            ));
        }
        None => return Err("no `type`; allowed: function".into()),
    }
    let name = tool
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or("a function tool needs a non-empty string `name`")?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "tool name `{name}`; allowed: letters, digits, `_`, `-` and `.` (it names a server route)"
        ));
    }
    let mut definition = Map::new();
    definition.insert("name".into(), json!(name));
    for key in ["description", "parameters"] {
        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
            definition.insert(key.into(), v.clone());
        }
    }
    Ok((name.to_string(), Value::Object(definition)))
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

impl NemoGym {
    /// An id for the items of one completion of a task (stable, so a re-score sends the same).
    fn item_id(task: &Task, completion: &str) -> String {
        format!(
            "{:016x}",
            stable_hash(format!("{}\0{completion}", task.id).as_bytes())
        )
    }
}

impl Environment for NemoGym {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: self.name.clone(),
            category: self.category,
            turns: if self.max_turns > 1 {
                Turns::Multi
            } else {
                Turns::Single
            },
            max_turns: self.max_turns,
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
        let mut task = self.task_of(in_split[index], seed);
        task.difficulty = difficulty;
        Ok(task)
    }

    /// Scores one answer as a whole episode: its tool calls go to `/verify` as `function_call`
    /// items without being run (what a one-turn NeMo Gym agent sends).
    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let text = match response_or_zero(completion) {
            Ok(text) => text,
            Err(zero) => return Ok(zero),
        };
        let id = Self::item_id(task, completion);
        let cookies = self.seed_session()?;
        let cookie = (!cookies.is_empty()).then(|| cookies.join("; "));
        self.score_output(task, output_items(&text, &id, 0), cookie, &id)
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

    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        self.check_task(task)?;
        let mut state = EpisodeState::default();
        if self.max_turns > 1 {
            state.absorb(&self.seed_session()?);
        }
        let state = serde_json::to_value(state).map_err(|source| EnvError::Serialize {
            env: self.name.clone(),
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
        if self.max_turns <= 1 {
            return step_once(self, task, episode, action);
        }
        if episode.done {
            return Err(EnvError::EpisodeFinished {
                task_id: task.id.clone(),
            });
        }
        let mut state: EpisodeState = serde_json::from_value(episode.state.clone())
            .map_err(|e| task.invalid_verification(format!("episode state: {e}")))?;
        episode.messages.push(Message::assistant(action));
        episode.turn += 1;
        let parsed = parse_completion(action);
        let items = if parsed.unterminated_think {
            Vec::new()
        } else {
            let id = format!(
                "{}t{}",
                Self::item_id(task, &episode.messages[0].content),
                episode.turn
            );
            output_items(&parsed.response, &id, state.output.len())
        };
        let calls: Vec<Value> = items
            .iter()
            .filter(|i| i["type"] == "function_call")
            .cloned()
            .collect();
        state.output.extend(items);
        let outcome = if !calls.is_empty() && episode.turn < self.max_turns {
            let mut results = Vec::new();
            for call in &calls {
                let item = self.call_tool(task, call, &mut state)?;
                results.push(item["output"].as_str().unwrap_or_default().to_string());
                state.output.push(item);
            }
            StepOutcome {
                observation: Some(Message::tool(results.join("\n"))),
                done: false,
                score: None,
            }
        } else if state.output.is_empty() {
            // Nothing to verify (as a one-turn empty answer): no call to the server.
            episode.done = true;
            let score = match response_or_zero(action) {
                Err(zero) => zero,
                Ok(_) => Score::zero("empty response").with_component("format", 0.0),
            };
            StepOutcome {
                observation: None,
                done: true,
                score: Some(score.with_component("turns", f64::from(episode.turn))),
            }
        } else {
            let id = Self::item_id(task, action);
            let score =
                self.score_output(task, state.output.clone(), state.cookie_header(), &id)?;
            episode.done = true;
            StepOutcome {
                observation: None,
                done: true,
                score: Some(score.with_component("turns", f64::from(episode.turn))),
            }
        };
        episode.state = serde_json::to_value(&state).map_err(|source| EnvError::Serialize {
            env: self.name.clone(),
            source,
        })?;
        Ok(outcome)
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
    fn function_tools_reach_the_prompt_in_the_templates_tool_section() {
        let rows = r#"{"responses_create_params": {"instructions": "Be brief.", "input": "Weather in SF?", "tools": [{"type": "function", "name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}]}}
{"responses_create_params": {"input": [{"role": "user", "content": "Summarise."}], "tools": [{"type": "function", "name": "response_tool_1", "parameters": {"type": "object"}}]}}"#;
        let env = NemoGym::from_jsonl_str("gym", "http://127.0.0.1:1", rows, "d").unwrap();
        let first = env.task_at_line(1).unwrap();
        assert_eq!(
            first.prompt,
            vec![
                Message::system(
                    "Be brief.\n\nYou can call these functions:\n{\"description\":\"Weather now\",\"name\":\"get_weather\",\"parameters\":{\"properties\":{\"city\":{\"type\":\"string\"}},\"type\":\"object\"}}"
                ),
                Message::user("Weather in SF?"),
            ]
        );
        assert_eq!(first.verification["tools"], json!(["get_weather"]));
        // Without instructions the section becomes the system message.
        let second = env.task_at_line(2).unwrap();
        assert_eq!(second.prompt[0].role, Role::System);
        assert!(
            second.prompt[0]
                .content
                .starts_with("You can call these functions:\n{\"name\":\"response_tool_1\""),
            "{:?}",
            second.prompt
        );
        // What Chorus cannot show the model is refused with the row and the reason.
        for (tools, wanted) in [
            (
                r#"[{"type": "web_search"}]"#,
                "tool type `web_search`; allowed: function",
            ),
            (r#"[{"type": "function"}]"#, "non-empty string `name`"),
            (
                r#"[{"type": "function", "name": "../x"}]"#,
                "tool name `../x`",
            ),
            (r#"{"type": "function"}"#, "a list of function tools"),
        ] {
            let row =
                format!(r#"{{"responses_create_params": {{"input": "q", "tools": {tools}}}}}"#);
            let err = NemoGym::from_jsonl_str("gym", "http://h:1", &row, "d.jsonl")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("d.jsonl line 1") && err.contains(wanted),
                "{err}"
            );
        }
    }

    #[test]
    fn tool_call_blocks_become_function_call_items_in_order_and_text_stays_messages() {
        let response = concat!(
            "Checking. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"SF\"}}</tool_call>",
            "<tool_call>{\"name\": \"now\"}</tool_call> and ",
            "<tool_call>{not json}</tool_call> done"
        );
        let items = output_items(response, "x", 3);
        let kinds: Vec<&str> = items.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["message", "function_call", "function_call", "message"]
        );
        assert_eq!(items[0]["content"][0]["text"], "Checking.");
        assert_eq!(items[0]["id"], "msg_x_3");
        assert_eq!(items[1]["name"], "get_weather");
        // Arguments travel as a JSON string, as the Responses API has them.
        assert_eq!(
            serde_json::from_str::<Value>(items[1]["arguments"].as_str().unwrap()).unwrap(),
            json!({"city": "SF"})
        );
        assert_eq!(items[1]["call_id"], "call_x_4");
        assert_eq!(items[2]["arguments"], "{}");
        // A malformed block is not a call: the server sees it as the text the model wrote.
        assert_eq!(
            items[3]["content"][0]["text"],
            "and <tool_call>{not json}</tool_call> done"
        );
        let unclosed = output_items("a <tool_call>{\"name\": \"f\"}", "y", 0);
        assert_eq!(unclosed.len(), 1);
        assert_eq!(
            unclosed[0]["content"][0]["text"],
            "a <tool_call>{\"name\": \"f\"}"
        );
        assert_eq!(output_items("only text", "z", 0).len(), 1);
        let response = response_object(
            output_items("hi", "z", 0),
            "z",
            &json!({"tools": [{"type": "function", "name": "f"}], "tool_choice": "required"}),
        );
        assert_eq!(response["tools"][0]["name"], "f");
        assert_eq!(response["tool_choice"], "required");
        assert_eq!(response["parallel_tool_calls"], true);
    }

    #[test]
    fn max_turns_makes_episodes_multi_turn_within_bounds() {
        let env = NemoGym::from_jsonl_str("gym", "http://127.0.0.1:1", ROWS, "d").unwrap();
        assert_eq!(env.info().turns, Turns::Single);
        let env = env.with_max_turns(4).unwrap();
        assert_eq!((env.info().turns, env.info().max_turns), (Turns::Multi, 4));
        for bad in [0, MAX_TURNS_LIMIT + 1] {
            let err = NemoGym::from_jsonl_str("gym", "http://127.0.0.1:1", ROWS, "d")
                .unwrap()
                .with_max_turns(bad)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("max_turns {bad}; allowed: 1 to")),
                "{err}"
            );
        }
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
