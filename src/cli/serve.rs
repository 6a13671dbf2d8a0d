//! `chorus serve learner|worker|orchestrator|environment`: each service of a run as its own
//! process, for runs across several machines. The learner, workers and environments serve until
//! stopped; the orchestrator runs the stages of its config against them and exits, or, without a
//! config, serves launched runs one after another on standby services (see `standby.rs`).

use std::path::PathBuf;
use std::time::Instant;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chorus_orchestrator::config::RunConfig;
use chorus_orchestrator::ledger::{Ledger, RunStatus};
use chorus_orchestrator::{Directory, Fleet, Launched, Leases, OrchestratorService};
use chorus_proto::auth::RequireToken;
use chorus_proto::tonic::service::Routes;
use chorus_proto::v1::orchestrator_server::OrchestratorServer;
use chorus_proto::v1::{RunStatus as ProtoRunStatus, RunStatusChanged, run_event};

use super::registration::{Reporter, register};
use super::standby::{Role, Standby, stand_by};
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
    /// uses it with `{ url = "http://ADDR" }` in its config and the same --token.
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
    #[arg(long, env = "CHORUS_TOKEN")]
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
    #[arg(long, env = "CHORUS_TOKEN")]
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
    /// Run id shared by all services of the run (default: the config's name).
    #[arg(long)]
    run_id: Option<String>,
    /// Shared token of the services.
    #[arg(long, env = "CHORUS_TOKEN")]
    token: String,
    /// Ledger database (default: sqlite://runs/<name>/ledger.sqlite for a config's run,
    /// sqlite://runs/ledger.sqlite for launched runs).
    #[arg(long)]
    db: Option<String>,
    /// Directory for run outputs (launched runs: <runs-dir>/<run id>/summary.json).
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Held-out tasks per environment for the before/after evaluation.
    #[arg(long, default_value_t = 64)]
    eval_tasks: usize,
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
            }),
            _ => None,
        }
    }
}

/// The config of a service, or why it needs one.
fn config_of(a: &ServiceArgs, role: &str) -> anyhow::Result<(RunConfig, String)> {
    match &a.config {
        Some(path) => super::load_config(path),
        None => bail!(
            "give the run's --config, or --orchestrator URL so that this {role} stands by for \
             launched runs"
        ),
    }
}

pub fn run(cmd: ServeCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            ServeCommand::Learner(LearnerArgs { service: a, id }) => {
                if let Some(standby) = a.standby(Role::Learner, &id) {
                    return stand_by(standby).await;
                }
                let (cfg, _) = config_of(&a, "learner")?;
                let run_id = a.run_id.unwrap_or_else(|| cfg.name.clone());
                let (handle, bound) =
                    super::run::start_learner(&cfg, &run_id, &a.token, &a.listen).await?;
                let url = super::advertised_url(&bound, a.advertise.as_deref())?;
                if let Some(orchestrator) = &a.orchestrator {
                    let reporter = Reporter::Learner {
                        id,
                        endpoint: url.clone(),
                        run_id: run_id.clone(),
                        version: Arc::new(move || handle.version()),
                    };
                    register(orchestrator, &a.token, reporter).await?;
                }
                println!("listening on {url}");
                wait_for_shutdown().await
            }
            ServeCommand::Worker(w) => {
                let a = w.service;
                if let Some(standby) = a.standby(Role::Worker, &w.id) {
                    return stand_by(standby).await;
                }
                let (cfg, _) = config_of(&a, "worker")?;
                let learner = w.learner.context(
                    "give the learner's address (--learner URL); only standby workers (no \
                     --config) are told it",
                )?;
                let run_id = a.run_id.unwrap_or_else(|| cfg.name.clone());
                let model = super::run::model_config(&cfg)?;
                let (bound, handle) = super::run::serve_worker(
                    &model,
                    &learner,
                    &a.token,
                    &run_id,
                    &w.id,
                    cfg.worker_max_batch,
                    super::run::worker_engine_options(&cfg),
                    &a.listen,
                )
                .await?;
                let url = super::advertised_url(&bound, a.advertise.as_deref())?;
                if let Some(orchestrator) = &a.orchestrator {
                    let reporter = Reporter::Worker {
                        id: w.id.clone(),
                        endpoint: url.clone(),
                        run_id,
                        capacity: cfg.worker_max_batch as u32,
                        version: Arc::new(move || handle.version()),
                    };
                    register(orchestrator, &a.token, reporter).await?;
                }
                println!("listening on {url}");
                wait_for_shutdown().await
            }
            ServeCommand::Environment(a) => {
                let env = chorus_environments::builtin_registry().get(&a.name)?;
                let served =
                    chorus_environments::plugin::serve_environment(env, &a.listen, &a.token)
                        .await?;
                println!("listening on {}", served.url());
                wait_for_shutdown().await
            }
            ServeCommand::Orchestrator(a) => match a.config.clone() {
                Some(path) => orchestrate_one(a, &path).await,
                None => serve_launched_runs(a).await,
            },
        }
    })
}

/// `serve orchestrator --config`: the run of that config, then exit.
async fn orchestrate_one(a: OrchestratorArgs, path: &std::path::Path) -> anyhow::Result<()> {
    let (cfg, config_toml) = super::load_config(path)?;
    let run_id = a.run_id.unwrap_or_else(|| cfg.name.clone());
    let out_dir = a.runs_dir.join(&cfg.name);
    let started = Instant::now();
    let directory = match &a.listen {
        Some(listen) => {
            let db = a
                .db
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", out_dir.join("ledger.sqlite").display()));
            let (url, fleet, _) = serve_orchestrator(listen, &a.token, &db, &out_dir, None).await?;
            let directory = Directory::new(&run_id, fleet.leases());
            directory.spawn_lease_checker();
            fleet.serve_run(directory.clone(), config_toml.clone());
            println!("listening on {url}");
            std::io::Write::flush(&mut std::io::stdout())?;
            Some(directory)
        }
        None => None,
    };
    let wait = Duration::from_secs(a.wait_seconds);
    let learner = match (a.learner, &directory) {
        (Some(url), _) => url,
        (None, Some(d)) => {
            eprintln!("waiting for the learner to register ...");
            d.wait_for_learner(wait)
                .await
                .map_err(anyhow::Error::msg)?
                .endpoint
        }
        (None, None) => bail!(
            "give the learner's address (--learner URL) or --listen ADDR so that it can register"
        ),
    };
    let workers = match (a.workers.is_empty(), &directory) {
        (false, _) => a.workers,
        (true, Some(d)) => {
            eprintln!(
                "waiting for {} rollout workers to register ...",
                cfg.workers
            );
            d.wait_for_workers(cfg.workers, wait)
                .await
                .map_err(anyhow::Error::msg)?;
            // The pool takes them, and later ones, from the directory.
            vec![]
        }
        (true, None) => bail!(
            "give the workers' addresses (--worker URL, repeated) or --listen ADDR so that they \
             can register"
        ),
    };
    let result = super::run::orchestrate(
        &cfg,
        &config_toml,
        &run_id,
        &learner,
        &workers,
        &a.token,
        a.db,
        &out_dir,
        super::run::EvalPlan {
            tasks: a.eval_tasks,
            every: 0,
        },
        started,
        directory.clone(),
    )
    .await;
    if let (Err(e), Some(d)) = (&result, &directory) {
        d.emit(failed(e));
    }
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}

fn failed(e: &anyhow::Error) -> run_event::Kind {
    run_event::Kind::StatusChanged(RunStatusChanged {
        status: ProtoRunStatus::Failed as i32,
        reason: format!("{e:#}"),
    })
}

/// `serve orchestrator` without a config: launched runs, one after another, until Ctrl-C.
async fn serve_launched_runs(a: OrchestratorArgs) -> anyhow::Result<()> {
    let Some(listen) = &a.listen else {
        bail!(
            "give --config RUN.toml to run one run, or --listen ADDR to serve runs launched with \
             `chorus launch`"
        );
    };
    if a.learner.is_some() || !a.workers.is_empty() || a.run_id.is_some() {
        bail!(
            "--learner, --worker and --run-id need --config; launched runs are served by \
             standby services (`chorus serve learner|worker --orchestrator URL`)"
        );
    }
    let db =
        a.db.clone()
            .unwrap_or_else(|| format!("sqlite://{}", a.runs_dir.join("ledger.sqlite").display()));
    let (url, fleet, ledger) =
        serve_orchestrator(listen, &a.token, &db, &a.runs_dir, Some(a.name.clone())).await?;
    // What an earlier process with this name left: runs cut off mid-way cannot resume (yet);
    // runs that never started are queued again, in launch order.
    for (_, run) in ledger.launched_runs(&a.name, RunStatus::Running).await? {
        eprintln!(
            "run {} was running when this orchestrator last stopped; it cannot resume, so it is \
             marked failed",
            run.id
        );
        ledger.set_run_status(&run.id, RunStatus::Failed).await?;
    }
    for (request_id, run) in ledger.launched_runs(&a.name, RunStatus::Pending).await? {
        eprintln!("run {} was launched before a restart: queued again", run.id);
        fleet.requeue(&request_id, &run.id, &run.name, &run.config_toml);
    }
    ledger.flush().await?;
    println!("listening on {url}");
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!("serving launched runs as `{}`; ledger {db}", a.name);
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let launched = tokio::select! {
            l = fleet.next_launched() => l,
            _ = &mut ctrl_c => {
                eprintln!("stopping");
                return Ok(());
            }
        };
        let run_id = launched.run_id.clone();
        let (learners, workers) = fleet.standby();
        eprintln!(
            "run {run_id}: starting; standing by: {learners} learner(s), {workers} worker(s)"
        );
        let result = run_launched(&a, &fleet, &launched, &db).await;
        if let Err(e) = &result {
            eprintln!("run {run_id} failed: {e:#}");
            ledger.set_run_status(&run_id, RunStatus::Failed).await?;
            ledger.flush().await?;
            launched.directory.emit(failed(e));
        }
        fleet.finish_run();
    }
}

async fn run_launched(
    a: &OrchestratorArgs,
    fleet: &Fleet,
    launched: &Launched,
    db: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let run_id = &launched.run_id;
    let cfg = RunConfig::from_toml_relative_to(
        &launched.config_toml,
        &format!("the config of run {run_id}"),
        std::path::Path::new("."),
    )?;
    let directory = launched.directory.clone();
    directory.spawn_lease_checker();
    fleet.serve_run(directory.clone(), launched.config_toml.clone());
    let wait = Duration::from_secs(a.wait_seconds);
    let learner = directory
        .wait_for_learner(wait)
        .await
        .map_err(anyhow::Error::msg)?
        .endpoint;
    directory
        .wait_for_workers(cfg.workers, wait)
        .await
        .map_err(anyhow::Error::msg)?;
    super::run::orchestrate(
        &cfg,
        &launched.config_toml,
        run_id,
        &learner,
        &[],
        &a.token,
        Some(db.to_string()),
        &a.runs_dir.join(run_id),
        super::run::EvalPlan {
            tasks: a.eval_tasks,
            every: 0,
        },
        started,
        Some(directory),
    )
    .await
    .map(|_| ())
}

/// Serves the Orchestrator service on `listen` (registrations, heartbeats, runs from the ledger
/// at `db`, run events; launches, recorded under `launcher`, when it is given); returns its URL,
/// the fleet behind it and its ledger.
async fn serve_orchestrator(
    listen: &str,
    token: &str,
    db: &str,
    out_dir: &std::path::Path,
    launcher: Option<String>,
) -> anyhow::Result<(String, Arc<Fleet>, Ledger)> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let ledger = Ledger::open(db)
        .await
        .with_context(|| format!("opening the ledger {db}"))?;
    let fleet = Fleet::new(Leases::default(), launcher);
    let svc = OrchestratorServer::with_interceptor(
        OrchestratorService::new(fleet.clone(), ledger.clone()),
        RequireToken::new(token)?,
    );
    let url = super::run::serve_routes(Routes::new(svc), listen).await?;
    Ok((url, fleet, ledger))
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use std::io::Write;
    std::io::stdout().flush()?;
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("stopping");
    Ok(())
}
