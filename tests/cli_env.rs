//! `chorus env` end to end.

mod harness;

use harness::*;

#[test]
fn list_json_has_the_documented_keys() {
    let h = Harness::new();
    let v: serde_json::Value = serde_json::from_str(&h.ok(&["env", "list", "--json"])).unwrap();
    let list = v.as_array().unwrap();
    assert!(list.len() >= 15);
    for e in list {
        for k in ["name", "category", "turns", "description"] {
            assert!(
                e.get(k).is_some_and(|x| x.is_string()),
                "{k} missing in {e}"
            );
        }
    }
    assert!(list.iter().any(|e| e["name"] == "arithmetic"));
}

#[test]
fn sampling_is_deterministic_and_splits_differ() {
    let h = Harness::new();
    let a = h.ok(&["env", "sample", "countdown", "--seed", "4", "--json"]);
    let b = h.ok(&["env", "sample", "countdown", "--seed", "4", "--json"]);
    assert_eq!(a, b);
    let v: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert_eq!(v["reference_score"]["reward"], 1.0);
    let held = h.ok(&[
        "env",
        "sample",
        "countdown",
        "--seed",
        "4",
        "--split",
        "heldout",
        "--json",
    ]);
    let w: serde_json::Value = serde_json::from_str(&held).unwrap();
    assert_ne!(v["task"]["id"], w["task"]["id"]);
}

#[test]
fn check_all_passes_and_bad_names_are_explained() {
    let h = Harness::new();
    let out = h.ok(&["env", "check", "--all", "--tasks", "2"]);
    assert!(out.lines().count() >= 15 && !out.contains("FAIL"), "{out}");
    let err = h.fails(&["env", "sample", "no_such_env"]);
    assert!(
        err.contains("no_such_env") && err.contains("arithmetic"),
        "{err}"
    );
    let err = h.fails(&["env", "sample", "arithmetic", "--split", "test"]);
    assert!(err.contains("split"), "{err}");
}

const GSM8K: &str = r#"{"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7 apples.\n#### 7"}
{"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "2*12=24\n#### 24", "task_id": "eggs"}
"#;

#[test]
fn score_prints_each_reward_and_reason_then_the_mean() {
    let h = Harness::new();
    std::fs::write(h.path("gsm8k.jsonl"), GSM8K).unwrap();
    std::fs::write(
        h.path("answers.jsonl"),
        "{\"id\": 0, \"completion\": \"<think>3+4</think>#### 7\"}\n\n\
         {\"id\": \"eggs\", \"completion\": \"I think 25\"}\n\
         {\"id\": \"1\", \"completion\": \"\\\\boxed{24}\"}\n",
    )
    .unwrap();
    let args = [
        "env",
        "score",
        "math_word",
        "--dataset",
        "gsm8k.jsonl",
        "--completions",
        "answers.jsonl",
    ];
    let out = h.ok(&args);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].starts_with('0') && lines[0].contains("reward  1.000"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("eggs") && lines[1].contains("reward  0.000"),
        "{out}"
    );
    assert!(lines[2].contains("reward  1.000"), "{out}");
    assert!(
        lines[3].contains("mean reward 0.6667 over 3 completions (2 with full reward)"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&h.ok(&[&args[..], &["--json"]].concat())).unwrap();
    assert_eq!(v["count"], 3);
    assert_eq!(v["items"][1]["line"], 1);
    assert_eq!(v["items"][1]["reward"], 0.0);
    assert!(
        v["items"][1]["reason"].as_str().unwrap().contains("25"),
        "{v}"
    );
}

#[test]
fn score_explains_bad_ids_lines_and_datasets() {
    let h = Harness::new();
    std::fs::write(h.path("gsm8k.jsonl"), GSM8K).unwrap();
    let run = |completions: &str, env: &str| {
        std::fs::write(h.path("c.jsonl"), completions).unwrap();
        h.fails(&[
            "env",
            "score",
            env,
            "--dataset",
            "gsm8k.jsonl",
            "--completions",
            "c.jsonl",
        ])
    };
    let ok = "{\"id\": 0, \"completion\": \"7\"}\n";
    for (completions, env, wanted) in [
        (
            format!("{ok}{{\"id\": 5, \"completion\": \"7\"}}\n"),
            "math_word",
            "c.jsonl line 2: id 5",
        ),
        (
            format!("{ok}{{\"id\": \"nope\", \"completion\": \"7\"}}\n"),
            "math_word",
            "\"nope\"",
        ),
        (
            format!("{ok}{{oops\n"),
            "math_word",
            "c.jsonl line 2: not JSON",
        ),
        (
            "{\"completion\": \"7\"}\n".to_string(),
            "math_word",
            "line 1: missing `id`",
        ),
        (ok.to_string(), "arithmetic", "reads no dataset files"),
        (ok.to_string(), "mcqa", "gsm8k.jsonl line 1: not a mcqa row"),
        (ok.to_string(), "nemo_gym", "--url"),
    ] {
        let err = run(&completions, env);
        assert!(err.contains(wanted), "{env} {completions:?}: {err}");
    }
}

#[test]
fn new_rust_writes_the_scaffold_that_the_environments_tests_compile() {
    let h = Harness::new();
    let out = h.ok(&["env", "new", "my_env", "--lang", "rust", "--dir", "src"]);
    assert!(out.contains("register(MyEnv)"), "{out}");
    let written = std::fs::read_to_string(h.path("src/my_env.rs")).unwrap();
    let compiled =
        std::fs::read_to_string(repo().join("environments/tests/plugin_scaffold/my_env.rs"))
            .unwrap();
    assert_eq!(written, compiled);
    let err = h.fails(&["env", "new", "my_env", "--lang", "rust", "--dir", "src"]);
    assert!(err.contains("already exists"), "{err}");
    let err = h.fails(&["env", "new", "Bad-Name", "--lang", "rust"]);
    assert!(err.contains("lowercase letters"), "{err}");
    let err = h.fails(&["env", "new", "arithmetic", "--lang", "rust"]);
    assert!(err.contains("built-in"), "{err}");
    let err = h.fails(&["env", "new", "x", "--lang", "go"]);
    assert!(err.contains("rust") && err.contains("python"), "{err}");
}

#[test]
fn new_python_writes_a_plugin_project_that_compiles_and_passes_its_test() {
    let h = Harness::new();
    h.ok(&[
        "env",
        "new",
        "word_echo",
        "--lang",
        "python",
        "--dir",
        "plugins",
    ]);
    let project = h.path("plugins/word_echo");
    for f in [
        "pyproject.toml",
        "README.md",
        "word_echo.py",
        "test_word_echo.py",
    ] {
        assert!(project.join(f).is_file(), "{f} missing");
    }
    let python = std::env::var("CHORUS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let compiled = std::process::Command::new(&python)
        .args(["-m", "py_compile", "word_echo.py", "test_word_echo.py"])
        .current_dir(&project)
        .output();
    match compiled {
        Err(e) => {
            println!("skipped: no Python to compile the scaffold with ({python}: {e})");
            return;
        }
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    // With the SDK installed, the scaffold's own test runs too.
    let has_sdk = std::process::Command::new(&python)
        .args(["-c", "import chorus_env"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        println!(
            "skipped running test_word_echo.py: {python} has no chorus_env (set CHORUS_TEST_PYTHON)"
        );
        return;
    }
    let out = std::process::Command::new(&python)
        .arg("test_word_echo.py")
        .current_dir(&project)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `chorus env score` on HumanEval-format data: every trick of the reward-hacking corpus
/// (`environments/tests/reward_hacking/function_hacks.py`) earns 0, the correct body 1.
#[test]
fn score_gives_forged_humaneval_solutions_nothing() {
    let h = Harness::new();
    // A row in HumanEval's format, written for this test.
    let row = r#"{"task_id": "Chorus/1", "prompt": "def count_vowels(text):\n    \"\"\"How many of the letters are vowels.\"\"\"\n", "entry_point": "count_vowels", "canonical_solution": "    return sum(c in 'aeiouAEIOU' for c in text)\n", "test": "def check(candidate):\n    assert candidate('') == 0\n    assert candidate('banana') == 3\n    assert candidate('RhythM') == 0\n"}"#;
    std::fs::write(h.path("humaneval.jsonl"), format!("{row}\n")).unwrap();
    let corpus =
        std::fs::read_to_string(repo().join("environments/tests/reward_hacking/function_hacks.py"))
            .unwrap();
    let mut names = vec!["correct".to_string()];
    let mut lines = vec![
        serde_json::json!({
            "id": 0,
            "completion": "    return sum(c in 'aeiouAEIOU' for c in text)\n",
        })
        .to_string(),
    ];
    for block in corpus.split("\n# --- ").skip(1) {
        let (name, code) = block.split_once('\n').unwrap();
        names.push(name.trim().to_string());
        let completion = format!("```python\n{}\n```", code.replace("ENTRY", "count_vowels"));
        lines.push(serde_json::json!({"id": 0, "completion": completion}).to_string());
    }
    std::fs::write(h.path("completions.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = h.ok(&[
        "env",
        "score",
        "code_python",
        "--dataset",
        "humaneval.jsonl",
        "--completions",
        "completions.jsonl",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), names.len(), "{out}");
    assert!(names.len() > 10);
    for (name, item) in names.iter().zip(items) {
        let want = if name == "correct" { 1.0 } else { 0.0 };
        assert_eq!(item["reward"], want, "{name}: {item}");
    }
    assert_eq!(v["full"], 1, "{out}");
}
