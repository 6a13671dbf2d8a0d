//! Property tests of how the NeMo Gym adapter reads its server's replies: `POST /verify` and
//! the tool routes answer with any status and any body (not JSON, not an object, no `reward`,
//! a `reward` of the wrong type or out of range, extra fields of every type, invalid UTF-8).
//! Scoring gives the reply's reward when it is a finite number, and otherwise an error that
//! names the call; a multi-turn step takes any tool answer. No reply makes the adapter panic.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_environments::{Environment, NemoGym, NemoGymOptions};
use proptest::prelude::*;
use serde_json::{Value, json};

const ROWS: &str = r#"{"responses_create_params": {"input": [{"role": "user", "content": "Which is blue? A) sun B) sky."}], "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}, "expected_answer": "B", "uuid": "q1"}
{"responses_create_params": {"input": [{"role": "user", "content": "Which is hot? A) sun B) ice"}]}, "expected_answer": "A", "uuid": "q2"}
"#;

/// What the stand-in answers to `/verify` and to a tool route: a status and a body.
type Reply = Arc<Mutex<(u16, Vec<u8>)>>;

/// A minimal HTTP/1.1 server: `/seed_session` sets a cookie, every other route gets the
/// current reply. One request per connection.
fn stand_in() -> (String, Reply) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let reply: Reply = Arc::new(Mutex::new((200, b"{}".to_vec())));
    let current = reply.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let (status, answer, cookie) = if request_line.contains("/seed_session") {
                (200, b"{}".to_vec(), "Set-Cookie: session=abc; Path=/\r\n")
            } else {
                let (s, b) = current.lock().unwrap().clone();
                (s, b, "")
            };
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{cookie}Content-Length: {}\r\nConnection: close\r\n\r\n",
                answer.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&answer);
        }
    });
    (url, reply)
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        Just(Value::Null),
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(0.5)),
        Just(json!(1)),
        Just(json!("1.0")),
        Just(json!("NaN")),
        Just(json!([])),
        Just(json!({"reward": 1})),
        any::<bool>().prop_map(Value::Bool),
        "\\PC{0,8}".prop_map(Value::String),
    ];
    prop_oneof![
        6 => (
            prop::option::of(field.clone()),
            prop::collection::btree_map(
                prop_oneof![
                    Just("extracted_answer".to_string()),
                    Just("error_type".to_string()),
                    Just("expected_answer".to_string()),
                    "[a-z_]{1,8}",
                ],
                field,
                0..3
            )
        )
            .prop_map(|(reward, mut fields)| {
                if let Some(r) = reward {
                    fields.insert("reward".to_string(), r);
                }
                serde_json::to_vec(&fields).unwrap()
            }),
        1 => prop_oneof![Just(json!([1])), Just(json!(null)), Just(json!(3)), Just(json!("x"))]
            .prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..24),
        1 => Just(b"{\"reward\": 1e999}".to_vec()),
        1 => Just(vec![b'{'; 2000]),
    ]
}

fn env(url: &str, max_turns: u32) -> NemoGym {
    NemoGym::from_jsonl_str("gym", url, ROWS, "rows.jsonl")
        .unwrap()
        .with_options(NemoGymOptions {
            timeout: Duration::from_secs(60),
            retries: 0,
        })
        .with_max_turns(max_turns)
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_verify_reply_is_a_score_or_an_error_naming_the_call(
        status in prop_oneof![6 => Just(200u16), 1 => Just(404u16), 1 => Just(500u16), 1 => Just(201u16)],
        reply in body(),
        line in 1usize..3,
        completion in prop_oneof![
            Just("\\boxed{B}".to_string()),
            Just("<tool_call>{\"name\": \"lookup\", \"arguments\": {\"q\": 1}}</tool_call>".to_string()),
            // Text the adapter sends (an empty or malformed answer scores 0 without a call).
            "[a-zA-Z]{1,8}[a-zA-Z ]{0,12}",
        ],
    ) {
        static SERVER: std::sync::OnceLock<(String, Reply)> = std::sync::OnceLock::new();
        let (url, current) = SERVER.get_or_init(stand_in);
        *current.lock().unwrap() = (status, reply.clone());
        let env = env(url, 1);
        let task = env.task_at_line(line).unwrap();
        let parsed: Option<f64> = serde_json::from_slice::<Value>(&reply)
            .ok()
            .and_then(|v| v.get("reward").and_then(Value::as_f64))
            .filter(|r| r.is_finite());
        match env.score(&task, &completion) {
            Ok(score) => {
                prop_assert!((200..300).contains(&status), "scored a {status} answer: {score:?}");
                prop_assert_eq!(Some(score.reward), parsed);
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.contains("/verify") || message.contains("/seed_session"), "{message}");
                prop_assert!(parsed.is_none() || !(200..300).contains(&status), "{message}");
            }
        }
    }

    /// A multi-turn episode's tool call gets the route's answer, whatever it is, as the tool's
    /// output; a failing route is an error naming it.
    #[test]
    fn any_tool_reply_is_the_tool_output_or_an_error(status in prop_oneof![Just(200u16), Just(400u16), Just(500u16)], reply in body()) {
        static SERVER: std::sync::OnceLock<(String, Reply)> = std::sync::OnceLock::new();
        let (url, current) = SERVER.get_or_init(stand_in);
        *current.lock().unwrap() = (status, reply);
        let env = env(url, 3);
        let task = env.task_at_line(1).unwrap();
        let mut episode = env.start(&task).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let call = "<tool_call>{\"name\": \"lookup\", \"arguments\": {\"q\": 1}}</tool_call>";
        if let Err(e) = env.step(&task, &mut episode, call) {
            let message = e.to_string();
            prop_assert!(message.contains("/lookup") || message.contains("/seed_session"), "{message}");
        }
    }
}
