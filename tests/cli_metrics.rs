//! `--metrics ADDR`: every service serves Prometheus metrics on /metrics, and they move with
//! the work. The learner and a worker (processes serving one run) are scraped before and
//! after the run; the orchestrator daemon, which schedules launched runs itself, before and
//! after a launched run. docs/metrics.md lists the metrics.

mod harness;

use std::io::{Read, Write};

use harness::*;

const RUN: &str = r#"
name = "metered"
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 3
prompts_per_step = 3
group_size = 4
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// The body of GET http://`address`/metrics, once the exporter answers.
fn scrape(address: &str) -> String {
    let mut body = None;
    let answered = eventually(60, || {
        let Ok(mut stream) = std::net::TcpStream::connect(address) else {
            return false;
        };
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        if stream.read_to_string(&mut answer).is_err() || !answer.starts_with("HTTP/1.1 200") {
            return false;
        }
        body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        body.is_some()
    });
    assert!(answered, "no metrics at http://{address}/metrics");
    body.unwrap()
}

/// The sum of the samples of `name` whose labels contain `labels` (0 when there are none).
fn value(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            (metric == name && rest.contains(labels)).then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

#[test]
fn the_learner_and_a_worker_serve_metrics_that_move_with_the_run() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let (learner_metrics, worker_metrics) = (free_address(), free_address());
    let common = ["--config", "run.toml", "--run-id", "m1", "--token", "tok"];
    let learner = h.service(
        &[
            &["serve", "learner", "--metrics", &learner_metrics][..],
            &common,
        ]
        .concat(),
    );
    let worker = h.service(
        &[
            &["serve", "worker", "--learner", &learner.url, "--id", "w0"][..],
            &["--metrics", &worker_metrics],
            &common,
        ]
        .concat(),
    );
    let before = scrape(&learner_metrics);
    assert_eq!(value(&before, "chorus_learner_steps_total", ""), 0.0);
    h.ok(&[
        &[
            "serve",
            "orchestrator",
            "--learner",
            &learner.url,
            "--worker",
            &worker.url,
        ][..],
        &["--eval-tasks", "2"],
        &common,
    ]
    .concat());

    let learned = scrape(&learner_metrics);
    assert_eq!(
        value(
            &learned,
            "chorus_learner_steps_total",
            "outcome=\"trained\""
        ),
        5.0,
        "{learned}"
    );
    assert_eq!(value(&learned, "chorus_learner_policy_version", ""), 5.0);
    assert_eq!(
        value(&learned, "chorus_learner_step_seconds_count", ""),
        5.0
    );
    for counter in [
        "chorus_learner_trained_sequences_total",
        "chorus_learner_trained_tokens_total",
        "chorus_learner_published_bytes_total",
    ] {
        assert!(value(&learned, counter, "") > 0.0, "{counter}: {learned}");
    }
    let generated = scrape(&worker_metrics);
    for counter in [
        "chorus_worker_generated_tokens_total",
        "chorus_weight_sync_bytes_total",
        "chorus_weight_sync_seconds_count",
        "chorus_worker_generate_seconds_count",
    ] {
        assert!(
            value(&generated, counter, "") > 0.0,
            "{counter}: {generated}"
        );
    }
    assert!(value(&generated, "chorus_worker_requests_total", "outcome=\"ok\"") > 0.0);
    assert_eq!(
        value(&generated, "chorus_worker_requests_in_flight", ""),
        0.0
    );
    assert!(generated.contains("# TYPE chorus_worker_generate_seconds histogram"));
}

#[test]
fn the_orchestrator_daemon_serves_metrics_of_the_runs_it_schedules() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let daemon_metrics = free_address();
    let orchestrator = h.service(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--eval-tasks",
        "2",
        "--wait-seconds",
        "120",
        "--token",
        "tok",
        "--metrics",
        &daemon_metrics,
    ]);
    // A standby service exports nothing itself (it hands the address to each run's service),
    // so its metrics address stays free while it stands by.
    let standby_metrics = free_address();
    let _fleet = [("learner", "L"), ("worker", "w0")].map(|(role, id)| {
        h.standby(&[
            "serve",
            role,
            "--orchestrator",
            &orchestrator.url,
            "--id",
            id,
            "--token",
            "tok",
            "--metrics",
            if role == "learner" {
                &standby_metrics
            } else {
                "127.0.0.1:0"
            },
        ])
    });
    assert!(std::net::TcpListener::bind(&standby_metrics).is_ok());
    let before = scrape(&daemon_metrics);
    assert_eq!(value(&before, "chorus_prompts_dispatched_total", ""), 0.0);

    let launched = h.chorus(&[
        "launch",
        "run.toml",
        "--orchestrator",
        &orchestrator.url,
        "--token",
        "tok",
    ]);
    assert!(
        launched.status.success(),
        "{}",
        String::from_utf8_lossy(&launched.stderr)
    );
    let after = scrape(&daemon_metrics);
    let env = "environment=\"arithmetic\"";
    for (counter, labels) in [
        ("chorus_prompts_dispatched_total", env),
        ("chorus_trajectories_total", "status=\"ok\""),
        ("chorus_generated_tokens_total", env),
        ("chorus_environment_calls_total", env),
        ("chorus_environment_call_seconds_count", env),
        ("chorus_groups_submitted_total", ""),
        ("chorus_trajectory_lag_versions_count", ""),
        ("chorus_rollout_queue_seconds_count", ""),
        ("chorus_ledger_write_lag_seconds_count", ""),
        ("chorus_orchestrator_policy_version", ""),
    ] {
        assert!(value(&after, counter, labels) > 0.0, "{counter}: {after}");
    }
    assert_eq!(value(&after, "chorus_rollout_requests_in_flight", ""), 0.0);
    assert_eq!(value(&after, "chorus_environment_faults_total", ""), 0.0);
}

/// The metric names the services declare (`pub const X: &str = "chorus_…";` in their
/// `metrics.rs`).
fn declared() -> Vec<String> {
    let mut names = vec![];
    for file in [
        "orchestrator/src/metrics.rs",
        "learner/src/metrics.rs",
        "rollout-worker/src/metrics.rs",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        for line in text.lines() {
            if let Some(rest) = line.split("&str = \"").nth(1) {
                names.push(rest.trim_end_matches("\";").to_string());
            }
        }
    }
    names
}

#[test]
fn the_metrics_doc_and_the_grafana_dashboard_name_only_metrics_that_exist() {
    let names = declared();
    assert!(names.len() >= 25, "{names:?}");
    let doc = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    for name in &names {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/metrics.md lacks {name}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/chorus.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("chorus_") {
                    continue;
                }
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    names.iter().any(|n| n == base),
                    "panel {:?} queries {word}, which no service exports",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(
        queried >= names.len(),
        "the dashboard queries {queried} series"
    );
    let text = dashboard.to_string();
    for name in &names {
        assert!(
            text.contains(name.as_str()),
            "no panel of the dashboard shows {name}"
        );
    }
}
