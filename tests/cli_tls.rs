//! TLS between Chorus' services, and credentials that never show: certificates made here with
//! rcgen (a CA, a certificate for 127.0.0.1 that every service uses as its server and client
//! identity, a client certificate from the CA, and clients from a stranger CA or self-signed).
//!
//! - An orchestrator serving mutual TLS answers a client presenting a certificate from its CA
//!   (`chorus launch` and a gRPC call) and refuses, with a TLS error rather than a hang, a client
//!   without a certificate, one from another CA, a self-signed one, and plain text.
//! - A run over mutual TLS between separate processes (orchestrator, learner, worker, all
//!   registering over https) completes; with every log at `trace` its token appears nowhere:
//!   not in any process's output or log, nor in any file the run wrote.
//! - A standing fleet over mutual TLS: standby services hand their TLS settings to the services
//!   they start per run, which register https:// addresses and complete a launched run.
//! - `chorus run` with an environment plugin reached over https completes, and neither the run
//!   nor the plugin writes the token anywhere.
//! - A process Chorus starts that is not one of its services (a worker's vLLM server) inherits
//!   nothing of the token the worker was given in its environment.

mod harness;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use chorus_proto::tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use harness::*;

/// A token that no log line, file or output may contain.
const SECRET: &str = "SECRET-tls-7f3a9c";

/// An error and its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// Calls `GetRun(run_id)` on the orchestrator at `url` over TLS trusting `ca.pem`, presenting
/// `identity` (`NAME.pem`/`NAME.key`) if given. The outcome, or the whole error chain. The call
/// has a deadline far beyond a handshake, so a refusal that hung would fail the test as a hang.
fn get_run(h: &Harness, url: &str, identity: Option<&str>, run_id: &str) -> Result<String, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(h.path("ca.pem")).unwrap(),
        ))
        .domain_name("127.0.0.1");
    if let Some(name) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(h.path(&format!("{name}.pem"))).unwrap(),
            std::fs::read(h.path(&format!("{name}.key"))).unwrap(),
        ));
    }
    let call = async {
        let channel = Endpoint::from_shared(url.to_string())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("connect: {}", chain(&e)))?;
        let mut client =
            chorus_proto::v1::orchestrator_client::OrchestratorClient::with_interceptor(
                channel,
                chorus_proto::auth::AttachToken::new(SECRET).unwrap(),
            );
        client
            .get_run(chorus_proto::v1::GetRunRequest {
                run_id: run_id.into(),
            })
            .await
            .map(|r| r.into_inner().run_id)
            .map_err(|s| format!("{:?}: {}: {}", s.code(), s.message(), chain(&s)))
    };
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), call)
            .await
            .unwrap_or_else(|_| panic!("GetRun at {url} hung for 120 s instead of failing"))
    })
}

/// Whether an error is the connection's, not an answer of the service: a TLS failure (an alert,
/// a certificate check) or the connection closed under the call. With TLS 1.3 a client learns
/// that the server refused its certificate only as the closed connection.
fn is_transport_refusal(e: &str) -> bool {
    let e = e.to_lowercase();
    (e.contains("certificate") || e.contains("alert") || e.contains("transport error"))
        && !e.contains("notfound")
        && !e.contains("unauthenticated")
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[test]
fn mutual_tls_admits_only_clients_with_a_certificate_from_its_ca() {
    let h = Harness::new();
    let pki = Pki::write(&h);
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(
        h.path("run.toml"),
        "name = \"queued\"\n[model]\ninit_config = \"model.json\"\n[[stages]]\nname = \"sft\"\n\
         kind = \"sft\"\nsteps = 1\nprompts_per_step = 2\nenvironments = [{ name = \"arithmetic\" }]\n",
    )
    .unwrap();
    let orchestrator = h.service(
        &[
            &["serve", "orchestrator", "--listen", "127.0.0.1:0"][..],
            &["--token", SECRET],
            &pki.node_flags(),
        ]
        .concat(),
    );
    let url = orchestrator.url.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // `chorus launch` with a client certificate from the CA: a real LaunchRun, answered.
    let launched = h.ok(&[
        "launch",
        "run.toml",
        "--orchestrator",
        &url,
        "--token",
        SECRET,
        "--detach",
        "--tls-cert",
        "client.pem",
        "--tls-key",
        "client.key",
        "--tls-ca",
        "ca.pem",
    ]);
    let run_id = launched.trim();
    assert!(run_id.starts_with("queued-"), "{launched}");
    // And a gRPC client of the test's own with the same certificate reads the run back.
    assert_eq!(get_run(&h, &url, Some("client"), run_id).unwrap(), run_id);

    // Without a certificate, with one from another CA, or self-signed: refused in the TLS
    // handshake, before any call.
    for who in [None, Some("stranger"), Some("self")] {
        let err = get_run(&h, &url, who, run_id).unwrap_err();
        assert!(
            is_transport_refusal(&err),
            "{who:?}: not a TLS error: {err}"
        );
    }
    // The CLI the same: no certificate, a stranger's.
    let err = h.fails(&[
        "watch",
        run_id,
        "--orchestrator",
        &url,
        "--token",
        SECRET,
        "--tls-ca",
        "ca.pem",
    ]);
    assert!(
        is_transport_refusal(&err) && err.contains("give this command a --tls-cert"),
        "{err}"
    );
    let err = h.fails(&[
        "watch",
        run_id,
        "--orchestrator",
        &url,
        "--token",
        SECRET,
        "--tls-ca",
        "ca.pem",
        "--tls-cert",
        "stranger.pem",
        "--tls-key",
        "stranger.key",
    ]);
    assert!(is_transport_refusal(&err), "{err}");
    // Plain text to the TLS port is refused too.
    let plain = url.replace("https://", "http://");
    let err = h.fails(&[
        "launch",
        "run.toml",
        "--orchestrator",
        &plain,
        "--token",
        SECRET,
        "--detach",
    ]);
    assert!(err.contains(&plain), "{err}");
    // A client that does not trust the CA refuses the server.
    let err = h.fails(&["watch", run_id, "--orchestrator", &url, "--token", SECRET]);
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // A service whose certificate names no address, only a DNS name, is reached at its IP by
    // clients told that name (--tls-server-name), and refused by clients that are not.
    let named = h.service(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--token",
        SECRET,
        "--tls-cert",
        "named.pem",
        "--tls-key",
        "named.key",
    ]);
    let at_named = [
        "--orchestrator",
        &named.url,
        "--token",
        SECRET,
        "--tls-ca",
        "ca.pem",
    ];
    let err = h.fails(&[&["watch", "nope"][..], &at_named].concat());
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let err = h.fails(
        &[
            &["watch", "nope"][..],
            &at_named,
            &["--tls-server-name", "chorus.internal"],
        ]
        .concat(),
    );
    assert!(
        err.contains("nope") && !is_transport_refusal(&err),
        "an answer of the service: {err}"
    );

    // Bad TLS files are refused before anything starts, naming the file and the problem.
    let err = h.fails(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--token",
        "t",
        "--tls-cert",
        "node.pem",
        "--tls-key",
        "client.key",
    ]);
    assert!(
        err.contains("client.key") && err.contains("not the private key"),
        "{err}"
    );
    let err = h.fails(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--token",
        "t",
        "--tls-cert",
        "node.pem",
    ]);
    assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
    let err = h.fails(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--token",
        "t",
        "--tls-cert",
        "missing.pem",
        "--tls-key",
        "node.key",
    ]);
    assert!(
        err.contains("missing.pem") && err.contains("cannot read"),
        "{err}"
    );
    let err = h.fails(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--token",
        "t",
        "--tls-cert",
        "node.key",
        "--tls-key",
        "node.key",
    ]);
    assert!(
        err.contains("node.key") && err.contains("no certificate"),
        "{err}"
    );
    let err = h.fails(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--token",
        "t",
        "--tls-ca",
        "ca.pem",
    ]);
    assert!(err.contains("--tls-cert and --tls-key"), "{err}");
}

const RUN: &str = r#"
name = "tls"
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 1
prompts_per_step = 2
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 2
group_size = 2
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

#[test]
fn a_run_over_mutual_tls_between_processes_completes_and_logs_no_token() {
    let h = Harness::new();
    let pki = Pki::write(&h);
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    // The token from the environment, every log at its most verbose.
    let env = [("CHORUS_TOKEN", SECRET), ("RUST_LOG", "trace")];
    let common = [
        &["--config", "run.toml", "--run-id", "r1"][..],
        &pki.node_flags(),
    ]
    .concat();
    let (mut orchestrator, mut stdout) = h.service_logged(
        &[
            &["serve", "orchestrator", "--listen", "127.0.0.1:0"][..],
            &["--eval-tasks", "2", "--wait-seconds", "300"],
            &common,
        ]
        .concat(),
        &env,
        "orchestrator.log",
    );
    let url = orchestrator.url.clone();
    assert!(url.starts_with("https://"), "{url}");
    let (learner, _) = h.service_logged(
        &[&["serve", "learner", "--orchestrator", &url][..], &common].concat(),
        &env,
        "learner.log",
    );
    assert!(learner.url.starts_with("https://"), "{}", learner.url);
    let (_worker, _) = h.service_logged(
        &[
            &[
                "serve",
                "worker",
                "--learner",
                &learner.url,
                "--orchestrator",
                &url,
            ][..],
            &common,
        ]
        .concat(),
        &env,
        "worker.log",
    );
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(orchestrator.child.wait().unwrap().success(), "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["steps"], 3, "{summary}");
    assert!(summary["trajectories"].as_u64().unwrap() > 0, "{summary}");

    // The logs are there and verbose (the check below would pass on empty files otherwise).
    for log in ["orchestrator.log", "learner.log", "worker.log"] {
        let text = std::fs::read_to_string(h.path(log)).unwrap();
        assert!(
            text.contains("TRACE") || text.contains("DEBUG"),
            "{log} is not verbose"
        );
    }
    assert!(!out.contains(SECRET));
    assert_eq!(files_containing(h.dir.path(), SECRET), Vec::<String>::new());

    // Help does not show the token it would take from the environment either.
    let help = h.chorus(&["serve", "learner", "--help"]);
    let help_text = String::from_utf8_lossy(&help.stdout);
    assert!(help_text.contains("CHORUS_TOKEN"), "{help_text}");
    assert!(!help_text.contains(SECRET), "{help_text}");
    let with_env = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["run", "--help"])
        .env("CHORUS_TOKEN", SECRET)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&with_env.stdout).contains(SECRET));
}

#[test]
fn a_local_run_reaches_its_plugin_over_tls_and_neither_logs_the_token() {
    let h = Harness::new();
    let pki = Pki::write(&h);
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    // The plugin's token is the services' one here, so that a leak of either shows.
    let env = [
        ("CHORUS_TOKEN", SECRET),
        ("CHORUS_PLUGIN_TOKEN", SECRET),
        ("RUST_LOG", "trace"),
    ];
    let (plugin, _) = h.service_logged(
        &[
            &[
                "serve",
                "environment",
                "countdown",
                "--listen",
                "127.0.0.1:0",
            ][..],
            &pki.node_flags(),
        ]
        .concat(),
        &env,
        "plugin.log",
    );
    assert!(plugin.url.starts_with("https://"), "{}", plugin.url);
    std::fs::write(
        h.path("run.toml"),
        RUN.replace("name = \"tls\"", "name = \"plugged\"").replace(
            "{ name = \"arithmetic\" }",
            &format!("{{ url = \"{}\" }}", plugin.url),
        ),
    )
    .unwrap();
    // `chorus run` serves its own learner and worker over TLS too (it has a certificate) and
    // calls the plugin with its node identity.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(
            [
                &["run", "run.toml", "--eval-tasks", "2"][..],
                &pki.node_flags(),
            ]
            .concat(),
        )
        .envs(env)
        .current_dir(h.dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("TRACE") || stderr.contains("DEBUG"),
        "not verbose"
    );
    assert!(
        stderr.contains("https://127.0.0.1:"),
        "no TLS service: {stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"], 3, "{summary}");
    assert!(!stderr.contains(SECRET) && !String::from_utf8_lossy(&out.stdout).contains(SECRET));
    assert_eq!(files_containing(h.dir.path(), SECRET), Vec::<String>::new());

    // Without a certificate the plugin, which requires one, turns the run away at the start.
    let err = h.fails(&[
        "run",
        "run.toml",
        "--eval-tasks",
        "2",
        "--token",
        SECRET,
        "--plugin-token",
        SECRET,
        "--tls-ca",
        "ca.pem",
    ]);
    assert!(
        err.contains(&plugin.url) && is_transport_refusal(&err),
        "{err}"
    );
}

/// The shared token reaches only Chorus' own services: a process Chorus starts for something
/// else inherits nothing of it. Here a worker given the token in `CHORUS_TOKEN` starts its
/// vLLM server (a stand-in script that records its environment and arguments, then exits).
#[test]
fn processes_chorus_starts_do_not_inherit_the_token() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    let script = h.path("fake-python");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nenv > {dir}/child.env\necho \"$@\" > {dir}/child.args\nexit 3\n",
            dir = h.dir.path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        h.path("vllm.toml"),
        format!(
            "name = \"v\"\n[model]\ninit_config = \"model.json\"\n[workers]\ncount = 1\n\
             backend = \"vllm\"\n[workers.vllm]\ncount = 1\npython = \"{}\"\n\
             max_model_len = 64\n[[stages]]\nname = \"sft\"\nkind = \"sft\"\nsteps = 1\n\
             prompts_per_step = 2\nenvironments = [{{ name = \"arithmetic\" }}]\n",
            script.display()
        ),
    )
    .unwrap();
    let env = [("CHORUS_TOKEN", SECRET)];
    let (learner, _) = h.service_logged(
        &["serve", "learner", "--config", "vllm.toml"],
        &env,
        "learner.log",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "serve",
            "worker",
            "--config",
            "vllm.toml",
            "--learner",
            &learner.url,
        ])
        .args(["--vllm-dir", "vllm"])
        .envs(env)
        .current_dir(h.dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the stand-in server cannot serve: {stderr}"
    );
    assert!(stderr.contains("exited"), "{stderr}");
    // The stand-in ran, with the worker's environment less the token.
    let child_env = std::fs::read_to_string(h.path("child.env")).unwrap();
    assert!(child_env.contains("VLLM_SERVER_DEV_MODE=1"), "{child_env}");
    assert!(
        !child_env.contains(SECRET) && !child_env.contains("CHORUS_TOKEN"),
        "{child_env}"
    );
    let child_args = std::fs::read_to_string(h.path("child.args")).unwrap();
    assert!(child_args.contains("vllm.entrypoints") && !child_args.contains(SECRET));
    assert!(!stderr.contains(SECRET));
}

/// A standing fleet over mutual TLS: the standby learner and worker hand their TLS settings to
/// the service each starts for a launched run, which serves https:// (its registration says so)
/// and completes the run.
#[test]
fn a_standing_fleet_over_mutual_tls_serves_a_launched_run() {
    let h = Harness::new();
    let pki = Pki::write(&h);
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let (orchestrator, _) = h.service_logged(
        &[
            &[
                "serve",
                "orchestrator",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ][..],
            &[
                "--eval-tasks",
                "2",
                "--wait-seconds",
                "300",
                "--token",
                SECRET,
            ],
            &pki.node_flags(),
        ]
        .concat(),
        &[],
        "orchestrator.log",
    );
    let url = orchestrator.url.clone();
    let _fleet: Vec<Service> = [("learner", "L"), ("worker", "w0")]
        .iter()
        .map(|(role, id)| {
            h.standby(
                &[
                    &[
                        "serve",
                        role,
                        "--orchestrator",
                        &url,
                        "--id",
                        id,
                        "--token",
                        SECRET,
                    ][..],
                    &pki.node_flags(),
                ]
                .concat(),
            )
        })
        .collect();
    let out = h.chorus(
        &[
            &[
                "launch",
                "run.toml",
                "--orchestrator",
                &url,
                "--token",
                SECRET,
            ][..],
            &[
                "--tls-cert",
                "client.pem",
                "--tls-key",
                "client.key",
                "--tls-ca",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    let events = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{events}");
    assert!(events.contains("succeeded"), "{events}");
    let run_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // The run's learner and worker registered https:// addresses.
    let log = std::fs::read_to_string(h.path("orchestrator.log")).unwrap();
    let endpoints: Vec<(String, String)> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["fields"]["run_id"] == run_id.as_str())
        .filter_map(|e| {
            let message = e["fields"]["message"].as_str()?.to_string();
            let endpoint = e["fields"]["endpoint"].as_str()?.to_string();
            Some((message, endpoint))
        })
        .collect();
    for service in ["learner registered", "worker registered"] {
        assert!(
            endpoints
                .iter()
                .any(|(m, e)| m == service && e.starts_with("https://127.0.0.1:")),
            "{service}: {endpoints:?}"
        );
    }
    assert!(
        endpoints.iter().all(|(_, e)| e.starts_with("https://")),
        "{endpoints:?}"
    );
}

/// The Python SDK speaks TLS as Chorus' services do. A plugin served with a certificate and a CA
/// (mutual TLS) answers `chorus env check` presenting a certificate from that CA and turns away
/// one presenting none; `chorus_env.Client` reaches an orchestrator serving mutual TLS with a
/// client certificate and is refused without one.
#[test]
fn python_plugins_and_clients_speak_mutual_tls() {
    let Some(python) = python_importing(
        "CHORUS_TEST_PYTHON",
        "grpc, chorus_env",
        "a Python with `pip install ./environments/python` done, as .ci/run does",
        Missing::FailsUnderCi,
    ) else {
        return;
    };
    let h = Harness::new();
    let pki = Pki::write(&h);
    let plugin = python_plugin(
        &python,
        "word_count",
        &[&["--token", SECRET][..], &pki.node_flags()].concat(),
        Some(&h.path("")),
    );
    let url = plugin.url.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let check = ["env", "check", "--url", &url, "--token", SECRET];
    let client_identity = [
        "--tls-ca",
        "ca.pem",
        "--tls-cert",
        "client.pem",
        "--tls-key",
        "client.key",
    ];
    h.ok(&[&check[..], &client_identity].concat());
    let err = h.fails(&[&check[..], &["--tls-ca", "ca.pem"]].concat());
    assert!(is_transport_refusal(&err), "{err}");

    let orchestrator = h.service(
        &[
            &["serve", "orchestrator", "--listen", "127.0.0.1:0"][..],
            &["--token", SECRET],
            &pki.node_flags(),
        ]
        .concat(),
    );
    assert!(orchestrator.url.starts_with("https://"));
    let script = r#"
import json, sys
import grpc
from chorus_env import TlsFiles
from chorus_env.client import Client
url, token = sys.argv[1], sys.argv[2]
with Client(url, token=token, tls=TlsFiles(ca="ca.pem", cert="client.pem", key="client.key")) as c:
    runs = c.runs()
try:
    Client(url, token=token, tls=TlsFiles(ca="ca.pem"), timeout=20).runs()
    refused = None
except grpc.RpcError as e:
    refused = e.code().name
print(json.dumps({"runs": len(runs), "refused": refused}))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, &orchestrator.url, SECRET])
        .current_dir(h.path(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["runs"], 0, "{answer}");
    assert_eq!(answer["refused"], "UNAVAILABLE", "{answer}");
}
