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
