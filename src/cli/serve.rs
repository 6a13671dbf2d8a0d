//! `chorus serve learner|worker|orchestrator|environment`: each service of a run as its own
//! process, for runs across several machines. The learner, workers and environments serve until
//! stopped; the orchestrator runs the stages of its config against them and exits, or, without a
//! config, serves launched runs one after another on standby services (see `standby.rs`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use chorus_runtime::serve::{DaemonOptions, OrchestratorOptions, ServiceOptions};
use chorus_runtime::{Backend, Role, RunPlan, Standby, stand_by};
use clap::{Args, Subcommand};

/// The services `chorus serve` runs; how they connect is in the `Serve` command's help.
#[derive(Subcommand, Debug)]
pub enum ServeCommand {
    /// The learner: trains on scored groups and streams new weights. Without --config it
    /// stands by at --orchestrator and serves the runs handed to it.
    Learner(LearnerArgs),
    /// A rollout worker: generates with the learner's latest weights. Without --config it
    /// stands by at --orchestrator and serves the runs handed to it.
    Worker(WorkerArgs),
    /// The orchestrator: with --config, schedules that run's stages against a learner and
    /// workers, records the ledger and writes summary.json, then exits. Without --config, it
    /// serves runs launched with `chorus launch`, one after another, on standby services, until
    /// stopped.
    Orchestrator(OrchestratorArgs),
    /// A built-in environment over the gRPC Environment service, as a plugin server: a run
    /// uses it with `{ url = "http://ADDR" }` in its config and the same --token
    /// (`https://ADDR` when served with --tls-cert and --tls-key).
    ///
    /// Example: chorus serve environment countdown --listen 127.0.0.1:7100 --token T
    Environment(EnvironmentArgs),
}

#[derive(Args, Debug)]
pub struct EnvironmentArgs {
    /// Built-in environment to serve (see `chorus env list`).
    name: String,
    /// Address to serve on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Shared token every call must carry.
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Args, Debug)]
pub struct ServiceArgs {
    /// The run configuration (TOML; `-` reads it from standard input, relative paths then
    /// being relative to the working directory). Without it, the service stands by at
    /// --orchestrator for launched runs.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Run id shared by all services of the run (default: the config's name).
    #[arg(long)]
    run_id: Option<String>,
    /// Shared token of the services.
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: String,
    /// Register with the orchestrator at this address and send it heartbeats.
    #[arg(long)]
    orchestrator: Option<String>,
    /// The address others use to reach this service, when it differs from --listen: a host name
    /// or IP (the port is the one served on), HOST:PORT, or a URL. Default: the --listen
    /// address, with 0.0.0.0 replaced by this machine's host name.
    #[arg(long)]
    advertise: Option<String>,
}

#[derive(Args, Debug)]
pub struct LearnerArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// This learner's id at the orchestrator.
    #[arg(long, default_value = "learner")]
    id: String,
    /// Save rolling checkpoints (weights, optimizer state, counters) in DIR, every `[learner]
    /// checkpoint_every` versions and at stage boundaries, and start from the newest one found
    /// there: a learner killed mid-run and started again with the same DIR resumes where it
    /// saved, and the orchestrator sends it the groups of the later steps again. One DIR per
    /// run. A standby learner (no --config) keeps each run's checkpoints in DIR/RUN_ID and
    /// starts a run's learner again from them when it dies [standby default: a directory under
    /// the system's temp dir]; give a persistent DIR for runs that must survive a reboot.
    #[arg(long, value_name = "DIR")]
    checkpoints: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// The learner's address, e.g. http://10.0.0.2:7000 (standby workers are told it).
    #[arg(long)]
    learner: Option<String>,
    /// This worker's id in the ledger and at the orchestrator; unique per worker.
    #[arg(long, default_value = "w0")]
    id: String,
    /// What generates: `chorus` (Chorus' engine) or `vllm` (a vLLM server per
    /// `[workers.vllm]`); default: the config's `workers.backend`.
    #[arg(long, value_parser = ["chorus", "vllm"])]
    backend: Option<String>,
    /// With the vLLM backend: a running vLLM server to drive instead of starting one.
    #[arg(long)]
    vllm_url: Option<String>,
    /// With the vLLM backend: where published versions (and a started server's log) go
    /// [default: workers.vllm.weights_dir/ID, else a directory under the system's temp dir].
    #[arg(long)]
    vllm_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct OrchestratorArgs {
    /// The run configuration (TOML). Without it, the orchestrator serves launched runs (needs
    /// --listen).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The learner's address; without it, the orchestrator waits for the learner to register
    /// (needs --listen).
    #[arg(long)]
    learner: Option<String>,
    /// A rollout worker's address; repeat for each worker. Without any, the orchestrator waits
    /// for `workers.count` workers to register (needs --listen).
    #[arg(long = "worker")]
    workers: Vec<String>,
    /// Serve the Orchestrator service here (registration, heartbeats, runs, run events), e.g.
    /// 127.0.0.1:7010; port 0 picks a free port.
    #[arg(long)]
    listen: Option<String>,
    /// How long a run waits for its learner and workers to register before it fails, in
    /// seconds.
    #[arg(long, default_value_t = 600)]
    wait_seconds: u64,
    /// How long a run waits for its learner to come back when it dies (a learner served with
    /// --checkpoints and started again at the same address resumes the run; a standby learner
    /// starts a launched run's learner again by itself), in seconds; 0 fails the run at once.
    #[arg(long, default_value_t = 600)]
    learner_restart_seconds: u64,
    /// Run id shared by all services of the run (default: the config's name).
    #[arg(long)]
    run_id: Option<String>,
    /// Shared token of the services.
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: String,
    /// The token the run's environment plugins check: the one each plugin was started with
    /// (`chorus serve environment --token T`). The services' own token is never sent to plugins.
    #[arg(long, env = "CHORUS_PLUGIN_TOKEN", hide_env_values = true)]
    plugin_token: Option<String>,
    /// Ledger database (default: sqlite://runs/<name>/ledger.sqlite for a config's run,
    /// sqlite://runs/ledger.sqlite for launched runs).
    #[arg(long)]
    db: Option<String>,
    /// Directory for run outputs (launched runs: <runs-dir>/<run id>/summary.json).
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Held-out tasks per environment for the before/after evaluation. Every accuracy is
    /// printed with its 95% interval: about ±6 points at 256 tasks, ±12 at 64.
    #[arg(long, default_value_t = 256)]
    eval_tasks: usize,
    /// Also evaluate every N RL steps while training, recording a learning curve (the ledger's
    /// `evaluations`, and summary.json); 0 turns it off.
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Launched runs only: the name this orchestrator records its launches under in the ledger.
    /// Restarted with the same name and ledger, it queues again the runs still pending and
    /// marks failed those it was running. Orchestrators sharing a ledger need different names.
    #[arg(long, default_value = "default")]
    name: String,
}

impl ServiceArgs {
    /// The standby service these arguments ask for: no config, an orchestrator to wait at.
    fn standby(&self, role: Role, id: &str) -> Option<Standby> {
        match (&self.config, &self.orchestrator) {
            (None, Some(orchestrator)) => Some(Standby {
                role,
                id: id.to_string(),
                orchestrator: orchestrator.clone(),
                token: self.token.clone(),
                listen: self.listen.clone(),
                advertise: self.advertise.clone(),
                metrics: None,
                checkpoints: PathBuf::new(),
            }),
            _ => None,
        }
    }

    /// The plan of this service's run, or why it needs a config.
    fn plan(&self, role: &str) -> anyhow::Result<RunPlan> {
        let Some(path) = &self.config else {
            bail!(
                "give the run's --config, or --orchestrator URL so that this {role} stands by for \
                 launched runs"
            );
        };
        let (cfg, config_toml) = super::load_config(path)?;
        Ok(RunPlan::new(cfg, config_toml, 0, 0)?)
    }

    fn options(self, id: String, plan: &RunPlan) -> ServiceOptions {
        ServiceOptions {
            id,
            run_id: self.run_id.unwrap_or_else(|| plan.config.name.clone()),
            listen: self.listen,
            advertise: self.advertise,
            token: self.token.into(),
            orchestrator: self.orchestrator,
        }
    }
}

/// The backend of `serve worker`: the flag, else the config's.
fn worker_backend(
    plan: &RunPlan,
    id: &str,
    flag: Option<String>,
    vllm_url: Option<String>,
    vllm_dir: Option<PathBuf>,
) -> anyhow::Result<Backend> {
    let vllm = match flag.as_deref() {
        Some("vllm") => true,
        Some(_) => false,
        None => plan.config.vllm.is_some(),
    };
    if !vllm {
        if vllm_url.is_some() || vllm_dir.is_some() {
            bail!("--vllm-url and --vllm-dir apply to vLLM workers: add --backend vllm");
        }
        return Ok(Backend::Chorus);
    }
    let Some(settings) = &plan.config.vllm else {
        bail!(
            "--backend vllm needs [workers] backend = \"vllm\" and its [workers.vllm] settings \
             in the run config"
        );
    };
    let work_dir = vllm_dir.unwrap_or_else(|| {
        settings
            .weights_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("chorus-vllm"))
            .join(&plan.config.name)
            .join(id)
    });
    Ok(Backend::Vllm {
        url: vllm_url,
        work_dir,
    })
}

/// Whether `cmd` is a standby learner or worker (no config, an orchestrator to wait at).
pub fn stands_by(cmd: &ServeCommand) -> bool {
    match cmd {
        ServeCommand::Learner(LearnerArgs { service, .. })
        | ServeCommand::Worker(WorkerArgs { service, .. }) => {
            service.config.is_none() && service.orchestrator.is_some()
        }
        _ => false,
    }
}

/// Runs `chorus serve …`; a standby service passes `metrics` on to the service it starts.
pub fn run(cmd: ServeCommand, metrics: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    super::runtime(2)?.block_on(async move {
        match cmd {
            ServeCommand::Learner(LearnerArgs {
                service: a,
                id,
                checkpoints,
            }) => {
                if let Some(mut standby) = a.standby(Role::Learner, &id) {
                    standby.metrics = metrics;
                    standby.checkpoints = checkpoints.unwrap_or_else(|| {
                        std::env::temp_dir()
                            .join("chorus-learner-checkpoints")
                            .join(&id)
                    });
                    let ready = super::print_standing_by(&standby);
                    return Ok(stand_by(standby, ready).await?);
                }
                let plan = a.plan("learner")?;
                let options = a.options(id, &plan);
                Ok(chorus_runtime::serve::learner(
                    &plan,
                    options,
                    checkpoints,
                    super::print_listening,
                )
                .await?)
            }
            ServeCommand::Worker(WorkerArgs {
                service: a,
                learner,
                id,
                backend,
                vllm_url,
                vllm_dir,
            }) => {
                if let Some(mut standby) = a.standby(Role::Worker, &id) {
                    standby.metrics = metrics;
                    let ready = super::print_standing_by(&standby);
                    return Ok(stand_by(standby, ready).await?);
                }
                let plan = a.plan("worker")?;
                let learner = learner.context(
                    "give the learner's address (--learner URL); only standby workers (no \
                     --config) are told it",
                )?;
                let backend = worker_backend(&plan, &id, backend, vllm_url, vllm_dir)?;
                let options = a.options(id, &plan);
                Ok(chorus_runtime::serve::worker(
                    &plan,
                    &learner,
                    &backend,
                    options,
                    super::print_listening,
                )
                .await?)
            }
            ServeCommand::Environment(a) => {
                let env = chorus_environments::builtin_registry().get(&a.name)?;
                let served =
                    chorus_environments::plugin::serve_environment(env, &a.listen, &a.token)
                        .await?;
                super::print_listening(&served.url());
                tokio::signal::ctrl_c()
                    .await
                    .context("waiting for Ctrl-C")?;
                Ok(())
            }
            ServeCommand::Orchestrator(a) => orchestrator(a).await,
        }
    })
}

/// `serve orchestrator`: the run of --config, or launched runs without one.
async fn orchestrator(a: OrchestratorArgs) -> anyhow::Result<()> {
    let wait = Duration::from_secs(a.wait_seconds);
    let Some(path) = &a.config else {
        let Some(listen) = a.listen else {
            bail!(
                "give --config RUN.toml to run one run, or --listen ADDR to serve runs launched \
                 with `chorus launch`"
            );
        };
        if a.learner.is_some() || !a.workers.is_empty() || a.run_id.is_some() {
            bail!(
                "--learner, --worker and --run-id need --config; launched runs are served by \
                 standby services (`chorus serve learner|worker --orchestrator URL`)"
            );
        }
        let daemon = DaemonOptions {
            listen,
            token: a.token.into(),
            plugin_token: a.plugin_token.clone().map(Into::into),
            db: a.db,
            runs_dir: a.runs_dir,
            wait,
            eval_tasks: a.eval_tasks,
            eval_every: a.eval_every,
            name: a.name,
            learner_restart: Duration::from_secs(a.learner_restart_seconds),
        };
        return Ok(chorus_runtime::serve::launched_runs(daemon, super::print_listening).await?);
    };
    let (cfg, config_toml) = super::load_config(path)?;
    let plan = RunPlan::new(cfg, config_toml, a.eval_tasks, a.eval_every)?;
    let options = OrchestratorOptions {
        run_id: a.run_id.unwrap_or_else(|| plan.config.name.clone()),
        listen: a.listen,
        learner: a.learner,
        workers: a.workers,
        wait,
        token: a.token.into(),
        plugin_token: a.plugin_token.map(Into::into),
        db: a.db,
        runs_dir: a.runs_dir,
        learner_restart: Duration::from_secs(a.learner_restart_seconds),
    };
    let summary =
        chorus_runtime::serve::orchestrator(&plan, options, super::print_listening).await?;
    outln!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
