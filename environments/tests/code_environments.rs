//! The code environments through the public API: registered, self-checking, and scoring
//! hostile solutions as failures with a reason while the host stays untouched.

use std::path::Path;

use chorus_environments::sandbox::{Backend, shared};
use chorus_environments::{CheckOptions, Split, builtin_registry, check_environment};

const CODE_ENVS: [&str; 3] = ["code_python", "code_output", "competitive"];

#[test]
fn code_environments_are_registered_and_pass_their_self_check() {
    let registry = builtin_registry();
    for name in CODE_ENVS {
        let env = registry.get(name).unwrap();
        assert_eq!(
            serde_json::to_value(env.info().category).unwrap(),
            "code",
            "{name}"
        );
        let options = CheckOptions {
            tasks_per_split: 2,
            difficulties: Some(vec![0, 2]),
            base_seed: 7,
        };
        let report = check_environment(env.as_ref(), &options);
        assert!(report.passed, "{name}: {:#?}", report.failures);
    }
    let backend = shared().unwrap().backend();
    println!("sandbox backend: {backend}");
    assert!(matches!(backend, Backend::Bubblewrap | Backend::Namespaces));
}

#[test]
fn hostile_solutions_score_zero_with_a_reason_and_harm_nothing() {
    let registry = builtin_registry();
    let marker = std::env::temp_dir().join(format!("chorus-code-env-{}", std::process::id()));
    let repo_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let before = std::fs::read(&repo_file).unwrap();
    // Each attack runs at import time, in a program that also defines the function asked for.
    let attacks = [
        format!(
            "import os\nopen({:?}, 'w').write('x')\nprint(open('/etc/shadow').read())",
            marker.display().to_string()
        ),
        format!("print(open({:?}).read())", repo_file.display().to_string()),
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)".to_string(),
        "import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)"
            .to_string(),
    ];
    for name in ["code_python", "competitive"] {
        let env = registry.get(name).unwrap();
        let task = env.sample(1, Split::Train, 2).unwrap();
        let entry = task.verification["entry_point"].as_str().unwrap_or("main");
        for attack in &attacks {
            let completion =
                format!("```python\ndef {entry}(*args):\n    return None\n\n{attack}\n```");
            let score = env.score(&task, &completion).unwrap();
            assert!(!score.is_full(), "{name}: {attack} -> {score:?}");
            assert_eq!(score.reward, 0.0, "{name}: {attack} -> {score:?}");
            assert!(!score.reason.is_empty());
            println!("{name}: {}", score.reason);
        }
    }
    assert!(!marker.exists(), "a solution wrote {}", marker.display());
    assert_eq!(std::fs::read(&repo_file).unwrap(), before);
}
