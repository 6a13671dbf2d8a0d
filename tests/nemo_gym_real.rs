//! The `nemo_gym` environment against real NeMo Gym resources servers (`nemo-gym` 0.7.0 from
//! PyPI): mcqa, structured_outputs (answers are tool calls), reasoning_gym and
//! example_single_tool_call (a server with a tool route).
//!
//! - Chorus' reward equals the server's own `/verify` verdict on the same answers, where
//!   `tests/python/nemo_gym_agree.py` builds the server's side with NeMo Gym's own pydantic
//!   types and Chorus reads the answers as its policy writes them (`<tool_call>` blocks);
//! - `chorus env check --kind nemo_gym` passes against each server;
//! - a multi-turn episode sends the policy's tool call to the server's tool route, shows the
//!   policy the route's answer, and verifies the whole episode;
//! - a short `chorus run` trains against all four servers at once.
//!
//! Needs `CHORUS_TEST_NEMO_GYM_PYTHON`: a Python with `nemo-gym` installed
//! (`scripts/install-nemo-gym.sh`, which `.ci/run` runs). Without it the tests report
//! themselves skipped, except under CI, where they fail so that a green run cannot hide that
//! they never ran. The stand-in server of `environments/tests/nemo_gym.rs` remains for what a
//! real server cannot be made to do (HTTP 5xx, hangs).

mod harness;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use chorus_environments::{Environment, NemoGym, Split};
use chorus_orchestrator::ledger::{Ledger, RolloutFilter};
use harness::*;
use serde_json::{Value, json};

/// `CHORUS_TEST_NEMO_GYM_PYTHON` when it imports nemo_gym.
fn gym_python() -> Option<String> {
    python_importing(
        "CHORUS_TEST_NEMO_GYM_PYTHON",
        "nemo_gym, resources_servers",
        "a Python with nemo-gym installed: scripts/install-nemo-gym.sh, as .ci/run does",
        Missing::FailsUnderCi,
    )
}

/// A real resources server, killed when dropped.
struct GymServer {
    child: Child,
    url: String,
    /// The folder of the server in the installed package (its `data/example.jsonl`).
    folder: PathBuf,
    log: PathBuf,
}

impl Drop for GymServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GymServer {
    /// Starts resources server `name` on a free port of 127.0.0.1 and waits until it answers.
    fn start(h: &Harness, python: &str, name: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = h.path(&format!("{name}.log"));
        let child = Command::new(python)
            .arg(repo().join("tests/python/nemo_gym_server.py"))
            .args([name, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("server log"))
            .spawn()
            .expect("start the NeMo Gym server");
        let out = Command::new(python)
            .args([
                "-c",
                &format!(
                    "import resources_servers, os; print(os.path.join(list(resources_servers.__path__)[0], '{name}'))"
                ),
            ])
            .output()
            .expect("locate the server");
        let folder = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let mut server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            folder,
            log,
        };
        let address = format!("127.0.0.1:{port}");
        // Importing the server's dependencies takes seconds; a slow machine gets minutes.
        let up = eventually(300, || {
            std::net::TcpStream::connect(&address).is_ok()
                || matches!(server.child.try_wait(), Ok(Some(_)))
        });
        let exited = server.child.try_wait().ok().flatten();
        assert!(
            up && exited.is_none(),
            "NeMo Gym server {name} did not come up (exit {exited:?}): {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        server
    }

    fn rows(&self) -> PathBuf {
        self.folder.join("data/example.jsonl")
    }
}

/// `tests/python/nemo_gym_agree.py URL ROWS`: the server's own rewards for a set of answers.
fn server_verdicts(python: &str, url: &str, rows: &std::path::Path) -> Vec<Value> {
    let out = Command::new(python)
        .arg(repo().join("tests/python/nemo_gym_agree.py"))
        .args([url, s(rows)])
        .output()
        .expect("run nemo_gym_agree.py");
    assert!(
        out.status.success(),
        "nemo_gym_agree.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("nemo_gym_agree.py prints JSON");
    v["items"].as_array().expect("items").clone()
}

#[test]
fn chorus_rewards_equal_the_real_servers_own_verdicts() {
    let Some(python) = gym_python() else { return };
    let h = Harness::new();
    for name in [
        "mcqa",
        "structured_outputs",
        "reasoning_gym",
        "example_single_tool_call",
    ] {
        let server = GymServer::start(&h, &python, name);
        let verdicts = server_verdicts(&python, &server.url, &server.rows());
        assert!(!verdicts.is_empty(), "{name}: no answers");
        // Items name their row by line number from 0, or (mcqa) by the row's own `uuid`.
        let rows_text = std::fs::read_to_string(server.rows()).unwrap();
        let rows: Vec<Value> = rows_text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let completions: String = verdicts
            .iter()
            .map(|v| {
                let line = v["line"].as_u64().unwrap() as usize - 1;
                let id = match rows[line].get("uuid") {
                    Some(uuid) => uuid.clone(),
                    None => json!(line),
                };
                json!({"id": id, "completion": v["completion"]}).to_string() + "\n"
            })
            .collect();
        let file = h.path(&format!("{name}.completions.jsonl"));
        std::fs::write(&file, completions).unwrap();
        let scored: Value = serde_json::from_str(&h.ok(&[
            "env",
            "score",
            "nemo_gym",
            "--url",
            &server.url,
            "--dataset",
            s(&server.rows()),
            "--completions",
            s(&file),
            "--json",
        ]))
        .expect("env score --json prints JSON");
        let items = scored["items"].as_array().expect("items");
        assert_eq!(items.len(), verdicts.len(), "{name}: {scored}");
        for (theirs, ours) in verdicts.iter().zip(items) {
            assert_eq!(
                ours["reward"].as_f64(),
                theirs["reward"].as_f64(),
                "{name} line {} ({}): Chorus {} vs the server's own {}\ncompletion: {}",
                theirs["line"],
                theirs["what"],
                ours["reason"],
                theirs["reward"],
                theirs["completion"]
            );
        }
        // Each server gives both verdicts on these answers, so agreement is not vacuous; on
        // structured_outputs the full reward goes to tool calls.
        let rewards: Vec<f64> = items
            .iter()
            .map(|i| i["reward"].as_f64().unwrap())
            .collect();
        assert!(
            rewards.contains(&1.0) && rewards.contains(&0.0),
            "{name}: {rewards:?}"
        );
        if name == "structured_outputs" {
            let credited: Vec<&Value> = verdicts.iter().filter(|v| v["reward"] == 1.0).collect();
            assert!(
                !credited.is_empty()
                    && credited
                        .iter()
                        .all(|v| v["completion"].as_str().unwrap().contains("<tool_call>")),
                "{credited:?}"
            );
        }
        // The self-check passes, with multi-turn episodes where the server serves its tools.
        let max_turns = if name == "example_single_tool_call" {
            "2"
        } else {
            "1"
        };
        let rows = server.rows();
        let check_args = [
            "env",
            "check",
            "--kind",
            "nemo_gym",
            "--url",
            &server.url,
            "--dataset",
            s(&rows),
            "--max-turns",
            max_turns,
        ];
        let check = h.ok(&check_args);
        assert!(
            check.contains("ok   health") && !check.contains("FAIL"),
            "{name}: {check}"
        );
        if name == "example_single_tool_call" {
            assert!(check.contains("POST /get_weather exists"), "{check}");
        }
        if name == "structured_outputs" {
            // Its tools are the answer's form, not routes: multi-turn episodes would fail, and
            // the check says so.
            let mut args = check_args.to_vec();
            *args.last_mut().unwrap() = "2";
            let out = h.chorus(&args);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(!out.status.success(), "{stdout}");
            assert!(
                stdout.contains("FAIL tool response_tool_1")
                    && stdout.contains("answered 404: with max_turns > 1 its calls would fail"),
                "{stdout}"
            );
        }
    }
}

#[test]
fn a_multi_turn_episode_runs_the_tool_on_the_server_and_verifies_every_item() {
    let Some(python) = gym_python() else { return };
    let h = Harness::new();
    let server = GymServer::start(&h, &python, "example_single_tool_call");
    let env = NemoGym::from_jsonl_file("weather", &server.url, server.rows())
        .unwrap()
        .with_max_turns(3)
        .unwrap();
    let task = env.sample(0, Split::Train, 0).unwrap();
    assert!(
        task.prompt[0].content.contains(
            "You can call these functions:\n{\"description\":\"\",\"name\":\"get_weather\""
        ),
        "{:?}",
        task.prompt
    );

    // Turn 1 calls the tool: the server's route answers, and the policy reads that answer.
    let mut episode = env.start(&task).unwrap();
    let call = r#"<think>Look it up.</think><tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>"#;
    let first = env.step(&task, &mut episode, call).unwrap();
    assert!(!first.done);
    let observation = first.observation.expect("the tool's answer");
    assert_eq!(
        serde_json::from_str::<Value>(&observation.content).unwrap(),
        json!({"city": "Oslo", "weather_description": "The weather in Oslo is cold."})
    );
    // Turn 2 answers in text: the episode ends, verified with the call among its items.
    let last = env
        .step(&task, &mut episode, "It is cold in Oslo.")
        .unwrap();
    assert!(last.done && episode.done);
    let score = last.score.unwrap();
    assert_eq!(score.reward, 1.0, "{score:?}");
    assert_eq!(score.component("turns"), Some(2.0));

    // Arguments the route refuses come back to the policy as the route's 422 answer.
    let mut episode = env.start(&task).unwrap();
    let refused = env
        .step(
            &task,
            &mut episode,
            r#"<tool_call>{"name": "get_weather", "arguments": {"town": "Oslo"}}</tool_call>"#,
        )
        .unwrap();
    let text = refused.observation.unwrap().content;
    assert!(
        text.contains("Field required") && text.contains("city"),
        "{text}"
    );
    // A tool the task does not offer is answered without calling the server.
    let unknown = env
        .step(
            &task,
            &mut episode,
            r#"<tool_call>{"name": "launch", "arguments": {}}</tool_call>"#,
        )
        .unwrap();
    let text = unknown.observation.unwrap().content;
    assert!(
        text.contains("no tool named `launch`") && text.contains("get_weather"),
        "{text}"
    );
    // The last turn ends the episode even when it calls a tool: the call is verified, not run.
    let out_of_turns = env
        .step(
            &task,
            &mut episode,
            r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>"#,
        )
        .unwrap();
    assert!(out_of_turns.done);
    assert_eq!(out_of_turns.score.unwrap().component("turns"), Some(3.0));

    // A text answer with no call ends a fresh episode at once with the server's 0.
    let mut episode = env.start(&task).unwrap();
    let plain = env.step(&task, &mut episode, "Probably sunny.").unwrap();
    assert!(plain.done);
    assert_eq!(plain.score.unwrap().reward, 0.0);
}

/// structured_outputs rows of the package's own shape whose text and schema are short enough
/// for a tiny policy's context (the example rows are 25-50 kB each).
fn short_structured_rows(example: &std::path::Path) -> String {
    let first = std::fs::read_to_string(example).unwrap();
    let template: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let people = [
        "Ada Lovelace",
        "Alan Turing",
        "Grace Hopper",
        "Edsger Dijkstra",
        "Barbara Liskov",
        "Donald Knuth",
        "Frances Allen",
        "John Backus",
    ];
    let mut rows = String::new();
    for (i, person) in people.iter().enumerate() {
        let schema = json!({"type": "object", "additionalProperties": false,
            "required": ["name"], "properties": {"name": {"type": "string"}}});
        let tool = template["tool_name"].as_str().unwrap();
        let key = template["tool_payload_key"]
            .as_str()
            .unwrap_or("extraction");
        let mut row = template.clone();
        row["schema_str"] = json!(schema.to_string());
        row["responses_create_params"] = json!({
            "input": [{"role": "user", "content": format!("{person} wrote notes ({i}). Return the name.")}],
            "tools": [{"type": "function", "name": tool, "description": "Return the name.",
                "parameters": {"type": "object", "additionalProperties": false,
                    "required": [key], "properties": {key: schema}}, "strict": true}],
        });
        rows.push_str(&row.to_string());
        rows.push('\n');
    }
    rows
}

#[test]
fn a_short_run_trains_against_four_real_servers() {
    let Some(python) = gym_python() else { return };
    let h = Harness::new();
    let mcqa = GymServer::start(&h, &python, "mcqa");
    let structured = GymServer::start(&h, &python, "structured_outputs");
    let reasoning = GymServer::start(&h, &python, "reasoning_gym");
    let weather = GymServer::start(&h, &python, "example_single_tool_call");
    std::fs::write(
        h.path("structured.jsonl"),
        short_structured_rows(&structured.rows()),
    )
    .unwrap();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    let config = format!(
        r#"
name = "gym"
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 16
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 8
group_size = 2
max_new_tokens = 6
max_prompt_tokens = 3072
environments = [
  {{ kind = "nemo_gym", url = "{}", dataset = "{}", name = "gym_mcqa" }},
  {{ kind = "nemo_gym", url = "{}", dataset = "structured.jsonl", name = "gym_structured" }},
  {{ kind = "nemo_gym", url = "{}", dataset = "{}", name = "gym_reasoning" }},
  {{ kind = "nemo_gym", url = "{}", dataset = "{}", name = "gym_weather", max_turns = 2 }},
]
"#,
        mcqa.url,
        s(&mcqa.rows()),
        structured.url,
        reasoning.url,
        s(&reasoning.rows()),
        weather.url,
        s(&weather.rows()),
    );
    std::fs::write(h.path("run.toml"), config).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    h.audit_clean(&h.ledger_url("gym"));
    let summary = h.json("runs/gym/summary.json");
    let run_id = summary["run"].as_str().unwrap().to_string();
    let rows = tokio::runtime::Runtime::new().unwrap().block_on(async {
        Ledger::open(&h.ledger_url("gym"))
            .await
            .unwrap()
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id),
                environment: None,
                min_reward: None,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
    });
    for env in ["gym_mcqa", "gym_structured", "gym_reasoning", "gym_weather"] {
        // The package's example files hold 5 rows, one or two of them held out.
        assert!(
            summary["environments"][env]["heldout_n"].as_u64() >= Some(1),
            "{env}: {summary}"
        );
        let of_env: Vec<_> = rows.iter().filter(|r| r.environment == env).collect();
        // Every rollout got a verdict (a tiny policy mostly writes empty answers, which score
        // 0 without a call; the rest are the server's).
        assert!(
            !of_env.is_empty() && of_env.iter().all(|r| r.reward.is_some()),
            "{env}: {of_env:#?}"
        );
    }
    assert!(
        rows.iter().any(|r| r.consumed_at_step.is_some()),
        "nothing was trained on"
    );
    for server in [&mcqa, &structured, &reasoning, &weather] {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        assert!(
            !log.contains("Traceback"),
            "{} raised during the run: {log}",
            server.url
        );
    }
}
