//! The learner and a rollout worker as gRPC services in this process, and the one way every
//! service binds its address.

use chorus_proto::limits::{LEARNER_MAX_MESSAGE_BYTES, ROLLOUT_WORKER_MAX_MESSAGE_BYTES};
use std::sync::Arc;

use candle_core::Device;
use chorus_learner::{
    CheckpointPolicy, LearnerHandle, LearnerService, LearnerServiceConfig, Trainer, spawn_learner,
};
use chorus_model::checkpoint;
use chorus_orchestrator::config::{VllmFaultKind, VllmWorkers};
use chorus_proto::auth::{AttachToken, RequireToken};
use chorus_proto::tonic::service::Routes;
use chorus_proto::tonic::service::interceptor::InterceptedService;
use chorus_proto::tonic::transport::Channel;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::learner_server::LearnerServer;
use chorus_proto::v1::rollout_worker_server::RolloutWorkerServer;
use chorus_rollout_worker::vllm::{VllmFault, VllmLaunch, VllmOptions, VllmServer};
use chorus_rollout_worker::{
    Generator, RolloutService, SyncPolicy, VllmWorker, WorkerHandle, WorkerOptions, fetch_tensors,
    fetch_version, follow_learner, follow_learner_vllm, spawn_engine_loop_with,
};

use crate::driver::LearnerFrom;
use crate::error::{Result, RunError};
use crate::plan::RunPlan;

/// Largest weight chunk the learner streams to workers.
const MAX_WEIGHT_CHUNK_BYTES: usize = 1 << 20;

/// Binds `listen` (port 0 picks a free port) and serves `routes` there in the background;
/// returns the URL clients use: `https://` when the process serves TLS (its certificate
/// installed with `chorus_proto::tls::install`; mutual TLS with a CA), else `http://`.
pub async fn serve_routes(routes: Routes, listen: &str) -> Result<String> {
    let mut server = chorus_proto::tls::server()
        .map_err(|e| RunError::Invalid(format!("serving TLS on {listen}: {e}")))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(RunError::io(format!("binding {listen}")))?;
    let addr = listener
        .local_addr()
        .map_err(RunError::io(format!("the address bound at {listen}")))?;
    tokio::spawn(
        server
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(format!("{}://{addr}", chorus_proto::tls::scheme()))
}

/// The learner of run `run_id`: its checkpoint (or a seeded initialisation) loaded, the trainer
/// on its own thread, serving on `listen`. Returns its handle and URL.
pub async fn start_learner(
    plan: &RunPlan,
    run_id: &str,
    token: &str,
    listen: &str,
) -> Result<(LearnerHandle, String)> {
    start_learner_from(plan, run_id, token, listen, &LearnerFrom::Plan, None).await
}

/// [`start_learner`] starting from `from`, saving rolling checkpoints by `checkpoints`.
pub async fn start_learner_from(
    plan: &RunPlan,
    run_id: &str,
    token: &str,
    listen: &str,
    from: &LearnerFrom,
    checkpoints: Option<CheckpointPolicy>,
) -> Result<(LearnerHandle, String)> {
    let trainer = match from {
        LearnerFrom::Plan => {
            let params = match &plan.config.checkpoint {
                Some(dir) => checkpoint::load_checkpoint(dir, &Device::Cpu)?.1,
                None => checkpoint::init_params(&plan.model, plan.config.init_seed, &Device::Cpu)?,
            };
            Trainer::new(plan.model.clone(), params, plan.learner.clone())?
        }
        LearnerFrom::Checkpoint(dir) => Trainer::resume(dir, &Device::Cpu)?,
        LearnerFrom::Weights { dir, version } => {
            let params = checkpoint::load_checkpoint(dir, &Device::Cpu)?.1;
            let mut t = Trainer::new(plan.model.clone(), params, plan.learner.clone())?;
            t.skip_to_version(*version);
            t
        }
    };
    tracing::info!(
        run_id,
        version = trainer.version(),
        "learner starts at version {}",
        trainer.version()
    );
    let handle = spawn_learner(
        trainer,
        LearnerServiceConfig {
            run_id: run_id.to_string(),
            groups_per_step: plan.groups_per_step(),
            max_chunk_bytes: MAX_WEIGHT_CHUNK_BYTES,
            keep_versions: plan.keep_versions,
            checkpoints,
        },
    );
    let svc = InterceptedService::new(
        LearnerServer::new(LearnerService::new(handle.clone()))
            .max_decoding_message_size(LEARNER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(LEARNER_MAX_MESSAGE_BYTES),
        RequireToken::new(token)?,
    );
    let url = serve_routes(Routes::new(svc), listen).await?;
    tracing::info!(run_id, url, "learner serving at {url}");
    Ok((handle, url))
}

/// What a worker generates with.
#[derive(Clone, Debug, PartialEq)]
pub enum Backend {
    /// Chorus' own engine.
    Chorus,
    /// A vLLM server (`[workers.vllm]`): reached at `url`, or started by the worker; versions
    /// and the server's log go under `work_dir`.
    Vllm {
        /// A running server, if the worker does not start one.
        url: Option<String>,
        /// The worker's directory.
        work_dir: std::path::PathBuf,
    },
}

/// A rollout worker of run `run_id` with id `worker_id`: fetches the learner's current weights
/// from `learner_url`, follows its later versions, and serves `Generate` on `listen` with
/// `backend`. Returns its URL and its generator.
pub async fn start_worker(
    plan: &RunPlan,
    learner_url: &str,
    token: &str,
    run_id: &str,
    worker_id: &str,
    listen: &str,
    backend: &Backend,
) -> Result<(String, Arc<dyn Generator>)> {
    let channel = chorus_proto::tls::endpoint(learner_url)
        .map_err(|e| RunError::Invalid(format!("the learner's address: {e}")))?
        .connect()
        .await
        .map_err(RunError::transport(format!(
            "connecting to the learner at {learner_url}"
        )))?;
    let mut client = LearnerClient::with_interceptor(channel, AttachToken::new(token)?)
        .max_decoding_message_size(LEARNER_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(LEARNER_MAX_MESSAGE_BYTES);
    let generator: Arc<dyn Generator> = match backend {
        Backend::Chorus => Arc::new(start_engine(plan, client, run_id, worker_id).await?),
        Backend::Vllm { url, work_dir } => {
            let settings = plan.config.vllm.as_ref().ok_or_else(|| {
                RunError::Invalid(
                    "a vLLM worker needs [workers] backend = \"vllm\" in the run config".into(),
                )
            })?;
            let (version, tensors) = fetch_tensors(
                &mut client,
                run_id,
                worker_id,
                0,
                false,
                SyncPolicy::default().chunk_deadline,
            )
            .await?;
            let options = vllm_options(plan, settings, url.clone(), work_dir.clone());
            let worker =
                VllmWorker::start(worker_id, plan.model.clone(), version, tensors, options)
                    .await
                    .map_err(|e| {
                        RunError::Unavailable(format!("rollout worker {worker_id}: {e}"))
                    })?;
            tokio::spawn(follow_learner_vllm(
                worker.clone(),
                client,
                run_id.to_string(),
                worker_id.to_string(),
                SyncPolicy::default(),
            ));
            Arc::new(worker)
        }
    };
    let version = generator.version();
    let svc = InterceptedService::new(
        RolloutWorkerServer::new(RolloutService::shared(generator.clone(), worker_id))
            .max_decoding_message_size(ROLLOUT_WORKER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ROLLOUT_WORKER_MAX_MESSAGE_BYTES),
        RequireToken::new(token)?,
    );
    let url = serve_routes(Routes::new(svc), listen).await?;
    tracing::info!(
        run_id,
        worker_id,
        url,
        version,
        "rollout worker {worker_id} serving at {url}"
    );
    Ok((url, generator))
}

/// The settings of one vLLM worker.
fn vllm_options(
    plan: &RunPlan,
    v: &VllmWorkers,
    url: Option<String>,
    work_dir: std::path::PathBuf,
) -> VllmOptions {
    let server = match url {
        Some(url) => VllmServer::Url(url),
        None => VllmServer::Launch(VllmLaunch {
            python: v.python.clone(),
            args: v.args.clone(),
            env: v.env.iter().map(|(k, x)| (k.clone(), x.clone())).collect(),
            start_timeout: v.start_timeout,
            max_model_len: v.max_model_len,
            max_num_seqs: plan.config.worker_max_batch,
        }),
    };
    VllmOptions {
        server,
        work_dir,
        update_timeout: v.update_timeout,
        request_timeout: v.request_timeout,
        faults: v
            .inject_faults
            .iter()
            .map(|(version, f)| {
                let fault = match f {
                    VllmFaultKind::CorruptWeights => VllmFault::CorruptWeights,
                    VllmFaultKind::StallReload => VllmFault::StallReload,
                    VllmFaultKind::KillServer => VllmFault::KillServer,
                };
                (*version, fault)
            })
            .collect(),
    }
}

/// Chorus' engine thread on the learner's current version, following its later ones.
async fn start_engine(
    plan: &RunPlan,
    mut client: LearnerClient<InterceptedService<Channel, AttachToken>>,
    run_id: &str,
    worker_id: &str,
) -> Result<WorkerHandle> {
    let (version, engine) =
        fetch_version(&mut client, &plan.model, &plan.engine, run_id, worker_id, 0).await?;
    let handle = spawn_engine_loop_with(
        Arc::new(engine),
        version,
        WorkerOptions {
            max_batch: plan.config.worker_max_batch,
            keep_versions: plan.keep_versions,
            decode_step_delay: plan.test_decode_delay.get(worker_id).copied(),
        },
    );
    tokio::spawn(follow_learner(
        handle.clone(),
        client,
        plan.model.clone(),
        plan.engine.clone(),
        run_id.to_string(),
        worker_id.to_string(),
        SyncPolicy::default(),
    ));
    Ok(handle)
}

/// How many times `chorus run` starts its PyTorch learner again after it died mid-run.
pub const MAX_TORCH_LEARNER_RESTARTS: u32 = 5;

/// A PyTorch learner (the `chorus_learner` Python package) serving as a child process, under a
/// supervisor: when it dies while the run goes on, it is started again at the same address
/// from its newest learner checkpoint (`--resume`; from the run's start when it saved none yet),
/// up to [`MAX_TORCH_LEARNER_RESTARTS`] times, and the orchestrator sends it the groups of the
/// later steps again. A learner sharded over several processes is not restarted (its
/// checkpoints hold no optimizer state yet). Dropped, it stops the supervisor and kills the
/// process group; it also dies with this process (`PR_SET_PDEATHSIG`).
pub struct TorchLearnerProcess {
    /// The process serving now (0 while none does).
    pid: Arc<std::sync::atomic::AtomicU32>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Drop for TorchLearnerProcess {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.stopping.store(true, Ordering::SeqCst);
        self.supervisor.abort();
        let pid = self.pid.load(Ordering::SeqCst);
        if pid != 0 {
            kill_tree(pid);
        }
    }
}

/// SIGKILL to process `pid`, its process group and every process under it.
fn kill_tree(pid: u32) {
    // torchrun's ranks may leave the group: their ids are found first, by parent.
    let mut doomed = descendants(pid);
    doomed.push(pid);
    // SAFETY: kill(2) on the child's process group and on the processes found under it; no
    // memory is involved.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
        for p in doomed {
            libc::kill(p as i32, libc::SIGKILL);
        }
    }
}

/// Every process under `root`, from `/proc`.
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p && !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

/// Starts the PyTorch learner of `[learner] backend = "torch"` for run `run_id` from `from`
/// (the plan's model, or the weights of a policy checkpoint), its files under `work_dir`
/// (the initial checkpoint it loads, its learner checkpoints); returns it, supervised (see
/// [`TorchLearnerProcess`]), and its URL once it serves.
pub async fn start_torch_learner(
    plan: &RunPlan,
    run_id: &str,
    token: &str,
    work_dir: &std::path::Path,
    from: &LearnerFrom,
) -> Result<(TorchLearnerProcess, String)> {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    if plan.config.torch_learner.is_none() {
        return Err(RunError::Invalid(
            "the PyTorch learner needs [learner] backend = \"torch\"".into(),
        ));
    }
    let model_dir = match (from, &plan.config.checkpoint) {
        (LearnerFrom::Plan, Some(dir)) => dir.clone(),
        (LearnerFrom::Plan, None) => {
            let dir = work_dir.join("init");
            let params = checkpoint::init_params(&plan.model, plan.config.init_seed, &Device::Cpu)?;
            checkpoint::save_checkpoint(&dir, &plan.model, &params, None)?;
            dir
        }
        (LearnerFrom::Weights { .. } | LearnerFrom::Checkpoint(_), _) => {
            return Err(RunError::Invalid(
                "resuming a run trained by the PyTorch learner is not supported yet; start the \
                 run again, or use learner.backend = \"chorus\""
                    .into(),
            ));
        }
    };
    let launch = TorchLaunch {
        plan: plan.clone(),
        run_id: run_id.to_string(),
        token: token.to_string(),
        model_dir,
        checkpoints: work_dir.join("checkpoints"),
    };
    let (child, url) = launch.start(None, "127.0.0.1:0").await?;
    tracing::info!(run_id, url, "PyTorch learner serving at {url}");
    let pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
    let stopping = Arc::new(AtomicBool::new(false));
    let listen = url
        .rsplit_once("://")
        .map_or(url.as_str(), |(_, address)| address)
        .to_string();
    let supervisor = {
        let (pid, stopping) = (pid.clone(), stopping.clone());
        tokio::spawn(async move {
            let mut child = child;
            let mut restarts = 0;
            loop {
                let status = child.wait().await;
                pid.store(0, Ordering::SeqCst);
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                if launch
                    .plan
                    .config
                    .torch_learner
                    .as_ref()
                    .map_or(1, |t| t.processes)
                    > 1
                    || restarts >= MAX_TORCH_LEARNER_RESTARTS
                {
                    tracing::error!(run_id = launch.run_id, %status, restarts, "the PyTorch learner exited ({status}); it is not started again (a sharded learner cannot resume exactly, or it died {restarts} times already)");
                    return;
                }
                restarts += 1;
                let newest = newest_torch_checkpoint(&launch.checkpoints);
                tracing::warn!(run_id = launch.run_id, %status, restart = restarts, from = ?newest, "the PyTorch learner exited ({status}); starting it again at {listen} from {} (restart {restarts} of at most {MAX_TORCH_LEARNER_RESTARTS})", newest.as_ref().map_or("the run's start".to_string(), |p| p.display().to_string()));
                match launch.start(newest.as_deref(), &listen).await {
                    Ok((next, _)) => {
                        pid.store(next.id().unwrap_or(0), Ordering::SeqCst);
                        if stopping.load(Ordering::SeqCst) {
                            kill_tree(next.id().unwrap_or(0));
                            return;
                        }
                        child = next;
                    }
                    Err(e) => {
                        tracing::error!(run_id = launch.run_id, error = %e, "starting the PyTorch learner again failed: {e}");
                        return;
                    }
                }
            }
        })
    };
    Ok((
        TorchLearnerProcess {
            pid,
            stopping,
            supervisor,
        },
        url,
    ))
}

/// The newest complete learner checkpoint the PyTorch learner saved under `dir`
/// (`step-NNNNNNNN`, complete once its `trainer_state.json` is there).
fn newest_torch_checkpoint(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join("trainer_state.json").is_file()
        })
        .max()
}

/// How `chorus run` starts its PyTorch learner, the first time and again.
struct TorchLaunch {
    plan: RunPlan,
    run_id: String,
    token: String,
    model_dir: std::path::PathBuf,
    checkpoints: std::path::PathBuf,
}

impl TorchLaunch {
    /// Starts the learner on `listen`, from `resume` (a learner checkpoint) or the model;
    /// returns the process once it serves, and its URL.
    async fn start(
        &self,
        resume: Option<&std::path::Path>,
        listen: &str,
    ) -> Result<(tokio::process::Child, String)> {
        use tokio::io::AsyncBufReadExt;
        let plan = &self.plan;
        let settings = plan
            .config
            .torch_learner
            .as_ref()
            .expect("checked by start_torch_learner");
        let stage = &plan.config.stages[0];
        let algorithm = plan
            .config
            .stages
            .iter()
            .find_map(|s| s.objective.as_ref())
            .map(|o| o.algorithm.to_string())
            .unwrap_or_else(|| "grpo".into());
        let mut cmd = tokio::process::Command::new(&settings.python);
        if settings.processes > 1 {
            // FSDP2 over that many processes; rank 0 serves and prints the address.
            cmd.args(["-m", "torch.distributed.run", "--standalone"])
                .arg(format!("--nproc-per-node={}", settings.processes));
        }
        cmd.args(["-m", "chorus_learner"]);
        match resume {
            Some(dir) => cmd.arg("--resume").arg(dir),
            None => cmd.arg("--model").arg(&self.model_dir),
        };
        cmd.args(["--run-id", &self.run_id, "--listen", listen])
            .args(["--lr", &stage.lr.to_string()])
            .args(["--max-grad-norm", &plan.config.max_grad_norm.to_string()])
            .args(["--algorithm", &algorithm])
            .args(["--groups-per-step", &plan.groups_per_step().to_string()])
            .args(["--keep-versions", &plan.keep_versions.to_string()])
            .args(["--max-chunk-bytes", &MAX_WEIGHT_CHUNK_BYTES.to_string()])
            .arg("--checkpoints")
            .arg(&self.checkpoints)
            .args([
                "--checkpoint-every",
                &plan.config.checkpoint_every.to_string(),
            ]);
        if let Some(tokens) = plan.config.learner_micro_batch_tokens {
            cmd.args(["--micro-batch-tokens", &tokens.to_string()]);
        }
        cmd.args(&settings.args)
            // Not on the command line, where `ps` would show it.
            .env("CHORUS_TOKEN", &self.token)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            // Its own process group, killed whole when the run ends (torchrun's ranks included).
            .process_group(0)
            .kill_on_drop(true);
        dies_with_parent(&mut cmd);
        tracing::info!(run_id = self.run_id, python = %settings.python, processes = settings.processes, "starting the PyTorch learner");
        let mut child = cmd.spawn().map_err(RunError::io(format!(
            "starting the PyTorch learner with `{} -m chorus_learner`",
            settings.python
        )))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let waited = tokio::time::timeout(settings.start_timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Some(url.trim().to_string());
                }
            }
            None
        })
        .await;
        let url = match waited {
            Ok(Some(url)) => url,
            Ok(None) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                return Err(RunError::Unavailable(format!(
                    "the PyTorch learner exited ({status}) before serving; its log is above (is \
                     chorus-learner installed in {}? pip install ./learner/python)",
                    settings.python
                )));
            }
            Err(_) => {
                return Err(RunError::Unavailable(format!(
                    "the PyTorch learner did not serve within {:?} (learner.torch.start_timeout_seconds)",
                    settings.start_timeout
                )));
            }
        };
        // Keep reading, so that a full pipe never stops it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((child, url))
    }
}

/// Makes the child `cmd` starts die with this process (`PR_SET_PDEATHSIG`), so a Chorus killed
/// outright leaves no service behind.
pub(crate) fn dies_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe, and nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
