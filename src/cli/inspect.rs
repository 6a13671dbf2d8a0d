//! `chorus inspect`: read a run's ledger as tables, or one trajectory turn by turn.

use anyhow::Context;
use chorus_model::tokenizer::Tokenizer;
use chorus_orchestrator::config::HELDOUT_RM_SCORE;
use chorus_orchestrator::ledger::{Ledger, RolloutFilter, TrajectoryStatus};
use clap::{Args, Subcommand};

/// Inspect the ledger of runs: runs, the stages of a run, its policy versions, its held-out
/// evaluations (the learning curve), rollouts of a run, the learner's steps,
/// or one trajectory.
///
/// Examples:
///   chorus inspect runs
///   chorus inspect stages --run quickstart-20261204-011918-3fa2b1c0
///   chorus inspect versions --run quickstart-20261204-011918-3fa2b1c0
///   chorus inspect evals --run quickstart-20261204-011918-3fa2b1c0
///   chorus inspect rollouts --run quickstart-20261204-011918-3fa2b1c0 --env arithmetic --min-reward 1 --limit 20
///   chorus inspect trajectory 'quickstart-20261204-011918-3fa2b1c0:s1:61:3:a0:p:t2'
///   chorus inspect --db postgres://chorus:chorus@127.0.0.1/chorus runs
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct InspectArgs {
    /// Ledger database: sqlite://PATH or postgres://… (default: the newest runs/*/ledger.sqlite).
    #[arg(long, global = true)]
    db: Option<String>,
    #[command(subcommand)]
    what: InspectCommand,
}

#[derive(Subcommand, Debug)]
pub enum InspectCommand {
    /// Runs in the ledger, newest first.
    Runs {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Trajectories of a run, newest first.
    Rollouts {
        /// Run id (see `chorus inspect runs`).
        #[arg(long)]
        run: String,
        /// Only this environment.
        #[arg(long)]
        env: Option<String>,
        /// Only rewards at least this high.
        #[arg(long)]
        min_reward: Option<f64>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One trajectory: its prompt, completion, reward and the version of every token.
    Trajectory {
        /// Trajectory id (see `chorus inspect rollouts`).
        id: String,
    },
    /// The learner's steps of a run.
    Steps {
        #[arg(long)]
        run: String,
    },
    /// The stages of a run: kind, status, steps, metric at the start and the end, trajectories,
    /// checkpoint.
    Stages {
        /// Run id (see `chorus inspect runs`).
        #[arg(long)]
        run: String,
    },
    /// The policy versions the learner published in a run: learner step, stage, the weights'
    /// digest (its algorithm and first 16 hex digits) and size, seconds since the run began, and the checkpoint of a stage that ended
    /// with that version.
    Versions {
        /// Run id (see `chorus inspect runs`).
        #[arg(long)]
        run: String,
    },
    /// The held-out evaluations of a run, version by version (its learning curve): per
    /// environment the distinct tasks, those solved, the accuracy with its 95% interval and the
    /// mean reward.
    Evals {
        /// Run id (see `chorus inspect runs`).
        #[arg(long)]
        run: String,
    },
}

pub(super) fn default_db() -> anyhow::Result<String> {
    let mut newest: Option<(std::time::SystemTime, std::path::PathBuf)> = None;
    for entry in std::fs::read_dir("runs").context("no --db given and no runs/ directory here")? {
        let p = entry?.path().join("ledger.sqlite");
        if let Ok(m) = std::fs::metadata(&p).and_then(|m| m.modified())
            && newest.as_ref().is_none_or(|(t, _)| m > *t)
        {
            newest = Some((m, p));
        }
    }
    let (_, p) = newest.context("no runs/*/ledger.sqlite here; give --db")?;
    Ok(format!("sqlite://{}", p.display()))
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let db = match a.db {
        Some(d) => d,
        None => default_db()?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let ledger = Ledger::open(&db).await.with_context(|| format!("opening {db}"))?;
        match a.what {
            InspectCommand::Runs { limit } => {
                outln!("{:<40} {:<16} {:<10} {:>10} {:>8}", "run", "name", "status", "consumed", "steps");
                for r in ledger.list_runs(limit).await? {
                    let consumed = ledger.count_consumed(&r.id).await?;
                    let steps = ledger.list_learner_steps(&r.id).await?.len();
                    outln!("{:<40} {:<16} {:<10} {:>10} {:>8}", r.id, r.name, r.status.as_str(), consumed, steps);
                }
            }
            InspectCommand::Rollouts { run, env, min_reward, limit } => {
                let rows = ledger.list_rollouts(&RolloutFilter { run_id: Some(run), environment: env, min_reward, limit, ..Default::default() }).await?;
                outln!("{:<44} {:<16} {:<10} {:>7} {:>6} {:>9} {:>6}  status", "trajectory", "environment", "worker", "reward", "tokens", "versions", "step");
                for r in rows {
                    let versions = match (r.min_policy_version, r.max_policy_version) {
                        (Some(a), Some(b)) if a == b => format!("{a}"),
                        (Some(a), Some(b)) => format!("{a}-{b}"),
                        _ => "-".into(),
                    };
                    let status = match &r.status {
                        TrajectoryStatus::Ok => "ok".to_string(),
                        TrajectoryStatus::Failed { reason } => format!("failed: {reason}"),
                    };
                    let reward = r.reward.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
                    let step = r.consumed_at_step.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                    outln!("{:<44} {:<16} {:<10} {:>7} {:>6} {:>9} {:>6}  {status}", r.id, r.environment, r.worker_id, reward, r.num_completion_tokens, versions, step);
                }
            }
            InspectCommand::Trajectory { id } => {
                let t = ledger.get_trajectory(&id).await?.with_context(|| format!("no trajectory `{id}` in {db}"))?;
                let tr = &t.trajectory;
                let tok = Tokenizer::byte_level();
                let prompt = tok.decode(&tr.prompt_token_ids, false).unwrap_or_else(|_| format!("{:?}", tr.prompt_token_ids));
                outln!("trajectory  {}\nrun         {}\nenvironment {}\nworker      {}\ngroup       {}", tr.id, tr.run_id, tr.environment, tr.worker_id, tr.group_id);
                outln!("\n--- prompt ({} tokens)\n{prompt}", tr.prompt_token_ids.len());
                outln!("\n--- completion ({} tokens, {:?})\n{}", tr.completion_token_ids.len(), tr.finish_reason, tr.completion_text);
                if !tr.policy_versions.is_empty() {
                    outln!("\n--- tokens");
                    for (i, id) in tr.completion_token_ids.iter().enumerate() {
                        let text = tok.decode(&[*id], false).unwrap_or_default();
                        let lp = tr.logprobs.get(i).map(|x| format!("{x:.3}")).unwrap_or_default();
                        let v = tr.policy_versions.get(i).map(|x| x.to_string()).unwrap_or_default();
                        outln!("{i:>4} {:<10} logprob {lp:>8} version {v}", format!("{text:?}"));
                    }
                }
                outln!("\n--- reward {}", tr.reward.map(|x| format!("{x:.3}")).unwrap_or_else(|| "none".into()));
                for (k, v) in &tr.reward_components {
                    outln!("  {k}: {v:.3}");
                }
                if let Some(r) = &tr.reason {
                    outln!("  reason: {r}");
                }
                match &tr.status {
                    TrajectoryStatus::Ok => {}
                    TrajectoryStatus::Failed { reason } => outln!("  FAILED: {reason}"),
                }
                outln!("  consumed at step {}", t.consumed_at_step.map(|s| s.to_string()).unwrap_or_else(|| "-".into()));
            }
            InspectCommand::Stages { run } => {
                let stages = ledger.list_stages(&run).await?;
                if stages.is_empty() {
                    anyhow::bail!("run `{run}` has no stages in {db} (see `chorus inspect runs`)");
                }
                outln!("{:>2} {:<16} {:<12} {:<10} {:>11} {:<22} {:>7} {:>7} {:>12}  checkpoint", "#", "stage", "kind", "status", "steps", "metric", "start", "end", "trajectories");
                for r in stages {
                    let steps = match r.last_step {
                        _ if !r.moved_policy() => "-".to_string(),
                        Some(last) => format!("{}-{}", r.stage.first_step + 1, last),
                        None => format!("{}-", r.stage.first_step + 1),
                    };
                    let metric = r.stage.metric.as_deref();
                    outln!(
                        "{:>2} {:<16} {:<12} {:<10} {:>11} {:<22} {:>7} {:>7} {:>12}  {}",
                        r.stage.stage_index,
                        r.stage.name,
                        r.stage.kind,
                        r.status.as_str(),
                        steps,
                        metric.unwrap_or("-"),
                        metric_value(metric, r.stage.metric_start),
                        metric_value(metric, r.metric_end),
                        r.trajectories.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                        r.checkpoint_path.as_deref().unwrap_or("-"),
                    );
                }
            }
            InspectCommand::Versions { run } => {
                let Some(record) = ledger.get_run(&run).await? else {
                    anyhow::bail!("no run `{run}` in {db} (see `chorus inspect runs`)");
                };
                let versions = ledger.list_policy_versions(&run).await?;
                if versions.is_empty() {
                    anyhow::bail!("run `{run}` has no policy versions in {db}");
                }
                let stages = ledger.list_stages(&run).await?;
                let stage_name = |i: Option<u64>| {
                    i.and_then(|i| stages.iter().find(|s| s.stage.stage_index == i))
                        .map_or("-".to_string(), |s| s.stage.name.clone())
                };
                outln!("{:>8} {:>6} {:<16} {:<23} {:>10} {:>9}  checkpoint", "version", "step", "stage", "digest", "MB", "at (s)");
                for v in versions {
                    // A reward-model stage's checkpoint is its judge's, not this policy's.
                    let checkpoint = stages
                        .iter()
                        .find(|s| s.last_step == Some(v.version.version) && s.stage.kind != "reward_model")
                        .and_then(|s| s.checkpoint_path.clone());
                    outln!(
                        "{:>8} {:>6} {:<16} {:<23} {:>10.2} {:>9.1}  {}",
                        v.version.version,
                        v.version.learner_step,
                        stage_name(v.stage_index),
                        short_digest(&v.version.weights_digest),
                        v.version.num_bytes as f64 / 1e6,
                        (v.created_at_ms - record.created_at_ms) as f64 / 1000.0,
                        checkpoint.as_deref().unwrap_or("-"),
                    );
                }
            }
            InspectCommand::Evals { run } => {
                let evals = ledger.list_evaluations(&run).await?;
                if evals.is_empty() {
                    anyhow::bail!("run `{run}` has no held-out evaluations in {db} (was it run with --eval-tasks 0?)");
                }
                outln!("{:>8} {:>5} {:<24} {:>6} {:>7} {:>7} {:>9} {:>16} {:>11}", "version", "stage", "environment", "tasks", "samples", "solved", "accuracy", "95% interval", "mean reward");
                for e in evals {
                    outln!(
                        "{:>8} {:>5} {:<24} {:>6} {:>7} {:>7} {:>8.1}% {:>16} {:>11.3}",
                        e.policy_version,
                        e.stage_index.map_or("-".to_string(), |i| i.to_string()),
                        if e.difficulty == 0 { e.environment.clone() } else { format!("{} (level {})", e.environment, e.difficulty) },
                        e.tasks,
                        e.samples_per_task,
                        e.correct,
                        100.0 * e.accuracy,
                        format!("[{:.1}, {:.1}]", 100.0 * e.accuracy_lo, 100.0 * e.accuracy_hi),
                        e.mean_reward,
                    );
                }
            }
            InspectCommand::Steps { run } => {
                outln!("{:>6} {:>8} {:>10} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9}  note", "step", "version", "loss", "kl", "entropy", "grad", "lr", "tokens", "|dlogp|");
                for s in ledger.list_learner_steps(&run).await? {
                    let s = s.step;
                    let f = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
                    outln!(
                        "{:>6} {:>8} {:>10} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9}  {}",
                        s.step,
                        s.policy_version,
                        f(s.loss),
                        f(s.kl),
                        f(s.entropy),
                        f(s.grad_norm),
                        s.learning_rate.map(|x| format!("{x:.1e}")).unwrap_or_else(|| "-".into()),
                        s.num_tokens,
                        f(s.mean_abs_logprob_diff),
                        s.skip_reason.unwrap_or_default()
                    );
                }
            }
        }
        ledger.close().await?;
        anyhow::Ok(())
    })
}

/// A ledger digest (`blake3:<64 hex>`) cut to its algorithm and first 16 hex digits.
fn short_digest(digest: &str) -> &str {
    let end = digest.find(':').map_or(0, |i| i + 1) + 16;
    digest.get(..end).unwrap_or(digest)
}

/// A stage's metric as `inspect stages` prints it: a reward model's mean score as a number,
/// the other metrics (accuracies, pass and acceptance rates) as percentages.
fn metric_value(metric: Option<&str>, value: Option<f64>) -> String {
    match (metric, value) {
        (_, None) => "-".into(),
        (Some(HELDOUT_RM_SCORE), Some(v)) => format!("{v:.3}"),
        (_, Some(v)) => format!("{:.1}%", 100.0 * v),
    }
}
