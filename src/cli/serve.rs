//! `chorus serve learner|worker|orchestrator|environment`: each service of a run as its own
//! process, for runs across several machines. The learner, workers and environments serve until
//! stopped; the orchestrator runs the stages against them and exits.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use chorus_orchestrator::config::RunConfig;
use clap::{Args, Subcommand};

/// Run one service of a post-training run.
///
/// Start the learner first, then the workers (pointing at the learner), then the orchestrator
/// (pointing at both). Every service prints `listening on URL` once it serves and checks the
/// shared token (--token or CHORUS_TOKEN) on every call.
///
/// Example, on one machine:
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
    /// The learner's address.
    #[arg(long)]
    learner: String,
    /// A rollout worker's address; repeat for each worker.
    #[arg(long = "worker", required = true)]
    workers: Vec<String>,
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
                let (_handle, url) =
                    super::run::start_learner(&cfg, &run_id, &a.token, &a.listen).await?;
                println!("listening on {url}");
                wait_for_shutdown().await
            }
            ServeCommand::Worker(a) => {
                let cfg = RunConfig::from_file(&a.service.config)?;
                let run_id = a.service.run_id.unwrap_or_else(|| cfg.name.clone());
                let model = super::run::model_config(&cfg)?;
                let url = super::run::serve_worker(
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
                super::run::orchestrate(
                    &cfg,
                    &a.config,
                    &run_id,
                    &a.learner,
                    &a.workers,
                    &a.token,
                    a.db,
                    &out_dir,
                    a.eval_tasks,
                    Instant::now(),
                )
                .await
            }
        }
    })
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
