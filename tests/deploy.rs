//! The Kubernetes manifests under `deploy/k8s/`: valid against the Kubernetes API schemas
//! (offline, with PyPI's `kubernetes-validate`, strict), every `chorus` command line in them
//! accepted by this binary's argument parser, and the run config and model they mount valid.
//!
//! The schema check needs `CHORUS_TEST_PYTHON` with `kubernetes-validate` installed (`.ci/run`
//! installs it into the SDK venv); without it that part says it was skipped (and fails under
//! CI). The other checks always run.

mod harness;

use std::process::Command;

use harness::*;

fn manifests() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    files
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let Some(python) = python_importing(
        "CHORUS_TEST_PYTHON",
        "kubernetes_validate",
        "the SDK venv with kubernetes-validate installed, as .ci/run makes",
        Missing::FailsUnderCi,
    ) else {
        return;
    };
    let out = Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.31.0"])
        .args(manifests())
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for kind in [
        "deployment",
        "service",
        "statefulset",
        "job",
        "secret",
        "configmap",
    ] {
        assert!(
            text.contains(&format!("for resource {kind}/")),
            "{kind}: {text}"
        );
    }
}

/// The `args:` list of each container whose image is chorus, with `$(VAR)` references filled.
fn chorus_command_lines(text: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    let mut lines = text.lines().peekable();
    let mut in_chorus = false;
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed.starts_with("image:") {
            in_chorus = trimmed.contains("chorus:");
        }
        if in_chorus && trimmed == "args:" {
            let mut args = vec![];
            while let Some(next) = lines.peek() {
                let Some(arg) = next.trim().strip_prefix("- ") else {
                    break;
                };
                args.push(
                    arg.replace("$(POD_IP)", "10.0.0.5")
                        .replace("$(POD_NAME)", "chorus-worker-0")
                        .replace("$(POSTGRES_PASSWORD)", "pw"),
                );
                lines.next();
            }
            out.push(args);
        }
    }
    out
}

#[test]
fn every_chorus_command_line_in_the_manifests_parses() {
    let h = Harness::new();
    let mut commands = 0;
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        for args in chorus_command_lines(&text) {
            // --help last: clap rejects any unknown or malformed argument before it.
            let mut with_help: Vec<&str> = args.iter().map(String::as_str).collect();
            with_help.push("--help");
            let out = h.chorus(&with_help);
            assert!(
                out.status.success(),
                "{}: chorus {args:?}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            commands += 1;
        }
    }
    // Orchestrator, learner, workers, an environment and the launch Job.
    assert_eq!(commands, 5);
}

/// Issue 14: the token and the TLS material come from Secrets; every Chorus process speaks
/// mutual TLS with the mounted certificate, and every URL it is given is https://.
#[test]
fn every_chorus_process_speaks_mutual_tls_with_the_mounted_secret() {
    let secrets = std::fs::read_to_string(repo().join("deploy/k8s/00-secret.yaml")).unwrap();
    assert!(secrets.contains("name: chorus-tls"), "no TLS Secret");
    for key in ["tls.crt:", "tls.key:", "ca.crt:"] {
        assert!(secrets.contains(key), "the TLS Secret has no {key}");
    }
    let mut processes = 0;
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        for args in chorus_command_lines(&text) {
            for flag in [
                "--tls-cert=/tls/tls.crt",
                "--tls-key=/tls/tls.key",
                "--tls-ca=/tls/ca.crt",
                "--tls-server-name=chorus",
            ] {
                assert!(
                    args.iter().any(|a| a == flag),
                    "{}: no {flag}: {args:?}",
                    file.display()
                );
            }
            assert!(
                !args.iter().any(|a| a.contains("http://")),
                "{}: a plain URL in {args:?}",
                file.display()
            );
            processes += 1;
        }
        if !chorus_command_lines(&text).is_empty() {
            assert!(
                text.contains("mountPath: /tls") && text.contains("secretName: chorus-tls"),
                "{}: the TLS Secret is not mounted at /tls",
                file.display()
            );
        }
    }
    assert_eq!(processes, 5);
    let config = std::fs::read_to_string(repo().join("deploy/k8s/01-config.yaml")).unwrap();
    assert!(
        !config.contains("http://"),
        "the run config names a plain URL"
    );
}

#[test]
fn the_mounted_run_config_and_model_are_valid() {
    let text = std::fs::read_to_string(repo().join("deploy/k8s/01-config.yaml")).unwrap();
    let block = |key: &str| -> String {
        let start = text
            .find(&format!("  {key}: |\n"))
            .unwrap_or_else(|| panic!("no {key}"));
        text[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let config =
        chorus_orchestrator::config::RunConfig::from_toml_str(&block("run.toml"), "run.toml")
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.stages.len(), 2);
    chorus_model::NemotronHConfig::from_json_str(&block("model.json")).unwrap();
}

/// Issue 13: the environment plugin holds a token of its own, never the services' shared one,
/// and the orchestrator sends it that one (CHORUS_PLUGIN_TOKEN).
#[test]
fn the_plugin_gets_its_own_token_and_never_the_shared_one() {
    let read = |name: &str| std::fs::read_to_string(repo().join("deploy/k8s").join(name)).unwrap();
    assert!(
        read("00-secret.yaml").contains("plugin-token:"),
        "no plugin token in the Secret"
    );
    let keys_of = |text: &str, var: &str| -> Vec<String> {
        // The `key:` of each env entry named `var` (its secretKeyRef four lines below).
        let lines: Vec<&str> = text.lines().collect();
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim() == format!("- name: {var}"))
            .filter_map(|(i, _)| {
                lines[i..(i + 6).min(lines.len())]
                    .iter()
                    .find_map(|l| l.trim().strip_prefix("key: ").map(str::to_string))
            })
            .collect()
    };
    let plugin = read("06-environment.yaml");
    assert_eq!(keys_of(&plugin, "CHORUS_TOKEN"), ["plugin-token"]);
    let orchestrator = read("03-orchestrator.yaml");
    assert_eq!(keys_of(&orchestrator, "CHORUS_TOKEN"), ["token"]);
    assert_eq!(
        keys_of(&orchestrator, "CHORUS_PLUGIN_TOKEN"),
        ["plugin-token"]
    );
}
