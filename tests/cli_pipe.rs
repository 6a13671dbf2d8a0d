//! Every command that writes to standard output ends quietly, with success, when its reader has
//! gone (`chorus inspect runs | head`), as ripgrep does: no panic about a broken pipe.

mod harness;

use std::process::{Command, Stdio};

use harness::*;

/// Runs `chorus ARGS…` in `h` with a standard output whose reader closed before the command
/// started, so its first write meets a broken pipe whatever the timing; it must succeed
/// without a word about it.
fn with_reader_gone(h: &Harness, args: &[&str]) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .current_dir(h.dir.path())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run chorus");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chorus {args:?} with its reader gone ended {:?}:\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked") && !stderr.to_lowercase().contains("broken pipe"),
        "chorus {args:?}: {stderr}"
    );
}

#[test]
fn commands_end_quietly_when_their_reader_has_gone() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    // The commands need what the earlier ones write, so make it with a reader first.
    h.ok(&["model", "init", "--config", "model.json", "--out", "m"]);
    let db = format!("sqlite://{}", h.path("ledger.sqlite").display());
    std::fs::write(
        h.path("gsm8k.jsonl"),
        "{\"question\": \"2+2?\", \"answer\": \"4\\n#### 4\"}\n",
    )
    .unwrap();
    std::fs::write(
        h.path("answers.jsonl"),
        "{\"id\": 0, \"completion\": \"4\"}\n",
    )
    .unwrap();
    for args in [
        &[
            "env",
            "score",
            "math_word",
            "--dataset",
            "gsm8k.jsonl",
            "--completions",
            "answers.jsonl",
        ][..],
        &["env", "check", "arithmetic", "--tasks", "1"],
        &["--help"][..],
        &["env", "list"],
        &["env", "sample", "arithmetic", "--seed", "3"],
        &["model", "init", "--config", "model.json", "--out", "m2"],
        &["model", "info", "--checkpoint", "m"],
        &[
            "generate",
            "--checkpoint",
            "m",
            "--prompt-ids",
            "5,6",
            "--max-new-tokens",
            "2",
            "--json",
        ],
        &[
            "generate",
            "--checkpoint",
            "m",
            "--prompt",
            "1+1=",
            "--max-new-tokens",
            "2",
        ],
        &["inspect", "--db", &db, "runs"],
    ] {
        with_reader_gone(&h, args);
    }
}
