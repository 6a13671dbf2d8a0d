//! Long commands draw progress bars on a terminal and print plain lines elsewhere. The terminal
//! is a real pseudo-terminal from `script` (util-linux); without it the test says it was
//! skipped (failing under CI).

mod harness;

use std::process::Command;

use harness::*;

const RUN: &str = r#"
name = "bars"
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 3
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rlvr"
steps = 4
prompts_per_step = 3
group_size = 4
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

/// `chorus ARGS` on a pseudo-terminal; returns everything it drew.
fn on_a_terminal(h: &Harness, args: &str) -> Option<String> {
    let log = h.path("tty.log");
    let out = Command::new("script")
        .arg("-qec")
        .arg(format!("{} {args}", env!("CARGO_BIN_EXE_chorus")))
        .arg(&log)
        .current_dir(h.path(""))
        .env("TERM", "xterm")
        .output();
    match out {
        Ok(o) => {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
            Some(String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned())
        }
        Err(_) => {
            cannot_run("no `script` to make a pseudo-terminal (util-linux)");
            None
        }
    }
}

#[test]
fn runs_and_quantization_draw_bars_on_a_terminal_and_lines_elsewhere() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let Some(tty) = on_a_terminal(&h, "run run.toml --eval-tasks 2") else {
        return;
    };
    assert!(
        tty.contains("stage warmup (sft) [") && tty.contains("3/3 steps"),
        "no warm-up bar: {tty}"
    );
    assert!(
        tty.contains("stage rl (rlvr) [") && tty.contains("4/4 steps"),
        "no RL bar: {tty}"
    );
    // Log lines still print, above the bar.
    assert!(tty.contains("step    7"), "{tty}");

    // Off a terminal: the same lines, no bar.
    let h2 = Harness::new();
    std::fs::write(h2.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h2.path("run.toml"), RUN).unwrap();
    let out = h2.chorus(&["run", "run.toml", "--eval-tasks", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("step    7"), "{stderr}");
    assert!(
        !stderr.contains(" steps eta ") && !stderr.contains("[==="),
        "{stderr}"
    );

    // Quantization draws a bar of its tensors.
    h.ok(&["model", "init", "--config", "model.json", "--out", "base"]);
    let Some(tty) = on_a_terminal(&h, "quantize --input base --output q") else {
        return;
    };
    assert!(
        tty.contains("quantize [") && tty.contains(" tensors "),
        "{tty}"
    );
}

/// `chorus env score` counts its items on a terminal; off one it prints only the results.
#[test]
fn env_score_draws_a_bar_of_its_completions_on_a_terminal() {
    let h = Harness::new();
    std::fs::write(
        h.path("data.jsonl"),
        (0..6)
            .map(|i| {
                format!(
                    "{{\"question\": \"What is {i} plus 1?\", \"answer\": \"#### {}\"}}\n",
                    i + 1
                )
            })
            .collect::<String>(),
    )
    .unwrap();
    std::fs::write(
        h.path("answers.jsonl"),
        (0..6)
            .map(|i| format!("{{\"id\": {i}, \"completion\": \"#### {}\"}}\n", i + 1))
            .collect::<String>(),
    )
    .unwrap();
    let args = "env score math_word --dataset data.jsonl --completions answers.jsonl";
    let Some(tty) = on_a_terminal(&h, args) else {
        return;
    };
    assert!(
        tty.contains("score [") && tty.contains("6/6 completions"),
        "no bar: {tty}"
    );
    assert!(tty.contains("mean reward 1.0000 over 6"), "{tty}");
    let out = h.chorus(&args.split(' ').collect::<Vec<_>>());
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("completions"),
        "a bar off a terminal: {stderr}"
    );
}

/// A rollout worker serving on its own draws a bar of each weight transfer on a terminal.
#[test]
fn a_serving_worker_draws_its_weight_transfers_on_a_terminal() {
    use std::os::unix::process::CommandExt;

    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let common = ["--config", "run.toml", "--run-id", "r1", "--token", "tok"];
    let learner = h.service(&[&["serve", "learner"][..], &common].concat());
    let log = h.path("worker-tty.log");
    // The worker serves until stopped: `timeout` is only a backstop; the test stops it as soon
    // as the first transfer is drawn (or gives up after two minutes).
    let worker = format!(
        "timeout 600 {} serve worker --learner {} --id w0 {}",
        env!("CARGO_BIN_EXE_chorus"),
        learner.url,
        common.join(" ")
    );
    let Ok(mut child) = Command::new("script")
        // -f: the typescript is written as output comes, so it can be read while it runs.
        .arg("-qefc")
        .arg(&worker)
        .arg(&log)
        .current_dir(h.path(""))
        .env("TERM", "xterm")
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
    else {
        cannot_run("no `script` to make a pseudo-terminal (util-linux)");
        return;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut drawn = String::new();
    while std::time::Instant::now() < deadline {
        drawn = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
        if drawn.contains("weights v0") && drawn.contains("received") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.wait();
    assert!(
        drawn.contains("weights v0") && drawn.contains("received"),
        "no transfer bar: {drawn}"
    );
    // The progress events feed the bar only: they never print as log lines.
    assert!(!drawn.contains("receiving weights"), "{drawn}");
}
