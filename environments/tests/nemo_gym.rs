//! The `nemo_gym` environment against a stand-in server that follows NeMo Gym's HTTP contract,
//! for what a real server cannot be made to show: the exact verify body and cookies Chorus sends
//! (a real server ignores fields it does not know), and bounded retries of 5xx answers. The
//! real servers' verdicts, tool calls, multi-turn episodes and runs are tested in the
//! workspace's `tests/nemo_gym_real.rs`.

mod nemo_gym_standin;

use std::time::Duration;

use chorus_environments::{EnvError, Environment, NemoGym, NemoGymOptions, Split};
use nemo_gym_standin::StandIn;
use serde_json::{Value, json};

const ROWS: &str = r#"{"responses_create_params": {"input": [{"role": "user", "content": "Which is blue? A) sun B) sky. Answer in \\boxed{}."}], "temperature": 1.0}, "options": [{"A": "sun"}, {"B": "sky"}], "expected_answer": "B", "grading_mode": "strict_single_letter_boxed", "uuid": "q1"}
{"responses_create_params": {"input": [{"role": "user", "content": "Which is hot? A) sun B) ice"}], "top_k": 5}, "expected_answer": "A", "uuid": "q2"}
"#;

fn env(server: &StandIn) -> NemoGym {
    NemoGym::from_jsonl_str("gym_mcqa", &server.url, ROWS, "rows.jsonl").unwrap()
}

fn row(line: usize) -> Value {
    serde_json::from_str(ROWS.lines().nth(line - 1).unwrap()).unwrap()
}

#[test]
fn verify_gets_the_row_and_a_valid_response_and_its_reward_is_the_score() {
    let server = StandIn::start();
    let env = env(&server);
    let task = env.task_at_line(1).unwrap();
    let right = env
        .score(&task, "<think>the sky is blue</think>\\boxed{B}<|end|>")
        .unwrap();
    assert_eq!(right.reward, 1.0, "{right:?}");
    assert!(right.is_full());
    assert_eq!(right.component("library_reward"), Some(0.5));
    assert!(
        right.reason.contains("extracted_answer \"B\""),
        "{}",
        right.reason
    );
    let wrong = env.score(&task, "\\boxed{A}").unwrap();
    assert_eq!(wrong.reward, 0.0);

    // Exactly the contract: the row's own fields, responses_create_params untouched, plus
    // `response` holding the answer without the think block; the session cookie came back.
    let verifies = server.seen("/verify");
    assert_eq!(verifies.len(), 2);
    let body = verifies[0].body.as_object().unwrap();
    let mut expected = row(1).as_object().unwrap().clone();
    for (key, value) in &expected {
        assert_eq!(&body[key], value, "{key}");
    }
    expected.insert("response".into(), body["response"].clone());
    assert_eq!(body, &expected, "no field beyond the row and `response`");
    assert_eq!(
        body["response"]["output"][0]["content"][0]["text"],
        json!("\\boxed{B}")
    );
    assert_eq!(server.seen("/seed_session").len(), 2);
    assert_eq!(verifies[0].cookie.as_deref(), Some("session=s1; other=o1"));
    assert_eq!(verifies[1].cookie.as_deref(), Some("session=s2; other=o2"));
}

#[test]
fn what_the_contract_rejects_fails_the_completion_with_the_server_and_status_named() {
    let server = StandIn::start();
    let env = env(&server);
    // Row 2 carries `top_k`, which is not a Responses create param: 422, and no retry.
    let task = env.task_at_line(2).unwrap();
    let err = env.score(&task, "\\boxed{A}").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EnvError::Remote { .. }), "{text}");
    assert!(
        text.contains(&server.url)
            && text.contains("POST /verify")
            && text.contains("422")
            && text.contains("top_k"),
        "{text}"
    );
    assert_eq!(server.seen("/verify").len(), 1);
    // The stand-in itself rejects a response missing a required field, as NeMo Gym does.
    let mut body = row(1);
    let mut response = chorus_environments::nemo_gym::response_object(
        chorus_environments::nemo_gym::output_items("x", "1", 0),
        "1",
        &Value::Null,
    );
    response.as_object_mut().unwrap().remove("tools");
    body["response"] = response;
    let port = server.url.trim_start_matches("http://");
    let answer = raw_post(port, "/verify", &body.to_string());
    assert!(
        answer.starts_with("HTTP/1.1 422") && answer.contains("response.tools"),
        "{answer}"
    );
}

#[test]
fn server_errors_are_retried_a_bounded_number_of_times() {
    let server = StandIn::start();
    let task = env(&server).task_at_line(1).unwrap();
    let env = env(&server).with_options(NemoGymOptions {
        timeout: Duration::from_secs(30),
        retries: 2,
    });
    server
        .state
        .fail_next
        .store(2, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(env.score(&task, "\\boxed{B}").unwrap().reward, 1.0);
    assert_eq!(server.seen("/verify").len(), 3);
    server
        .state
        .fail_next
        .store(5, std::sync::atomic::Ordering::SeqCst);
    let err = env.score(&task, "\\boxed{B}").unwrap_err().to_string();
    assert!(
        err.contains("HTTP 500") && err.contains("after 3 attempts"),
        "{err}"
    );
}

#[test]
fn sampling_is_deterministic_and_splits_rows_by_content() {
    let server = StandIn::start();
    let env = env(&server);
    let mut seen = std::collections::BTreeSet::new();
    for split in Split::ALL {
        for seed in 0..20 {
            match env.sample(seed, split, 0) {
                Ok(task) => {
                    assert_eq!(task.split, split);
                    assert_eq!(env.sample(seed, split, 0).unwrap(), task);
                    seen.insert((task.id.clone(), split));
                }
                Err(e) => assert!(matches!(e, EnvError::SplitExhausted { .. }), "{e}"),
            }
        }
    }
    // Each row lands in exactly one split.
    let ids: std::collections::BTreeSet<_> = seen.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), seen.len());
    assert!(matches!(
        env.reference(&env.task_at_line(1).unwrap()),
        Err(EnvError::NoReference { .. })
    ));
}

fn raw_post(authority: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}
