//! A stand-in NeMo Gym resources server for tests, following the HTTP contract in
//! `docs/plugins.md` (from NeMo Gym's `base_resources_server.py`): `POST /seed_session` sets a
//! session cookie; `POST /verify` validates `responses_create_params` (unknown keys: 422) and
//! `response` (missing required fields: 422), reads the `output_text` parts of the output
//! messages, grades an mcqa-style `\boxed{X}` against `expected_answer`, and answers with the
//! request echoed plus `reward` and `extracted_answer`. It speaks plain HTTP/1.1 over std's
//! TcpListener, one thread per connection, and records every request for the test to inspect.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// Keys OpenAI's Responses create params may have; anything else is rejected like NeMo Gym does.
const CREATE_PARAMS_KEYS: &[&str] = &[
    "background",
    "include",
    "input",
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "model",
    "parallel_tool_calls",
    "previous_response_id",
    "prompt",
    "reasoning",
    "service_tier",
    "store",
    "stream",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "truncation",
    "user",
];

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub cookie: Option<String>,
    pub body: Value,
    pub status: u16,
}

#[derive(Default)]
pub struct State {
    pub seen: Mutex<Vec<Seen>>,
    pub sessions: AtomicUsize,
    /// The next this-many `/verify` calls answer 500.
    pub fail_next: AtomicUsize,
}

pub struct StandIn {
    pub url: String,
    pub state: Arc<State>,
}

impl StandIn {
    /// Starts the server on 127.0.0.1 with a free port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve_connection(stream, &state);
                });
            }
        });
        Self { url, state }
    }

    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

fn serve_connection(stream: TcpStream, state: &State) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut length = 0usize;
    let mut cookie = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "cookie" => cookie = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (status, extra_header, answer) = route(&method, &path, &body, state);
    state.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        cookie,
        body,
        status,
    });
    let text = answer.to_string();
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra_header}\r\n{text}",
        text.len()
    )?;
    out.flush()
}

fn unprocessable(message: String) -> (u16, String, Value) {
    (
        422,
        String::new(),
        json!({"detail": [{"type": "validation_error", "msg": message}]}),
    )
}

fn route(method: &str, path: &str, body: &Value, state: &State) -> (u16, String, Value) {
    match (method, path) {
        ("GET", "/") => (200, String::new(), json!({"status": "ok"})),
        ("POST", "/seed_session") => {
            let n = state.sessions.fetch_add(1, Ordering::SeqCst) + 1;
            (
                200,
                format!("set-cookie: session=s{n}; Path=/; HttpOnly\r\nset-cookie: other=o{n}\r\n"),
                json!({}),
            )
        }
        ("POST", "/verify") => {
            if state
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return (500, String::new(), json!({"detail": "internal error"}));
            }
            verify(body)
        }
        _ => (404, String::new(), json!({"detail": "Not Found"})),
    }
}

fn verify(body: &Value) -> (u16, String, Value) {
    let Some(params) = body
        .get("responses_create_params")
        .and_then(Value::as_object)
    else {
        return unprocessable("responses_create_params: field required".into());
    };
    for key in params.keys() {
        if !CREATE_PARAMS_KEYS.contains(&key.as_str()) {
            return unprocessable(format!(
                "responses_create_params.{key}: extra inputs are not permitted"
            ));
        }
    }
    let Some(response) = body.get("response").and_then(Value::as_object) else {
        return unprocessable("response: field required".into());
    };
    for key in [
        "id",
        "created_at",
        "model",
        "object",
        "parallel_tool_calls",
        "tool_choice",
        "tools",
        "output",
    ] {
        if !response.contains_key(key) {
            return unprocessable(format!("response.{key}: field required"));
        }
    }
    if response["object"] != "response" {
        return unprocessable("response.object: must be 'response'".into());
    }
    let Some(output) = response["output"].as_array() else {
        return unprocessable("response.output: must be a list".into());
    };
    let mut text = String::new();
    for (i, item) in output.iter().enumerate() {
        if item.get("type").and_then(Value::as_str) != Some("message") {
            continue;
        }
        for key in ["id", "type", "role", "content"] {
            if item.get(key).is_none() {
                return unprocessable(format!("response.output[{i}].{key}: field required"));
            }
        }
        let Some(parts) = item["content"].as_array() else {
            return unprocessable(format!("response.output[{i}].content: must be a list"));
        };
        for (j, part) in parts.iter().enumerate() {
            for key in ["type", "text", "annotations"] {
                if part.get(key).is_none() {
                    return unprocessable(format!(
                        "response.output[{i}].content[{j}].{key}: field required"
                    ));
                }
            }
            if !part["annotations"].is_array() {
                return unprocessable(format!(
                    "response.output[{i}].content[{j}].annotations: must be a list"
                ));
            }
            if part["type"] == "output_text" {
                text.push_str(part["text"].as_str().unwrap_or_default());
            }
        }
    }
    let extracted = text.rfind("\\boxed{").and_then(|start| {
        let rest = &text[start + 7..];
        rest.find('}').map(|end| rest[..end].trim().to_string())
    });
    let expected = body.get("expected_answer").and_then(Value::as_str);
    let reward = match (&extracted, expected) {
        (Some(x), Some(e)) if x == e => 1.0,
        _ => 0.0,
    };
    let mut answer = body.as_object().cloned().unwrap_or_default();
    answer.insert("reward".into(), json!(reward));
    answer.insert("extracted_answer".into(), json!(extracted));
    answer.insert("library_reward".into(), json!(reward * 0.5));
    (200, String::new(), Value::Object(answer))
}
