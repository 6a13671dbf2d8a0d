//! A vLLM server as a child process: started in its own process group, watched by a thread of
//! its own (which asks the kernel to kill the server if that thread, and so Chorus, dies), and
//! killed with its whole group when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chorus_proto::http::{BaseUrl, send_once};
use tokio::sync::watch;

/// How Chorus starts a vLLM server.
#[derive(Clone, Debug, PartialEq)]
pub struct VllmLaunch {
    /// The Python interpreter that has vLLM; the server runs as
    /// `PYTHON -m vllm.entrypoints.openai.api_server`.
    pub python: String,
    /// Arguments after Chorus' own (a later flag overrides an earlier one).
    pub args: Vec<String>,
    /// Environment variables for the server, after Chorus' defaults.
    pub env: Vec<(String, String)>,
    /// Longest wait for the server to answer `/health`.
    pub start_timeout: Duration,
    /// `--max-model-len`: prompt and completion tokens of one sequence.
    pub max_model_len: usize,
    /// `--max-num-seqs`: sequences decoded together.
    pub max_num_seqs: usize,
}

/// A running server Chorus started.
pub(crate) struct ServerProcess {
    pub base: BaseUrl,
    pub url: String,
    pgid: i32,
    /// `Some(status)` once the process has exited.
    pub exited: watch::Receiver<Option<String>>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl ServerProcess {
    /// Kills the server and every process it started (its process group).
    pub fn kill(&self) {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
    }

    /// True while the server's main process exists.
    pub fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the process group exists.
        unsafe { libc::kill(-self.pgid, 0) == 0 }
    }

    /// Stops (`SIGSTOP`) the server's processes, so it answers nothing: fault drills only.
    pub fn freeze(&self) {
        // SAFETY: as in `kill`.
        unsafe {
            libc::kill(-self.pgid, libc::SIGSTOP);
        }
    }

    /// Starts a server on `model_dir` and waits until it answers `/health`, logging progress
    /// every 15 s; its output goes to `log`.
    pub async fn start(launch: &VllmLaunch, model_dir: &Path, log: &Path) -> Result<Self, String> {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let base = BaseUrl::parse(&url)?;
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("opening the server log {}: {e}", log.display()))?;
        let err_file = log_file
            .try_clone()
            .map_err(|e| format!("the server log {}: {e}", log.display()))?;
        let mut cmd = Command::new(&launch.python);
        cmd.args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(model_dir)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--dtype", "float32"])
            .args(["--max-model-len", &launch.max_model_len.to_string()])
            .args(["--max-num-seqs", &launch.max_num_seqs.to_string()])
            // The log-probability of each token under the distribution it was drawn from
            // (after temperature, top-k, top-p), as Chorus' engine reports it.
            .args(["--logprobs-mode", "processed_logprobs"])
            // Tokens in, tokens out: the server never needs the tokenizer.
            .arg("--skip-tokenizer-init")
            .args(&launch.args)
            // The routes that pause, reload and version the weights exist in dev mode only.
            .env("VLLM_SERVER_DEV_MODE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                // The server dies with the thread that started it, which lives exactly as long
                // as the server (below): a Chorus killed outright leaves no server behind.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (exited_tx, exited) = watch::channel(None);
        let python = launch.python.clone();
        std::thread::Builder::new()
            .name(format!("vllm-server-{port}"))
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(format!("starting `{python}`: {e}")));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(child.id() as i32));
                let status = match child.wait() {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("unknown ({e})"),
                };
                let _ = exited_tx.send(Some(status));
            })
            .map_err(|e| format!("starting the server's watcher thread: {e}"))?;
        let pgid = started_rx
            .recv()
            .map_err(|_| "the server's watcher thread ended".to_string())??;
        let server = Self {
            base,
            url,
            pgid,
            exited,
        };
        server.wait_healthy(launch.start_timeout, log).await?;
        Ok(server)
    }

    async fn wait_healthy(&self, timeout: Duration, log: &Path) -> Result<(), String> {
        let started = Instant::now();
        let mut told = Instant::now();
        loop {
            if let Some(status) = self.exited.borrow().clone() {
                return Err(format!(
                    "the vLLM server exited ({status}) before serving; the end of its log ({}):\n{}",
                    log.display(),
                    log_tail(log)
                ));
            }
            if healthy(&self.base).await {
                tracing::info!(url = %self.url, seconds = started.elapsed().as_secs(), "vLLM server ready");
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "the vLLM server did not answer /health within {timeout:?} (raise \
                     workers.vllm.start_timeout_seconds); the end of its log ({}):\n{}",
                    log.display(),
                    log_tail(log)
                ));
            }
            if told.elapsed() >= Duration::from_secs(15) {
                told = Instant::now();
                tracing::info!(url = %self.url, seconds = started.elapsed().as_secs(), "waiting for the vLLM server to start ({} s)", started.elapsed().as_secs());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// True when the server at `base` answers `/health` with 200 within 5 s.
pub(crate) async fn healthy(base: &BaseUrl) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(5), send_once(base, "/health", None, None)).await,
        Ok(Ok(a)) if a.status == 200
    )
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Where a worker keeps its files: `weights/v<N>` per version, `server.log`.
pub(crate) fn version_dir(work_dir: &Path, version: u64) -> PathBuf {
    work_dir.join("weights").join(format!("v{version}"))
}
