//! `chorus launch CONFIG --orchestrator URL`: hands a run to an orchestrator that serves launched
//! runs, then follows its events until it ends; `chorus watch RUN --orchestrator URL` follows a
//! run already launched.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use chorus_proto::tonic::Code;
use chorus_proto::v1::{
    GetRunRequest, LaunchRunRequest, RunEvent, RunStatus, WatchRunRequest, run_event,
};
use clap::Args;

use super::registration::{Client, connect};

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
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct LaunchArgs {
    /// The run configuration (TOML).
    config: PathBuf,
    /// The orchestrator's address, e.g. http://10.0.0.1:7010.
    #[arg(long)]
    orchestrator: String,
    /// Shared token of the services.
    #[arg(long, env = "CHORUS_TOKEN")]
    token: String,
    /// Name of the run (default: the config's name); the run id adds the launch time.
    #[arg(long)]
    name: Option<String>,
    /// Idempotency key: launching again with the same key returns the run the first launch
    /// created instead of starting another (default: a new key).
    #[arg(long)]
    request_id: Option<String>,
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
/// Example: chorus watch quickstart-1795939688315-0 --orchestrator http://10.0.0.1:7010 --token T
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct WatchArgs {
    /// The run's id (printed by `chorus launch`).
    run_id: String,
    /// The orchestrator's address, e.g. http://10.0.0.1:7010.
    #[arg(long)]
    orchestrator: String,
    /// Shared token of the services.
    #[arg(long, env = "CHORUS_TOKEN")]
    token: String,
}

pub fn watch(a: WatchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut client = connect(&a.orchestrator, &a.token).await?;
        follow(&mut client, &a.run_id).await
    })
}

pub fn run(a: LaunchArgs) -> anyhow::Result<()> {
    let (_, config_toml) = super::load_config(&a.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(launch(a, config_toml))
}

async fn launch(a: LaunchArgs, config_toml: String) -> anyhow::Result<()> {
    let mut client = connect(&a.orchestrator, &a.token).await?;
    let request = LaunchRunRequest {
        request_id: a.request_id.clone().unwrap_or_else(new_request_id),
        name: a.name.clone().unwrap_or_default(),
        config_toml,
    };
    // Retries carry the same request id, so a launch whose answer was lost is not doubled.
    let mut attempt = 0;
    let response = loop {
        attempt += 1;
        match client.launch_run(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && attempt < 4 => {
                eprintln!(
                    "the orchestrator is unavailable ({}); retrying",
                    s.message()
                );
                tokio::time::sleep(Duration::from_secs(attempt)).await;
            }
            Err(s) => bail!("launching at {}: {}", a.orchestrator, s.message()),
        }
    };
    let run = response
        .run
        .context("the orchestrator answered without a run")?;
    println!("{}", run.run_id);
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
    follow(&mut client, &run.run_id).await
}

/// Prints the run's events until it ends; reconnects where it left off when the stream breaks.
async fn follow(client: &mut Client, run_id: &str) -> anyhow::Result<()> {
    let mut last = 0;
    let mut failures = 0;
    loop {
        let stream = client
            .watch_run(WatchRunRequest {
                run_id: run_id.to_string(),
                after_sequence: last,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::Unavailable && failures < 10 => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(s) => bail!("watching run {run_id}: {}", s.message()),
        };
        loop {
            match stream.message().await {
                Ok(Some(e)) => {
                    last = e.sequence;
                    failures = 0;
                    if let Some(end) = describe(&e) {
                        return end;
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    eprintln!("the event stream broke ({}); reconnecting", s.message());
                    break;
                }
            }
        }
        // The stream ended without a final status: ask for it.
        match client
            .get_run(GetRunRequest {
                run_id: run_id.to_string(),
            })
            .await
        {
            Ok(r) if r.get_ref().status == RunStatus::Succeeded as i32 => {
                eprintln!("run {run_id} succeeded");
                return Ok(());
            }
            Ok(r) if r.get_ref().status == RunStatus::Failed as i32 => {
                bail!("run {run_id} failed (see the orchestrator's log)")
            }
            _ => {}
        }
        failures += 1;
        if failures > 10 {
            bail!("lost the event stream of run {run_id} and could not reconnect");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Prints one event; for a final status, returns how the command ends.
fn describe(e: &RunEvent) -> Option<anyhow::Result<()>> {
    let Some(kind) = &e.kind else { return None };
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
            match status {
                RunStatus::Succeeded => Some(Ok(())),
                RunStatus::Failed | RunStatus::Cancelled => Some(Err(anyhow::anyhow!(
                    "run {} {name}: {}",
                    e.run_id,
                    c.reason
                ))),
                _ => None,
            }
        }
        run_event::Kind::LearnerStep(s) => {
            eprintln!(
                "step {:>5}  loss {:>9.4}  trajectories {:>5}{}",
                s.step,
                s.loss,
                s.trajectories,
                if s.skipped { "  (skipped)" } else { "" }
            );
            None
        }
        run_event::Kind::WorkerJoined(j) => {
            eprintln!("worker {} joined (capacity {})", j.worker_id, j.capacity);
            None
        }
        run_event::Kind::WorkerLost(l) => {
            eprintln!(
                "worker {} lost; {} requests it held went to other workers",
                l.worker_id, l.redispatched_prompts
            );
            None
        }
        run_event::Kind::PolicyPublished(p) => {
            eprintln!("policy version {} published", p.policy_version);
            None
        }
    }
}

/// A fresh idempotency key: the time and the process id, which no other launch shares.
fn new_request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("launch-{nanos:x}-{:x}", std::process::id())
}
