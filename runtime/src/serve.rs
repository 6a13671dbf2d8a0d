//! Each service of a run as its own process (`chorus serve …`), for runs across machines: the
//! learner and a rollout worker (optionally registering with an orchestrator), the orchestrator
//! of one run, and the orchestrator daemon that serves launched runs one after another on
//! standby services. Each function serves until its run ends or Ctrl-C.

use chorus_proto::limits::ORCHESTRATOR_MAX_MESSAGE_BYTES;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chorus_orchestrator::config::RunConfig;
use chorus_orchestrator::directory::ends_run;
use chorus_orchestrator::ledger::{Ledger, RunStatus};
use chorus_orchestrator::{
    Directory, Fleet, Launched, LearnerLink, Leases, OrchestratorService, take_over_learner,
};
use chorus_proto::auth::{RequireToken, Secret};
use chorus_proto::tonic::service::Routes;
use chorus_proto::v1::orchestrator_server::OrchestratorServer;
use chorus_proto::v1::{RunStatus as ProtoRunStatus, RunStatusChanged, run_event};

use crate::driver::default_db;
use crate::driver::{LearnerFrom, rejoin};
use crate::error::{Result, RunError};
use crate::plan::RunPlan;
use crate::registration::{Reporter, register};
use crate::services::{Backend, serve_routes, start_learner_from, start_worker};
use crate::summary::Summary;
use crate::{Endpoints, RunOptions, orchestrate};
use chorus_learner::checkpoints::CheckpointPolicy;

/// How a learner or worker process serves.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Its id at the orchestrator (and, for a worker, in the ledger).
    pub id: String,
    /// The run's id, shared by all its services.
    pub run_id: String,
    /// Address to serve on (port 0 picks a free port).
    pub listen: String,
    /// The address others use to reach it, if not the one bound (see [`advertised_url`]).
    pub advertise: Option<String>,
    /// The shared token (`Debug` prints `***`).
    pub token: Secret,
    /// The orchestrator to register with and send heartbeats to.
    pub orchestrator: Option<String>,
}

/// Serves the learner of `plan` until Ctrl-C; `listening` gets its URL once it serves.
///
/// With `checkpoints`, it saves rolling checkpoints there (every `[learner] checkpoint_every`
/// versions and at stage boundaries) and starts from the newest one it finds: a learner killed
/// and started again with the same directory resumes where it saved, and the orchestrator sends
/// it the groups of the steps after that again.
pub async fn learner(
    plan: &RunPlan,
    s: ServiceOptions,
    checkpoints: Option<PathBuf>,
    listening: impl FnOnce(&str),
) -> Result<()> {
    let (from, policy) = match checkpoints {
        Some(dir) => {
            let latest = chorus_learner::checkpoints::latest(&dir)?;
            let from = match latest {
                Some((version, path)) => {
                    tracing::info!(
                        policy_version = version,
                        dir = %path.display(),
                        "resuming from the learner checkpoint at version {version}"
                    );
                    LearnerFrom::Checkpoint(path)
                }
                None => LearnerFrom::Plan,
            };
            let policy = CheckpointPolicy {
                dir,
                every: plan.config.checkpoint_every,
                keep: plan.config.checkpoint_keep,
            };
            (from, Some(policy))
        }
        None => (LearnerFrom::Plan, None),
    };
    let (handle, bound) =
        start_learner_from(plan, &s.run_id, s.token.expose(), &s.listen, &from, policy).await?;
    let url = advertised_url(&bound, s.advertise.as_deref())?;
    if let Some(orchestrator) = &s.orchestrator {
        let reporter = Reporter::Learner {
            id: s.id.clone(),
            endpoint: url.clone(),
            run_id: s.run_id.clone(),
            version: Arc::new(move || handle.version()),
        };
        register(orchestrator, s.token.expose(), reporter).await?;
    }
    listening(&url);
    shutdown().await
}

/// Serves a rollout worker of `plan` that follows the learner at `learner_url`, until Ctrl-C;
/// `listening` gets its URL once it serves.
pub async fn worker(
    plan: &RunPlan,
    learner_url: &str,
    backend: &Backend,
    s: ServiceOptions,
    listening: impl FnOnce(&str),
) -> Result<()> {
    let (bound, handle) = start_worker(
        plan,
        learner_url,
        s.token.expose(),
        &s.run_id,
        &s.id,
        &s.listen,
        backend,
    )
    .await?;
    let url = advertised_url(&bound, s.advertise.as_deref())?;
    if let Some(orchestrator) = &s.orchestrator {
        let reporter = Reporter::Worker {
            id: s.id.clone(),
            endpoint: url.clone(),
            run_id: s.run_id.clone(),
            capacity: plan.config.worker_max_batch as u32,
            version: Arc::new(move || handle.version()),
        };
        register(orchestrator, s.token.expose(), reporter).await?;
    }
    listening(&url);
    shutdown().await
}

/// Waits for Ctrl-C.
async fn shutdown() -> Result<()> {
    tokio::signal::ctrl_c()
        .await
        .map_err(RunError::io("waiting for Ctrl-C"))?;
    tracing::info!("stopping");
    Ok(())
}

/// How the orchestrator of one run finds its services and records the run.
#[derive(Clone, Debug)]
pub struct OrchestratorOptions {
    /// The run's id, shared by all its services.
    pub run_id: String,
    /// Serve the Orchestrator service here, so that services register and clients watch.
    pub listen: Option<String>,
    /// The learner's URL; without it, wait for the learner to register (needs `listen`).
    pub learner: Option<String>,
    /// The workers' URLs; without any, wait for `workers.count` to register (needs `listen`).
    pub workers: Vec<String>,
    /// How long to wait for registrations.
    pub wait: Duration,
    /// The shared token (`Debug` prints `***`).
    pub token: Secret,
    /// The token the run's environment plugins check (their own, never the shared token).
    pub plugin_token: Option<Secret>,
    /// Ledger URL; default `sqlite://<runs_dir>/<name>/ledger.sqlite`.
    pub db: Option<String>,
    /// Directory for run outputs.
    pub runs_dir: PathBuf,
    /// How long the run waits for a learner that died to come back (0: it fails at once).
    pub learner_restart: Duration,
}

/// The orchestrator of one run: waits for its learner and workers (given, or registering),
/// runs the plan's stages against them and returns the summary. `listening` gets the
/// Orchestrator service's URL when it serves one.
pub async fn orchestrator(
    plan: &RunPlan,
    o: OrchestratorOptions,
    listening: impl FnOnce(&str),
) -> Result<Summary> {
    let out_dir = o.runs_dir.join(&plan.config.name);
    let directory = match &o.listen {
        Some(listen) => {
            let db = o.db.clone().unwrap_or_else(|| default_db(&out_dir));
            let (fleet, ledger) = open_orchestrator(&db, &out_dir, None).await?;
            let url = serve_orchestrator(listen, o.token.expose(), &fleet, &ledger).await?;
            let directory = Directory::new(&o.run_id, fleet.leases());
            directory.spawn_lease_checker();
            fleet.serve_run(directory.clone(), plan.config_toml.clone());
            listening(&url);
            Some(directory)
        }
        None => None,
    };
    let learner = match (o.learner, &directory) {
        (Some(url), _) => url,
        (None, Some(d)) => {
            tracing::info!("waiting for the learner to register ...");
            d.wait_for_learner(o.wait).await?.endpoint
        }
        (None, None) => {
            return Err(RunError::Invalid(
                "give the learner's address (--learner URL) or --listen ADDR so that it can \
                 register"
                    .into(),
            ));
        }
    };
    let workers = match (o.workers.is_empty(), &directory) {
        (false, _) => o.workers,
        (true, Some(d)) => {
            tracing::info!(
                workers = plan.config.workers,
                "waiting for {} rollout workers to register ...",
                plan.config.workers
            );
            d.wait_for_workers(plan.config.workers, o.wait).await?;
            // The pool takes them, and later ones, from the directory.
            vec![]
        }
        (true, None) => {
            return Err(RunError::Invalid(
                "give the workers' addresses (--worker URL, repeated) or --listen ADDR so that \
                 they can register"
                    .into(),
            ));
        }
    };
    // An orchestrator started again on a run of its ledger (it died, its services lived on)
    // picks the run up where the learner is.
    let resumed = {
        let db = o.db.clone().unwrap_or_else(|| default_db(&out_dir));
        let ledger = Ledger::open(&db).await.map_err(RunError::ledger(&db))?;
        let found = ledger
            .get_run(&o.run_id)
            .await
            .map_err(RunError::ledger(&db))?;
        ledger.close().await.map_err(RunError::ledger(&db))?;
        match found {
            Some(_) => Some(
                pick_up_run(
                    plan,
                    &learner,
                    o.token.expose(),
                    &o.run_id,
                    &db,
                    &out_dir,
                    o.wait,
                )
                .await?,
            ),
            None => None,
        }
    };
    let endpoints = Endpoints {
        learner,
        workers,
        token: o.token.expose().to_string(),
        plugin_token: o.plugin_token.clone(),
    };
    let options = RunOptions {
        run_id: o.run_id,
        db: o.db,
        out_dir,
        directory: directory.clone(),
        recorded: resumed.is_some(),
        resumed,
        first_stage: 0,
        learner_link: LearnerLink {
            recover_for: o.learner_restart,
            ..LearnerLink::default()
        },
    };
    orchestrate(plan, &endpoints, options).await
}

/// Picks up run `run_id` of the ledger at `db`, cut off by a restart of its orchestrator: the
/// learner at `learner` drops what it held for untrained steps and its history goes into the
/// ledger, which is rewound to the learner's version (see [`rejoin`]).
async fn pick_up_run(
    plan: &RunPlan,
    learner: &str,
    token: &str,
    run_id: &str,
    db: &str,
    out_dir: &std::path::Path,
    wait: Duration,
) -> Result<crate::driver::Resumed> {
    let ledger = Ledger::open(db).await.map_err(RunError::ledger(db))?;
    let version = take_over_learner(learner, token, run_id, &ledger, wait).await?;
    let resumed = rejoin(plan, &ledger, db, run_id, version, out_dir).await?;
    ledger.close().await.map_err(RunError::ledger(db))?;
    Ok(resumed)
}

/// Tells `WatchRun` clients that the run failed, unless the driver already did (it announces
/// every failure once the run has started; this covers failures before, like a learner that
/// never registered).
fn announce_failure(directory: &Directory, e: &RunError) {
    if !directory.events_after(0).iter().any(ends_run) {
        directory.emit(run_event::Kind::StatusChanged(RunStatusChanged {
            status: ProtoRunStatus::Failed as i32,
            reason: e.to_string(),
        }));
    }
}

/// How the orchestrator daemon serves launched runs.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// Where it serves the Orchestrator service.
    pub listen: String,
    /// The shared token (`Debug` prints `***`).
    pub token: Secret,
    /// The token launched runs' environment plugins check (their own, never the shared token).
    pub plugin_token: Option<Secret>,
    /// Ledger URL; default `sqlite://<runs_dir>/ledger.sqlite`.
    pub db: Option<String>,
    /// Directory for run outputs (`<runs_dir>/<run id>/summary.json`).
    pub runs_dir: PathBuf,
    /// How long a run waits for its learner and workers.
    pub wait: Duration,
    /// Held-out tasks per environment in each run's evaluation.
    pub eval_tasks: usize,
    /// Each run also evaluates every this many RL steps (its learning curve); 0: only at the
    /// start and end of its stages.
    pub eval_every: u64,
    /// The name this orchestrator records its launches under in the ledger.
    pub name: String,
    /// How long a run waits for its learner to come back when it dies (its standby learner
    /// starts it again from its checkpoints); 0: the run fails at once.
    pub learner_restart: Duration,
}

/// The orchestrator daemon: serves runs launched with `LaunchRun`, one after another, on the
/// standby services registered with it, until Ctrl-C. Restarted under the same name on the
/// same ledger, it picks up the run it was running where the run's learner is (its standby
/// services, still serving it, are handed it back) and queues again the runs still pending.
/// `listening` gets its URL once it serves.
pub async fn launched_runs(d: DaemonOptions, listening: impl FnOnce(&str)) -> Result<()> {
    let db = d.db.clone().unwrap_or_else(|| default_db(&d.runs_dir));
    let (fleet, ledger) = open_orchestrator(&db, &d.runs_dir, Some(d.name.clone())).await?;
    // What an earlier process with this name left: the run cut off mid-way is picked up first
    // (it is served before this process answers anyone, so that the standby services serving it
    // keep it), then the runs that never started, in launch order.
    let at = RunError::ledger(&db);
    let mut picked_up = HashSet::new();
    for (request_id, eval, run) in ledger
        .launched_runs(&d.name, RunStatus::Running)
        .await
        .map_err(at)?
    {
        tracing::warn!(
            run_id = run.id,
            "run {} was running when this orchestrator last stopped: picking it up",
            run.id
        );
        let launched = fleet.requeue(&request_id, &run.id, &run.name, &run.config_toml, eval);
        if picked_up.is_empty() {
            fleet.pick_up_run(launched.directory.clone(), launched.config_toml.clone());
        }
        picked_up.insert(run.id);
    }
    let pending = ledger
        .launched_runs(&d.name, RunStatus::Pending)
        .await
        .map_err(RunError::ledger(&db))?;
    for (request_id, eval, run) in pending {
        tracing::info!(
            run_id = run.id,
            "run {} was launched before a restart: queued again",
            run.id
        );
        fleet.requeue(&request_id, &run.id, &run.name, &run.config_toml, eval);
    }
    ledger.flush().await.map_err(RunError::ledger(&db))?;
    let url = serve_orchestrator(&d.listen, d.token.expose(), &fleet, &ledger).await?;
    listening(&url);
    tracing::info!(
        name = d.name,
        db,
        "serving launched runs as `{}`; ledger {db}",
        d.name
    );
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let launched = tokio::select! {
            l = fleet.next_launched() => l,
            _ = &mut ctrl_c => {
                tracing::info!("stopping");
                return Ok(());
            }
        };
        let run_id = launched.run_id.clone();
        let (learners, workers) = fleet.standby();
        tracing::info!(
            run_id,
            learners,
            workers,
            "run {run_id}: starting; standing by: {learners} learner(s), {workers} worker(s)"
        );
        let pick_up = picked_up.remove(&run_id);
        let result = run_launched(&d, &fleet, &launched, &db, pick_up).await;
        if let Err(e) = &result {
            tracing::error!(run_id, error = %e, "run {run_id} failed: {e}");
            ledger
                .set_run_status(&run_id, RunStatus::Failed)
                .await
                .map_err(RunError::ledger(&db))?;
            ledger
                .drop_in_flight(&run_id, "in flight when the run failed")
                .await
                .map_err(RunError::ledger(&db))?;
            ledger.flush().await.map_err(RunError::ledger(&db))?;
            announce_failure(&launched.directory, e);
        }
        fleet.finish_run();
    }
}

/// One launched run, on the standby services the fleet hands it to.
/// With `pick_up`, the run was cut off by a restart of this process: it continues where its
/// learner is (see [`rejoin`]).
async fn run_launched(
    d: &DaemonOptions,
    fleet: &Fleet,
    launched: &Launched,
    db: &str,
    pick_up: bool,
) -> Result<()> {
    let run_id = &launched.run_id;
    let cfg = RunConfig::from_toml_relative_to(
        &launched.config_toml,
        &format!("the config of run {run_id}"),
        std::path::Path::new("."),
    )?;
    // The launch's own evaluation settings, else the daemon's.
    let plan = RunPlan::new(
        cfg,
        launched.config_toml.clone(),
        launched.eval.tasks.map_or(d.eval_tasks, |t| t as usize),
        launched.eval.every.unwrap_or(d.eval_every),
    )?;
    let directory = launched.directory.clone();
    directory.spawn_lease_checker();
    fleet.serve_run(directory.clone(), launched.config_toml.clone());
    let learner = directory.wait_for_learner(d.wait).await?.endpoint;
    directory
        .wait_for_workers(plan.config.workers, d.wait)
        .await?;
    let out_dir = d.runs_dir.join(run_id);
    let resumed = match pick_up {
        true => Some(
            pick_up_run(
                &plan,
                &learner,
                d.token.expose(),
                run_id,
                db,
                &out_dir,
                d.wait,
            )
            .await?,
        ),
        false => None,
    };
    let endpoints = Endpoints {
        learner,
        workers: vec![],
        token: d.token.expose().to_string(),
        plugin_token: d.plugin_token.clone(),
    };
    let options = RunOptions {
        run_id: run_id.clone(),
        db: Some(db.to_string()),
        out_dir,
        directory: Some(directory),
        resumed,
        first_stage: 0,
        recorded: true,
        // The run's standby learner starts its learner again from its checkpoints.
        learner_link: LearnerLink {
            recover_for: d.learner_restart,
            ..LearnerLink::default()
        },
    };
    orchestrate(&plan, &endpoints, options).await.map(|_| ())
}

/// Opens the ledger at `db` and an empty fleet for an orchestrator (launches, recorded under
/// `launcher`, when it is given).
async fn open_orchestrator(
    db: &str,
    out_dir: &std::path::Path,
    launcher: Option<String>,
) -> Result<(Arc<Fleet>, Ledger)> {
    std::fs::create_dir_all(out_dir)
        .map_err(RunError::io(format!("creating {}", out_dir.display())))?;
    let ledger = Ledger::open(db).await.map_err(RunError::ledger(db))?;
    Ok((Fleet::new(Leases::default(), launcher), ledger))
}

/// Serves the Orchestrator service of `fleet` on `listen` (registrations, heartbeats, runs from
/// `ledger`, run events, launches); returns its URL.
async fn serve_orchestrator(
    listen: &str,
    token: &str,
    fleet: &Arc<Fleet>,
    ledger: &Ledger,
) -> Result<String> {
    let svc = chorus_proto::tonic::service::interceptor::InterceptedService::new(
        OrchestratorServer::new(OrchestratorService::new(fleet.clone(), ledger.clone()))
            .max_decoding_message_size(ORCHESTRATOR_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ORCHESTRATOR_MAX_MESSAGE_BYTES),
        RequireToken::new(token)?,
    );
    serve_routes(Routes::new(svc), listen).await
}

/// The address other machines reach a service at. `advertise` is a host name or IP (the port is
/// the bound one), `HOST:PORT`, or a URL; without it, the bound URL, with a wildcard host
/// (`0.0.0.0`, `[::]`) replaced by this machine's host name, since nobody can connect to those.
pub fn advertised_url(bound: &str, advertise: Option<&str>) -> Result<String> {
    let invalid = |m: String| Err(RunError::Invalid(m));
    // A service serving TLS is bound at https://; what it advertises keeps the scheme.
    let Some((scheme, rest)) = bound
        .split_once("://")
        .filter(|(s, _)| ["http", "https"].contains(s))
    else {
        return invalid(format!("`{bound}` is not an http:// or https:// address"));
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return invalid(format!("`{bound}` has no port"));
    };
    Ok(match advertise {
        Some(a) if a.starts_with("http://") || a.starts_with("https://") => {
            a.trim_end_matches('/').to_string()
        }
        Some("") => {
            return invalid(
                "--advertise is empty; allowed: a host name or IP, HOST:PORT, or a URL".into(),
            );
        }
        Some(a) if a.contains(':') && !a.starts_with('[') => format!("{scheme}://{a}"),
        Some(a) => format!("{scheme}://{a}:{port}"),
        None if host == "0.0.0.0" || host == "[::]" => {
            format!("{scheme}://{}:{port}", host_name()?)
        }
        None => bound.to_string(),
    })
}

fn host_name() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(RunError::Io {
            what: "this machine's host name".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if name.is_empty() {
        return Err(RunError::Invalid(
            "this machine has no host name: give --advertise HOST".into(),
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::advertised_url;

    #[test]
    fn services_advertise_an_address_others_can_reach() {
        let at = |bound: &str, a: Option<&str>| advertised_url(bound, a).unwrap();
        assert_eq!(at("http://127.0.0.1:7000", None), "http://127.0.0.1:7000");
        assert_eq!(
            at("http://0.0.0.0:7000", Some("10.0.0.3")),
            "http://10.0.0.3:7000"
        );
        assert_eq!(
            at("http://0.0.0.0:7000", Some("gpu-3:9000")),
            "http://gpu-3:9000"
        );
        assert_eq!(
            at("http://0.0.0.0:7000", Some("https://w.example/")),
            "https://w.example"
        );
        let wildcard = at("http://0.0.0.0:7000", None);
        assert!(
            wildcard.ends_with(":7000") && !wildcard.contains("0.0.0.0"),
            "{wildcard}"
        );
        assert!(!at("http://[::]:7000", None).contains("[::]"));
        assert!(advertised_url("http://0.0.0.0:7000", Some("")).is_err());
        // A TLS service advertises https://.
        assert_eq!(at("https://127.0.0.1:7000", None), "https://127.0.0.1:7000");
        assert_eq!(
            at("https://0.0.0.0:7000", Some("gpu-3")),
            "https://gpu-3:7000"
        );
        assert!(advertised_url("ftp://0.0.0.0:7000", None).is_err());
    }
}
