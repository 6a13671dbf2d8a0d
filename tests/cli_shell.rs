//! `chorus completions SHELL` and `chorus man`: generated from the same definitions as `--help`,
//! so they know every command and flag.

mod harness;

use std::process::Command;

use harness::*;

#[test]
fn completion_scripts_know_every_command_and_bash_accepts_its_script() {
    let h = Harness::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = h.ok(&["completions", shell]);
        for command in ["run", "serve", "inspect", "audit", "env", "launch", "man"] {
            assert!(script.contains(command), "{shell}: no `{command}`");
        }
        // fish names long flags without their dashes (`-l resume`).
        assert!(script.contains("resume"), "{shell}: no `resume` flag");
    }
    let bash = h.ok(&["completions", "bash"]);
    std::fs::write(h.path("chorus.bash"), &bash).unwrap();
    let checked = Command::new("bash")
        .args(["-n", s(&h.path("chorus.bash"))])
        .output()
        .expect("bash");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let err = h.fails(&["completions", "tcsh"]);
    assert!(err.contains("bash") && err.contains("zsh"), "{err}");
}

#[test]
fn man_writes_a_page_per_command_with_its_flags() {
    let h = Harness::new();
    let out = h.ok(&["man", "--out", "man1"]);
    assert!(out.contains("manual pages"), "{out}");
    for (page, flag) in [
        ("chorus.1", "log\\-format"),
        ("chorus-run.1", "resume"),
        ("chorus-serve-learner.1", "orchestrator"),
        ("chorus-env-check.1", "max\\-turns"),
        ("chorus-audit.1", "all"),
    ] {
        let text = std::fs::read_to_string(h.path(&format!("man1/{page}")))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is no man page");
        assert!(text.contains(flag), "{page} lacks `{flag}`:\n{text}");
    }
    // Without --out: chorus(1) on standard output.
    let page = h.ok(&["man"]);
    assert!(page.contains(".TH chorus 1"), "{page}");
}
