//! `chorus run CONFIG`: a whole post-training run in one process — learner, rollout workers and
//! orchestrator as separate gRPC services on loopback — with a live progress display, the
//! ledger in `runs/<name>/ledger.sqlite` and a `summary.json` at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Device;
use chorus_environments::plugin::{RemoteEnvironment, RemoteOptions};
use chorus_environments::{NemoGym, NemoGymOptions, Registry, builtin_registry};
use chorus_learner::{
    AdamWConfig, GrpoConfig, LearnerConfig, LearnerService, LearnerServiceConfig, LrSchedule,
    Trainer, spawn_learner,
};
use chorus_model::engine::{EngineOptions, Nvfp4Policy};
use chorus_model::tokenizer::Tokenizer;
use chorus_model::{NemotronHConfig, checkpoint};
use chorus_orchestrator::Directory;
use chorus_orchestrator::config::{EnvironmentSource, RunConfig, StageKind};
use chorus_orchestrator::faults::EnvFaults;
use chorus_orchestrator::ledger::{Ledger, NewRun, RunStatus};
use chorus_orchestrator::remote::{RemoteLearner, WorkerPool};
use chorus_orchestrator::scheduler::{
    StageContext, StageStats, evaluate, run_rl_stage, run_sft_stage,
};
use chorus_proto::auth::RequireToken;
use chorus_proto::tonic::service::Routes;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::learner_server::LearnerServer;
use chorus_proto::v1::rollout_worker_server::RolloutWorkerServer;
use chorus_proto::v1::{
    LearnerStepCompleted, RunStatus as ProtoRunStatus, RunStatusChanged, run_event,
};
use chorus_rollout_worker::{
    RolloutService, WorkerHandle, fetch_version, follow_learner, spawn_engine_loop,
};
use clap::Args;
use serde_json::json;

/// Run a staged post-training job from a TOML config, all services in this process.
///
/// The learner, each rollout worker and the orchestrator talk gRPC on 127.0.0.1 with a shared
/// token. Everything is recorded in runs/<name>/ledger.sqlite (or --db), and the run ends by
/// writing runs/<name>/summary.json with held-out accuracy before and after RL.
///
/// Example: chorus run configs/quickstart.toml
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// The run configuration (TOML).
    config: PathBuf,
    /// Ledger database: sqlite://PATH or postgres://USER:PASS@HOST/DB. Default:
    /// sqlite://runs/<name>/ledger.sqlite.
    #[arg(long)]
    db: Option<String>,
    /// Directory for run outputs.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Held-out tasks per environment for the before/after evaluation.
    #[arg(long, default_value_t = 64)]
    eval_tasks: usize,
    /// Also evaluate every N RL steps while training, recording a learning curve (policy
    /// version, seconds since start, accuracy) in summary.json; 0 turns it off.
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Shared token of the services (generated when absent).
    #[arg(long, env = "CHORUS_TOKEN")]
    token: Option<String>,
}

/// Binds `listen` (e.g. 127.0.0.1:0) and serves the learner there; returns its URL.
pub async fn serve_learner(
    handle: chorus_learner::LearnerHandle,
    token: &str,
    listen: &str,
) -> anyhow::Result<String> {
    let svc =
        LearnerServer::with_interceptor(LearnerService::new(handle), RequireToken::new(token)?);
    serve_routes(Routes::new(svc), listen).await
}

/// Binds `listen` (port 0 picks a free port) and serves `routes` there in the background;
/// returns the URL clients use.
pub async fn serve_routes(routes: Routes, listen: &str) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        chorus_proto::tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(format!("http://{addr}"))
}

/// Starts a rollout worker that follows the learner at `learner_url`, serving on `listen`;
/// returns its URL and its handle.
#[allow(clippy::too_many_arguments)]
pub async fn serve_worker(
    model_cfg: &NemotronHConfig,
    learner_url: &str,
    token: &str,
    run_id: &str,
    worker_id: &str,
    max_batch: usize,
    options: EngineOptions,
    listen: &str,
) -> anyhow::Result<(String, WorkerHandle)> {
    let channel = chorus_proto::tonic::transport::Endpoint::from_shared(learner_url.to_string())?
        .connect()
        .await
        .with_context(|| format!("connecting to the learner at {learner_url}"))?;
    let mut client =
        LearnerClient::with_interceptor(channel, chorus_proto::auth::AttachToken::new(token)?);
    let (v, engine) = fetch_version(&mut client, model_cfg, &options, run_id, worker_id, 0)
        .await
        .map_err(anyhow::Error::msg)?;
    let handle = spawn_engine_loop(Arc::new(engine), v, max_batch);
    tokio::spawn(follow_learner(
        handle.clone(),
        client,
        model_cfg.clone(),
        options,
        run_id.to_string(),
        worker_id.to_string(),
    ));
    let svc = RolloutWorkerServer::with_interceptor(
        RolloutService::new(handle.clone(), worker_id),
        RequireToken::new(token)?,
    );
    Ok((serve_routes(Routes::new(svc), listen).await?, handle))
}

/// The policy's architecture, from the checkpoint's config.json or the init config.
pub fn model_config(cfg: &RunConfig) -> anyhow::Result<NemotronHConfig> {
    Ok(match (&cfg.checkpoint, &cfg.init_config) {
        (Some(dir), _) => NemotronHConfig::from_file(dir.join(checkpoint::CONFIG_FILE))?,
        (None, Some(c)) => NemotronHConfig::from_file(c)?,
        (None, None) => bail!("config has no model"),
    })
}

/// The policy's tokenizer: the configured file, the checkpoint's, or the byte-level one.
pub fn tokenizer(cfg: &RunConfig, model: &NemotronHConfig) -> anyhow::Result<Tokenizer> {
    let t = match (&cfg.tokenizer, &cfg.checkpoint) {
        (Some(t), _) => Tokenizer::from_file(t)?,
        (None, Some(dir)) if dir.join("tokenizer.json").exists() => {
            Tokenizer::from_file(&dir.join("tokenizer.json"))?
        }
        _ => Tokenizer::byte_level(),
    };
    if t.vocab_size() > model.vocab_size {
        bail!(
            "the tokenizer has {} ids but the model's vocab_size is {}",
            t.vocab_size(),
            model.vocab_size
        );
    }
    Ok(t)
}

/// How the run's workers store their projections.
pub fn worker_engine_options(cfg: &RunConfig) -> EngineOptions {
    EngineOptions {
        nvfp4: cfg.worker_nvfp4.then(|| Nvfp4Policy {
            keep_attention: cfg.worker_keep_attention_f32,
            exclude: vec![],
        }),
    }
}

/// The learner of a run: the trainer on its own thread, serving on `listen`.
pub async fn start_learner(
    cfg: &RunConfig,
    run_id: &str,
    token: &str,
    listen: &str,
) -> anyhow::Result<(chorus_learner::LearnerHandle, String)> {
    let model_cfg = model_config(cfg)?;
    let params = match &cfg.checkpoint {
        Some(dir) => checkpoint::load_checkpoint(dir, &Device::Cpu)?.1,
        None => checkpoint::init_params(&model_cfg, cfg.init_seed, &Device::Cpu)?,
    };
    let first = &cfg.stages[0];
    let learner_cfg = LearnerConfig {
        optimizer: AdamWConfig {
            max_grad_norm: cfg.max_grad_norm,
            ..Default::default()
        },
        // Each group carries its stage's rate for its step (warmup and decay per stage, see
        // `Stage::lr_at`), so the learner's own schedule stays flat.
        schedule: LrSchedule {
            peak_lr: first.lr,
            ..Default::default()
        },
        grpo: GrpoConfig {
            eps_low: cfg.eps_low,
            eps_high: cfg.eps_high,
            tis_cap: cfg.tis_cap,
            aggregation: if cfg.aggregation == "seq_mean" {
                chorus_learner::Aggregation::SeqMean
            } else {
                chorus_learner::Aggregation::TokenMean
            },
            ..Default::default()
        },
        freeze: if model_cfg.has_mtp() {
            vec!["mtp.".into()]
        } else {
            vec![]
        },
        nvfp4_forward: cfg
            .learner_nvfp4_forward
            .then(|| chorus_learner::Nvfp4Forward {
                keep_attention: cfg.worker_keep_attention_f32,
                exclude: vec![],
            }),
    };
    let trainer = Trainer::new(model_cfg, params, learner_cfg)?;
    let handle = spawn_learner(
        trainer,
        LearnerServiceConfig {
            run_id: run_id.to_string(),
            groups_per_step: first.prompts_per_step,
            max_chunk_bytes: 1 << 20,
        },
    );
    let url = serve_learner(handle.clone(), token, listen).await?;
    Ok((handle, url))
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let (cfg, config_toml) = super::load_config(&a.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(cfg, config_toml, a))
}

async fn run_async(cfg: RunConfig, config_toml: String, a: RunArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    for d in [&cfg.worker_device, &cfg.learner_device] {
        super::parse_device(d)?;
    }
    let out_dir = a.runs_dir.join(&cfg.name);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    if a.token.is_none()
        && let Some(url) = cfg
            .stages
            .iter()
            .flat_map(|s| &s.environments)
            .find_map(|e| match &e.source {
                EnvironmentSource::Remote(url) => Some(url),
                _ => None,
            })
    {
        bail!(
            "the config uses the environment plugin at {url}, which checks the run's shared token: \
             give the token the plugin was started with (--token T or CHORUS_TOKEN=T)"
        );
    }
    let token = a
        .token
        .clone()
        .unwrap_or_else(|| format!("chorus-{:x}", rand_token()));

    let run_id = format!(
        "{}-{}",
        cfg.name,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let (_learner, learner_url) = start_learner(&cfg, &run_id, &token, "127.0.0.1:0").await?;
    let model_cfg = model_config(&cfg)?;
    let mut worker_urls = vec![];
    for i in 0..cfg.workers {
        worker_urls.push(
            serve_worker(
                &model_cfg,
                &learner_url,
                &token,
                &run_id,
                &format!("w{i}"),
                cfg.worker_max_batch,
                worker_engine_options(&cfg),
                "127.0.0.1:0",
            )
            .await?
            .0,
        );
    }
    let summary = orchestrate(
        &cfg,
        &config_toml,
        &run_id,
        &learner_url,
        &worker_urls,
        &token,
        a.db.clone(),
        &out_dir,
        EvalPlan {
            tasks: a.eval_tasks,
            every: a.eval_every,
        },
        started,
        None,
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Held-out evaluation of a run: before and after RL, and optionally every `every` RL steps.
#[derive(Clone, Copy, Debug)]
pub struct EvalPlan {
    /// Held-out tasks per environment.
    pub tasks: usize,
    /// Evaluate every this many RL steps as well (0: only before and after).
    pub every: u64,
}

/// Runs the stages of `cfg` against a learner and workers already serving, then evaluates and
/// writes `summary.json` in `out_dir`; returns the summary.
#[allow(clippy::too_many_arguments)]
pub async fn orchestrate(
    cfg: &RunConfig,
    config_toml: &str,
    run_id: &str,
    learner_url: &str,
    worker_urls: &[String],
    token: &str,
    db: Option<String>,
    out_dir: &std::path::Path,
    eval: EvalPlan,
    started: Instant,
    directory: Option<Arc<Directory>>,
) -> anyhow::Result<serde_json::Value> {
    let run_id = run_id.to_string();
    let tokenizer = tokenizer(cfg, &model_config(cfg)?)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // Ledger and orchestrator.
    let db = db.unwrap_or_else(|| format!("sqlite://{}", out_dir.join("ledger.sqlite").display()));
    let ledger = Ledger::open(&db)
        .await
        .with_context(|| format!("opening the ledger {db}"))?;
    // A launched run is already in the ledger, as pending.
    ledger
        .insert_run(NewRun {
            id: run_id.clone(),
            name: cfg.name.clone(),
            config_toml: config_toml.to_string(),
            status: RunStatus::Running,
        })
        .await?;
    ledger.set_run_status(&run_id, RunStatus::Running).await?;
    let outcome: anyhow::Result<serde_json::Value> = async {
    let pool = WorkerPool::connect(worker_urls, token, cfg.worker_max_in_flight).await?;
    if let Some(d) = &directory {
        // Registered workers join (and lost ones leave) while the run goes on.
        pool.follow(d.clone()).await;
    }
    let pool = Arc::new(pool);
    let remote_learner = Arc::new(
        RemoteLearner::connect(learner_url, token, &run_id, 0, Some(ledger.clone())).await?,
    );
    let registry = {
        let (cfg, token) = (cfg.clone(), token.to_string());
        // Connecting to plugins blocks; environments are called from blocking threads.
        Arc::new(tokio::task::spawn_blocking(move || environment_registry(&cfg, &token)).await??)
    };
    let stats = Arc::new(StageStats::default());
    let mut ctx = StageContext {
        run_id: run_id.clone(),
        seed: cfg.seed,
        stage_index: 0,
        registry,
        tokenizer: Arc::new(tokenizer),
        ledger: ledger.clone(),
        rollouts: pool.clone(),
        learning: remote_learner.clone(),
        stats: stats.clone(),
        faults: Arc::new(EnvFaults::new(cfg.environment_faults)),
    };
    eprintln!(
        "run {run_id}: {} workers, learner at {learner_url}, ledger {db}",
        pool.ids().len()
    );

    if let Some(d) = &directory {
        d.emit(run_event::Kind::StatusChanged(RunStatusChanged {
            status: ProtoRunStatus::Running as i32,
            reason: String::new(),
        }));
    }

    // Live progress: one line per learner step (and a run event, when serving them).
    let mut steps = remote_learner.steps();
    let step_events = directory.clone();
    let progress_stats = stats.clone();
    let progress_started = Instant::now();
    tokio::spawn(async move {
        while let Ok(r) = steps.recv().await {
            if let Some(d) = &step_events {
                d.emit(run_event::Kind::LearnerStep(LearnerStepCompleted {
                    step: r.step,
                    loss: r.loss,
                    trajectories: r.trajectories,
                    skipped: !r.skip_reason.is_empty(),
                }));
            }
            let groups = progress_stats
                .groups_submitted
                .load(Ordering::Relaxed)
                .max(1);
            let trajectories = progress_stats
                .trajectories_submitted
                .load(Ordering::Relaxed);
            let reward = progress_stats.reward_micros.load(Ordering::Relaxed) as f64
                / 1e6
                / trajectories.max(1) as f64;
            let skipped = if r.skip_reason.is_empty() {
                String::new()
            } else {
                format!("  skipped: {}", r.skip_reason)
            };
            eprintln!(
                "step {:>4} {} v{:<4} loss {:>8.4} reward {:.3} traj {:>6} groups {:>5} lag<={} dropped {} failed {} {:.0}s{skipped}",
                r.step,
                if r.supervised { "sft" } else { "rl " },
                r.policy_version,
                r.loss,
                reward,
                trajectories,
                groups,
                progress_stats.max_lag.load(Ordering::Relaxed),
                progress_stats.prompts_dropped.load(Ordering::Relaxed),
                progress_stats.trajectories_failed.load(Ordering::Relaxed),
                progress_started.elapsed().as_secs_f64()
            );
        }
    });

    let eval_envs: Vec<(String, u32)> = {
        let mut seen = BTreeMap::new();
        for s in cfg.stages.iter().filter(|s| s.kind == StageKind::Rl) {
            for e in &s.environments {
                seen.entry(e.key().to_string()).or_insert(e.difficulty);
            }
        }
        seen.into_iter().collect()
    };
    let eval_tokens = cfg
        .stages
        .iter()
        .map(|s| s.max_new_tokens)
        .max()
        .unwrap_or(32);
    let eval_context = cfg
        .stages
        .iter()
        .map(|s| s.max_prompt_tokens)
        .max()
        .unwrap_or(256);
    let eval_tasks = eval.tasks;
    let rl_steps: u64 = cfg
        .stages
        .iter()
        .filter(|s| s.kind == StageKind::Rl)
        .map(|s| s.steps)
        .sum();
    let curve = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let mut curve_task = None;
    let mut before = None;
    for (i, stage) in cfg.stages.iter().enumerate() {
        ctx.stage_index = i;
        let shared = Arc::new(ctx.clone());
        if stage.kind == StageKind::Rl && before.is_none() {
            eprintln!(
                "evaluating {} held-out tasks per environment before RL ...",
                eval_tasks
            );
            before = Some(
                evaluate(
                    &shared,
                    &eval_envs,
                    eval_tasks,
                    eval_tokens,
                    eval_context,
                    ctx.learning.version(),
                )
                .await?,
            );
            eprintln!(
                "before RL: {}",
                accuracy_line(before.as_ref().expect("just set"))
            );
            let base = ctx.learning.version();
            curve.lock().expect("not poisoned").push(curve_point(
                base,
                started,
                before.as_ref().expect("just set"),
            ));
            if eval.every > 0 {
                // Evaluates each version as soon as the learner publishes it, alongside training.
                let (shared, envs, curve) = (shared.clone(), eval_envs.clone(), curve.clone());
                curve_task = Some(tokio::spawn(async move {
                    let mut k = eval.every;
                    while k < rl_steps {
                        shared
                            .learning
                            .wait_version(base + k)
                            .await
                            .map_err(anyhow::Error::msg)?;
                        let at = started.elapsed().as_secs_f64();
                        let acc = evaluate(
                            &shared,
                            &envs,
                            eval_tasks,
                            eval_tokens,
                            eval_context,
                            base + k,
                        )
                        .await?;
                        eprintln!("RL step {k}: {}", accuracy_line(&acc));
                        let mut point = curve_point(base + k, started, &acc);
                        point["seconds"] = json!(at);
                        curve.lock().expect("not poisoned").push(point);
                        k += eval.every;
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
        }
        eprintln!(
            "stage {} ({:?}): {} steps x {} prompts x {}",
            stage.name,
            stage.kind,
            stage.steps,
            stage.prompts_per_step,
            if stage.kind == StageKind::Rl {
                stage.group_size
            } else {
                1
            }
        );
        let st = Arc::new(stage.clone());
        match stage.kind {
            StageKind::Sft => run_sft_stage(shared, st).await?,
            StageKind::Rl => run_rl_stage(shared, st).await?,
        }
    }
    // Let the learner finish the last step before measuring.
    let final_version = ctx.learning.version();
    let after = evaluate(
        &Arc::new(ctx.clone()),
        &eval_envs,
        eval_tasks,
        eval_tokens,
        eval_context,
        final_version,
    )
    .await?;
    eprintln!("after RL:  {}", accuracy_line(&after));
    if let Some(task) = curve_task {
        task.await??;
    }
    let mut curve = std::mem::take(&mut *curve.lock().expect("not poisoned"));
    curve.push(curve_point(final_version, started, &after));
    curve.sort_by_key(|p| p["version"].as_u64());
    let before = before.unwrap_or_default();
    let mut envs = serde_json::Map::new();
    for (name, acc) in &after {
        let b = before.get(name).map(|x| x.accuracy).unwrap_or(0.0);
        envs.insert(
            name.clone(),
            json!({"heldout_n": acc.heldout_n, "before": b, "after": acc.accuracy}),
        );
    }
    ledger.flush().await?;
    let consumed = ledger.count_consumed(&run_id).await?;
    let summary = json!({
        "run": run_id,
        "environments": envs,
        "mean_before": mean_accuracy(&before),
        "mean_after": mean_accuracy(&after),
        "steps": ctx.learning.version(),
        "trajectories": consumed,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "max_lag": stats.max_lag.load(Ordering::Relaxed),
        "environment_faults": ctx.faults.report(),
        "curve": curve,
    });
    let path = out_dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
    ledger.set_run_status(&run_id, RunStatus::Succeeded).await?;
    // Durable before it is announced: a client told the run succeeded finds it so.
    ledger.flush().await?;
    if let Some(d) = &directory {
        d.emit(run_event::Kind::StatusChanged(RunStatusChanged {
            status: ProtoRunStatus::Succeeded as i32,
            reason: String::new(),
        }));
    }
    ledger.close().await?;
    eprintln!("wrote {} and the ledger {db}", path.display());
    Ok(summary)
    }
    .await;
    if outcome.is_err() {
        // The ledger says the run stopped; the caller reports why.
        let _ = ledger.set_run_status(&run_id, RunStatus::Failed).await;
        let _ = ledger.flush().await;
    }
    outcome
}

/// The environments of a run: every built-in, plus a [`RemoteEnvironment`] for each plugin entry
/// (registered under its URL, the entry's key) and a [`NemoGym`] for each `nemo_gym` entry
/// (under its name). Plugins are asked to describe themselves now, so an absent plugin or a
/// wrong token fails the run before it starts, with the entry and the address named. Each call
/// to a plugin or NeMo Gym server has the run's environment deadline
/// (`environment_faults.deadline_seconds`).
pub fn environment_registry(cfg: &RunConfig, token: &str) -> anyhow::Result<Registry> {
    let mut registry = builtin_registry();
    let builtins = registry.names();
    let mut added: BTreeMap<String, &EnvironmentSource> = BTreeMap::new();
    for (i, stage) in cfg.stages.iter().enumerate() {
        for (j, spec) in stage.environments.iter().enumerate() {
            let at = format!("stages[{i}].environments[{j}]");
            if let Some(earlier) = added.get(spec.key()) {
                if *earlier != &spec.source {
                    bail!(
                        "{at}: `{}` names two different environments in this config ({earlier:?} and {:?}); give them different names",
                        spec.key(),
                        spec.source
                    );
                }
                continue;
            }
            match &spec.source {
                EnvironmentSource::Builtin(name) => {
                    registry.get(name).with_context(|| format!("{at}.name"))?;
                }
                EnvironmentSource::Remote(url) => {
                    let options = RemoteOptions {
                        timeout: cfg.environment_faults.deadline,
                        ..RemoteOptions::default()
                    };
                    let env = RemoteEnvironment::connect_with(url, token, options)
                        .with_context(|| format!("{at}.url: connecting to the plugin"))?;
                    eprintln!("environment plugin `{}` at {url}", env.plugin_info().name);
                    registry.replace(Arc::new(env));
                }
                EnvironmentSource::NemoGym { name, url, dataset } => {
                    if builtins.contains(name) {
                        bail!(
                            "{at}.name: `{name}` is a built-in environment; give the nemo_gym entry another name"
                        );
                    }
                    let env = NemoGym::from_jsonl_file(name.clone(), url, dataset)
                        .with_context(|| format!("{at}: reading the NeMo Gym dataset"))?
                        .with_options(NemoGymOptions {
                            timeout: cfg.environment_faults.deadline,
                            ..NemoGymOptions::default()
                        });
                    registry.replace(Arc::new(env));
                }
            }
            added.insert(spec.key().to_string(), &spec.source);
        }
    }
    Ok(registry)
}

/// The mean over environments of held-out accuracy (0 when there are none).
fn mean_accuracy(acc: &BTreeMap<String, chorus_orchestrator::scheduler::Accuracy>) -> f64 {
    if acc.is_empty() {
        0.0
    } else {
        acc.values().map(|x| x.accuracy).sum::<f64>() / acc.len() as f64
    }
}

/// One point of the learning curve: a policy version, when it was reached, its accuracies.
fn curve_point(
    version: u64,
    started: Instant,
    acc: &BTreeMap<String, chorus_orchestrator::scheduler::Accuracy>,
) -> serde_json::Value {
    json!({
        "version": version,
        "seconds": started.elapsed().as_secs_f64(),
        "mean_accuracy": mean_accuracy(acc),
        "environments": acc.iter().map(|(k, v)| (k.clone(), json!(v.accuracy))).collect::<serde_json::Map<_, _>>(),
    })
}

fn accuracy_line(m: &BTreeMap<String, chorus_orchestrator::scheduler::Accuracy>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {:.1}%", 100.0 * v.accuracy))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rand_token() -> u128 {
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
