//! Driving a run: [`orchestrate`] runs a plan's stages against a learner and workers that
//! already serve, in four parts — the ledger lifecycle (`ledger.rs`), live progress
//! (`progress.rs`), held-out evaluation (`evaluation.rs`) and the stage loop (`stages.rs`) — and
//! returns the [`Summary`]. [`run_local`] starts the services in this process first.

mod acceptance;
mod evaluation;
mod genrm;
mod ledger;
mod progress;
mod resume;
mod reward_model;
mod stages;

pub use resume::{LearnerFrom, Resumed, rejoin};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chorus_orchestrator::config::StageKind;
use chorus_orchestrator::faults::EnvFaults;
use chorus_orchestrator::ledger::{RunOutputs, new_run_id};
use chorus_orchestrator::remote::{LearnerLink, RemoteLearner, WorkerPool};
use chorus_orchestrator::scheduler::{StageContext, StageStats};
use chorus_orchestrator::{Directory, Leases, record_events};
use chorus_proto::auth::Secret;
use chorus_proto::v1::{RunStatus as ProtoRunStatus, RunStatusChanged, run_event};
use std::time::Duration;
use tracing::Instrument;

use crate::error::{Result, RunError};
use crate::plan::RunPlan;
use crate::services::{Backend, start_learner_from, start_torch_learner, start_worker};
use crate::summary::{self, Summary, gain_line};
use chorus_learner::CheckpointPolicy;
use evaluation::Evaluator;
use ledger::RunRecord;

/// Where a run's services are, and the token they share.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// The learner's URL.
    pub learner: String,
    /// The rollout workers' URLs (empty when they come by registration with `directory`).
    pub workers: Vec<String>,
    /// The shared token every call carries.
    pub token: String,
    /// The token the run's environment plugins check (their own; never the shared token).
    pub plugin_token: Option<Secret>,
}

/// How one run is driven.
#[derive(Clone)]
pub struct RunOptions {
    /// The run's id in the ledger.
    pub run_id: String,
    /// Ledger URL (`sqlite://…` or `postgres://…`); default `sqlite://<out_dir>/ledger.sqlite`.
    pub db: Option<String>,
    /// Where `summary.json` (and the default ledger) go.
    pub out_dir: PathBuf,
    /// The run's directory when it is served: registered workers join the pool and lost ones
    /// leave it, and the run's events also go to `WatchRun` clients. Without one, the run keeps
    /// its events in a directory of its own; either way they are recorded in the ledger.
    pub directory: Option<Arc<Directory>>,
    /// A run picked up after a crash: its finished stages are not run again, the running one
    /// goes on from the learner's version.
    pub resumed: Option<Resumed>,
    /// Stages before this index are not run (`--from-stage`).
    pub first_stage: usize,
    /// The run is already in the ledger (launched through `LaunchRun`); a resumed run is too.
    /// Otherwise it is new, and its id must not be taken.
    pub recorded: bool,
    /// How the run keeps its learner: how long it waits for one that died to come back.
    pub learner_link: LearnerLink,
}

impl RunOptions {
    /// Options for run `run_id` writing to `out_dir`, with the default ledger and
    /// no directory.
    pub fn new(run_id: impl Into<String>, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_id: run_id.into(),
            db: None,
            out_dir: out_dir.into(),
            directory: None,
            resumed: None,
            first_stage: 0,
            recorded: false,
            learner_link: LearnerLink::default(),
        }
    }

    fn db(&self) -> String {
        self.db.clone().unwrap_or_else(|| default_db(&self.out_dir))
    }
}

/// The ledger a run writes when none is given: `sqlite://<out_dir>/ledger.sqlite`.
pub(crate) fn default_db(out_dir: &Path) -> String {
    format!("sqlite://{}", out_dir.join("ledger.sqlite").display())
}

/// Runs the stages of `plan` against the learner and workers at `endpoints`, evaluates, writes
/// `summary.json` in the output directory and returns the summary. The ledger records the run
/// as running, then succeeded (once the summary is written) or failed.
pub async fn orchestrate(
    plan: &RunPlan,
    endpoints: &Endpoints,
    options: RunOptions,
) -> Result<Summary> {
    let span = tracing::info_span!("run", run_id = options.run_id);
    async {
        std::fs::create_dir_all(&options.out_dir).map_err(RunError::io(format!(
            "creating {}",
            options.out_dir.display()
        )))?;
        let db = options.db();
        let record = RunRecord::start(
            &db,
            &options.run_id,
            &plan.config.name,
            &plan.config_toml,
            options.recorded || options.resumed.is_some(),
        )
        .await?;
        let events = match &options.directory {
            Some(d) => d.clone(),
            None => Directory::new(&options.run_id, Leases::default()),
        };
        let recorder = tokio::spawn(record_events(events.clone(), record.ledger.clone()));
        let outcome = drive(plan, endpoints, &options, &record, &events).await;
        // The ledger has the final status before it is announced: a client told finds it so.
        match &outcome {
            Ok(_) => announce(&events, ProtoRunStatus::Succeeded, String::new()),
            Err(e) => {
                record.fail().await;
                announce(&events, ProtoRunStatus::Failed, e.to_string());
            }
        }
        // The announcement ends the recorder, so every event is in the ledger on return.
        drop(events);
        match recorder.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the run's events were not all recorded"),
            Err(e) => tracing::warn!(error = %e, "recording the run's events stopped"),
        }
        record.flush().await?;
        if outcome.is_ok() {
            record.close().await?;
        }
        outcome
    }
    .instrument(span)
    .await
}

/// Connects to the services, runs the stages, evaluates and writes the summary.
async fn drive(
    plan: &RunPlan,
    endpoints: &Endpoints,
    options: &RunOptions,
    record: &RunRecord,
    events: &Arc<Directory>,
) -> Result<Summary> {
    let cfg = &plan.config;
    let run_id = &options.run_id;
    let pool = WorkerPool::connect(
        &endpoints.workers,
        &endpoints.token,
        cfg.worker_max_in_flight,
    )
    .await?;
    if let Some(d) = &options.directory {
        // Registered workers join (and lost ones leave) while the run goes on.
        pool.follow(d.clone()).await;
    }
    let pool = Arc::new(pool);
    let learner = Arc::new(
        RemoteLearner::connect(
            &endpoints.learner,
            &endpoints.token,
            run_id,
            // A resumed learner starts at the version the run continues from.
            options.resumed.as_ref().map_or(0, |r| r.version),
            Some(record.ledger.clone()),
            options.learner_link.clone(),
        )
        .await?,
    );
    let registry = {
        let (cfg, plugin_token) = (cfg.clone(), endpoints.plugin_token.clone());
        // Connecting to plugins blocks; environments are called from blocking threads.
        tokio::task::spawn_blocking(move || {
            crate::environment_registry(&cfg, plugin_token.as_ref().map(Secret::expose))
        })
        .await
        .map_err(|source| RunError::Task {
            what: "connecting to the run's environments",
            source,
        })??
    };
    let stats = Arc::new(StageStats::default());
    let mut ctx = StageContext {
        run_id: run_id.clone(),
        seed: cfg.seed,
        stage_index: 0,
        registry: Arc::new(registry),
        tokenizer: plan.tokenizer.clone(),
        ledger: record.ledger.clone(),
        rollouts: pool.clone(),
        learning: learner.clone(),
        stats: stats.clone(),
        faults: Arc::new(EnvFaults::new(cfg.environment_faults)),
        deterministic: cfg.deterministic,
        transcripts: None,
        goal: None,
        first_version: None,
        restart: 0,
    };
    tracing::info!(
        workers = pool.ids().len(),
        learner = endpoints.learner,
        db = record.db,
        "run {run_id}: {} workers, learner at {}, ledger {}",
        pool.ids().len(),
        endpoints.learner,
        record.db
    );
    announce(events, ProtoRunStatus::Running, String::new());
    progress::spawn(learner.steps(), stats.clone(), events.clone());

    ctx.restart = options.resumed.as_ref().map_or(0, |r| r.restart);
    let mut evaluator = Evaluator::new(
        plan.evaluation.clone(),
        Some(options.out_dir.join(resume::MEASUREMENTS_FILE)),
    )?;
    let outputs = stages::StageOutputs {
        out_dir: &options.out_dir,
        learner: &learner,
        model: &plan.model,
        tokenizer: &plan.tokenizer,
        db: &record.db,
    };
    let start = stages::StartAt {
        first_stage: options.first_stage,
        resumed: options.resumed.as_ref(),
    };
    let stage_summaries =
        stages::run_stages(plan, &mut ctx, &mut evaluator, &outputs, &start).await?;
    let measured_before_rl = evaluator.finish(&Arc::new(ctx.clone())).await?;
    // The trained policy outlives the run's processes: its final version, in HF layout. The
    // last policy stage normally saved that version already; its files are copied rather than
    // the weights fetched from the learner and written again.
    let checkpoint = options.out_dir.join(FINAL_CHECKPOINT);
    let version = ctx.learning.version();
    let saved = stage_summaries.iter().rev().find(|s| {
        s.last_version == version
            && s.kind != StageKind::RewardModel.name()
            && s.checkpoint
                .join(chorus_model::checkpoint::CONFIG_FILE)
                .is_file()
    });
    match saved {
        Some(stage) => copy_files(&stage.checkpoint, &checkpoint)?,
        None => stages::save_checkpoint(&outputs, run_id, version, &checkpoint).await?,
    }
    tracing::info!(
        checkpoint = %checkpoint.display(),
        "the trained policy (version {}) is in {}",
        ctx.learning.version(),
        checkpoint.display()
    );

    // summary.json is what the ledger holds, so the two cannot disagree: the run records what
    // no other table has, then the summary is read back.
    let faults = serde_json::to_string(&ctx.faults.report()).expect("fault records serialise");
    record
        .ledger
        .record_run_outputs(
            run_id,
            RunOutputs {
                cpu: Some(chorus_kernels::cpu_description()),
                checkpoint_path: Some(checkpoint.display().to_string()),
                environment_faults: Some(faults),
            },
        )
        .await
        .map_err(RunError::ledger(&record.db))?;
    record.flush().await?;
    let summary = summary::from_ledger(
        &record.ledger,
        &record.db,
        run_id,
        &plan.evaluation.environments,
    )
    .await?;
    if measured_before_rl {
        let outcome = summary.outcome();
        tracing::info!(
            gain = outcome.mean_gain.0,
            gain_lo = outcome.mean_gain.1.lo(),
            gain_hi = outcome.mean_gain.1.hi(),
            "{}",
            gain_line(&outcome)
        );
    }
    let path = options.out_dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).expect("a summary always serialises");
    std::fs::write(&path, text).map_err(RunError::io(format!("writing {}", path.display())))?;
    record.succeed().await?;
    tracing::info!(
        summary = %path.display(),
        db = record.db,
        "wrote {} and the ledger {}",
        path.display(),
        record.db
    );
    Ok(summary)
}

/// Appends a status change to the run's events (the ledger's `events` table, and `WatchRun`
/// clients when the run is served).
fn announce(events: &Directory, status: ProtoRunStatus, reason: String) {
    events.emit(run_event::Kind::StatusChanged(RunStatusChanged {
        status: status as i32,
        reason,
    }));
}

/// Settings of a whole run in this process ([`run_local`]).
#[derive(Clone, Debug)]
pub struct LocalRun {
    /// Ledger URL; default `sqlite://<runs_dir>/<name>/ledger.sqlite`.
    pub db: Option<String>,
    /// Directory for run outputs; the run writes into `<runs_dir>/<name>/`.
    pub runs_dir: PathBuf,
    /// The services' shared token (generated when absent).
    pub token: Option<String>,
    /// The token the config's environment plugins check (needed when it names one).
    pub plugin_token: Option<Secret>,
    /// Continue the unfinished run of this config's name where it stopped.
    pub resume: bool,
    /// Start at this stage (by name), skipping the ones before it.
    pub from_stage: Option<String>,
}

/// A whole run in this process: the learner and each rollout worker as gRPC services on
/// 127.0.0.1 with a shared token, then [`orchestrate`] against them.
pub async fn run_local(plan: &RunPlan, local: LocalRun) -> Result<Summary> {
    let cfg = &plan.config;
    let name_dir = local.runs_dir.join(&cfg.name);
    std::fs::create_dir_all(&name_dir)
        .map_err(RunError::io(format!("creating {}", name_dir.display())))?;
    if local.plugin_token.is_none()
        && let Some(url) = plan.plugin_url()
    {
        return Err(RunError::Invalid(format!(
            "the config uses the environment plugin at {url}, which checks a token of its own: \
             give the token the plugin was started with (--plugin-token T or \
             CHORUS_PLUGIN_TOKEN=T); the run's own token is never sent to plugins"
        )));
    }
    let token = local
        .token
        .clone()
        .unwrap_or_else(|| format!("chorus-{:x}", random_token()));
    let first_stage = match &local.from_stage {
        None => 0,
        Some(name) => cfg
            .stages
            .iter()
            .position(|s| &s.name == name)
            .ok_or_else(|| {
                RunError::Invalid(format!(
                    "--from-stage `{name}`: the config has no such stage; its stages: {}",
                    cfg.stages
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
    };
    let db = local.db.clone().unwrap_or_else(|| default_db(&name_dir));
    let resumed = if local.resume {
        Some(resume::prepare(plan, &db, &name_dir, first_stage).await?)
    } else {
        None
    };
    let run_id = match &resumed {
        Some(r) => r.run_id.clone(),
        None => new_run_id(&cfg.name),
    };
    let (out_dir, _files_lock) = claim_files(&name_dir, &run_id, resumed.as_ref())?;
    let checkpoints = CheckpointPolicy {
        dir: out_dir.join(resume::LEARNER_CHECKPOINTS),
        every: cfg.checkpoint_every,
        keep: cfg.checkpoint_keep,
    };
    let from = resumed
        .as_ref()
        .map_or(LearnerFrom::Plan, |r| r.learner.clone());
    // Whichever learner trains, it lives as long as the run.
    let (_learner, _torch_learner, learner_url) = if cfg.torch_learner.is_some() {
        let (process, url) =
            start_torch_learner(plan, &run_id, &token, &out_dir.join("torch-learner"), &from)
                .await?;
        (None, Some(process), url)
    } else {
        let (handle, url) = start_learner_from(
            plan,
            &run_id,
            &token,
            "127.0.0.1:0",
            &from,
            Some(checkpoints),
        )
        .await?;
        (Some(handle), None, url)
    };
    let mut workers = vec![];
    for i in 0..cfg.workers {
        let id = format!("w{i}");
        let backend = match &cfg.vllm {
            Some(v) if i < v.count => Backend::Vllm {
                url: v.urls.get(i).cloned(),
                work_dir: v
                    .weights_dir
                    .clone()
                    .unwrap_or_else(|| out_dir.join("vllm"))
                    .join(&id),
            },
            _ => Backend::Chorus,
        };
        let (url, _) = start_worker(
            plan,
            &learner_url,
            &token,
            &run_id,
            &id,
            "127.0.0.1:0",
            &backend,
        )
        .await?;
        workers.push(url);
    }
    let endpoints = Endpoints {
        learner: learner_url,
        workers,
        token,
        plugin_token: local.plugin_token.clone(),
    };
    let options = RunOptions {
        run_id,
        db: Some(db),
        out_dir,
        directory: None,
        resumed,
        first_stage,
        recorded: false,
        // Chorus' learner lives and dies with this process; the PyTorch learner, a child, is
        // started again by its supervisor, which may take as long as its first start.
        learner_link: LearnerLink {
            recover_for: cfg.torch_learner.as_ref().map_or(Duration::ZERO, |t| {
                t.start_timeout + Duration::from_secs(60)
            }),
            ..LearnerLink::default()
        },
    };
    orchestrate(plan, &endpoints, options).await
}

/// The directory run `run_id` writes its files to (summary, stages, learner checkpoints), with
/// the lock that keeps it the run's own while the run lives. That is `name_dir`
/// (`<runs>/<name>/`) unless another process's run of the same name holds it; then
/// `<name_dir>/<run id>/`, so two runs of one config started at once keep their files apart
/// while sharing the name's ledger. A resumed run goes back to where its files are.
fn claim_files(
    name_dir: &Path,
    run_id: &str,
    resumed: Option<&Resumed>,
) -> Result<(PathBuf, std::fs::File)> {
    let lock_file = |dir: &Path| {
        let path = dir.join(FILES_LOCK);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(RunError::io(format!("opening {}", path.display())))
    };
    let held = |dir: &Path| {
        RunError::Invalid(format!(
            "another run is writing to {}; wait for it to end before resuming this one",
            dir.display()
        ))
    };
    if let Some(r) = resumed {
        let lock = lock_file(&r.files)?;
        lock.try_lock().map_err(|_| held(&r.files))?;
        return Ok((r.files.clone(), lock));
    }
    let lock = lock_file(name_dir)?;
    if lock.try_lock().is_ok() {
        return Ok((name_dir.to_path_buf(), lock));
    }
    let own = name_dir.join(run_id);
    std::fs::create_dir_all(&own).map_err(RunError::io(format!("creating {}", own.display())))?;
    tracing::info!(
        "another run of this config is writing to {}; run {run_id} writes its files to {} and \
         shares the ledger",
        name_dir.display(),
        own.display()
    );
    let lock = lock_file(&own)?;
    lock.try_lock().map_err(|_| held(&own))?;
    Ok((own, lock))
}

/// Copies every file of directory `from` into `to`, replacing what `to` held (an earlier run's
/// files there could otherwise be read with the new ones).
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to).map_err(RunError::io(format!("replacing {}", to.display())))?;
    }
    std::fs::create_dir_all(to).map_err(RunError::io(format!("creating {}", to.display())))?;
    let entries =
        std::fs::read_dir(from).map_err(RunError::io(format!("reading {}", from.display())))?;
    for entry in entries {
        let path = entry
            .map_err(RunError::io(format!("reading {}", from.display())))?
            .path();
        if path.is_file() {
            let target = to.join(path.file_name().expect("a file has a name"));
            std::fs::copy(&path, &target)
                .map_err(RunError::io(format!("copying {}", path.display())))?;
        }
    }
    Ok(())
}

/// Where in its output directory a run writes its final policy.
pub const FINAL_CHECKPOINT: &str = "checkpoint";

/// The lock file a live run holds in the directory its files go to.
const FILES_LOCK: &str = ".run.lock";

/// A token nobody guesses: two independently seeded std hashers over the time.
fn random_token() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    ((h.finish() as u128) << 64)
        | std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u128
}
