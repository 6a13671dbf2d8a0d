//! `chorus serve learner|worker|orchestrator|environment`: each service of a run as its own
//! process, for runs across several machines. The learner, workers and environments serve until
//! stopped; the orchestrator runs the stages against them and exits.

use std::path::PathBuf;
use std::time::Instant;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chorus_orchestrator::config::RunConfig;
use chorus_orchestrator::ledger::Ledger;
use chorus_orchestrator::service::{Directory, Leases, OrchestratorService};
use chorus_proto::auth::RequireToken;
use chorus_proto::tonic::service::Routes;
use chorus_proto::v1::orchestrator_server::OrchestratorServer;
use chorus_proto::v1::{RunStatus as ProtoRunStatus, RunStatusChanged, run_event};

use super::registration::{Reporter, register};
use clap::{Args, Subcommand};

/// Run one service of a post-training run.
///
/// Every service prints `listening on URL` once it serves and checks the shared token (--token
/// or CHORUS_TOKEN) on every call. Two ways to connect them:
///
/// Registration: start the orchestrator first with --listen; the learner and the workers
/// register with it (--orchestrator URL) and send heartbeats; it waits for the learner and
/// `workers.count` workers, then runs:
///   chorus serve orchestrator --config run.toml --listen 127.0.0.1:7010 --run-id r1 --token T
///   chorus serve learner --config run.toml --listen 127.0.0.1:7000 --orchestrator http://127.0.0.1:7010 --run-id r1 --token T
///   chorus serve worker --config run.toml --learner http://127.0.0.1:7000 --orchestrator http://127.0.0.1:7010 --run-id r1 --token T
///
/// Fixed addresses: start the learner, then the workers (pointing at the learner), then the
/// orchestrator pointing at both:
///   chorus serve learner --config run.toml --listen 127.0.0.1:7000 --run-id r1 --token T
///   chorus serve worker --config run.toml --learner http://127.0.0.1:7000 --listen 127.0.0.1:7001 --run-id r1 --token T
///   chorus serve orchestrator --config run.toml --learner http://127.0.0.1:7000 --worker http://127.0.0.1:7001 --run-id r1 --token T
#[derive(Subcommand, Debug)]
pub enum ServeCommand {
    /// The learner: trains on scored groups and streams new weights.
    Learner(ServiceArgs),
    /// A rollout worker: generates with the learner's latest weights.
    Worker(WorkerArgs),
    /// The orchestrator: schedules the run's stages against a learner and workers, records the
    /// ledger and writes summary.json, then exits.
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
    /// The run configuration (TOML).
    #[arg(long)]
    config: PathBuf,
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
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// The learner's address, e.g. http://10.0.0.2:7000.
    #[arg(long)]
    learner: String,
    /// This worker's id in the ledger.
    #[arg(long, default_value = "w0")]
    id: String,
}

#[derive(Args, Debug)]
pub struct OrchestratorArgs {
    /// The run configuration (TOML).
    #[arg(long)]
    config: PathBuf,
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
    /// How long to wait for registrations before giving up, in seconds.
    #[arg(long, default_value_t = 600)]
    wait_seconds: u64,
    /// Run id shared by all services of the run (default: the config's name).
    #[arg(long)]
    run_id: Option<String>,
    /// Shared token of the services.
    #[arg(long, env = "CHORUS_TOKEN")]
    token: String,
    /// Ledger database (default: sqlite://runs/<name>/ledger.sqlite).
    #[arg(long)]
    db: Option<String>,
    /// Directory for run outputs.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Held-out tasks per environment for the before/after evaluation.
    #[arg(long, default_value_t = 64)]
    eval_tasks: usize,
}

pub fn run(cmd: ServeCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            ServeCommand::Learner(a) => {
                let cfg = RunConfig::from_file(&a.config)?;
                let run_id = a.run_id.unwrap_or_else(|| cfg.name.clone());
                let (handle, url) =
                    super::run::start_learner(&cfg, &run_id, &a.token, &a.listen).await?;
                if let Some(orchestrator) = &a.orchestrator {
                    let reporter = Reporter::Learner {
                        id: format!("learner-{run_id}"),
                        endpoint: url.clone(),
                        run_id: run_id.clone(),
                        version: Arc::new(move || handle.version()),
                    };
                    register(orchestrator, &a.token, reporter).await?;
                }
                println!("listening on {url}");
                wait_for_shutdown().await
            }
            ServeCommand::Worker(a) => {
                let cfg = RunConfig::from_file(&a.service.config)?;
                let run_id = a.service.run_id.unwrap_or_else(|| cfg.name.clone());
                let model = super::run::model_config(&cfg)?;
                let (url, handle) = super::run::serve_worker(
                    &model,
                    &a.learner,
                    &a.service.token,
                    &run_id,
                    &a.id,
                    cfg.worker_max_batch,
                    super::run::worker_engine_options(&cfg),
                    &a.service.listen,
                )
                .await?;
                if let Some(orchestrator) = &a.service.orchestrator {
                    let reporter = Reporter::Worker {
                        id: a.id.clone(),
                        endpoint: url.clone(),
                        capacity: cfg.worker_max_batch as u32,
                        version: Arc::new(move || handle.version()),
                    };
                    register(orchestrator, &a.service.token, reporter).await?;
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
            ServeCommand::Orchestrator(a) => {
                let cfg = RunConfig::from_file(&a.config)?;
                let run_id = a.run_id.unwrap_or_else(|| cfg.name.clone());
                let out_dir = a.runs_dir.join(&cfg.name);
                let started = Instant::now();
                let directory = match &a.listen {
                    Some(listen) => {
                        let db = a.db.clone().unwrap_or_else(|| {
                            format!("sqlite://{}", out_dir.join("ledger.sqlite").display())
                        });
                        let url =
                            serve_orchestrator(&run_id, listen, &a.token, &db, &out_dir).await?;
                        println!("listening on {}", url.0);
                        std::io::Write::flush(&mut std::io::stdout())?;
                        Some(url.1)
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
                        "give the learner's address (--learner URL) or --listen ADDR so that it \
                         can register"
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
                        "give the workers' addresses (--worker URL, repeated) or --listen ADDR \
                         so that they can register"
                    ),
                };
                let result = super::run::orchestrate(
                    &cfg,
                    &a.config,
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
                    d.emit(run_event::Kind::StatusChanged(RunStatusChanged {
                        status: ProtoRunStatus::Failed as i32,
                        reason: format!("{e:#}"),
                    }));
                }
                result
            }
        }
    })
}

/// Serves the Orchestrator service for `run_id` on `listen` (registrations, heartbeats, runs
/// from the ledger at `db`, run events); returns its URL and the directory behind it.
async fn serve_orchestrator(
    run_id: &str,
    listen: &str,
    token: &str,
    db: &str,
    out_dir: &std::path::Path,
) -> anyhow::Result<(String, Arc<Directory>)> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let ledger = Ledger::open(db)
        .await
        .with_context(|| format!("opening the ledger {db}"))?;
    let directory = Directory::new(run_id, Leases::default());
    directory.spawn_lease_checker();
    let svc = OrchestratorServer::with_interceptor(
        OrchestratorService::new(directory.clone(), ledger),
        RequireToken::new(token)?,
    );
    let url = super::run::serve_routes(Routes::new(svc), listen).await?;
    Ok((url, directory))
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
