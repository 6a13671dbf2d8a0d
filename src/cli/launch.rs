//! `chorus launch CONFIG --orchestrator URL`: hands a run to an orchestrator that serves launched
//! runs, then follows its events until it ends; `chorus watch RUN --orchestrator URL` follows a
//! run already launched.

use std::path::PathBuf;

use anyhow::{Context, bail};
use chorus_proto::v1::{LaunchRunRequest, RunEvent, RunStatus, run_event};
use chorus_runtime::client::{self, RunEnd, connect};
use clap::Args;

/// Launch a run on an orchestrator that serves launched runs, and follow it to its end.
///
/// The orchestrator (`chorus serve orchestrator --listen ADDR`, started without --config) hands
/// the run to its standby learner and workers (`chorus serve learner|worker --orchestrator URL`)
/// once the runs launched before it have finished. The config is checked here first; relative
/// paths in it are relative to each service's working directory. The run's id is printed on
/// standard output, its events on standard error; the exit status is non-zero when the run
/// fails. Ctrl-C stops following, not the run.
///
/// Examples:
///   chorus launch configs/quickstart.toml --orchestrator http://10.0.0.1:7010 --token T
///   chorus launch run.toml --orchestrator http://10.0.0.1:7010 --request-id nightly-42 --detach
///   chorus launch run.toml --orchestrator http://10.0.0.1:7010 --eval-every 20 --eval-tasks 64
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct LaunchArgs {
    /// The run configuration (TOML).
    config: PathBuf,
    /// The orchestrator's address, e.g. http://10.0.0.1:7010.
    #[arg(long)]
    orchestrator: String,
    /// Shared token of the services.
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: String,
    /// Name of the run (default: the config's name); the run id adds the launch time.
    #[arg(long)]
    name: Option<String>,
    /// Idempotency key: launching again with the same key returns the run the first launch
    /// created instead of starting another (default: a new key).
    #[arg(long)]
    request_id: Option<String>,
    /// Held-out tasks per environment in this run's evaluations (default: the orchestrator's
    /// `--eval-tasks`).
    #[arg(long, value_name = "N")]
    eval_tasks: Option<u64>,
    /// Also evaluate this run every N RL steps, its learning curve (default: the
    /// orchestrator's `--eval-every`; 0: only before RL and at the end).
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Print the run id and return at once instead of following the run.
    #[arg(long)]
    detach: bool,
}

/// Follow a run's events (learner steps, workers joining and lost, status) until it ends.
///
/// The run must be one the orchestrator process has served or queued (finished runs of earlier
/// processes are in the ledger: `chorus inspect`). Events already past are shown first. The exit
/// status is non-zero when the run fails.
///
/// Example: chorus watch quickstart-20261204-011918-3fa2b1c0 --orchestrator http://10.0.0.1:7010 --token T
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct WatchArgs {
    /// The run's id (printed by `chorus launch`).
    run_id: String,
    /// The orchestrator's address, e.g. http://10.0.0.1:7010.
    #[arg(long)]
    orchestrator: String,
    /// Shared token of the services.
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: String,
}

/// Runs `chorus watch`.
pub fn watch(a: WatchArgs) -> anyhow::Result<()> {
    super::runtime(1)?.block_on(async move {
        let mut client = connect(&a.orchestrator, &a.token).await?;
        follow(&mut client, &a.orchestrator, &a.run_id).await
    })
}

/// Runs `chorus launch`.
pub fn run(a: LaunchArgs) -> anyhow::Result<()> {
    let (_, config_toml) = super::load_config(&a.config)?;
    super::runtime(1)?.block_on(launch(a, config_toml))
}

async fn launch(a: LaunchArgs, config_toml: String) -> anyhow::Result<()> {
    let mut client = connect(&a.orchestrator, &a.token).await?;
    let request = LaunchRunRequest {
        request_id: a.request_id.clone().unwrap_or_else(client::new_request_id),
        name: a.name.clone().unwrap_or_default(),
        config_toml,
        eval_tasks: a.eval_tasks,
        eval_every: a.eval_every,
    };
    let response = client::launch(&mut client, &a.orchestrator, request.clone()).await?;
    let run = response
        .run
        .context("the orchestrator answered without a run")?;
    outln!("{}", run.run_id);
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!(
        "{} run {} (request id {})",
        if response.created {
            "launched"
        } else {
            "already launched:"
        },
        run.run_id,
        request.request_id
    );
    if a.detach {
        return Ok(());
    }
    follow(&mut client, &a.orchestrator, &run.run_id).await
}

/// Prints the run's events until it ends; fails when the run fails.
async fn follow(client: &mut client::Client, url: &str, run_id: &str) -> anyhow::Result<()> {
    let followed = client::follow(client, run_id, describe).await;
    let end = match followed {
        Err(chorus_runtime::RunError::Rpc { what, status }) => {
            let hint = chorus_proto::tls::refusal_hint(url, &status);
            return Err(chorus_runtime::RunError::Rpc {
                what: format!("{what}{hint}"),
                status,
            }
            .into());
        }
        other => other?,
    };
    match end {
        RunEnd::Succeeded => Ok(()),
        RunEnd::Failed(reason) => bail!("run {run_id} failed: {reason}"),
    }
}

/// Prints one event.
fn describe(e: &RunEvent) {
    let Some(kind) = &e.kind else { return };
    match kind {
        run_event::Kind::StatusChanged(c) => {
            let status = RunStatus::try_from(c.status).unwrap_or(RunStatus::Unspecified);
            let name = status
                .as_str_name()
                .trim_start_matches("RUN_STATUS_")
                .to_lowercase();
            if c.reason.is_empty() {
                eprintln!("run {}: {name}", e.run_id);
            } else {
                eprintln!("run {}: {name}: {}", e.run_id, c.reason);
            }
        }
        run_event::Kind::LearnerStep(s) => eprintln!(
            "step {:>5}  loss {:>9.4}  trajectories {:>5}{}",
            s.step,
            s.loss,
            s.trajectories,
            if s.skipped { "  (skipped)" } else { "" }
        ),
        run_event::Kind::WorkerJoined(j) => {
            eprintln!("worker {} joined (capacity {})", j.worker_id, j.capacity)
        }
        run_event::Kind::WorkerLost(l) => eprintln!(
            "worker {} lost; {} requests it held went to other workers",
            l.worker_id, l.redispatched_prompts
        ),
        run_event::Kind::PolicyPublished(p) => {
            eprintln!("policy version {} published", p.policy_version)
        }
    }
}
